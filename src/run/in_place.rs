//! Shell stages that write their outputs at their declared paths, as DVC stages do: the
//! previous outputs are moved aside before the command runs, dropped once the new ones are
//! committed, and put back exactly when the command fails, a check fails, the run is cancelled,
//! or imba itself dies (the next run puts them back before it decides anything).
//!
//! Each stage's plan, `.imba/aside/RUN/STAGE/plan.json`, is written to disk before anything
//! moves and removed only after the new outputs are committed: whatever imba was doing when it
//! was killed, the next run finds either no plan (nothing to undo) or a plan whose previous
//! outputs are all beside it.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::file_name;
use crate::store::fs::{copy_recursive, remove_any, replace, write_atomic};

/// What a stage's plan says: the run, the stage, and each output written in place (relative to
/// the workdir, unless declared outside it) with the name its previous content was moved to in
/// the plan's folder (`None`: nothing was there).
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    run: String,
    stage: String,
    outputs: Vec<Moved>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Moved {
    target: PathBuf,
    kept: Option<PathBuf>,
}

impl Moved {
    /// The same move with paths made relative (for the plan) or absolute again (from it).
    fn rebased(&self, from: (&Path, &Path), to: (&Path, &Path)) -> Moved {
        let rebase = |path: &Path, from: &Path, to: &Path| match path.strip_prefix(from) {
            Ok(relative) => to.join(relative),
            Err(_) => path.to_path_buf(),
        };
        Moved {
            target: rebase(&self.target, from.0, to.0),
            kept: self.kept.as_ref().map(|k| rebase(k, from.1, to.1)),
        }
    }
}

/// A stage's previous outputs, moved aside while its command writes new ones.
#[derive(Debug)]
pub struct Aside {
    dir: PathBuf,
    moved: Vec<Moved>,
}

fn plan_path(dir: &Path) -> PathBuf {
    dir.join("plan.json")
}

/// The folder of all plans under the state directory `state`.
fn root(state: &Path) -> PathBuf {
    state.join("aside")
}

impl Aside {
    /// Moves what is at each of `targets` (absolute paths under `workdir`, or declared outside
    /// it; confined already) aside, after writing the plan that undoes it; creates each
    /// target's parent directory. A failure puts back what was moved and says which output it
    /// was about.
    pub fn set(
        state: &Path,
        workdir: &Path,
        run: &str,
        stage: &str,
        targets: &[PathBuf],
    ) -> io::Result<Aside> {
        let dir = root(state).join(run).join(file_name(stage));
        std::fs::create_dir_all(&dir)?;
        let moved: Vec<Moved> = targets
            .iter()
            .enumerate()
            .map(|(i, target)| Moved {
                target: target.clone(),
                // Under its own name: a reader (a `change` check) knows its format by it.
                kept: std::fs::symlink_metadata(target)
                    .is_ok()
                    .then(|| dir.join(i.to_string()).join(file_name_of(target))),
            })
            .collect();
        let empty = Path::new("");
        let plan = Plan {
            run: run.to_owned(),
            stage: stage.to_owned(),
            outputs: moved
                .iter()
                .map(|m| m.rebased((workdir, &dir), (empty, empty)))
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&plan).map_err(io::Error::other)?;
        write_atomic(&plan_path(&dir), &bytes)?;
        sync_dir(&dir);
        let aside = Aside { dir, moved };
        for (done, m) in aside.moved.iter().enumerate() {
            let result = match &m.kept {
                Some(kept) => kept
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| move_path(&m.target, kept)),
                None => Ok(()),
            }
            .and_then(|()| match m.target.parent() {
                Some(parent) => std::fs::create_dir_all(parent),
                None => Ok(()),
            });
            if let Err(e) = result {
                // Undo the moves made so far; the rest were never touched.
                let partial = Aside {
                    dir: aside.dir.clone(),
                    moved: aside.moved[..done].to_vec(),
                };
                let _ = partial.put_back();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot move {} aside: {e}", m.target.display()),
                ));
            }
        }
        Ok(aside)
    }

    /// Each target with where its previous content is now (`None`: there was none): the
    /// baseline of a `change` check.
    pub fn moved(&self) -> Vec<(PathBuf, Option<PathBuf>)> {
        self.moved
            .iter()
            .map(|m| (m.target.clone(), m.kept.clone()))
            .collect()
    }

    /// The plan's file: removing it, once the new outputs are committed, is what makes them
    /// final.
    pub fn plan(&self) -> PathBuf {
        plan_path(&self.dir)
    }

    /// The new outputs are committed: the plan goes first (nothing is to be undone any more),
    /// then the previous outputs.
    pub fn settle(self) {
        let _ = std::fs::remove_file(plan_path(&self.dir));
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_if_empty(self.dir.parent());
    }

    /// Removes whatever the command left at each target and puts the previous output back.
    /// The plan is removed only when every output is back.
    pub fn put_back(self) -> io::Result<()> {
        put_back(&self.dir, &self.moved)
    }
}

