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

    fn outputs(message: String) -> Self {
        PortError {
            outputs: true,
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
    let all: Vec<&str> = required.iter().chain(optional).copied().collect();
    let names: Vec<&str> = outputs.iter().filter_map(|n| n.as_deref()).collect();
    let expected = format!(
        "outputs {}",
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
        if outputs.len() < required.len() || outputs.len() > all.len() {
            return Err(PortError::outputs(format!(
                "expects {expected}, in that order; {} given",
                outputs.len()
            )));
        }
        return Ok(());
    }
    for name in &names {
        if !all.contains(name) {
            return Err(PortError::outputs(format!(
                "has no output `{name}`; it expects {expected}"
            )));
        }
    }
    for name in required {
        if !names.contains(name) {
            return Err(PortError::outputs(format!(
                "needs an output `{name}`; it expects {expected}"
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
