//! Reading the input: a CSV's cast columns parsed while reading, and the text of values that
//! did not parse, for `cast` to retry and count.

use std::collections::BTreeMap;

use polars::prelude::*;

use super::*;

/// The table to clean, and for some of its int64/float64 cast columns (parsed while reading)
/// their text as read.
pub(super) struct Input {
    pub(super) df: DataFrame,
    pub(super) text: BTreeMap<String, Text>,
}

/// The text of a column parsed while reading.
pub(super) enum Text {
    /// All of it.
    Full(Series),
    /// Row → text of just the values that did not parse (empty fields left out).
    Unparsed(Vec<(IdxSize, String)>),
}

/// Reads the input. A CSV's int64/float64 cast columns are parsed while reading (the cast is then
/// a no-op) and nothing else is held twice: one lenient typed read, plus the text of just the
/// values that came out null or NaN, for `cast` to tell an empty field from a value that did not
/// parse, retry it leniently and count it. Anything unusual (no cast, a bool or date cast, a
/// missing column, a broken file) takes the text path, whose errors say where the problem is.
pub(super) fn read_input(
    input: &std::path::Path,
    params: &CleanParams,
    steps: &mut crate::steps::Steps,
) -> Result<Input, StageError> {
    if !crate::io::table::is_csv(input) {
        let df = read_table(input)?;
        steps.done("read");
        return Ok(Input {
            df,
            text: BTreeMap::new(),
        });
    }
    let map = crate::io::table::map_csv(input)?;
    let text = crate::io::table::CsvText {
        path: input,
        bytes: map.as_deref().unwrap_or_default(),
        first_line: 2,
    };
    read_csv_input(&text, params, steps)
}

/// [`read_input`] of a CSV document: a whole file or a chunk of one.
pub(super) fn read_csv_input(
    csv: &crate::io::table::CsvText,
    params: &CleanParams,
    steps: &mut crate::steps::Steps,
) -> Result<Input, StageError> {
    let text_path = || {
        Ok(Input {
            df: csv.read_strings()?,
            text: BTreeMap::new(),
        })
    };
    if params.cast.is_empty() {
        return text_path();
    }
    let types: Vec<(String, DataType)> = params
        .cast
        .iter()
        .filter_map(|(column, to)| Some((column.clone(), to.number_dtype()?)))
        .collect();
    if types.is_empty() {
        return text_path();
    }
    // Lenient at once: a strict read that fails at the first bad value would parse the file
    // again (a file `clean` is given usually has one), and the text of the nulls tells an empty
    // field from a value that did not parse (scripts/bench; docs/performance.md, "Floors").
    let df = match csv.read_typed(&types, true) {
        Ok(df) => df,
        Err(_) => return text_path(),
    };
    steps.done("typed read");
    // The columns must all be there (else the text path reports the missing one).
    if !types.iter().all(|(c, _)| df.column(c).is_ok()) {
        return text_path();
    }
    // The shape check and the search for the nulls' text are passes of their own over the
    // text: the check runs on another thread meanwhile (the fields read are used only if the
    // check finds the text plain, where a row is a line).
    let (shape, nulls) = crate::threads::beside(
        || csv.check_shape(df.width(), df.height()),
        || Nulls::find(csv, &df, &types),
    );
    let plain = shape?;
    let Nulls {
        missing,
        rows,
        fields,
    } = nulls?;
    steps.done("shape check and the nulls");
    let mut text = BTreeMap::new();
    if missing.is_empty() {
        return Ok(Input { df, text });
    }
    if plain {
        // Just the lines with a null, split by hand.
        let fields = fields?;
        let width = missing.len();
        for (k, (name, nulls)) in missing.into_iter().enumerate() {
            // The rows are ascending, as are this column's nulls among them.
            let mut at = 0;
            let mut unparsed = Vec::new();
            for row in nulls {
                while rows[at] != row {
                    at += 1;
                }
                let value = fields[at * width + k];
                if !value.is_empty() {
                    unparsed.push((row, String::from_utf8_lossy(value).into_owned()));
                }
            }
            text.insert(name, Text::Unparsed(unparsed));
        }
    } else {
        let names: Vec<String> = missing.into_iter().map(|(name, _)| name).collect();
        let strings = csv.read_text_columns(&names)?;
        if strings.height() != df.height() {
            return text_path();
        }
        for column in strings.into_columns() {
            text.insert(
                column.name().to_string(),
                Text::Full(column.take_materialized_series()),
            );
        }
    }
    steps.done("text of the nulls");
    Ok(Input { df, text })
}

/// The rows where the typed columns came out null (or NaN), and those rows' fields in those
/// columns as the text has them, if it is plain.
struct Nulls<'a> {
    /// Per column with any, its name and the rows.
    missing: Vec<(String, Vec<IdxSize>)>,
    /// The rows of all of them, ascending.
    rows: Vec<IdxSize>,
    /// Row by row, the field of each column of `missing` (read as if the text were plain).
    fields: Result<Vec<&'a [u8]>, StageError>,
}