fn put_back(dir: &Path, moved: &[Moved]) -> io::Result<()> {
    let mut first_error = None;
    for m in moved.iter().rev() {
        let result = match &m.kept {
            Some(kept) if std::fs::symlink_metadata(kept).is_ok() => move_back(kept, &m.target),
            // Already back (an earlier attempt got this far), or nothing was there before.
            Some(_) => Ok(()),
            None => {
                remove_any(&m.target);
                Ok(())
            }
        };
        if let Err(e) = result {
            first_error.get_or_insert(io::Error::new(
                e.kind(),
                format!("cannot put {} back: {e}", m.target.display()),
            ));
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let _ = std::fs::remove_file(plan_path(dir));
    let _ = std::fs::remove_dir_all(dir);
    remove_if_empty(dir.parent());
    Ok(())
}

/// What [`recover`] did for one stage of an interrupted run.
#[derive(Debug, PartialEq)]
pub struct Recovered {
    pub run: String,
    pub stage: String,
    /// The outputs put back (their previous content, or nothing when there was none).
    pub outputs: Vec<PathBuf>,
    /// Why they could not all be put back.
    pub error: Option<String>,
}

impl std::fmt::Display for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outputs: Vec<String> = self
            .outputs
            .iter()
            .map(|p| format!("`{}`", p.display()))
            .collect();
        write!(
            f,
            "run {} stopped while stage `{}` was writing {} in place",
            self.run,
            self.stage,
            outputs.join(", ")
        )?;
        match &self.error {
            None => f.write_str("; put back what was there before"),
            Some(e) => write!(f, "; {e} (the next run tries again)"),
        }
    }
}

