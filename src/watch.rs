//! `imba watch`: runs what is stale, then re-runs exactly what each change to the pipeline's
//! source data, its file or its vars files affects.
//!
//! Local files are watched with notify (inotify on Linux): the directory holding each source file
//! or config file, and each source directory recursively. Events pass a filter (only source
//! inputs and config files count, so imba's own writes never do), a debounce, and a settle check
//! (a file still open for writing is waited for; a removed one is waited for until it is back).
//! Then the stages reading the changed inputs, with everything downstream, are the selection of
//! an ordinary run, and the content hashes decide what actually runs: a save with identical bytes
//! runs nothing. S3 inputs send no events; they are polled with HEAD or LIST.
//!
//! Runs happen on their own thread; the loop keeps listening meanwhile, so a change during a run
//! is queued and coalesced into one follow-up run, or (`--restart`) cancels the run and starts
//! again. Ctrl-C cancels the current run (a second one kills it) and ends the watch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imba_stages::Registry;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;

use crate::config::LoadError;
use crate::diagnostic::Sources;
use crate::graph::dag::Dag;
use crate::interrupt::Stop;
use crate::model::location::normalize;
use crate::model::Declared;
use crate::plan::{self, Selection};
use crate::run::{self, RunError, RunOptions, RunSummary};
use crate::store::{S3Store, Store};

/// How to watch.
#[derive(Clone, Debug)]
pub struct Options {
    /// Quiet time after the last event before anything runs.
    pub debounce: Duration,
    /// How often S3 inputs are looked at.
    pub poll_interval: Duration,
    /// Cancel a run in progress when a change arrives, instead of queueing the change.
    pub restart: bool,
    pub jobs: usize,
    pub budget: crate::run::admit::Budget,
    pub keep_going: bool,
}

/// Reloads the pipeline after its file or a vars file changed.
pub type Loader<'a> = &'a dyn Fn() -> (Sources, Result<Dag, LoadError>);

/// What the watch tells the person watching, through its [`Listener`].
#[derive(Debug)]
pub enum Event {
    /// Idle, listening.
    Watching {
        files: usize,
        dirs: usize,
        s3: usize,
        config: usize,
    },
    /// Inputs changed; these stages are stale and run now.
    Changed {
        what: Vec<String>,
        stages: Vec<String>,
    },
    /// Inputs were written, but nothing is stale: identical content.
    Unchanged {
        what: Vec<String>,
    },
    /// A changed file is still open for writing, or is gone.
    Waiting {
        what: String,
        removed: bool,
    },
    /// The pipeline was reloaded after one of its files changed.
    Reloaded {
        what: Vec<String>,
    },
    /// A `discover:` pattern matches a new path: the pipeline has new partitions.
    Discovered {
        set: String,
        keys: Vec<String>,
    },
    /// The edited pipeline is invalid; the last valid one stays in force.
    Invalid {
        sources: Sources,
        error: LoadError,
    },
    /// A change arrived during a run; it runs after it.
    Queued {
        what: Vec<String>,
    },
    /// A change arrived during a run, which is cancelled to start again (`--restart`).
    Restarting {
        what: Vec<String>,
    },
    /// A run ended.
    Finished(RunSummary),
    /// A run could not start or ended in an error of imba's own (not a stage's).
    RunError(RunError),
    /// Ctrl-C: what is running is cancelled, then the watch ends.
    Stopping {
        running: bool,
    },
    Warning(String),
}

/// Where a watch's events go (the printer, in the CLI): its own, and those of each run it starts.
pub trait Listener {
    fn watch(&self, event: &Event);
    /// The sink of one run's events; `sources` are the pipeline's, for diagnostics.
    fn run_events(&self, sources: Arc<Sources>) -> Arc<dyn run::Events>;
}

