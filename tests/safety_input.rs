//! Hostile input: YAML that expands without bound or nests without end, paths that are not
//! files (a FIFO would block a read forever), and file bytes that would drive the terminal.
//! Each is an error at once that names what is wrong; nothing hangs, nothing prints raw.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Output, Test};
use insta::assert_snapshot;

/// Runs `imba ARGS` in the test dir and fails (rather than hangs) when it takes over `limit`.
fn within(t: &Test, args: &[&str], limit: Duration) -> Output {
    use std::io::Read;
    let mut child = t
        .command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn imba");
    // Read as it comes, so that a long output never fills a pipe and stops the child.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`imba {}` took over {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let tmp = t.path().to_string_lossy().into_owned();
    let clean = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).replace(&tmp, "[TMP]");
    Output {
        code: status.code().unwrap_or(-1),
        stdout: clean(stdout.join().expect("stdout")),
        stderr: clean(stderr.join().expect("stderr")),
    }
}

const SECONDS: Duration = Duration::from_secs(20);

fn mkfifo(path: &Path) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// The run id and durations of a run's summary line, which change from run to run.
fn stable(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find(" ran, ") {
            Some(_) => match line.find(" (") {
                Some(at) => format!("{} ([TIME]; run [RUN])", &line[..at]),
                None => line.to_owned(),
            },
            None => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

// ---- YAML that costs without bound ----

/// Nine levels of nine aliases: 436 bytes that ask for 9⁹ copies.
fn billion_laughs() -> String {
    let mut yaml = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        let refs = vec![format!("*{prev}"); 9].join(",");
        yaml.push_str(&format!("{next}: &{next} [{refs}]\n"));
    }
    yaml.push_str("stages:\n  s:\n    cmd: echo {{ vars }}\n");
    yaml
}

#[test]
fn the_billion_laughs_is_refused_at_once() {
    let yaml = billion_laughs();
    assert!(yaml.len() < 600, "{}", yaml.len());
    let t = Test::new().pipeline(&yaml);
    let started = Instant::now();
    let out = within(&t, &["validate", "pipeline.yaml"], SECONDS);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.code, 2);
    assert_snapshot!(out.all());
}

#[test]
fn anchors_aliases_and_merge_keys_still_work() {
    let t = Test::new().file("in.txt", "x\n").pipeline(
        r#"vars:
  base: &base {lines: 10, mode: fast}
  list: &list [a, b, c]
stages:
  one:
    cmd: echo {{ params.lines }} {{ params.mode }} > {{ outputs[0] }}
    params:
      <<: *base
      mode: slow
    inputs: [in.txt]
    outputs: [out/one.txt]
  two:
    cmd: echo {{ params.tags | join(",") }} {{ params.lines }} > {{ outputs[0] }}
    params: {<<: *base, tags: *list}
    inputs: [in.txt]
    outputs: [out/two.txt]
"#,
    );
    let out = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(t.read("out/one.txt"), "10 slow\n");
    assert_eq!(t.read("out/two.txt"), "a,b,c 10\n");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // Flow collections: saphyr stops at 255 levels.
    let flow = format!("vars:\n  x: {}\n", "[".repeat(100_000));
    // Block sequences (`- - - …`) have no such limit in the parser; imba stops at 128.
    let block = format!("vars:\n  x:\n    {}1\n", "- ".repeat(100_000));
    // Aliases stack levels too: each anchor adds 100 to the one before.
    let mut aliased = String::from("vars:\n");
    let deep = |inner: &str| format!("{}{inner}{}", "[".repeat(100), "]".repeat(100));
    aliased.push_str(&format!("  a0: &a0 {}\n", deep("1")));
    for i in 1..5 {
        aliased.push_str(&format!(
            "  a{i}: &a{i} {}\n",
            deep(&format!("*a{}", i - 1))
        ));
    }
    aliased.push_str("stages:\n  s:\n    cmd: echo\n");
    let mut all = String::new();
    for (name, yaml) in [("flow", flow), ("block", block), ("aliased", aliased)] {
        let t = Test::new().pipeline(&yaml);
        let started = Instant::now();
        let out = within(&t, &["validate", "pipeline.yaml"], SECONDS);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            started.elapsed()
        );
        assert_eq!(out.code, 2, "{name}: {}", out.stderr);
        // The snippet holds a line of 100,000 brackets: keep the messages.
        let messages: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error") || l.contains("┌─") || l.contains("= "))
            .collect();
        all.push_str(&format!("--- {name}\n{}\n", messages.join("\n")));
    }
    assert_snapshot!(all);
}

