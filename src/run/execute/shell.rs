//! Shell stages: `cmd:` commands run by `sh -c`, `argv:` programs run without a shell.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::{Executed, Execution};
use crate::interrupt::Stop;
use crate::model::{file_name, ports_json, Port, Stage};
use crate::run::failure::{CommandEnd, StageFailure};

/// Runs a `cmd:` or `argv:` stage: each command in turn, in the workdir, in a process group of
/// its own, stdout and stderr appended to the stage's logs.
pub(super) async fn run(
    ex: &Execution<'_>,
    templates: &[(String, crate::diagnostic::Span)],
    argv: bool,
) -> Result<Executed, StageFailure> {
    let commands = plan(ex, templates, argv)?;
    let place = Place {
        workdir: ex.workdir,
        stage: &ex.stage.name,
        run_id: ex.run_id,
        attempt: ex.attempt,
        cancel: &ex.cancel,
        own_group: true,
    };
    run_commands(&commands, &place).await
}

/// A shell stage's work with everything rendered: what a node runs for it (`imba exec-stage`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Commands {
    /// Each program's words, and the command as shown in messages.
    pub programs: Vec<(Vec<String>, String)>,
    /// Variables with a value (`env:`); never a passed-through one's value.
    pub env: Vec<(String, String)>,
    /// Variables passed through from the environment where the commands run.
    pub passed: Vec<String>,
    pub out: PathBuf,
    pub err: PathBuf,
}

/// Where and as which attempt commands run.
pub(super) struct Place<'a> {
    pub workdir: &'a Path,
    pub stage: &'a str,
    pub run_id: &'a str,
    pub attempt: u32,
    pub cancel: &'a tokio::sync::watch::Receiver<Stop>,
    /// Each command in a process group of its own, so that a stop reaches what it started.
    /// Not in a job: there the scheduler tracks the job's processes by its own group (Slurm's
    /// `proctrack/pgid`) or cgroup, and must find them when the job ends, even if imba was
    /// killed.
    pub own_group: bool,
}

/// The stage's commands rendered for its inputs and staged outputs, with its logs' paths.
pub(super) fn plan(
    ex: &Execution<'_>,
    templates: &[(String, crate::diagnostic::Span)],
    argv: bool,
) -> Result<Commands, StageFailure> {
    let stage = ex.stage;
    let mut env = Vec::new();
    let mut passed = Vec::new();
    for (name, value) in &stage.env {
        match value {
            Some(value) => env.push((name.clone(), value.clone())),
            None => passed.push(name.clone()),
        }
    }
    Ok(Commands {
        programs: programs(ex, templates, argv)?,
        env,
        passed,
        out: ex.logs.join(format!("{}.out", file_name(&stage.name))),
        err: ex.logs.join(format!("{}.err", file_name(&stage.name))),
    })
}

/// Runs planned commands, one after the other, each to its end or until cancelled.
pub(super) async fn run_commands(
    commands: &Commands,
    place: &Place<'_>,
) -> Result<Executed, StageFailure> {
    let env = environment(&commands.env, &commands.passed)?;
    if let Some(logs) = commands.err.parent() {
        std::fs::create_dir_all(logs)
            .map_err(|e| StageFailure::Other(format!("cannot create {}: {e}", logs.display())))?;
    }
    let log = Logs {
        out: commands.out.clone(),
        err: commands.err.clone(),
    };
    if place.attempt > 1 {
        // The logs keep every attempt, each after a line that says which.
        for path in [&log.out, &log.err] {
            let header = format!("\n--- imba: attempt {} ---\n", place.attempt);
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, header.as_bytes()));
            appended.map_err(|e| {
                StageFailure::Other(format!("cannot write {}: {e}", path.display()))
            })?;
        }
    }
    for (words, command) in &commands.programs {
        tracing::debug!(stage = %place.stage, %command, "running");
        run_one(place, words, command.clone(), &env, &log).await?;
    }
    Ok(Executed {
        exit_status: Some(0),
        log: Some(log.err),
        ..Executed::default()
    })
}

/// Where a stage's commands write, appended to across its commands.
struct Logs {
    out: PathBuf,
    err: PathBuf,
}

/// The stage's `env:`: set values, and those passed through from the environment imba runs in,
/// which must be there: a stage that needs a token should not run without one and fail half-way.
fn environment(
    set: &[(String, String)],
    passed: &[String],
) -> Result<Vec<(String, String)>, StageFailure> {
    let mut env = set.to_vec();
    for name in passed {
        match std::env::var_os(name) {
            Some(value) => env.push((name.clone(), value.to_string_lossy().into_owned())),
            None => {
                return Err(StageFailure::Other(format!(
                    "the variable `{name}` is not set, and the stage passes it through (`env:`)"
                )))
            }
        }
    }
    env.sort();
    Ok(env)
}

