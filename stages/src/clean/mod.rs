//! `clean`: type casts, domain filters, IQR outliers, missing and duplicate rows, and a summary.
//!
//! The steps and the summary keys are those of `clean_orders` in the seed (sections 3–4):
//! cast → domain filter → IQR filter → dropna and dedup. Nothing about orders is hard-coded; the
//! monthly pipeline configures them. Input row order is kept.

use std::collections::BTreeMap;

use polars::prelude::*;
use serde_json::Value as Json;

use crate::io::table::{read_table, require_columns, write_table};
use crate::ports::{Inputs, Port};
use crate::stats::quantile_linear;

mod cast;
mod chunked;
mod mark;
mod params;
mod read;
pub(crate) mod spark;
mod summary;

use crate::{BuiltinStage, StageError, StageIo, StageReport};
use cast::*;
use chunked::*;
use mark::*;
pub use params::*;
use read::*;
use summary::*;

/// The built-in `clean` stage.
pub struct Clean;

/// The cleaned table.
const TABLE: Port = Port::required("table", 0);
/// What each step removed, as the seed's summary JSON.
const SUMMARY: Port = Port::optional("summary", 1);

impl BuiltinStage for Clean {
    const NAME: &'static str = "clean";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "casts, domain filters, IQR outliers, missing and duplicate rows, with a summary";
    type Params = CleanParams;
    const INPUTS: Inputs = Inputs::One;
    const OUTPUTS: &'static [Port] = &[TABLE, SUMMARY];

    /// A CSV up to [`CHUNKED_ABOVE`] is read whole (about 3.4 bytes per byte of text); above,
    /// in chunks, with little more per byte. A Parquet input is decompressed whole (about 12
    /// bytes per byte).
    fn memory(_: &CleanParams, inputs: &[std::path::PathBuf]) -> Option<u64> {
        let input = inputs.first()?;
        let size = crate::memory::bytes(input);
        if !crate::io::table::is_csv(input) {
            return Some(crate::memory::linear(30.0, 12.0, size));
        }
        let whole = size.min(CHUNKED_ABOVE);
        let rest = size - whole;
        Some(crate::memory::linear(30.0, 3.4, whole) + crate::memory::linear(0.0, 0.1, rest))
    }

    fn input_columns(params: &CleanParams) -> Vec<crate::InputColumn> {
        crate::InputColumn::of_the_input(mark::wanted_columns(params))
    }

    /// `clean` keeps every column of its input, in order.
    fn output_columns(
        _params: &CleanParams,
        inputs: &[Option<Vec<String>>],
    ) -> Vec<crate::OutputColumns> {
        match inputs.first() {
            Some(Some(columns)) => vec![crate::OutputColumns {
                output: TABLE,
                file: None,
                columns: columns.clone(),
            }],
            _ => Vec::new(),
        }
    }

    fn run(params: &CleanParams, io: &StageIo) -> Result<StageReport, StageError> {
        let input = io.input(0)?;
        let table_path = io.output(TABLE)?;
        let summary = clean_file(params, input, table_path, CHUNKED_ABOVE, &io.cancel)?;
        if let Some(path) = io.output_opt(SUMMARY) {
            StageIo::write_json(path, &summary)?;
        }
        Ok(StageReport {
            summary,
            warnings: Vec::new(),
            checks: Vec::new(),
        })
    }
}

/// A CSV input larger than this many bytes is cleaned a chunk at a time, in two passes (see
/// [`clean_chunked`]); a smaller one (or a Parquet one) is read whole, which takes about 15% less
/// time per byte (docs/performance.md) and holds about four times the file's size: at most
/// ≈ 500 MB below this threshold.
pub const CHUNKED_ABOVE: u64 = 120 << 20;

/// About how many bytes of CSV records a chunk holds: with its header, under the 32 MiB up to
/// which the `imba` binary has glibc serve a block from its heap (src/main.rs), so that each
/// chunk's text reuses the memory the last one freed instead of pages the kernel must map and
/// zero afresh (at 10×, 32 MiB chunks: 13.0–13.6 s, 2.2–2.3 s of it system time; 31 MiB:
/// 12.6–12.7 s, 1.2 s).
const CHUNK_BYTES: usize = 31 << 20;

