//! Whole-row operations polars does more slowly for our purpose: finding repeated rows.
//!
//! `unique_stable` over every column of a wide table encodes each row into a byte string and
//! sorts or hashes those, a copy of the whole table as bytes (docs/performance.md measures it).
//! Here each row gets a
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
    if df.height() == 0 || columns.is_empty() {
        return Ok(Vec::new());
    }
    repeated_rows_hashed(df, columns, alive, row_hashes(df, columns)?)
}

/// [`repeated_rows`], given the rows' hashes ([`row_hashes`] of `df` on `columns`).
pub fn repeated_rows_hashed(
    df: &DataFrame,
    columns: &[PlSmallStr],
    alive: &BooleanChunked,
    hashes: Vec<u64>,
) -> PolarsResult<Vec<IdxSize>> {
    if df.height() == 0 || columns.is_empty() {
        return Ok(Vec::new());
    }
    let columns: Vec<&Column> = columns
        .iter()
        .map(|c| df.column(c))
        .collect::<PolarsResult<_>>()?;
    // The alive rows sorted by bucket (bits of the hash the tables below do not use), in row
    // order within each: a row and its copies share a hash, so each bucket finds its repeats
    // alone, with a table small enough to stay in cache. One table of every row missed the cache
    // on nearly every row (2026-12-05: `perf` put 8% of `clean`'s samples there at 1×).
    let rows = true_rows(alive);
    let bits = bucket_bits(rows.len());
    let bucket = |row: IdxSize| (hashes[row as usize] >> 32) as usize & ((1 << bits) - 1);
    let mut starts = vec![0usize; (1 << bits) + 1];
    for &row in &rows {
        starts[bucket(row) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    // Each row with its hash, read in order here rather than out of order in the buckets.
    let mut sorted: Vec<(u64, IdxSize)> = vec![(0, 0); rows.len()];
    let mut next = starts.clone();
    for &row in &rows {
        let b = bucket(row);
        sorted[next[b]] = (hashes[row as usize], row);
        next[b] += 1;
    }
    drop((rows, hashes));
    // The buckets spread over the cores, each with a table of its own.
    let buckets = crate::threads::spread(1 << bits, |b| {
        let rows = &sorted[starts[b]..starts[b + 1]];
        let mut table: HashTable<(u64, IdxSize)> = HashTable::with_capacity(rows.len());
        let mut repeats = Vec::new();
        for &(hash, row) in rows {
            match table.entry(
                hash,
                |&(h, first)| h == hash && same_row(&columns, first as usize, row as usize),
                |&(h, _)| h,
            ) {
                Entry::Occupied(_) => repeats.push(row),
                Entry::Vacant(slot) => {
                    slot.insert((hash, row));
                }
            }
        }
        repeats
    });
    let mut repeats = buckets.concat();
    repeats.sort_unstable();
    Ok(repeats)
}

/// How many bits of the hash pick a row's bucket in [`repeated_rows_hashed`]: buckets of about
/// 16,384 rows, whose table (16 bytes a row) fits in a core's L2 cache; at most 2^16 of them.
/// Bits 32 and up: hashbrown places by the low bits and tags by the top seven.
fn bucket_bits(rows: usize) -> u32 {
    (rows / 16_384)
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .min(16)
}

/// The rows where `mask` is true (a null counts as false), in order, read off its bitmaps a word
/// at a time.
pub fn true_rows(mask: &BooleanChunked) -> Vec<IdxSize> {
    let mut rows = Vec::with_capacity(mask.sum().unwrap_or(0) as usize);
    let mut offset = 0;
    for array in mask.downcast_iter() {
        let set = match array.validity() {
            Some(valid) => array.values() & valid,
            None => array.values().clone(),
        };
        rows.extend(set.true_idx_iter().map(|i| (offset + i) as IdxSize));
        offset += array.len();
    }
    rows
}

/// A 64-bit hash of each row of `df` on `columns`, combined column by column (the same values
/// give the same hash, in any table, whatever its chunks).
pub fn row_hashes(df: &DataFrame, columns: &[PlSmallStr]) -> PolarsResult<Vec<u64>> {
    let state = PlSeedableRandomStateQuality::fixed();
    let mut hashes = Vec::with_capacity(df.height());
    let mut columns = columns.iter().map(|c| df.column(c));
    match columns.next() {
        Some(first) => first?.vec_hash(state.clone(), &mut hashes)?,
        None => hashes.resize(df.height(), 0),
    }
    for column in columns {
        column?.vec_hash_combine(state.clone(), &mut hashes)?;
    }
    Ok(hashes)
}

/// The slices of the hash space [`Deduper::new`] takes one at a time: 2^12, of about 8,000
/// hashes each for a file of 34M rows.
const SLICE_BITS: u32 = 12;

/// [`repeated_rows`] a table at a time, over tables read one after the other (the chunks of a
/// file), given beforehand the hash of every row that may be alive ([`row_hashes`]). Only a row
/// whose hash comes up more than once can repeat another, so only those rows are looked at, and
/// only the first copies among them are kept, to compare value by value: a hash collision never
/// merges two different rows, and memory follows the repeated rows, not the table.
pub struct Deduper {
    /// The hashes that came up more than once.
    repeated: PlHashSet<u64>,
    /// The first copies so far, on the compared columns, and their hashes.
    kept: Option<DataFrame>,
    kept_hashes: Vec<u64>,
    table: HashTable<IdxSize>,
}

impl Deduper {
    /// From the hashes of every row that may be alive, in any order, in any number of vectors
    /// (one per chunk, say), nothing copied: each vector is sorted in place, then the hash space
    /// is taken a slice at a time (2^[`SLICE_BITS`] of them, half on another thread): each
    /// vector's hashes in the slice lie together, and a small table of the slice's hashes, which
    /// stays in cache, finds those that come up more than once.
    pub fn new(mut runs: Vec<Vec<u64>>) -> Self {
        let half = runs.len() / 2;
        let (first, second) = runs.split_at_mut(half);
        crate::threads::beside(
            || first.iter_mut().for_each(|run| run.sort_unstable()),
            || second.iter_mut().for_each(|run| run.sort_unstable()),
        );
        let slices = 1usize << SLICE_BITS;
        let runs = &runs;
        let found = crate::threads::each(2, |part| {
            let slices = part * slices / 2..(part + 1) * slices / 2;
            let slice_of = |hash: &u64| (hash >> (64 - SLICE_BITS)) as usize;
            // Within a slice the top bits are all the same: the table hashes the rest, mixed.
            let mix = |hash: u64| hash.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(32);
            // Where each vector's hashes of the next slice start.
            let mut at: Vec<usize> = runs
                .iter()
                .map(|run| run.partition_point(|h| slice_of(h) < slices.start))
                .collect();
            let mut seen: HashTable<u64> = HashTable::new();
            let mut repeated = Vec::new();
            for slice in slices {
                seen.clear();
                for (run, at) in runs.iter().zip(&mut at) {
                    let end = *at + run[*at..].partition_point(|h| slice_of(h) <= slice);
                    for &hash in &run[*at..end] {
                        match seen.entry(mix(hash), |&h| h == hash, |&h| mix(h)) {
                            Entry::Occupied(_) => repeated.push(hash),
                            Entry::Vacant(slot) => {
                                slot.insert(hash);
                            }
                        }
                    }
                    *at = end;
                }
            }
            repeated
        });
        Deduper {
            repeated: found.into_iter().flatten().collect(),
            kept: None,
            kept_hashes: Vec::new(),
            table: HashTable::new(),
        }
    }

    /// The rows of `df` (among those `alive`) that repeat, on `columns`, an alive row of this
    /// table or of one given before; the first copy is not included.
    pub fn repeats(
        &mut self,
        df: &DataFrame,
        columns: &[PlSmallStr],
        alive: &BooleanChunked,
    ) -> PolarsResult<Vec<IdxSize>> {
        if self.repeated.is_empty() || df.height() == 0 {
            return Ok(Vec::new());
        }
        let hashes = row_hashes(df, columns)?;
        let candidates: Vec<IdxSize> = hashes
            .iter()
            .zip(alive.iter())
            .enumerate()
            .filter(|(_, (h, a))| *a == Some(true) && self.repeated.contains(*h))
            .map(|(row, _)| row as IdxSize)
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let rows = df
            .select(columns.iter().cloned())?
            .take(&IdxCa::from_vec("rows".into(), candidates.clone()))?;
        let new: Vec<&Column> = rows.columns().iter().collect();
        let kept: Vec<&Column> = self
            .kept
            .as_ref()
            .map(|k| k.columns().iter().collect())
            .unwrap_or_default();
        let base = self.kept_hashes.len();
        // Among the candidates, the first copies: kept from now on.
        let mut firsts: Vec<IdxSize> = Vec::new();
        let mut repeats = Vec::new();
        for (at, &row) in candidates.iter().enumerate() {
            let hash = hashes[row as usize];
            let kept_hashes = &self.kept_hashes;
            let same = |&id: &IdxSize| {
                let id = id as usize;
                kept_hashes[id] == hash
                    && if id < base {
                        same_values(&kept, id, &new, at)
                    } else {
                        same_values(&new, firsts[id - base] as usize, &new, at)
                    }
            };
            if self.table.find(hash, same).is_some() {
                repeats.push(row);
            } else {
                let id = self.kept_hashes.len() as IdxSize;
                self.kept_hashes.push(hash);
                firsts.push(at as IdxSize);
                let kept_hashes = &self.kept_hashes;
                self.table
                    .insert_unique(hash, id, |&id| kept_hashes[id as usize]);
            }
        }
        let firsts = rows.take(&IdxCa::from_vec("firsts".into(), firsts))?;
        match &mut self.kept {
            Some(kept) => {
                kept.vstack_mut(&firsts)?;
                if kept.first_col_n_chunks() > 16 {
                    kept.rechunk_mut_par();
                }
            }
            None => self.kept = Some(firsts),
        }
        Ok(repeats)
    }
}

/// Whether rows `a` and `b` hold the same values (null = null, NaN = NaN).
fn same_row(columns: &[&Column], a: usize, b: usize) -> bool {
    same_values(columns, a, columns, b)
}

/// Whether row `a` of `left` and row `b` of `right` (the same columns, of two tables) hold the
/// same values (null = null, NaN = NaN).
fn same_values(left: &[&Column], a: usize, right: &[&Column], b: usize) -> bool {
    left.iter()
        .zip(right)
        .all(|(l, r)| match (l.get(a), r.get(b)) {
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

    /// A table of many buckets (some rows dead, copies near and far, NaN and null among the
    /// values) gives the repeats that remembering every first copy in order gives.
    #[test]
    fn many_buckets_find_the_repeats_of_one_pass_in_order() {
        let rows = 300_000;
        assert!(bucket_bits(rows) >= 4, "the table spans several buckets");
        let mut state = 7u64;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let (mut a, mut x, mut alive) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rows {
            a.push((next(20) > 0).then(|| next(200_000) as i64));
            x.push(match next(10) {
                0 => None,
                1 => Some(f64::NAN),
                v => Some(v as f64),
            });
            alive.push(next(9) > 0);
        }
        let df = df! { "a" => a.clone(), "x" => x.clone() }.unwrap();
        let mask = BooleanChunked::new("alive".into(), alive.clone());
        let got = repeated_rows(&df, &["a".into(), "x".into()], &mask).unwrap();
        let mut seen = std::collections::HashSet::new();
        let want: Vec<IdxSize> = (0..rows)
            .filter(|&i| alive[i] && !seen.insert((a[i], x[i].map(|v| v.to_bits()))))
            .map(|i| i as IdxSize)
            .collect();
        assert!(want.len() > 10_000, "{} repeats", want.len());
        assert_eq!(got, want);
    }

    /// The hashes found repeated are those that come up more than once across all the vectors,
    /// at the edges of the hash space and of its slices too.
    #[test]
    fn the_repeated_hashes_are_those_counted_twice() {
        use proptest::prelude::*;
        let edges = prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            Just(1u64 << (64 - SLICE_BITS)),
            Just((1u64 << (64 - SLICE_BITS)) - 1),
            Just(1u64 << 63),
            (0u64..40).prop_map(|v| v << 58),
            any::<u64>(),
        ];
        proptest!(|(runs in proptest::collection::vec(proptest::collection::vec(edges.clone(), 0..40), 0..7))| {
            let mut counts = std::collections::BTreeMap::<u64, usize>::new();
            for hash in runs.iter().flatten() {
                *counts.entry(*hash).or_default() += 1;
            }
            let want: std::collections::BTreeSet<u64> =
                counts.into_iter().filter(|(_, n)| *n > 1).map(|(h, _)| h).collect();
            let got: std::collections::BTreeSet<u64> =
                Deduper::new(runs).repeated.into_iter().collect();
            prop_assert_eq!(got, want);
        });
    }

    /// Chunk by chunk, with the hashes given in one vector per chunk, the repeats are those of
    /// the whole table.
    #[test]
    fn chunks_find_the_whole_tables_repeats() {
        use proptest::prelude::*;
        proptest!(|(rows in proptest::collection::vec((0i64..4, proptest::option::of(0u8..3), proptest::bool::ANY), 0..80), cuts in proptest::collection::vec(0usize..80, 0..6))| {
            let a: Vec<i64> = rows.iter().map(|r| r.0).collect();
            let b: Vec<Option<String>> = rows.iter().map(|r| r.1.map(|v| v.to_string())).collect();
            let alive: Vec<bool> = rows.iter().map(|r| r.2).collect();
            let df = df! { "a" => a, "b" => b }.unwrap();
            let columns: Vec<PlSmallStr> = vec!["a".into(), "b".into()];
            let mask = BooleanChunked::new("alive".into(), alive.clone());
            let want = repeated_rows(&df, &columns, &mask).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c < rows.len()).collect();
            cuts.push(0);
            cuts.push(rows.len());
            cuts.sort_unstable();
            cuts.dedup();
            let hashes = row_hashes(&df, &columns).unwrap();
            let runs: Vec<Vec<u64>> = cuts
                .windows(2)
                .map(|w| (w[0]..w[1]).filter(|i| alive[*i]).map(|i| hashes[i]).collect())
                .collect();
            let mut deduper = Deduper::new(runs);
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                let (start, len) = (w[0], w[1] - w[0]);
                let part = df.slice(start as i64, len);
                let part_alive = mask.slice(start as i64, len);
                got.extend(
                    deduper
                        .repeats(&part, &columns, &part_alive)
                        .unwrap()
                        .into_iter()
                        .map(|r| r + start as IdxSize),
                );
            }
            prop_assert_eq!(got, want);
        });
    }
}
