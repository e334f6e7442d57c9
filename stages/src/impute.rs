//! `impute`: MICE multiple imputation of a table's columns, written as M tables, a long table, a
//! mean table with each imputed column's spread across imputations, a convergence trace and a
//! summary (seed 000, sections 5 and 7).
//!
//! The algorithm is in [`crate::stats::mice`]; this module reads the table, checks the params against
//! it, and writes the outputs.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::io::table::{read_table_inferred, require_columns, write_table};
use crate::pointer::of as pointer;
use crate::ports::{Inputs, Port};
use crate::stats::finite;
use crate::stats::mice::{self, Method};
use crate::{BuiltinStage, StageError, StageIo, StageReport};

/// Params of `impute`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImputeParams {
    /// The model's variables: every one with missing values is imputed, from the others.
    #[schemars(length(min = 1))]
    pub columns: Vec<String>,
    /// A column carried through untouched (e.g. `user_id`), first in every output.
    #[serde(default)]
    pub id: Option<String>,
    /// The number of imputations.
    #[serde(default = "default_m")]
    #[schemars(range(min = 1))]
    pub m: usize,
    /// Iterations of each chain.
    #[serde(default = "default_iterations")]
    #[schemars(range(min = 1))]
    pub iterations: usize,
    /// The random seed: the same seed, data and params give the same outputs, byte for byte.
    #[serde(default)]
    pub seed: u64,
    /// Column → `pmm` (the default), `norm`, or `{censored: {at, direction}}`.
    #[serde(default)]
    pub method: BTreeMap<String, MethodParam>,
    /// PMM's donor pool: each missing value takes the observed value of one of the `donors`
    /// rows whose predicted means are nearest.
    #[serde(default = "default_donors")]
    #[schemars(range(min = 1))]
    pub donors: usize,
    /// Column → the columns its model uses (default: every other column of `columns`).
    #[serde(default)]
    pub predictors: Option<BTreeMap<String, Vec<String>>>,
    /// The stem of the per-imputation tables, `{name}_m{k}.parquet` (default: the input file's
    /// stem, so `user_imp.parquet` gives `user_imp_m0.parquet`, …).
    #[serde(default)]
    pub name: Option<String>,
}

fn default_m() -> usize {
    5
}

fn default_iterations() -> usize {
    10
}

fn default_donors() -> usize {
    5
}

/// How a column's missing values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum MethodParam {
    /// Predictive mean matching (type-1 matching, as R's `mice`): imputed values are observed
    /// values.
    Pmm,
    /// Bayesian linear regression with a posterior draw of its parameters.
    Norm,
    /// Every missing value of the column is censored at `at`: its true value lies beyond it
    /// (`direction: above`, the default, means ≥ `at`). Drawn from the regression's predictive
    /// distribution truncated there.
    Censored {
        at: f64,
        #[serde(default)]
        direction: Direction,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Above,
    Below,
}

impl MethodParam {
    fn method(self) -> Method {
        match self {
            MethodParam::Pmm => Method::Pmm,
            MethodParam::Norm => Method::Norm,
            MethodParam::Censored { at, direction } => Method::Censored {
                at,
                above: direction == Direction::Above,
            },
        }
    }

    fn describe(self) -> Json {
        match self {
            MethodParam::Pmm => json!("pmm"),
            MethodParam::Norm => json!("norm"),
            MethodParam::Censored { at, direction } => {
                json!({"censored": {"at": at, "direction": direction}})
            }
        }
    }
}

/// The built-in `impute` stage.
pub struct Impute;

/// The folder of imputed tables, their long and mean forms, the trace and the summary.
const IMPUTED: Port = Port::required("imputed", 0);

impl BuiltinStage for Impute {
    const NAME: &'static str = "impute";
    // 2: the mean table has a `_std` column for every imputed column, complete or not.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "MICE multiple imputation (pmm, norm, censored), M chains in parallel";
    type Params = ImputeParams;

