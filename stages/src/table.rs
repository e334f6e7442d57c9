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
        let file = std::fs::File::open(path)
            .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", path.display())))?;
        ParquetReader::new(file).finish().map_err(|e| {
            StageError::new(format!(
                "cannot read Parquet file `{}`: {e}",
                path.display()
            ))
        })
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
        Ok(df) => Ok(df),
        Err(error) => Err(match locate_csv_problem(path) {
            Some(problem) => StageError::new(format!("`{}`: {problem}", path.display())),
            None => StageError::new(format!(
                "cannot read CSV file `{}`: {error}",
                path.display()
            )),
        }),
    }
}

/// Reads a CSV with the given columns parsed as the given types and every other column as text,
/// failing on any value that does not parse. The fast path of `clean`: when every value of every
/// cast column parses, the text versions of those columns are never built.
pub fn read_csv_typed(path: &Path, types: &[(String, DataType)]) -> PolarsResult<DataFrame> {
    let schema: Schema = types
        .iter()
        .map(|(name, dtype)| (name.as_str().into(), dtype.clone()))
        .collect();
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .with_schema_overwrite(Some(std::sync::Arc::new(schema)))
        .with_ignore_errors(false)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))?
        .finish()
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
        CsvWriter::new(file).include_header(true).finish(df)
    } else {
        ParquetWriter::new(file).finish(df).map(|_| ())
    };
    written.map_err(|e| StageError::new(format!("cannot write `{}`: {e}", path.display())))
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
}
