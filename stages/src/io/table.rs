//! Reading and writing tables: CSV or Parquet by extension, with errors that name the file and,
//! for CSV, the line.

use std::path::Path;

use polars::prelude::*;

use crate::StageError;

/// Opens a table file to read it: only a regular file, never blocking on a FIFO; the error names
/// the file ("`data/in.csv` is a directory, but this stage reads it as a file").
pub fn open(path: &Path) -> Result<std::fs::File, StageError> {
    crate::safe::open_file(path)
        .map_err(|e| StageError::new(crate::safe::describe_error("open", path, &e)))
}

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
    // Mapped here rather than opened by polars, so that only a regular file is read.
    let map = map_csv(path)?;
    let bytes = map.as_deref().unwrap_or_default();
    let read = |rows: Option<usize>| {
        CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(rows)
            .into_reader_with_file_handle(std::io::Cursor::new(bytes))
            .finish()
    };
    match read(Some(10_000)).or_else(|_| read(None)) {
        Ok(df) => {
            CsvText {
                path,
                bytes,
                first_line: 2,
            }
            .check_shape(df.width(), df.height())?;
            Ok(df)
        }
        Err(e) => Err(csv_text_error(path, locate_csv_problem(bytes, 2), e)),
    }
}

/// The column names of a table, from a CSV's header line or a Parquet file's schema, without
/// reading its rows.
pub fn columns_of(path: &Path) -> Result<Vec<String>, StageError> {
    if is_csv(path) {
        // Only the header line is read (polars would map the whole file to chunk it).
        use std::io::BufRead;
        let mut file = std::io::BufReader::new(open(path)?);
        // The first line that is not blank: polars skips blank lines before the header.
        let mut header = Vec::new();
        loop {
            header.clear();
            file.read_until(b'\n', &mut header)
                .map_err(|e| StageError::new(format!("cannot read `{}`: {e}", path.display())))?;
            if !matches!(header.as_slice(), b"\n" | b"\r\n") {
                break;
            }
        }
        if header.is_empty() {
            return Err(StageError::new(format!(
                "`{}` is empty: a CSV file needs at least a header line",
                crate::safe::escape(&path.to_string_lossy())
            )));
        }
        check_text(path, &header)?;
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
    let file = open(path)?;
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
    // A Parquet table one column at a time: a version's metadata is written while other stages
    // compute, and a whole feature table at 10x is hundreds of MB (docs/performance.md, Memory).
    let (rows, columns) = if is_csv(path) {
        let df = read_table_inferred(path)?;
        let columns = df.columns().iter().map(describe_column).collect();
        (df.height(), columns)
    } else {
        let mut reader = ParquetReader::new(open(path)?);
        let rows = guarded(path, || reader.num_rows())?;
        let mut columns = Vec::new();
        for name in columns_of(path)? {
            let df = read_parquet(path, Some(std::slice::from_ref(&name)))?;
            if let Ok(column) = df.column(&name) {
                columns.push(describe_column(column));
            }
        }
        (rows, columns)
    };
    Ok(serde_json::json!({"rows": rows, "columns": columns}))
}

/// A column's dtype, null count and, for numbers, the mean, min and max of its finite values.
fn describe_column(column: &Column) -> serde_json::Value {
    let dtype = column.dtype();
    let mut entry = serde_json::json!({
        "name": column.name().as_str(),
        "dtype": dtype.to_string(),
        "nulls": column.null_count(),
    });
    if dtype.is_primitive_numeric() {
        if let Ok(values) = column.cast(&DataType::Float64) {
            if let Ok(values) = values.f64() {
                // Passes over the values rather than a copy of them.
                let finite = || values.iter().flatten().filter(|v| v.is_finite());
                let n = finite().count() as f64;
                let mean = finite().sum::<f64>() / n;
                let min = finite().fold(f64::INFINITY, f64::min);
                let max = finite().fold(f64::NEG_INFINITY, f64::max);
                entry["mean"] = crate::stats::finite(mean);
                entry["min"] = crate::stats::finite(min);
                entry["max"] = crate::stats::finite(max);
            }
        }
    }
    entry
}

/// A CSV that polars could not read: the line at fault when one can be found, else polars' words.
fn csv_error(path: &Path, error: PolarsError) -> StageError {
    let problem = map_file(path)
        .ok()
        .and_then(|map| locate_csv_problem(map.as_deref().unwrap_or_default(), 2));
    csv_text_error(path, problem, error)
}

fn csv_text_error(path: &Path, problem: Option<String>, error: PolarsError) -> StageError {
    match problem {
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
    let file = open(path)?;
    let mut reader = ParquetReader::new(file);
    if let Some(columns) = columns.filter(|c| !c.is_empty()) {
        let schema = reader.schema().map_err(|e| {
            StageError::new(format!(
                "cannot read Parquet file `{}`: {e}",
                path.display()
            ))
        })?;
        if columns.iter().all(|c| schema.contains(c.as_str())) {
            reader = reader.with_columns(Some(columns.to_vec()));
        }
    }
    guarded(path, || reader.finish())
}

/// A Parquet file's columns with their types and no rows: its footer only.
pub fn empty_parquet(path: &Path) -> Result<DataFrame, StageError> {
    let reader = ParquetReader::new(open(path)?).with_slice(Some((0, 0)));
    guarded(path, || reader.finish())
}

fn read_csv_strings(path: &Path) -> Result<DataFrame, StageError> {
    let map = map_csv(path)?;
    CsvText {
        path,
        bytes: map.as_deref().unwrap_or_default(),
        first_line: 2,
    }
    .read_strings()
}

/// A CSV document in memory: a file's header line and its records, all of them or a chunk of
/// them ([`CsvChunks`]), with where they are in the file, so that errors name the file and the
/// file's own line numbers.
#[derive(Clone, Copy)]
pub struct CsvText<'a> {
    pub path: &'a Path,
    /// The header line, then the records.
    pub bytes: &'a [u8],
    /// The line number, in the file, of the line after the header (2 for a whole file).
    pub first_line: usize,
}

impl<'a> CsvText<'a> {
    fn options(&self) -> CsvReadOptions {
        CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
    }

    fn read(&self, options: CsvReadOptions) -> PolarsResult<DataFrame> {
        options
            .into_reader_with_file_handle(std::io::Cursor::new(self.bytes))
            .finish()
    }

    /// Every column as text, empty fields as nulls; errors name the line at fault.
    pub fn read_strings(&self) -> Result<DataFrame, StageError> {
        if self.bytes.is_empty() {
            return Err(StageError::new(format!(
                "`{}` is empty: a CSV file needs at least a header line",
                self.path.display()
            )));
        }
        match self.read(self.options().with_raise_if_empty(false)) {
            Ok(df) => {
                self.check_shape(df.width(), df.height())?;
                Ok(df)
            }
            Err(error) => Err(csv_text_error(
                self.path,
                locate_csv_problem(self.bytes, self.first_line),
                error,
            )),
        }
    }

    /// The given columns parsed as the given types and every other column as text. Strict, a
    /// value that does not parse fails the read; lenient, it becomes null (the caller then reads
    /// those columns again as text, to see what was there). Lenient reading also lets through
    /// lines with missing fields and invalid UTF-8, which [`CsvText::check_shape`] catches.
    pub fn read_typed(
        &self,
        types: &[(String, DataType)],
        lenient: bool,
    ) -> PolarsResult<DataFrame> {
        let schema: Schema = types
            .iter()
            .map(|(name, dtype)| (name.as_str().into(), dtype.clone()))
            .collect();
        self.read(
            self.options()
                .with_schema_overwrite(Some(std::sync::Arc::new(schema)))
                .with_ignore_errors(lenient),
        )
    }

    /// Just `columns`, as text (empty fields as nulls).
    pub fn read_text_columns(&self, columns: &[String]) -> Result<DataFrame, StageError> {
        let names: Vec<PlSmallStr> = columns.iter().map(|c| c.as_str().into()).collect();
        self.read(self.options().with_columns(Some(names.into())))
            .map_err(|e| {
                StageError::new(format!(
                    "cannot read CSV file `{}`: {e}",
                    self.path.display()
                ))
            })
    }

    /// Checks a CSV that polars has read as `columns` × `rows` for what polars lets through: a
    /// line with fewer fields than the header (polars, like pandas, fills it with nulls) and, in
    /// a lenient read, invalid UTF-8. One pass over the bytes counting separators; the
    /// line-by-line scan runs only when the counts do not add up or the text has quotes.
    ///
    /// Returns whether the text is *plain*: no quotes, no blank lines, every line with every
    /// field, so that data row `i` is the `i`-th line after the header
    /// ([`CsvText::fields_at`] relies on it).
    pub fn check_shape(&self, columns: usize, rows: usize) -> Result<bool, StageError> {
        let bytes = self.bytes;
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
        match locate_csv_problem(bytes, self.first_line) {
            Some(problem) => Err(StageError::new(format!(
                "`{}`: {problem}",
                self.path.display()
            ))),
            None => Ok(false),
        }
    }

    /// The fields at `columns` (indices) of data rows `rows` (ascending; 0 is the line after the
    /// header) of a plain CSV (see [`CsvText::check_shape`]), as bytes borrowed from the text:
    /// row by row, `columns.len()` fields a row. One streaming pass that splits only the lines
    /// asked for, each only as far as the last column asked for: reading the text of a whole
    /// column to look at a few of its values costs far more.
    pub fn fields_at(
        &self,
        rows: &[IdxSize],
        columns: &[usize],
    ) -> Result<Vec<&'a [u8]>, StageError> {
        let bytes = self.bytes;
        let last = columns.iter().copied().max().unwrap_or(0);
        let mut out = Vec::with_capacity(rows.len() * columns.len());
        let mut split: Vec<&[u8]> = Vec::with_capacity(last + 1);
        // Line 0 is the header.
        let mut wanted = rows.iter().map(|r| *r as usize + 1).peekable();
        let (mut line, mut start) = (0usize, 0usize);
        let ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
        for end in ends {
            let Some(&next) = wanted.peek() else { break };
            if line == next && start <= end {
                let text = &bytes[start..end];
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                split.clear();
                split.extend(text.splitn(last + 2, |b| *b == b',').take(last + 1));
                out.extend(
                    columns
                        .iter()
                        .map(|c| split.get(*c).copied().unwrap_or_default()),
                );
                wanted.next();
            }
            line += 1;
            start = end + 1;
        }
        if wanted.peek().is_some() {
            return Err(StageError::new(format!(
                "`{}` changed while it was read: it has fewer lines than before",
                self.path.display()
            )));
        }
        Ok(out)
    }
}

