//! Checks of a built-in stage's declared inputs and outputs, shared by the stages.

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
pub fn exactly_one_input(inputs: &[Option<String>]) -> Result<(), PortError> {
    match inputs.len() {
        1 => Ok(()),
        n => Err(PortError::inputs(format!(
            "takes exactly one input, not {n}"
        ))),
    }
}

/// Outputs named `required` (and maybe `optional`), or a list in that order.
pub fn named_outputs(
    outputs: &[Option<String>],
    required: &[&str],
    optional: &[&str],
) -> Result<(), PortError> {
    named(outputs, required, optional, true)
}

/// Inputs named `required` (and maybe `optional`), or a list in that order.
pub fn named_inputs(
    inputs: &[Option<String>],
    required: &[&str],
    optional: &[&str],
) -> Result<(), PortError> {
    named(inputs, required, optional, false)
}

fn named(
    ports: &[Option<String>],
    required: &[&str],
    optional: &[&str],
    outputs_side: bool,
) -> Result<(), PortError> {
    let side = if outputs_side { "output" } else { "input" };
    let error = |message: String| PortError {
        outputs: outputs_side,
        message,
    };
    let all: Vec<&str> = required.iter().chain(optional).copied().collect();
    let names: Vec<&str> = ports.iter().filter_map(|n| n.as_deref()).collect();
    let expected = format!(
        "{side}s {}",
        all.iter()
            .enumerate()
            .map(|(i, n)| if i < required.len() {
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
    for name in required {
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

    #[test]
    fn outputs_by_name_or_position() {
        assert!(named_outputs(&named(&["table", "summary"]), &["table"], &["summary"]).is_ok());
        assert!(named_outputs(&named(&["table"]), &["table"], &["summary"]).is_ok());
        assert!(named_outputs(&[None, None], &["table"], &["summary"]).is_ok());
        assert_eq!(
            named_outputs(&named(&["tabel"]), &["table"], &["summary"])
                .unwrap_err()
                .message,
            "has no output `tabel`; it expects outputs `table`, `summary` (optional)"
        );
        assert!(named_outputs(&[None, None, None], &["table"], &["summary"]).is_err());
        assert!(exactly_one_input(&[]).is_err());
    }
}
