//! Reading files and showing their text safely, for the stages and the orchestrator alike.
//!
//! Two dangers come with files a pipeline did not write itself. A path may name something that
//! is not a file: opening a FIFO blocks until some other program writes to it (forever, and
//! beyond a SIGTERM), a device may never end. [`open_file`] opens without blocking and accepts
//! only a regular file, deciding on the opened descriptor so that nothing can be swapped in
//! between the check and the read. And a file's bytes, a CSV header say, may hold terminal
//! control sequences that clear the screen or retitle the terminal when printed: [`escape`]
//! makes any text from a file or a name safe to put in a message.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use libc::O_NONBLOCK;

/// What a path names when it is not a regular file, in words: "a FIFO (named pipe)".
pub fn kind_of(file_type: std::fs::FileType) -> Option<&'static str> {
    if file_type.is_file() {
        None
    } else if file_type.is_dir() {
        Some("a directory")
    } else if file_type.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if file_type.is_socket() {
        Some("a socket")
    } else if file_type.is_char_device() {
        Some("a character device")
    } else if file_type.is_block_device() {
        Some("a block device")
    } else if file_type.is_symlink() {
        Some("a symbolic link")
    } else {
        Some("not a regular file")
    }
}

/// A path that names something other than a regular file or directory, or a directory where a
/// file is read. Carried inside an [`io::Error`] (kind `InvalidInput`), so that a caller that
/// knows the path as the person wrote it can say it first: "`data/in.csv` is a FIFO …".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAFile {
    /// "a FIFO (named pipe)", "a directory", …
    pub kind: &'static str,
    /// The path, when the error names it itself (files no caller names, under `.imba/`).
    pub path: Option<String>,
}

impl fmt::Display for NotAFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            // A file of imba's own (a lock, a journal): it must be a regular file.
            return write!(f, "`{}` is {}, not a regular file", escape(path), self.kind);
        }
        if self.kind == "a directory" {
            write!(f, "is a directory, but this stage reads it as a file")
        } else {
            write!(
                f,
                "is {}; imba reads only regular files and directories",
                self.kind
            )
        }
    }
}

impl std::error::Error for NotAFile {}

impl NotAFile {
    pub fn new(kind: &'static str) -> Self {
        NotAFile { kind, path: None }
    }

    /// The same error, naming `path` itself.
    pub fn naming(mut self, path: &Path) -> Self {
        self.path = Some(path.to_string_lossy().into_owned());
        self
    }

    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, self)
    }

    /// The [`NotAFile`] inside an I/O error, when that is what it is.
    pub fn of(error: &io::Error) -> Option<&NotAFile> {
        error.get_ref()?.downcast_ref::<NotAFile>()
    }
}

/// An I/O error about `path`, in one line that names it: "`data/in.csv` is a FIFO …" for
/// [`NotAFile`], else "cannot {verb} `path`: {error}".
pub fn describe_error(verb: &str, path: &Path, error: &io::Error) -> String {
    let shown = escape(&path.to_string_lossy()).into_owned();
    match NotAFile::of(error) {
        Some(not) if not.path.is_some() => not.to_string(),
        Some(not) => format!("`{shown}` {not}"),
        None => format!("cannot {verb} `{shown}`: {error}"),
    }
}

/// Opens `path` for reading when it is a regular file (following symlinks); anything else is an
/// error carrying [`NotAFile`]. See [`open_with`].
pub fn open_file(path: &Path) -> io::Result<File> {
    open_with(std::fs::OpenOptions::new().read(true), path)
}

/// Opens `path` with `options` when it is a regular file (following symlinks), or creates it when
/// the options say so; anything else is an error carrying [`NotAFile`]. The open does not block
/// on a FIFO (`O_NONBLOCK`: a FIFO opened to read has no writer, one opened to write no reader)
/// and the kind is taken from the opened descriptor (`fstat`), so nothing can be put in the
/// file's place between a check and the open. `O_NONBLOCK` changes nothing for a regular file.
pub fn open_with(options: &mut std::fs::OpenOptions, path: &Path) -> io::Result<File> {
    let file = match options.custom_flags(O_NONBLOCK).open(path) {
        Ok(file) => file,
        Err(error) => {
            // A FIFO without a reader refuses a non-blocking open for writing (ENXIO), a
            // socket any open: say what is there rather than the errno's words.
            return Err(
                match std::fs::metadata(path)
                    .ok()
                    .and_then(|m| kind_of(m.file_type()))
                {
                    Some(kind) if kind != "a directory" => NotAFile::new(kind).into_io(),
                    _ => error,
                },
            );
        }
    };
    match kind_of(file.metadata()?.file_type()) {
        None => Ok(file),
        Some(kind) => Err(NotAFile::new(kind).into_io()),
    }
}

