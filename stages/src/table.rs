//! Reading and writing tables: CSV or Parquet by extension, with errors that name the file and,
//! for CSV, the line.

use std::path::Path;

use polars::prelude::*;

use crate::StageError;

/// Whether a path names a CSV file (by extension); anything else is Parquet.
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Reads a table. A CSV is read with every column as a string (casting is the clean stage's job),
/// and empty fields as nulls.
pub fn read_table(path: &Path) -> Result<DataFrame, StageError> {
    if is_csv(path) {
        read_csv_strings(path)
    } else {
        read_parquet(path, None)
    }
}

/// Reads a table with its column types: Parquet as it is, CSV with types inferred from the values
/// (from the first 10,000 rows, or from all of them when a later value does not fit).
pub fn read_table_inferred(path: &Path) -> Result<DataFrame, StageError> {
    if !is_csv(path) {
        return read_parquet(path, None);
    }
    let read = |rows: Option<usize>| {
        CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(rows)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
    };
    match read(Some(10_000)).or_else(|_| read(None)) {
        Ok(df) => {
            check_csv_shape(path, df.width(), df.height())?;
            Ok(df)
        }
        Err(e) => Err(csv_error(path, e)),
    }
}

/// The column names of a table, from a CSV's header line or a Parquet file's schema, without
/// reading its rows.
pub fn columns_of(path: &Path) -> Result<Vec<String>, StageError> {
    if is_csv(path) {
        // Only the header line is read (polars would map the whole file to chunk it).
        use std::io::BufRead;
        let file = std::fs::File::open(path)
            .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", path.display())))?;
        let mut header = Vec::new();
        std::io::BufReader::new(file)
            .read_until(b'\n', &mut header)
            .map_err(|e| StageError::new(format!("cannot read `{}`: {e}", path.display())))?;
        let df = CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
            .into_reader_with_file_handle(std::io::Cursor::new(header))
            .finish()
            .map_err(|e| csv_error(path, e))?;
        return Ok(df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect());
    }
    let file = std::fs::File::open(path)
        .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", path.display())))?;
    let schema = ParquetReader::new(file).schema().map_err(|e| {
        StageError::new(format!(
            "cannot read Parquet file `{}`: {e}",
            path.display()
        ))
    })?;
    Ok(schema.iter_names().map(|c| c.to_string()).collect())
}

/// A table's rows, and per column its dtype, null count and, for numbers, mean, min and max (for
/// the metadata of a version).
pub fn describe(path: &Path) -> Result<serde_json::Value, StageError> {
    let df = read_table_inferred(path)?;
    let mut columns = Vec::new();
    for column in df.columns() {
        let dtype = column.dtype();
        let mut entry = serde_json::json!({
            "name": column.name().as_str(),
            "dtype": dtype.to_string(),
            "nulls": column.null_count(),
        });
        if dtype.is_primitive_numeric() {
            if let Ok(values) = column.cast(&DataType::Float64) {
                if let Ok(values) = values.f64() {
                    let finite: Vec<f64> =
                        values.iter().flatten().filter(|v| v.is_finite()).collect();
                    let n = finite.len() as f64;
                    let mean = finite.iter().sum::<f64>() / n;
                    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    entry["mean"] = crate::stats::finite(mean);
                    entry["min"] = crate::stats::finite(min);
                    entry["max"] = crate::stats::finite(max);
                }
            }
        }
        columns.push(entry);
    }
    Ok(serde_json::json!({"rows": df.height(), "columns": columns}))
}

/// A CSV that polars could not read: the line at fault when one can be found, else polars' words.
fn csv_error(path: &Path, error: PolarsError) -> StageError {
    match locate_csv_problem(path) {
        Some(problem) => StageError::new(format!("`{}`: {problem}", path.display())),
        None => StageError::new(format!(
            "cannot read CSV file `{}`: {error}",
            path.display()
        )),
    }
}

/// Reads a Parquet file: all its columns, or only `columns` when it has them all (when it does
/// not, all of them, so that the caller's error can list what there is).
pub fn read_parquet(path: &Path, columns: Option<&[String]>) -> Result<DataFrame, StageError> {
    let cannot = |e: PolarsError| {
        StageError::new(format!(
            "cannot read Parquet file `{}`: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path)
        .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", path.display())))?;
    let mut reader = ParquetReader::new(file);
    if let Some(columns) = columns.filter(|c| !c.is_empty()) {
        let schema = reader.schema().map_err(cannot)?;
        if columns.iter().all(|c| schema.contains(c.as_str())) {
            reader = reader.with_columns(Some(columns.to_vec()));
        }
    }
    // polars panics on some corrupt files (a footer that points past the data, as a file cut
    // in the middle has): an error naming the file, rather than an internal error naming none.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.finish())) {
        Ok(read) => read.map_err(cannot),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the reader panicked");
            Err(StageError::new(format!(
                "cannot read Parquet file `{}`: the file is corrupt ({why})",
                path.display()
            )))
        }
    }
}

fn read_csv_strings(path: &Path) -> Result<DataFrame, StageError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", path.display())))?;
    if meta.len() == 0 {
        return Err(StageError::new(format!(
            "`{}` is empty: a CSV file needs at least a header line",
            path.display()
        )));
    }
    let read = CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .with_raise_if_empty(false)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|reader| reader.finish());
    match read {
        Ok(df) => {
            check_csv_shape(path, df.width(), df.height())?;
            Ok(df)
        }
        Err(error) => Err(csv_error(path, error)),
    }
}