/// Watches until interrupted. `dag` is the pipeline as loaded by the caller, `config_files` the
/// pipeline file and vars files whose edits reload it through `load`.
pub fn watch(
    dag: Dag,
    sources: Sources,
    load: Loader,
    config_files: Vec<PathBuf>,
    registry: Registry,
    options: Options,
    printer: &dyn Listener,
) -> Result<(), String> {
    let _armed = crate::interrupt::arm();
    let (tx, rx) = mpsc::channel();
    forward_signals(crate::interrupt::listen(), tx.clone())?;
    let events = tx.clone();
    let watcher = notify::recommended_watcher(move |event| {
        let _ = events.send(Message::Fs(event));
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    let config_files = config_files.iter().map(|f| absolute(f)).collect();
    let mut state = State {
        printer,
        load,
        registry,
        options,
        targets: Targets::new(&dag, config_files),
        dag: Arc::new(dag),
        sources: Arc::new(sources),
        watcher,
        registered: BTreeMap::new(),
        pending: Pending::default(),
        running: None,
        stopping: false,
        tx,
        polling: false,
        next_poll: None,
    };
    state.rewatch();
    // What was stale before the watch began runs first, as `imba run` would.
    state.pending.all = true;
    state.pending.last_event = Some(Instant::now() - state.options.debounce);
    state.main_loop(rx);
    Ok(())
}

/// Turns stop requests (Ctrl-C, SIGTERM) into messages for the loop.
fn forward_signals(
    mut stop: watch::Receiver<Stop>,
    tx: mpsc::Sender<Message>,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    std::thread::Builder::new()
        .name("imba-watch-signals".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                while stop.changed().await.is_ok() {
                    let level = *stop.borrow_and_update();
                    if tx.send(Message::Stop(level)).is_err() {
                        break;
                    }
                }
            })
        })
        .map(drop)
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

enum Message {
    Fs(notify::Result<notify::Event>),
    Stop(Stop),
    RunDone(Result<RunSummary, RunError>),
    /// S3 sources' identities, and the new partitions S3 `discover:` patterns found.
    Polled(Vec<(usize, Option<String>)>, Vec<(String, String)>),
}

/// One local source input: a file or a directory no stage writes.
#[derive(Debug)]
struct LocalSource {
    dir: bool,
    /// As the pipeline writes it.
    shown: String,
    stages: BTreeSet<usize>,
}

/// One remote source input, polled.
#[derive(Debug)]
struct S3Source {
    declared: Declared,
    shown: String,
    stages: BTreeSet<usize>,
    /// The identity last seen; `None` before the first look or while absent.
    seen: Option<Option<String>>,
}

/// What a change can be about, from the current pipeline.
#[derive(Debug, Default)]
struct Targets {
    local: BTreeMap<PathBuf, LocalSource>,
    s3: Vec<S3Source>,
    /// The pipeline file and vars files, absolute.
    config: BTreeSet<PathBuf>,
    /// imba's own: `.imba/`, the lock file, every output.
    ignored: Vec<PathBuf>,
    /// Each local `discover:` pattern: its prefix (absolute), the pattern, its set, the keys
    /// the pipeline has now.
    discover: Vec<(PathBuf, crate::model::Discover, String, BTreeSet<String>)>,
    /// Each S3 `discover:` pattern, listed at every poll: its prefix, the pattern, its set, the
    /// keys the pipeline has now.
    s3_discover: Vec<(Declared, crate::model::Discover, String, BTreeSet<String>)>,
}

