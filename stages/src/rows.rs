//! Whole-row operations polars does more slowly for our purpose: finding repeated rows.
//!
//! `unique_stable` over every column of a wide table encodes each row into a byte string and
//! sorts or hashes those; at Instacart scale that took 0.65 s and 800 MB. Here each row gets a
//! 64-bit hash combined column by column (polars' own vectorised hashers, which hash floats by
//! their canonical bits so that NaN = NaN and −0 = 0), and a hash table of row numbers finds the
//! first copy; rows whose hashes meet are compared value by value, so a hash collision never
//! merges two different rows.

use hashbrown::hash_table::{Entry, HashTable};
use polars::prelude::*;

/// The rows of `df` (among those `alive`) that repeat an earlier alive row on `columns`: nulls
/// equal nulls and NaN equals NaN, as in pandas' `duplicated`. The first copy is not included.
pub fn repeated_rows(
    df: &DataFrame,
    columns: &[PlSmallStr],
    alive: &BooleanChunked,
) -> PolarsResult<Vec<IdxSize>> {
    let n = df.height();
    if n == 0 || columns.is_empty() {
        return Ok(Vec::new());
    }
    let columns: Vec<&Column> = columns
        .iter()
        .map(|c| df.column(c))
        .collect::<PolarsResult<_>>()?;
    let state = PlSeedableRandomStateQuality::fixed();
    let mut hashes = Vec::with_capacity(n);
    columns[0].vec_hash(state.clone(), &mut hashes)?;
    for column in &columns[1..] {
        column.vec_hash_combine(state.clone(), &mut hashes)?;
    }
    let alive: Vec<bool> = alive.iter().map(|a| a == Some(true)).collect();

    // The hash space split in as many parts as there are threads (on bits the table itself does
    // not use): a row and its copies share a hash, so each part finds its repeats alone, visiting
    // its rows in order.
    let parts = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let alive_count = alive.iter().filter(|a| **a).count();
    let find = |part: usize| -> Vec<IdxSize> {
        let mut table: HashTable<IdxSize> = HashTable::with_capacity(alive_count / parts + 16);
        let mut repeats = Vec::new();
        for (row, hash) in hashes.iter().enumerate() {
            if !alive[row] || (*hash >> 32) as usize % parts != part {
                continue;
            }
            match table.entry(
                *hash,
                |&first| hashes[first as usize] == *hash && same_row(&columns, first as usize, row),
                |&first| hashes[first as usize],
            ) {
                Entry::Occupied(_) => repeats.push(row as IdxSize),
                Entry::Vacant(slot) => {
                    slot.insert(row as IdxSize);
                }
            }
        }
        repeats
    };
    let mut repeats: Vec<IdxSize> = if parts == 1 {
        find(0)
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..parts).map(|p| scope.spawn(move || find(p))).collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    };
    repeats.sort_unstable();
    Ok(repeats)
}

/// Whether rows `a` and `b` hold the same values (null = null, NaN = NaN).
fn same_row(columns: &[&Column], a: usize, b: usize) -> bool {
    columns
        .iter()
        .all(|column| match (column.get(a), column.get(b)) {
            (Ok(AnyValue::Float64(x)), Ok(AnyValue::Float64(y))) => {
                x == y || (x.is_nan() && y.is_nan())
            }
            (Ok(AnyValue::Float32(x)), Ok(AnyValue::Float32(y))) => {
                x == y || (x.is_nan() && y.is_nan())
            }
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repeats(df: &DataFrame, columns: &[&str]) -> Vec<IdxSize> {
        let columns: Vec<PlSmallStr> = columns.iter().map(|c| (*c).into()).collect();
        let alive = BooleanChunked::full("alive".into(), true, df.height());
        repeated_rows(df, &columns, &alive).unwrap()
    }

    #[test]
    fn finds_later_copies_with_nulls_and_nans_equal() {
        let df = df! {
            "a" => [Some(1i64), Some(1), None, None, Some(1), Some(2)],
            "x" => [Some(f64::NAN), Some(f64::NAN), None, None, Some(0.0), Some(-0.0)],
            "s" => ["p", "p", "q", "q", "p", "p"],
        }
        .unwrap();
        assert_eq!(repeats(&df, &["a", "x", "s"]), vec![1, 3]);
        assert_eq!(repeats(&df, &["s"]), vec![1, 3, 4, 5]);
        assert_eq!(repeats(&df, &["x"]), vec![1, 3, 5], "−0 equals 0");
    }

    #[test]
    fn dead_rows_are_neither_kept_nor_counted() {
        let df = df! { "a" => [1i64, 1, 1, 2] }.unwrap();
        let alive = BooleanChunked::new("alive".into(), [false, true, true, true]);
        let out = repeated_rows(&df, &["a".into()], &alive).unwrap();
        assert_eq!(out, vec![2], "row 1 is the first live copy");
    }

    /// Against a quadratic reference on random small tables with many ties.
    #[test]
    fn agrees_with_a_pairwise_comparison() {
        use proptest::prelude::*;
        proptest!(|(rows in proptest::collection::vec((0i64..3, proptest::option::of(0u8..3), proptest::bool::ANY), 0..60))| {
            let a: Vec<i64> = rows.iter().map(|r| r.0).collect();
            let b: Vec<Option<String>> = rows.iter().map(|r| r.1.map(|v| v.to_string())).collect();
            let alive: Vec<bool> = rows.iter().map(|r| r.2).collect();
            let df = df! { "a" => a.clone(), "b" => b.clone() }.unwrap();
            let got = repeated_rows(&df, &["a".into(), "b".into()], &BooleanChunked::new("alive".into(), alive.clone())).unwrap();
            let want: Vec<IdxSize> = (0..rows.len())
                .filter(|&i| alive[i] && (0..i).any(|j| alive[j] && a[j] == a[i] && b[j] == b[i]))
                .map(|i| i as IdxSize)
                .collect();
            prop_assert_eq!(got, want);
        });
    }
}
