//! `imba watch`, driven from the test: a change runs exactly its downstream, a save without a
//! change runs nothing, bursts coalesce, editor saves and half-written files are handled, the
//! pipeline reloads (and survives an invalid edit), failures are survived, imba's own writes
//! are ignored, and Ctrl-C leaves outputs intact.
//!
//! Every wait is for something imba prints or writes, with a generous timeout; no assertion
//! rests on a fixed sleep.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Test;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `a` upper-cases `data/in1.txt`, `b` counts `a`'s bytes, `c` copies `data/in2.txt`. A `bad`
/// line makes `a` fail; a `slow` line makes it touch `started` and wait for a `release` file.
const PIPELINE: &str = r#"
stages:
  a:
    cmd: >-
      if grep -q bad {{ inputs.src }}; then echo "bad input" >&2; exit 3; fi;
      if grep -q slow {{ inputs.src }}; then
      touch started; while [ ! -e release ]; do sleep 0.05; done; fi;
      tr a-z A-Z < {{ inputs.src }} > {{ outputs.out }}
    inputs: {src: data/in1.txt}
    outputs: {out: out/a.txt}
  b:
    cmd: "wc -c < {{ inputs.a }} | tr -d ' ' > {{ outputs.out }}"
    inputs: {a: out/a.txt}
    outputs: {out: out/b.txt}
  c:
    cmd: "cat {{ inputs.src }} > {{ outputs.out }}"
    inputs: {src: data/in2.txt}
    outputs: {out: out/c.txt}
"#;

fn project() -> Test {
    Test::new()
        .file("data/in1.txt", "hello\n")
        .file("data/in2.txt", "world\n")
        .pipeline(PIPELINE)
}

/// A running `imba watch`, its stderr collected as it comes.
struct Watching {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Watching {
    fn start(test: &Test, extra: &[&str]) -> Watching {
        Watching::spawn(Self::command(test, extra))
    }

    /// `imba watch pipeline.yaml --debounce 100ms EXTRA…` in the test dir.
    fn command(test: &Test, extra: &[&str]) -> std::process::Command {
        let mut args = vec!["watch", "pipeline.yaml", "--debounce", "100ms"];
        args.extend_from_slice(extra);
        test.command(&args)
    }

    fn spawn(mut command: std::process::Command) -> Watching {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn imba watch");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Watching { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the log so far; fails with the log after the timeout.
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if done(&self.log()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "imba watch exited ({status}) before {what}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}:\n{}", self.log());
    }

    /// Waits for the `n`th "watching … for changes" line: the watch is idle for the nth time.
    fn idle(&mut self, n: usize) {
        self.wait_for(&format!("idle #{n}"), |log| {
            log.matches("for changes (Ctrl-C to stop)").count() >= n
        });
    }

    fn count(&self, text: &str) -> usize {
        self.log().matches(text).count()
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill");
    }