/// Reads a CSV with the given columns parsed as the given types and every other column as text.
/// Strict, a value that does not parse fails the read; lenient, it becomes null (the caller then
/// reads those columns again as text, to see what was there). Lenient reading also lets through
/// lines with missing fields and invalid UTF-8, which [`check_csv_shape`] catches.
pub fn read_csv_typed(
    path: &Path,
    types: &[(String, DataType)],
    lenient: bool,
) -> PolarsResult<DataFrame> {
    let schema: Schema = types
        .iter()
        .map(|(name, dtype)| (name.as_str().into(), dtype.clone()))
        .collect();
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .with_schema_overwrite(Some(std::sync::Arc::new(schema)))
        .with_ignore_errors(lenient)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))?
        .finish()
}

/// Reads just `columns` of a CSV, as text (empty fields as nulls).
pub fn read_csv_text_columns(path: &Path, columns: &[String]) -> Result<DataFrame, StageError> {
    let names: Vec<PlSmallStr> = columns.iter().map(|c| c.as_str().into()).collect();
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .with_columns(Some(names.into()))
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|reader| reader.finish())
        .map_err(|e| StageError::new(format!("cannot read CSV file `{}`: {e}", path.display())))
}

/// Checks a CSV that polars has read as `columns` × `rows` for what polars lets through: a line
/// with fewer fields than the header (polars, like pandas, fills it with nulls) and, in a lenient
/// read, invalid UTF-8. One pass over the bytes counting separators; the line-by-line scan runs
/// only when the counts do not add up or the file has quotes.
///
/// Returns whether the file is *plain*: no quotes, no blank lines, every line with every field,
/// so that data row `i` is line `i + 2` ([`csv_fields_at`] relies on it).
pub fn check_csv_shape(path: &Path, columns: usize, rows: usize) -> Result<bool, StageError> {
    let map = map_file(path)?;
    let bytes: &[u8] = map.as_deref().unwrap_or_default();
    let utf8_ok = std::str::from_utf8(bytes).is_ok();
    let commas = bytecount::count(bytes, b',');
    let quotes = bytecount::count(bytes, b'"');
    let expected = columns.saturating_sub(1) * (rows + 1);
    if utf8_ok && quotes == 0 && commas == expected {
        // Every line is the header or a row (the last one may lack its newline).
        let newlines = bytecount::count(bytes, b'\n');
        let lines = newlines + usize::from(bytes.last().is_some_and(|b| *b != b'\n'));
        return Ok(lines == rows + 1);
    }
    match locate_csv_problem(path) {
        Some(problem) => Err(StageError::new(format!("`{}`: {problem}", path.display()))),
        None => Ok(false),
    }
}

