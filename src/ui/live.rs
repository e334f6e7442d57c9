//! What runs now: the live files of running runs (`run::live`), followed with inotify and
//! passed to every open page as server-sent events.
//!
//! Nothing polls: the watcher wakes only when a run writes a line or a run record, so an idle
//! server costs no CPU.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::Watcher;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::run::live::LiveLine;
use crate::state::StateDir;

/// One message to the pages.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    /// Which workdir (in the order the app was given them).
    pub workdir: usize,
    /// `stage` (a line of a live file) or `record` (a run record was written).
    pub kind: &'static str,
    pub run: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<LiveLine>,
}

/// The watchers and the channel the pages listen on.
pub struct Live {
    pub sender: broadcast::Sender<String>,
    pub workdirs: Vec<PathBuf>,
    _watchers: Vec<notify::RecommendedWatcher>,
}

impl Live {
    /// Watches each workdir's `.imba/live/` and `.imba/runs/` (made if missing).
    pub fn start(workdirs: &[PathBuf]) -> Result<Live, String> {
        let (sender, _) = broadcast::channel(1024);
        let mut watchers = Vec::new();
        let mut unique: Vec<PathBuf> = Vec::new();
        for workdir in workdirs {
            if !unique.contains(workdir) {
                unique.push(workdir.clone());
            }
        }
        for (w, workdir) in unique.iter().enumerate() {
            let state = StateDir::new(workdir);
            let offsets: Arc<Mutex<HashMap<PathBuf, u64>>> = Default::default();
            let tx = sender.clone();
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    let Ok(event) = event else { return };
                    if matches!(event.kind, notify::EventKind::Access(_)) {
                        return;
                    }
                    for path in event.paths {
                        for message in messages(w, &path, &offsets) {
                            if let Ok(text) = serde_json::to_string(&message) {
                                let _ = tx.send(text);
                            }
                        }
                    }
                })
                .map_err(|e| format!("cannot watch for runs: {e}"))?;
            for dir in [state.live(), state.runs()] {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
                watcher
                    .watch(&dir, notify::RecursiveMode::NonRecursive)
                    .map_err(|e| format!("cannot watch `{}`: {e}", dir.display()))?;
            }
            watchers.push(watcher);
        }
        Ok(Live {
            sender,
            workdirs: unique,
            _watchers: watchers,
        })
    }

    /// The index of `workdir` among the watched ones.
    pub fn index_of(&self, workdir: &Path) -> usize {
        self.workdirs
            .iter()
            .position(|w| w == workdir)
            .unwrap_or(usize::MAX)
    }
}

/// What changed at `path`: the new lines of a live file, or a record written.
fn messages(workdir: usize, path: &Path, offsets: &Mutex<HashMap<PathBuf, u64>>) -> Vec<Message> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    if let Some(run) = name.strip_suffix(".json") {
        if path.is_file() {
            return vec![Message {
                workdir,
                kind: "record",
                run: run.to_owned(),
                line: None,
            }];
        }
        return Vec::new();
    }
    let Some(run) = name.strip_suffix(".jsonl") else {
        return Vec::new();
    };
    let mut offsets = offsets.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(mut file) = std::fs::File::open(path) else {
        offsets.remove(path);
        return Vec::new();
    };
    let from = offsets.get(path).copied().unwrap_or(0);
    let mut text = String::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    // Only whole lines: the rest is read with the next write.
    let whole = text.rfind('\n').map_or(0, |at| at + 1);
    offsets.insert(path.to_owned(), from + whole as u64);
    text[..whole]
        .lines()
        .filter_map(|line| serde_json::from_str::<LiveLine>(line).ok())
        .map(|line| Message {
            workdir,
            kind: "stage",
            run: run.to_owned(),
            line: Some(line),
        })
        .collect()
}

/// The runs going on in `workdir` now: each live file whose process is alive, with its lines.
pub fn running(workdir: &Path) -> Vec<(String, Vec<LiveLine>)> {
    let dir = StateDir::new(workdir).live();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Some(run) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".jsonl"))
        else {
            continue;
        };
        let lines = crate::run::live::read(&path);
        let alive = lines.first().and_then(|l| l.pid).is_some_and(process_alive);
        if alive {
            found.push((run.to_owned(), lines));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Whether a process of this machine with this pid is alive.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 checks that the process exists and sends nothing.
    unsafe {
        libc::kill(pid, 0) == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}
