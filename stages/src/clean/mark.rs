//! The steps as marks: each row a step drops is marked dead in one mask, so every count is
//! exact and nothing is copied; the IQR fences and the duplicates need the whole table.

use std::collections::BTreeMap;

use polars::prelude::*;

use super::*;

/// A table (a whole file, or a chunk of one) after the steps that look at one row at a time:
/// cast, the domain filter and dropna, each only marking rows.
pub(super) struct Marked {
    /// The table, cast (without the rows `on_cast_error: drop` dropped).
    pub(super) df: DataFrame,
    /// The rows that pass the domain filter.
    pub(super) domain: BooleanChunked,
    /// The rows dropna keeps (`None`: no dropna).
    pub(super) dropna: Option<BooleanChunked>,
    pub(super) counts: Counts,
}

/// Where the rows went, summed over chunks.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) initial: usize,
    pub(super) after_cast: usize,
    pub(super) removed_cast: usize,
    pub(super) cast_nulls: BTreeMap<String, usize>,
    pub(super) removed_domain_by_rule: BTreeMap<String, usize>,
    pub(super) after_domain: usize,
    pub(super) after_iqr: usize,
    pub(super) after_dropna: usize,
    pub(super) kept: usize,
}

impl Counts {
    pub(super) fn add(&mut self, other: &Counts) {
        self.initial += other.initial;
        self.after_cast += other.after_cast;
        self.removed_cast += other.removed_cast;
        for (column, n) in &other.cast_nulls {
            *self.cast_nulls.entry(column.clone()).or_default() += n;
        }
        for (column, n) in &other.removed_domain_by_rule {
            *self
                .removed_domain_by_rule
                .entry(column.clone())
                .or_default() += n;
        }
        self.after_domain += other.after_domain;
        self.after_iqr += other.after_iqr;
        self.after_dropna += other.after_dropna;
        self.kept += other.kept;
    }
}

pub(super) fn live(mask: &BooleanChunked) -> usize {
    mask.sum().unwrap_or(0) as usize
}

/// Every column a param names, with the param's JSON pointer: each must be in the input.
pub(super) fn wanted_columns(params: &CleanParams) -> Vec<(&str, String)> {
    let mut wanted: Vec<(&str, String)> = Vec::new();
    wanted.extend(
        params
            .cast
            .keys()
            .map(|c| (c.as_str(), crate::pointer::of(&["cast", c]))),
    );
    wanted.extend(
        params
            .domain
            .keys()
            .map(|c| (c.as_str(), crate::pointer::of(&["domain", c]))),
    );
    if let Some(iqr) = &params.iqr {
        wanted.extend(iqr.columns.iter().enumerate().map(|(i, c)| {
            (
                c.as_str(),
                crate::pointer::of(&["iqr", "columns", &i.to_string()]),
            )
        }));
    }
    if let Some(subset) = params.dropna.as_ref().and_then(|d| d.subset.as_ref()) {
        wanted.extend(subset.iter().enumerate().map(|(i, c)| {
            (
                c.as_str(),
                crate::pointer::of(&["dropna", "subset", &i.to_string()]),
            )
        }));
    }
    if let Some(Dedup::Subset { subset }) = &params.dedup {
        wanted.extend(subset.iter().enumerate().map(|(i, c)| {
            (
                c.as_str(),
                crate::pointer::of(&["dedup", "subset", &i.to_string()]),
            )
        }));
    }
    wanted
}

/// The first of the row-local steps of `input` (read from `source`; its first row is row
/// `first_row` of the file, for errors): the table cast, and its counts so far.
pub(super) fn cast_step(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
    first_row: usize,
    steps: &mut crate::steps::Steps,
) -> Result<(DataFrame, Counts), StageError> {
    let Input { df, text } = input;
    require_columns(&df, wanted_columns(params), source)?;

    let mut counts = Counts {
        initial: df.height(),
        ..Default::default()
    };

    // 1. Cast.
    let (df, cast_nulls, removed_cast) = cast_columns(df, text, params, source, first_row)?;
    counts.after_cast = df.height();
    counts.removed_cast = removed_cast;
    counts.cast_nulls = cast_nulls;
    steps.done("cast");
    Ok((df, counts))
}

