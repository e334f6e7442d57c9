//! The `feature` stage: declarative features per entity, in named groups, written in polars SQL.
//!
//! Each group reads one input table (by its name under `inputs:`), optionally filtered by a SQL
//! condition (a time window: `order_month >= '2017-03'`), and either aggregates it per entity
//! (`features:` of SQL aggregate expressions: `count(*)`, `avg(days)`, `avg(CASE WHEN … END)`)
//! or, for a table with one row per entity, takes its `columns:` as they are (a repeated entity
//! is an error naming an example key, never a silent multiplication of rows). The groups are
//! joined on the entity, starting from the first group's entities, and `derive:` adds features
//! computed from the others (ratios, flags). Rows come out sorted by entity, columns in the order
//! written, so the same inputs and definitions always give the same bytes.

use std::collections::BTreeMap;

use polars::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::io::table::{is_csv, read_parquet, read_table_inferred, write_table, TableWriter};
use crate::pointer::of as pointer;
use crate::ports::{Inputs, Port};
use crate::{BuiltinStage, ParamsError, StageError, StageIo, StageReport};

/// Params of `feature`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureParams {
    /// The entity column, present in every group's table (e.g. `user_id`).
    pub entity: String,
    /// Feature groups, in the order their columns come out. The first group's entities are the
    /// rows of the output.
    pub groups: Vec<Group>,
    /// Features computed from the groups' features, in order (a later one may use an earlier
    /// one): `- name: SQL expression over them` (`order_count / nullif(active_months, 0)`).
    #[serde(default)]
    pub derive: Features,
    /// When the output is a directory (a versioned one): the files written in it,
    /// `features.parquet` and/or `features.csv`.
    #[serde(default = "parquet_only")]
    pub formats: Vec<Format>,
}

fn parquet_only() -> Vec<Format> {
    vec![Format::Parquet]
}

/// A file format of a directory output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Parquet,
    Csv,
}

/// Features in the order written: a list of `name: SQL` (or `name: {sql, desc}`) entries.
pub type Features = Vec<BTreeMap<String, Feature>>;

/// The entries of a feature list, in order.
fn entries(features: &Features) -> impl Iterator<Item = (&String, &Feature)> {
    features.iter().flat_map(|entry| entry.iter())
}

/// The entries of a feature list with the JSON pointer of each, under `at`.
fn located<'a>(
    features: &'a Features,
    at: &'a [&'a str],
) -> impl Iterator<Item = (String, &'a String, &'a Feature)> + 'a {
    features.iter().enumerate().flat_map(move |(i, entry)| {
        entry.iter().map(move |(name, feature)| {
            let index = i.to_string();
            let mut segments: Vec<&str> = at.to_vec();
            segments.push(&index);
            segments.push(name);
            (pointer(&segments), name, feature)
        })
    })
}

/// One group of features from one input table.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The group's name, for messages and the metadata.
    pub name: String,
    /// The input table, by its name under `inputs:`.
    pub from: String,
    /// What the group is about, for the metadata.
    #[serde(default)]
    pub desc: Option<String>,
    /// A SQL condition on the table's rows before anything is computed (a time window).
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
    /// Aggregated features, in order: `- name: SQL aggregate expression` over the group's rows
    /// of an entity (`count(*)`, `avg(days)`).
    #[serde(default)]
    pub features: Features,
    /// Columns taken as they are from a table with one row per entity.
    #[serde(default)]
    pub columns: Vec<String>,
}

/// A feature: a SQL expression, or `{sql, desc}`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Feature {
    Sql(String),
    Described {
        sql: String,
        /// What the feature means, for the metadata.
        desc: String,
    },
}

impl Feature {
    pub fn sql(&self) -> &str {
        match self {
            Feature::Sql(sql) | Feature::Described { sql, .. } => sql,
        }
    }

    pub fn desc(&self) -> Option<&str> {
        match self {
            Feature::Sql(_) => None,
            Feature::Described { desc, .. } => Some(desc),
        }
    }
}