/// A file's bytes, mapped read-only (`None` for an empty file, which cannot be mapped). Like
/// polars, which maps the same CSV to parse it, this assumes nobody truncates the file while
/// a stage reads it.
fn map_file(path: &Path) -> Result<Option<memmap2::Mmap>, StageError> {
    let cannot =
        |e: std::io::Error| StageError::new(format!("cannot read `{}`: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(cannot)?;
    if file.metadata().map_err(cannot)?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: read-only; the file is an input of the stage, which imba never writes while the
    // stage runs (see above for other writers).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(cannot)?;
    Ok(Some(map))
}

/// The fields at `columns` (indices) of data rows `rows` (ascending; 0 is the line after the
/// header) of a plain CSV (see [`check_csv_shape`]), as text. One streaming pass that splits only
/// the lines asked for: reading the text of a whole column to look at a few of its values costs
/// far more.
pub fn csv_fields_at(
    path: &Path,
    rows: &[IdxSize],
    columns: &[usize],
) -> Result<Vec<Vec<String>>, StageError> {
    let fields = |line: &[u8]| -> Vec<String> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let all: Vec<&[u8]> = line.split(|b| *b == b',').collect();
        columns
            .iter()
            .map(|c| String::from_utf8_lossy(all.get(*c).copied().unwrap_or_default()).into_owned())
            .collect()
    };
    let map = map_file(path)?;
    let bytes: &[u8] = map.as_deref().unwrap_or_default();
    let mut out = Vec::with_capacity(rows.len());
    let mut wanted = rows.iter().map(|r| *r as u64 + 1).peekable();
    let (mut line, mut start) = (0u64, 0usize);
    let ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
    for end in ends {
        let Some(&next) = wanted.peek() else { break };
        if line == next && start <= end {
            out.push(fields(&bytes[start..end]));
            wanted.next();
        }
        line += 1;
        start = end + 1;
    }
    if out.len() != rows.len() {
        return Err(StageError::new(format!(
            "`{}` changed while it was read: it has fewer lines than before",
            path.display()
        )));
    }
    Ok(out)
}

/// Finds the first line of a CSV that cannot be read (wrong field count, invalid UTF-8), to say
/// where polars' error is. Only called when reading failed, so its cost does not matter.
pub fn locate_csv_problem(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let mut expected: Option<usize> = None;
    let mut line = 1usize;
    let mut start = 0usize;
    let mut in_quotes = false;
    let mut fields = 1usize;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => fields += 1,
            b'\n' if !in_quotes => {
                let record = &bytes[start..i];
                if let Err(e) = std::str::from_utf8(record) {
                    return Some(format!(
                        "line {line}: invalid UTF-8 at byte {} of the line",
                        e.valid_up_to() + 1
                    ));
                }
                let blank = record.iter().all(|c| c.is_ascii_whitespace());
                if !blank {
                    match expected {
                        None => expected = Some(fields),
                        Some(n) if n != fields => {
                            return Some(format!("line {line}: expected {n} fields (as in the header), found {fields}"));
                        }
                        _ => {}
                    }
                }
                line += 1;
                start = i + 1;
                fields = 1;
            }
            _ => {}
        }
    }
    let record = &bytes[start..];
    if let Err(e) = std::str::from_utf8(record) {
        return Some(format!(
            "line {line}: invalid UTF-8 at byte {} of the line",
            e.valid_up_to() + 1
        ));
    }
    if !record.iter().all(|c| c.is_ascii_whitespace()) {
        if let Some(n) = expected.filter(|n| *n != fields) {
            return Some(format!(
                "line {line}: expected {n} fields (as in the header), found {fields}"
            ));
        }
    }
    None
}

/// Writes `df` as CSV (when the path ends in `.csv`) or Parquet.
pub fn write_table(df: &mut DataFrame, path: &Path) -> Result<(), StageError> {
    let file = std::fs::File::create(path)
        .map_err(|e| StageError::new(format!("cannot create `{}`: {e}", path.display())))?;
    let written = if is_csv(path) {
        CsvWriter::new(std::io::BufWriter::new(file))
            .include_header(true)
            .finish(df)
    } else {
        write_parquet(df, file)
    };
    written.map_err(|e| StageError::new(format!("cannot write `{}`: {e}", path.display())))
}