/// Each program to run, as its words and as shown: `sh -c COMMAND` per command, or for `argv:`
/// one program whose words are each rendered on their own.
fn programs(
    ex: &Execution<'_>,
    templates: &[(String, crate::diagnostic::Span)],
    argv: bool,
) -> Result<Vec<(Vec<String>, String)>, StageFailure> {
    let renderer = crate::config::template::Templates::default();
    let context = minijinja::Value::from_serialize(command_context(ex.stage, ex.inputs, ex.staged));
    let unrendered = |e| StageFailure::Other(format!("cannot render the command: {e}"));
    if argv {
        let mut words = Vec::new();
        for (template, _) in templates {
            words.extend(
                renderer
                    .render_words(template, &context)
                    .map_err(unrendered)?,
            );
        }
        let shown = words
            .iter()
            .map(|w| crate::config::shell::quote(w))
            .collect::<Vec<_>>()
            .join(" ");
        return Ok(vec![(words, shown)]);
    }
    templates
        .iter()
        .map(|(template, _)| {
            let command = renderer
                .render_command(template, &context)
                .map_err(unrendered)?;
            Ok((
                vec!["sh".to_owned(), "-c".to_owned(), command.clone()],
                command,
            ))
        })
        .collect()
}

/// Runs one program to its end, or until the run is cancelled: then its whole process group
/// gets SIGTERM, and SIGKILL after a grace period or at once when asked to kill.
async fn run_one(
    ex: &Place<'_>,
    words: &[String],
    command: String,
    env: &[(String, String)],
    log: &Logs,
) -> Result<(), StageFailure> {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let (stdout, stderr) = match (open(&log.out), open(&log.err)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            return Err(StageFailure::Other(format!(
                "cannot open the stage's log: {e}"
            )))
        }
    };
    let Some((program, args)) = words.split_first() else {
        return Err(StageFailure::Other("the command is empty".to_owned()));
    };
    let mut process = tokio::process::Command::new(program);
    if ex.own_group {
        process.process_group(0);
    }
    let mut child = process
        .args(args)
        .current_dir(ex.workdir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("IMBA_STAGE", ex.stage)
        .env("IMBA_RUN", ex.run_id)
        .env("IMBA_ATTEMPT", ex.attempt.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StageFailure::Other(format!("cannot start `{program}`: {e}")))?;
    let pid = child.id();
    let mut cancel = ex.cancel.clone();
    let cancelled = async move { cancel.wait_for(|c| *c >= Stop::Cancel).await.is_ok() };
    let status = tokio::select! {
        status = child.wait() => status,
        true = cancelled => {
            // The whole process group: the shell and whatever it started. In a job, the scheduler
            // signals every process of the job itself; the command gets it here too.
            let signal_group = |signal| {
                if let Some(pid) = pid {
                    unsafe {
                        if ex.own_group {
                            libc::killpg(pid as i32, signal)
                        } else {
                            libc::kill(pid as i32, signal)
                        }
                    };
                }
            };
            signal_group(libc::SIGTERM);
            let mut kill = ex.cancel.clone();
            let killed = async move { kill.wait_for(|c| *c >= Stop::Kill).await.is_ok() };
            tokio::select! {
                status = child.wait() => status,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    signal_group(libc::SIGKILL);
                    child.wait().await
                }
                true = killed => {
                    signal_group(libc::SIGKILL);
                    child.wait().await
                }
            }
        }
    }
    .map_err(|e| StageFailure::Other(format!("cannot wait for the command: {e}")))?;
    if status.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    let end = match (status.code(), status.signal()) {
        (Some(code), _) => CommandEnd::Exit(code),
        (None, Some(signal)) => CommandEnd::Signal(signal),
        (None, None) => CommandEnd::Exit(-1),
    };
    Err(StageFailure::Command {
        end,
        command,
        tail: tail_of(&log.err, 10),
        log: log.err.clone(),
    })
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The template context of a command: vars, `item`, `params`, inputs (as written, or their
/// local copies), outputs staged.
fn command_context(stage: &Stage, inputs: &[PathBuf], staged: &[PathBuf]) -> Map<String, Json> {
    let mut context = stage.context.clone();
    let local_ports: Vec<Port> = stage
        .inputs
        .iter()
        .zip(inputs)
        .map(|(port, path)| {
            // A local input as written; anything else (a download) by its local copy.
            if port.declared.location.local_path() == Some(path.as_path()) {
                port.clone()
            } else {
                Port {
                    text: path.display().to_string(),
                    ..port.clone()
                }
            }
        })
        .collect();
    context.insert("inputs".into(), ports_json(&local_ports));
    let staged_ports: Vec<Port> = stage
        .outputs
        .iter()
        .zip(staged)
        .map(|(port, path)| Port {
            text: path.display().to_string(),
            ..port.clone()
        })
        .collect();
    context.insert("outputs".into(), ports_json(&staged_ports));
    context
}
