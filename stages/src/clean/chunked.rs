//! Cleaning a CSV too large to hold whole, a chunk at a time, in two passes.

use polars::prelude::*;
use serde_json::Value as Json;

use super::*;

/// Cleans a CSV file too large to hold a chunk at a time, in two passes over its chunks, for
/// what the steps need to know of the whole file before they can keep or drop a row:
///
/// 1. each chunk read, cast and marked (the domain filter, dropna); the values of the IQR
///    columns (for their quartiles, exact; counted by value while there are few distinct ones),
///    and a 64-bit hash of each row that dedup may compare;
/// 2. each chunk read and cast again, with pass 1's marks and the fences known: a row whose hash
///    came up once in pass 1 repeats nothing; the rest are compared value by value with the first
///    copies kept so far, which are all that is remembered. The survivors go to the output as
///    they come.
///
/// In both passes the next chunk's text is read on another thread, and in pass 2 the survivors
/// are written on a third while the next chunk is cleaned.
///
/// Memory holds a few chunks (one parsed, one read ahead, one or two being written), 8 bytes a
/// row for the hashes (none without dedup), 2 bits a row for the marks, and the first copies of
/// repeated rows. Same bytes out, and the same summary, as [`clean_marked`] of the whole file.
pub(super) fn clean_chunked(
    params: &CleanParams,
    input: &std::path::Path,
    output: &std::path::Path,
    chunk_bytes: usize,
    cancel: &crate::Cancel,
) -> Result<Json, StageError> {
    // Each chunk read and cast (with its counts so far), with the file's row number of its first
    // row. The next chunk's text is read on another thread while this one is parsed.
    let chunks = |each: &mut dyn FnMut(
        DataFrame,
        Counts,
        &mut crate::steps::Steps,
    ) -> Result<(), StageError>|
     -> Result<(), StageError> {
        let mut reader = crate::io::table::CsvChunks::open(input, chunk_bytes)?;
        let mut failed = false;
        let next = move || {
            let mut steps = crate::steps::Steps::start_part("clean (reading ahead)");
            let chunk = (!failed).then(|| reader.next_chunk().transpose()).flatten();
            failed = matches!(chunk, Some(Err(_)));
            steps.done("chunk of text");
            chunk
        };
        crate::threads::source_beside(1, next, |texts| {
            let mut first_row = 0;
            let mut steps = crate::steps::Steps::start_part("clean (a chunk)");
            for chunk in texts {
                let chunk = chunk?;
                steps.done("waiting for text");
                if cancel.is_cancelled() {
                    return Err(StageError::new(crate::CANCELLED));
                }
                let text = crate::io::table::CsvText {
                    path: input,
                    bytes: &chunk.bytes,
                    first_line: chunk.first_line,
                };
                let read = read_csv_input(&text, params, &mut steps)?;
                let (df, counts) = cast_step(read, params, input, first_row, &mut steps)?;
                first_row += counts.initial;
                each(df, counts, &mut steps)?;
            }
            Ok(())
        })
    };
    let mut gathered = Gathered::for_params(params);
    let dedup = !matches!(params.dedup, None | Some(Dedup::All(false)));
    // A vector of hashes per chunk (one vector doubling its way to a hash a row of the file would
    // hold up to three times that while it grows).
    let mut hashes: Vec<Vec<u64>> = Vec::new();
    // Of each chunk, what pass 1 marked, for pass 2 to use again: the domain filter's and
    // dropna's masks (in one vector of bits each for the file) and the counts.
    let (mut domains, mut dropnas) = (Bits::default(), Bits::default());
    let mut marks: Vec<(Counts, bool)> = Vec::new();
    if params.iqr.is_some() || dedup {
        chunks(&mut |df, counts, steps| {
            let marked = mark_rows(df, counts, params, steps)?;
            gather(&marked, params, &mut gathered)?;
            steps.done("IQR values");
            if let Some(subset) = dedup_subset(params, &marked.df) {
                let candidates = match &marked.dropna {
                    Some(keep) => &marked.domain & keep,
                    None => marked.domain.clone(),
                };
                let all = crate::io::rows::row_hashes(&marked.df, &subset).map_err(err)?;
                hashes.push(
                    all.iter()
                        .zip(candidates.iter())
                        .filter_map(|(h, c)| (c == Some(true)).then_some(*h))
                        .collect(),
                );
                steps.done("row hashes");
            }
            domains.push(&marked.domain);
            if let Some(keep) = &marked.dropna {
                dropnas.push(keep);
            }
            marks.push((marked.counts, marked.dropna.is_some()));
            crate::threads::drop_beside(marked.df);
            Ok(())
        })?;
    }
    let mut marks = marks.into_iter();
    // Where the next chunk's rows start in `domains` and in `dropnas`.
    let (mut at, mut at_dropna) = (0, 0);
    let fences = fences(params, gathered);
    let mut deduper = crate::io::rows::Deduper::new(hashes);
    let mut counts = Counts::default();
    let mut writer: Option<crate::io::table::TableWriter> = None;
    let mut last: Option<DataFrame> = None;
    // The survivors are written on another thread while the next chunk is cleaned.
    let write = |kept: DataFrame| {
        let mut steps = crate::steps::Steps::start_part("clean (writing)");
        let writer = match &mut writer {
            Some(writer) => writer,
            None => writer.insert(crate::io::table::TableWriter::create(
                output,
                kept.schema(),
            )?),
        };
        writer.write(&kept)?;
        steps.done("write");
        crate::threads::drop_beside(kept);
        Ok(())
    };
    crate::threads::sink_beside(1, write, |write| {
        chunks(&mut |df, cast_counts, steps| {
            let mut marked = match marks.next() {
                // The same rows as in pass 1, cast the same way: marked the same way.
                Some((counts, dropna)) if counts.after_cast == df.height() => {
                    let height = df.height();
                    let domain = domains.get(at..at + height);
                    at += height;
                    let dropna = dropna.then(|| {
                        at_dropna += height;
                        dropnas.get(at_dropna - height..at_dropna)
                    });
                    Marked {
                        df,
                        domain,
                        dropna,
                        counts,
                    }
                }
                Some(_) => {
                    return Err(StageError::new(format!(
                        "`{}` changed while it was being cleaned",
                        crate::safe::escape(&input.to_string_lossy())
                    )))
                }
                None => mark_rows(df, cast_counts, params, steps)?,
            };
            let subset = dedup_subset(params, &marked.df);
            let alive = survivors(
                &mut marked,
                &fences,
                subset.as_deref(),
                &mut |df, columns, alive| deduper.repeats(df, columns, alive),
            )?;
            steps.done("survivors");
            let kept = marked.df.filter(&alive).map_err(err)?;
            steps.done("filter");
            counts.add(&marked.counts);
            last = Some(marked.df.clear());
            crate::threads::drop_beside(marked);
            write(kept)
        })
    })?;
    if let Some(writer) = writer {
        writer.finish()?;
    }
    let empty = last.unwrap_or_default();
    Ok(summary(&counts, params, &fences, column_names(&empty)))
}