impl Targets {
    fn new(dag: &Dag, config: BTreeSet<PathBuf>) -> Self {
        let pipeline = dag.pipeline();
        let mut targets = Targets {
            config,
            ..Targets::default()
        };
        for &(stage, input) in dag.sources() {
            let port = &dag.stage(stage).inputs[input];
            match port.declared.location.local_path() {
                Some(path) => {
                    let source =
                        targets
                            .local
                            .entry(path.to_path_buf())
                            .or_insert_with(|| LocalSource {
                                dir: port.declared.dir || path.is_dir(),
                                shown: port.text.clone(),
                                stages: BTreeSet::new(),
                            });
                    source.stages.insert(stage);
                }
                None => {
                    match targets
                        .s3
                        .iter_mut()
                        .find(|s| s.declared.location == port.declared.location)
                    {
                        Some(source) => {
                            source.stages.insert(stage);
                        }
                        None => targets.s3.push(S3Source {
                            declared: port.declared.clone(),
                            shown: port.text.clone(),
                            stages: BTreeSet::from([stage]),
                            seen: None,
                        }),
                    }
                }
            }
        }
        for set in &pipeline.partitions {
            let Some(discover) = &set.discover else {
                continue;
            };
            let Ok(prefix) = Declared::parse(&discover.prefix, &pipeline.workdir) else {
                continue;
            };
            let keys: BTreeSet<String> = set.keys.iter().cloned().collect();
            match prefix.location.local_path() {
                Some(path) => targets.discover.push((
                    absolute(path),
                    discover.clone(),
                    set.name.clone(),
                    keys,
                )),
                None => {
                    targets
                        .s3_discover
                        .push((prefix, discover.clone(), set.name.clone(), keys))
                }
            }
        }
        let state = crate::state::StateDir::new(&pipeline.workdir);
        targets.ignored.push(absolute(&state.root));
        targets
            .ignored
            .push(absolute(&crate::state::lock::lock_path(&pipeline.file)));
        for stage in &pipeline.stages {
            for port in &stage.outputs {
                if let Some(path) = port.declared.location.local_path() {
                    targets.ignored.push(path.to_path_buf());
                }
            }
        }
        targets
    }

    /// The directories to watch: the one holding each source file and config file (or its
    /// nearest existing ancestor), and each existing source directory, recursively.
    fn directories(&self) -> BTreeMap<PathBuf, RecursiveMode> {
        let mut wanted: BTreeMap<PathBuf, RecursiveMode> = BTreeMap::new();
        let mut add = |path: &Path, mode: RecursiveMode| {
            let entry = wanted.entry(path.to_path_buf()).or_insert(mode);
            if mode == RecursiveMode::Recursive {
                *entry = mode;
            }
        };
        for (path, source) in &self.local {
            if source.dir && path.is_dir() {
                add(path, RecursiveMode::Recursive);
            }
            if let Some(parent) = existing_parent(path) {
                add(&parent, RecursiveMode::NonRecursive);
            }
        }
        for file in &self.config {
            if let Some(parent) = existing_parent(file) {
                add(&parent, RecursiveMode::NonRecursive);
            }
        }
        for (prefix, _, _, _) in &self.discover {
            if prefix.is_dir() {
                add(prefix, RecursiveMode::Recursive);
            } else if let Some(parent) = existing_parent(prefix) {
                add(&parent, RecursiveMode::NonRecursive);
            }
        }
        wanted
    }