    /// Waits for the watch to exit; its status code and the whole log.
    fn wait_exit(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader drain what is left.
                std::thread::sleep(Duration::from_millis(50));
                return (status.code(), self.log());
            }
            if start.elapsed() > TIMEOUT {
                let _ = self.child.kill();
                panic!("imba watch did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> (Option<i32>, String) {
        self.signal(libc::SIGINT);
        self.wait_exit()
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every run record, oldest first: for each, the stages that ran.
fn runs(test: &Test) -> Vec<Vec<String>> {
    let dir = test.path().join(".imba/runs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|file| {
            let record: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            record["stages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["decision"] == "ran")
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Writes `contents` the way an editor does: to a temporary file, then renamed over `path`.
fn save_by_rename(dir: &Path, path: &str, contents: &str) {
    let tmp = dir.join(format!("{path}.swp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(path)).unwrap();
}

#[test]
fn a_change_runs_exactly_its_downstream() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    assert_eq!(runs(&t), vec![names(&["a", "b", "c"])]);

    t.write("data/in1.txt", "hello again\n");
    w.idle(2);
    assert_eq!(runs(&t)[1..], [names(&["a", "b"])]);
    assert_eq!(t.read("out/a.txt"), "HELLO AGAIN\n");
    assert_eq!(t.read("out/b.txt"), "12\n");

    t.write("data/in2.txt", "earth\n");
    w.idle(3);
    assert_eq!(runs(&t)[2..], [names(&["c"])]);
    let (code, log) = w.stop();
    assert_eq!(code, Some(130), "{log}");
    assert!(
        log.contains("data/in1.txt changed: running a and b\n"),
        "{log}"
    );
    assert!(log.contains("data/in2.txt changed: running c\n"), "{log}");
}

#[test]
fn a_save_with_the_same_content_runs_nothing_and_says_so() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    t.write("data/in1.txt", "hello\n");
    w.wait_for("the unchanged note", |log| {
        log.contains("data/in1.txt written, content unchanged: nothing to run")
    });
    w.idle(2);
    assert_eq!(runs(&t).len(), 1, "{}", w.log());
}

#[test]
fn a_burst_of_writes_coalesces_into_one_or_two_runs() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    for i in 0..50 {
        t.write("data/in1.txt", format!("write {i}\n"));
    }
    w.wait_for("the last write's output", |_| {
        std::fs::read_to_string(t.path().join("out/a.txt")).is_ok_and(|s| s == "WRITE 49\n")
    });
    let idle = w.count("for changes (Ctrl-C");
    w.idle(idle);
    let after = runs(&t).len() - 1;
    assert!((1..=2).contains(&after), "{after} runs:\n{}", w.log());
}

#[test]
fn an_editor_save_by_rename_and_a_delete_then_create_are_seen() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    save_by_rename(t.path(), "data/in1.txt", "renamed over\n");
    w.idle(2);
    assert_eq!(t.read("out/a.txt"), "RENAMED OVER\n");
    assert_eq!(runs(&t)[1..], [names(&["a", "b"])]);

    std::fs::remove_file(t.path().join("data/in1.txt")).unwrap();
    w.wait_for("the note that the input is gone", |log| {
        log.contains("data/in1.txt is gone; waiting for it to come back")
    });
    t.write("data/in1.txt", "back again\n");
    w.wait_for("the recreated file's run", |_| {
        std::fs::read_to_string(t.path().join("out/a.txt")).is_ok_and(|s| s == "BACK AGAIN\n")
    });
    w.idle(3);
    // The deletion itself ran nothing: no run failed for a missing input.
    assert_eq!(runs(&t)[2..], [names(&["a", "b"])], "{}", w.log());
}

#[test]
fn a_file_still_being_written_is_waited_for() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    let mut file = std::fs::File::create(t.path().join("data/in1.txt")).unwrap();
    file.write_all(b"first half, ").unwrap();
    file.flush().unwrap();
    // Quiet for longer than the debounce, but the file is still open for writing.
    w.wait_for("the note that the file is being written", |log| {
        log.contains("data/in1.txt is still being written; waiting")
    });
    file.write_all(b"second half\n").unwrap();
    drop(file);
    w.wait_for("the whole file's output", |_| {
        std::fs::read_to_string(t.path().join("out/a.txt"))
            .is_ok_and(|s| s == "FIRST HALF, SECOND HALF\n")
    });
    w.idle(2);
    assert_eq!(runs(&t).len(), 2, "{}", w.log());
}

#[test]
fn an_invalid_pipeline_edit_keeps_the_last_valid_one_until_fixed() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    t.write(
        "pipeline.yaml",
        PIPELINE.replace("inputs: {src: data/in2.txt}", "inputs: {src: [}"),
    );
    w.wait_for("the errors of the edit", |log| {
        log.contains("the edited pipeline is invalid; the last valid one stays in force")
    });
    w.idle(2);
    // What the watch printed about the edit, from its first error to the idle line after it.
    let log = w.log();
    let from = log.find("error:").expect("an error");
    let to = from
        + log[from..]
            .find("for changes (Ctrl-C to stop)\n")
            .expect("idle")
        + 29;
    insta::assert_snapshot!("an_invalid_edit_of_the_pipeline", &log[from..to]);
    // The old pipeline still works.
    t.write("data/in2.txt", "still watched\n");
    w.idle(3);
    assert_eq!(t.read("out/c.txt"), "still watched\n");
    // Fixed, with `c` changed: only `c` is stale.
    t.write(
        "pipeline.yaml",
        PIPELINE.replace("cat {{ inputs.src }}", "rev {{ inputs.src }}"),
    );
    w.wait_for("the reload", |log| {
        log.contains("pipeline.yaml changed: pipeline reloaded")
    });
    w.idle(4);
    assert_eq!(t.read("out/c.txt"), "dehctaw llits\n");
    let all = runs(&t);
    assert_eq!(all[1..], [names(&["c"]), names(&["c"])], "{}", w.log());
}

#[test]
fn a_failing_stage_is_reported_and_the_fix_runs_it() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    t.write("data/in1.txt", "bad\n");
    w.wait_for("the failure", |log| log.contains("the pipeline failed:"));
    w.idle(2);
    assert!(w.log().contains("stage `a` failed"), "{}", w.log());
    assert_eq!(t.read("out/a.txt"), "HELLO\n");
    t.write("data/in1.txt", "good\n");
    w.idle(3);
    assert_eq!(t.read("out/a.txt"), "GOOD\n");
    assert_eq!(runs(&t)[2..], [names(&["a", "b"])]);
}

#[test]
fn writes_to_outputs_and_to_imba_state_run_nothing() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    // `out/a.txt` is read by `b`, but it is an output, not a source: no run for it.
    t.write("out/a.txt", "tampered\n");
    t.write("out/new.txt", "x\n");
    t.write(".imba/scratch", "x\n");
    t.write("data/in2.txt", "later change\n");
    w.idle(2);
    assert_eq!(runs(&t)[1..], [names(&["c"])], "{}", w.log());
    assert!(
        w.log().contains("data/in2.txt changed: running c\n"),
        "{}",
        w.log()
    );
}

#[test]
fn a_change_during_a_run_is_queued_into_one_follow_up_run() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    t.write("data/in2.txt", "one\n");
    t.write("data/in1.txt", "slow\n");
    w.wait_for("the slow stage", |_| t.path().join("started").exists());
    for i in 0..5 {
        t.write("data/in2.txt", format!("during {i}\n"));
    }
    w.wait_for("the queued note", |log| {
        log.contains("data/in2.txt changed during the run; it runs again when this one ends")
    });
    t.write("release", "");
    w.idle(2);
    assert_eq!(t.read("out/a.txt"), "SLOW\n");
    assert_eq!(t.read("out/c.txt"), "during 4\n");
    // The five changes made one follow-up run, of `c` alone.
    assert_eq!(
        runs(&t)[1..],
        [names(&["a", "b", "c"]), names(&["c"])],
        "{}",
        w.log()
    );
    assert_eq!(w.count("changed during the run"), 1, "{}", w.log());
}