/// Cleans the table at `input` into `output` and returns the summary: whole, or, for a CSV file
/// of more than `chunked_above` bytes, a chunk at a time. Both ways write the same bytes and the
/// same summary.
pub fn clean_file(
    params: &CleanParams,
    input: &std::path::Path,
    output: &std::path::Path,
    chunked_above: u64,
    cancel: &crate::Cancel,
) -> Result<Json, StageError> {
    let size = std::fs::metadata(input)
        .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", input.display())))?
        .len();
    if crate::io::table::is_csv(input) && size > chunked_above {
        let chunk_bytes = CHUNK_BYTES.min(chunked_above.max(1) as usize);
        return clean_chunked(params, input, output, chunk_bytes, cancel);
    }
    let mut steps = crate::steps::Steps::start("clean");
    let table = read_input(input, params, &mut steps)?;
    let (mut table, keep, summary) = clean_marked(table, params, input, &mut steps)?;
    match keep {
        None => write_table(&mut table, output)?,
        // The survivors written straight from the table read, never copied whole.
        Some(ref keep) => crate::io::table::write_table_kept(&table, keep, output)?,
    }
    steps.done("write");
    // Giving a table of millions of rows back to the allocator takes ≈ 20 ms (scripts/bench,
    // `-v`): the stage's checks need not wait for it.
    crate::threads::drop_beside((table, keep));
    Ok(summary)
}

/// The names of `df`'s columns, in order.
fn column_names(df: &DataFrame) -> Vec<String> {
    df.get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect()
}

fn err(e: PolarsError) -> StageError {
    StageError::new(e.to_string())
}