/// The columns of `table` (named `name` under `inputs:`) that its groups may use: the entity,
/// and every column whose name appears, in any case, in a group's SQL or `columns:`. Appearing
/// is enough: reading a column too many costs memory, one too few would be an error.
fn used_columns(params: &FeatureParams, name: &str, columns: &[String]) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for group in params.groups.iter().filter(|g| g.from == name) {
        texts.extend(entries(&group.features).map(|(_, f)| f.sql().to_lowercase()));
        texts.extend(group.filter.iter().map(|f| f.to_lowercase()));
        texts.extend(group.columns.iter().map(|c| c.to_lowercase()));
    }
    columns
        .iter()
        .filter(|c| {
            **c == params.entity || {
                let lower = c.to_lowercase();
                texts.iter().any(|t| t.contains(&lower))
            }
        })
        .cloned()
        .collect()
}

/// The built-in `feature` stage.
pub struct FeatureStage;

/// The features table (a file, or a folder of them).
const FEATURES: Port = Port::required("features", 0);

impl BuiltinStage for FeatureStage {
    const NAME: &'static str = "feature";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "declarative features per entity in named groups of polars SQL expressions";
    type Params = FeatureParams;

    const INPUTS: Inputs = Inputs::Map {
        why: "needs its input tables as a map of names (`inputs: {orders: …}`), which its groups name in `from:`",
    };
    const OUTPUTS: &'static [Port] = &[FEATURES];

    fn check_params(params: &FeatureParams) -> Vec<ParamsError> {
        param_errors(params)
    }

    fn output_columns(
        params: &FeatureParams,
        _inputs: &[Option<Vec<String>>],
    ) -> Vec<crate::OutputColumns> {
        let columns = feature_names(params);
        [None, Some("features.parquet"), Some("features.csv")]
            .into_iter()
            .map(|file| crate::OutputColumns {
                output: FEATURES,
                file: file.map(str::to_owned),
                columns: columns.clone(),
            })
            .collect()
    }

    fn run(params: &FeatureParams, io: &StageIo) -> Result<StageReport, StageError> {
        let inputs: Vec<(String, &std::path::Path)> = io
            .inputs
            .iter()
            .map(|(name, path)| (name.clone().unwrap_or_default(), path.as_path()))
            .collect();
        let target = io.output(FEATURES)?;
        let files: Vec<std::path::PathBuf> = if target.is_dir() {
            params
                .formats
                .iter()
                .map(|format| {
                    target.join(match format {
                        Format::Parquet => "features.parquet",
                        Format::Csv => "features.csv",
                    })
                })
                .collect()
        } else {
            vec![target.to_path_buf()]
        };
        let rows = write_features(
            params,
            &inputs,
            &files,
            crate::io::partition::PASS_ROWS,
            &io.cancel,
        )?;
        let described: serde_json::Map<String, serde_json::Value> = descriptions(params)
            .into_iter()
            .map(|(name, desc)| (name, json!(desc)))
            .collect();
        Ok(StageReport {
            summary: json!({
                "rows": rows,
                "features": feature_names(params).len() - 1,
                "descriptions": described,
            }),
            ..Default::default()
        })
    }
}

/// Computes the features of `inputs` and writes them to `files`, a range of entities at a time
/// when the largest input has more than `pass_rows` rows (see [`ranges`]); the files are the same
/// either way. Returns the number of rows.
fn write_features(
    params: &FeatureParams,
    inputs: &[(String, &std::path::Path)],
    files: &[std::path::PathBuf],
    pass_rows: usize,
    cancel: &crate::Cancel,
) -> Result<usize, StageError> {
    let (ranges, planned) = ranges(params, inputs, pass_rows)?;
    if ranges.is_whole() {
        let mut out = compute(params, &read_whole(params, inputs)?)?;
        for file in files {
            write_table(&mut out, file)?;
        }
        return Ok(out.height());
    }
    let mut wanted = Vec::new();
    let mut sorted = BTreeMap::new();
    for (name, path) in inputs {
        wanted.push(used_columns(
            params,
            name,
            &crate::io::table::columns_of(path)?,
        ));
        let in_order = if Some(*path) == planned {
            ranges.sorted()
        } else {
            crate::io::partition::key_sorted(path, &params.entity)?
        };
        sorted.insert(name.clone(), in_order);
    }
    let mut writers: Vec<TableWriter> = Vec::new();
    let mut rows = 0;
    for range in 0..ranges.count() {
        if cancel.is_cancelled() {
            return Err(StageError::new(crate::CANCELLED));
        }
        let mut tables = BTreeMap::new();
        for ((name, path), wanted) in inputs.iter().zip(&wanted) {
            let part = crate::io::partition::read_range(path, wanted, ranges.predicate(range))?;
            tables.insert(name.clone(), part);
        }
        let out = match compute_in_order(params, &tables, &sorted) {
            Ok(out) => out,
            // The whole table's error, word for word: a repeated entity's count and example
            // are those of the whole table, not of one range.
            Err(error) => {
                drop(tables);
                return Err(compute(params, &read_whole(params, inputs)?)
                    .err()
                    .unwrap_or(error));
            }
        };
        if writers.is_empty() {
            for file in files {
                writers.push(TableWriter::create(file, out.schema())?);
            }
        }
        for writer in &mut writers {
            writer.write(&out)?;
        }
        rows += out.height();
    }
    for writer in writers {
        writer.finish()?;
    }
    Ok(rows)
}

