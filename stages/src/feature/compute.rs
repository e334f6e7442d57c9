//! Computing the feature table: each group aggregated (or taken) per entity by polars SQL,
//! joined on the entity, then the derived features.

use std::collections::BTreeMap;

use polars::prelude::*;

use super::*;

/// Quotes a name for polars SQL.
pub(super) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A `columns:` group's error for a table that repeats an entity: how many rows repeat one, and
/// the key of the first of them in file order.
pub(super) fn repeated_entity(
    params: &FeatureParams,
    group: &Group,
    index: &str,
    repeats: usize,
    key: &str,
) -> StageError {
    let repeated = match repeats {
        1 => "1 row repeats".to_owned(),
        n => format!("{n} rows repeat"),
    };
    StageError::new(format!(
        "group `{}` takes columns from `{}` as one row per `{entity}`, but {repeated} an entity (e.g. {entity} = {key}); aggregate them with `features:` instead",
        group.name,
        group.from,
        entity = params.entity,
    ))
    .at_param(pointer(&["groups", index, "columns"]))
}

/// Aggregated features with polars' unsigned counts (`count(*)`) as signed 64-bit integers, as
/// pandas and Spark count.
fn signed_counts(frame: DataFrame) -> PolarsResult<DataFrame> {
    let unsigned: Vec<PlSmallStr> = frame
        .columns()
        .iter()
        .filter(|c| c.dtype().is_unsigned_integer())
        .map(|c| c.name().clone())
        .collect();
    if unsigned.is_empty() {
        return Ok(frame);
    }
    frame
        .lazy()
        .with_columns(
            unsigned
                .into_iter()
                .map(|n| col(n).cast(DataType::Int64))
                .collect::<Vec<_>>(),
        )
        .collect()
}

/// The first feature of `group` whose query fails on `empty` (the group's table without its
/// rows), as an error at that feature.
fn probe_features(
    params: &FeatureParams,
    group: &Group,
    index: &str,
    empty: &DataFrame,
    filter: &str,
) -> Result<(), StageError> {
    let features_at = ["groups", index, "features"];
    for (at, feature, definition) in located(&group.features, &features_at) {
        let mut probe = polars::sql::SQLContext::new();
        probe.register("t", empty.clone().lazy());
        let query = format!(
            "SELECT {e}, {sql} AS {f} FROM t{filter} GROUP BY {e}",
            e = quoted(&params.entity),
            sql = definition.sql(),
            f = quoted(feature)
        );
        probe
            .execute(&query)
            .and_then(|lf| lf.collect())
            .map_err(|e| {
                StageError::new(format!(
                    "feature `{feature}` of group `{}`: {e}",
                    group.name
                ))
                .at_param(at.clone())
            })?;
    }
    Ok(())
}

/// The feature table.
pub fn compute(
    params: &FeatureParams,
    tables: &BTreeMap<String, DataFrame>,
) -> Result<DataFrame, StageError> {
    let sorted = tables
        .iter()
        .map(|(name, df)| {
            let in_order = crate::io::partition::rows_sorted(df, &params.entity);
            (name.clone(), in_order)
        })
        .collect();
    compute_in_order(params, tables, &sorted)
}

