//! Safety (issue 19): no pipeline may wipe the project, inject shell code, mix two stages' data,
//! leak a secret or run without bound. Each case was first reproduced as a hostile or careless
//! user would meet it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Test;
use insta::assert_snapshot;

/// Every file under `root` (not `.imba/`) with its bytes, to prove nothing else changed.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut all = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.expect("walk");
        let relative = entry.path().strip_prefix(root).unwrap().to_path_buf();
        if relative.components().any(|c| c.as_os_str() == ".imba") || !entry.file_type().is_file() {
            continue;
        }
        all.insert(relative, std::fs::read(entry.path()).expect("read"));
    }
    all
}

/// A project with a few files that a bad output would destroy.
fn project(pipeline: &str) -> Test {
    Test::new()
        .file("NOTES.md", "my notes\n")
        .file("data/in.txt", "input\n")
        .file("vars.yaml", "x: 1\n")
        .pipeline(pipeline)
}

const DIR_OUTPUT: &str = r#"
vars:
  out: out
stages:
  wipe:
    cmd: echo hi > {{ outputs[0] }}/f.txt
    inputs: [data/in.txt]
    outputs: ["{{ out }}/"]
"#;

/// Runs `imba ARGS` in `dir`: exit code and stderr.
fn imba_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("imba"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run imba");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_output_at_the_workdir_or_above_is_refused_and_nothing_is_touched() {
    for out in [
        ".",
        "./",
        "sub/..",
        "..",
        "../..",
        "/",
        ".imba",
        ".imba/cache",
    ] {
        // The project inside a directory of its own, so that its parent can be watched too.
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("project");
        for (path, text) in [
            ("NOTES.md", "my notes\n"),
            ("data/in.txt", "input\n"),
            ("pipeline.yaml", DIR_OUTPUT),
        ] {
            std::fs::create_dir_all(work.join(path).parent().unwrap()).unwrap();
            std::fs::write(work.join(path), text).unwrap();
        }
        std::fs::write(root.path().join("sibling.txt"), "beside\n").unwrap();
        let before = files(root.path());
        for command in ["validate", "run"] {
            let out_arg = format!("out={out}");
            let (code, stderr) = imba_in(&work, &[command, "pipeline.yaml", "--set", &out_arg]);
            assert_eq!(code, 2, "{command} with out={out}:\n{stderr}");
            assert!(
                stderr.contains("of stage `wipe`"),
                "{command} with out={out}:\n{stderr}"
            );
        }
        assert_eq!(files(root.path()), before, "out={out}");
    }
}

#[test]
fn outputs_naming_imbas_own_files_are_errors_at_their_span() {
    let t = project(
        r#"
stages:
  a:
    cmd: echo > {{ outputs[0] }}
    outputs: [pipeline.yaml]
  b:
    cmd: echo > {{ outputs[0] }}
    outputs: [pipeline.lock]
  c:
    cmd: echo > {{ outputs[0] }}
    outputs: [.imba/run.lock]
  d:
    cmd: echo > {{ outputs[0] }}
    outputs: [vars.yaml]
  e:
    cmd: echo > {{ outputs[0] }}/x
    outputs: ["./"]
  f:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}/copy
    inputs: [data/in.txt]
    outputs: [data/]
"#,
    );
    let before = files(t.path());
    let out = t.exec(&["validate", "pipeline.yaml", "--vars", "vars.yaml"]);
    assert_snapshot!(out.all());
    assert_eq!(files(t.path()), before);
}

