//! The params of `feature`: groups, features, formats, and their checks at validate time.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

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

pub(super) fn parquet_only() -> Vec<Format> {
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
pub(super) fn entries(features: &Features) -> impl Iterator<Item = (&String, &Feature)> {
    features.iter().flat_map(|entry| entry.iter())
}

/// The entries of a feature list with the JSON pointer of each, under `at`.
pub(super) fn located<'a>(
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
pub(super) fn used_columns(params: &FeatureParams, name: &str, columns: &[String]) -> Vec<String> {
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
pub(super) fn param_errors(params: &FeatureParams) -> Vec<ParamsError> {
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