    /// The sets and keys of partitions the pipeline does not have yet, when `path` (or, a new
    /// directory, a file in it: its files may come before its watch) matches a `discover:`
    /// pattern with a new key.
    fn new_partitions(&self, path: &Path) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for (prefix, discover, set, keys) in &self.discover {
            if !path.starts_with(prefix) {
                continue;
            }
            let files: Vec<PathBuf> = if path.is_dir() {
                walkdir::WalkDir::new(path)
                    .max_depth(8)
                    .into_iter()
                    .flatten()
                    .filter(|e| e.file_type().is_file())
                    .map(|e| e.into_path())
                    .collect()
            } else {
                vec![path.to_path_buf()]
            };
            for file in files {
                let key = file
                    .strip_prefix(prefix)
                    .ok()
                    .and_then(|r| r.to_str())
                    .and_then(|r| discover.key_of(r));
                if let Some(key) = key.filter(|k| !keys.contains(k)) {
                    found.push((set.clone(), key));
                }
            }
        }
        found
    }

    fn ignored(&self, path: &Path) -> bool {
        self.ignored.iter().any(|i| path.starts_with(i))
    }

    /// The local sources a change at `path` may affect: the source itself, a file inside a
    /// source directory, or a directory holding sources (renamed or removed as a whole).
    fn affected(&self, path: &Path) -> Vec<&Path> {
        let mut found: Vec<&Path> = path
            .ancestors()
            .filter_map(|a| self.local.get_key_value(a))
            .filter(|(p, s)| s.dir || p.as_path() == path)
            .map(|(p, _)| p.as_path())
            .collect();
        found.extend(
            self.local
                .range(path.to_path_buf()..)
                .skip_while(|(p, _)| p.as_path() == path)
                .take_while(|(p, _)| p.starts_with(path))
                .map(|(p, _)| p.as_path()),
        );
        found
    }

    fn is_config(&self, path: &Path) -> bool {
        self.config.iter().any(|c| c.starts_with(path))
    }
}

/// The changes not yet acted on.
#[derive(Debug, Default)]
struct Pending {
    /// Local sources that changed.
    local: BTreeSet<PathBuf>,
    /// S3 sources (indices into [`Targets::s3`]) whose identity changed.
    s3: BTreeSet<usize>,
    /// The pipeline file or a vars file changed.
    config: BTreeSet<PathBuf>,
    /// New partitions (set, key) matched by a `discover:` pattern.
    discovered: BTreeSet<(String, String)>,
    /// Everything stale runs: the first run, and after a reload.
    all: bool,
    /// Stage names of a run cancelled by `--restart`, to run again.
    carried: BTreeSet<String>,
    /// Files written to and not closed yet, with the time of their last write.
    open: BTreeMap<PathBuf, Instant>,
    last_event: Option<Instant>,
    /// Already said "waiting for …" about these.
    announced: BTreeSet<PathBuf>,
    /// Already said "queued" for this batch.
    queued: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.local.is_empty()
            && self.s3.is_empty()
            && self.config.is_empty()
            && self.discovered.is_empty()
            && !self.all
            && self.carried.is_empty()
    }
}

struct Running {
    stop: watch::Sender<Stop>,
    /// Stage names it was started for (empty: all).
    stages: BTreeSet<String>,
    all: bool,
    cancelled: bool,
}

struct State<'a> {
    printer: &'a dyn Listener,
    load: Loader<'a>,
    registry: Registry,
    options: Options,
    targets: Targets,
    dag: Arc<Dag>,
    sources: Arc<Sources>,
    watcher: notify::RecommendedWatcher,
    registered: BTreeMap<PathBuf, RecursiveMode>,
    pending: Pending,
    running: Option<Running>,
    stopping: bool,
    tx: mpsc::Sender<Message>,
    /// An S3 poll is under way.
    polling: bool,
    /// When S3 sources are next polled.
    next_poll: Option<Instant>,
}

/// How long a file written to and not closed may stay quiet before it counts as settled anyway:
/// a writer that keeps its file open for good (a log), rather than a copy that stalls a while.
fn settle_limit(debounce: Duration) -> Duration {
    (debounce * 10).max(Duration::from_secs(30))
}

