//! Passes over Parquet tables by ranges of a key, so that a group-by on that key holds one range
//! of rows at a time instead of the whole table.
//!
//! Every group lies within one range: grouping each range and concatenating the results in range
//! order gives the rows that grouping the whole table gives, in the same key order. Each group
//! still meets its rows in file order, so even floating-point sums come out the same, bit for bit
//! (the tests compare the two). The ranges are cut at quantiles of the key, read alone first (8
//! bytes a row for an integer key). Each range is then read with a predicate that the Parquet
//! reader checks against every row group's min/max statistics: a table sorted or clustered by the
//! key (as cleaned orders are, by user) is decoded about once in all, an unsorted one once per
//! range.

use std::path::Path;

use polars::prelude::*;

use crate::StageError;

/// The most rows a pass holds, near enough: a table with more is read in ranges of about this
/// many rows. At ≈ 8 bytes a value, a pass over a handful of columns holds tens of megabytes, and
/// the per-pass cost (planning the query, reading the row groups a range shares) stays small.
pub const PASS_ROWS: usize = 1 << 20;

/// How many keys the cuts between ranges are chosen from.
const SAMPLE: usize = 1 << 16;

/// Ranges of a key column: `[−∞, b₁), [b₁, b₂), …, [bₖ, +∞)`; no bounds is one range, the whole
/// table. A null key lies in no range (the stages drop rows without a key).
#[derive(Debug, Clone)]
pub struct KeyRanges {
    key: PlSmallStr,
    bounds: Vec<Scalar>,
    /// Whether the file's rows with a key are in ascending key order, as seen while planning.
    sorted: bool,
}

impl KeyRanges {
    /// One range: the whole table.
    pub fn whole(key: &str) -> Self {
        KeyRanges {
            key: key.into(),
            bounds: Vec::new(),
            sorted: false,
        }
    }

    /// Ranges of about `pass_rows` rows (within a few percent) of `key` in the Parquet file at `path`. One range when
    /// the table has no more rows than that, or when the key is not an integer, string or date
    /// column (a float key's NaNs would fall outside every range).
    pub fn plan(path: &Path, key: &str, pass_rows: usize) -> Result<Self, StageError> {
        let rows = parquet_rows(path)?;
        let passes = rows.div_ceil(pass_rows.max(1));
        if passes <= 1 || !crate::io::table::columns_of(path)?.iter().any(|c| c == key) {
            return Ok(Self::whole(key));
        }
        let keys = crate::io::table::guarded(path, || {
            scan_lazy(path)?
                .select([col(key)])
                .filter(col(key).is_not_null())
                .collect()
        })?;
        let Ok(column) = keys.column(key) else {
            return Ok(Self::whole(key));
        };
        let dtype = column.dtype().clone();
        if !(dtype.is_integer() || matches!(dtype, DataType::String | DataType::Date)) {
            return Ok(Self::whole(key));
        }
        let in_order = sorted(column);
        // The cuts from every so-many-th key (in file order, so a sorted table is sampled evenly):
        // ranges within a few percent of the same size, without a sorted copy of the column.
        let series = column.as_materialized_series();
        let step = (series.len() / SAMPLE).max(1);
        let sample = if step > 1 {
            let at: Vec<IdxSize> = (0..series.len())
                .step_by(step)
                .map(|i| i as IdxSize)
                .collect();
            series.take(&IdxCa::from_vec("at".into(), at))
        } else {
            Ok(series.clone())
        };
        let sorted = sample
            .and_then(|s| s.sort(SortOptions::default()))
            .map_err(|e| crate::io::table::cannot_read(path, e))?;
        drop(keys);
        let n = sorted.len();
        let mut bounds: Vec<Scalar> = Vec::new();
        // No range below the smallest key: it would be empty.
        let smallest = sorted
            .get(0)
            .ok()
            .map(|v| Scalar::new(dtype.clone(), v.into_static()));
        for i in 1..passes {
            let at = i * n / passes;
            let Ok(value) = sorted.get(at) else { continue };
            let value = Scalar::new(dtype.clone(), value.into_static());
            // A key repeated across a cut leaves the bound where it was.
            if bounds.last() != Some(&value) && smallest.as_ref() != Some(&value) {
                bounds.push(value);
            }
        }
        Ok(KeyRanges {
            key: key.into(),
            bounds,
            sorted: in_order,
        })
    }

    /// How many ranges there are.
    pub fn count(&self) -> usize {
        self.bounds.len() + 1
    }

    /// Whether the planned file's rows with a key are in ascending key order, known from the key
    /// column read to cut the ranges (`false` for [`KeyRanges::whole`], which reads nothing).
    pub fn sorted(&self) -> bool {
        self.sorted
    }

    /// Whether this is the single range of the whole table.
    pub fn is_whole(&self) -> bool {
        self.bounds.is_empty()
    }