/// [`write_table`] of the rows of `df` that `keep` marks, without a copy of all of them: Parquet
/// is written one row group at a time, each filled from slices of `df`, so that the file is the
/// same, byte for byte, as `write_table` of the filtered table would write.
pub fn write_table_kept(
    df: &DataFrame,
    keep: &BooleanChunked,
    path: &Path,
) -> Result<(), StageError> {
    let cannot =
        |e: PolarsError| StageError::new(format!("cannot write `{}`: {e}", path.display()));
    if is_csv(path) {
        let mut kept = df.filter(keep).map_err(cannot)?;
        return write_table(&mut kept, path);
    }
    let file = std::fs::File::create(path)
        .map_err(|e| StageError::new(format!("cannot create `{}`: {e}", path.display())))?;
    let written = (|| {
        let mut writer = parquet_writer(file, df)?;
        let mut pending = df.clear();
        let mut offset = 0;
        while offset < df.height() {
            let part = df
                .slice(offset as i64, ROW_GROUP)
                .filter(&keep.slice(offset as i64, ROW_GROUP))?;
            offset += ROW_GROUP;
            pending.vstack_mut(&part)?;
            while pending.height() >= ROW_GROUP {
                let mut group = pending.slice(0, ROW_GROUP);
                group.rechunk_mut_par();
                writer.write_batch(&group)?;
                pending = pending.slice(ROW_GROUP as i64, usize::MAX);
            }
        }
        if pending.height() > 0 {
            pending.rechunk_mut_par();
            writer.write_batch(&pending)?;
        }
        writer.finish().map(|_| ())
    })();
    written.map_err(cannot)
}

/// Rows per Parquet row group (polars' default).
const ROW_GROUP: usize = 512 * 512;

/// Writes `df` as Parquet one row group at a time, so that only one group is ever copied and
/// encoded in memory (polars' `finish` aligns and encodes the whole table at once). Snappy, as
/// pandas, pyarrow and Spark write by default: zstd's files are a third smaller but take half as
/// long again to write (scripts/bench-monthly).
fn write_parquet(df: &DataFrame, file: std::fs::File) -> PolarsResult<()> {
    let mut writer = parquet_writer(file, df)?;
    let mut offset = 0;
    while offset < df.height() {
        let mut group = df.slice(offset as i64, ROW_GROUP);
        group.rechunk_mut_par();
        writer.write_batch(&group)?;
        offset += ROW_GROUP;
    }
    writer.finish().map(|_| ())
}

/// A Parquet writer of tables shaped like `df`, fed a row group at a time.
fn parquet_writer(
    file: std::fs::File,
    df: &DataFrame,
) -> PolarsResult<polars::io::parquet::write::BatchedWriter<std::io::BufWriter<std::fs::File>>> {
    ParquetWriter::new(std::io::BufWriter::new(file))
        .with_compression(ParquetCompression::Snappy)
        .batched(df.schema())
}