    const INPUTS: Inputs = Inputs::One;
    const OUTPUTS: &'static [Port] = &[IMPUTED];

    /// Every imputed table in memory at once: about 10 bytes per input byte and imputation.
    fn memory(params: &ImputeParams, inputs: &[std::path::PathBuf]) -> Option<u64> {
        let per_byte = 10.0 * params.m.max(1) as f64;
        Some(crate::memory::linear(
            40.0,
            per_byte,
            crate::memory::total(inputs),
        ))
    }

    fn input_columns(params: &ImputeParams) -> Vec<crate::InputColumn> {
        crate::InputColumn::of_the_input(wanted_columns(params))
    }

    /// Neither the long table's columns nor the mean table's depend on the data.
    fn output_columns(
        params: &ImputeParams,
        _inputs: &[Option<Vec<String>>],
    ) -> Vec<crate::OutputColumns> {
        let mut columns = vec!["impute_id".to_owned()];
        columns.extend(params.id.iter().cloned());
        columns.extend(params.columns.iter().cloned());
        let mut mean: Vec<String> = params.id.iter().cloned().collect();
        for column in &params.columns {
            mean.push(column.clone());
            mean.push(format!("{column}_std"));
        }
        mean.push("was_missing".to_owned());
        vec![
            crate::OutputColumns {
                output: IMPUTED,
                file: Some("imputed_long.parquet".to_owned()),
                columns,
            },
            crate::OutputColumns {
                output: IMPUTED,
                file: Some("imputed_mean.parquet".to_owned()),
                columns: mean,
            },
        ]
    }

    fn check_params(params: &ImputeParams) -> Vec<crate::ParamsError> {
        param_errors(params)
            .into_iter()
            .map(|e| crate::ParamsError {
                pointer: e.param.unwrap_or_default(),
                message: e.message,
            })
            .collect()
    }

    fn run(params: &ImputeParams, io: &StageIo) -> Result<StageReport, StageError> {
        let started = std::time::Instant::now();
        let input = io.input(0)?;
        let dir = io.output(IMPUTED)?;
        let df = read_table_inferred(input)?;
        let plan = Plan::new(&df, params, input)?;
        let result =
            mice::impute_until(&plan.values, &plan.spec, &io.cancel).map_err(|e| match e {
                mice::MiceError::Cancelled => StageError::new(crate::CANCELLED),
                mice::MiceError::AllMissing(j) => StageError::new(format!(
                    "column `{}` of `{}` has no observed value: there is nothing to impute it from",
                    params.columns[j],
                    input.display()
                ))
                .at_param(pointer(&["columns", &j.to_string()])),
            })?;
        let name = match &params.name {
            Some(name) => name.clone(),
            None => input
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "imputed".into()),
        };
        let summary = write_outputs(&df, params, &plan, &result, dir, &name)?;
        let mut report = summary.clone();
        if let Json::Object(map) = &mut report {
            map.insert(
                "duration_s".into(),
                json!((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
            );
        }
        Ok(StageReport {
            summary: report,
            warnings: Vec::new(),
            checks: Vec::new(),
        })
    }
}

/// The data and the model, checked against the table.
struct Plan {
    /// Per column of `params.columns`, its values as f64 (NaN where missing).
    values: Vec<Vec<f64>>,
    spec: mice::Spec,
}

/// The columns the params name in the input, each with its param: those to impute, then the id.
fn wanted_columns(params: &ImputeParams) -> Vec<(&str, String)> {
    let mut wanted: Vec<(&str, String)> = params
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), pointer(&["columns", &i.to_string()])))
        .collect();
    if let Some(id) = &params.id {
        wanted.push((id.as_str(), pointer(&["id"])));
    }
    wanted
}