#[test]
fn a_commit_through_a_symlink_out_of_the_workdir_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let t = project(
        r#"
stages:
  a:
    cmd: echo secret > {{ outputs[0] }}
    outputs: [out/x.txt]
"#,
    );
    std::os::unix::fs::symlink(outside.path(), t.path().join("out")).unwrap();
    let out = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("leads out of the workdir"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn stages_whose_names_differ_only_in_punctuation_keep_their_own_files() {
    // `r@a` (a foreach instance) and `r_a`, `s@a/b` and `s@a_b`: one staging directory and one
    // log each, even when they run at once.
    let t = Test::new().pipeline(
        r#"
stages:
  r:
    foreach: [a]
    cmd: sleep 0.2; echo "written by r@{{ item }}" > {{ outputs[0] }}
    outputs: ["out/x/o.txt"]
  r_a:
    cmd: sleep 0.2; echo "written by r_a" > {{ outputs[0] }}; echo log of r_a >&2
    outputs: ["out/y/o.txt"]
  s:
    foreach: [a/b, a_b]
    cmd: sleep 0.2; echo "written by s@{{ item }}" > {{ outputs[0] }}; echo log of {{ item }} >&2
    outputs: ["out/s/{{ item | replace('/', '-') }}.txt"]
"#,
    );
    t.run_ok(&["-j", "4"]);
    assert_eq!(t.read("out/x/o.txt"), "written by r@a\n");
    assert_eq!(t.read("out/y/o.txt"), "written by r_a\n");
    assert_eq!(t.read("out/s/a-b.txt"), "written by s@a/b\n");
    assert_eq!(t.read("out/s/a_b.txt"), "written by s@a_b\n");
    let logs = walkdir::WalkDir::new(t.path().join(".imba/logs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "err"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect::<BTreeMap<_, _>>();
    assert_eq!(
        logs.get("r_a.err").map(String::as_str),
        Some("log of r_a\n")
    );
    assert_eq!(
        logs.get("s%40a%2Fb.err").map(String::as_str),
        Some("log of a/b\n")
    );
    assert_eq!(
        logs.get("s%40a_b.err").map(String::as_str),
        Some("log of a_b\n")
    );
    // And the next run trusts what was committed.
    t.run_ok(&[]);
    assert!(t.decisions().iter().all(|(_, d)| d == "skipped"));
}

#[test]
fn names_that_differ_only_in_case_are_an_error() {
    let out = Test::new()
        .pipeline(
            r#"
stages:
  Build:
    cmd: echo > {{ outputs[0] }}
    outputs: [a.txt]
  build:
    cmd: echo > {{ outputs[0] }}
    outputs: [b.txt]
"#,
        )
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert_snapshot!(out.all());
}

const ECHO_NAME: &str = r#"
vars:
  name: world
stages:
  greet:
    cmd: echo {{ name }} >> {{ outputs.o }}
    outputs: {o: out/greeting.txt}
"#;

#[test]
fn a_value_set_on_the_command_line_is_data_not_shell_code() {
    // The issue's own reproduction, through `--set`.
    let t = Test::new().pipeline(ECHO_NAME);
    t.run_ok(&["--set", "name=x; touch PWNED"]);
    assert!(!t.path().join("PWNED").exists());
    assert_eq!(t.read("out/greeting.txt"), "x; touch PWNED\n");

    // Every other kind of nastiness, through a vars file (JSON strings are YAML strings).
    for name in [
        "$(touch PWNED)",
        "`touch PWNED`",
        "a' ; touch PWNED; echo '",
        "a\" ; touch PWNED; echo \"",
        "two\nlines; touch PWNED",
        "*",
        "",
        "-n",
    ] {
        let t = Test::new().pipeline(ECHO_NAME);
        t.write(
            "vars.yaml",
            format!("name: {}\n", serde_json::to_string(name).unwrap()),
        );
        t.run_ok(&["--vars", "vars.yaml"]);
        assert!(!t.path().join("PWNED").exists(), "{name:?} ran code");
        let expected = if name == "-n" {
            String::new()
        } else {
            format!("{name}\n")
        };
        assert_eq!(t.read("out/greeting.txt"), expected, "{name:?}");
    }
}

#[test]
fn values_inside_quotes_the_user_wrote_stay_data_too() {
    let t = Test::new().pipeline(
        r#"
vars:
  name: x
stages:
  quoted:
    cmd: printf '%s|%s|%s\n' "{{ name }}" '{{ name }}' x{{ name }}y > "{{ outputs[0] }}"
    outputs: [out/q.txt]
"#,
    );
    let name = "it's \"$HOME\" `id` \\ ; touch PWNED";
    t.run_ok(&["--set", &format!("name={name}")]);
    assert!(!t.path().join("PWNED").exists());
    assert_eq!(t.read("out/q.txt"), format!("{name}|{name}|x{name}y\n"));
}

#[test]
fn safe_inserts_a_shell_fragment_on_purpose() {
    let t = Test::new().pipeline(
        r#"
vars:
  upper: "| tr a-z A-Z"
stages:
  a:
    cmd: echo abc {{ upper | safe }} > {{ outputs[0] }}; echo {{ upper }} >> {{ outputs[0] }}
    outputs: [out/a.txt]
"#,
    );
    t.run_ok(&[]);
    assert_eq!(t.read("out/a.txt"), "ABC\n| tr a-z A-Z\n");
}

#[test]
fn file_names_and_workdirs_with_shell_characters_work() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("my work; dir $x 'q' ü");
    let names = [
        "a;touch PWNED_in.txt",
        "with space.txt",
        "quote'd \"both\".txt",
        "dollar $HOME.txt",
        "line\nbreak.txt",
        "中文 ü.txt",
    ];
    std::fs::create_dir_all(work.join("data")).unwrap();
    let mut stages = String::from("stages:\n");
    for (i, name) in names.iter().enumerate() {
        std::fs::write(work.join("data").join(name), format!("content {i}\n")).unwrap();
        let quoted = serde_json::to_string(&format!("data/{name}")).unwrap();
        let output = serde_json::to_string(&format!("out/{name}")).unwrap();
        stages.push_str(&format!(
            "  s{i}:\n    cmd: cat {{{{ inputs[0] }}}} > {{{{ outputs[0] }}}}\n    inputs: [{quoted}]\n    outputs: [{output}]\n"
        ));
    }
    std::fs::write(work.join("pipeline.yaml"), &stages).unwrap();
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("imba"))
        .args(["run", "pipeline.yaml"])
        .current_dir(&work)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(work.join("out").join(name)).unwrap(),
            format!("content {i}\n"),
            "{name:?}"
        );
    }
    assert!(!work.join("PWNED_in.txt").exists() && !work.join("PWNED_in").exists());
    // Nothing landed beside the workdir (a split path would have written there).
    let beside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
}

