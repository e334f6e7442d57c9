//! JSON pointers (RFC 6901) to params: how a stage's error names the param it is about, and how
//! the orchestrator finds that param in the pipeline file.

/// One segment as a pointer writes it: `~` as `~0`, `/` as `~1`.
pub fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// One segment as written in a pointer, back to its text.
pub fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// The pointer to a param (`["cast", "order_dow"]` → `/cast/order_dow`).
pub fn of(segments: &[&str]) -> String {
    segments.iter().map(|s| format!("/{}", escape(s))).collect()
}

/// A pointer as a person writes the param: `/iqr/columns/0` → `iqr.columns[0]`.
pub fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = unescape(segment);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_through_escaping() {
        for segment in ["plain", "a/b", "~", "~1", "a~/b", ""] {
            assert_eq!(unescape(&escape(segment)), segment);
        }
        assert_eq!(of(&["cast", "a/b~c"]), "/cast/a~1b~0c");
        assert_eq!(dotted("/iqr/columns/0"), "iqr.columns[0]");
        assert_eq!(dotted("/cast/a~1b"), "cast.a/b");
    }
}
