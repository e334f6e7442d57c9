//! Shell commands quoted by construction: every value a template inserts into a `cmd:` is escaped
//! for the place in the command where it lands.
//!
//! Rendering a command happens in two steps. The template engine writes each inserted value
//! between two marker characters instead of writing it as is ([`mark`]); then [`finish`] reads
//! the rendered command with a small POSIX `sh` lexer and replaces each marked value with the
//! escaping that its position needs: single-quoted where the shell would split or expand it,
//! backslash-escaped inside `"…"`, `'\''` inside `'…'`, defused in a comment or a here-document.
//! So `echo {{ name }}`, `echo "{{ name }}"` and `awk '$1 > {{ min }}'` all receive the value as
//! data, whatever characters it holds, and a value never becomes shell code. A value marked
//! `| safe` is written as it is: the one, explicit, way to insert a shell fragment.
//!
//! A generic quoting crate (shlex, shell-words) quotes a whole word; it cannot know that the value
//! sits inside a double-quoted string the user wrote around it, which is what the lexer is for.

use std::fmt;

/// Starts a marked value in the engine's output (a private-use character).
const OPEN: char = '\u{E000}';
/// Ends a marked value.
const CLOSE: char = '\u{E001}';

/// Why a command cannot be rendered safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellError {
    /// A NUL byte cannot be passed to a program at all.
    Nul,
    /// The value holds imba's own marker characters.
    Reserved,
    /// The value would end the here-document it is inserted in.
    EndsHeredoc(String),
    /// A `\` in the template right before the value would escape part of its quoting.
    Backslash,
}

impl fmt::Display for ShellError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShellError::Nul => f.write_str("a value inserted into the command holds a NUL byte, which no command can receive"),
            ShellError::Reserved => f.write_str("a value inserted into the command holds the characters U+E000 or U+E001, which imba reserves for quoting"),
            ShellError::Backslash => f.write_str(
                "a `\\` right before `{{ … }}` would escape part of the quoted value: remove it",
            ),
            ShellError::EndsHeredoc(delimiter) => write!(
                f,
                "a value inserted into a here-document holds a line `{delimiter}`, which would end it early"
            ),
        }
    }
}

/// Writes `value` marked, for [`finish`] to escape. Fails on the reserved marker characters.
pub fn mark(out: &mut String, value: &str) -> Result<(), ShellError> {
    if value.contains([OPEN, CLOSE]) {
        return Err(ShellError::Reserved);
    }
    out.push(OPEN);
    out.push_str(value);
    out.push(CLOSE);
    Ok(())
}

/// Whether rendered template text holds the marker characters outside of marked values.
pub fn has_reserved(text: &str) -> bool {
    text.contains([OPEN, CLOSE])
}

/// Where the lexer is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Context {
    /// Words: split on blanks, expanded, globbed.
    Unquoted,
    /// Inside `'…'`.
    Single,
    /// Inside `"…"`.
    Double,
    /// Inside `$( … )`, with the depth of plain parentheses opened in it.
    Subshell(usize),
    /// Inside `` `…` ``.
    Backtick,
    /// After `#` at the start of a word, to the end of the line.
    Comment,
    /// The body of a here-document, up to a line equal to `delimiter`.
    Heredoc { delimiter: String, expands: bool },
}