#[test]
fn argv_runs_a_program_without_a_shell() {
    let t = Test::new().file("data/in.txt", "x\n").pipeline(
        r#"
vars:
  words: ["a b", "$(touch PWNED)", ";", "it's"]
stages:
  a:
    argv: [sh, -c, 'printf "%s|" "$@" > "$0"', "{{ outputs[0] }}", "{{ words }}", "{{ inputs[0] }}"]
    inputs: [data/in.txt]
    outputs: [out/a.txt]
  b:
    argv: [cp, "{{ inputs[0] }}", "{{ outputs[0] }}"]
    inputs: [data/in.txt]
    outputs: [out/b.txt]
"#,
    );
    t.run_ok(&[]);
    assert!(!t.path().join("PWNED").exists());
    assert_eq!(t.read("out/b.txt"), "x\n");
    assert_eq!(
        t.read("out/a.txt"),
        "a b|$(touch PWNED)|;|it's|data/in.txt|"
    );
}

#[test]
fn a_secret_passed_through_env_reaches_the_command_and_nothing_else() {
    let t = Test::new().pipeline(
        r#"
stages:
  notify:
    cmd: printf '%s' "$API_TOKEN" | wc -c | tr -d ' ' > {{ outputs[0] }}
    env: [API_TOKEN]
    outputs: [out/len.txt]
"#,
    );
    let run = |secret: Option<&str>| {
        let mut command = t.command(&["run", "pipeline.yaml"]);
        match secret {
            Some(s) => command.env("API_TOKEN", s),
            None => command.env_remove("API_TOKEN"),
        };
        command.output().unwrap()
    };
    let missing = run(None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("the variable `API_TOKEN` is not set")
    );

    assert!(run(Some("s3cr3t-value")).status.success());
    assert_eq!(t.read("out/len.txt"), "12\n");
    // Another value of the secret is not a reason to run again: only its name is hashed.
    assert!(run(Some("other-secret")).status.success());
    assert!(t.decisions().iter().all(|(_, d)| d == "skipped"));
    for entry in walkdir::WalkDir::new(t.path()) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("s3cr3t"),
                "the secret is in {}",
                entry.path().display()
            );
        }
    }
}