    /// The condition a row of range `i` meets (`None` for the whole table: every row).
    pub fn predicate(&self, i: usize) -> Option<Expr> {
        let key = || col(self.key.clone());
        let above = i
            .checked_sub(1)
            .and_then(|lo| self.bounds.get(lo))
            .map(|lo| key().gt_eq(lit(lo.clone())));
        let below = self.bounds.get(i).map(|hi| key().lt(lit(hi.clone())));
        match (above, below) {
            (Some(a), Some(b)) => Some(a.and(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Whether the rows of a Parquet file that have a `key` are in ascending key order (`false` when
/// it has no such column, or the key is not an integer, string or date).
pub fn key_sorted(path: &Path, key: &str) -> Result<bool, StageError> {
    if !crate::io::table::columns_of(path)?.iter().any(|c| c == key) {
        return Ok(false);
    }
    let keys = read_range(path, &[key.to_owned()], Some(col(key).is_not_null()))?;
    Ok(keys.column(key).is_ok_and(sorted))
}

/// Whether the rows of `df` that have a `key` are in ascending key order ([`sorted`]).
pub fn rows_sorted(df: &DataFrame, key: &str) -> bool {
    df.column(key)
        .map(|c| c.drop_nulls())
        .is_ok_and(|c| sorted(&c))
}

/// The rows of `df` that have a `key`, with the key column marked as ascending, which the caller
/// knows it is: polars then groups them by slices instead of by hashing.
pub fn in_key_order(df: &DataFrame, key: &str) -> PolarsResult<DataFrame> {
    let mut rows = df.filter(&df.column(key)?.is_not_null())?;
    let mut column = rows.column(key)?.as_materialized_series().clone();
    column.set_sorted_flag(polars::series::IsSorted::Ascending);
    rows.with_column(column.into_column())?;
    Ok(rows)
}

/// Whether a column with no nulls is in ascending order, and of a type whose order a group-by
/// may rely on: integers, strings and dates.
pub fn sorted(column: &Column) -> bool {
    let dtype = column.dtype();
    (dtype.is_integer() || matches!(dtype, DataType::String | DataType::Date))
        && column
            .as_materialized_series()
            .is_sorted(SortOptions::default())
            .unwrap_or(false)
}

/// The number of rows of a Parquet file, from its footer.
pub fn parquet_rows(path: &Path) -> Result<usize, StageError> {
    let file = crate::io::table::open(path)?;
    ParquetReader::new(file)
        .num_rows()
        .map_err(|e| crate::io::table::cannot_read(path, e))
}

/// Reads `columns` (all of them when empty) of the rows of a Parquet file that meet `predicate`.
pub fn read_range(
    path: &Path,
    columns: &[String],
    predicate: Option<Expr>,
) -> Result<DataFrame, StageError> {
    // Polars opens the file itself: first check that it is a regular file (a FIFO would block).
    crate::io::table::open(path)?;
    crate::io::table::guarded(path, || {
        let mut frame = scan_lazy(path)?;
        if !columns.is_empty() {
            frame = frame.select(columns.iter().map(|c| col(c.as_str())).collect::<Vec<_>>());
        }
        if let Some(predicate) = predicate {
            frame = frame.filter(predicate);
        }
        frame.collect()
    })
}

fn scan_lazy(path: &Path) -> PolarsResult<LazyFrame> {
    LazyFrame::scan_parquet(PlRefPath::try_from_path(path)?, ScanArgsParquet::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, df: &mut DataFrame) -> std::path::PathBuf {
        let path = dir.join("t.parquet");
        crate::io::table::write_table(df, &path).unwrap();
        path
    }

    /// The ranges cover every non-null key exactly once, whatever the order of the rows, and
    /// come out in key order.
    #[test]
    fn ranges_cover_every_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let n = 10_000i64;
        // Keys 0..1000, each ten times, shuffled by a fixed permutation; every 97th null.
        let keys: Vec<Option<i64>> = (0..n)
            .map(|i| ((i * 7919) % n) / 10)
            .enumerate()
            .map(|(i, k)| (i % 97 != 5).then_some(k))
            .collect();
        let mut df = df!("k" => keys.clone(), "v" => (0..n).collect::<Vec<i64>>()).unwrap();
        let path = write(dir.path(), &mut df);
        let ranges = KeyRanges::plan(&path, "k", 1_000).unwrap();
        assert_eq!(ranges.count(), 10);
        let mut seen = Vec::new();
        let mut last_max = i64::MIN;
        for i in 0..ranges.count() {
            let part = read_range(&path, &[], ranges.predicate(i)).unwrap();
            let k = part.column("k").unwrap().i64().unwrap();
            let (Some(lo), Some(hi)) = (k.min(), k.max()) else {
                continue;
            };
            assert!(lo > last_max, "range {i} overlaps the one before");
            last_max = hi;
            seen.extend(part.column("v").unwrap().i64().unwrap().into_no_null_iter());
        }
        seen.sort_unstable();
        let want: Vec<i64> = (0..n).filter(|i| keys[*i as usize].is_some()).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn one_range_for_a_small_table_a_float_key_or_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut df = df!("k" => [1.5f64, 2.5, 3.5, 4.5], "s" => [7i64, 7, 7, 7]).unwrap();
        let path = write(dir.path(), &mut df);
        assert!(KeyRanges::plan(&path, "k", 100).unwrap().is_whole());
        assert!(
            KeyRanges::plan(&path, "k", 1).unwrap().is_whole(),
            "float key"
        );
        assert!(
            KeyRanges::plan(&path, "s", 1).unwrap().is_whole(),
            "a single key value cannot be cut"
        );
        assert_eq!(KeyRanges::whole("k").predicate(0).map(|_| ()), None);
    }

    #[test]
    fn string_keys_are_cut_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..400)
            .map(|i| format!("c{:03}", (i * 37) % 400))
            .collect();
        let mut df = df!("k" => keys).unwrap();
        let path = write(dir.path(), &mut df);
        let ranges = KeyRanges::plan(&path, "k", 100).unwrap();
        assert_eq!(ranges.count(), 4);
        let sizes: Vec<usize> = (0..4)
            .map(|i| {
                read_range(&path, &[], ranges.predicate(i))
                    .unwrap()
                    .height()
            })
            .collect();
        assert_eq!(sizes, [100, 100, 100, 100]);
    }
}