/// [`CsvText::check_shape`] of a whole file.
pub fn check_csv_shape(path: &Path, columns: usize, rows: usize) -> Result<bool, StageError> {
    let map = map_csv(path)?;
    CsvText {
        path,
        bytes: map.as_deref().unwrap_or_default(),
        first_line: 2,
    }
    .check_shape(columns, rows)
}

/// A file's bytes, mapped read-only (`None` for an empty file, which cannot be mapped). Like
/// polars, which maps the same CSV to parse it, this assumes nobody truncates the file while
/// a stage reads it.
pub fn map_file(path: &Path) -> Result<Option<memmap2::Mmap>, StageError> {
    let cannot = |e: std::io::Error| StageError::new(crate::safe::describe_error("read", path, &e));
    let file = crate::safe::open_file(path).map_err(cannot)?;
    if file.metadata().map_err(cannot)?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: read-only; the file is an input of the stage, which imba never writes while the
    // stage runs (see above for other writers).
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(cannot)?;
    Ok(Some(map))
}

/// [`map_file`] of a CSV file whose first line is text ([`check_text`]).
pub fn map_csv(path: &Path) -> Result<Option<memmap2::Mmap>, StageError> {
    let map = map_file(path)?;
    check_text(path, map.as_deref().unwrap_or_default())?;
    Ok(map)
}