/// Undoes every plan a dead run left under the state directory `state`: its commands still
/// running are killed (found by the `IMBA_RUN` they were started with), then each stage's
/// previous outputs are put back. Call it holding the run lock, before deciding anything (and
/// after a run, for stages it abandoned). The outputs are named relative to `workdir`.
pub fn recover(state: &Path, workdir: &Path) -> Vec<Recovered> {
    let root = root(state);
    let mut plans = Vec::new();
    let mut unreadable = Vec::new();
    for run in sorted_dirs(&root) {
        for stage in sorted_dirs(&run) {
            let plan = plan_path(&stage);
            match std::fs::read(&plan) {
                Ok(bytes) => match serde_json::from_slice::<Plan>(&bytes) {
                    Ok(read) => plans.push((stage, read)),
                    // Left as it is, with what it kept: never guessed at.
                    Err(e) => unreadable.push(Recovered {
                        run: file_name_of(&run),
                        stage: file_name_of(&stage),
                        outputs: Vec::new(),
                        error: Some(format!(
                            "cannot read {} ({e}); what it kept stays beside it",
                            plan.display()
                        )),
                    }),
                },
                // No plan: the stage had settled, or had not moved anything yet.
                Err(_) => remove_any(&stage),
            }
        }
        remove_if_empty(Some(&run));
    }
    let mut runs: Vec<&str> = plans.iter().map(|(_, p)| p.run.as_str()).collect();
    runs.dedup();
    kill_leftovers(&runs);
    let empty = Path::new("");
    let mut recovered: Vec<Recovered> = plans
        .into_iter()
        .map(|(dir, plan)| {
            let moved: Vec<Moved> = plan
                .outputs
                .iter()
                .map(|m| m.rebased((empty, empty), (workdir, &dir)))
                .collect();
            let confined = moved.iter().try_for_each(|m| {
                crate::config::confine::check_target(&m.target, workdir).map_err(|e| {
                    format!(
                        "{e}; its plan {} is left as it is",
                        plan_path(&dir).display()
                    )
                })
            });
            let error = match confined {
                Ok(()) => put_back(&dir, &moved).err().map(|e| e.to_string()),
                Err(e) => Some(e),
            };
            Recovered {
                run: plan.run,
                stage: plan.stage,
                outputs: plan.outputs.into_iter().map(|m| m.target).collect(),
                error,
            }
        })
        .collect();
    recovered.extend(unreadable);
    recovered
}

fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Removes `dir` (a run's folder of plans) and then `aside/` when they are empty.
fn remove_if_empty(dir: Option<&Path>) {
    if let Some(dir) = dir {
        // Fails when something is still in it, which is what we want.
        if std::fs::remove_dir(dir).is_ok() {
            if let Some(root) = dir.parent() {
                let _ = std::fs::remove_dir(root);
            }
        }
    }
}

/// A rename, or across file systems (an output on a mount of its own) a copy under a temporary
/// name, renamed when whole, then the removal of `from`: a copy cut short is never taken for
/// the content it was copying. A symbolic link moves as a link.
fn move_path(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let partial = to.with_file_name(format!("{}.partial", file_name_of(to)));
            remove_any(&partial);
            let copied = match std::fs::read_link(from) {
                Ok(link) => std::os::unix::fs::symlink(link, &partial),
                Err(_) => copy_recursive(from, &partial),
            }
            .and_then(|()| std::fs::rename(&partial, to));
            if let Err(e) = copied {
                remove_any(&partial);
                return Err(e);
            }
            remove_any(from);
            Ok(())
        }
        other => other,
    }
}

/// Puts a kept output back over whatever is at `target`: [`replace`] for files and folders
/// (atomic), a move for a symbolic link (which `replace` would follow).
fn move_back(kept: &Path, target: &Path) -> io::Result<()> {
    let is_link = std::fs::symlink_metadata(kept).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        remove_any(target);
        return move_path(kept, target);
    }
    replace(kept, target)
}

fn sync_dir(dir: &Path) {
    if let Ok(file) = std::fs::File::open(dir) {
        let _ = file.sync_all();
    }
}

