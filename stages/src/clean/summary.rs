//! The summary JSON: what each step removed, with the seed's keys.

use serde_json::{json, Value as Json};

use super::*;

/// The summary: the seed's keys (`initial`, `after_*`, `removed_*`, `iqr_bounds`), then where
/// each row went. `columns` are the output's.
pub(super) fn summary(
    counts: &Counts,
    params: &CleanParams,
    fences: &[(String, Fence)],
    columns: Vec<String>,
) -> Json {
    let mut summary = serde_json::Map::new();
    summary.insert("initial".into(), json!(counts.initial));
    summary.insert("after_cast".into(), json!(counts.after_cast));
    summary.insert("after_domain".into(), json!(counts.after_domain));
    summary.insert(
        "removed_domain".into(),
        json!(counts.after_cast - counts.after_domain),
    );
    summary.insert("after_iqr".into(), json!(counts.after_iqr));
    summary.insert(
        "removed_iqr".into(),
        json!(counts.after_domain - counts.after_iqr),
    );
    if params.iqr.is_some() {
        let bounds: serde_json::Map<String, Json> = fences
            .iter()
            .map(|(column, f)| {
                (
                    column.clone(),
                    json!({"q1": f.q1, "q3": f.q3, "lower": f.lower, "upper": f.upper}),
                )
            })
            .collect();
        let value = if fences.len() == 1 {
            bounds.values().next().cloned().unwrap_or(Json::Null)
        } else {
            Json::Object(bounds)
        };
        summary.insert("iqr_bounds".into(), value);
    }
    summary.insert("after_dropna_dedup".into(), json!(counts.kept));
    summary.insert(
        "removed_dropna_dedup".into(),
        json!(counts.after_iqr - counts.kept),
    );
    // More than the seed's keys: where each row went.
    summary.insert("removed_cast".into(), json!(counts.removed_cast));
    summary.insert(
        "cast_nulls".into(),
        Json::Object(
            counts
                .cast_nulls
                .iter()
                .map(|(c, n)| (c.clone(), json!(n)))
                .collect(),
        ),
    );
    summary.insert(
        "removed_domain_by_rule".into(),
        Json::Object(
            counts
                .removed_domain_by_rule
                .iter()
                .map(|(c, n)| (c.clone(), json!(n)))
                .collect(),
        ),
    );
    summary.insert(
        "removed_dropna".into(),
        json!(counts.after_iqr - counts.after_dropna),
    );
    summary.insert(
        "removed_dedup".into(),
        json!(counts.after_dropna - counts.kept),
    );
    summary.insert("columns".into(), json!(columns));
    Json::Object(summary)
}
