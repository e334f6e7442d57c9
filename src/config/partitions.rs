//! `partitions:`: named sets of keys (months, days, regions) that partitioned stages are
//! expanded over, one instance per key, in key order (dates by date, others as declared).

use serde_json::{Map, Value as Json};

use super::template::{Context, Templates};
use super::yaml::{Key, Node, Value};
use crate::diagnostic::Diagnostic;
use crate::model::{Discover, PartitionSet, PatternPart};

/// What `discover:` patterns matched, found by the caller (which lists the store) before this
/// load: by set name, the matching paths. A set missing here is left without keys.
pub struct Found<'a> {
    pub workdir: &'a std::path::Path,
    pub paths: &'a std::collections::BTreeMap<String, Vec<String>>,
}

/// The most keys one set may have: a typo in a range (`from: 1017-01`) must not expand into
/// millions of stages.
const MAX_KEYS: usize = 10_000;

/// Resolves the `partitions:` map (its templates see the vars), reporting every problem. The
/// names of sets with problems go to `failed`, so that templates using them say nothing more.
pub fn resolve(
    node: &Node,
    templates: &Templates,
    ctx: &Context,
    vars: &Map<String, Json>,
    found: &Found,
    failed: &mut Vec<String>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<PartitionSet> {
    let mut sets = Vec::new();
    if vars.contains_key("partitions") {
        diagnostics.push(
            Diagnostic::error(
                "a pipeline with `partitions:` cannot have a var called `partitions`",
            )
            .at(
                node.span,
                "`{{ partitions.NAME.all }}` names these sets' keys",
            )
            .help("rename the var"),
        );
    }
    let Value::Map(entries) = &node.value else {
        diagnostics.push(
            Diagnostic::error("`partitions` must be a map of names to partition sets")
                .at(node.span, "expected a map"),
        );
        return sets;
    };
    for (name, spec) in entries {
        let before = diagnostics.len();
        check_name(name, vars, diagnostics);
        let Some(rendered) = templates.render_node(spec, ctx, diagnostics) else {
            failed.push(name.name.clone());
            continue;
        };
        let mut discover = None;
        let keys = match rendered.as_map() {
            Some(fields) => keys_of(name, &rendered, fields, found, &mut discover, diagnostics),
            None => {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "partition set `{}` must be a map with `values`, `range` or `discover`",
                        name.name
                    ))
                    .at(spec.span, format!("found {}", rendered.kind())),
                );
                None
            }
        };
        match (keys, diagnostics.len() == before) {
            (Some(keys), true) => sets.push(PartitionSet {
                name: name.name.clone(),
                keys,
                discover,
            }),
            _ => failed.push(name.name.clone()),
        }
    }
    sets
}

fn check_name(name: &Key, vars: &Map<String, Json>, diagnostics: &mut Vec<Diagnostic>) {
    let valid = name
        .name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        diagnostics.push(
            Diagnostic::error(format!("invalid partition set name `{}`", name.name))
                .at(name.span, "not a template variable name")
                .help("the name is how templates say the key (`{{ month }}`): letters, digits and `_`, not starting with a digit"),
        );
    } else if name.name == "partitions" {
        diagnostics.push(
            Diagnostic::error("a partition set cannot be called `partitions`")
                .at(
                    name.span,
                    "templates say `{{ partitions.NAME.all }}` for every set's keys",
                )
                .help("call it after what its keys are: `month`, `day`, `region`"),
        );
    } else if vars.contains_key(&name.name) {
        diagnostics.push(
            Diagnostic::error(format!(
                "partition set `{}` has the name of a var",
                name.name
            ))
            .at(name.span, "`{{ … }}` could not tell them apart")
            .help("rename the var or the partition set"),
        );
    }
}