impl Plan {
    fn new(df: &DataFrame, params: &ImputeParams, source: &Path) -> Result<Plan, StageError> {
        require_columns(df, wanted_columns(params), source)?;
        if let Some(first) = param_errors(params).into_iter().next() {
            return Err(first);
        }
        let index = |column: &str| params.columns.iter().position(|c| c == column).unwrap_or(0);
        let mut methods = vec![Method::Pmm; params.columns.len()];
        for (column, method) in &params.method {
            methods[index(column)] = method.method();
        }
        let mut predictors: Vec<Vec<usize>> = (0..params.columns.len())
            .map(|j| (0..params.columns.len()).filter(|&p| p != j).collect())
            .collect();
        if let Some(matrix) = &params.predictors {
            for (column, list) in matrix {
                predictors[index(column)] = list.iter().map(|p| index(p)).collect();
            }
        }
        let mut values = Vec::with_capacity(params.columns.len());
        for (i, column) in params.columns.iter().enumerate() {
            let series = df
                .column(column)
                .map_err(|e| StageError::new(e.to_string()))?
                .as_materialized_series()
                .clone();
            let numbers = series
                .cast(&DataType::Float64)
                .map_err(|e| StageError::new(e.to_string()))?;
            // A text value that is not a number would silently become a missing value to impute.
            let lost = numbers.null_count() - series.null_count();
            if lost > 0 {
                return Err(StageError::new(format!(
                    "column `{column}` of `{}` has {lost} value(s) that are not numbers (it is {}); cast it with `clean` first",
                    source.display(),
                    series.dtype()
                ))
                .at_param(pointer(&["columns", &i.to_string()])));
            }
            let floats = numbers.f64().map_err(|e| StageError::new(e.to_string()))?;
            values.push(floats.iter().map(|v| v.unwrap_or(f64::NAN)).collect());
        }
        Ok(Plan {
            values,
            spec: mice::Spec {
                m: params.m,
                iterations: params.iterations,
                seed: params.seed,
                donors: params.donors,
                methods,
                predictors,
            },
        })
    }
}

/// What the params type cannot check alone: names in `method`, `predictors` and `id` against
/// `columns`. Every problem, each at its param.
fn param_errors(params: &ImputeParams) -> Vec<StageError> {
    let mut errors = Vec::new();
    let known = |column: &str, at: String, errors: &mut Vec<StageError>| {
        let found = params.columns.iter().any(|c| c == column);
        if !found {
            errors.push(
                StageError::new(format!(
                    "`{column}` (param `{}`) is not one of the model's `columns`: {}",
                    crate::pointer::dotted(&at),
                    params.columns.join(", ")
                ))
                .at_param(at),
            );
        }
        found
    };
    for (i, column) in params.columns.iter().enumerate() {
        if params.columns[..i].contains(column) {
            errors.push(
                StageError::new(format!("`{column}` is listed twice in param `columns`"))
                    .at_param(pointer(&["columns", &i.to_string()])),
            );
        }
        if params.id.as_ref() == Some(column) {
            errors.push(
                StageError::new(format!(
                    "`{column}` is the `id`; it cannot also be one of the model's `columns`"
                ))
                .at_param(pointer(&["id"])),
            );
        }
    }
    for column in params.method.keys() {
        known(column, pointer(&["method", column]), &mut errors);
    }
    if let Some(matrix) = &params.predictors {
        for (column, list) in matrix {
            known(column, pointer(&["predictors", column]), &mut errors);
            for (k, predictor) in list.iter().enumerate() {
                let at = pointer(&["predictors", column, &k.to_string()]);
                if predictor == column {
                    errors.push(
                        StageError::new(format!(
                            "`{column}` cannot predict itself (param `{}`)",
                            crate::pointer::dotted(&at)
                        ))
                        .at_param(at),
                    );
                } else {
                    known(predictor, at, &mut errors);
                }
            }
        }
    }
    errors
}

