//! A stage's `resources:`, `retries:` and `timeout:`, read into [`Limits`]: every problem at
//! its span, all at once.

use std::time::Duration;

use crate::diagnostic::Diagnostic;
use crate::model::{Limits, Retries};

use super::yaml::{Node, Value};

/// Keys of `resources:`.
pub const RESOURCES_KEYS: &[&str] = &["cpus", "memory"];
/// Keys of `retries:`.
pub const RETRIES_KEYS: &[&str] = &["attempts", "backoff"];

/// The most attempts a stage may ask for.
const MAX_ATTEMPTS: i64 = 100;

/// The stage's limits from its (rendered) `resources`, `retries` and `timeout` nodes.
pub fn parse(
    resources: Option<&Node>,
    retries: Option<&Node>,
    timeout: Option<&Node>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Limits {
    let mut limits = Limits::default();
    if let Some(node) = resources {
        limits.resources_span = Some(node.span);
        read_resources(node, &mut limits, diagnostics);
    }
    if let Some(node) = retries {
        if let Some(retries) = read_retries(node, diagnostics) {
            limits.retries = retries;
        }
    }
    if let Some(node) = timeout {
        limits.timeout = duration(node, "timeout", false, diagnostics);
    }
    limits
}

fn read_resources(node: &Node, limits: &mut Limits, diagnostics: &mut Vec<Diagnostic>) {
    let Some(entries) = node.as_map() else {
        diagnostics.push(
            Diagnostic::error(format!("`resources` must be a map, found {}", node.kind()))
                .at(node.span, "expected `{cpus: 2, memory: 4G}`"),
        );
        return;
    };
    for (key, value) in entries {
        match key.name.as_str() {
            "cpus" => match integer(value) {
                Some(n) if (1..=4096).contains(&n) => limits.cpus = Some(n as u32),
                Some(n) => diagnostics.push(
                    Diagnostic::error(format!(
                        "`resources.cpus` must be from 1 to 4096, found {n}"
                    ))
                    .at(value.span, "out of range"),
                ),
                None => {
                    diagnostics.push(super::raw::wrong_kind(key, value, "a whole number of CPUs"))
                }
            },
            "memory" => limits.memory = memory(value, diagnostics),
            _ => diagnostics.push(super::raw::unknown_key(
                key,
                RESOURCES_KEYS,
                "in `resources`",
            )),
        }
    }
}

fn read_retries(node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Retries> {
    // `retries: 2` re-tries twice (three attempts in all), as in Snakemake.
    if let Some(n) = integer(node) {
        return match n {
            0..MAX_ATTEMPTS => Some(Retries {
                attempts: n as u32 + 1,
                backoff: Duration::ZERO,
            }),
            _ => {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "`retries` must be from 0 to {}, found {n}",
                        MAX_ATTEMPTS - 1
                    ))
                    .at(node.span, "out of range"),
                );
                None
            }
        };
    }
    let Some(entries) = node.as_map() else {
        diagnostics.push(
            Diagnostic::error(format!(
                "`retries` must be a map or a number, found {}",
                node.kind()
            ))
            .at(node.span, "expected `{attempts: 3, backoff: 10s}`"),
        );
        return None;
    };
    let mut retries = Retries::default();
    let before = diagnostics.len();
    for (key, value) in entries {
        match key.name.as_str() {
            "attempts" => match integer(value) {
                Some(n) if (1..=MAX_ATTEMPTS).contains(&n) => retries.attempts = n as u32,
                Some(n) => diagnostics.push(
                    Diagnostic::error(format!(
                        "`retries.attempts` must be from 1 to {MAX_ATTEMPTS}, found {n}"
                    ))
                    .at(value.span, "attempts in all, the first included"),
                ),
                None => diagnostics.push(super::raw::wrong_kind(
                    key,
                    value,
                    "a number of attempts (the first included)",
                )),
            },
            "backoff" => {
                if let Some(wait) = duration(value, "retries.backoff", true, diagnostics) {
                    retries.backoff = wait;
                }
            }
            _ => diagnostics.push(super::raw::unknown_key(key, RETRIES_KEYS, "in `retries`")),
        }
    }
    (diagnostics.len() == before).then_some(retries)
}

