//! The `.imba/` directory in a pipeline's workdir: stat cache, run records, logs, staging, and
//! the lock that keeps two runs from writing at once.

pub mod lock;
pub mod record;

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Paths under `.imba/`.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(workdir: &Path) -> Self {
        StateDir {
            root: workdir.join(".imba"),
        }
    }

    pub fn stat_cache(&self) -> PathBuf {
        self.root.join("stat-cache.json")
    }

    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Running runs' events, a file each (`run::live`).
    pub fn live(&self) -> PathBuf {
        self.root.join("live")
    }

    pub fn logs(&self, run: &str) -> PathBuf {
        self.root.join("logs").join(run)
    }

    pub fn staging(&self, run: &str) -> PathBuf {
        self.root.join("staging").join(run)
    }

    /// Downloaded S3 objects, by ETag.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn quarantine(&self, run: &str) -> PathBuf {
        self.root.join("quarantine").join(run)
    }

    /// Takes the run lock, waiting for another run to finish unless `wait` is false.
    /// `on_wait` is called once, with the other run's pid when known, before waiting.
    pub fn lock(
        &self,
        wait: bool,
        on_wait: impl FnOnce(Option<u32>),
    ) -> io::Result<Option<RunLock>> {
        std::fs::create_dir_all(&self.root)?;
        let path = self.root.join("run.lock");
        // Only a regular file: a FIFO put there would otherwise be locked and written to.
        let mut file = imba_stages::safe::open_with(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            &path,
        )
        .map_err(|e| named(e, &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                if !wait {
                    return Ok(None);
                }
                on_wait(pid.trim().parse().ok());
                file.lock()?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Some(RunLock { _file: file }))
    }
}

/// An error about a file under `.imba/` that is not a regular file, naming it: the callers'
/// messages name only the directory.
pub(crate) fn named(error: io::Error, path: &Path) -> io::Error {
    match imba_stages::safe::NotAFile::of(&error) {
        Some(not) => not.clone().naming(path).into_io(),
        None => error,
    }
}

/// Held for the length of a run; released when dropped (or when the process dies).
pub struct RunLock {
    _file: File,
}

/// A run id that sorts by time: `20261124T221003.123Z-1a2b`.
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_millis(now)
        .to_string()
        .replace(['-', ':'], "");
    let nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{stamp}-{:04x}", (nanos ^ std::process::id()) & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_run_lock_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::create_dir_all(&state.root).unwrap();
        let path = state.root.join("run.lock");
        crate::store::hash::tests::mkfifo(&path);
        let error = state.lock(false, |_| {}).err().expect("a FIFO");
        assert_eq!(
            error.to_string(),
            format!(
                "`{}` is a FIFO (named pipe), not a regular file",
                path.display()
            )
        );
        // A regular one is taken, and holds the pid.
        std::fs::remove_file(&path).unwrap();
        let held = state.lock(false, |_| {}).unwrap();
        assert!(held.is_some());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
    }
}