/// The keys of one set, from exactly one of `values:`, `range:` and `discover:`.
fn keys_of(
    name: &Key,
    node: &Node,
    fields: &[(Key, Node)],
    found: &Found,
    discover: &mut Option<Discover>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Vec<String>> {
    let mut given: Vec<(&Key, &Node)> = Vec::new();
    for (key, value) in fields {
        match key.name.as_str() {
            "values" | "range" | "discover" => given.push((key, value)),
            _ => diagnostics.push(super::raw::unknown_key(
                key,
                &["discover", "range", "values"],
                "in a partition set",
            )),
        }
    }
    match given.as_slice() {
        [(key, value)] => match key.name.as_str() {
            "values" => listed(value, diagnostics),
            "range" => ranged(value, diagnostics),
            _ => {
                *discover = Some(pattern(name, value, found.workdir, diagnostics)?);
                match found.paths.get(&name.name) {
                    Some(paths) => discovered(name, discover.as_ref()?, paths, diagnostics),
                    // Not listed yet: the caller lists its prefix and loads again.
                    None => Some(Vec::new()),
                }
            }
        },
        [] => {
            diagnostics.push(
                Diagnostic::error(format!(
                    "partition set `{}` has none of `values`, `range` and `discover`",
                    name.name
                ))
                .at(node.span, "no keys here")
                .help("e.g. `values: [2017-01, 2017-02]`, `range: {from: 2017-01, to: 2017-12}` or `discover: \"raw/{month}/orders.csv\"`"),
            );
            None
        }
        [(first, _), rest @ ..] => {
            let mut diagnostic = Diagnostic::error(format!(
                "partition set `{}` has {}: it takes one of them",
                name.name,
                super::raw::list(
                    &given
                        .iter()
                        .map(|(k, _)| k.name.as_str())
                        .collect::<Vec<_>>()
                )
                .replace(" or ", " and ")
            ))
            .at(first.span, "one");
            for (key, _) in rest {
                diagnostic = diagnostic.also(key.span, "another");
            }
            diagnostics.push(diagnostic);
            None
        }
    }
}

/// `discover: "raw/{month}/orders.csv"`: the set's name in braces once, as (part of) one path
/// segment after a fixed prefix; `*` stands for any part of a segment.
fn pattern(
    name: &Key,
    node: &Node,
    workdir: &std::path::Path,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Discover> {
    let Some(text) = node.as_str() else {
        diagnostics.push(
            Diagnostic::error("`discover` must be a path pattern")
                .at(node.span, format!("found {}", node.kind())),
        );
        return None;
    };
    let placeholder = format!("{{{}}}", name.name);
    let fail = |message: String, label: &str| {
        Diagnostic::error(message)
            .at(node.span, label.to_owned())
            .help(format!(
            "e.g. `discover: \"raw/{placeholder}/orders.csv\"`: each path that matches gives a key"
        ))
    };
    let Some(at) = text.find(&placeholder) else {
        diagnostics.push(fail(
            format!("`discover` must hold `{placeholder}`, where the key is in each path"),
            "no key here",
        ));
        return None;
    };
    if text[at + placeholder.len()..].contains(&placeholder) {
        diagnostics.push(fail(
            format!("`discover` holds `{placeholder}` twice"),
            "once only",
        ));
        return None;
    }
    // The prefix listed: up to the folder holding the first `*` or the key.
    let first = text.find('*').map_or(at, |star| star.min(at));
    let cut = text[..first].rfind('/').map_or(0, |i| i + 1);
    let (prefix, rest) = text.split_at(cut);
    let mut parts = Vec::new();
    let mut text_part = String::new();
    let mut remaining = rest;
    while !remaining.is_empty() {
        if let Some(after) = remaining.strip_prefix(placeholder.as_str()) {
            parts.push(PatternPart::Text(std::mem::take(&mut text_part)));
            parts.push(PatternPart::Key);
            remaining = after;
        } else if let Some(after) = remaining.strip_prefix('*') {
            parts.push(PatternPart::Text(std::mem::take(&mut text_part)));
            parts.push(PatternPart::Any);
            remaining = after;
        } else if remaining.starts_with('{') || remaining.starts_with('}') {
            diagnostics.push(fail(
                format!("`discover` holds a brace that is not `{placeholder}`"),
                "only the set's own name goes in braces",
            ));
            return None;
        } else {
            let c = remaining.chars().next().unwrap_or_default();
            text_part.push(c);
            remaining = &remaining[c.len_utf8()..];
        }
    }
    parts.push(PatternPart::Text(text_part));
    parts.retain(|p| *p != PatternPart::Text(String::new()));
    let prefix = if prefix.is_empty() { "./" } else { prefix };
    if let Err(e) = crate::model::Declared::parse(prefix, workdir) {
        diagnostics.push(fail(
            format!("`discover` has an invalid folder `{prefix}`: {e}"),
            "here",
        ));
        return None;
    }
    Some(Discover {
        pattern: text.to_owned(),
        prefix: prefix.to_owned(),
        parts,
        span: node.span,
    })
}

/// The keys of the paths `discover` matched: each a valid key (a date-like one a real date),
/// none from two places (several files in one key's folder, `raw/{month}/part-*.csv`, are one
/// place); dates in date order, others in natural order (`w2` before `w10`).
fn discovered(
    name: &Key,
    discover: &Discover,
    paths: &[String],
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Vec<String>> {
    let before = diagnostics.len();
    // Each key, with the path that first gave it and that path's folder of the key.
    let mut keys: std::collections::BTreeMap<String, (&str, &str)> =
        std::collections::BTreeMap::new();
    for path in paths {
        let Some((key, folder)) = path
            .strip_prefix(discover.prefix.as_str())
            .and_then(|rest| discover.locate(rest))
            .map(|(key, end)| (key, &path[..discover.prefix.len() + end]))
        else {
            continue;
        };
        let invalid = |why: String| {
            Diagnostic::error(format!("{why}, in `{path}`")).at(
                discover.span,
                format!("partition set `{}` found it here", name.name),
            )
        };
        if let Err(why) = check_key(&key) {
            diagnostics.push(invalid(why));
            continue;
        }
        if looks_like_date(&key) && Date::parse(&key).is_none() {
            diagnostics.push(invalid(format!(
                "partition key `{key}` is not a valid {}",
                if key.len() == 7 { "month" } else { "day" }
            )));
            continue;
        }
        if let Some((first, first_folder)) = keys.get(key.as_str()) {
            if *first_folder == folder {
                continue;
            }
            diagnostics.push(
                Diagnostic::error(format!(
                    "two paths give partition `{key}` of `{}`: `{first}` and `{path}`",
                    name.name
                ))
                .at(discover.span, "the pattern matches both")
                .help("make the pattern match one path per key"),
            );
            continue;
        }
        keys.insert(key, (path, folder));
    }
    if diagnostics.len() > before {
        return None;
    }
    if keys.is_empty() {
        diagnostics.push(
            Diagnostic::error(format!(
                "partition set `{}` found no path matching `{}`",
                name.name, discover.pattern
            ))
            .at(discover.span, "nothing matches")
            .note(match paths.len() {
                0 => format!("nothing is under `{}`", discover.prefix),
                1 => format!("1 file is under `{}`", discover.prefix),
                n => format!("{n} files are under `{}`", discover.prefix),
            }),
        );
        return None;
    }
    let mut keys: Vec<String> = keys.into_keys().collect();
    if keys.iter().all(|k| Date::parse(k).is_some()) {
        keys.sort_by_key(|k| Date::parse(k));
    } else {
        keys.sort_by_key(|k| natural(k));
    }
    if keys.len() > MAX_KEYS {
        diagnostics.push(
            Diagnostic::error(format!("`discover` found more than {MAX_KEYS} keys"))
                .at(discover.span, "here"),
        );
        return None;
    }
    Some(keys)
}

/// `values: [...]`: each a key (letters, digits, `.`, `_`, `-`), none twice; dates are checked
/// and ordered by date.
fn listed(node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Vec<String>> {
    let Value::Seq(items) = &node.value else {
        diagnostics.push(
            Diagnostic::error("`values` must be a list of partition keys")
                .at(node.span, format!("found {}", node.kind())),
        );
        return None;
    };
    if items.is_empty() {
        diagnostics.push(
            Diagnostic::error("`values` is empty").at(node.span, "a partition set needs a key"),
        );
        return None;
    }
    let before = diagnostics.len();
    let mut keys: Vec<(String, &Node)> = Vec::new();
    for item in items {
        let text = match &item.value {
            Value::String(s) => s.text.clone(),
            Value::Int(n) => n.to_string(),
            _ => {
                diagnostics.push(
                    Diagnostic::error("a partition key must be a string or a number")
                        .at(item.span, format!("found {}", item.kind())),
                );
                continue;
            }
        };
        if let Err(why) = check_key(&text) {
            diagnostics.push(Diagnostic::error(why).at(item.span, "here"));
            continue;
        }
        if looks_like_date(&text) && Date::parse(&text).is_none() {
            diagnostics.push(
                Diagnostic::error(format!("partition key `{text}` is not a valid date"))
                    .at(item.span, "no such month or day"),
            );
            continue;
        }
        if let Some((_, first)) = keys.iter().find(|(k, _)| *k == text) {
            diagnostics.push(
                Diagnostic::error(format!("partition key `{text}` is listed twice"))
                    .at(item.span, "again here")
                    .also(first.span, "first here"),
            );
            continue;
        }
        keys.push((text, item));
    }
    if diagnostics.len() > before {
        return None;
    }
    // Dates (all of them, checked above) in date order; anything else as declared.
    let dated: Option<Vec<(Date, String)>> = keys
        .iter()
        .map(|(k, _)| Date::parse(k).map(|d| (d, k.clone())))
        .collect();
    match dated {
        Some(mut dated) => {
            dated.sort();
            Some(dated.into_iter().map(|(_, k)| k).collect())
        }
        None => Some(keys.into_iter().map(|(k, _)| k).collect()),
    }
}

/// `range: {from, to, every}`: every month (`YYYY-MM`) or day (`YYYY-MM-DD`) from `from` to
/// `to`, both included.
fn ranged(node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Vec<String>> {
    let Some(fields) = node.as_map() else {
        diagnostics.push(
            Diagnostic::error("`range` must be a map with `from` and `to`")
                .at(node.span, format!("found {}", node.kind())),
        );
        return None;
    };
    let mut from = None;
    let mut to = None;
    let mut every = None;
    for (key, value) in fields {
        let text = value.as_str().map(str::to_owned);
        match key.name.as_str() {
            "from" => from = Some((text, value)),
            "to" => to = Some((text, value)),
            "every" => every = Some((text, value)),
            _ => diagnostics.push(super::raw::unknown_key(
                key,
                &["every", "from", "to"],
                "in a range",
            )),
        }
    }
    let from = bound("from", from, node, diagnostics);
    let to = bound("to", to, node, diagnostics);
    let ((from, from_at), (to, to_at)) = (from?, to?);
    if from.day.is_some() != to.day.is_some() {
        diagnostics.push(
            Diagnostic::error("`range.from` and `range.to` must both be months or both be days")
                .at(to_at.span, "here")
                .also(from_at.span, "and here"),
        );
        return None;
    }
    let unit = if from.day.is_some() { "day" } else { "month" };
    if let Some((text, at)) = every {
        if text.as_deref() != Some(unit) {
            diagnostics.push(
                Diagnostic::error(format!("`range.every` must be `{unit}` for these bounds"))
                    .at(at.span, "here")
                    .help("months (`2017-01`) step by `month`, days (`2017-01-31`) by `day`"),
            );
            return None;
        }
    }
    if to < from {
        diagnostics.push(
            Diagnostic::error("`range.to` is before `range.from`")
                .at(to_at.span, "here")
                .also(from_at.span, "from here"),
        );
        return None;
    }
    let mut keys = Vec::new();
    let mut at = from;
    while at <= to {
        if keys.len() == MAX_KEYS {
            diagnostics.push(
                Diagnostic::error(format!("`range` has more than {MAX_KEYS} keys"))
                    .at(node.span, "here"),
            );
            return None;
        }
        keys.push(at.to_string());
        at = at.next();
    }
    Some(keys)
}

/// `range.from` or `range.to` as a date.
fn bound<'a>(
    field: &str,
    found: Option<(Option<String>, &'a Node)>,
    range: &Node,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<(Date, &'a Node)> {
    match found {
        None => {
            diagnostics.push(
                Diagnostic::error(format!("`range` needs `{field}`"))
                    .at(range.span, "e.g. `{from: 2017-01, to: 2017-12}`"),
            );
            None
        }
        Some((text, at)) => match text.as_deref().and_then(Date::parse) {
            Some(date) => Some((date, at)),
            None => {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "`range.{field}` must be a month (`2017-01`) or a day (`2017-01-31`)"
                    ))
                    .at(at.span, "not a valid month or day"),
                );
                None
            }
        },
    }
}

/// A key for natural ordering: runs of digits compare as numbers (`w2` < `w10`), the rest as
/// text.
fn natural(key: &str) -> Vec<(String, u128)> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut digits = String::from(c);
            while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                digits.push(d);
                chars.next();
            }
            parts.push((
                std::mem::take(&mut text),
                digits.parse().unwrap_or(u128::MAX),
            ));
        } else {
            text.push(c);
        }
    }
    parts.push((text, 0));
    parts
}

