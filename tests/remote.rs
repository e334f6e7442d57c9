//! The remote run cache, on a real S3 server (s3s, in this process, on 127.0.0.1): a second
//! clone computes nothing, `imba pull` alone brings the outputs, two machines at once compute
//! each stage once, and a corrupt or unreachable remote never fails a run that can compute.

mod common;
#[path = "common/s3.rs"]
mod s3;

use common::{Output, Test};
use s3::S3Server;

const REMOTE: &str = "\ncache:\n  remote: s3://bucket/imba-cache\n  push: auto\n";

/// A clone of the repository with the monthly pipeline, its `cache:` section appended.
fn clone(cache: &str) -> Test {
    common::monthly(cache)
}

fn command(t: &Test, server: &S3Server, args: &[&str]) -> std::process::Command {
    let mut command = t.command(args);
    for (key, value) in server.env() {
        command.env(key, value);
    }
    command.env_remove("AWS_PROFILE").env_remove("IMBA_REMOTE");
    command
}

fn imba(t: &Test, server: &S3Server, args: &[&str]) -> Output {
    t.captured(&command(t, server, args).output().expect("run imba"))
}

fn ok(t: &Test, server: &S3Server, args: &[&str]) -> Output {
    let out = imba(t, server, args);
    assert_eq!(out.code, 0, "imba {args:?} failed:\n{}", out.stderr);
    out
}

fn decisions(t: &Test) -> Vec<(String, String)> {
    t.decisions_of("pipelines/monthly.yaml")
}

fn every(decision: &str) -> Vec<(String, String)> {
    [
        "clean_orders",
        "aggregate_users",
        "impute_days",
        "diagnose_imputation",
        "user_features",
    ]
    .iter()
    .map(|s| (s.to_string(), decision.to_owned()))
    .collect()
}

#[test]
fn a_second_clone_computes_nothing_and_pull_alone_brings_the_outputs() {
    let server = S3Server::start();
    let first = clone(REMOTE);
    ok(&first, &server, &["run", "pipelines/monthly.yaml"]);
    assert_eq!(decisions(&first), every("ran"));
    let outputs = common::tree(&first.path().join("out/monthly"));
    assert!(server
        .keys()
        .iter()
        .any(|k| k.starts_with("imba-cache/runs/")));
    assert!(
        !server
            .keys()
            .iter()
            .any(|k| k.starts_with("imba-cache/leases/")),
        "every lease is given up: {:?}",
        server.keys()
    );

    // A teammate's clone, with the committed lock file: its run computes nothing.
    let second = clone(REMOTE);
    second.write(
        "pipelines/monthly.lock",
        first.read("pipelines/monthly.lock"),
    );
    let run = ok(&second, &server, &["run", "pipelines/monthly.yaml"]);
    assert_eq!(decisions(&second), every("restored"), "{}", run.stderr);
    assert_eq!(common::tree(&second.path().join("out/monthly")), outputs);
    assert_eq!(
        second.read("pipelines/monthly.lock"),
        first.read("pipelines/monthly.lock")
    );

    // CI's clone: `imba pull` alone, and its lock file says everything is up to date.
    let third = clone(REMOTE);
    third.write(
        "pipelines/monthly.lock",
        first.read("pipelines/monthly.lock"),
    );
    let pulled = ok(&third, &server, &["pull", "pipelines/monthly.yaml"]);
    assert!(
        pulled.stderr.contains("0 ran, 5 restored"),
        "{}",
        pulled.stderr
    );
    assert_eq!(common::tree(&third.path().join("out/monthly")), outputs);
    let status = ok(&third, &server, &["status", "pipelines/monthly.yaml"]);
    assert_eq!(status.stdout, "all 5 stages are up to date\n");
}

