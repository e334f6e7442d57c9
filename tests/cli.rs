//! The command line itself: help, version, completions, usage errors, exit codes.

mod common;

use common::Test;
use insta::assert_snapshot;

#[test]
fn help() {
    assert_snapshot!(Test::new().args(&["--help"]).run().all());
}

#[test]
fn dag_help() {
    assert_snapshot!(Test::new().args(&["dag", "--help"]).run().all());
}

#[test]
fn version() {
    let out = Test::new().args(&["--version"]).run();
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, format!("imba {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn usage_errors_exit_2() {
    let out = Test::new().args(&["validate"]).run();
    assert_eq!(out.code, 2);
    assert_snapshot!(out.all());
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Test::new().args(&["completions", shell]).run();
        assert_eq!(out.code, 0, "{shell}: {}", out.stderr);
        assert!(
            out.stdout.contains("validate") && out.stdout.contains("mermaid"),
            "{shell} completes commands and flags"
        );
    }
}

#[test]
fn bash_completion_script_is_valid_bash() {
    let out = Test::new().args(&["completions", "bash"]).run();
    let t = Test::new().file("imba.bash", out.stdout.as_bytes());
    let status = std::process::Command::new("bash")
        .arg("-n")
        .arg(t.path().join("imba.bash"))
        .status()
        .expect("bash");
    assert!(status.success());
}

#[test]
fn stages_lists_the_builtins() {
    let out = Test::new().args(&["stages"]).run();
    assert_eq!(out.code, 0);
    assert_snapshot!(out.all());
}

#[test]
fn stages_describes_one_builtin_and_names_an_unknown_one() {
    let one = Test::new().args(&["stages", "aggregate"]).run();
    let unknown = Test::new().args(&["stages", "cleen"]).run();
    assert_eq!(unknown.code, 2);
    insta::assert_snapshot!(format!("{}\n{}", one.all(), unknown.all()));
}

/// `imba init`: a project a newcomer can run at once; a second `init` overwrites nothing.
#[test]
fn init_starts_a_project_that_runs_and_overwrites_nothing() {
    let t = Test::new().file(".gitignore", "/target");
    let first = t.exec(&["init"]);
    let run = t.exec(&["run", "pipelines/pipeline.yaml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("2 ran, 0 up to date"), "{}", run.stderr);
    let valid = t.exec(&["validate", "pipelines/pipeline.yaml"]);
    assert_eq!(valid.code, 0, "{}", valid.stderr);
    t.write("data/orders.csv", "mine\n");
    let again = t.exec(&["init"]);
    assert_eq!(
        t.read("data/orders.csv"),
        "mine\n",
        "nothing is overwritten"
    );
    assert_eq!(t.read(".gitignore"), "/target\n.imba/\n/out/\n");
    assert_snapshot!(format!("{}\n{}", first.all(), again.all()));
}