/// A CSV file's first line must be text: a file whose header holds a NUL byte or is not UTF-8 is
/// not a CSV file (binary data, a compressed file, another encoding), and is named as such
/// rather than read as one garbled column. `bytes`: the file from its start.
pub fn check_text(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    // The header: the first line that is not blank, as polars reads it.
    let line = bytes
        .split(|&b| b == b'\n')
        .find(|line| !line.is_empty() && *line != b"\r")
        .unwrap_or_default();
    let not_text = |why: &str, at: usize| {
        StageError::new(format!(
            "`{}` is not a CSV text file ({why} at byte {} of its first line)",
            crate::safe::escape(&path.to_string_lossy()),
            at + 1
        ))
    };
    let utf8_end = match std::str::from_utf8(line) {
        Ok(_) => line.len(),
        Err(e) => e.valid_up_to(),
    };
    match line[..utf8_end].iter().position(|&b| b == 0) {
        Some(nul) => Err(not_text("a NUL byte", nul)),
        None if utf8_end < line.len() => Err(not_text("invalid UTF-8", utf8_end)),
        None => Ok(()),
    }
}

/// A CSV file read a chunk of whole records at a time, each chunk behind the file's header line
/// so that it is a CSV document of its own ([`CsvText`]). The file is read, not mapped: memory
/// holds one chunk, however large the file. A record ends at a newline outside quotes, so a
/// quoted field may hold newlines; a quote left open keeps the rest of the file in one chunk.
pub struct CsvChunks {
    path: std::path::PathBuf,
    file: std::fs::File,
    header: Vec<u8>,
    /// Bytes read past the last chunk.
    pending: Vec<u8>,
    eof: bool,
    /// About how many bytes of records a chunk holds.
    target: usize,
    /// The file's line number of the next chunk's first record.
    next_line: usize,
    /// Whether a chunk has been given out (a file of just a header is one chunk of no records).
    started: bool,
}