#[test]
fn a_megabyte_of_yaml_validates_in_bounded_time() {
    // A map of 50,000 keys (checked for duplicates in linear time) and a list of 80,000 items.
    let mut yaml = String::from("vars:\n  many:\n");
    for i in 0..50_000 {
        yaml.push_str(&format!("    k{i}: {i}\n"));
    }
    yaml.push_str(&format!("  list: [{}]\n", vec!["1"; 80_000].join(",")));
    yaml.push_str("stages:\n  s:\n    cmd: echo\n    outputs: [o]\n");
    assert!(yaml.len() <= 1 << 20, "{}", yaml.len());
    let t = Test::new().pipeline(&yaml);
    let out = within(&t, &["validate", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

// ---- Paths that are not files ----

const COPY: &str = "stages:\n  copy:\n    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}\n    inputs: [data/in.csv]\n    outputs: [out/copy.csv]\n";

#[test]
fn a_fifo_input_fails_its_stage_at_once() {
    let t = Test::new().pipeline(COPY);
    mkfifo(&t.path().join("data/in.csv"));
    let out = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 1);
    assert_snapshot!(stable(&out.all()));
}

#[test]
fn a_fifo_inside_a_directory_input_is_named() {
    let t = Test::new()
        .file("data/parts/a.csv", "x\n")
        .pipeline("stages:\n  count:\n    cmd: ls {{ inputs[0] }} > {{ outputs[0] }}\n    inputs: [data/parts/]\n    outputs: [out/ls.txt]\n");
    mkfifo(&t.path().join("data/parts/sub/b.csv"));
    let out = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 1);
    assert_snapshot!(stable(&out.all()));
}

#[test]
fn fifo_lock_and_state_files_do_not_hang() {
    let t = Test::new().file("data/in.csv", "a\n").pipeline(COPY);
    // The lock file beside the pipeline: an error naming it, before anything runs.
    mkfifo(&t.path().join("pipeline.lock"));
    let lock_fifo = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(lock_fifo.code, 2, "{}", lock_fifo.stderr);
    std::fs::remove_file(t.path().join("pipeline.lock")).unwrap();
    let out = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // The run lock under `.imba/`: an error naming it.
    std::fs::remove_file(t.path().join(".imba/run.lock")).unwrap();
    mkfifo(&t.path().join(".imba/run.lock"));
    let run_lock = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(run_lock.code, 1);
    std::fs::remove_file(t.path().join(".imba/run.lock")).unwrap();

    // The journal: an error naming it; status, which only reads it, goes on.
    let journal = std::fs::read_dir(t.path().join(".imba/journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&journal).unwrap();
    mkfifo(&journal);
    let journal_run = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(journal_run.code, 1);
    let status = within(&t, &["status", "pipeline.yaml"], SECONDS);
    assert_eq!(status.code, 0, "{}", status.stderr);
    std::fs::remove_file(&journal).unwrap();

    // The stat cache: not read, and replaced when the run saves it.
    std::fs::remove_file(t.path().join(".imba/stat-cache.json")).unwrap();
    mkfifo(&t.path().join(".imba/stat-cache.json"));
    let cache = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(cache.code, 0, "{}", cache.stderr);

    let journal_name = journal.file_name().unwrap().to_string_lossy().into_owned();
    assert_snapshot!(format!(
        "--- pipeline.lock\n{}--- .imba/run.lock\n{}--- journal\n{}",
        stable(&lock_fifo.stderr),
        stable(&run_lock.stderr),
        stable(&journal_run.stderr).replace(&journal_name, "[JOURNAL]")
    ));
}

#[test]
fn fifo_pipeline_and_vars_files_are_refused() {
    let t = Test::new().pipeline(COPY);
    mkfifo(&t.path().join("p.yaml"));
    mkfifo(&t.path().join("vars.yaml"));
    let pipeline = within(&t, &["validate", "p.yaml"], SECONDS);
    let vars = within(
        &t,
        &["validate", "pipeline.yaml", "--vars", "vars.yaml"],
        SECONDS,
    );
    assert_eq!((pipeline.code, vars.code), (2, 2));
    assert_snapshot!(format!("{}{}", pipeline.all(), vars.all()));
}

#[test]
fn a_directory_where_a_builtin_reads_a_file() {
    let t = Test::new().file("data/orders.csv/part.csv", "a\n1\n").pipeline(
        "stages:\n  clean:\n    uses: clean\n    inputs: [data/orders.csv]\n    outputs: {table: out/clean.parquet}\n",
    );
    let out = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 1);
    assert_snapshot!(stable(&out.all()));
}

// ---- Bytes from files reach the terminal escaped ----

const NASTY: &str = "\x1b[2J\x1b]0;OWNED\x07";

#[test]
fn a_csv_header_cannot_drive_the_terminal() {
    let t = Test::new()
        .file(
            "data/in.csv",
            format!("id,{NASTY},größe\n1,2,3\n").into_bytes(),
        )
        .pipeline(
            "stages:\n  clean:\n    uses: clean\n    inputs: [data/in.csv]\n    outputs: {table: out/clean.parquet}\n    params:\n      cast: {missing: int64}\n",
        );
    // The missing column is found before anything runs, the header's names escaped.
    let out = within(&t, &["run", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 2);
    assert!(!out.stderr.contains('\x1b'), "{:?}", out.stderr);
    assert_snapshot!(stable(&out.all()));
}

#[test]
fn a_binary_header_is_refused_in_validate_not_printed() {
    let mut csv = b"id,\xff\xfe\x1b[31mred\x07,ok\n".to_vec();
    csv.extend_from_slice(b"1,2,3\n");
    let t = Test::new().file("data/in.csv", csv).pipeline(
        "stages:\n  clean:\n    uses: clean\n    inputs: [data/in.csv]\n    outputs: {table: out/clean.parquet}\n    checks:\n      - not_null: [nope]\n",
    );
    let out = within(&t, &["validate", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 2);
    assert!(!out.stderr.contains('\x1b'), "{:?}", out.stderr);
    assert_snapshot!(out.all());
}

#[test]
fn control_characters_in_the_pipeline_file_are_escaped_in_snippets() {
    let t = Test::new().pipeline(&format!(
        "stages:\n  a:\n    cmd: echo hi\n    colour{NASTY}: red\n    outptus: [\"\u{202e}x\"]\n"
    ));
    let out = within(&t, &["validate", "pipeline.yaml"], SECONDS);
    assert_eq!(out.code, 2);
    assert!(!out.stderr.contains('\x1b'), "{:?}", out.stderr);
    assert!(!out.stderr.contains('\u{202e}'), "{:?}", out.stderr);
    assert_snapshot!(out.all());
}

#[test]
fn a_secret_given_with_set_is_never_shown() {
    let t = Test::new().pipeline(COPY);
    let out = within(
        &t,
        &[
            "validate",
            "pipeline.yaml",
            "--set",
            "storage.secret_access_key=wJalrXUtnFEMI/K7MDENG",
        ],
        SECONDS,
    );
    assert_eq!(out.code, 2);
    assert!(!out.stderr.contains("wJalr"), "{}", out.stderr);
    assert_snapshot!(out.all());
}
