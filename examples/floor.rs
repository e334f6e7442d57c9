//! The floor `scripts/bench` holds a built-in stage against: what polars alone takes to read the
//! stage's inputs and write a table as large as its output, with the polars imba is built with
//! and nothing else (no cleaning, no summary, no hashing).
//!
//! - A CSV is read with types inferred from its first rows, a value that does not parse becoming
//!   null (as `clean` makes it); a Parquet file is read whole.
//! - The table written, as Snappy Parquet, is what was read (`clean`'s floor: read the CSV, write
//!   all its rows), or with `--write-like TABLE` that Parquet table, read first and not timed (the
//!   stage's own output: `aggregate` and `feature` write far fewer rows than they read).
//!
//! ```sh
//! cargo run --release --example floor -- orders.csv
//! cargo run --release --example floor -- --write-like out/aggregated/user_imp.parquet out/cleaned/orders.parquet
//! ```
//!
//! Prints `read SECONDS write SECONDS` on one line.

use std::path::Path;
use std::time::Instant;

use imba_stages::polars::prelude::*;

fn read(path: &Path) -> PolarsResult<DataFrame> {
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if csv {
        CsvReadOptions::default()
            .with_has_header(true)
            .with_ignore_errors(true)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))?
            .finish()
    } else {
        ParquetReader::new(std::fs::File::open(path)?).finish()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let like = match args.iter().position(|a| a == "--write-like") {
        Some(i) if i + 1 < args.len() => {
            let like = args.remove(i + 1);
            args.remove(i);
            Some(read(Path::new(&like))?)
        }
        Some(_) => return Err("--write-like needs a Parquet table".into()),
        None => None,
    };
    if args.is_empty() {
        return Err("usage: floor [--write-like TABLE.parquet] INPUT...".into());
    }
    let started = Instant::now();
    let mut tables = Vec::new();
    for input in &args {
        tables.push(read(Path::new(input))?);
    }
    let read_seconds = started.elapsed().as_secs_f64();
    let mut written = match like {
        Some(like) => like,
        None => tables.swap_remove(0),
    };
    drop(tables);
    let out = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    ParquetWriter::new(out.as_file())
        .with_compression(ParquetCompression::Snappy)
        .finish(&mut written)?;
    println!(
        "read {read_seconds:.3} write {:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