/// The input tables, whole (a Parquet table just the columns the groups can use: a wide table
/// costs what it is used for).
fn read_whole(
    params: &FeatureParams,
    inputs: &[(String, &std::path::Path)],
) -> Result<BTreeMap<String, DataFrame>, StageError> {
    let mut tables = BTreeMap::new();
    for (name, path) in inputs {
        let df = if is_csv(path) {
            read_table_inferred(path)?
        } else {
            let wanted = used_columns(params, name, &crate::io::table::columns_of(path)?);
            read_parquet(path, Some(&wanted))?
        };
        tables.insert(name.clone(), df);
    }
    Ok(tables)
}

/// The ranges of the entity the features are computed in, one at a time: those of the largest
/// input, when every input is Parquet and every expression is about one entity's rows (no
/// subquery, no window over other entities), with that input. Otherwise, one: the whole table.
fn ranges<'a>(
    params: &FeatureParams,
    inputs: &[(String, &'a std::path::Path)],
    pass_rows: usize,
) -> Result<(crate::io::partition::KeyRanges, Option<&'a std::path::Path>), StageError> {
    let whole = crate::io::partition::KeyRanges::whole(&params.entity);
    if inputs.iter().any(|(_, path)| is_csv(path)) || !per_entity(params) {
        return Ok((whole, None));
    }
    let mut largest: Option<(usize, &std::path::Path)> = None;
    for (_, path) in inputs {
        let rows = crate::io::partition::parquet_rows(path)?;
        if largest.is_none_or(|(most, _)| rows > most) {
            largest = Some((rows, path));
        }
    }
    match largest {
        Some((_, path)) => Ok((
            crate::io::partition::KeyRanges::plan(path, &params.entity, pass_rows)?,
            Some(path),
        )),
        None => Ok((whole, None)),
    }
}

/// Whether every feature, condition and derived feature looks only at one entity's rows: no
/// `SELECT` (a subquery) and no `OVER` (a window) among its words.
fn per_entity(params: &FeatureParams) -> bool {
    let mut texts: Vec<&str> = Vec::new();
    for group in &params.groups {
        texts.extend(entries(&group.features).map(|(_, f)| f.sql()));
        texts.extend(group.filter.as_deref());
    }
    texts.extend(entries(&params.derive).map(|(_, f)| f.sql()));
    !texts.iter().any(|text| {
        text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .any(|word| word.eq_ignore_ascii_case("select") || word.eq_ignore_ascii_case("over"))
    })
}

/// The output's columns: the entity, then every feature in the order written.
pub fn feature_names(params: &FeatureParams) -> Vec<String> {
    let mut names = vec![params.entity.clone()];
    for group in &params.groups {
        names.extend(entries(&group.features).map(|(n, _)| n.clone()));
        names.extend(group.columns.iter().cloned());
    }
    names.extend(entries(&params.derive).map(|(n, _)| n.clone()));
    names
}

/// Each feature's description, where it has one (a `columns:` feature has its group's).
pub fn descriptions(params: &FeatureParams) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in &params.groups {
        for (name, feature) in entries(&group.features) {
            if let Some(desc) = feature.desc() {
                out.push((name.clone(), desc.to_owned()));
            }
        }
        if let Some(desc) = &group.desc {
            out.extend(group.columns.iter().map(|c| (c.clone(), desc.clone())));
        }
    }
    for (name, feature) in entries(&params.derive) {
        if let Some(desc) = feature.desc() {
            out.push((name.clone(), desc.to_owned()));
        }
    }
    out
}