/// Replaces each marked value in `rendered` with its escaped form.
pub fn finish(rendered: &str) -> Result<String, ShellError> {
    let mut out = String::with_capacity(rendered.len() + 16);
    let mut stack = vec![Context::Unquoted];
    // Here-documents announced on the current line (`<<EOF`), opened at its end.
    let mut pending: Vec<(String, bool)> = Vec::new();
    // The current line of a here-document body, to find its delimiter.
    let mut line_start = 0usize;
    let mut chars = rendered.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == OPEN {
            let start = at + c.len_utf8();
            let end = rendered[start..]
                .find(CLOSE)
                .map_or(rendered.len(), |e| start + e);
            let value = &rendered[start..end];
            while chars.peek().is_some_and(|(i, _)| *i <= end) {
                chars.next();
            }
            let context = stack.last().unwrap_or(&Context::Unquoted);
            let backslashes = out.chars().rev().take_while(|c| *c == '\\').count();
            let escapes = !matches!(
                context,
                Context::Single | Context::Comment | Context::Heredoc { expands: false, .. }
            );
            if escapes && backslashes % 2 == 1 {
                return Err(ShellError::Backslash);
            }
            escape(&mut out, value, context)?;
            continue;
        }
        let top = stack.last().cloned().unwrap_or(Context::Unquoted);
        let previous = out.chars().last();
        out.push(c);
        match top {
            Context::Unquoted | Context::Subshell(_) | Context::Backtick => match c {
                '\\' => {
                    if let Some((_, next)) = chars.next_if(|(_, n)| *n != OPEN) {
                        out.push(next);
                    }
                }
                '\'' => stack.push(Context::Single),
                '"' => stack.push(Context::Double),
                '`' if top == Context::Backtick => {
                    stack.pop();
                }
                '`' => stack.push(Context::Backtick),
                '$' if chars.peek().is_some_and(|(_, n)| *n == '(') => {
                    let (_, open) = chars.next().unwrap_or((at, '('));
                    out.push(open);
                    stack.push(Context::Subshell(0));
                }
                '(' => {
                    if let Some(Context::Subshell(depth)) = stack.last_mut() {
                        *depth += 1;
                    }
                }
                ')' => match stack.last_mut() {
                    Some(Context::Subshell(0)) => {
                        stack.pop();
                    }
                    Some(Context::Subshell(depth)) => *depth -= 1,
                    _ => {}
                },
                '#' if previous.is_none_or(|p| p.is_whitespace() || ";&|()<>".contains(p)) => {
                    stack.push(Context::Comment);
                }
                '<' if chars.peek().is_some_and(|(_, n)| *n == '<') => {
                    let (_, second) = chars.next().unwrap_or((at, '<'));
                    out.push(second);
                    if chars.next_if(|(_, n)| *n == '-').is_some() {
                        out.push('-');
                    }
                    pending.push(heredoc_word(&mut chars, &mut out));
                }
                '\n' => {
                    if let Some((delimiter, expands)) = open_heredoc(&mut pending) {
                        stack.push(Context::Heredoc { delimiter, expands });
                        line_start = out.len();
                    }
                }
                _ => {}
            },
            Context::Single => {
                if c == '\'' {
                    stack.pop();
                }
            }
            Context::Double => match c {
                '\\' => {
                    if let Some((_, next)) = chars.next_if(|(_, n)| *n != OPEN) {
                        out.push(next);
                    }
                }
                '"' => {
                    stack.pop();
                }
                '`' => stack.push(Context::Backtick),
                '$' if chars.peek().is_some_and(|(_, n)| *n == '(') => {
                    let (_, open) = chars.next().unwrap_or((at, '('));
                    out.push(open);
                    stack.push(Context::Subshell(0));
                }
                _ => {}
            },
            Context::Comment => {
                if c == '\n' {
                    stack.pop();
                    if let Some((delimiter, expands)) = open_heredoc(&mut pending) {
                        stack.push(Context::Heredoc { delimiter, expands });
                        line_start = out.len();
                    }
                }
            }
            Context::Heredoc { delimiter, .. } => {
                if c == '\n' {
                    let line = &out[line_start..out.len() - 1];
                    if line.trim_start_matches('\t') == delimiter {
                        stack.pop();
                        if let Some((delimiter, expands)) = open_heredoc(&mut pending) {
                            stack.push(Context::Heredoc { delimiter, expands });
                        }
                    }
                    line_start = out.len();
                }
            }
        }
    }
    Ok(out)
}

fn open_heredoc(pending: &mut Vec<(String, bool)>) -> Option<(String, bool)> {
    (!pending.is_empty()).then(|| pending.remove(0))
}

/// The delimiter word after `<<` (or `<<-`), copied to `out`: whether the body expands (the
/// delimiter was not quoted) and the word without its quotes.
fn heredoc_word(
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    out: &mut String,
) -> (String, bool) {
    while let Some((_, c)) = chars.next_if(|(_, c)| *c == ' ' || *c == '\t') {
        out.push(c);
    }
    let mut word = String::new();
    let mut quoted = false;
    let mut quote: Option<char> = None;
    while let Some((_, c)) = chars.peek().copied() {
        if c == OPEN {
            break;
        }
        match quote {
            Some(q) if c == q => {
                quote = None;
            }
            Some(_) => word.push(c),
            None if c == '\'' || c == '"' => {
                quoted = true;
                quote = Some(c);
            }
            None if c == '\\' => quoted = true,
            None if c.is_whitespace() || ";&|()<>".contains(c) => break,
            None => word.push(c),
        }
        out.push(c);
        chars.next();
    }
    (word, !quoted)
}

/// Characters that need no quoting anywhere in an unquoted word.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-./:,+=@%^".contains(c) || (!c.is_ascii() && !c.is_control())
}

