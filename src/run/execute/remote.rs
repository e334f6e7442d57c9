//! Stages on an executor (`executor:`): each attempt is a job that runs `imba exec-stage SPEC`
//! elsewhere. An executor does five things, whatever schedules the jobs: submit (with a tag
//! naming the workdir and run), poll, cancel, list the live jobs by tag, and name the job's log.
//! Slurm is the one built ([`super::slurm`]); AWS Batch (SubmitJob with tags, DescribeJobs,
//! TerminateJob, ListJobs, CloudWatch logs) and Kubernetes Jobs (create with a label, get
//! status, delete with propagation, list by label, pod logs) fit the same five
//! (docs/executors.md).

use std::path::PathBuf;
use std::time::Duration;

use super::job::{self, JobResult};
use super::{Executed, Execution};
use crate::interrupt::Stop;
use crate::run::failure::StageFailure;
use crate::state::record::JobRecord;

/// One job to submit.
#[derive(Debug)]
pub struct Job {
    /// A name people see in the scheduler's queue (`imba:STAGE`).
    pub name: String,
    /// Which workdir and run the job belongs to ([`Orphans::tag`]), kept by the scheduler.
    pub tag: String,
    /// The program and its arguments, run on the node.
    pub command: Vec<String>,
    pub workdir: PathBuf,
    /// Where the job's own stdout and stderr go.
    pub log: PathBuf,
    pub cpus: u32,
    /// Bytes; `None`: the scheduler's default.
    pub memory: Option<u64>,
    /// The scheduler's own limit, a backstop for the orchestrator's `timeout`.
    pub time_limit: Option<Duration>,
}

/// Where a job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running {
        node: Option<String>,
    },
    /// It ended: the scheduler's word for how (`COMPLETED`, `FAILED`, `CANCELLED`, …), the exit
    /// code as the scheduler gives it, the node, and its reason.
    Ended {
        state: String,
        exit: Option<String>,
        node: Option<String>,
        reason: Option<String>,
    },
}

/// What a scheduler must do for imba.
pub trait Executor: Send + Sync {
    /// The kind, for messages (`slurm`).
    fn kind(&self) -> &'static str;
    /// Submits the job; its id.
    fn submit(&self, job: &Job)
        -> impl std::future::Future<Output = Result<String, String>> + Send;
    fn poll(&self, id: &str) -> impl std::future::Future<Output = Result<JobState, String>> + Send;
    /// Asks the scheduler to stop the job (its processes get SIGTERM, then SIGKILL).
    fn cancel(&self, id: &str) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// The jobs of this user not yet ended whose tag starts with `prefix`: each one's id and tag.
    fn live(
        &self,
        prefix: &str,
    ) -> impl std::future::Future<Output = Result<Vec<(String, String)>, String>> + Send;
}

/// Jobs an earlier run of the workdir left behind (its imba was killed, or its machine went
/// down): they cannot commit (their staging is that run's), but they hold nodes. Before its first
/// job on an executor, a run cancels the jobs of the workdir whose run is provably over: it ran
/// on this machine and its process is gone. A job of another machine's run is only named: the
/// workdir's lock may not hold across machines (Lustre with `localflock`), so that run may be
/// alive.
#[derive(Default)]
pub struct Orphans {
    swept: tokio::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The machine imba runs on, as its kernel names it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains(':'))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Whether a process `pid` exists here (one of another user counts: it may be that run).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

impl Orphans {
    /// What a job of run `run_id` of the workdir whose state is in `state` is tagged with
    /// (Slurm: its comment): the workdir by a hash of the path, the run by its id, and where
    /// its imba runs (`imba:KEY:RUN:HOST:PID`).
    pub fn tag(state: &std::path::Path, run_id: &str) -> String {
        let key = blake3::hash(state.as_os_str().as_encoded_bytes()).to_hex();
        format!(
            "imba:{}:{run_id}:{}:{}",
            &key[..16],
            host(),
            std::process::id()
        )
    }