/// Checks that `path` is a regular file, for readers that open it themselves (polars' lazy
/// scans): the same check as [`open_file`], on a descriptor that is closed again.
pub fn check_file(path: &Path) -> io::Result<()> {
    open_file(path).map(drop)
}

/// Accepts a regular file or a directory, by its type (following symlinks): for what is met
/// while walking a directory, before a file is opened with [`open_file`].
pub fn check_walked(file_type: std::fs::FileType) -> io::Result<()> {
    match kind_of(file_type) {
        None | Some("a directory") => Ok(()),
        Some(kind) => Err(NotAFile::new(kind).into_io()),
    }
}

/// Text from a file or a name (a column, a value, a path), safe to put in a message printed on a
/// terminal: control characters become escapes (`\x1b`, `\n`, `\u{9b}`), and so do the
/// invisible characters that reorder text (bidirectional overrides). Everything else, `ü` and
/// `中文` included, is kept as it is. Borrowed when there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_with(text, false)
}

/// Like [`escape`], but keeps line breaks and tabs: for whole messages, whose lines are meant.
pub fn escape_message(text: &str) -> Cow<'_, str> {
    escape_with(text, true)
}

/// Bytes from a file, as [`escape`]d text: invalid UTF-8 becomes `\xff`-style escapes.
pub fn escape_bytes(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return escape(text);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    Cow::Owned(out)
}

/// Whether `c` must not reach a terminal as it is.
pub fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The escape of one character that [`needs_escape`].
pub fn escape_char(c: char, out: &mut String) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
        c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
    }
}

fn escape_with(text: &str, keep_lines: bool) -> Cow<'_, str> {
    let kept = |c: char| keep_lines && matches!(c, '\n' | '\t');
    if !text.chars().any(|c| needs_escape(c) && !kept(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) && !kept(c) {
            escape_char(c, &mut out);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_unicode_kept() {
        assert_eq!(
            escape("\x1b[2J\x1b]0;OWNED\x07 a\tb\nc"),
            "\\x1b[2J\\x1b]0;OWNED\\x07 a\\tb\\nc"
        );
        assert_eq!(escape("größe 中文 ü"), "größe 中文 ü");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("\u{9b}31m \u{202e}txt"), "\\u{9b}31m \\u{202e}txt");
        assert_eq!(escape("\x7f"), "\\x7f");
        assert_eq!(escape_message("one\n\ttwo\r\x1b"), "one\n\ttwo\\r\\x1b");
    }

    #[test]
    fn invalid_utf8_is_escaped_byte_by_byte() {
        assert_eq!(escape_bytes(b"a\xff\xfeb\x1b"), "a\\xff\\xfeb\\x1b");
        assert_eq!(escape_bytes("ü".as_bytes()), "ü");
    }

    #[test]
    fn only_regular_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.csv");
        std::fs::write(&file, "a\n").unwrap();
        assert!(open_file(&file).is_ok());
        let error = open_file(dir.path()).unwrap_err();
        assert_eq!(NotAFile::of(&error).unwrap().kind, "a directory");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // Returns at once: the open does not wait for a writer.
            let error = open_file(&fifo).unwrap_err();
            assert_eq!(
                describe_error("read", Path::new("in.csv"), &error),
                "`in.csv` is a FIFO (named pipe); imba reads only regular files and directories"
            );
        }
        let error = open_file(Path::new("/dev/null")).unwrap_err();
        assert_eq!(NotAFile::of(&error).unwrap().kind, "a character device");
        assert!(NotAFile::of(&open_file(&dir.path().join("nope")).unwrap_err()).is_none());
    }
}