/// Writes the outputs under `dir` and returns the summary.
fn write_outputs(
    df: &DataFrame,
    params: &ImputeParams,
    plan: &Plan,
    result: &mice::Imputation,
    dir: &Path,
    name: &str,
) -> Result<Json, StageError> {
    let io =
        |e: std::io::Error| StageError::new(format!("cannot write under `{}`: {e}", dir.display()));
    std::fs::create_dir_all(dir.join("summaries")).map_err(io)?;
    let polars = |e: PolarsError| StageError::new(e.to_string());
    let rows = df.height();
    let id: Option<Column> = match &params.id {
        Some(id) => Some(df.column(id).map_err(polars)?.clone()),
        None => None,
    };
    // Column j of imputation k: the chain's completed values, or the column as it was.
    let slot: BTreeMap<usize, usize> = result
        .incomplete
        .iter()
        .enumerate()
        .map(|(slot, &j)| (j, slot))
        .collect();
    let completed = |k: usize, j: usize| -> PolarsResult<Column> {
        let column = &params.columns[j];
        Ok(match slot.get(&j) {
            Some(&s) => Column::new(column.as_str().into(), &result.chains[k].columns[s]),
            None => df.column(column)?.clone(),
        })
    };
    let table = |k: usize| -> PolarsResult<DataFrame> {
        let mut columns: Vec<Column> = id.iter().cloned().collect();
        for j in 0..params.columns.len() {
            columns.push(completed(k, j)?);
        }
        DataFrame::new(rows, columns)
    };

    // The m tables are written on as many threads as there are cores: a table's encoding and
    // Snappy compression run on one thread.
    let written = crate::threads::spread(params.m, |k| {
        let mut frame = table(k).map_err(polars)?;
        write_table(&mut frame, &dir.join(format!("{name}_m{k}.parquet")))?;
        Ok::<_, StageError>(frame)
    });
    let mut long = Vec::with_capacity(params.m);
    for (k, frame) in written.into_iter().enumerate() {
        let mut frame = frame?;
        let impute_id = Column::new("impute_id".into(), vec![k as u32; rows]);
        frame.insert_column(0, impute_id).map_err(polars)?;
        long.push(frame);
    }
    let mut long_frame = match long.split_first() {
        Some((first, rest)) => {
            let mut all = first.clone();
            for frame in rest {
                all.vstack_mut(frame).map_err(polars)?;
            }
            all
        }
        None => DataFrame::empty(),
    };
    long_frame.rechunk_mut_par();
    write_table(&mut long_frame, &dir.join("imputed_long.parquet"))?;
    drop(long_frame);

    // The mean table: per imputed column its mean and spread over the imputations.
    let mut mean_columns: Vec<Column> = id.iter().cloned().collect();
    for (j, column) in params.columns.iter().enumerate() {
        match slot.get(&j) {
            Some(&s) => {
                let (means, stds): (Vec<f64>, Vec<Option<f64>>) = (0..rows)
                    .map(|r| {
                        let values: Vec<f64> =
                            result.chains.iter().map(|c| c.columns[s][r]).collect();
                        let (mean, std) = mice::mean_std(&values);
                        (mean, std.is_finite().then_some(std))
                    })
                    .unzip();
                mean_columns.push(Column::new(column.as_str().into(), means));
                mean_columns.push(Column::new(format!("{column}_std").into(), stds));
            }
            // Nothing was missing: no spread, but the same columns, so that readers of the
            // table need not know whether this month had censored values.
            None => {
                mean_columns.push(df.column(column).map_err(polars)?.clone());
                mean_columns.push(Column::full_null(
                    format!("{column}_std").into(),
                    rows,
                    &DataType::Float64,
                ));
            }
        }
    }
    let mut was_missing = vec![false; rows];
    for &j in &result.incomplete {
        for &r in &result.missing[j] {
            was_missing[r] = true;
        }
    }
    mean_columns.push(Column::new("was_missing".into(), was_missing));
    let mut mean_frame = DataFrame::new(rows, mean_columns).map_err(polars)?;
    write_table(&mut mean_frame, &dir.join("imputed_mean.parquet"))?;

    // The convergence trace.
    let (mut chain, mut iteration, mut column, mut mean, mut std) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (k, c) in result.chains.iter().enumerate() {
        for point in &c.trace {
            chain.push(k as u32);
            iteration.push(point.iteration as u32);
            column.push(params.columns[point.column].clone());
            mean.push(point.mean);
            std.push(point.std);
        }
    }
    let mut trace = DataFrame::new_infer_height(vec![
        Column::new("chain".into(), chain),
        Column::new("iteration".into(), iteration),
        Column::new("column".into(), column),
        Column::new("mean".into(), mean),
        Column::new("std".into(), std),
    ])
    .map_err(polars)?;
    write_table(&mut trace, &dir.join("trace.parquet"))?;

    // The summary.
    let missing: serde_json::Map<String, Json> = params
        .columns
        .iter()
        .enumerate()
        .map(|(j, c)| (c.clone(), json!(result.missing[j].len())))
        .collect();
    let imputed: Vec<&String> = result
        .incomplete
        .iter()
        .map(|&j| &params.columns[j])
        .collect();
    let methods: serde_json::Map<String, Json> = result
        .incomplete
        .iter()
        .map(|&j| {
            let column = &params.columns[j];
            let method = params
                .method
                .get(column)
                .copied()
                .unwrap_or(MethodParam::Pmm);
            (column.clone(), method.describe())
        })
        .collect();
    let predictors: serde_json::Map<String, Json> = result
        .incomplete
        .iter()
        .map(|&j| {
            let names: Vec<&String> = plan.spec.predictors[j]
                .iter()
                .map(|&p| &params.columns[p])
                .collect();
            (params.columns[j].clone(), json!(names))
        })
        .collect();
    let imputations: Vec<Json> = result
        .chains
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut entry = serde_json::Map::new();
            entry.insert("impute_id".into(), json!(k));
            for (s, &j) in result.incomplete.iter().enumerate() {
                let (mean, std) = mice::mean_std(&c.columns[s]);
                let imputed: Vec<f64> =
                    result.missing[j].iter().map(|&r| c.columns[s][r]).collect();
                let (imputed_mean, imputed_std) = mice::mean_std(&imputed);
                entry.insert(
                    params.columns[j].clone(),
                    json!({
                        "mean": finite(mean),
                        "std": finite(std),
                        "imputed_mean": finite(imputed_mean),
                        "imputed_std": finite(imputed_std),
                    }),
                );
            }
            Json::Object(entry)
        })
        .collect();
    let summary = json!({
        "rows": rows,
        "id": params.id,
        "columns": params.columns,
        "missing": missing,
        "imputed_columns": imputed,
        "nothing_to_impute": imputed.is_empty(),
        "m": params.m,
        "iterations": params.iterations,
        "seed": params.seed,
        "donors": params.donors,
        "methods": methods,
        "predictors": predictors,
        "imputations": imputations,
        "files": {
            "tables": (0..params.m).map(|k| format!("{name}_m{k}.parquet")).collect::<Vec<_>>(),
            "long": "imputed_long.parquet",
            "mean": "imputed_mean.parquet",
            "trace": "trace.parquet",
        },
    });
    StageIo::write_json(&dir.join("summaries/impute_summary.json"), &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(csv: &str, params: Json) -> (Result<Json, StageError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("users.csv");
        std::fs::write(&input, csv).unwrap();
        let params: ImputeParams = serde_json::from_value(params).unwrap();
        let io = StageIo {
            inputs: vec![(None, input)],
            outputs: vec![(Some("imputed".into()), dir.path().join("imputed"))],
            ..StageIo::default()
        };
        (Impute::run(&params, &io).map(|r| r.summary), dir)
    }

    const CSV: &str = "id,y,x,s\n1,,1,a\n2,2,2,b\n3,3,3,c\n4,,4,d\n5,5,5,e\n";

    #[test]
    fn params_that_do_not_fit_the_table_name_the_param() {
        let cases = [
            (
                json!({"columns": ["y", "x"], "method": {"z": "norm"}}),
                "/method/z",
                "`z` (param `method.z`) is not one of the model's `columns`: y, x",
            ),
            (
                json!({"columns": ["y", "x"], "predictors": {"y": ["y"]}}),
                "/predictors/y/0",
                "`y` cannot predict itself (param `predictors.y[0]`)",
            ),
            (
                json!({"columns": ["y", "x"], "id": "y"}),
                "/id",
                "`y` is the `id`; it cannot also be one of the model's `columns`",
            ),
            (
                json!({"columns": ["y", "s"]}),
                "/columns/1",
                "column `s` of `",
            ),
            (
                json!({"columns": ["y", "q"]}),
                "/columns/1",
                "column `q` (param `columns[1]`) is not in `",
            ),
        ];
        for (params, pointer, message) in cases {
            let (result, _dir) = run(CSV, params);
            let error = result.unwrap_err();
            assert_eq!(error.param.as_deref(), Some(pointer), "{}", error.message);
            assert!(error.message.contains(message), "{}", error.message);
        }
        let (result, _dir) = run("y,x\n,1\n,2\n", json!({"columns": ["y", "x"]}));
        let error = result.unwrap_err();
        assert!(
            error.message.starts_with("column `y` of `"),
            "{}",
            error.message
        );
        assert!(error
            .message
            .ends_with("has no observed value: there is nothing to impute it from"));
        assert_eq!(error.param.as_deref(), Some("/columns/0"));
    }

    #[test]
    fn nothing_missing_gives_the_input_m_times() {
        let (result, dir) = run(
            "id,y,x\n1,1,2\n2,3,4\n",
            json!({"columns": ["y", "x"], "id": "id", "m": 3}),
        );
        let summary = result.unwrap();
        assert_eq!(summary["nothing_to_impute"], true);
        assert_eq!(summary["imputed_columns"], json!([]));
        let input = read_table_inferred(&dir.path().join("users.csv")).unwrap();
        assert_eq!(input.column("y").unwrap().dtype(), &DataType::Int64);
        for k in 0..3 {
            let table =
                read_table_inferred(&dir.path().join(format!("imputed/users_m{k}.parquet")))
                    .unwrap();
            assert!(table.equals(&input), "{table}");
        }
        let trace = read_table_inferred(&dir.path().join("imputed/trace.parquet")).unwrap();
        assert_eq!(trace.height(), 0);
    }

    #[test]
    fn censored_imputations_lie_beyond_the_bound() {
        let mut csv = String::from("y,x\n");
        for i in 0..200 {
            let x = i as f64 / 10.0;
            let y = 2.0 * x + (i % 7) as f64;
            if y >= 30.0 {
                csv.push_str(&format!(",{x}\n"));
            } else {
                csv.push_str(&format!("{y},{x}\n"));
            }
        }
        let (result, dir) = run(
            &csv,
            json!({"columns": ["y", "x"], "m": 2, "method": {"y": {"censored": {"at": 30}}}}),
        );
        let summary = result.unwrap();
        assert_eq!(
            summary["methods"]["y"],
            json!({"censored": {"at": 30.0, "direction": "above"}})
        );
        let table = read_table_inferred(&dir.path().join("imputed/users_m1.parquet")).unwrap();
        let y: Vec<f64> = table
            .column("y")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .map(|v| v.unwrap())
            .collect();
        let missing = csv.lines().skip(1).filter(|l| l.starts_with(',')).count();
        assert!(missing > 20);
        assert_eq!(y.iter().filter(|v| **v >= 30.0).count(), missing);
    }
}
