//! The params of `clean`, as a pipeline writes them.

use std::collections::BTreeMap;

use polars::prelude::DataType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Params of `clean`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanParams {
    /// Column → type. An empty or unparseable value becomes null (see `on_cast_error`).
    #[serde(default)]
    pub cast: BTreeMap<String, CastType>,
    /// What to do with a value that cannot be cast: keep the row with a null (`null`, the
    /// default, as the seed keeps NaN days), `drop` the row, or `fail` the stage.
    #[serde(default)]
    pub on_cast_error: OnCastError,
    /// Column → allowed values (`in: [...]`, case-sensitive) or inclusive range
    /// (`between: [lo, hi]`). A null fails the filter.
    #[serde(default)]
    pub domain: BTreeMap<String, Domain>,
    /// Tukey's fences: keep a row whose value lies in [q1 − k·IQR, q3 + k·IQR], or is null.
    #[serde(default)]
    pub iqr: Option<Iqr>,
    /// Drop rows with missing values in `subset` (default: all columns).
    #[serde(default)]
    pub dropna: Option<DropNa>,
    /// Drop exact duplicate rows (nulls equal to nulls), keeping the first: `true`, or
    /// `{subset: [...]}` to compare only those columns.
    #[serde(default)]
    pub dedup: Option<Dedup>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CastType {
    #[serde(alias = "int")]
    Int64,
    #[serde(alias = "float")]
    Float64,
    #[serde(alias = "str")]
    String,
    Bool,
    /// `YYYY-MM-DD`.
    Date,
}

impl CastType {
    /// The polars type of an int64 or float64 cast (`None` for the others).
    pub(super) fn number_dtype(self) -> Option<DataType> {
        match self {
            CastType::Int64 => Some(DataType::Int64),
            CastType::Float64 => Some(DataType::Float64),
            CastType::String | CastType::Bool | CastType::Date => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnCastError {
    #[default]
    Null,
    Drop,
    Fail,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Domain {
    In {
        /// The allowed values.
        #[serde(rename = "in")]
        values: Vec<Scalar>,
    },
    Between {
        /// `[lo, hi]`, inclusive.
        between: [f64; 2],
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
}

impl Scalar {
    /// The value as a `domain: in` on a string column compares it: `7`, `1.5`, `true`.
    pub(super) fn text(&self) -> String {
        match self {
            Scalar::String(s) => s.clone(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }

    /// The value as a `domain: in` on a numeric column compares it (`None`: never equal).
    pub(super) fn number(&self) -> Option<f64> {
        match self {
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Float(f) => Some(*f),
            Scalar::String(s) => s.parse().ok(),
            Scalar::Bool(_) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Iqr {
    /// The columns to filter; their bounds are all computed on the table after the domain filter.
    pub columns: Vec<String>,
    /// The fence multiplier.
    #[serde(default = "default_k")]
    #[schemars(range(min = 0.0))]
    pub k: f64,
}

fn default_k() -> f64 {
    1.5
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DropNa {
    #[serde(default)]
    pub subset: Option<Vec<String>>,
    /// `any`: drop a row with any missing value in `subset`; `all`: only when all are missing.
    #[serde(default)]
    pub how: How,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum How {
    #[default]
    Any,
    All,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Dedup {
    All(bool),
    Subset { subset: Vec<String> },
}