/// A chunk of a CSV file: its header line and some records, and the file's line number of the
/// first of them.
pub struct CsvChunk {
    pub bytes: Vec<u8>,
    pub first_line: usize,
}

impl CsvChunks {
    /// Opens `path` to read about `target` bytes of records at a time.
    pub fn open(path: &Path, target: usize) -> Result<Self, StageError> {
        let file = open(path)?;
        let mut chunks = CsvChunks {
            path: path.to_path_buf(),
            file,
            header: Vec::new(),
            pending: Vec::new(),
            eof: false,
            target: target.max(1),
            next_line: 1,
            started: false,
        };
        // The header: the first record that is not a blank line (polars skips those before the
        // header of a whole file, so the chunks must too).
        let mut blank = 0;
        loop {
            if let Some(end) = record_end(&chunks.pending, false) {
                let record: Vec<u8> = chunks.pending.drain(..=end).collect();
                if matches!(record.as_slice(), b"\n" | b"\r\n") {
                    blank += 1;
                    continue;
                }
                chunks.header = record;
                break;
            }
            if chunks.eof {
                chunks.header = std::mem::take(&mut chunks.pending);
                break;
            }
            let mut pending = std::mem::take(&mut chunks.pending);
            let want = pending.len() + (64 << 10);
            chunks.read_into(&mut pending, want)?;
            chunks.pending = pending;
        }
        check_text(path, &chunks.header)?;
        // Lines are counted in records, as polars and `locate_csv_problem` count them.
        chunks.next_line = 2 + blank;
        Ok(chunks)
    }