impl State<'_> {
    fn main_loop(&mut self, rx: mpsc::Receiver<Message>) {
        loop {
            if self.targets.s3.is_empty() && self.targets.s3_discover.is_empty() {
                self.next_poll = None;
            } else if self.next_poll.is_none() && !self.polling {
                self.next_poll = Some(Instant::now());
            }
            let deadline = self.deadline();
            let wake = [deadline, self.next_poll].into_iter().flatten().min();
            let received = match wake {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(Message::Fs(event)) => self.on_fs(event),
                Ok(Message::Stop(level)) => {
                    if self.on_stop(level) {
                        return;
                    }
                }
                Ok(Message::RunDone(result)) => {
                    self.on_run_done(result);
                    if self.stopping {
                        return;
                    }
                }
                Ok(Message::Polled(seen, discovered)) => self.on_polled(seen, discovered),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    if self.next_poll.is_some_and(|at| at <= now) {
                        self.next_poll = None;
                        self.poll_s3();
                    }
                    if deadline.is_some_and(|at| at <= now) {
                        self.on_deadline();
                    }
                }
            }
        }
    }

    /// When the pending changes are next looked at, if at all.
    fn deadline(&self) -> Option<Instant> {
        if self.pending.is_empty() || self.stopping {
            return None;
        }
        if self
            .running
            .as_ref()
            .is_some_and(|r| !self.options.restart || r.cancelled)
        {
            // Looked at again when the run is done.
            return None;
        }
        let last = self.pending.last_event?;
        let quiet = last + self.options.debounce;
        let unannounced = |path: &PathBuf| !self.pending.announced.contains(path);
        match self.pending.open.values().min() {
            // Quiet: say what is still being written, then wait for its close.
            Some(_) if self.pending.open.keys().any(unannounced) => Some(quiet),
            Some(&oldest) => Some(quiet.max(oldest + settle_limit(self.options.debounce))),
            None => Some(quiet),
        }
    }

    fn on_fs(&mut self, event: notify::Result<notify::Event>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                self.printer
                    .watch(&Event::Warning(format!("file watching: {e}")));
                return;
            }
        };
        let now = Instant::now();
        if event.need_rescan() {
            // Events were lost: every source may have changed; the hashes decide.
            self.pending
                .local
                .extend(self.targets.local.keys().cloned());
            self.pending.last_event = Some(now);
            self.rewatch();
            return;
        }
        let kind = event.kind;
        if matches!(
            kind,
            EventKind::Access(AccessKind::Open(_) | AccessKind::Read)
        ) || matches!(kind, EventKind::Access(AccessKind::Close(AccessMode::Read)))
        {
            return;
        }
        let mut relevant = false;
        for path in &event.paths {
            let path = normalize(path);
            if self.targets.ignored(&path) {
                continue;
            }
            let config = self.targets.is_config(&path);
            let affected: Vec<PathBuf> = self
                .targets
                .affected(&path)
                .into_iter()
                .map(Path::to_path_buf)
                .collect();
            let discovered = self.targets.new_partitions(&path);
            if !config && affected.is_empty() && discovered.is_empty() {
                continue;
            }
            relevant = true;
            self.pending.discovered.extend(discovered);
            if config {
                self.pending.config.extend(
                    self.targets
                        .config
                        .iter()
                        .filter(|c| c.starts_with(&path))
                        .cloned(),
                );
            }
            self.pending.local.extend(affected);
            // A file counts as still being written from a write until its close. Only inotify
            // reports closes; elsewhere the debounce alone decides.
            if cfg!(target_os = "linux") {
                match kind {
                    EventKind::Modify(ModifyKind::Data(_))
                    | EventKind::Create(notify::event::CreateKind::File) => {
                        self.pending.open.insert(path.clone(), now);
                    }
                    EventKind::Access(AccessKind::Close(_))
                    | EventKind::Modify(ModifyKind::Name(_))
                    | EventKind::Remove(_) => {
                        self.pending.open.remove(&path);
                    }
                    _ => {}
                }
            }
        }
        if relevant {
            self.pending.last_event = Some(now);
            self.say_queued();
        }
        if matches!(
            kind,
            EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        ) {
            // A directory appeared or went: what can be watched may have changed.
            self.rewatch();
        }
    }

    /// Brings the watched directories in line with the targets.
    fn rewatch(&mut self) {
        let wanted = self.targets.directories();
        let stale: Vec<PathBuf> = self
            .registered
            .iter()
            .filter(|(path, mode)| wanted.get(*path) != Some(*mode) || !path.is_dir())
            .map(|(path, _)| path.clone())
            .collect();
        for path in stale {
            let _ = self.watcher.unwatch(&path);
            self.registered.remove(&path);
        }
        for (path, mode) in wanted {
            if self.registered.contains_key(&path) {
                continue;
            }
            match self.watcher.watch(&path, mode) {
                Ok(()) => {
                    self.registered.insert(path, mode);
                }
                Err(e) => self.printer.watch(&Event::Warning(format!(
                    "cannot watch {}: {e}",
                    path.display()
                ))),
            }
        }
    }

    /// The pending changes have settled (or are worth looking at): act on them.
    fn on_deadline(&mut self) {
        let now = Instant::now();
        let limit = settle_limit(self.options.debounce);
        self.pending
            .open
            .retain(|path, last| path.exists() && now.duration_since(*last) < limit);
        if !self.pending.open.is_empty() {
            let open: Vec<PathBuf> = self.pending.open.keys().cloned().collect();
            for path in open {
                if self.pending.announced.insert(path.clone()) {
                    let what = self.shown(&path);
                    self.printer.watch(&Event::Waiting {
                        what,
                        removed: false,
                    });
                }
            }
            // Looked at again at its close, or when its writer has been quiet too long.
            return;
        }
        // A source file that is gone (deleted, or between delete and create) is waited for.
        let missing: Vec<PathBuf> = self
            .pending
            .local
            .iter()
            .filter(|p| !p.exists())
            .cloned()
            .collect();
        for path in missing {
            self.pending.local.remove(&path);
            if self.pending.announced.insert(path.clone()) {
                let what = self.shown(&path);
                self.printer.watch(&Event::Waiting {
                    what,
                    removed: true,
                });
            }
        }
        if self.pending.is_empty() {
            return;
        }
        if let Some(running) = &mut self.running {
            // Only with --restart: cancel the run and start again when it has stopped.
            if !running.cancelled {
                running.cancelled = true;
                running.stop.send_replace(Stop::Cancel);
                let what = self.what_changed();
                self.printer.watch(&Event::Restarting { what });
            }
            return;
        }
        self.start();
    }

    /// How a changed path is shown: as the pipeline writes the source, else relative to the
    /// working directory.
    fn shown(&self, path: &Path) -> String {
        if let Some(source) = self.targets.local.get(path) {
            return source.shown.clone();
        }
        let cwd = std::env::current_dir().unwrap_or_default();
        path.strip_prefix(&cwd)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn what_changed(&self) -> Vec<String> {
        let mut what: Vec<String> = self.pending.config.iter().map(|p| self.shown(p)).collect();
        what.extend(self.pending.local.iter().map(|p| self.shown(p)));
        what.extend(
            self.pending
                .s3
                .iter()
                .filter_map(|&i| self.targets.s3.get(i))
                .map(|s| s.shown.clone()),
        );
        what
    }

    /// Starts a run for the pending changes, or says why none is needed.
    fn start(&mut self) {
        let what = self.what_changed();
        let pending = std::mem::take(&mut self.pending);
        let mut all = pending.all;
        if !pending.config.is_empty() || !pending.discovered.is_empty() {
            match self.reload() {
                Ok(()) => {
                    if !pending.config.is_empty() {
                        self.printer.watch(&Event::Reloaded {
                            what: pending.config.iter().map(|p| self.shown(p)).collect(),
                        });
                    }
                    let mut sets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                    for (set, key) in &pending.discovered {
                        sets.entry(set).or_default().push(key.clone());
                    }
                    for (set, keys) in sets {
                        self.printer.watch(&Event::Discovered {
                            set: set.to_owned(),
                            keys,
                        });
                    }
                    all = true;
                }
                Err((sources, error)) => {
                    self.printer.watch(&Event::Invalid { sources, error });
                }
            }
        }
        let mut names: BTreeSet<String> = pending.carried;
        for path in &pending.local {
            if let Some(source) = self.targets.local.get(path) {
                names.extend(
                    source
                        .stages
                        .iter()
                        .map(|&s| self.dag.stage(s).name.clone()),
                );
            }
        }
        for &i in &pending.s3 {
            if let Some(source) = self.targets.s3.get(i) {
                names.extend(
                    source
                        .stages
                        .iter()
                        .map(|&s| self.dag.stage(s).name.clone()),
                );
            }
        }
        // A stage may be gone after a reload.
        names.retain(|n| {
            self.dag
                .order()
                .iter()
                .any(|&s| self.dag.stage(s).name == *n)
        });
        if !all && names.is_empty() {
            self.idle();
            return;
        }
        let selection = Selection {
            stages: if all {
                Vec::new()
            } else {
                names.iter().cloned().collect()
            },
            downstream: !all,
            force: false,
            partitions: None,
        };
        let stale = match plan::status(&self.dag, &selection, |w| {
            self.printer.watch(&Event::Warning(w))
        }) {
            Ok(statuses) => statuses
                .into_iter()
                .filter(|s| s.stale)
                .map(|s| s.name)
                .collect::<Vec<_>>(),
            Err(error) => {
                self.printer.watch(&Event::RunError(error.into()));
                self.idle();
                return;
            }
        };
        if stale.is_empty() {
            if !what.is_empty() {
                self.printer.watch(&Event::Unchanged { what });
            }
            self.idle();
            return;
        }
        self.printer.watch(&Event::Changed {
            what,
            stages: stale,
        });
        let (stop, stop_rx) = watch::channel(Stop::Go);
        let options = RunOptions {
            jobs: self.options.jobs,
            budget: self.options.budget,
            selection,
            keep_going: self.options.keep_going,
            no_wait: false,
            stop: stop_rx,
            remote: Default::default(),
            restore_only: false,
        };
        let dag = self.dag.clone();
        let registry = self.registry.clone();
        let events = self.printer.run_events(self.sources.clone());
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("imba-run".to_owned())
            .spawn(move || {
                let result = run::run(dag, registry, options, events.clone());
                events.finish();
                let _ = tx.send(Message::RunDone(result));
            });
        match spawned {
            Ok(_) => {
                self.running = Some(Running {
                    stop,
                    stages: names,
                    all,
                    cancelled: false,
                });
            }
            Err(e) => {
                self.printer.watch(&Event::RunError(RunError::Io(format!(
                    "cannot start a run: {e}"
                ))));
                self.idle();
            }
        }
    }

    fn reload(&mut self) -> Result<(), (Sources, LoadError)> {
        let (sources, loaded) = (self.load)();
        let dag = loaded.map_err(|e| (sources.clone(), e))?;
        let config = std::mem::take(&mut self.targets.config);
        self.targets = Targets::new(&dag, config);
        self.dag = Arc::new(dag);
        self.sources = Arc::new(sources);
        self.rewatch();
        Ok(())
    }

    fn on_run_done(&mut self, result: Result<RunSummary, RunError>) {
        let Some(running) = self.running.take() else {
            return;
        };
        match result {
            Ok(summary) => {
                let restarted = running.cancelled && summary.interrupted;
                if restarted {
                    // Everything the cancelled run was for runs again, with the new changes.
                    self.pending.all |= running.all;
                    self.pending.carried.extend(running.stages);
                } else {
                    self.printer.watch(&Event::Finished(summary));
                }
            }
            Err(error) => self.printer.watch(&Event::RunError(error)),
        }
        if self.stopping {
            return;
        }
        if self.pending.is_empty() {
            self.idle();
        }
        // Otherwise the deadline, now that no run is in the way, picks the changes up.
    }

    /// Says what is watched, once nothing is pending.
    fn idle(&mut self) {
        self.pending.announced.clear();
        let files = self.targets.local.values().filter(|s| !s.dir).count();
        let dirs = self.targets.local.len() - files;
        self.printer.watch(&Event::Watching {
            files,
            dirs,
            s3: self.targets.s3.len(),
            config: self.targets.config.len(),
        });
    }

    /// A signal: cancel (or kill) the run, and end the watch. Returns whether to end now.
    fn on_stop(&mut self, level: Stop) -> bool {
        if level == Stop::Go {
            return false;
        }
        let running = self.running.is_some();
        if !self.stopping {
            self.stopping = true;
            self.printer.watch(&Event::Stopping { running });
        }
        match &self.running {
            Some(run) => {
                run.stop.send_replace(level);
                false
            }
            None => true,
        }
    }

    /// Looks at every S3 source on a thread of its own; the answer comes back as a message.
    fn poll_s3(&mut self) {
        let lookups: Vec<(usize, Declared)> = self
            .targets
            .s3
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.declared.clone()))
            .collect();
        let listings = self.targets.s3_discover.clone();
        let pipeline = self.dag.pipeline();
        let settings = pipeline.storage.clone();
        let cache = crate::state::StateDir::new(&pipeline.workdir).cache();
        let tx = self.tx.clone();
        self.polling = true;
        let spawned = std::thread::Builder::new()
            .name("imba-s3-poll".to_owned())
            .spawn(move || {
                let store = S3Store::new(crate::store::s3::Storage::new(settings, cache));
                let seen = lookups
                    .into_iter()
                    .filter_map(|(i, declared)| {
                        // An unreachable server is no change; the next poll tries again.
                        let identity = store.identity(&declared).ok()?;
                        Some((i, identity.map(|h| h.hash)))
                    })
                    .collect();
                // One LIST per S3 `discover:` prefix: a path with a key the pipeline does not
                // have is a new partition.
                let mut discovered = Vec::new();
                for (prefix, discover, set, keys) in listings {
                    let Ok(listed) = store.list(&prefix.location) else {
                        continue;
                    };
                    for entry in listed {
                        if let Some(key) = discover.key_of(&entry.path) {
                            if !keys.contains(&key)
                                && !discovered.contains(&(set.clone(), key.clone()))
                            {
                                discovered.push((set.clone(), key));
                            }
                        }
                    }
                }
                let _ = tx.send(Message::Polled(seen, discovered));
            });
        if spawned.is_err() {
            self.polling = false;
            self.next_poll = Some(Instant::now() + self.options.poll_interval);
        }
    }

    fn on_polled(&mut self, seen: Vec<(usize, Option<String>)>, discovered: Vec<(String, String)>) {
        self.polling = false;
        self.next_poll = Some(Instant::now() + self.options.poll_interval);
        let mut changed = !discovered.is_empty();
        self.pending.discovered.extend(discovered);
        for (i, identity) in seen {
            let Some(source) = self.targets.s3.get_mut(i) else {
                continue;
            };
            let before = source.seen.replace(identity.clone());
            if before.is_some_and(|b| b != identity) {
                self.pending.s3.insert(i);
                changed = true;
            }
        }
        if changed {
            self.pending.last_event = Some(Instant::now());
            self.say_queued();
        }
    }

    /// A change during a run (without `--restart`) waits for it; say so once per run.
    fn say_queued(&mut self) {
        if self.running.is_some() && !self.options.restart && !self.pending.queued {
            self.pending.queued = true;
            let what = self.what_changed();
            self.printer.watch(&Event::Queued { what });
        }
    }
}

/// An absolute, normalised path; relative to the current directory when `path` is relative.
fn absolute(path: &Path) -> PathBuf {
    normalize(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// The directory holding `path`, or its nearest ancestor that exists.
fn existing_parent(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .skip(1)
        .find(|a| a.is_dir())
        .map(Path::to_path_buf)
}
