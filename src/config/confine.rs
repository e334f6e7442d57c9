//! Outputs stay where they belong: no output may be, or hold, the workdir, one of its ancestors,
//! imba's own state, the pipeline's files or an input of its own stage.
//!
//! A directory output is replaced whole when its stage commits, so an output of `.` (or `../`,
//! or `{{ out }}/` with `out` empty) would replace the project with what the stage wrote. These
//! rules are checked when the pipeline loads (every problem at its span) and again, for the
//! place a commit is about to replace, by [`check_target`], the last line of defence.

use std::path::{Path, PathBuf};

use crate::diagnostic::Diagnostic;

use crate::model::{Pipeline, Port};

/// The files of a pipeline that no output may touch, with what each is.
pub fn protected(pipeline: &Pipeline, vars_files: &[PathBuf]) -> Vec<(PathBuf, &'static str)> {
    let absolute = |p: &Path| {
        crate::model::location::normalize(
            &std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
        )
    };
    let file = absolute(&pipeline.file);
    // The lock file sits beside the pipeline file (`lock::lock_path`).
    let lock = file.with_extension("lock");
    let mut protected = vec![
        (
            pipeline.workdir.join(".imba"),
            "imba's state directory `.imba/`",
        ),
        (file, "the pipeline file"),
        (lock, "the pipeline's lock file"),
    ];
    for vars in vars_files {
        protected.push((absolute(vars), "a `--vars` file"));
    }
    protected
}

/// Every output that breaks a rule, as diagnostics at the output.
pub fn check(pipeline: &Pipeline, vars_files: &[PathBuf], diagnostics: &mut Vec<Diagnostic>) {
    let protected = protected(pipeline, vars_files);
    for stage in &pipeline.stages {
        for output in &stage.outputs {
            let Some(path) = output.declared.location.local_path() else {
                continue;
            };
            if let Some(problem) = problem(path, &pipeline.workdir, &protected) {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "output `{}` of stage `{}` {problem}",
                        output.text, stage.name
                    ))
                    .at(output.span, "not a place imba may write")
                    .help("a stage commits an output by replacing it whole: give it a path of its own inside the workdir, e.g. `out/NAME/`"),
                );
                continue;
            }
            if let Some(input) = own_input_inside(output, &stage.inputs) {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "output `{}` of stage `{}` holds its own input `{}`",
                        output.text, stage.name, input.text
                    ))
                    .at(output.span, "replacing this would remove the input")
                    .also(input.span, "read here"),
                );
            }
        }
    }
}

/// Why `path` may not be written, if it may not.
fn problem(path: &Path, workdir: &Path, protected: &[(PathBuf, &'static str)]) -> Option<String> {
    if path == workdir {
        return Some("is the workdir itself".to_owned());
    }
    if workdir.starts_with(path) {
        return Some(format!("is `{}`, which holds the workdir", path.display()));
    }
    for (file, what) in protected {
        if file == path {
            return Some(format!("is {what}"));
        }
        if file.starts_with(path) {
            return Some(format!("holds {what}"));
        }
        if path.starts_with(file) && what.ends_with("`.imba/`") {
            return Some(format!("is inside {what}"));
        }
    }
    None
}

fn own_input_inside<'a>(output: &Port, inputs: &'a [Port]) -> Option<&'a Port> {
    if !output.declared.dir {
        return None;
    }
    inputs
        .iter()
        .find(|input| input.declared.location.is_within(&output.declared.location))
}

/// Refuses to replace `target` when doing so would remove the workdir, one of its ancestors or
/// `.imba/`, or when an existing directory on the way to it is a symlink leading out of the
/// workdir (an output declared inside the workdir must stay there). `target` is absolute and
/// normalised.
pub fn check_target(target: &Path, workdir: &Path) -> Result<(), String> {
    let state = workdir.join(".imba");
    if workdir.starts_with(target) || state.starts_with(target) || target.starts_with(&state) {
        return Err(format!(
            "refusing to replace {}: it holds the workdir or imba's state",
            target.display()
        ));
    }
    if !target.starts_with(workdir) {
        // Declared outside the workdir: the pipeline says where it goes.
        return Ok(());
    }
    let real_workdir = std::fs::canonicalize(workdir)
        .map_err(|e| format!("cannot resolve the workdir {}: {e}", workdir.display()))?;
    // The deepest existing directory above the target, resolved through symlinks.
    let mut parent = target.parent();
    while let Some(dir) = parent {
        match std::fs::canonicalize(dir) {
            Ok(real) => {
                if !real.starts_with(&real_workdir) {
                    return Err(format!(
                        "refusing to write {}: `{}` leads out of the workdir, to {}",
                        target.display(),
                        dir.strip_prefix(workdir).unwrap_or(dir).display(),
                        real.display()
                    ));
                }
                return Ok(());
            }
            Err(_) => parent = dir.parent(),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workdir_its_ancestors_and_state_are_never_targets() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        std::fs::create_dir_all(&w).unwrap();
        assert!(check_target(&w, &w).is_err());
        assert!(check_target(dir.path(), &w).is_err());
        assert!(check_target(Path::new("/"), &w).is_err());
        assert!(check_target(&w.join(".imba"), &w).is_err());
        assert!(check_target(&w.join(".imba/cache"), &w).is_err());
        assert!(check_target(&w.join("out/x"), &w).is_ok());
        assert!(check_target(&dir.path().join("elsewhere"), &w).is_ok());
    }

    #[test]
    fn a_symlink_out_of_the_workdir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&w).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, w.join("out")).unwrap();
        let error = check_target(&w.join("out/x.txt"), &w).unwrap_err();
        assert!(error.contains("leads out of the workdir"), "{error}");
        // A symlink that stays inside is fine.
        std::fs::create_dir_all(w.join("real")).unwrap();
        std::os::unix::fs::symlink(w.join("real"), w.join("alias")).unwrap();
        assert!(check_target(&w.join("alias/x.txt"), &w).is_ok());
    }
}