/// An integer, written as one or rendered from a template.
fn integer(node: &Node) -> Option<i64> {
    match &node.value {
        Value::Int(n) => Some(*n),
        Value::String(_) => node.as_str()?.trim().parse().ok(),
        _ => None,
    }
}

/// A duration such as `30m`; zero only where `zero_ok`.
fn duration(
    node: &Node,
    name: &str,
    zero_ok: bool,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Duration> {
    let parsed = node
        .as_str()
        .map(|text| humantime::parse_duration(text.trim()));
    match parsed {
        Some(Ok(d)) if zero_ok || !d.is_zero() => Some(d),
        Some(Ok(_)) => {
            diagnostics.push(
                Diagnostic::error(format!("`{name}` must be longer than 0s"))
                    .at(node.span, "zero")
                    .help("leave it out for no limit"),
            );
            None
        }
        Some(Err(e)) => {
            diagnostics.push(
                Diagnostic::error(format!("`{name}` is not a duration: {e}"))
                    .at(node.span, "not a duration")
                    .help("a number and a unit: `90s`, `30m`, `2h`, `1h 30m`"),
            );
            None
        }
        None => {
            diagnostics.push(
                Diagnostic::error(format!(
                    "`{name}` must be a duration, found {}",
                    node.kind()
                ))
                .at(node.span, "expected a duration such as `30m`")
                .help("a number and a unit: `90s`, `30m`, `2h`, `1h 30m`"),
            );
            None
        }
    }
}

/// A memory size such as `4G`: a number and a unit, as `cache.max_size` reads it (`4G` and
/// `4GB` are 4×10⁹ bytes, `4GiB` is 4×2³⁰). A bare number is refused: Slurm reads it as
/// megabytes, others as bytes.
fn memory(node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Option<u64> {
    let help = "a number and a unit: `512M`, `4G`, `2GiB`";
    let text = match &node.value {
        Value::String(_) => node.as_str().unwrap_or_default().trim(),
        Value::Int(_) => {
            diagnostics.push(
                Diagnostic::error("`resources.memory` needs a unit")
                    .at(node.span, "bytes? megabytes?")
                    .help(help),
            );
            return None;
        }
        _ => {
            diagnostics.push(
                Diagnostic::error(format!(
                    "`resources.memory` must be a size, found {}",
                    node.kind()
                ))
                .at(node.span, "expected a size such as `4G`")
                .help(help),
            );
            return None;
        }
    };
    let unitless = text.chars().all(|c| c.is_ascii_digit() || c == '.');
    match text.parse::<bytesize::ByteSize>() {
        Ok(size) if !unitless && size.as_u64() > 0 => Some(size.as_u64()),
        Ok(_) if unitless => {
            diagnostics.push(
                Diagnostic::error("`resources.memory` needs a unit")
                    .at(node.span, "bytes? megabytes?")
                    .help(help),
            );
            None
        }
        Ok(_) => {
            diagnostics.push(
                Diagnostic::error("`resources.memory` must be more than 0")
                    .at(node.span, "zero")
                    .help("leave it out to reserve nothing"),
            );
            None
        }
        Err(_) => {
            diagnostics.push(
                Diagnostic::error("`resources.memory` is not a size")
                    .at(node.span, "not a size")
                    .help(help),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_and_is_capped() {
        let retries = Retries {
            attempts: 5,
            backoff: Duration::from_secs(10),
        };
        assert_eq!(retries.wait_after(1), Duration::from_secs(10));
        assert_eq!(retries.wait_after(2), Duration::from_secs(20));
        assert_eq!(retries.wait_after(3), Duration::from_secs(40));
        assert_eq!(retries.wait_after(40), Duration::from_secs(3600));
    }
}