/// Runs the four steps on `df` (read from `source`, named in errors) and returns the cleaned
/// table and the summary.
pub fn clean(
    df: DataFrame,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<(DataFrame, Json), StageError> {
    clean_input(
        Input {
            df,
            text: BTreeMap::new(),
        },
        params,
        source,
    )
}

/// The four steps, and the survivors taken from the table.
fn clean_input(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<(DataFrame, Json), StageError> {
    let mut steps = crate::steps::Steps::start("clean");
    let (df, keep, summary) = clean_marked(input, params, source, &mut steps)?;
    let df = match keep {
        Some(keep) => df.filter(&keep).map_err(err)?,
        None => df,
    };
    Ok((df, summary))
}

/// The four steps on a whole table. Each one only marks rows dead in one mask (so that every
/// count is exact and nothing is copied): the table (cast), the rows to keep (`None`: all of
/// them) and the summary.
fn clean_marked(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
    steps: &mut crate::steps::Steps,
) -> Result<(DataFrame, Option<BooleanChunked>, Json), StageError> {
    let (df, counts) = cast_step(input, params, source, 0, steps)?;
    let mut marked = mark_rows(df, counts, params, steps)?;
    let subset = dedup_subset(params, &marked.df);
    // The rows' hashes for dedup need the cast table alone: another thread computes them while
    // this one finds the IQR fences.
    let (hashes, fences) = crate::threads::beside(
        || {
            let columns = subset.as_deref()?;
            Some(crate::io::rows::row_hashes(&marked.df, columns))
        },
        || {
            let mut gathered = Gathered::for_params(params);
            gather(&marked, params, &mut gathered)?;
            Ok::<_, StageError>(fences(params, gathered))
        },
    );
    let fences = fences?;
    let mut hashes = hashes.transpose().map_err(err)?;
    steps.done("IQR fences and row hashes");
    let alive = survivors(
        &mut marked,
        &fences,
        subset.as_deref(),
        &mut |df, columns, alive| {
            steps.done("IQR and dropna");
            match hashes.take() {
                Some(hashes) => crate::io::rows::repeated_rows_hashed(df, columns, alive, hashes),
                None => crate::io::rows::repeated_rows(df, columns, alive),
            }
        },
    )?;
    steps.done("dedup");
    let keep = (marked.counts.kept != marked.df.height()).then_some(alive);
    let summary = summary(&marked.counts, params, &fences, column_names(&marked.df));
    Ok((marked.df, keep, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(csv: &str, params: serde_json::Value) -> Result<(DataFrame, Json), StageError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, csv).unwrap();
        let params: CleanParams = serde_json::from_value(params).unwrap();
        let tmp = |e: StageError| {
            StageError::new(
                e.message
                    .replace(&dir.path().display().to_string(), "[TMP]"),
            )
        };
        let df = read_table(&path).map_err(tmp)?;
        clean(df, &params, &path).map_err(tmp)
    }

    fn ints(df: &DataFrame, column: &str) -> Vec<Option<i64>> {
        df.column(column).unwrap().i64().unwrap().iter().collect()
    }

    fn floats(df: &DataFrame, column: &str) -> Vec<Option<f64>> {
        df.column(column).unwrap().f64().unwrap().iter().collect()
    }

    #[test]
    fn casts_keep_rows_with_nulls_and_count_failures() {
        let (df, summary) = run(
            "id,x,f,b,d\n1,7,1.5,true,2024-01-31\n2,7.0,NaN,no,2024-02-30\n3,abc,,x,\n4, 8 ,2,1,2024-03-01\n",
            json!({"cast": {"id": "int64", "x": "int64", "f": "float64", "b": "bool", "d": "date"}}),
        )
        .unwrap();
        assert_eq!(ints(&df, "x"), [Some(7), Some(7), None, Some(8)]);
        assert_eq!(floats(&df, "f"), [Some(1.5), None, None, Some(2.0)]);
        let b: Vec<Option<bool>> = df.column("b").unwrap().bool().unwrap().iter().collect();
        assert_eq!(b, [Some(true), Some(false), None, Some(true)]);
        assert_eq!(
            df.column("d").unwrap().null_count(),
            2,
            "2024-02-30 is not a date; empty is null"
        );
        // "abc" and "x" failed; the empty value and "NaN" are missing, not failures… except that
        // "NaN" is a value that the float cast turns into a null, as pandas reads it as missing.
        assert_eq!(
            summary["cast_nulls"],
            json!({"b": 1, "d": 1, "f": 1, "id": 0, "x": 1})
        );
        assert_eq!(
            (summary["initial"].as_u64(), summary["after_cast"].as_u64()),
            (Some(4), Some(4))
        );
    }

    #[test]
    fn on_cast_error_drop_and_fail() {
        let csv = "id,x\n1,5\n2,oops\n3,6\n";
        let (df, summary) = run(
            csv,
            json!({"cast": {"x": "int64"}, "on_cast_error": "drop"}),
        )
        .unwrap();
        assert_eq!(ints(&df, "x"), [Some(5), Some(6)]);
        assert_eq!(summary["after_cast"], 2);
        let error = run(
            csv,
            json!({"cast": {"x": "int64"}, "on_cast_error": "fail"}),
        )
        .unwrap_err();
        assert_eq!(error.message, "`[TMP]/in.csv` line 3: cannot cast \"oops\" in column `x` to int64 (on_cast_error: fail)");
    }

    #[test]
    fn domain_sets_are_case_sensitive_ranges_inclusive_and_nulls_fail() {
        let (df, summary) = run(
            "s,n\nprior,0\nPrior,3\ntrain,6\ntest,7\n,2\ntrain,\ntest,-1\n",
            json!({"cast": {"n": "int64"}, "domain": {"s": {"in": ["prior", "train", "test"]}, "n": {"between": [0, 6]}}}),
        )
        .unwrap();
        assert_eq!(ints(&df, "n"), [Some(0), Some(6)]);
        assert_eq!(summary["removed_domain"], 5);
        assert_eq!(summary["removed_domain_by_rule"], json!({"n": 3, "s": 2}));
    }

    #[test]
    fn iqr_uses_linear_quartiles_keeps_nulls_and_bounds_inclusive() {
        // Values 1..=8 and 100: sorted, n = 9; q1 at h = 2 → 3, q3 at h = 6 → 7; IQR 4;
        // fences −3 and 13: 100 goes, the null stays.
        let mut csv = String::from("v\n");
        for v in [1, 2, 3, 4, 5, 6, 7, 8, 100] {
            csv.push_str(&format!("{v}\n"));
        }
        csv.push_str("\n13\n");
        let (df, summary) = run(
            &csv,
            json!({"cast": {"v": "float64"}, "iqr": {"columns": ["v"]}}),
        )
        .unwrap();
        // With 13 among the values (n = 10): q1 at h = 2.25 → 3.25, q3 at h = 6.75 → 7.75,
        // IQR 4.5, fences −3.5 and 14.5: 13 stays, 100 goes.
        assert_eq!(
            summary["iqr_bounds"],
            json!({"q1": 3.25, "q3": 7.75, "lower": -3.5, "upper": 14.5})
        );
        assert_eq!(summary["removed_iqr"], 1);
        assert_eq!(floats(&df, "v").len(), 10, "the null row is kept");
    }

    #[test]
    fn several_iqr_columns_report_bounds_per_column() {
        let (_, summary) = run(
            "a,b\n1,10\n2,20\n3,30\n",
            json!({"cast": {"a": "int64", "b": "int64"}, "iqr": {"columns": ["a", "b"], "k": 0}}),
        )
        .unwrap();
        assert_eq!(
            summary["iqr_bounds"]["a"],
            json!({"q1": 1.5, "q3": 2.5, "lower": 1.5, "upper": 2.5})
        );
        assert_eq!(summary["after_iqr"], 1);
    }

    #[test]
    fn dropna_any_and_all() {
        let csv = "a,b,c\n1,,x\n,,y\n1,2,z\n";
        let (df, _) = run(csv, json!({"dropna": {"subset": ["a", "b"], "how": "all"}})).unwrap();
        assert_eq!(df.height(), 2);
        let (df, _) = run(csv, json!({"dropna": {"subset": ["a", "b"], "how": "any"}})).unwrap();
        assert_eq!(df.height(), 1);
        let (df, _) = run(csv, json!({"dropna": {}})).unwrap();
        assert_eq!(df.height(), 1, "default: any missing value in any column");
    }

    #[test]
    fn dedup_keeps_the_first_copy_in_order_with_nulls_equal() {
        let csv = "a,b\n2,\n1,x\n2,\n1,y\n1,x\n";
        let (df, summary) = run(csv, json!({"cast": {"a": "int64"}, "dedup": true})).unwrap();
        assert_eq!(ints(&df, "a"), [Some(2), Some(1), Some(1)]);
        assert_eq!(summary["removed_dedup"], 2);
        let (df, _) = run(
            csv,
            json!({"cast": {"a": "int64"}, "dedup": {"subset": ["a"]}}),
        )
        .unwrap();
        assert_eq!(ints(&df, "a"), [Some(2), Some(1)]);
    }

    #[test]
    fn a_header_only_file_gives_zeros_and_null_quartiles() {
        let (df, summary) = run(
            "v,w\n",
            json!({"cast": {"v": "float64"}, "iqr": {"columns": ["v"]}, "dedup": true}),
        )
        .unwrap();
        assert_eq!(df.height(), 0);
        assert_eq!(summary["initial"], 0);
        assert_eq!(
            summary["iqr_bounds"],
            json!({"q1": null, "q3": null, "lower": null, "upper": null})
        );
    }

    #[test]
    fn missing_columns_and_bad_files_are_named() {
        let error = run("a\n1\n", json!({"cast": {"b": "int64"}})).unwrap_err();
        assert_eq!(
            error.message,
            "column `b` (param `cast.b`) is not in `[TMP]/in.csv`; its columns are: a"
        );
        let error = run("a,b\n1,2\n3,4,5\n", json!({})).unwrap_err();
        assert_eq!(
            error.message,
            "`[TMP]/in.csv`: line 3: expected 2 fields (as in the header), found 3"
        );
        let error = run("", json!({})).unwrap_err();
        assert_eq!(
            error.message,
            "`[TMP]/in.csv` is empty: a CSV file needs at least a header line"
        );
        let error = run("a\n1\n", json!({"domain": {"a": {"between": [0, 1]}}})).unwrap_err();
        assert!(
            error.message.contains("cast it to int64 or float64 first"),
            "{}",
            error.message
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn params() -> CleanParams {
        serde_json::from_value(json!({
            "cast": {"a": "int64", "b": "float64", "c": "bool", "d": "date"},
            "domain": {"a": {"between": [0, 5]}, "e": {"in": ["x", "y"]}},
            "iqr": {"columns": ["b"]},
            "dropna": {"subset": ["a", "b"], "how": "all"},
            "dedup": true,
        }))
        .unwrap()
    }

    proptest! {
        /// Whatever bytes follow the header, `clean` returns a table or an error, never panics,
        /// and never returns more rows than it read.
        #[test]
        fn any_csv_body_is_handled(body in proptest::collection::vec(
            prop_oneof![Just(b','), Just(b'\n'), Just(b'"'), Just(b'1'), Just(b'7'), Just(b'.'), Just(b'-'), Just(b'x'), Just(b'y'), Just(b' '), Just(0xffu8), Just(b'e'), any::<u8>()],
            0..300,
        )) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("in.csv");
            let mut bytes = b"a,b,c,d,e\n".to_vec();
            bytes.extend_from_slice(&body);
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(df) = read_table(&path) {
                let rows = df.height();
                if let Ok((out, summary)) = clean(df, &params(), &path) {
                    prop_assert!(out.height() <= rows);
                    prop_assert_eq!(summary["initial"].as_u64(), Some(rows as u64));
                }
            }
        }
    }

    proptest! {
        /// Any bytes at all, header included, through every read path (whole, chunked, and the
        /// strict-then-lenient typed read a cast takes): a table or an error that names the
        /// file, never a panic.
        #[test]
        fn any_file_is_read_or_named(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'a'), Just(b','), Just(b'\n'), Just(b'\r'), Just(b'"'), Just(b'1'), Just(b'.'), Just(0u8), Just(0xefu8), Just(0xbbu8), Just(0xbfu8), any::<u8>()],
                0..200,
            ),
            chunked in any::<bool>(),
            cast in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("in.csv");
            std::fs::write(&path, &bytes).unwrap();
            let params: CleanParams = if cast {
                serde_json::from_value(json!({"cast": {"a": "int64"}, "dedup": true})).unwrap()
            } else {
                CleanParams::default()
            };
            let chunked_above = if chunked { 0 } else { u64::MAX };
            let result = clean_file(&params, &path, &dir.path().join("out.parquet"), chunked_above, &crate::Cancel::default());
            if let Err(e) = result {
                prop_assert!(e.message.contains("in.csv"), "{}", e.message);
            }
        }
    }

    #[test]
    fn a_binary_file_is_not_read_as_a_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, b"a,\x89PNG\x00b\n1,2\n").unwrap();
        let out = dir.path().join("out.parquet");
        for chunked_above in [0, u64::MAX] {
            let error = clean_file(
                &CleanParams::default(),
                &path,
                &out,
                chunked_above,
                &crate::Cancel::default(),
            )
            .unwrap_err();
            assert_eq!(
                error.message,
                format!(
                    "`{}` is not a CSV text file (invalid UTF-8 at byte 3 of its first line)",
                    path.display()
                )
            );
        }
        std::fs::write(&path, b"a,b\x00c\n1,2\n").unwrap();
        let error = clean_file(
            &CleanParams::default(),
            &path,
            &out,
            u64::MAX,
            &crate::Cancel::default(),
        )
        .unwrap_err();
        assert!(
            error
                .message
                .ends_with("(a NUL byte at byte 4 of its first line)"),
            "{}",
            error.message
        );
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, b"a,b\n1,2\n3,\xff\xfe\n").unwrap();
        match read_table(&path) {
            Err(e) => assert!(e.message.contains("line 3: invalid UTF-8"), "{}", e.message),
            Ok(df) => panic!("invalid UTF-8 was read silently: {df:?}"),
        }
    }
}

#[cfg(test)]
mod fail_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fail_names_the_earliest_offending_line_across_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, "a,b\n1,2\n2,x\ny,3\n").unwrap();
        let params: CleanParams = serde_json::from_value(
            json!({"cast": {"a": "int64", "b": "int64"}, "on_cast_error": "fail"}),
        )
        .unwrap();
        let error = clean(read_table(&path).unwrap(), &params, &path).unwrap_err();
        assert!(
            error.message.ends_with(
                "line 3: cannot cast \"x\" in column `b` to int64 (on_cast_error: fail)"
            ),
            "{}",
            error.message
        );
    }
}