/// The other row-local steps of the cast table, with its counts so far ([`cast_step`]): the
/// domain filter and dropna, as masks.
pub(super) fn mark_rows(
    df: DataFrame,
    mut counts: Counts,
    params: &CleanParams,
    steps: &mut crate::steps::Steps,
) -> Result<Marked, StageError> {
    let mut alive = BooleanChunked::full("alive".into(), true, df.height());

    // 2. Domain: one pass evaluates every rule.
    let mut rules = Vec::new();
    for (column, rule) in &params.domain {
        rules.push((column, domain_expr(&df, column, rule)?));
    }
    if !rules.is_empty() {
        let masks = df
            .clone()
            .lazy()
            .select(
                rules
                    .iter()
                    .map(|(c, ok)| ok.clone().alias(c.as_str()))
                    .collect::<Vec<_>>(),
            )
            .collect()
            .map_err(err)?;
        for (column, _) in &rules {
            let ok = masks
                .column(column)
                .and_then(|c| c.bool().cloned())
                .map_err(err)?;
            counts
                .removed_domain_by_rule
                .insert((*column).clone(), ok.len() - live(&ok));
            alive = alive & ok;
        }
    }
    counts.after_domain = live(&alive);
    steps.done("domain");

    // 4a. Missing values (applied after the IQR step, which does not depend on it).
    let mut dropna_keep = None;
    if let Some(dropna) = &params.dropna {
        let columns: Vec<String> = dropna.subset.clone().unwrap_or_else(|| {
            df.get_column_names()
                .iter()
                .map(|c| c.to_string())
                .collect()
        });
        if !columns.is_empty() {
            let missing: Vec<Expr> = columns.iter().map(|c| missing_expr(&df, c)).collect();
            let drop = match dropna.how {
                How::Any => any_horizontal(missing).map_err(err)?,
                How::All => all_horizontal(missing).map_err(err)?,
            };
            let masks = df
                .clone()
                .lazy()
                .select([drop.not().alias("keep")])
                .collect()
                .map_err(err)?;
            let keep = masks
                .column("keep")
                .and_then(|c| c.bool().cloned())
                .map_err(err)?;
            dropna_keep = Some(keep);
        }
    }
    steps.done("dropna");
    Ok(Marked {
        df,
        domain: alive,
        dropna: dropna_keep,
        counts,
    })
}

/// The IQR columns' values in the rows that passed the domain filter, added to `gathered`.
pub(super) fn gather(
    marked: &Marked,
    params: &CleanParams,
    gathered: &mut [Gathered],
) -> Result<(), StageError> {
    if let Some(iqr) = &params.iqr {
        for (column, values) in iqr.columns.iter().zip(gathered.iter_mut()) {
            values.extend(numeric_values(&marked.df, column, &marked.domain)?);
        }
    }
    Ok(())
}

/// Tukey's fences of one column: its quartiles, and the bounds `k` IQRs beyond them (all `None`
/// when the column has no values).
#[derive(Debug, Clone, Copy)]
pub(super) struct Fence {
    pub(super) q1: Option<f64>,
    pub(super) q3: Option<f64>,
    pub(super) lower: Option<f64>,
    pub(super) upper: Option<f64>,
}

/// The fences of every IQR column, from all the values gathered.
pub(super) fn fences(params: &CleanParams, gathered: Vec<Gathered>) -> Vec<(String, Fence)> {
    let Some(iqr) = &params.iqr else {
        return Vec::new();
    };
    iqr.columns
        .iter()
        .zip(gathered)
        .map(|(column, mut values)| {
            let fence = Fence::new(values.quantile(0.25), values.quantile(0.75), iqr.k);
            (column.clone(), fence)
        })
        .collect()
}

impl Fence {
    /// The fences `k` IQRs beyond the quartiles (none without them).
    pub(super) fn new(q1: Option<f64>, q3: Option<f64>, k: f64) -> Fence {
        let (lower, upper) = match (q1, q3) {
            (Some(q1), Some(q3)) => (Some(q1 - k * (q3 - q1)), Some(q3 + k * (q3 - q1))),
            _ => (None, None),
        };
        Fence {
            q1,
            q3,
            lower,
            upper,
        }
    }
}

/// The columns dedup compares (`None`: no dedup).
pub(super) fn dedup_subset(params: &CleanParams, df: &DataFrame) -> Option<Vec<PlSmallStr>> {
    match &params.dedup {
        None | Some(Dedup::All(false)) => None,
        Some(Dedup::All(true)) => Some(df.get_column_names_owned()),
        Some(Dedup::Subset { subset }) => Some(subset.iter().map(|c| c.as_str().into()).collect()),
    }
}