/// What the params type cannot say: names given twice, empty groups, SQL that does not parse.
fn param_errors(params: &FeatureParams) -> Vec<ParamsError> {
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut name = |feature: &str, at: String, errors: &mut Vec<ParamsError>| {
        if feature == params.entity {
            errors.push(ParamsError {
                pointer: at,
                message: format!("`{feature}` is the entity column, not a feature"),
            });
        } else if let Some(first) = seen.insert(feature.to_owned(), at.clone()) {
            errors.push(ParamsError {
                pointer: at,
                message: format!(
                    "feature `{feature}` is defined twice (first at `{}`)",
                    crate::pointer::dotted(&first)
                ),
            });
        }
    };
    if params.formats.is_empty() {
        errors.push(ParamsError {
            pointer: "/formats".to_owned(),
            message: "at least one format is needed: `parquet`, `csv` or both".to_owned(),
        });
    }
    if params.groups.is_empty() {
        errors.push(ParamsError {
            pointer: "/groups".to_owned(),
            message: "at least one group of features is needed".to_owned(),
        });
    }
    for (index, group) in params.groups.iter().enumerate() {
        let group_name = &group.name;
        let index = index.to_string();
        let group_at = ["groups", index.as_str()];
        for (i, entry) in group.features.iter().enumerate() {
            if entry.len() != 1 {
                errors.push(ParamsError {
                    pointer: pointer(&["groups", &index, "features", &i.to_string()]),
                    message: "each item of `features:` is one `name: SQL` entry".to_owned(),
                });
            }
        }
        if group.features.is_empty() == group.columns.is_empty() {
            errors.push(ParamsError {
                pointer: pointer(&group_at),
                message: format!(
                    "group `{group_name}` needs either `features:` (aggregated per entity) or `columns:` (one row per entity), not {}",
                    if group.features.is_empty() { "neither" } else { "both" }
                ),
            });
        }
        if let Some(filter) = &group.filter {
            if let Err(e) = polars::sql::sql_expr(filter) {
                errors.push(ParamsError {
                    pointer: pointer(&["groups", &index, "where"]),
                    message: format!("the condition does not parse: {e}"),
                });
            }
        }
        let features_at = ["groups", index.as_str(), "features"];
        for (at, feature, definition) in located(&group.features, &features_at) {
            name(feature, at.clone(), &mut errors);
            if let Err(e) = polars::sql::sql_expr(definition.sql()) {
                errors.push(ParamsError {
                    pointer: at,
                    message: format!("feature `{feature}` does not parse: {e}"),
                });
            }
        }
        for (i, column) in group.columns.iter().enumerate() {
            name(
                column,
                pointer(&["groups", &index, "columns", &i.to_string()]),
                &mut errors,
            );
        }
    }
    for (i, entry) in params.derive.iter().enumerate() {
        if entry.len() != 1 {
            errors.push(ParamsError {
                pointer: pointer(&["derive", &i.to_string()]),
                message: "each item of `derive:` is one `name: SQL` entry".to_owned(),
            });
        }
    }
    for (at, feature, definition) in located(&params.derive, &["derive"]) {
        name(feature, at.clone(), &mut errors);
        if let Err(e) = polars::sql::sql_expr(definition.sql()) {
            errors.push(ParamsError {
                pointer: at,
                message: format!("feature `{feature}` does not parse: {e}"),
            });
        }
    }
    errors
}