/// A partition key is part of stage names and paths: letters, digits, `.`, `_`, `-`.
fn check_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    match valid {
        true => Ok(()),
        false => Err(format!(
            "partition key `{key}` may hold only letters, digits, `.`, `_` and `-`"
        )),
    }
}

/// `dddd-dd` or `dddd-dd-dd`: meant as a month or a day, so checked as one.
fn looks_like_date(key: &str) -> bool {
    let shape = |key: &str, len: usize| {
        key.len() == len
            && key.chars().enumerate().all(|(i, c)| {
                if [4, 7].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_digit()
                }
            })
    };
    shape(key, 7) || shape(key, 10)
}

/// A month, or a day of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Date {
    year: u32,
    month: u32,
    day: Option<u32>,
}

impl Date {
    fn parse(text: &str) -> Option<Date> {
        if !looks_like_date(text) {
            return None;
        }
        let year = text[0..4].parse().ok()?;
        let month = text[5..7].parse().ok()?;
        let day = match text.len() {
            10 => Some(text[8..10].parse().ok()?),
            _ => None,
        };
        let date = Date { year, month, day };
        let valid = (1..=12).contains(&month)
            && day.is_none_or(|d| (1..=days_in(year, month)).contains(&d));
        valid.then_some(date)
    }

    fn next(self) -> Date {
        match self.day {
            Some(day) if day < days_in(self.year, self.month) => Date {
                day: Some(day + 1),
                ..self
            },
            day => {
                let (year, month) = match self.month {
                    12 => (self.year + 1, 1),
                    m => (self.year, m + 1),
                };
                Date {
                    year,
                    month,
                    day: day.map(|_| 1),
                }
            }
        }
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)?;
        match self.day {
            Some(day) => write!(f, "-{day:02}"),
            None => Ok(()),
        }
    }
}

fn days_in(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_days_step_across_years_and_leap_days() {
        let d = Date::parse("2016-12").unwrap();
        assert_eq!(d.next().to_string(), "2017-01");
        let d = Date::parse("2016-02-28").unwrap();
        assert_eq!(d.next().to_string(), "2016-02-29");
        assert_eq!(d.next().next().to_string(), "2016-03-01");
        assert_eq!(Date::parse("2017-02-29"), None);
        assert_eq!(
            Date::parse("2000-02-29").map(|d| d.to_string()).as_deref(),
            Some("2000-02-29")
        );
        assert_eq!(Date::parse("1900-02-29"), None);
        assert_eq!(Date::parse("2017-13"), None);
        assert_eq!(Date::parse("2017-00"), None);
        assert!(Date::parse("2017-05").unwrap() < Date::parse("2017-11").unwrap());
    }

    #[test]
    fn keys_that_are_not_dates_sort_naturally() {
        let mut keys = vec!["w10", "w2", "w1", "eu", "w02x"];
        keys.sort_by_key(|k| natural(k));
        assert_eq!(keys, ["eu", "w1", "w2", "w02x", "w10"]);
    }
}
