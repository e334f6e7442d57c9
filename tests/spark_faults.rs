//! Faults on a real Spark cluster: a client without the server's token (refused, nothing run), a
//! lost worker mid-stage (Spark runs its tasks again on the other, and the stage commits the
//! local engine's table), then a lost Spark Connect server mid-stage (the stage fails at once
//! with a clear error, and the committed output stays as it was). A cluster of its own
//! (`scripts/spark-local` with its own state folder and a token), stopped at the end. Built with
//! `--features spark` only; where the cluster cannot start the test says so and passes, but
//! under CI (`CI` set) it fails.
#![cfg(feature = "spark")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster started for this test, stopped when dropped.
struct Cluster {
    state: PathBuf,
    remote: String,
}

impl Cluster {
    fn start(state: PathBuf) -> Option<Cluster> {
        // Stopped when dropped, whether it started or not (what did start goes).
        let mut cluster = Cluster {
            state,
            remote: String::new(),
        };
        let env = [
            ("SPARK_LOCAL_STATE", cluster.state.as_os_str()),
            ("SPARK_LOCAL_TOKEN", std::ffi::OsStr::new(TOKEN)),
        ];
        let remote = common::start_cluster("spark-local", &env, "SPARK_REMOTE");
        cluster.remote = remote?;
        Some(cluster)
    }

    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new(common::repo().join("scripts/spark-local"))
            .args(args)
            .env("SPARK_LOCAL_STATE", &self.state)
            .output()
            .expect("run scripts/spark-local")
    }

    fn kill(&self, name: &str) {
        let out = self.script(&["kill", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What the Spark driver (the Connect server) logged.
    fn driver_log(&self) -> String {
        std::fs::read_to_string(self.state.join("logs/connect.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.script(&["stop"]);
    }
}

/// Orders enough for a stage to take a while on two 1-core workers: a repeated row every
/// thousand, gaps from 0 to 30 with a far outlier every 997 rows, an empty gap every 13.
fn orders(rows: usize) -> String {
    use std::fmt::Write;
    let mut csv = String::from("order_id,user_id,days,dow\n");
    for i in 0..rows {
        let id = if i % 1000 == 999 { i - 1 } else { i };
        let days = match id {
            d if d % 13 == 0 => String::new(),
            d if d % 997 == 0 => "400".to_owned(),
            d => format!("{}.0", (d * 7) % 31),
        };
        writeln!(csv, "{id},{},{days},{}", id / 17, id % 7).unwrap();
    }
    csv
}

/// The Connect server's token: the pipeline names the variable that holds it.
/// (`=`, `;` and `%` are in it: the address's parameters must still read.)
const TOKEN: &str = "faults=token;7f%3a";

const PIPELINE: &str = r#"
vars: {engine: local}
engines:
  spark: {token_env: IMBA_FAULTS_TOKEN}
stages:
  clean:
    uses: clean
    inputs: {table: orders.csv}
    outputs: {table: "out/{{ engine }}/orders.parquet", summary: "out/{{ engine }}/summary.json"}
    params:
      cast: {order_id: int64, user_id: int64, days: float64, dow: int64}
      iqr: {columns: [days], k: 1.5}
      dropna: {subset: [days]}
      dedup: true
"#;

/// Starts the stage on Spark; returns once it is running there (its `run` line is printed).
fn start_on_spark(
    t: &common::Test,
    remote: &str,
    force: bool,
) -> (Child, std::thread::JoinHandle<String>) {
    let mut args = vec![
        "run",
        "pipeline.yaml",
        "--set",
        "engine=spark",
        "--engine",
        "spark",
    ];
    if force {
        args.push("--force");
    }
    let mut command = t.command(&args);
    command
        .env("SPARK_REMOTE", remote)
        .env("IMBA_FAULTS_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (started, running) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("run  clean") {
                let _ = started.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    running
        .recv_timeout(Duration::from_secs(60))
        .expect("the stage did not start");
    (child, reader)
}

/// Waits for the run to end, at most `limit`.
fn finish(
    mut child: Child,
    reader: std::thread::JoinHandle<String>,
    limit: Duration,
) -> (i32, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), reader.join().unwrap());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the run did not end within {limit:?}:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_lost_worker_is_retried_and_a_lost_server_fails_the_stage_cleanly() {
    let t = common::Test::new()
        .pipeline(PIPELINE)
        .file("orders.csv", orders(2_000_000));
    let Some(cluster) = Cluster::start(t.path().join("cluster")) else {
        return;
    };
    t.run_ok(&[]);

    // Without the token, or with another one, the server refuses the client: the stage fails,
    // and neither token is printed.
    t.write(
        "unauthenticated.yaml",
        PIPELINE.replace("engines:\n  spark: {token_env: IMBA_FAULTS_TOKEN}\n", ""),
    );
    let refused = [
        ("without_a_token", cluster.remote.clone()),
        (
            "with_another_token",
            format!("{}/;token=not-the-token", cluster.remote),
        ),
    ];
    for (name, remote) in refused {
        // Now and then (once in two runs on 2026-12-04) the server resets the connection before its refusal
        // reaches the client, which then says "transport error": the stage fails all the same,
        // and a second try gets the server's words.
        let mut out = None;
        for _ in 0..3 {
            let mut command = t.command(&["run", "unauthenticated.yaml", "--engine", "spark"]);
            command.env("SPARK_REMOTE", &remote);
            let tried = t.captured(&command.output().unwrap());
            let reset = tried.code == 1 && tried.stderr.contains("transport error");
            out = Some(tried);
            if !reset {
                break;
            }
        }
        let out = out.unwrap();
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(!out.all().contains("not-the-token"), "{}", out.stderr);
        assert!(!t.path().join("out/spark").exists());
        crate::assert_run_snapshot!(format!("a_client_{name}_is_refused"), &out.all());
    }

    // A worker lost mid-stage: its tasks run again on the other one, the stage commits.
    let (child, reader) = start_on_spark(&t, &cluster.remote, false);
    std::thread::sleep(Duration::from_secs(4));
    let (code, stderr) = {
        cluster.kill("worker1");
        finish(child, reader, Duration::from_secs(600))
    };
    assert_eq!(code, 0, "{stderr}");
    let log = cluster.driver_log();
    assert!(
        log.contains("Lost executor")
            || log.contains("Executor lost")
            || log.contains("ExecutorLostFailure"),
        "the worker was not lost mid-stage (the stage ended first?):\n{stderr}"
    );
    assert_eq!(
        t.read("out/local/summary.json"),
        t.read("out/spark/summary.json"),
        "the summary after the retry"
    );
    let bytes = |path: &str| std::fs::read(t.path().join(path)).unwrap();
    let committed = bytes("out/spark/orders.parquet");
    let lock = t.read("pipeline.lock");

    // Ctrl-C mid-stage: the stage's Spark jobs are cancelled on the cluster, nothing is
    // committed, and imba exits as interrupted.
    let jobs_cancelled = |log: &str| log.to_lowercase().matches("cancel").count();
    let before = jobs_cancelled(&cluster.driver_log());
    let (child, reader) = start_on_spark(&t, &cluster.remote, true);
    std::thread::sleep(Duration::from_secs(4));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let (code, stderr) = finish(child, reader, Duration::from_secs(120));
    assert_eq!(code, 130, "{stderr}");
    crate::assert_run_snapshot!("ctrl_c_cancels_the_spark_jobs", &stderr);
    assert_eq!(bytes("out/spark/orders.parquet"), committed);
    assert_eq!(t.read("pipeline.lock"), lock);
    // The driver logs the cancellation a moment later.
    let waited = Instant::now();
    while jobs_cancelled(&cluster.driver_log()) == before
        && waited.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        jobs_cancelled(&cluster.driver_log()) > before,
        "no Spark job was cancelled"
    );

    // The Connect server lost mid-stage: the stage fails at once, naming the server; the table
    // committed before stays as it was, and so does the lock.
    let (child, reader) = start_on_spark(&t, &cluster.remote, true);
    std::thread::sleep(Duration::from_secs(4));
    cluster.kill("connect");
    let started = Instant::now();
    let (code, stderr) = finish(child, reader, Duration::from_secs(120));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failure took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!(
            "error: stage `clean` failed: Spark at {}",
            cluster.remote
        )) || stderr.contains(&format!(
            "error: stage `clean` failed: the Spark Connect server at {} stopped answering",
            cluster.remote
        )),
        "{stderr}"
    );
    assert_eq!(bytes("out/spark/orders.parquet"), committed);
    assert_eq!(t.read("pipeline.lock"), lock);
    // The token is in no file imba wrote.
    for (path, bytes) in common::tree(&t.path().join(".imba")) {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "the token is in .imba/{path}"
        );
    }
}
