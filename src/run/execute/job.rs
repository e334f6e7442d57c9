//! A stage's execution as a job on another machine: the spec the orchestrator writes, and
//! `imba exec-stage SPEC`, which runs it there (the stage's computation into its staging paths,
//! nothing else) and writes its result beside it. Hashing, checks, the commit and the lock stay
//! with the orchestrator, as for a stage it runs itself.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::{builtin, shell, Executed, Execution};
use crate::interrupt::Stop;
use crate::model::{file_name, Engine, StageKind};
use crate::run::failure::StageFailure;

/// What a node runs for one attempt of one stage.
#[derive(Debug, Serialize, Deserialize)]
pub struct Spec {
    /// The orchestrator's build ([`build_id`]): the node's imba must be the same.
    pub build: String,
    pub stage: String,
    pub run: String,
    pub workdir: PathBuf,
    pub attempt: u32,
    pub work: Work,
    /// Where the node writes its [`JobResult`], last and atomically.
    pub result: PathBuf,
}

/// The stage's computation, everything rendered and resolved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    Builtin(builtin::Builtin),
    Commands(shell::Commands),
}

/// What `imba exec-stage` reports.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobResult {
    Done(Executed),
    Failed(StageFailure),
}

/// The result file: which attempt it is for, and the result.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reported {
    pub attempt: u32,
    pub result: JobResult,
}

/// This build of imba: its version and a hash of its executable, so that a node running another
/// build (an older binary on a shared path, say) is caught before it writes anything.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|path| std::fs::read(path).ok())
            .map(|bytes| blake3::hash(&bytes).to_hex()[..16].to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        format!("imba {} ({exe})", env!("CARGO_PKG_VERSION"))
    })
}

/// Where one attempt's job files go: beside the stage's logs, one pair per attempt, so that a
/// late job of an earlier attempt cannot answer for a later one.
pub fn files(logs: &Path, stage: &str, attempt: u32) -> (PathBuf, PathBuf) {
    let name = file_name(stage);
    (
        logs.join(format!("{name}.{attempt}.job.json")),
        logs.join(format!("{name}.{attempt}.result.json")),
    )
}

/// The spec of one attempt of `ex`'s stage.
pub fn plan(ex: &Execution<'_>) -> Result<Spec, StageFailure> {
    let stage = ex.stage;
    let work = match &stage.kind {
        StageKind::Shell {
            templates, argv, ..
        } => Work::Commands(shell::plan(ex, templates, *argv)?),
        StageKind::Builtin { name, params, .. } if stage.engine == Engine::Local => {
            Work::Builtin(builtin::plan(ex, name, params))
        }
        StageKind::Builtin { .. } => {
            return Err(StageFailure::Other(
                "a stage on Spark computes on the cluster, not as a job".to_owned(),
            ))
        }
    };
    let (_, result) = files(ex.logs, &stage.name, ex.attempt);
    Ok(Spec {
        build: build_id().to_owned(),
        stage: stage.name.clone(),
        run: ex.run_id.to_owned(),
        workdir: ex.workdir.to_path_buf(),
        attempt: ex.attempt,
        work,
        result,
    })
}

/// Writes `value` as JSON at `path`, readable by its owner only (a spec holds the stage's
/// params and `env:` values), through a temporary file and a rename.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let partial = path.with_extension("json.partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

/// What `imba exec-stage` has to say, for the printer (the job's log).
pub enum Said {
    Note(String),
    Error(String),
}

/// Exit statuses of `imba exec-stage`.
pub const EXIT_RESULT_WRITTEN: i32 = 0;
pub const EXIT_BAD_SPEC: i32 = 2;
pub const EXIT_OTHER_BUILD: i32 = 3;

/// `imba exec-stage SPEC`: runs the spec's work and writes its result (0 once written, whatever
/// it says); 2 when the spec cannot be read; 3 when this is another build of imba than the
/// orchestrator's (the result says so too).
pub fn exec_stage(spec_path: &Path, registry: &imba_stages::Registry, say: &dyn Fn(Said)) -> i32 {
    let text = match std::fs::read(spec_path) {
        Ok(text) => text,
        Err(e) => {
            say(Said::Error(format!(
                "cannot read the job spec {}: {e}",
                spec_path.display()
            )));
            return EXIT_BAD_SPEC;
        }
    };
    // The build first, from the spec as plain JSON: another build may not read this one's spec.
    let loose: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
    let attempt = loose["attempt"].as_u64().unwrap_or(0) as u32;
    let result_path = loose["result"].as_str().map(PathBuf::from);
    let write_to = |path: &Path, result: JobResult| {
        if let Err(e) = write_json(path, &Reported { attempt, result }) {
            say(Said::Error(format!(
                "cannot write the job's result to {}: {e}",
                path.display()
            )));
        }
    };
    let build = loose["build"].as_str().unwrap_or("(none)");
    if build != build_id() {
        let message = format!(
            "the imba on node {} is another build ({}) than the orchestrator's ({build}): the node must run the same binary (a shared path, or `IMBA_REMOTE_BIN`)",
            node_name(),
            build_id(),
        );
        say(Said::Error(message.clone()));
        if let Some(path) = &result_path {
            write_to(path, JobResult::Failed(StageFailure::Other(message)));
        }
        return EXIT_OTHER_BUILD;
    }
    let spec: Spec = match serde_json::from_slice(&text) {
        Ok(spec) => spec,
        Err(e) => {
            let message = format!("cannot read the job spec {}: {e}", spec_path.display());
            say(Said::Error(message.clone()));
            if let Some(path) = &result_path {
                write_to(path, JobResult::Failed(StageFailure::Other(message)));
            }
            return EXIT_BAD_SPEC;
        }
    };
    let write = |result: JobResult| write_to(&spec.result, result);
    say(Said::Note(format!(
        "imba exec-stage: stage `{}`, run {}, attempt {}, on {}",
        spec.stage,
        spec.run,
        spec.attempt,
        node_name()
    )));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            write(JobResult::Failed(StageFailure::Other(format!(
                "cannot start the runtime: {e}"
            ))));
            return EXIT_RESULT_WRITTEN;
        }
    };
    // SIGTERM (scancel, a time limit) cancels as Ctrl-C does: commands get it, built-ins their flag.
    let stop = crate::interrupt::listen();
    let _armed = crate::interrupt::arm();
    let outcome = runtime.block_on(async {
        match &spec.work {
            Work::Builtin(work) => builtin::run_planned(registry, work, &stop).await,
            Work::Commands(commands) => {
                let place = shell::Place {
                    workdir: &spec.workdir,
                    stage: &spec.stage,
                    run_id: &spec.run,
                    attempt: spec.attempt,
                    cancel: &stop,
                    own_group: false,
                };
                shell::run_commands(commands, &place).await
            }
        }
    });
    // Stopped, its work is not whole, whatever the command said on its way out.
    let cancelled = *stop.borrow() >= Stop::Cancel;
    let result = match outcome {
        _ if cancelled => JobResult::Failed(StageFailure::Cancelled),
        Ok(executed) => JobResult::Done(executed),
        Err(failure) => JobResult::Failed(failure),
    };
    write(result);
    EXIT_RESULT_WRITTEN
}

/// The node's name: Slurm's for it, else the host's.
pub fn node_name() -> String {
    if let Ok(name) = std::env::var("SLURMD_NODENAME") {
        return name;
    }
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    if ok {
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "(unknown)".to_owned()
    }
}