    /// The next chunk, or `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<CsvChunk>, StageError> {
        if self.started && self.eof && self.pending.is_empty() {
            return Ok(None);
        }
        self.started = true;
        // The chunk is built in place: the header, the bytes read past the last chunk, then the
        // file read straight in behind them (one copy, into memory not zeroed first).
        let header = self.header.len();
        let mut bytes =
            Vec::with_capacity(header + self.pending.len().max(self.target) + (64 << 10));
        bytes.extend_from_slice(&self.header);
        bytes.append(&mut self.pending);
        let mut want = self.target;
        let end = loop {
            self.read_into(&mut bytes, header + want)?;
            let body = &bytes[header..];
            if self.eof && body.len() <= self.target {
                break body.len();
            }
            // The last record that ends within the target, else the first one past it.
            let within = &body[..self.target.min(body.len())];
            if let Some(end) = record_end(within, true).or_else(|| record_end(body, false)) {
                break end + 1;
            }
            if self.eof {
                break body.len();
            }
            // One record longer than a chunk: read on until it ends.
            want = body.len() * 2;
        };
        self.pending = bytes[header + end..].to_vec();
        bytes.truncate(header + end);
        let first_line = self.next_line;
        self.next_line += records(&bytes[header..]);
        Ok(Some(CsvChunk { bytes, first_line }))
    }

    /// Reads on into `bytes` until it holds `want` bytes or the file ends.
    fn read_into(&mut self, bytes: &mut Vec<u8>, want: usize) -> Result<(), StageError> {
        use std::io::Read;
        while !self.eof && bytes.len() < want {
            let need = (want - bytes.len()) as u64;
            match (&self.file).take(need).read_to_end(bytes) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(StageError::new(format!(
                        "cannot read `{}`: {e}",
                        self.path.display()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The position of the newline that ends the first (`last` false) or last (`last` true) whole
/// record in `bytes`, which start at a record's start: a newline after an even number of quotes.
fn record_end(bytes: &[u8], last: bool) -> Option<usize> {
    if memchr::memchr(b'"', bytes).is_none() {
        return if last {
            memchr::memrchr(b'\n', bytes)
        } else {
            memchr::memchr(b'\n', bytes)
        };
    }
    let mut quoted = false;
    let mut found = None;
    for at in memchr::memchr2_iter(b'"', b'\n', bytes) {
        if bytes[at] == b'"' {
            quoted = !quoted;
        } else if !quoted {
            found = Some(at);
            if !last {
                break;
            }
        }
    }
    found
}

/// The number of records that end in `bytes` (newlines outside quotes), which start at a
/// record's start.
fn records(bytes: &[u8]) -> usize {
    if memchr::memchr(b'"', bytes).is_none() {
        return bytecount::count(bytes, b'\n');
    }
    let mut quoted = false;
    let mut count = 0;
    for at in memchr::memchr2_iter(b'"', b'\n', bytes) {
        if bytes[at] == b'"' {
            quoted = !quoted;
        } else if !quoted {
            count += 1;
        }
    }
    count
}

/// Finds the first line of a CSV document that cannot be read (wrong field count, invalid
/// UTF-8), to say where polars' error is: line 1 is the header, the next is `first_line`. Only
/// called when reading failed or the counts do not add up, so its cost does not matter.
pub fn locate_csv_problem(bytes: &[u8], first_line: usize) -> Option<String> {
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
                // A line is a record: the header is line 1, the next one `first_line`.
                line = if line == 1 { first_line } else { line + 1 };
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

/// Writes `df` as CSV (when the path ends in `.csv`) or Parquet, one row group at a time, so that
/// only one group is ever copied and encoded in memory (polars' `finish` aligns and encodes the
/// whole table at once).
pub fn write_table(df: &mut DataFrame, path: &Path) -> Result<(), StageError> {
    let mut writer = TableWriter::create(path, df.schema())?;
    let mut offset = 0;
    while offset < df.height() {
        writer.write(&df.slice(offset as i64, ROW_GROUP))?;
        offset += ROW_GROUP;
    }
    writer.finish()
}

/// [`write_table`] of the rows of `df` that `keep` marks, without a copy of all of them: the kept
/// rows go to a [`TableWriter`] a row group's worth at a time.
pub fn write_table_kept(
    df: &DataFrame,
    keep: &BooleanChunked,
    path: &Path,
) -> Result<(), StageError> {
    let mut writer = TableWriter::create(path, df.schema())?;
    let mut offset = 0;
    while offset < df.height() {
        let part = df
            .slice(offset as i64, ROW_GROUP)
            .filter(&keep.slice(offset as i64, ROW_GROUP))
            .map_err(|e| cannot_write(path, e))?;
        writer.write(&part)?;
        offset += ROW_GROUP;
    }
    writer.finish()
}

/// Rows per Parquet row group (polars' default).
const ROW_GROUP: usize = 512 * 512;

fn cannot_write(path: &Path, e: PolarsError) -> StageError {
    StageError::new(format!("cannot write `{}`: {e}", path.display()))
}

/// A table written a piece at a time, as CSV (when the path ends in `.csv`) or Parquet, holding
/// at most a row group of it: the file is the same, byte for byte, as [`write_table`] of all the
/// pieces stacked. Parquet is Snappy-compressed, as pandas, pyarrow and Spark write by default:
/// zstd's files are a third smaller but take half as long again to write (scripts/bench-monthly).
pub struct TableWriter {
    path: std::path::PathBuf,
    sink: Sink,
}

enum Sink {
    Parquet {
        writer: Box<polars::io::parquet::write::BatchedWriter<std::io::BufWriter<std::fs::File>>>,
        /// Rows waiting for a whole row group.
        pending: DataFrame,
    },
    Csv(polars::io::csv::write::BatchedWriter<std::fs::File>),
}

impl TableWriter {
    /// Creates the file, for tables of `schema`.
    pub fn create(path: &Path, schema: &Schema) -> Result<Self, StageError> {
        let file = std::fs::File::create(path)
            .map_err(|e| StageError::new(format!("cannot create `{}`: {e}", path.display())))?;
        let sink = if is_csv(path) {
            CsvWriter::new(file)
                .include_header(true)
                .batched(schema)
                .map(Sink::Csv)
        } else {
            ParquetWriter::new(std::io::BufWriter::new(file))
                .with_compression(ParquetCompression::Snappy)
                .batched(schema)
                .map(|writer| Sink::Parquet {
                    writer: Box::new(writer),
                    pending: DataFrame::empty_with_schema(schema),
                })
        };
        Ok(TableWriter {
            path: path.to_path_buf(),
            sink: sink.map_err(|e| cannot_write(path, e))?,
        })
    }

    /// Appends the rows of `part`.
    pub fn write(&mut self, part: &DataFrame) -> Result<(), StageError> {
        let written = match &mut self.sink {
            Sink::Csv(writer) => {
                let mut part = part.clone();
                part.rechunk_mut_par();
                writer.write_batch(&part)
            }
            Sink::Parquet { writer, pending } => (|| {
                pending.vstack_mut(part)?;
                while pending.height() >= ROW_GROUP {
                    let mut group = pending.slice(0, ROW_GROUP);
                    group.rechunk_mut_par();
                    writer.write_batch(&group)?;
                    *pending = pending.slice(ROW_GROUP as i64, usize::MAX);
                }
                Ok(())
            })(),
        };
        written.map_err(|e| cannot_write(&self.path, e))
    }

    /// Writes what is left and closes the file.
    pub fn finish(mut self) -> Result<(), StageError> {
        let finished = match &mut self.sink {
            Sink::Csv(writer) => writer.finish(),
            Sink::Parquet { writer, pending } => (|| {
                if pending.height() > 0 {
                    pending.rechunk_mut_par();
                    writer.write_batch(pending)?;
                }
                writer.finish().map(|_| ())
            })(),
        };
        finished.map_err(|e| cannot_write(&self.path, e))
    }
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
    require_names(&present, columns, file)
}

/// [`require_columns`] of a table whose column names are `present`.
pub fn require_names<'a>(
    present: &[String],
    columns: impl IntoIterator<Item = (&'a str, String)>,
    file: &Path,
) -> Result<(), StageError> {
    for (column, pointer) in columns {
        if !present.iter().any(|p| p == column) {
            // The names come from the file: escaped, so that a header cannot drive the terminal.
            let shown: Vec<_> = present.iter().map(|c| crate::safe::escape(c)).collect();
            return Err(StageError::new(format!(
                "column `{}` (param `{}`) is not in `{}`; its columns are: {}",
                crate::safe::escape(column),
                crate::pointer::dotted(&pointer),
                crate::safe::escape(&file.to_string_lossy()),
                shown.join(", ")
            ))
            .at_param(pointer));
        }
    }
    Ok(())
}

pub(crate) fn cannot_read(path: &Path, e: PolarsError) -> StageError {
    StageError::new(format!(
        "cannot read Parquet file `{}`: {e}",
        path.display()
    ))
}

/// Runs a read of the Parquet file at `path`: polars panics on some corrupt files (a footer that
/// points past the data, as a file cut in the middle has), and that becomes an error naming the
/// file rather than an internal error naming none.
pub fn guarded<T>(path: &Path, read: impl FnOnce() -> PolarsResult<T>) -> Result<T, StageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(read) => read.map_err(|e| cannot_read(path, e)),
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
        locate_csv_problem(&std::fs::read(&path).unwrap(), 2)
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
        let bytes = std::fs::read(&path).unwrap();
        let text = CsvText {
            path: &path,
            bytes: &bytes,
            first_line: 2,
        };
        let fields = text.fields_at(&rows, &[2, 0]).unwrap();
        assert_eq!(fields.len(), rows.len() * 2);
        for (row, fields) in rows.iter().zip(fields.chunks(2)) {
            let expected = [format!("row {row}"), row.to_string()];
            assert_eq!(fields, expected.map(String::into_bytes));
        }
        assert!(text.fields_at(&[n], &[0]).is_err(), "past the end");
    }

    /// A table written in pieces of any size is the table written whole, as Parquet and CSV.
    #[test]
    fn pieces_make_the_whole_tables_file() {
        let n = ROW_GROUP + 54_321;
        let mut df = df!(
            "id" => (0..n as i64).collect::<Vec<_>>(),
            "x" => (0..n).map(|i| (i % 13 != 0).then_some(i as f64 / 7.0)).collect::<Vec<_>>(),
            "s" => (0..n).map(|i| format!("v{}", i % 31)).collect::<Vec<_>>(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for name in ["t.parquet", "t.csv"] {
            let whole = dir.path().join(format!("whole-{name}"));
            write_table(&mut df, &whole).unwrap();
            let pieces = dir.path().join(format!("pieces-{name}"));
            let mut writer = TableWriter::create(&pieces, df.schema()).unwrap();
            let mut offset = 0;
            for (k, size) in [0usize, 1, 99_999, 7, 200_000].iter().cycle().enumerate() {
                if offset >= n {
                    break;
                }
                let size = if k > 20 { n } else { *size };
                writer.write(&df.slice(offset as i64, size)).unwrap();
                offset += size;
            }
            writer.finish().unwrap();
            assert!(
                std::fs::read(&whole).unwrap() == std::fs::read(&pieces).unwrap(),
                "{name}: the files differ"
            );
        }
    }

    /// Chunks hold whole records, quoted newlines and all, behind the header, and know the
    /// line of their first record; together they are the file.
    #[test]
    fn blank_lines_before_the_header_are_skipped_as_polars_skips_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, "\r\n\na,b\n1,2\n").unwrap();
        assert_eq!(columns_of(&path).unwrap(), ["a", "b"]);
        assert_eq!(read_table(&path).unwrap().get_column_names(), ["a", "b"]);
        check_text(&path, b"\n\na,b\n").unwrap();
        assert!(check_text(&path, b"\n\xff,b\n").is_err());
        std::fs::write(&path, "\n\n").unwrap();
        assert!(columns_of(&path)
            .unwrap_err()
            .message
            .ends_with("is empty: a CSV file needs at least a header line"));
    }

    #[test]
    fn chunks_split_between_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let mut text = String::from("a,\"b\nB\"\r\n");
        for i in 0..300 {
            match i % 4 {
                0 => text.push_str(&format!("{i},\"x\ny,{i}\"\r\n")),
                1 => text.push_str(&format!("{i},\"\"\"q\"\"\"\n")),
                _ => text.push_str(&format!("{i},plain {i}\n")),
            }
        }
        text.push_str("300,last");
        std::fs::write(&path, &text).unwrap();
        let header = "a,\"b\nB\"\r\n";
        for target in [1, 7, 100, 1 << 20] {
            let mut chunks = CsvChunks::open(&path, target).unwrap();
            let mut body = String::new();
            let mut line = 2;
            let mut count = 0;
            while let Some(chunk) = chunks.next_chunk().unwrap() {
                let chunk_text = String::from_utf8(chunk.bytes).unwrap();
                assert!(chunk_text.starts_with(header), "{chunk_text}");
                let records = &chunk_text[header.len()..];
                assert_eq!(chunk.first_line, line, "target {target}");
                let first: usize = records.split(',').next().unwrap().parse().unwrap();
                assert_eq!(first + 2, line, "line numbers count records");
                line += records::records_in(records.as_bytes());
                body.push_str(records);
                count += 1;
            }
            assert_eq!(format!("{header}{body}"), text, "target {target}");
            if target == 1 {
                assert!(count > 100, "{count} chunks of about a record");
            }
        }
        // A file of just a header is one chunk of no records; an empty file, one empty chunk.
        std::fs::write(&path, "a,b").unwrap();
        let mut chunks = CsvChunks::open(&path, 10).unwrap();
        assert_eq!(chunks.next_chunk().unwrap().unwrap().bytes, b"a,b");
        assert!(chunks.next_chunk().unwrap().is_none());
        std::fs::write(&path, "").unwrap();
        let mut chunks = CsvChunks::open(&path, 10).unwrap();
        assert!(chunks.next_chunk().unwrap().unwrap().bytes.is_empty());
        assert!(chunks.next_chunk().unwrap().is_none());
    }

    mod records {
        /// Records ending in `bytes`, the last one even without its newline.
        pub fn records_in(bytes: &[u8]) -> usize {
            let ended = super::super::records(bytes);
            let open_tail = !bytes.is_empty() && !bytes.ends_with(b"\n");
            ended + usize::from(open_tail)
        }
    }

    #[test]
    fn problems_in_a_chunk_are_named_by_the_files_line() {
        assert_eq!(
            locate_csv_problem(b"a,b\n1,2\n3\n", 1000),
            Some("line 1001: expected 2 fields (as in the header), found 1".into())
        );
    }
}