impl<'a> Nulls<'a> {
    fn find(
        csv: &crate::io::table::CsvText<'a>,
        df: &DataFrame,
        types: &[(String, DataType)],
    ) -> Result<Nulls<'a>, StageError> {
        // Where a value is null it was empty or did not parse: its text is needed (and a NaN's).
        let mut missing = Vec::new();
        for (name, _) in types {
            let column = df.column(name).map_err(err)?;
            let mut unread = column.is_null();
            if let Ok(floats) = column.f64() {
                // "nan" parses, but counts as a value that could not be cast, named in errors.
                unread = unread | floats.is_nan().fill_null_with_values(false).map_err(err)?;
            }
            let nulls = crate::io::rows::true_rows(&unread);
            if !nulls.is_empty() {
                missing.push((name.clone(), nulls));
            }
        }
        let mut rows: Vec<IdxSize> = missing
            .iter()
            .flat_map(|(_, r)| r.iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let positions: Vec<usize> = missing
            .iter()
            .map(|(name, _)| df.get_column_index(name).unwrap_or(usize::MAX))
            .collect();
        let fields = if rows.is_empty() {
            Ok(Vec::new())
        } else {
            csv.fields_at(&rows, &positions)
        };
        Ok(Nulls {
            missing,
            rows,
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(on_cast_error: &str) -> CleanParams {
        serde_json::from_value(json!({
            "cast": {"id": "int64", "n": "int64", "x": "float64", "s": "string"},
            "on_cast_error": on_cast_error,
            "domain": {"n": {"between": [-5, 8]}},
            "iqr": {"columns": ["x"]},
            "dropna": {"subset": ["n", "x"], "how": "all"},
            "dedup": true,
        }))
        .unwrap()
    }

    /// Reads `csv` the way the stage does (typed while reading, lenient, sparse text) and the
    /// text way, cleans both, and checks they agree exactly; returns how the stage read it.
    fn agree(csv: &str, on_cast_error: &str) -> (Json, bool, Option<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, csv).unwrap();
        let params = params(on_cast_error);
        let input = read_input(&path, &params, &mut crate::steps::Steps::start("clean")).unwrap();
        let typed = input.df.column("id").unwrap().dtype() == &DataType::Int64;
        let sparse = input
            .text
            .values()
            .next()
            .map(|t| matches!(t, Text::Unparsed(_)));
        let a = clean_input(input, &params, &path);
        let b = clean(read_table(&path).unwrap(), &params, &path);
        match (a, b) {
            (Ok((a, sa)), Ok((b, sb))) => {
                assert_eq!(sa, sb);
                assert!(a.equals_missing(&b), "{a}\n{b}");
                (sa, typed, sparse)
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.message, b.message);
                (json!(a.message), typed, sparse)
            }
            (a, b) => panic!("{a:?}\n{b:?}"),
        }
    }

    const VALID: &str =
        "id,n,x,s\n1,5,1.5,a\n2,,NaN,b\n3,-2,,a\n3,-2,,a\n4,9,100.0,c\n5,3,2.25,\n6,4,-0.5,a\n7,2,3,b\n";
    const DIRTY: &str =
        "id,n,x,s\n1,5,1.5,a\n2,7.0,nan,b\n3, 4 ,,a\n3,x,,a\n,9,100.0,c\n5,3,2.x,\n6,4,-0.5,a\n7,2,3,b\n6,4,-0.5,a";

    /// Every value parses: one typed read, and the text of just the lines with an empty field
    /// or a NaN (never the whole column).
    #[test]
    fn a_clean_file_is_read_typed_once() {
        let (summary, typed, sparse) = agree(VALID, "null");
        assert!(typed);
        assert_eq!(sparse, Some(true));
        assert_eq!(
            summary["cast_nulls"]["x"], 1,
            "NaN counts as a value that could not be cast"
        );
    }

    /// Values that do not parse: a lenient typed read plus the text of just those lines.
    #[test]
    fn unparsed_values_are_read_again_from_their_lines() {
        let (summary, typed, sparse) = agree(DIRTY, "null");
        assert!(typed);
        assert_eq!(sparse, Some(true));
        assert_eq!(
            summary["cast_nulls"],
            json!({"id": 0, "n": 1, "x": 2, "s": 0})
        );
        agree(DIRTY, "drop");
        let (message, _, _) = agree(DIRTY, "fail");
        assert!(
            message.as_str().unwrap().ends_with(
                "line 3: cannot cast \"nan\" in column `x` to float64 (on_cast_error: fail)"
            ),
            "{message}"
        );
        // CRLF line ends.
        agree(&DIRTY.replace('\n', "\r\n"), "null");
    }

    /// Quotes (or blank lines) make line numbers and rows part ways: the whole column is read
    /// as text instead.
    #[test]
    fn quoted_files_read_whole_columns_as_text() {
        let quoted = DIRTY.replace("6,4,-0.5,a\n", "6,4,-0.5,\"a,\nb\"\n");
        let (_, typed, sparse) = agree(&quoted, "null");
        assert!(typed);
        assert_eq!(sparse, Some(false));
        let (_, _, sparse) = agree(&DIRTY.replace("\n5,", "\n\n5,"), "null");
        assert_eq!(sparse, Some(false));
    }
}
