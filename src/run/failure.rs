//! Why a stage failed, typed: the run record keeps its words, the scheduler its kind.

use std::fmt;
use std::path::PathBuf;

/// How a command ended when it did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CommandEnd {
    Exit(i32),
    Signal(i32),
}

/// Why a stage failed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageFailure {
    /// An input the stage reads is not there.
    InputMissing { path: String },
    /// A command did not succeed: its last lines of stderr and where its whole log is.
    Command {
        end: CommandEnd,
        command: String,
        tail: String,
        log: PathBuf,
    },
    /// The run was cancelled while the stage ran (its command got the signal, or the built-in
    /// saw its cancel flag).
    Cancelled,
    /// A built-in stage's own error, with the param it is about (a JSON pointer) when it names
    /// one.
    Builtin {
        message: String,
        param: Option<String>,
    },
    /// A declared output was not written; `hint` says where a command was to write it.
    MissingOutput {
        output: String,
        hint: Option<String>,
    },
    /// Checks with severity `fail` missed: the whole explanation, quarantine included.
    Checks(String),
    /// Reading inputs or committing outputs failed (in S3, possibly because the run was
    /// cancelled and the request dropped).
    Storage(String),
    /// A job on an executor ended without a result, or was stopped from outside imba.
    Job { message: String, log: PathBuf },
    /// An attempt ran longer than the stage's `timeout` and was stopped.
    TimedOut { after: std::time::Duration },
    /// Anything else: staging could not be prepared, a variable is unset, an internal error.
    Other(String),
}

impl StageFailure {
    /// Whether this is what a cancellation looks like from inside the stage: then a cancelled
    /// run records the stage as cancelled, not failed.
    pub fn may_be_cancellation(&self) -> bool {
        matches!(
            self,
            StageFailure::Cancelled
                | StageFailure::Storage(_)
                | StageFailure::Command {
                    end: CommandEnd::Signal(_),
                    ..
                }
        )
    }

    /// Whether another attempt may succeed where this one failed (`retries:`): a command that
    /// failed or was killed, a timeout, a lost or refused job, a storage error, a built-in's
    /// run-time error. A config
    /// error (a built-in's error about one of its params), a missing input or output and a failed
    /// check would fail the same way again.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StageFailure::Command { .. }
                | StageFailure::Job { .. }
                | StageFailure::TimedOut { .. }
                | StageFailure::Storage(_)
                | StageFailure::Builtin { param: None, .. }
        )
    }

    /// One line: for a command, how it ended and the last line of its stderr (what a retry
    /// notice shows); else the message's first line.
    pub fn brief(&self) -> String {
        match self {
            StageFailure::Command { end, tail, .. } => {
                let ended = match end {
                    CommandEnd::Exit(code) => format!("exit status {code}"),
                    CommandEnd::Signal(signal) => format!("killed by signal {signal}"),
                };
                match tail.lines().rev().find(|l| !l.trim().is_empty()) {
                    Some(last) => format!("{ended}: {}", last.trim()),
                    None => ended,
                }
            }
            other => other
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// The command's exit status, for the run record.
    pub fn exit_status(&self) -> Option<i32> {
        match self {
            StageFailure::Command {
                end: CommandEnd::Exit(code),
                ..
            } => Some(*code),
            _ => None,
        }
    }

    /// The log to read, when there is one.
    pub fn log(&self) -> Option<&PathBuf> {
        match self {
            StageFailure::Command { log, .. } | StageFailure::Job { log, .. } => Some(log),
            _ => None,
        }
    }
}

impl fmt::Display for StageFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StageFailure::InputMissing { path } => write!(f, "input `{path}` is missing"),
            StageFailure::Command {
                end, command, tail, ..
            } => {
                match end {
                    CommandEnd::Exit(code) => write!(f, "command failed with exit status {code}")?,
                    // SIGKILL from outside is most often the kernel's OOM killer.
                    CommandEnd::Signal(9) => write!(
                        f,
                        "command was killed by signal 9 (SIGKILL: out of memory?)"
                    )?,
                    CommandEnd::Signal(signal) => {
                        write!(f, "command was killed by signal {signal}")?
                    }
                }
                write!(f, ": {command}")?;
                if !tail.is_empty() {
                    write!(f, "\n--- last lines of its stderr\n{tail}")?;
                }
                Ok(())
            }
            StageFailure::Cancelled => f.write_str(imba_stages::CANCELLED),
            StageFailure::Builtin { message, .. } => f.write_str(message),
            StageFailure::MissingOutput { output, hint } => {
                write!(f, "stage did not write its output `{output}`")?;
                if let Some(hint) = hint {
                    write!(f, " ({hint})")?;
                }
                Ok(())
            }
            StageFailure::TimedOut { after } => write!(
                f,
                "timed out after {} (its `timeout`): stopped as Ctrl-C stops a stage",
                humantime::format_duration(*after)
            ),
            StageFailure::Job { message, .. } => f.write_str(message),
            StageFailure::Checks(message)
            | StageFailure::Storage(message)
            | StageFailure::Other(message) => f.write_str(message),
        }
    }
}