/// Quotes a name for polars SQL.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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
/// the whole table would be.
fn compute_in_order(
    params: &FeatureParams,
    tables: &BTreeMap<String, DataFrame>,
    sorted: &BTreeMap<String, bool>,
) -> Result<DataFrame, StageError> {
    let entity = &params.entity;
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
            // Each feature alone on an empty table first, so that an error names its feature.
            let empty = table.clear();
            let features_at = ["groups", index.as_str(), "features"];
            for (at, feature, definition) in located(&group.features, &features_at) {
                let mut probe = polars::sql::SQLContext::new();
                probe.register("t", empty.clone().lazy());
                let query = format!(
                    "SELECT {e}, {sql} AS {f} FROM t{filter} GROUP BY {e}",
                    e = quoted(entity),
                    sql = definition.sql(),
                    f = quoted(feature)
                );
                probe
                    .execute(&query)
                    .and_then(|lf| lf.collect())
                    .map_err(|e| {
                        StageError::new(format!("feature `{feature}` of group `{group_name}`: {e}"))
                            .at_param(at.clone())
                    })?;
            }
            let selected: Vec<String> = entries(&group.features)
                .map(|(feature, definition)| format!("{} AS {}", definition.sql(), quoted(feature)))
                .collect();
            let query = format!(
                "SELECT {e}, {} FROM t{filter} GROUP BY {e}",
                selected.join(", "),
                e = quoted(entity)
            );
            context
                .execute(&query)
                .and_then(|lf| lf.collect())
                .map_err(|e| {
                    StageError::new(format!("group `{group_name}`: {e}")).at_param(group_at(&[]))
                })?
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
                let repeated = match repeats.len() {
                    1 => "1 row repeats".to_owned(),
                    n => format!("{n} rows repeat"),
                };
                return Err(StageError::new(format!(
                    "group `{group_name}` takes columns from `{}` as one row per `{entity}`, but {repeated} an entity (e.g. {entity} = {key}); aggregate them with `features:` instead",
                    group.from
                ))
                .at_param(group_at(&["columns"])));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(csv: &str) -> DataFrame {
        CsvReadOptions::default()
            .with_has_header(true)
            .into_reader_with_file_handle(std::io::Cursor::new(csv.as_bytes().to_vec()))
            .finish()
            .unwrap()
    }

    fn params(value: serde_json::Value) -> FeatureParams {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_the_columns_a_group_names_are_read() {
        let params = params(json!({
            "entity": "user_id",
            "groups": [
                {"name": "recent", "from": "orders", "where": "MONTH >= '2017-05'",
                 "features": [{"n": "count(*)"}, {"gap": "avg(days)"}]},
                {"name": "imputed", "from": "imputed", "columns": ["days_imp"]}
            ]
        }));
        let columns: Vec<String> = ["user_id", "order_id", "days", "dow", "month"]
            .map(String::from)
            .to_vec();
        // `month` only in the condition, and in another case: still read.
        assert_eq!(
            used_columns(&params, "orders", &columns),
            ["user_id", "days", "month"]
        );
        let imputed = ["user_id", "days_imp", "other"].map(String::from).to_vec();
        assert_eq!(
            used_columns(&params, "imputed", &imputed),
            ["user_id", "days_imp"]
        );
    }

    /// Three users: 2 has three orders (one on a Sunday, one in the old month), 1 has two, 3
    /// has one order and no imputed row; one order has no user, and counts for no one.
    fn tables() -> BTreeMap<String, DataFrame> {
        let orders = frame(
            "user_id,order_id,days,dow,month\n2,10,4.0,0,2017-05\n1,11,,3,2017-05\n2,12,8.0,2,2017-05\n1,13,6.0,6,2017-04\n2,14,,1,2017-03\n3,15,30.0,5,2017-05\n,16,2.0,3,2017-05\n",
        );
        let imputed = frame("user_id,days_imp\n1,12.5\n2,7.0\n");
        BTreeMap::from([
            ("orders".to_owned(), orders),
            ("imputed".to_owned(), imputed),
        ])
    }

    fn definitions() -> serde_json::Value {
        json!({
            "entity": "user_id",
            "groups": [
                {"name": "orders", "from": "orders", "features": [
                    {"order_count": {"sql": "count(*)", "desc": "orders placed"}},
                    {"days_mean": "avg(days)"},
                    {"weekend_share": "avg(CASE WHEN dow IN (0, 6) THEN 1.0 ELSE 0.0 END)"}
                ]},
                {"name": "recent", "from": "orders", "where": "month >= '2017-05'", "features": [
                    {"recent_orders": "count(*)"}
                ]},
                {"name": "imputed", "from": "imputed", "desc": "MICE", "columns": ["days_imp"]}
            ],
            "derive": [
                {"orders_per_gap": "order_count / days_imp"},
                {"busy": "orders_per_gap > 0.2"}
            ]
        })
    }

    fn column(df: &DataFrame, name: &str) -> Vec<Option<f64>> {
        df.column(name)
            .unwrap()
            .cast(&DataType::Float64)
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect()
    }

    /// Every feature against values worked out by hand from the rows above.
    #[test]
    fn features_match_values_worked_out_by_hand() {
        let out = compute(&params(definitions()), &tables()).unwrap();
        let names: Vec<String> = out
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "user_id",
                "order_count",
                "days_mean",
                "weekend_share",
                "recent_orders",
                "days_imp",
                "orders_per_gap",
                "busy"
            ]
        );
        assert_eq!(column(&out, "user_id"), [Some(1.0), Some(2.0), Some(3.0)]);
        assert_eq!(
            column(&out, "order_count"),
            [Some(2.0), Some(3.0), Some(1.0)]
        );
        // User 1: days (null, 6) → 6; user 2: (4, 8, null) → 6; user 3: 30. Nulls are skipped.
        assert_eq!(
            column(&out, "days_mean"),
            [Some(6.0), Some(6.0), Some(30.0)]
        );
        // User 1: dow 3, 6 → 1/2; user 2: 0, 2, 1 → 1/3; user 3: 5 → 0.
        let weekend = column(&out, "weekend_share");
        assert_eq!(weekend[0], Some(0.5));
        assert!((weekend[1].unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(weekend[2], Some(0.0));
        // Orders in 2017-05: user 1 one, user 2 two, user 3 one.
        assert_eq!(
            column(&out, "recent_orders"),
            [Some(1.0), Some(2.0), Some(1.0)]
        );
        // User 3 has no imputed row: null, and so are its derived features.
        assert_eq!(column(&out, "days_imp"), [Some(12.5), Some(7.0), None]);
        let ratio = column(&out, "orders_per_gap");
        assert!((ratio[0].unwrap() - 2.0 / 12.5).abs() < 1e-12);
        assert!((ratio[1].unwrap() - 3.0 / 7.0).abs() < 1e-12);
        assert_eq!(ratio[2], None);
        let busy: Vec<Option<bool>> = out.column("busy").unwrap().bool().unwrap().iter().collect();
        assert_eq!(busy, [Some(false), Some(true), None]);
    }

    #[test]
    fn a_table_that_repeats_an_entity_is_not_joined_as_one_row_each() {
        let mut tables = tables();
        tables.insert(
            "imputed".into(),
            frame("user_id,days_imp\n1,12.5\n2,7.0\n2,8.0\n"),
        );
        let error = compute(&params(definitions()), &tables).unwrap_err();
        assert_eq!(
            error.message,
            "group `imputed` takes columns from `imputed` as one row per `user_id`, but 1 row repeats an entity (e.g. user_id = 2); aggregate them with `features:` instead"
        );
        assert_eq!(error.param.as_deref(), Some("/groups/2/columns"));
    }

    #[test]
    fn a_feature_naming_a_missing_column_names_the_feature() {
        let mut definitions = definitions();
        definitions["groups"][0]["features"][1] = json!({"days_mean": "avg(dayz)"});
        let error = compute(&params(definitions), &tables()).unwrap_err();
        assert!(
            error
                .message
                .starts_with("feature `days_mean` of group `orders`: ")
                && error.message.contains("dayz"),
            "{}",
            error.message
        );
        assert_eq!(
            error.param.as_deref(),
            Some("/groups/0/features/1/days_mean")
        );
    }

    #[test]
    fn params_that_cannot_work_are_found_before_running() {
        let errors = param_errors(&params(json!({
            "entity": "user_id",
            "groups": [
                {"name": "a", "from": "orders", "features": [{"n": "count(*)"}, {"n": "count(days"}]},
                {"name": "b", "from": "orders"},
                {"name": "c", "from": "orders", "columns": ["user_id"], "where": "month >>= 3"}
            ],
            "derive": [{"x": "n * 2", "y": "n"}]
        })));
        let found: Vec<(String, String)> = errors
            .into_iter()
            .map(|e| {
                (
                    e.pointer,
                    e.message.split(':').next().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (
                    "/groups/0/features/1/n".to_owned(),
                    "feature `n` is defined twice (first at `groups[0].features[0].n`)".to_owned()
                ),
                (
                    "/groups/0/features/1/n".to_owned(),
                    "feature `n` does not parse".to_owned()
                ),
                (
                    "/groups/1".to_owned(),
                    "group `b` needs either `features".to_owned()
                ),
                (
                    "/groups/2/where".to_owned(),
                    "the condition does not parse".to_owned()
                ),
                (
                    "/groups/2/columns/0".to_owned(),
                    "`user_id` is the entity column, not a feature".to_owned()
                ),
                ("/derive/0".to_owned(), "each item of `derive".to_owned()),
            ]
        );
    }
}

#[cfg(test)]
mod ranges_tests {
    use super::*;

    /// Orders of 700 users in no particular order (a fixed permutation), with float gaps whose
    /// sums depend on the order they are added in, and an imputed table of most users.
    /// The orders' order: as generated, sorted by user, or sorted but for one order, so that
    /// each range but one is in order and the whole table is not.
    #[derive(Clone, Copy, PartialEq)]
    enum Order {
        Random,
        Sorted,
        AllButOne,
    }

    fn inputs(
        dir: &std::path::Path,
        repeat_user: bool,
        order: Order,
    ) -> Vec<(String, std::path::PathBuf)> {
        let n = 20_000u64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut users = Vec::new();
        let mut days = Vec::new();
        let mut dows = Vec::new();
        for _ in 0..n {
            let r = next();
            users.push((r % 700) as i64);
            days.push(((r >> 20) % 3001) as f64 / 97.0);
            dows.push(((r >> 40) % 7) as i64);
        }
        let mut orders = df!("user_id" => users, "days" => days, "dow" => dows).unwrap();
        if order != Order::Random {
            orders = orders
                .sort(
                    ["user_id"],
                    SortMultipleOptions::default().with_maintain_order(true),
                )
                .unwrap();
        }
        if order == Order::AllButOne {
            // The first order (user 0) moves to the end.
            let first = orders.slice(0, 1);
            orders = orders.slice(1, usize::MAX);
            orders.vstack_mut(&first).unwrap();
            orders.rechunk_mut();
        }
        let mut ids: Vec<i64> = (0..700).filter(|u| u % 9 != 4).collect();
        if repeat_user {
            ids.push(77);
        }
        let imputed: Vec<f64> = ids.iter().map(|u| *u as f64 / 7.0).collect();
        let mut imputed = df!("user_id" => ids, "days_imp" => imputed).unwrap();
        let paths = [
            ("orders", dir.join("orders.parquet")),
            ("imputed", dir.join("imputed.parquet")),
        ];
        write_table(&mut orders, &paths[0].1).unwrap();
        write_table(&mut imputed, &paths[1].1).unwrap();
        paths.map(|(n, p)| (n.to_owned(), p)).to_vec()
    }

    fn definitions() -> FeatureParams {
        serde_json::from_value(json!({
            "entity": "user_id",
            "groups": [
                {"name": "orders", "from": "orders", "features": [
                    {"n": "count(*)"},
                    {"days_mean": "avg(days)"},
                    {"days_std": "stddev(days)"},
                    {"days_sum": "sum(days)"},
                    {"weekend_share": "avg(CASE WHEN dow IN (0, 6) THEN 1.0 ELSE 0.0 END)"}
                ]},
                {"name": "imputed", "from": "imputed", "columns": ["days_imp"]}
            ],
            "derive": [{"ratio": "days_imp / days_mean"}],
            "formats": ["parquet", "csv"]
        }))
        .unwrap()
    }

    fn write(
        inputs: &[(String, std::path::PathBuf)],
        dir: &std::path::Path,
        pass_rows: usize,
    ) -> Result<(Vec<u8>, Vec<u8>, usize), StageError> {
        let inputs: Vec<(String, &std::path::Path)> = inputs
            .iter()
            .map(|(n, p)| (n.clone(), p.as_path()))
            .collect();
        let files = [dir.join("f.parquet"), dir.join("f.csv")];
        let rows = write_features(
            &definitions(),
            &inputs,
            &files,
            pass_rows,
            &Default::default(),
        )?;
        Ok((
            std::fs::read(&files[0]).unwrap(),
            std::fs::read(&files[1]).unwrap(),
            rows,
        ))
    }

    /// In ranges of ~2,000, ~500 or ~37 rows, the files are the whole table's, byte for byte:
    /// the float sums and standard deviations included, whether the orders are in user order
    /// (grouped by slices), in none (hashed) or in order but for one row.
    #[test]
    fn features_in_ranges_are_the_whole_tables_bytes() {
        for order in [Order::Random, Order::Sorted, Order::AllButOne] {
            let dir = tempfile::tempdir().unwrap();
            let inputs = inputs(dir.path(), false, order);
            let whole = write(&inputs, dir.path(), usize::MAX).unwrap();
            assert_eq!(whole.2, 700);
            for pass_rows in [2_000, 500, 37] {
                let ranges = {
                    let inputs: Vec<(String, &std::path::Path)> = inputs
                        .iter()
                        .map(|(n, p)| (n.clone(), p.as_path()))
                        .collect();
                    ranges(&definitions(), &inputs, pass_rows).unwrap().0
                };
                assert!(ranges.count() > 5, "{pass_rows}: {} ranges", ranges.count());
                let parts = write(&inputs, dir.path(), pass_rows).unwrap();
                assert_eq!(parts.2, whole.2);
                assert!(parts.0 == whole.0, "{pass_rows}: the Parquet files differ");
                assert!(parts.1 == whole.1, "{pass_rows}: the CSV files differ");
            }
        }
    }

    /// Grouping an ordered table by slices sums in another order than hashing does: the same
    /// features, to a few ulps.
    #[test]
    fn ordered_and_unordered_tables_give_the_same_features() {
        let dir = tempfile::tempdir().unwrap();
        let read = |order| {
            let inputs = inputs(dir.path(), false, order);
            write(&inputs, dir.path(), usize::MAX).unwrap();
            crate::io::table::read_parquet(&dir.path().join("f.parquet"), None).unwrap()
        };
        let (random, sorted) = (read(Order::Random), read(Order::Sorted));
        let mut differ = 0;
        for name in [
            "n",
            "days_mean",
            "days_std",
            "days_sum",
            "weekend_share",
            "ratio",
        ] {
            let a = random
                .column(name)
                .unwrap()
                .cast(&DataType::Float64)
                .unwrap();
            let b = sorted
                .column(name)
                .unwrap()
                .cast(&DataType::Float64)
                .unwrap();
            for (a, b) in a.f64().unwrap().iter().zip(b.f64().unwrap().iter()) {
                assert_eq!(a.is_some(), b.is_some(), "{name}");
                let (Some(a), Some(b)) = (a, b) else { continue };
                differ += usize::from(a.to_bits() != b.to_bits());
                assert!(
                    (a - b).abs() <= 1e-12 * a.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
        // Which is why a range is grouped as its whole table is (the test above).
        assert!(differ > 0, "the two groupings agree to the bit here");
    }

    /// An error found in one range is reported as the whole table's.
    #[test]
    fn an_error_in_a_range_is_the_whole_tables() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = inputs(dir.path(), true, Order::Random);
        let whole = write(&inputs, dir.path(), usize::MAX).unwrap_err();
        let parts = write(&inputs, dir.path(), 500).unwrap_err();
        assert_eq!(parts.message, whole.message);
        assert_eq!(
            whole.message,
            "group `imputed` takes columns from `imputed` as one row per `user_id`, but 1 row repeats an entity (e.g. user_id = 77); aggregate them with `features:` instead"
        );
    }

    #[test]
    fn windows_and_subqueries_keep_the_whole_table() {
        let mut params = definitions();
        assert!(per_entity(&params));
        params.derive = serde_json::from_value(json!([{"r": "rank() OVER (ORDER BY n)"}])).unwrap();
        assert!(!per_entity(&params));
        params.derive =
            serde_json::from_value(json!([{"r": "n / (SELECT max(n) FROM t)"}])).unwrap();
        assert!(!per_entity(&params));
    }
}
