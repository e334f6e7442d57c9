//! `imba ui`: a local web app over a workdir's pipelines: the DAG by status, runs and their
//! timelines, checks, versions, partitions and reports, live while a run goes on.
//!
//! One axum server on 127.0.0.1, on a tokio runtime, reading the same state as the CLI
//! (`.imba/`, lock files, run records, versions). Every request must carry the token printed in
//! the URL (or the cookie the first visit sets), a `Host` of this address and no foreign
//! `Origin` ([`guard`]). Pages are rendered here from templates compiled into the binary
//! ([`pages`]); the DAG is laid out here ([`layout`]); live updates come from the run's event
//! files through inotify ([`live`]).

mod guard;
mod layout;
mod live;
mod pages;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use imba_stages::Registry;

use crate::config::Overrides;
use crate::graph::Dag;
use crate::report::Printer;
use crate::state::record::RunRecord;

/// What `imba ui` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The pipeline files (every `pipelines/*.yaml` when none was given).
    pub files: Vec<PathBuf>,
    /// 0: any free port.
    pub port: u16,
    /// Serve without the actions (run).
    pub read_only: bool,
}

/// One pipeline the app shows.
pub(crate) struct Pipeline {
    pub file: PathBuf,
    pub registry: Registry,
    /// The graph as last loaded, with the file's modification time and size it was loaded at.
    loaded: Mutex<Option<(Option<Stamp>, Arc<Loaded>)>>,
    /// Run records by file name, with the modification time each was read at.
    records: Mutex<std::collections::BTreeMap<String, (std::time::SystemTime, Arc<RunRecord>)>>,
}

/// A file's modification time and size: when either moves, it is read again.
type Stamp = (std::time::SystemTime, u64);

/// A pipeline file as loaded: its graph and its drawing, or what is wrong with it.
pub(crate) struct Loaded {
    pub dag: Result<Arc<Dag>, String>,
    pub drawing: Option<layout::Drawing>,
}

impl Pipeline {
    fn new(file: PathBuf, registry: Registry) -> Self {
        Pipeline {
            file,
            registry,
            loaded: Mutex::new(None),
            records: Mutex::new(Default::default()),
        }
    }

    /// The graph, loaded again when the file changed since.
    pub fn load(&self) -> Arc<Loaded> {
        // The size too: a file system with coarse times may show an edit at the same time.
        let modified = std::fs::metadata(&self.file)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok();
        let mut cached = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, loaded)) = cached.as_ref() {
            if *at == modified && modified.is_some() {
                return loaded.clone();
            }
        }
        let loaded = Arc::new(self.load_now());
        *cached = Some((modified, loaded.clone()));
        loaded
    }

    fn load_now(&self) -> Loaded {
        let overrides =
            match crate::plan::discover(&self.file, &Overrides::default(), &self.registry) {
                Ok(overrides) => overrides,
                Err((sources, error)) => {
                    return Loaded {
                        dag: Err(error_text(&sources, &error)),
                        drawing: None,
                    }
                }
            };
        let (sources, loaded) = crate::graph::load(&self.file, &overrides, &self.registry);
        match loaded {
            Ok(dag) => Loaded {
                drawing: Some(layout::Drawing::of(&dag)),
                dag: Ok(Arc::new(dag)),
            },
            Err(error) => Loaded {
                dag: Err(error_text(&sources, &error)),
                drawing: None,
            },
        }
    }

    /// The pipeline's run records, newest first: those read before and unchanged since are not
    /// read again.
    pub fn records(&self, dag: &Dag) -> Vec<Arc<RunRecord>> {
        let dir = crate::state::StateDir::new(&dag.pipeline().workdir).runs();
        let shown = dag.pipeline().file.display().to_string();
        let mut cache = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") {
                continue;
            }
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            seen.insert(name.clone());
            if cache.get(&name).is_some_and(|(at, _)| *at == modified) {
                continue;
            }
            let record = std::fs::read(entry.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice::<RunRecord>(&bytes).ok());
            match record {
                Some(record) => {
                    cache.insert(name, (modified, Arc::new(record)));
                }
                None => {
                    cache.remove(&name);
                }
            }
        }
        cache.retain(|name, _| seen.contains(name));
        cache
            .values()
            .rev()
            .filter(|(_, r)| r.pipeline == shown)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

/// A load error as the CLI prints it, without color.
fn error_text(sources: &crate::diagnostic::Sources, error: &crate::config::LoadError) -> String {
    match error {
        crate::config::LoadError::Unreadable(message) => message.clone(),
        crate::config::LoadError::Invalid(diagnostics) => {
            crate::diagnostic::render_plain(sources, diagnostics)
        }
    }
}

/// What every handler shares.
pub(crate) struct App {
    pub pipelines: Vec<Pipeline>,
    pub read_only: bool,
    pub token: String,
    pub port: u16,
    pub live: live::Live,
    pub templates: minijinja::Environment<'static>,
    /// The imba to start for a run from the page.
    pub exe: PathBuf,
}

/// The pipelines `imba ui` shows when given no file: `pipelines/*.yaml`, in name order.
pub fn default_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("pipelines")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && !p.to_string_lossy().ends_with(".lock")
        })
        .collect();
    files.sort();
    files
}

/// Serves the app until interrupted. Prints its URL (with the token) on stdout once it listens.
pub fn serve(options: Options, registry: Registry, printer: &Printer) -> Result<(), String> {
    if options.files.is_empty() {
        return Err(
            "no pipeline to show: name a pipeline file (there is no pipelines/*.yaml here)"
                .to_owned(),
        );
    }
    for file in &options.files {
        if !file.is_file() {
            return Err(format!("cannot read `{}`: no such file", file.display()));
        }
    }
    let token = guard::new_token()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port))
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e}", options.port))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let pipelines: Vec<Pipeline> = options
            .files
            .iter()
            .map(|f| Pipeline::new(f.clone(), registry.clone()))
            .collect();
        let workdirs: Vec<PathBuf> = pipelines
            .iter()
            .map(|p| match &p.load().dag {
                Ok(dag) => dag.pipeline().workdir.clone(),
                Err(_) => p
                    .file
                    .parent()
                    .and_then(|d| d.parent())
                    .map(PathBuf::from)
                    .unwrap_or_default(),
            })
            .collect();
        let live = live::Live::start(&workdirs)?;
        let app = Arc::new(App {
            pipelines,
            read_only: options.read_only,
            token: token.clone(),
            port,
            live,
            templates: pages::templates(),
            exe: std::env::current_exe().map_err(|e| format!("cannot find imba itself: {e}"))?,
        });
        let router = pages::router(app.clone());
        printer.status(&format!(
            "serving {} pipeline{}{}; Ctrl-C stops",
            app.pipelines.len(),
            if app.pipelines.len() == 1 { "" } else { "s" },
            if app.read_only { ", read-only" } else { "" }
        ));
        printer.data(&format!("http://127.0.0.1:{port}/?token={token}\n"));
        let mut stop = crate::interrupt::listen();
        // Ctrl-C ends it at once: a page's event stream would keep a graceful shutdown waiting.
        tokio::select! {
            served = axum::serve(listener, router) => {
                served.map_err(|e| format!("the server stopped: {e}"))
            }
            _ = stop.changed() => Ok(()),
        }
    })
}