/// A JSON pointer to a param (`["cast", "order_dow"]` → `/cast/order_dow`).
pub fn pointer(segments: &[&str]) -> String {
    segments
        .iter()
        .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// A param pointer as a person writes it: `/iqr/columns/0` → `iqr.columns[0]`.
pub fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

/// Checks that every name in `columns` is a column of `df`; the error names the column, the
/// param it came from, the file and the columns there are.
pub fn require_columns<'a>(
    df: &DataFrame,
    columns: impl IntoIterator<Item = (&'a str, String)>,
    file: &Path,
) -> Result<(), StageError> {
    let present: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    for (column, pointer) in columns {
        if !present.iter().any(|p| p == column) {
            return Err(StageError::new(format!(
                "column `{column}` (param `{}`) is not in `{}`; its columns are: {}",
                dotted(&pointer),
                file.display(),
                present.join(", ")
            ))
            .at_param(pointer));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept rows written slice by slice make the very file the filtered table makes: across
    /// row groups, with whole groups dropped, and with nothing kept.
    #[test]
    fn writing_the_kept_rows_equals_writing_the_filtered_table() {
        let n = ROW_GROUP * 2 + 12_345;
        let ids: Vec<i64> = (0..n as i64).collect();
        let names: Vec<String> = (0..n).map(|i| format!("n{}", i % 97)).collect();
        let df = DataFrame::new(
            n,
            vec![
                Column::new("id".into(), ids),
                Column::new("name".into(), names),
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let masks: [Box<dyn Fn(usize) -> bool>; 3] = [
            Box::new(|i| i % 7 != 3),
            Box::new(|i| !(ROW_GROUP..ROW_GROUP * 2).contains(&i) && i % 5 != 0),
            Box::new(|_| false),
        ];
        for (k, mask) in masks.iter().enumerate() {
            let keep: BooleanChunked = (0..n).map(|i| Some(mask(i))).collect();
            let whole = dir.path().join(format!("whole{k}.parquet"));
            let kept = dir.path().join(format!("kept{k}.parquet"));
            write_table(&mut df.filter(&keep).unwrap(), &whole).unwrap();
            write_table_kept(&df, &keep, &kept).unwrap();
            assert!(
                std::fs::read(&whole).unwrap() == std::fs::read(&kept).unwrap(),
                "mask {k}: the files differ"
            );
        }
    }

    fn problem(text: &[u8]) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, text).unwrap();
        locate_csv_problem(&path)
    }

    #[test]
    fn finds_ragged_lines_and_bad_utf8() {
        assert_eq!(
            problem(b"a,b\n1,2\n3,4,5\n"),
            Some("line 3: expected 2 fields (as in the header), found 3".into())
        );
        assert_eq!(
            problem(b"a,b\n1,2\n\"x,y\",4\n5\n"),
            Some("line 4: expected 2 fields (as in the header), found 1".into())
        );
        assert_eq!(
            problem(b"a,b\n1,\xff\n"),
            Some("line 2: invalid UTF-8 at byte 3 of the line".into())
        );
        assert_eq!(problem(b"a,b\n1,2\n"), None);
    }

    #[test]
    fn short_rows_and_bad_utf8_are_errors_not_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a,b,c\n1,2,3\n4,5\n6,7,8\n").unwrap();
        let error = read_table(&path).unwrap_err();
        assert_eq!(
            error.message,
            format!(
                "`{}`: line 3: expected 3 fields (as in the header), found 2",
                path.display()
            )
        );
        std::fs::write(&path, "a,b\n1,2\n").unwrap();
        assert!(check_csv_shape(&path, 2, 1).unwrap());
        std::fs::write(&path, "a,b\n1,2\n\n3,4").unwrap();
        assert!(!check_csv_shape(&path, 2, 2).unwrap(), "a blank line");
        std::fs::write(&path, "a,b\n\"1\",2\n").unwrap();
        assert!(!check_csv_shape(&path, 2, 1).unwrap(), "quotes");
        std::fs::write(&path, b"a,b\n1,\xff\n").unwrap();
        assert!(check_csv_shape(&path, 2, 1)
            .unwrap_err()
            .message
            .ends_with("line 2: invalid UTF-8 at byte 3 of the line"));
    }

    /// Lines cut by the 1 MiB read buffer, CRLF ends and a last line without its newline.
    #[test]
    fn fields_at_finds_any_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let n = 150_000u32;
        let mut text = String::from("a,b,c\r\n");
        for i in 0..n {
            text.push_str(&format!("{i},{},row {i}\r\n", i * 2));
        }
        text.truncate(text.len() - 2);
        std::fs::write(&path, &text).unwrap();
        assert!(check_csv_shape(&path, 3, n as usize).unwrap());
        let rows: Vec<IdxSize> = (0..n).step_by(997).chain([n - 1]).collect();
        let fields = csv_fields_at(&path, &rows, &[2, 0]).unwrap();
        for (row, fields) in rows.iter().zip(&fields) {
            assert_eq!(fields, &[format!("row {row}"), row.to_string()]);
        }
        assert!(csv_fields_at(&path, &[n], &[0]).is_err(), "past the end");
    }
}