#[test]
fn restart_cancels_the_run_and_starts_again() {
    let t = project();
    let mut w = Watching::start(&t, &["--restart"]);
    w.idle(1);
    t.write("data/in1.txt", "slow\n");
    w.wait_for("the slow stage", |_| t.path().join("started").exists());
    t.write("data/in1.txt", "quick\n");
    w.wait_for("the restart", |log| {
        log.contains("data/in1.txt changed: cancelling the run to start again")
    });
    w.wait_for("the restarted run's output", |_| {
        std::fs::read_to_string(t.path().join("out/a.txt")).is_ok_and(|s| s == "QUICK\n")
    });
    w.idle(2);
    assert_eq!(t.read("out/b.txt"), "6\n");
    // The cancelled run is recorded as such; the restarted one ran `a` and `b`.
    assert_eq!(runs(&t).last().unwrap(), &names(&["a", "b"]));
    let (code, log) = w.stop();
    assert_eq!(code, Some(130), "{log}");
}

#[test]
fn ctrl_c_mid_stage_cancels_it_and_leaves_outputs_and_lock_intact() {
    let t = project();
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    let lock_before = t.read("pipeline.lock");
    t.write("data/in1.txt", "slow\n");
    w.wait_for("the slow stage", |_| t.path().join("started").exists());
    let (code, log) = w.stop();
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("stopping: cancelling the run"), "{log}");
    assert_eq!(t.read("out/a.txt"), "HELLO\n");
    assert_eq!(t.read("out/b.txt"), "6\n");
    assert_eq!(t.read("pipeline.lock"), lock_before);
    let staging = t.path().join(".imba/staging");
    assert!(
        !staging.read_dir().is_ok_and(|mut d| d.next().is_some()),
        "staging left behind"
    );
    // The next run finishes the job, and only it.
    t.write("release", "");
    let run = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(runs(&t).last().unwrap(), &names(&["a", "b"]));
    assert_eq!(t.read("out/a.txt"), "SLOW\n");
}