/// Kills the processes of a dead run's commands: they would otherwise go on writing the
/// outputs being put back. They are known by `IMBA_RUN=<run>` in their environment, which
/// survives the process group (a command may have started its own), and only processes this
/// user may signal are looked at. Linux only (`/proc`); elsewhere nothing is killed.
fn kill_leftovers(runs: &[&str]) {
    if runs.is_empty() {
        return;
    }
    let wanted: Vec<Vec<u8>> = runs
        .iter()
        .map(|run| format!("IMBA_RUN={run}").into_bytes())
        .collect();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut killed = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| wanted.iter().any(|w| var == w.as_slice()))
        {
            tracing::debug!(pid, "killing a command of an interrupted run");
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    // Gone before anything is put back (a zombie whose parent died is reaped by init at once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while killed
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_failed_command_gets_the_previous_outputs_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".imba");
        let (file, folder, fresh) = (
            dir.path().join("out/a.txt"),
            dir.path().join("out/d"),
            dir.path().join("new/b.txt"),
        );
        write(&file, "old a");
        write(&folder.join("x"), "old x");
        let targets = [file.clone(), folder.clone(), fresh.clone()];
        let aside = Aside::set(&state, dir.path(), "r1", "s", &targets).unwrap();
        assert!(!file.exists() && !folder.exists());
        assert!(fresh.parent().unwrap().is_dir(), "parents are created");
        write(&file, "half");
        write(&folder.join("y"), "new y");
        write(&fresh, "new b");
        aside.put_back().unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "old a");
        assert_eq!(std::fs::read_to_string(folder.join("x")).unwrap(), "old x");
        assert!(!folder.join("y").exists() && !fresh.exists());
        assert!(!root(&state).exists(), "nothing is left aside");
    }

    #[test]
    fn settling_keeps_the_new_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".imba");
        let file = dir.path().join("a.txt");
        write(&file, "old");
        let aside = Aside::set(&state, dir.path(), "r1", "s", std::slice::from_ref(&file)).unwrap();
        write(&file, "new");
        aside.settle();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
        assert!(!root(&state).exists());
        assert!(recover(&state, dir.path()).is_empty());
    }

    #[test]
    fn a_dead_runs_plan_is_undone_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".imba");
        let file = dir.path().join("a.txt");
        write(&file, "old");
        let aside =
            Aside::set(&state, dir.path(), "r1", "s@x", std::slice::from_ref(&file)).unwrap();
        write(&file, "torn");
        std::mem::forget(aside); // imba is killed here
        let recovered = recover(&state, dir.path());
        assert_eq!(
            recovered,
            vec![Recovered {
                run: "r1".into(),
                stage: "s@x".into(),
                outputs: vec![PathBuf::from("a.txt")],
                error: None,
            }]
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "old");
        assert!(recover(&state, dir.path()).is_empty(), "done once");
    }

    #[test]
    fn a_symbolic_link_output_is_put_back_as_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".imba");
        write(&dir.path().join("data/2024-06.csv"), "june");
        let link = dir.path().join("data/current.csv");
        std::os::unix::fs::symlink("2024-06.csv", &link).unwrap();
        let aside = Aside::set(&state, dir.path(), "r1", "s", std::slice::from_ref(&link)).unwrap();
        write(&link, "torn");
        aside.put_back().unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("2024-06.csv"));
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "june");
    }

    #[test]
    fn an_unreadable_plan_is_left_with_what_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".imba");
        let file = dir.path().join("a.txt");
        write(&file, "old");
        let aside = Aside::set(&state, dir.path(), "r1", "s", std::slice::from_ref(&file)).unwrap();
        let plan = aside.plan();
        std::mem::forget(aside);
        std::fs::write(&plan, b"{ torn").unwrap();
        let recovered = recover(&state, dir.path());
        assert_eq!(recovered.len(), 1);
        assert!(recovered[0]
            .error
            .as_deref()
            .unwrap()
            .contains("cannot read"));
        assert_eq!(
            std::fs::read_to_string(plan.parent().unwrap().join("0/a.txt")).unwrap(),
            "old",
            "what it kept is still there"
        );
    }

    #[test]
    fn the_plan_names_outputs_relative_to_the_workdir() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".imba");
        let file = dir.path().join("out/a.txt");
        write(&file, "old");
        let aside = Aside::set(&state, dir.path(), "r1", "s", std::slice::from_ref(&file)).unwrap();
        let plan: Plan = serde_json::from_slice(&std::fs::read(aside.plan()).unwrap()).unwrap();
        assert_eq!(plan.outputs[0].target, Path::new("out/a.txt"));
        assert_eq!(plan.outputs[0].kept.as_deref(), Some(Path::new("0/a.txt")));
        aside.settle();
    }
}