fn escape(out: &mut String, value: &str, context: &Context) -> Result<(), ShellError> {
    if value.contains('\0') {
        return Err(ShellError::Nul);
    }
    match context {
        Context::Backtick => {
            // The text between backticks is read once more after `\\`, `\``, `\$` lose their
            // backslash: quote for that second reading, then escape for the first.
            let mut inner = String::new();
            escape(&mut inner, value, &Context::Unquoted)?;
            for c in inner.chars() {
                if matches!(c, '\\' | '`' | '$') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        Context::Unquoted | Context::Subshell(_) => {
            if !value.is_empty() && value.chars().all(plain) {
                out.push_str(value);
            } else {
                out.push('\'');
                out.push_str(&value.replace('\'', r"'\''"));
                out.push('\'');
            }
        }
        Context::Single => out.push_str(&value.replace('\'', r"'\''")),
        Context::Double => {
            for c in value.chars() {
                if matches!(c, '$' | '`' | '"' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        // A newline would end the comment and start a command.
        Context::Comment => out.push_str(&value.replace(['\n', '\r'], " ")),
        Context::Heredoc { delimiter, expands } => {
            if value
                .split('\n')
                .skip(1)
                .any(|line| line.trim_start_matches('\t') == delimiter)
            {
                return Err(ShellError::EndsHeredoc(delimiter.clone()));
            }
            for c in value.chars() {
                if *expands && matches!(c, '$' | '`' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
    }
    Ok(())
}

/// Quotes one word for `sh`, as [`finish`] would quote a value in unquoted text.
pub fn quote(value: &str) -> String {
    let mut out = String::new();
    let _ = escape(&mut out, value, &Context::Unquoted);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders `template` with `{}` replaced by the marked `value`.
    fn render(template: &str, value: &str) -> String {
        let mut marked = String::new();
        mark(&mut marked, value).unwrap();
        finish(&template.replace("{}", &marked)).unwrap()
    }

    /// What `sh` prints for `printf '%s|' ARGS`, to see the words a command receives.
    fn words(command: &str) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .output()
            .expect("sh");
        assert!(out.status.success(), "{command}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    const NASTY: &[&str] = &[
        "plain",
        "",
        "a b",
        "x; touch PWNED",
        "$(touch PWNED)",
        "`touch PWNED`",
        "it's",
        "\"quoted\"",
        "back\\slash",
        "new\nline",
        "*",
        "~",
        "-n",
        "ü 中文",
        "a'b\"c$d`e\\f",
        "EOF",
    ];

    #[test]
    fn plain_values_are_left_as_they_are() {
        assert_eq!(
            render("cp {} out", "data/orders-2024_01.csv"),
            "cp data/orders-2024_01.csv out"
        );
        assert_eq!(render("echo \"{}\"", "month 5"), "echo \"month 5\"");
        assert_eq!(render("awk '$1 >= {}'", "5"), "awk '$1 >= 5'");
    }

    #[test]
    fn every_value_arrives_as_data_bare_and_inside_quotes() {
        // The template, and the text around the value in what the command receives.
        let cases = [
            ("printf '%s|' {}", "", ""),
            ("printf '%s|' \"x{}y\"", "x", "y"),
            ("printf '%s|' 'x{}y'", "x", "y"),
        ];
        for (template, before, after) in cases {
            for value in NASTY {
                assert_eq!(
                    words(&render(template, value)),
                    format!("{before}{value}{after}|"),
                    "{template} with {value:?}"
                );
            }
        }
    }

    #[test]
    fn command_substitutions_and_backticks_nest() {
        for value in NASTY {
            assert_eq!(
                words(&render("printf '%s|' \"$(printf '%s' {})\"", value)),
                format!("{}|", value.trim_end_matches('\n')),
                "{value:?}"
            );
            assert_eq!(
                words(&render("printf '%s|' \"`printf '%s' {}`\"", value)),
                format!("{}|", value.trim_end_matches('\n')),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_comment_cannot_be_ended_by_a_value() {
        let command = render("printf ok # {}", "\ntouch PWNED");
        assert_eq!(words(&command), "ok");
    }

    #[test]
    fn here_documents_keep_values_literal() {
        for value in NASTY.iter().filter(|v| !v.contains('\n')) {
            assert_eq!(
                words(&render("cat <<EOF\nx{}y\nEOF\n", value)),
                format!("x{value}y\n"),
                "{value:?}"
            );
            assert_eq!(
                words(&render("cat <<'EOF'\nx{}y\nEOF\n", value)),
                format!("x{value}y\n"),
                "{value:?}"
            );
        }
        let mut marked = String::new();
        mark(&mut marked, "a\nEOF\ntouch PWNED").unwrap();
        assert_eq!(
            finish(&format!("cat <<EOF\n{marked}\nEOF\n")),
            Err(ShellError::EndsHeredoc("EOF".into()))
        );
    }

    #[test]
    fn escaped_quotes_in_the_template_do_not_confuse_the_lexer() {
        assert_eq!(words(&render("printf '%s|' \\\"{}", "a b")), "\"a b|");
        assert_eq!(words(&render("printf '%s|' \"a\\\"{}\"", "$x")), "a\"$x|");
    }

    #[test]
    fn a_backslash_before_a_value_is_refused() {
        for template in ["echo \\{}", "echo \"\\{}\"", "cat <<EOF\n\\{}\nEOF\n"] {
            let mut marked = String::new();
            mark(&mut marked, "$(touch PWNED)").unwrap();
            assert_eq!(
                finish(&template.replace("{}", &marked)),
                Err(ShellError::Backslash),
                "{template:?}"
            );
        }
        // An escaped backslash is a plain character.
        assert_eq!(words(&render("printf '%s|' \\\\{}", "a b")), "\\a b|");
    }

    #[test]
    fn nul_and_reserved_characters_are_refused() {
        let mut out = String::new();
        assert_eq!(mark(&mut out, "a\u{E000}"), Err(ShellError::Reserved));
        let mut marked = String::new();
        mark(&mut marked, "a\0b").unwrap();
        assert_eq!(finish(&marked), Err(ShellError::Nul));
    }
}
