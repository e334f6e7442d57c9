//! A built-in stage's inputs and outputs, declared once ([`Port`], [`Inputs`]), and the checks
//! of what a pipeline declares against them.

/// One input or output of a built-in stage: its name in an `inputs:`/`outputs:` map, its
/// position when they are a list, and whether the stage needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub name: &'static str,
    pub position: usize,
    pub required: bool,
}

impl Port {
    pub const fn required(name: &'static str, position: usize) -> Port {
        Port {
            name,
            position,
            required: true,
        }
    }

    pub const fn optional(name: &'static str, position: usize) -> Port {
        Port {
            name,
            position,
            required: false,
        }
    }
}

/// What a built-in stage reads.
#[derive(Debug, Clone, Copy)]
pub enum Inputs {
    /// Exactly one table, named anything.
    One,
    /// These, by name or as a list in order.
    Named(&'static [Port]),
    /// Any number of tables, each named, their names meaningful to the params; `why` says so.
    Map { why: &'static str },
}

/// Checks declared inputs and outputs against what a stage declares it has.
pub fn check(
    expected_inputs: Inputs,
    expected_outputs: &[Port],
    inputs: &[Option<String>],
    outputs: &[Option<String>],
) -> Result<(), PortError> {
    match expected_inputs {
        Inputs::One => exactly_one_input(inputs)?,
        Inputs::Named(ports) => named(inputs, ports, false)?,
        Inputs::Map { why } => {
            if inputs.is_empty() || inputs.iter().any(Option::is_none) {
                return Err(PortError::inputs(why.to_owned()));
            }
        }
    }
    named(outputs, expected_outputs, true)
}

/// What is wrong with a stage's declared inputs or outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortError {
    /// The problem is in `outputs:` (else in `inputs:`).
    pub outputs: bool,
    pub message: String,
}

impl PortError {
    fn inputs(message: String) -> Self {
        PortError {
            outputs: false,
            message,
        }
    }
}

/// Exactly one input, named anything.
fn exactly_one_input(inputs: &[Option<String>]) -> Result<(), PortError> {
    match inputs.len() {
        1 => Ok(()),
        n => Err(PortError::inputs(format!(
            "takes exactly one input, not {n}"
        ))),
    }
}

/// Ports named as `expected` says (each required one, no other), or a list of as many as it
/// allows, in its order.
fn named(ports: &[Option<String>], expected: &[Port], outputs_side: bool) -> Result<(), PortError> {
    let required: Vec<&str> = expected
        .iter()
        .filter(|p| p.required)
        .map(|p| p.name)
        .collect();
    let side = if outputs_side { "output" } else { "input" };
    let error = |message: String| PortError {
        outputs: outputs_side,
        message,
    };
    let all: Vec<&str> = expected.iter().map(|p| p.name).collect();
    let names: Vec<&str> = ports.iter().filter_map(|n| n.as_deref()).collect();
    let expected = format!(
        "{side}s {}",
        all.iter()
            .enumerate()
            .map(|(i, n)| if expected[i].required {
                format!("`{n}`")
            } else {
                format!("`{n}` (optional)")
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if names.is_empty() {
        if ports.len() < required.len() || ports.len() > all.len() {
            return Err(error(format!(
                "expects {expected}, in that order; {} given",
                ports.len()
            )));
        }
        return Ok(());
    }
    for name in &names {
        if !all.contains(name) {
            return Err(error(format!(
                "has no {side} `{name}`; it expects {expected}"
            )));
        }
    }
    for name in &required {
        if !names.contains(name) {
            return Err(error(format!(
                "needs an {side} `{name}`; it expects {expected}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> Vec<Option<String>> {
        names.iter().map(|n| Some(n.to_string())).collect()
    }

    const OUTPUTS: &[Port] = &[Port::required("table", 0), Port::optional("summary", 1)];

    fn outputs(declared: &[Option<String>]) -> Result<(), PortError> {
        check(Inputs::One, OUTPUTS, &[None], declared)
    }

    #[test]
    fn outputs_by_name_or_position() {
        assert!(outputs(&named(&["table", "summary"])).is_ok());
        assert!(outputs(&named(&["table"])).is_ok());
        assert!(outputs(&[None, None]).is_ok());
        assert_eq!(
            outputs(&named(&["tabel"])).unwrap_err().message,
            "has no output `tabel`; it expects outputs `table`, `summary` (optional)"
        );
        assert_eq!(
            outputs(&named(&["summary"])).unwrap_err().message,
            "needs an output `table`; it expects outputs `table`, `summary` (optional)"
        );
        assert!(outputs(&[None, None, None]).is_err());
        assert!(check(Inputs::One, OUTPUTS, &[], &[None]).is_err());
    }

    #[test]
    fn a_map_of_inputs_must_name_each() {
        let map = Inputs::Map {
            why: "names its inputs",
        };
        assert!(check(map, OUTPUTS, &named(&["a", "b"]), &[None]).is_ok());
        assert_eq!(
            check(map, OUTPUTS, &[None], &[None]).unwrap_err().message,
            "names its inputs"
        );
    }
}