#[test]
fn pull_without_the_results_in_any_cache_fails_naming_the_stages() {
    let server = S3Server::start();
    let t = clone(REMOTE);
    let out = imba(&t, &server, &["pull", "pipelines/monthly.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("error: stage `clean_orders` failed: it is in no run cache, here or in the remote: `imba run` computes it"),
        "{}",
        out.stderr
    );
    assert!(!t.path().join("out").exists());
}

#[test]
fn push_sends_what_the_lock_refers_to_and_only_what_is_missing() {
    let server = S3Server::start();
    // Push is manual by default: a run pushes nothing.
    let t = clone("\ncache:\n  remote: s3://bucket/imba-cache\n");
    ok(&t, &server, &["run", "pipelines/monthly.yaml"]);
    assert!(server.keys().is_empty(), "{:?}", server.keys());
    let pushed = ok(&t, &server, &["push", "pipelines/monthly.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&pushed.stdout).unwrap();
    assert_eq!(json["moved"]["entries"], 5);
    let blobs = json["moved"]["blobs"].as_u64().unwrap();
    assert!(blobs > 5, "{json}");
    assert_eq!(json["moved"]["present"], 0);
    server.reset_counts();
    let again = ok(&t, &server, &["push", "pipelines/monthly.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(json["moved"]["blobs"], 0);
    assert_eq!(json["moved"]["present"], blobs);
    // Nothing but the entries themselves was written again.
    assert_eq!(server.counts().get("PUT"), 5, "{:?}", server.counts());
}

#[test]
fn two_machines_at_once_compute_each_stage_once() {
    let server = S3Server::start();
    let a = clone(REMOTE);
    let b = clone(REMOTE);
    let mut runs: Vec<std::process::Child> = [&a, &b]
        .iter()
        .map(|t| {
            command(t, &server, &["run", "pipelines/monthly.yaml"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn imba")
        })
        .collect();
    let mut logs = Vec::new();
    for child in runs.iter_mut() {
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{stderr}");
        logs.push(stderr);
    }
    let (da, db) = (decisions(&a), decisions(&b));
    for ((stage, x), (_, y)) in da.iter().zip(&db) {
        let mut pair = [x.as_str(), y.as_str()];
        pair.sort();
        assert_eq!(
            pair,
            ["ran", "restored"],
            "stage {stage}: one machine computes it, the other restores it\n{}\n{}",
            logs[0],
            logs[1]
        );
    }
    assert_eq!(
        common::tree(&a.path().join("out/monthly")),
        common::tree(&b.path().join("out/monthly"))
    );
}

#[test]
fn a_corrupt_remote_blob_is_named_and_the_stage_computed() {
    let server = S3Server::start();
    let first = clone(REMOTE);
    ok(&first, &server, &["run", "pipelines/monthly.yaml"]);
    let cleaned = std::fs::read(first.path().join("out/monthly/cleaned/orders.parquet")).unwrap();
    let hash = blake3::hash(&cleaned).to_hex().to_string();
    let key = format!("imba-cache/blobs/{}/{}", &hash[..2], &hash[2..]);
    assert!(server.read(&key).is_some(), "{key}");
    server.put(&key, "not the table");

    let second = clone(REMOTE);
    let out = ok(&second, &server, &["run", "pipelines/monthly.yaml"]);
    assert!(
        out.stderr.contains(&format!(
            "warning: the remote object s3://bucket/{key} is corrupt: expected BLAKE3 {hash}, found {}; it is not used",
            blake3::hash(b"not the table").to_hex()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(
        decisions(&second)[0],
        ("clean_orders".to_owned(), "ran".to_owned())
    );
    assert_eq!(
        std::fs::read(second.path().join("out/monthly/cleaned/orders.parquet")).unwrap(),
        cleaned
    );
}

#[test]
fn an_unreachable_remote_is_a_warning_and_the_run_computes() {
    let server = S3Server::start();
    let t = clone(REMOTE);
    let mut run = command(&t, &server, &["run", "pipelines/monthly.yaml"]);
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    run.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
    let output = run.output().unwrap();
    let stderr =
        String::from_utf8_lossy(&output.stderr).replace(&t.path().display().to_string(), "[TMP]");
    assert!(output.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, not one per stage: {stderr}"
    );
    assert!(
        warnings[0]
            .starts_with("warning: the remote run cache s3://bucket/imba-cache cannot be used ("),
        "{stderr}"
    );
    assert!(
        warnings[0].ends_with("); this run computes without it"),
        "{stderr}"
    );
    assert_eq!(decisions(&t), every("ran"));
}

#[test]
fn an_expired_lease_of_a_killed_machine_is_taken_over() {
    let server = S3Server::start();
    let fingerprint = fingerprint_of_clean_orders(&server);
    // What a machine killed while computing clean_orders leaves: its lease, long expired.
    let t = clone(REMOTE);
    server.put(
        &format!(
            "imba-cache/leases/{}/{}.json",
            &fingerprint[..2],
            &fingerprint[2..]
        ),
        r#"{"holder":"ci@gone pid 1","run":"20261201T000000.000Z-dead","since":"2026-12-01T00:00:00Z","expires":1764547200}"#,
    );
    let out = ok(&t, &server, &["run", "pipelines/monthly.yaml"]);
    assert!(!out.stderr.contains("wait"), "{}", out.stderr);
    assert!(
        out.stderr.contains("warning: stage `clean_orders`: the lease of ci@gone pid 1 (run 20261201T000000.000Z-dead), computing it since 2026-12-01T00:00:00Z, expired without a result; this run computes it"),
        "{}",
        out.stderr
    );
    assert_eq!(decisions(&t), every("ran"));
    assert!(
        !server
            .keys()
            .iter()
            .any(|k| k.starts_with("imba-cache/leases/")),
        "{:?}",
        server.keys()
    );
}

#[test]
fn a_live_lease_makes_a_run_wait_for_its_result() {
    let server = S3Server::start();
    let fingerprint = fingerprint_of_clean_orders(&server);
    let lease = format!(
        "imba-cache/leases/{}/{}.json",
        &fingerprint[..2],
        &fingerprint[2..]
    );
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    server.put(
        &lease,
        format!(r#"{{"holder":"alice@laptop pid 7","run":"R1","since":"2026-12-03T09:00:00Z","expires":{far}}}"#),
    );
    let t = clone(REMOTE);
    let mut waiting = command(
        &t,
        &server,
        &["run", "pipelines/monthly.yaml", "-s", "clean_orders"],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(waiting.try_wait().unwrap().is_none(), "it waits");
    // The holder gives the lease up without a result (it failed): the waiting run computes.
    server.delete(&lease);
    let mut stderr = String::new();
    std::io::Read::read_to_string(waiting.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(waiting.wait().unwrap().success(), "{stderr}");
    assert!(
        stderr.contains("  wait clean_orders (alice@laptop pid 7 (run R1) has been computing it since 2026-12-03T09:00:00Z; waiting for its result)"),
        "{stderr}"
    );
    assert_eq!(
        decisions(&t)[0],
        ("clean_orders".to_owned(), "ran".to_owned())
    );
}

/// The fingerprint `clean_orders` has on the sample, from a run without a remote.
fn fingerprint_of_clean_orders(server: &S3Server) -> String {
    let t = clone("");
    ok(
        &t,
        server,
        &["run", "pipelines/monthly.yaml", "-s", "clean_orders"],
    );
    let lock: serde_json::Value = serde_json::from_str(&t.read("pipelines/monthly.lock")).unwrap();
    lock["stages"]["clean_orders"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A remote that fails is a warning and the run computes (exit 0); `imba push` to it fails
/// (exit 1); a command that needs a remote and has none is a usage error (exit 2). The whole
/// output, as the error catalogue (docs/errors.md) shows it.
#[test]
fn remote_errors_are_named_whole() {
    let server = S3Server::start();
    let pipeline = |remote: &str| {
        format!(
            "cache:\n  remote: {remote}\n  push: auto\nstages:\n  copy:\n    cmd: cp {{{{ inputs[0] }}}} {{{{ outputs[0] }}}}\n    inputs: [data.csv]\n    outputs: [out/copy.csv]\n"
        )
    };
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let snapshot = |name: &str, t: &Test, args: &[&str], env: &[(&str, &str)], code: i32| {
        let mut command = command(t, &server, args);
        for (key, value) in env {
            command.env(key, value);
        }
        let out = t.captured(&command.output().unwrap());
        assert_eq!(out.code, code, "{}", out.stderr);
        insta::with_settings!({filters => vec![
            (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
            (r"\d+\.\d{2}s", "[TIME]"),
            (r"127\.0\.0\.1:\d+", "127.0.0.1:[PORT]"),
        ]}, {
            insta::assert_snapshot!(name, out.all());
        });
    };
    let unreachable = format!("http://127.0.0.1:{closed}");

    let t = Test::new()
        .file("data.csv", "a\n1\n")
        .pipeline(&pipeline("s3://bucket/imba-cache"));
    snapshot(
        "an_unreachable_remote_is_a_warning",
        &t,
        &["run", "pipeline.yaml"],
        &[("AWS_ENDPOINT_URL", &unreachable)],
        0,
    );
    snapshot(
        "push_to_an_unreachable_remote",
        &t,
        &["push", "pipeline.yaml"],
        &[("AWS_ENDPOINT_URL", &unreachable)],
        1,
    );

    let t = Test::new()
        .file("data.csv", "a\n1\n")
        .pipeline(&pipeline("s3://nobucket/imba-cache"));
    snapshot(
        "a_remote_whose_bucket_does_not_exist",
        &t,
        &["run", "pipeline.yaml"],
        &[],
        0,
    );

    let t = Test::new()
        .file("data.csv", "a\n1\n")
        .pipeline(&pipeline("s3://bucket/imba-cache"));
    snapshot(
        "a_remote_that_refuses_the_credentials",
        &t,
        &["run", "pipeline.yaml"],
        &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
        0,
    );

    let t = Test::new()
        .file("data.csv", "a\n1\n")
        .pipeline(&pipeline("s3://bucket/imba-cache"));
    let fingerprint = {
        let dry = Test::new()
            .file("data.csv", "a\n1\n")
            .pipeline(&pipeline("s3://bucket/imba-cache"));
        let out = command(&dry, &server, &["run", "pipeline.yaml", "--no-remote"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let lock: serde_json::Value = serde_json::from_str(&dry.read("pipeline.lock")).unwrap();
        lock["stages"]["copy"]["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    server.put(
        &format!("imba-cache/leases/{}/{}.json", &fingerprint[..2], &fingerprint[2..]),
        r#"{"holder":"ci@runner-7 pid 4242","run":"20261201T000000.000Z-dead","since":"2026-12-01T00:00:00Z","expires":1764547200}"#,
    );
    snapshot(
        "a_lease_held_by_a_dead_machine_is_taken_over",
        &t,
        &["run", "pipeline.yaml"],
        &[],
        0,
    );

    let t = Test::new().file("data.csv", "a\n1\n").pipeline(
        "stages:\n  copy:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [data.csv]\n    outputs: [out/copy.csv]\n",
    );
    snapshot(
        "push_without_a_remote",
        &t,
        &["push", "pipeline.yaml"],
        &[],
        2,
    );
}

#[test]
fn gc_collects_the_remote_too_keeping_what_the_lock_refers_to() {
    let server = S3Server::start();
    let t = clone(REMOTE);
    ok(&t, &server, &["run", "pipelines/monthly.yaml"]);
    ok(
        &t,
        &server,
        &["run", "pipelines/monthly.yaml", "--set", "impute_days.m=5"],
    );
    let runs = |server: &S3Server| {
        server
            .keys()
            .iter()
            .filter(|k| k.starts_with("imba-cache/runs/"))
            .count()
    };
    assert_eq!(runs(&server), 8, "5 stages, then 3 again with m=5");
    // Young objects stay (another machine may be pushing them); entries go at once.
    let young = ok(
        &t,
        &server,
        &[
            "gc",
            "pipelines/monthly.yaml",
            "--remote",
            "--dry-run",
            "--json",
        ],
    );
    let young: serde_json::Value = serde_json::from_str(&young.stdout).unwrap();
    assert_eq!(young["remote"]["removed"]["entries"], 3, "{young}");
    assert_eq!(young["remote"]["removed"]["blobs"], 0, "{young}");
    assert_eq!(runs(&server), 8, "a dry run removes nothing");
    for key in server.keys() {
        server.age(&key, std::time::Duration::from_secs(7200));
    }
    let gc = ok(&t, &server, &["gc", "pipelines/monthly.yaml", "--remote"]);
    assert!(
        gc.stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("s3://bucket/imba-cache: removed 3 entries, ")),
        "{}",
        gc.stdout
    );
    assert_eq!(runs(&server), 5);
    // What the lock refers to is whole: a fresh clone with it pulls every output.
    let other = clone(REMOTE);
    other.write("pipelines/monthly.lock", t.read("pipelines/monthly.lock"));
    let pulled = ok(
        &other,
        &server,
        &["pull", "pipelines/monthly.yaml", "--set", "impute_days.m=5"],
    );
    assert!(
        pulled.stderr.contains("0 ran, 5 restored"),
        "{}",
        pulled.stderr
    );
}