/// Masks of the chunks one after the other, a bit a row, in one vector: kept apart, a small
/// block per chunk would stay scattered over the heap that the chunks' tables come and go in,
/// and the peak at 10× grew by 70 MB so. A null is a row not kept, as everywhere a mask is used.
#[derive(Default)]
struct Bits {
    words: Vec<u64>,
    len: usize,
}

impl Bits {
    fn push(&mut self, mask: &BooleanChunked) {
        for kept in mask.iter() {
            if self.len.is_multiple_of(64) {
                self.words.push(0);
            }
            if kept == Some(true) {
                self.words[self.len / 64] |= 1 << (self.len % 64);
            }
            self.len += 1;
        }
    }

    fn get(&self, rows: std::ops::Range<usize>) -> BooleanChunked {
        let rows = rows.start.min(self.len)..rows.end.min(self.len);
        BooleanChunked::from_iter_values(
            "mask".into(),
            rows.map(|row| self.words[row / 64] >> (row % 64) & 1 == 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(on_cast_error: &str, dedup: Json) -> CleanParams {
        serde_json::from_value(json!({
            "cast": {"id": "int64", "n": "int64", "x": "float64", "y": "float64", "d": "date"},
            "on_cast_error": on_cast_error,
            "domain": {"n": {"between": [-5, 8]}, "s": {"in": ["a", "b", "c"]}},
            "iqr": {"columns": ["x", "y"], "k": 1.0},
            "dropna": {"subset": ["n", "x"], "how": "all"},
            "dedup": dedup,
        }))
        .unwrap()
    }

    /// A file of `rows` rows from a fixed generator: bad numbers (`oops`, ` 4 `, `7.0`, `nan`,
    /// empty), values out of the domain, outliers, many repeated rows near and far apart (NaN
    /// and empty ones too), and, when `quoted`, quoted fields (some holding newlines).
    fn file(rows: usize, seed: u64, quoted: bool) -> String {
        let mut state = seed | 1;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let mut text = String::from("id,n,x,y,s,d\n");
        let mut lines: Vec<String> = Vec::new();
        for i in 0..rows {
            let line = if !lines.is_empty() && next(5) == 0 {
                // A repeat of an earlier row, near or far.
                lines[next(lines.len() as u64) as usize].clone()
            } else {
                let n = match next(12) {
                    0 => "oops".to_owned(),
                    1 => " 4 ".to_owned(),
                    2 => "7.0".to_owned(),
                    3 => String::new(),
                    _ => (next(16) as i64 - 6).to_string(),
                };
                let x = match next(15) {
                    0 => "nan".to_owned(),
                    1 => String::new(),
                    2 => "2.x".to_owned(),
                    3 => "500".to_owned(),
                    _ => format!("{}", next(40) as f64 / 4.0),
                };
                let y = match next(20) {
                    0 => "-0.0".to_owned(),
                    1 => "0".to_owned(),
                    _ => format!("{}", next(1000) as f64 / 10.0 - 30.0),
                };
                let s = match next(9) {
                    0 if quoted => "\"a,\nb\"".to_owned(),
                    1 if quoted => "\"c\"".to_owned(),
                    2 => "z".to_owned(),
                    _ => ["a", "b", "c"][next(3) as usize].to_owned(),
                };
                let d = match next(10) {
                    0 => "2024-02-30".to_owned(),
                    _ => format!("2024-03-{:02}", 1 + next(28)),
                };
                format!("{},{n},{x},{y},{s},{d}", i / 3)
            };
            lines.push(line.clone());
            text.push_str(&line);
            text.push_str(if next(7) == 0 { "\r\n" } else { "\n" });
        }
        text
    }

    fn run(csv: &str, params: &CleanParams, chunked_above: u64) -> Result<(Json, Vec<u8>), String> {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.csv");
        let output = dir.path().join("out.parquet");
        std::fs::write(&input, csv).unwrap();
        match clean_file(params, &input, &output, chunked_above, &Default::default()) {
            Ok(summary) => Ok((summary, std::fs::read(&output).unwrap())),
            Err(e) => Err(e
                .message
                .replace(&dir.path().display().to_string(), "[TMP]")),
        }
    }

    /// Chunks of a few hundred bytes to a few kilobytes give the very file and summary the
    /// whole table gives, whatever the params.
    #[test]
    fn chunks_give_the_whole_files_bytes_and_summary() {
        let dedups = [json!(true), json!({"subset": ["id", "s"]}), json!(false)];
        for (k, (seed, quoted)) in [(1u64, false), (2, true), (3, false)]
            .into_iter()
            .enumerate()
        {
            let csv = file(3_000, seed, quoted);
            for on_cast_error in ["null", "drop"] {
                let params = params(on_cast_error, dedups[k].clone());
                let whole = run(&csv, &params, u64::MAX).unwrap();
                assert!(
                    whole.0["removed_iqr"].as_u64() > Some(0)
                        && whole.0["removed_domain"].as_u64() > Some(0),
                    "{}",
                    whole.0
                );
                if k < 2 {
                    assert!(whole.0["removed_dedup"].as_u64() > Some(100), "{}", whole.0);
                }
                for chunk in [300, 1_000, 20_000] {
                    let parts = run(&csv, &params, chunk).unwrap();
                    assert_eq!(
                        parts.0, whole.0,
                        "seed {seed}, {on_cast_error}, chunk {chunk}"
                    );
                    assert!(
                        parts.1 == whole.1,
                        "seed {seed}, {on_cast_error}, chunk {chunk}: the files differ"
                    );
                }
            }
        }
    }

    /// Without IQR and dedup there is one pass; the results are still the whole table's.
    #[test]
    fn row_local_steps_take_one_pass() {
        let csv = file(2_000, 9, true);
        let mut params = params("null", json!(false));
        params.iqr = None;
        let whole = run(&csv, &params, u64::MAX).unwrap();
        let parts = run(&csv, &params, 500).unwrap();
        assert_eq!(parts.0, whole.0);
        assert!(parts.1 == whole.1);
    }

    /// Errors name the file's line, not the chunk's.
    #[test]
    fn errors_name_the_files_line() {
        let mut csv = file(2_000, 4, false);
        let failing = run(&csv, &params("fail", json!(true)), 1_000).unwrap_err();
        assert_eq!(
            failing,
            run(&csv, &params("fail", json!(true)), u64::MAX).unwrap_err()
        );
        assert!(failing.contains("(on_cast_error: fail)"), "{failing}");
        csv.push_str("1,2\n");
        let ragged = run(&csv, &params("null", json!(true)), 1_000).unwrap_err();
        assert_eq!(
            ragged,
            "`[TMP]/in.csv`: line 2002: expected 6 fields (as in the header), found 2"
        );
        assert_eq!(
            ragged,
            run(&csv, &params("null", json!(true)), u64::MAX).unwrap_err()
        );
        let missing = run("a,b\n1,2\n3,4\n", &params("null", json!(true)), 4).unwrap_err();
        assert_eq!(
            missing,
            run("a,b\n1,2\n3,4\n", &params("null", json!(true)), u64::MAX).unwrap_err()
        );
    }

    /// Quantiles from counted values are those of the listed values, to the bit (−0 and 0 apart).
    #[test]
    fn counted_quantiles_are_the_listed_ones() {
        use proptest::prelude::*;
        proptest!(|(values in proptest::collection::vec(prop_oneof![Just(-0.0f64), Just(0.0), (-5i32..40i32).prop_map(|v| v as f64 / 4.0)], 0..200), q in 0.0f64..1.0)| {
            let mut counted = Gathered::Counts(Default::default());
            counted.extend(values.clone());
            let mut listed = values.clone();
            let want = quantile_linear(&mut listed, q);
            let got = counted.quantile(q);
            prop_assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits));
        });
    }

    proptest::proptest! {
        /// Any well-formed file, in chunks of any size, cleans as the whole file does.
        #[test]
        fn any_file_cleans_the_same_in_chunks(
            rows in proptest::collection::vec((0u8..4, 0u8..6, 0u8..5, 0u8..3), 0..80),
            chunk in 1u64..200,
        ) {
            let mut csv = String::from("id,n,x,y,s,d\n");
            for (id, n, x, s) in &rows {
                let n = ["1", "x", "", "9", "-2", "3.0"][*n as usize];
                let x = ["1.5", "nan", "", "100", "2"][*x as usize];
                let s = ["a", "z", "\"b\""][*s as usize];
                csv.push_str(&format!("{id},{n},{x},1,{s},2024-01-01\n"));
            }
            let params = params("null", json!(true));
            let whole = run(&csv, &params, u64::MAX);
            let parts = run(&csv, &params, chunk);
            match (whole, parts) {
                (Ok(w), Ok(p)) => {
                    proptest::prop_assert_eq!(&p.0, &w.0);
                    proptest::prop_assert!(p.1 == w.1, "the files differ");
                }
                (w, p) => proptest::prop_assert_eq!(p.map(|p| p.0), w.map(|w| w.0)),
            }
        }
    }
}
