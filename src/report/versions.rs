//! `imba versions`: the list of an output's versions and the diff between two of them.

use std::path::Path;

use serde_json::Value as Json;

use crate::store::versions::{all_versions, find_version, latest, read_meta, Meta};

/// The table a version's summary is about: `features.parquet`, else its first table.
fn main_table(meta: &Meta) -> Option<(&String, &Json)> {
    let tables = meta.tables.as_object()?;
    tables
        .iter()
        .find(|(name, _)| name.ends_with(".parquet"))
        .or_else(|| tables.iter().next())
}

/// `imba versions`: one line (or JSON object) per version.
pub fn list(root: &Path, shown: &str, json: bool) -> Result<String, String> {
    let versions = all_versions(root);
    let latest = latest(root).map(|(v, _)| v);
    let mut rows = Vec::new();
    let mut previous: Option<Meta> = None;
    for (version, dir, archived) in versions {
        let meta = read_meta(&dir)?;
        let (rows_count, columns) = main_table(&meta)
            .map(|(_, t)| (t["rows"].as_u64(), t["columns"].as_array().map(|c| c.len())))
            .unwrap_or((None, None));
        let mut changed: Vec<String> = Vec::new();
        if let Some(previous) = &previous {
            if let (Some(now), Some(before)) =
                (meta.inputs.as_object(), previous.inputs.as_object())
            {
                for (path, hash) in now {
                    if before.get(path).map(|h| &h["hash"]) != Some(&hash["hash"]) {
                        changed.push(path.clone());
                    }
                }
            }
            if meta.params != previous.params {
                changed.push("params".to_owned());
            }
        }
        rows.push(serde_json::json!({
            "version": version,
            "name": meta.name,
            "created_at": meta.created_at,
            "rows": rows_count,
            "columns": columns,
            "fingerprint": meta.fingerprint,
            "changed": if previous.is_some() { Json::from(changed) } else { Json::Null },
            "latest": latest == Some(version),
            "archived": archived,
            "path": dir.display().to_string(),
        }));
        previous = Some(meta);
    }
    if json {
        return Ok(serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n");
    }
    if rows.is_empty() {
        return Ok(format!("no versions of {shown} yet\n"));
    }
    let cell = |v: &Json| match v {
        Json::Null => "-".to_owned(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut table: Vec<[String; 7]> = vec![[
        "VERSION".into(),
        "CREATED".into(),
        "ROWS".into(),
        "COLUMNS".into(),
        "FINGERPRINT".into(),
        "CHANGED SINCE THE ONE BEFORE".into(),
        String::new(),
    ]];
    for row in &rows {
        let changed = match &row["changed"] {
            Json::Array(items) if items.is_empty() => "nothing".to_owned(),
            Json::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
            _ => "-".to_owned(),
        };
        let mark = if row["latest"] == true {
            "latest"
        } else if row["archived"] == true {
            "archived"
        } else {
            ""
        };
        table.push([
            cell(&row["name"]),
            cell(&row["created_at"]),
            cell(&row["rows"]),
            cell(&row["columns"]),
            cell(&row["fingerprint"]).chars().take(12).collect(),
            changed,
            mark.to_owned(),
        ]);
    }
    let out = super::table(&table);
    Ok(out)
}

/// `imba versions diff`: columns added and removed, rows, and each common column's mean.
pub fn diff(root: &Path, from: &str, to: &str, json: bool) -> Result<String, String> {
    let (a, a_dir) = find_version(root, from)?;
    let (b, b_dir) = find_version(root, to)?;
    let (a_meta, b_meta) = (read_meta(&a_dir)?, read_meta(&b_dir)?);
    let empty = Json::Null;
    let (a_table, b_table) = (
        main_table(&a_meta).map_or(&empty, |(_, t)| t),
        main_table(&b_meta).map_or(&empty, |(_, t)| t),
    );
    let columns = |t: &Json| -> Vec<(String, Json)> {
        t["columns"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        (
                            c["name"].as_str().unwrap_or_default().to_owned(),
                            c["mean"].clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (a_cols, b_cols) = (columns(a_table), columns(b_table));
    let names = |cs: &[(String, Json)]| cs.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let added: Vec<String> = names(&b_cols)
        .into_iter()
        .filter(|n| !a_cols.iter().any(|(m, _)| m == n))
        .collect();
    let removed: Vec<String> = names(&a_cols)
        .into_iter()
        .filter(|n| !b_cols.iter().any(|(m, _)| m == n))
        .collect();
    let means: Vec<Json> = a_cols
        .iter()
        .filter_map(|(name, before)| {
            let (_, after) = b_cols.iter().find(|(n, _)| n == name)?;
            let (x, y) = (before.as_f64()?, after.as_f64()?);
            let pct = (x != 0.0).then(|| (y - x) / x.abs() * 100.0);
            Some(serde_json::json!({"column": name, "from": x, "to": y, "change_pct": pct}))
        })
        .collect();
    let identical = a_meta.content_hash == b_meta.content_hash;
    let value = serde_json::json!({
        "from": a_meta.name, "to": b_meta.name, "identical": identical,
        "rows": {"from": a_table["rows"], "to": b_table["rows"]},
        "added": added, "removed": removed, "means": means,
    });
    if json {
        return Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n");
    }
    let _ = (a, b);
    if identical {
        return Ok(format!(
            "{} → {}: identical content (same content hash {})\n",
            a_meta.name,
            b_meta.name,
            &a_meta.content_hash[..a_meta.content_hash.len().min(12)]
        ));
    }
    let mut out = format!("{} → {}\n", a_meta.name, b_meta.name);
    out.push_str(&format!(
        "rows: {} → {}\n",
        a_table["rows"], b_table["rows"]
    ));
    let listed = |items: &[String]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    out.push_str(&format!("columns added: {}\n", listed(&added)));
    out.push_str(&format!("columns removed: {}\n", listed(&removed)));
    if !means.is_empty() {
        out.push_str("means:\n");
        for m in &means {
            let pct = m["change_pct"]
                .as_f64()
                .map(|p| format!(" ({p:+.2}%)"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {}: {} → {}{pct}\n",
                m["column"].as_str().unwrap_or_default(),
                round6(m["from"].as_f64()),
                round6(m["to"].as_f64())
            ));
        }
    }
    Ok(out)
}

fn round6(value: Option<f64>) -> String {
    match value {
        Some(v) if v == v.trunc() && v.abs() < 1e15 => format!("{}", v as i64),
        Some(v) => format!("{}", (v * 1e6).round() / 1e6),
        None => "-".to_owned(),
    }
}