#[test]
fn runaway_templates_stop_quickly_with_an_error() {
    let started = Instant::now();
    let out = Test::new()
        .pipeline(
            r#"
vars:
  x: "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}"
  doubled: "{% set s = 'ab' %}{% for i in range(60) %}{% set s = s ~ s %}{% endfor %}{{ s }}"
  big: "{{ range(1000000000) }}"
stages:
  a:
    cmd: echo {{ x }} {{ big }} > {{ outputs[0] }}
    outputs: [o.txt]
"#,
        )
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_snapshot!(out.all());
}

#[test]
fn a_bad_path_gives_one_error_not_a_second_one_about_the_command() {
    let out = Test::new()
        .pipeline(
            r#"
stages:
  a:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: ["s3://bkt"]
    outputs: [""]
  b:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: ["s3:///x"]
    outputs: [o.txt]
"#,
        )
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert_snapshot!(out.all());
}

mod adversarial {
    //! A property over generated pipelines: adversarial stage names, `foreach` keys, paths and
    //! template values. Whatever is generated, the run changes nothing outside the declared
    //! outputs, and no two stage instances share a staging or log file.

    use super::*;
    use proptest::prelude::*;

    /// Characters that break shells, paths and naming schemes.
    fn nasty() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("a"),
                Just("b"),
                Just("_"),
                Just("@"),
                Just("/"),
                Just("."),
                Just(".."),
                Just(" "),
                Just(";"),
                Just("$"),
                Just("'"),
                Just("\""),
                Just("`"),
                Just("\\"),
                Just("\n"),
                Just("*"),
                Just("%"),
                Just("~"),
                Just("ü"),
                Just("$(touch PWNED)"),
                Just("{"),
                Just("}"),
                Just("-"),
                Just("&"),
                Just("|"),
                Just(">"),
            ],
            0..6,
        )
        .prop_map(|parts| parts.concat())
    }

    fn quoted(text: &str) -> String {
        serde_json::to_string(text).unwrap()
    }

    /// Every file under `root`, `.imba/` left out, with its bytes.
    fn all_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut all = BTreeMap::new();
        for entry in walkdir::WalkDir::new(root) {
            let entry = entry.expect("walk");
            if entry.path().components().any(|c| c.as_os_str() == ".imba")
                || !entry.file_type().is_file()
            {
                continue;
            }
            all.insert(
                entry.path().to_path_buf(),
                std::fs::read(entry.path()).expect("read"),
            );
        }
        all
    }

    /// The declared outputs of the pipeline in `work`, as absolute paths (from `imba dag --json`).
    fn declared_outputs(work: &Path) -> Vec<PathBuf> {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("imba"))
            .args(["dag", "pipeline.yaml", "--json"])
            .current_dir(work)
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        let dag: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        dag["stages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["outputs"].as_array().unwrap().clone())
            .map(|o| work.join(o["path"].as_str().unwrap()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn nothing_outside_the_outputs_changes(
            keys in proptest::collection::btree_set(nasty(), 1..4),
            value in nasty(),
            out_dir in nasty(),
        ) {
            let root = tempfile::tempdir().unwrap();
            let work = root.path().join("work");
            std::fs::create_dir_all(work.join("data")).unwrap();
            std::fs::write(root.path().join("canary.txt"), "beside\n").unwrap();
            std::fs::write(work.join("data/in.txt"), "in\n").unwrap();
            std::fs::write(work.join("NOTES.md"), "notes\n").unwrap();
            let keys: Vec<String> = keys.into_iter().collect();
            // A stage named like each key's instance with `@` and every other character a stage
            // name cannot hold spelled `_`: the names the old encoding gave one staging directory.
            let twins: String = keys
                .iter()
                .enumerate()
                .map(|(i, key)| {
                    format!(
                        "  {}:\n    cmd: echo twin {i} > {{{{ outputs[0] }}}}\n    outputs: [\"out/twin{i}.txt\"]\n",
                        quoted(&format!(
                            "r_{}",
                            key.chars()
                                .map(|c| if c.is_ascii_alphanumeric() || "-.".contains(c) { c } else { '_' })
                                .collect::<String>()
                        ))
                    )
                })
                .collect();
            let pipeline = format!(
                "vars:\n  value: {value}\n  dir: {dir}\nstages:\n  r:\n    foreach: {keys}\n    cmd: printf '%s' {{{{ value }}}} {{{{ key }}}} > {{{{ outputs[0] }}}}\n    inputs: [data/in.txt]\n    outputs: [\"out/{{{{ dir }}}}/{{{{ key }}}}.txt\"]\n{twins}",
                value = quoted(&value),
                dir = quoted(&out_dir),
                keys = serde_json::to_string(&keys.iter().map(|k| (k.clone(), 1)).collect::<BTreeMap<_, _>>()).unwrap(),
            );
            std::fs::write(work.join("pipeline.yaml"), &pipeline).unwrap();
            let before = all_files(root.path());
            let output = std::process::Command::new(assert_cmd::cargo::cargo_bin("imba"))
                .args(["run", "pipeline.yaml", "-j", "4", "-k"])
                .current_dir(&work)
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            prop_assert!(!stderr.contains("panicked"), "{}", stderr);
            prop_assert!(matches!(output.status.code(), Some(0..=2)), "{}", stderr);
            let declared = declared_outputs(&work);
            let lock = work.join("pipeline.lock");
            let after = all_files(root.path());
            let changed = before
                .keys()
                .chain(after.keys())
                .filter(|path| before.get(*path) != after.get(*path))
                .filter(|path| **path != lock && !declared.iter().any(|d| path.starts_with(d)))
                .collect::<Vec<_>>();
            prop_assert!(changed.is_empty(), "changed outside the outputs: {:?}\n{}\n{}", changed, pipeline, stderr);
            prop_assert!(!work.join("PWNED").exists());
            // Each twin that ran wrote exactly its own output.
            for (i, _) in keys.iter().enumerate() {
                if let Ok(twin) = std::fs::read_to_string(work.join(format!("out/twin{i}.txt"))) {
                    prop_assert_eq!(twin, format!("twin {i}\n"));
                }
            }
            // And each `r` instance wrote its own value and key.
            if output.status.success() {
                for key in &keys {
                    let written = std::fs::read(work.join(format!("out/{out_dir}/{key}.txt")));
                    if let Ok(written) = written {
                        prop_assert_eq!(String::from_utf8_lossy(&written), format!("{value}{key}"));
                    }
                }
            }
        }

        #[test]
        fn stage_file_names_are_injective(a in nasty(), b in nasty()) {
            let (fa, fb) = (imba::model::file_name(&a), imba::model::file_name(&b));
            prop_assert_eq!(a == b, fa == fb, "{:?} {:?} -> {} {}", a, b, fa, fb);
            prop_assert!(!fa.contains('/') && fa != "." && fa != ".." && !fa.is_empty() || a.is_empty());
        }
    }
}

#[test]
fn a_template_building_a_huge_value_is_stopped_within_its_memory_budget() {
    // Five terms of 100 MB each: a handful of steps, and 500 MB without a memory budget.
    let term = "('x' * 100000000)";
    let terms = [term; 5].join(" ~ ");
    let t = Test::new().pipeline(&format!(
        "vars:\n  a: \"{{{{ {terms} }}}}\"\nstages:\n  s:\n    cmd: echo {{{{ a }}}} > {{{{ outputs[0] }}}}\n    outputs: [o.txt]\n"
    ));
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_snapshot!(out.stderr);
}