/// [`compute`], given for each table whether its rows with an entity are in entity order (in
/// the whole table, of which `tables` may hold one range). polars then groups an ordered table
/// by slices instead of by hashing, a third faster; its float sums differ from the hashed
/// grouping's in the last bits, so the choice is the whole table's, and a range is grouped as
/// the whole table would be. When a group's query fails, each of its features is run alone on
/// an empty table, so that the error names the one that fails.
pub(super) fn compute_in_order(
    params: &FeatureParams,
    tables: &BTreeMap<String, DataFrame>,
    sorted: &BTreeMap<String, bool>,
) -> Result<DataFrame, StageError> {
    let entity = &params.entity;
    let mut steps = crate::steps::Steps::start_part("feature compute");
    let mut joined: Option<DataFrame> = None;
    for (index, group) in params.groups.iter().enumerate() {
        let group_name = &group.name;
        let index = index.to_string();
        let group_at = |rest: &[&str]| {
            let mut segments = vec!["groups", index.as_str()];
            segments.extend_from_slice(rest);
            pointer(&segments)
        };
        let Some(table) = tables.get(&group.from) else {
            let names: Vec<&str> = tables.keys().map(String::as_str).collect();
            return Err(StageError::new(format!(
                "group `{group_name}` reads `{}`, which is not among the stage's inputs ({})",
                group.from,
                names.join(", ")
            ))
            .at_param(group_at(&["from"])));
        };
        if table.column(entity).is_err() {
            return Err(StageError::new(format!(
                "group `{group_name}`: table `{}` has no entity column `{entity}`",
                group.from
            ))
            .at_param("/entity"));
        }
        let table = &if sorted.get(&group.from).copied().unwrap_or(false) {
            // Only the rows with an entity count in any feature.
            crate::io::partition::in_key_order(table, entity)
                .map_err(|e| StageError::new(e.to_string()))?
        } else {
            table.clone()
        };
        let mut context = polars::sql::SQLContext::new();
        context.register("t", table.clone().lazy());
        // A row without its entity belongs to no one.
        let filter = match &group.filter {
            Some(f) => format!(" WHERE {} IS NOT NULL AND ({f})", quoted(entity)),
            None => format!(" WHERE {} IS NOT NULL", quoted(entity)),
        };
        let frame = if !group.features.is_empty() {
            let selected: Vec<String> = entries(&group.features)
                .map(|(feature, definition)| format!("{} AS {}", definition.sql(), quoted(feature)))
                .collect();
            let query = format!(
                "SELECT {e}, {} FROM t{filter} GROUP BY {e}",
                selected.join(", "),
                e = quoted(entity)
            );
            let frame = match context.execute(&query).and_then(|lf| lf.collect()) {
                Ok(frame) => frame,
                Err(e) => {
                    // The feature that fails, if one fails alone; else the group's query.
                    probe_features(params, group, &index, &table.clear(), &filter)?;
                    return Err(StageError::new(format!("group `{group_name}`: {e}"))
                        .at_param(group_at(&[])));
                }
            };
            steps.done("group by");
            signed_counts(frame).map_err(|e| StageError::new(e.to_string()))?
        } else {
            let mut columns = vec![quoted(entity)];
            columns.extend(group.columns.iter().map(|c| quoted(c)));
            let query = format!("SELECT {} FROM t{filter}", columns.join(", "));
            let frame = context
                .execute(&query)
                .and_then(|lf| lf.collect())
                .map_err(|e| {
                    StageError::new(format!("group `{group_name}`: {e}"))
                        .at_param(group_at(&["columns"]))
                })?;
            // One row per entity, or the join would multiply rows.
            let names = [PlSmallStr::from(entity.as_str())];
            let alive = BooleanChunked::full("alive".into(), true, frame.height());
            let repeats = crate::io::rows::repeated_rows(&frame, &names, &alive)
                .map_err(|e| StageError::new(e.to_string()))?;
            if let Some(&row) = repeats.first() {
                let key = frame
                    .column(entity)
                    .and_then(|c| c.get(row as usize))
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                return Err(repeated_entity(params, group, &index, repeats.len(), &key));
            }
            frame
        };
        joined = Some(match joined {
            None => frame,
            Some(left) => left
                .lazy()
                .join(
                    frame.lazy(),
                    [col(entity.as_str())],
                    [col(entity.as_str())],
                    JoinArgs::new(JoinType::Left),
                )
                .collect()
                .map_err(|e| {
                    StageError::new(format!("joining group `{group_name}` on `{entity}`: {e}"))
                        .at_param(group_at(&[]))
                })?,
        });
    }
    steps.done("joins");
    let mut out =
        joined.ok_or_else(|| StageError::new("no groups of features").at_param("/groups"))?;
    for (at, feature, definition) in located(&params.derive, &["derive"]) {
        let expr = polars::sql::sql_expr(definition.sql()).map_err(|e| {
            StageError::new(format!("derived feature `{feature}`: {e}")).at_param(at.clone())
        })?;
        out = out
            .lazy()
            .with_column(expr.alias(feature.as_str()))
            .collect()
            .map_err(|e| {
                StageError::new(format!("derived feature `{feature}`: {e}")).at_param(at.clone())
            })?;
    }
    steps.done("derive");
    let order: Vec<PlSmallStr> = feature_names(params)
        .iter()
        .map(|n| PlSmallStr::from(n.as_str()))
        .collect();
    out.lazy()
        .select(order.iter().map(|n| col(n.clone())).collect::<Vec<_>>())
        .sort([entity.as_str()], SortMultipleOptions::default())
        .collect()
        .map_err(|e| StageError::new(e.to_string()))
}