#[test]
fn a_second_ctrl_c_kills_a_stage_that_ignores_sigterm() {
    let t = Test::new().file("data/in1.txt", "x\n").pipeline(
        r#"
stages:
  stubborn:
    cmd: "trap '' TERM; touch started; sleep 30; cp {{ inputs.src }} {{ outputs.out }}"
    inputs: {src: data/in1.txt}
    outputs: {out: out/a.txt}
"#,
    );
    let mut w = Watching::start(&t, &[]);
    w.wait_for("the stage", |_| t.path().join("started").exists());
    w.signal(libc::SIGINT);
    w.wait_for("the stopping note", |log| log.contains("stopping:"));
    w.signal(libc::SIGINT);
    let (code, log) = w.wait_exit();
    assert_eq!(code, Some(130), "{log}");
    assert!(!t.path().join("out/a.txt").exists());
}

#[test]
fn a_session_prints_what_changed_and_what_runs() {
    let t = project();
    let mut w = Watching::start(&t, &["--jobs", "1"]);
    w.idle(1);
    t.write("data/in1.txt", "hello again\n");
    w.idle(2);
    t.write("data/in2.txt", "world\n");
    w.idle(3);
    let (code, log) = w.stop();
    assert_eq!(code, Some(130));
    insta::with_settings!({filters => vec![
        (r"\d+\.\d\ds", "[T]"),
        (r"run \d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "run [ID]"),
    ]}, {
        insta::assert_snapshot!(log);
    });
}

#[test]
fn editing_a_vars_file_reloads_and_runs_what_uses_the_var() {
    let t = Test::new()
        .file("data/in.txt", "x\n")
        .file("vars.yaml", "greeting: hello\n")
        .pipeline(
            r#"
vars:
  greeting: hi
stages:
  greet:
    cmd: "echo {{ greeting }} > {{ outputs.out }}"
    outputs: {out: out/greeting.txt}
  copy:
    cmd: "cp {{ inputs.src }} {{ outputs.out }}"
    inputs: {src: data/in.txt}
    outputs: {out: out/copy.txt}
"#,
        );
    let mut w = Watching::spawn(Watching::command(&t, &["--vars", "vars.yaml"]));
    w.idle(1);
    assert_eq!(t.read("out/greeting.txt"), "hello\n");
    t.write("vars.yaml", "greeting: bonjour\n");
    w.wait_for("the reload", |log| {
        log.contains("vars.yaml changed: pipeline reloaded")
    });
    w.idle(2);
    assert_eq!(t.read("out/greeting.txt"), "bonjour\n");
    assert_eq!(runs(&t)[1..], [names(&["greet"])]);
}

#[test]
fn a_new_file_deep_in_an_input_directory_runs_its_reader() {
    let t = Test::new().file("data/parts/2026/01.csv", "1\n").pipeline(
        r#"
stages:
  count:
    cmd: "find {{ inputs.dir }} -type f | sort | xargs cat > {{ outputs.out }}"
    inputs: {dir: data/parts/}
    outputs: {out: out/all.txt}
"#,
    );
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    // A new subdirectory, then a file in it: both seen.
    t.write("data/parts/2026/02/a.csv", "2\n");
    w.wait_for("the new file's run", |_| {
        std::fs::read_to_string(t.path().join("out/all.txt")).is_ok_and(|s| s == "1\n2\n")
    });
    w.idle(2);
    t.write("data/parts/2026/02/b.csv", "3\n");
    w.wait_for("the second file's run", |_| {
        std::fs::read_to_string(t.path().join("out/all.txt")).is_ok_and(|s| s == "1\n2\n3\n")
    });
    w.idle(3);
    let (_, log) = w.stop();
    assert!(
        log.contains("data/parts/ changed: running count\n"),
        "{log}"
    );
}

#[test]
fn s3_inputs_are_polled() {
    let server = s3::S3Server::start();
    server.put("raw/data.csv", "a\n");
    let t = Test::new().file("data/local.txt", "l\n").pipeline(
        r#"
stages:
  fetch:
    cmd: "cp {{ inputs.src }} {{ outputs.out }}"
    inputs: {src: "s3://bucket/raw/data.csv"}
    outputs: {out: out/data.csv}
  local:
    cmd: "cp {{ inputs.src }} {{ outputs.out }}"
    inputs: {src: data/local.txt}
    outputs: {out: out/local.txt}
"#,
    );
    let mut command = Watching::command(&t, &["--poll-interval", "200ms"]);
    server.point(&mut command);
    let mut w = Watching::spawn(command);
    w.idle(1);
    assert!(w.log().contains("1 S3 input (polled)"), "{}", w.log());
    server.put("raw/data.csv", "a\nb\n");
    w.wait_for("the S3 change's run", |_| {
        std::fs::read_to_string(t.path().join("out/data.csv")).is_ok_and(|s| s == "a\nb\n")
    });
    w.idle(2);
    assert_eq!(runs(&t)[1..], [names(&["fetch"])], "{}", w.log());
    let (_, log) = w.stop();
    assert!(
        log.contains("s3://bucket/raw/data.csv changed: running fetch\n"),
        "{log}"
    );
}

#[test]
fn a_new_month_on_s3_is_found_at_the_next_poll() {
    let server = s3::S3Server::start();
    server.put("raw/2017-01/orders.csv", "a\n");
    let t = Test::new().pipeline(
        r#"
partitions:
  month:
    discover: "s3://bucket/raw/{month}/orders.csv"
stages:
  fetch:
    cmd: "cp {{ inputs[0] }} {{ outputs[0] }}"
    inputs: ["s3://bucket/raw/{{ month }}/orders.csv"]
    outputs: ["out/{{ month }}.csv"]
"#,
    );
    let mut command = Watching::command(&t, &["--poll-interval", "200ms"]);
    server.point(&mut command);
    let mut w = Watching::spawn(command);
    w.idle(1);
    server.put("raw/2017-02/orders.csv", "b\n");
    w.wait_for("the new month's run", |log| {
        log.contains("new partition of `month`: 2017-02")
            && log.matches("for changes (Ctrl-C to stop)").count() >= 2
    });
    assert_eq!(t.read("out/2017-02.csv"), "b\n");
    assert_eq!(runs(&t)[1..], [names(&["fetch@2017-02"])], "{}", w.log());
}

/// A built-in stage cannot be killed like a command, so it looks at a flag between MICE
/// iterations: Ctrl-C stops an imputation of a million iterations at once, and nothing of it is
/// committed.
#[test]
fn ctrl_c_stops_a_long_imputation_between_iterations() {
    let mut csv = String::from("x,y\n");
    // 20,000 rows: a million iterations would take minutes (≈ 0.45 ms each here).
    for i in 0..20_000 {
        let x = if i % 3 == 0 {
            String::new()
        } else {
            format!("{}", i % 17)
        };
        csv.push_str(&format!("{x},{}\n", i % 11));
    }
    let t = Test::new().file("data/users.csv", csv).pipeline(
        r#"
stages:
  impute:
    uses: impute
    inputs: {users: data/users.csv}
    outputs: {imputed: out/imputed/}
    params: {columns: [x, y], m: 2, iterations: 1000000, seed: 1}
"#,
    );
    let mut w = Watching::start(&t, &[]);
    w.wait_for("the imputation to start", |log| log.contains("run  impute"));
    let (code, log) = w.stop();
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("cancel impute"), "{log}");
    assert!(!t.path().join("out/imputed").exists());
}

#[test]
fn a_new_month_found_by_discover_runs_alone() {
    let t = Test::new().file("raw/2017-01/orders.csv", "a\n").pipeline(
        r#"
partitions:
  month:
    discover: "raw/{month}/orders.csv"
stages:
  clean:
    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}
    inputs: ["raw/{{ month }}/orders.csv"]
    outputs: ["out/{{ month }}/orders.csv"]
"#,
    );
    let mut w = Watching::start(&t, &[]);
    w.idle(1);
    assert_eq!(runs(&t), vec![names(&["clean@2017-01"])]);
    // A new month's folder and file, as an upload leaves them; a file that is not a month's
    // runs nothing.
    t.write("raw/notes.txt", "x\n");
    t.write("raw/2017-02/orders.csv", "b\n");
    w.wait_for("the new month's run", |log| {
        log.contains("new partition of `month`: 2017-02")
            && log.matches("for changes (Ctrl-C to stop)").count() >= 2
    });
    assert_eq!(
        runs(&t),
        vec![names(&["clean@2017-01"]), names(&["clean@2017-02"])]
    );
    assert_eq!(t.read("out/2017-02/orders.csv"), "b\n");
    let (code, _) = w.stop();
    assert_eq!(code, Some(130));
}