    /// Cancels, once a run per executor, the jobs of earlier runs of the workdir that are over;
    /// what it did, for a warning.
    async fn sweep<E: Executor>(&self, executor: &E, name: &str, tag: &str) -> Vec<String> {
        let mut swept = self.swept.lock().await;
        if !swept.insert(name.to_owned()) {
            return Vec::new();
        }
        let workdir: String = tag.split(':').take(2).collect::<Vec<_>>().join(":");
        let mut found = match executor.live(&format!("{workdir}:")).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("cannot list the jobs of executor `{name}`: {e}");
                return Vec::new();
            }
        };
        // In submission order (numeric ids: shorter first), whatever order the scheduler lists.
        found.sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
        let here = host();
        let (mut cancelled, mut elsewhere) = (Vec::new(), Vec::new());
        for (id, other) in found.iter().filter(|(_, t)| t != tag) {
            // RUN:HOST:PID after the workdir's prefix.
            let mut from = other.rsplitn(3, ':');
            let pid = from.next().and_then(|p| p.parse::<u32>().ok());
            let host = from.next().unwrap_or_default();
            match pid {
                Some(pid) if host == here && !alive(pid) => match executor.cancel(id).await {
                    Ok(()) => cancelled.push(id.as_str()),
                    Err(e) => tracing::warn!(%id, "cannot cancel: {e}"),
                },
                _ => elsewhere.push(format!(
                    "{id} (from {})",
                    if host.is_empty() { "?" } else { host }
                )),
            }
        }
        let jobs = |n: usize| {
            if n == 1 {
                "a job".to_owned()
            } else {
                format!("{n} jobs")
            }
        };
        let mut said = Vec::new();
        if !cancelled.is_empty() {
            said.push(format!(
                "executor `{name}`: cancelled {} left running by an earlier run of this workdir that ended without them ({})",
                jobs(cancelled.len()),
                cancelled.join(", ")
            ));
        }
        if !elsewhere.is_empty() {
            said.push(format!(
                "executor `{name}`: {} of another run of this workdir still running, left alone: {}",
                jobs(elsewhere.len()),
                elsewhere.join(", ")
            ));
        }
        said
    }
}

/// How a job the scheduler stopped ends (Slurm's states; another scheduler maps to these).
const STOPPED: [&str; 4] = ["CANCELLED", "TIMEOUT", "PREEMPTED", "DEADLINE"];

/// How often a job is looked at: soon after it is submitted, then less and less often.
const FIRST_POLL: Duration = Duration::from_millis(250);
const LAST_POLL: Duration = Duration::from_secs(5);
/// How long a cancelled job may take to end before imba stops waiting for it.
const CANCEL_WAIT: Duration = Duration::from_secs(60);
/// How long the scheduler may fail to say where a job is before imba gives up on it.
const UNREACHABLE: Duration = Duration::from_secs(300);

/// The binary a node runs: `IMBA_REMOTE_BIN`, else this one (a path the nodes share).
pub fn remote_binary() -> Result<String, StageFailure> {
    if let Ok(bin) = std::env::var("IMBA_REMOTE_BIN") {
        if !bin.trim().is_empty() {
            return Ok(bin);
        }
    }
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .map_err(|e| StageFailure::Other(format!("cannot find imba's own binary: {e}")))
}

