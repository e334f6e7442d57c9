//! A running run's events as JSON lines under `.imba/live/`, for `imba ui` to follow.
//!
//! A run appends one line per stage event to `.imba/live/RUN.jsonl` while it runs, and removes
//! the file once its run record is saved: whoever watches the folder (with inotify, not a
//! polling loop) learns of every stage that starts or ends. The first line names the run's
//! process, so a file left by a killed run is told from a live one.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Event, Events};

/// One line of a live file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveLine {
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// Empty for the run's own line (the first).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stage: String,
    /// `started` (the run), `running`, `restoring`, `queued`, `retrying`, `waiting`, `done`,
    /// `skipped`, `cached`, `failed`, `blocked` or `cancelled`.
    pub state: String,
    /// The run's process (on its first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why it runs, how it failed, what it waits for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The events of a run, passed on to `inner` and written to the run's live file.
pub struct Tee {
    inner: Arc<dyn Events>,
    file: Mutex<Option<std::fs::File>>,
    path: PathBuf,
}

impl Tee {
    /// Writes to `path` (created now, with the run's line) what `inner` is told.
    pub fn new(path: PathBuf, inner: Arc<dyn Events>) -> Arc<Tee> {
        let file = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .ok()
            .and_then(|_| std::fs::File::create(&path).ok());
        let tee = Arc::new(Tee {
            inner,
            file: Mutex::new(file),
            path,
        });
        tee.write(LiveLine {
            at: now_ms(),
            stage: String::new(),
            state: "started".to_owned(),
            pid: Some(std::process::id()),
            detail: String::new(),
        });
        tee
    }

    /// The run is recorded: the live file goes.
    pub fn close(&self) {
        if let Ok(mut file) = self.file.lock() {
            *file = None;
        }
        let _ = std::fs::remove_file(&self.path);
    }

    fn write(&self, line: LiveLine) {
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        if let Some(f) = file.as_mut() {
            let mut text = serde_json::to_string(&line).unwrap_or_default();
            text.push('\n');
            // One write per line, so a reader never sees half of one (an append of a few
            // hundred bytes is not split).
            if f.write_all(text.as_bytes()).is_err() {
                *file = None;
            }
        }
    }
}

/// Removes the live files of earlier runs: called by a run that holds the workdir's lock, so
/// that whatever is there was left by a run that was killed.
pub fn sweep(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "jsonl") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Closes its [`Tee`] when dropped.
pub struct Closes(pub Arc<Tee>);

impl Drop for Closes {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Events for Tee {
    fn event(&self, event: Event) {
        if let Some((stage, state, detail)) = line_of(&event) {
            self.write(LiveLine {
                at: now_ms(),
                stage,
                state: state.to_owned(),
                pid: None,
                detail,
            });
        }
        self.inner.event(event);
    }

    fn finish(&self) {
        self.inner.finish();
    }
}

/// A stage event's stage, state and detail; none for the others.
fn line_of(event: &Event) -> Option<(String, &'static str, String)> {
    Some(match event {
        Event::StageRunning { name, reasons } => (name.clone(), "running", reasons.join("; ")),
        Event::StageRestoring { name, reasons } => (name.clone(), "restoring", reasons.join("; ")),
        Event::StageSkipped { name } => (name.clone(), "skipped", String::new()),
        Event::StageCached { name } => (name.clone(), "cached", String::new()),
        Event::StageDone { name, duration, .. } => {
            (name.clone(), "done", format!("{} ms", duration.as_millis()))
        }
        Event::StageFailed { name, error, .. } => (name.clone(), "failed", first_line(error)),
        Event::StageBlocked { name, by } => (name.clone(), "blocked", format!("by {by}")),
        Event::StageCancelled { name } => (name.clone(), "cancelled", String::new()),
        Event::StageQueued { name, .. } => (name.clone(), "queued", String::new()),
        Event::StageWaiting { name, holder, .. } => {
            (name.clone(), "waiting", format!("for {holder}"))
        }
        Event::StageRetrying {
            name,
            attempt,
            attempts,
            error,
            ..
        } => (
            name.clone(),
            "retrying",
            format!("attempt {attempt} of {attempts}: {}", first_line(error)),
        ),
        Event::Waiting { .. } | Event::Started { .. } | Event::Warning(_) => return None,
    })
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The lines of a live file that parse (a line being written is left for the next read).
pub fn read(path: &std::path::Path) -> Vec<LiveLine> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl Events for Nothing {
        fn event(&self, _: Event) {}
    }

    #[test]
    fn a_run_leaves_its_lines_until_it_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live").join("r1.jsonl");
        let tee = Tee::new(path.clone(), Arc::new(Nothing));
        tee.event(Event::StageRunning {
            name: "clean".into(),
            reasons: vec!["input changed".into()],
        });
        tee.event(Event::Warning("not a stage".into()));
        tee.event(Event::StageFailed {
            name: "clean".into(),
            error: "exit 3\nmore".into(),
            log: None,
            param: None,
        });
        let lines = read(&path);
        let states: Vec<_> = lines.iter().map(|l| l.state.as_str()).collect();
        assert_eq!(states, ["started", "running", "failed"]);
        assert_eq!(lines[0].pid, Some(std::process::id()));
        assert_eq!(lines[1].detail, "input changed");
        assert_eq!(lines[2].detail, "exit 3");
        tee.close();
        assert!(!path.exists());
    }

    #[test]
    fn a_killed_runs_file_is_swept_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.jsonl"), "{}\n").unwrap();
        std::fs::write(dir.path().join("keep.txt"), "").unwrap();
        sweep(dir.path());
        assert!(!dir.path().join("old.jsonl").exists());
        assert!(dir.path().join("keep.txt").exists());
    }
}
