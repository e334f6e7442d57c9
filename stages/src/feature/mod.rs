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
use serde_json::json;

use crate::io::table::{is_csv, read_parquet, read_table_inferred, write_table, TableWriter};
use crate::pointer::of as pointer;
use crate::ports::{Inputs, Port};
use crate::{BuiltinStage, ParamsError, StageError, StageIo, StageReport};

mod compute;
mod params;
pub(crate) mod spark;

pub use compute::compute;
use compute::*;
pub use params::*;

/// The built-in `feature` stage.
pub struct FeatureStage;

/// The features table (a file, or a folder of them).
const FEATURES: Port = Port::required("features", 0);

impl BuiltinStage for FeatureStage {
    const NAME: &'static str = "feature";
    const VERSION: u32 = 3;
    const SUMMARY: &'static str =
        "declarative features per entity in named groups of polars SQL expressions";
    type Params = FeatureParams;

    const INPUTS: Inputs = Inputs::Map {
        why: "needs its input tables as a map of names (`inputs: {orders: …}`), which its groups name in `from:`",
    };
    const OUTPUTS: &'static [Port] = &[FEATURES];

    /// Ranges of entities at a time over the ordered table, written as they come.
    fn memory(_: &FeatureParams, inputs: &[std::path::PathBuf]) -> Option<u64> {
        Some(crate::memory::linear(
            150.0,
            0.8,
            crate::memory::total(inputs),
        ))
    }

    fn check_params(params: &FeatureParams) -> Vec<ParamsError> {
        param_errors(params)
    }

    /// Each group's table has the entity, and a `columns:` group its columns (what its SQL reads
    /// is polars' to say).
    fn input_columns(params: &FeatureParams) -> Vec<crate::InputColumn> {
        let mut wanted = Vec::new();
        for (g, group) in params.groups.iter().enumerate() {
            let of = |column: &str, pointer: String| crate::InputColumn {
                input: Some(group.from.clone()),
                column: column.to_owned(),
                pointer,
            };
            wanted.push(of(&params.entity, "/entity".to_owned()));
            wanted.extend(group.columns.iter().enumerate().map(|(i, c)| {
                of(
                    c,
                    crate::pointer::of(&["groups", &g.to_string(), "columns", &i.to_string()]),
                )
            }));
        }
        wanted
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
        Ok(StageReport {
            summary: summary(params, rows),
            ..Default::default()
        })
    }
}

/// The stage's summary: its rows, how many features, and the descriptions written.
fn summary(params: &FeatureParams, rows: usize) -> serde_json::Value {
    let described: serde_json::Map<String, serde_json::Value> = descriptions(params)
        .into_iter()
        .map(|(name, desc)| (name, json!(desc)))
        .collect();
    json!({
        "rows": rows,
        "features": feature_names(params).len() - 1,
        "descriptions": described,
    })
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
    let mut steps = crate::steps::Steps::start("feature");
    let (ranges, planned) = ranges(params, inputs, pass_rows)?;
    steps.done("plan");
    if ranges.is_whole() {
        let tables = read_whole(params, inputs)?;
        steps.done("read");
        let mut out = compute(params, &tables)?;
        steps.done("compute");
        for file in files {
            write_table(&mut out, file)?;
        }
        steps.done("write");
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
    steps.done("columns and order");
    // Each range's features are written on a thread of their own while the next range is read
    // and computed.
    let mut writers: Vec<TableWriter> = Vec::new();
    let write = |out: DataFrame| -> Result<(), StageError> {
        if writers.is_empty() {
            for file in files {
                writers.push(TableWriter::create(file, out.schema())?);
            }
        }
        for writer in &mut writers {
            writer.write(&out)?;
        }
        Ok(())
    };
    let rows = crate::threads::sink_beside(1, write, |write| {
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
            steps.done(&format!("read of range {}", range + 1));
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
            steps.done(&format!("compute of range {}", range + 1));
            rows += out.height();
            write(out)?;
        }
        Ok(rows)
    })?;
    for writer in writers {
        writer.finish()?;
    }
    steps.done("write");
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