/// Runs one attempt of `ex`'s stage as a job of `executor` (named `name`): submits it, waits for
/// it to end (cancelling it when the run is stopped, or when it has run past the stage's
/// `timeout`), and reads its result. Where it ran goes to `ex.job` as soon as it is known.
pub async fn run<E: Executor>(
    ex: &Execution<'_>,
    executor: &E,
    name: &str,
) -> Result<Executed, StageFailure> {
    let stage = ex.stage;
    std::fs::create_dir_all(ex.logs)
        .map_err(|e| StageFailure::Other(format!("cannot create {}: {e}", ex.logs.display())))?;
    let spec = job::plan(ex)?;
    let (spec_path, result_path) = job::files(ex.logs, &stage.name, ex.attempt);
    let _ = std::fs::remove_file(&result_path);
    job::write_json(&spec_path, &spec)
        .map_err(|e| StageFailure::Other(format!("cannot write {}: {e}", spec_path.display())))?;
    let log = ex
        .logs
        .join(format!("{}.log", crate::model::file_name(&stage.name)));
    let tag = Orphans::tag(ex.state, ex.run_id);
    for said in ex.orphans.sweep(executor, name, &tag).await {
        (ex.warn)(said);
    }
    let request = Job {
        name: format!("imba:{}", stage.name),
        tag,
        command: vec![
            remote_binary()?,
            "exec-stage".to_owned(),
            spec_path.display().to_string(),
        ],
        workdir: ex.workdir.to_path_buf(),
        log: log.clone(),
        cpus: stage.limits.cpus.unwrap_or(1),
        memory: stage.limits.memory,
        // A minute over the stage's own timeout, which imba enforces first.
        time_limit: ex.timeout.map(|t| t + Duration::from_secs(60)),
    };
    if *ex.cancel.borrow() >= Stop::Cancel {
        return Err(StageFailure::Cancelled);
    }
    // A scheduler that refuses a job may take it a moment later: worth a retry.
    let id = executor
        .submit(&request)
        .await
        .map_err(|e| StageFailure::Job {
            message: format!(
                "executor `{name}` ({}) could not submit the job: {e}",
                executor.kind()
            ),
            log: log.clone(),
        })?;
    tracing::debug!(stage = %stage.name, %id, "submitted");
    let mut record = JobRecord {
        executor: name.to_owned(),
        id: id.clone(),
        node: None,
        state: None,
        log: log.display().to_string(),
    };
    let publish = |record: &JobRecord| {
        *ex.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(record.clone());
    };
    publish(&record);
    let mut cancel = ex.cancel.clone();
    let mut listening = true;
    let mut cancelled_at: Option<tokio::time::Instant> = None;
    let mut timed_out = false;
    // The timeout counts from when the job is first seen running.
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut wait = FIRST_POLL;
    let ended = loop {
        let until_deadline = deadline
            .filter(|_| cancelled_at.is_none())
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        let nap = until_deadline.map_or(wait, |left| left.min(wait));
        let stop = tokio::select! {
            _ = tokio::time::sleep(nap) => false,
            stopped = cancel.wait_for(|s| *s >= Stop::Cancel), if listening && cancelled_at.is_none() => {
                // Nobody can ask any more once the sender is gone.
                listening = stopped.is_ok();
                listening
            }
        };
        wait = (wait * 2).min(LAST_POLL);
        let over = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if cancelled_at.is_none() && (stop || over) {
            timed_out = !stop;
            cancelled_at = Some(tokio::time::Instant::now());
            if let Err(e) = executor.cancel(&id).await {
                tracing::warn!(%id, "cannot cancel: {e}");
            }
            wait = FIRST_POLL;
            continue;
        }
        if cancelled_at.is_some_and(|at| at.elapsed() > CANCEL_WAIT) {
            return Err(if timed_out {
                timeout_failure(ex)
            } else {
                StageFailure::Cancelled
            });
        }
        match executor.poll(&id).await {
            Ok(state) => {
                unreachable_since = None;
                match state {
                    JobState::Queued => {}
                    JobState::Running { node } => {
                        if deadline.is_none() {
                            deadline = ex.timeout.map(|t| tokio::time::Instant::now() + t);
                        }
                        if node.is_some() && node != record.node {
                            record.node = node;
                            publish(&record);
                        }
                    }
                    JobState::Ended {
                        state,
                        exit,
                        node,
                        reason,
                    } => {
                        if node.is_some() {
                            record.node = node;
                        }
                        record.state = Some(state.clone());
                        publish(&record);
                        break (state, exit, reason);
                    }
                }
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                // The controller may be busy or restarting: minutes before giving up.
                if since.elapsed() > UNREACHABLE {
                    let _ = executor.cancel(&id).await;
                    // Not retried: the job may still be running into the same staging paths.
                    return Err(StageFailure::Other(format!(
                        "job {id} of executor `{name}`: its state could not be read for {} ({e}); it was cancelled",
                        humantime::format_duration(UNREACHABLE)
                    )));
                }
            }
        }
    };
    if timed_out {
        return Err(timeout_failure(ex));
    }
    let run_cancelled = cancelled_at.is_some();
    let (state, exit, reason) = ended;
    // Only this attempt's result: it names the attempt.
    let result = std::fs::read(&result_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<job::Reported>(&bytes).ok())
        .filter(|reported| reported.attempt == ex.attempt)
        .map(|reported| reported.result);
    let node = record.node.clone().unwrap_or_else(|| "its node".to_owned());
    // The scheduler's word wins over the node's: a job cancelled from outside has its command
    // signalled too, and its imba may see that before it sees its own SIGTERM.
    let stopped = !run_cancelled
        && (STOPPED.iter().any(|s| state.starts_with(s))
            || matches!(result, Some(JobResult::Failed(StageFailure::Cancelled))));
    match result {
        Some(JobResult::Done(executed)) => Ok(executed),
        Some(JobResult::Failed(_)) | None if stopped => Err(StageFailure::Job {
            message: format!(
                "job {id} was stopped on {node} ({state}{}): cancelled from outside imba (scancel) or by the scheduler's time limit",
                reason.map(|r| format!(", {r}")).unwrap_or_default()
            ),
            log,
        }),
        Some(JobResult::Failed(failure)) => Err(failure),
        None if run_cancelled => Err(StageFailure::Cancelled),
        None => Err(StageFailure::Job {
            message: format!(
                "job {id} ended on {node} as {state}{}{} and wrote no result: its imba was killed, or could not start",
                exit.map(|e| format!(" (exit code {e})")).unwrap_or_default(),
                reason.map(|r| format!(", {r}")).unwrap_or_default()
            ),
            log,
        }),
    }
}

fn timeout_failure(ex: &Execution<'_>) -> StageFailure {
    StageFailure::TimedOut {
        after: ex.timeout.unwrap_or_default(),
    }
}