/// What finds the rows, among those alive, that repeat an earlier row on the given columns.
pub(super) type Repeats<'a> =
    dyn FnMut(&DataFrame, &[PlSmallStr], &BooleanChunked) -> PolarsResult<Vec<IdxSize>> + 'a;

/// The rows of `marked` that survive the IQR fences, dropna and dedup, counted in its counts.
pub(super) fn survivors(
    marked: &mut Marked,
    fences: &[(String, Fence)],
    subset: Option<&[PlSmallStr]>,
    repeats: &mut Repeats,
) -> Result<BooleanChunked, StageError> {
    let df = &marked.df;
    // 3. IQR: kept within the fences, or missing (null or NaN, as pandas' `isna`).
    let mut alive = marked.domain.clone();
    for (column, fence) in fences {
        if let (Some(lower), Some(upper)) = (fence.lower, fence.upper) {
            let values = df
                .column(column)
                .and_then(|c| c.cast(&DataType::Float64))
                .map_err(err)?;
            let values = values.f64().map_err(err)?;
            // Vectorised comparisons; a null compares as null, and NaN as false.
            let within = values.gt_eq(lower) & values.lt_eq(upper);
            let ok = (within | values.is_nan())
                .fill_null_with_values(true)
                .map_err(err)?;
            alive = alive & ok;
        }
    }
    marked.counts.after_iqr = live(&alive);
    // 4. Missing values, then duplicates.
    if let Some(keep) = &marked.dropna {
        alive = alive & keep.clone();
    }
    marked.counts.after_dropna = live(&alive);
    if let Some(subset) = subset {
        let repeated = repeats(df, subset, &alive).map_err(err)?;
        if !repeated.is_empty() {
            alive = alive.scatter_single(repeated, Some(false)).map_err(err)?;
        }
    }
    marked.counts.kept = live(&alive);
    Ok(alive)
}

/// The values of a column, gathered a table (or a chunk) at a time, for its exact quantiles:
/// counted by value while there are few distinct ones (a gap in days has 31), listed once there
/// are many. Either way [`Gathered::quantile`] is [`quantile_linear`] of all the values, to the
/// bit.
pub(super) enum Gathered {
    Counts(PlHashMap<u64, u64>),
    Values(Vec<f64>),
}

/// Distinct values counted before the values are listed instead.
pub(super) const MAX_DISTINCT: usize = 1 << 16;

impl Gathered {
    /// One for each IQR column.
    pub(super) fn for_params(params: &CleanParams) -> Vec<Gathered> {
        let columns = params.iqr.as_ref().map_or(0, |iqr| iqr.columns.len());
        (0..columns)
            .map(|_| Gathered::Counts(PlHashMap::default()))
            .collect()
    }

    pub(super) fn extend(&mut self, values: Vec<f64>) {
        match self {
            Gathered::Values(all) => all.extend(values),
            Gathered::Counts(counts) => {
                for v in values {
                    *counts.entry(v.to_bits()).or_default() += 1;
                }
                if counts.len() > MAX_DISTINCT {
                    let all = counts
                        .iter()
                        .flat_map(|(v, n)| std::iter::repeat_n(f64::from_bits(*v), *n as usize))
                        .collect();
                    *self = Gathered::Values(all);
                }
            }
        }
    }

    /// The `q`-quantile, linearly interpolated between order statistics (pandas' default).
    pub(super) fn quantile(&mut self, q: f64) -> Option<f64> {
        let counts = match self {
            Gathered::Values(all) => return quantile_linear(all, q),
            Gathered::Counts(counts) => counts,
        };
        let mut sorted: Vec<(f64, u64)> = counts
            .iter()
            .map(|(v, n)| (f64::from_bits(*v), *n))
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let n: u64 = sorted.iter().map(|(_, c)| c).sum();
        if n == 0 {
            return None;
        }
        // The value at 0-based position `at` of the sorted values.
        let nth = |at: u64| {
            let mut seen = 0;
            for (v, c) in &sorted {
                seen += c;
                if at < seen {
                    return *v;
                }
            }
            f64::NAN
        };
        let h = (n - 1) as f64 * q.clamp(0.0, 1.0);
        let lo = h.floor() as u64;
        let frac = h - lo as f64;
        let low = nth(lo);
        if frac == 0.0 || lo + 1 >= n {
            return Some(low);
        }
        Some(low + frac * (nth(lo + 1) - low))
    }
}
