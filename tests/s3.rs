//! S3 inputs and outputs against a real S3 server (s3s-fs, started by the test on 127.0.0.1):
//! the same skipping, atomicity and errors as with local files. Keys as written are checked
//! against moto's server too; timeouts and cancellation against an endpoint that never answers.

mod common;
#[path = "common/moto.rs"]
mod moto;
#[path = "common/s3.rs"]
mod s3;

use common::{Output, Test};
use s3::S3Server;

fn run(t: &Test, server: &S3Server, args: &[&str]) -> Output {
    run_with(t, server, args, &[])
}

/// [`run`], with these variables set over the server's (an empty value removes one).
fn run_with(t: &Test, server: &S3Server, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = t.command(args);
    server.point(&mut command);
    for (key, value) in env {
        if value.is_empty() {
            command.env_remove(key);
        } else {
            command.env(key, value);
        }
    }
    t.captured(&command.output().expect("run imba"))
}

/// raw.csv on S3 → copy (to S3) → count (S3 to local); split writes an S3 directory.
const PIPELINE: &str = r#"
stages:
  copy:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [s3://bucket/raw/data.csv]
    outputs: [s3://bucket/out/copy.csv]
  count:
    cmd: wc -l < {{ inputs[0] }} | tr -d ' ' > {{ outputs[0] }}
    inputs: [s3://bucket/out/copy.csv]
    outputs: [out/count.txt]
  split:
    cmd:
      - head -n 2 {{ inputs[0] }} > {{ outputs[0] }}/head.csv
      - tail -n 1 {{ inputs[0] }} > {{ outputs[0] }}/tail.csv
    inputs: [s3://bucket/out/copy.csv]
    outputs: [s3://bucket/out/parts/]
  merge:
    cmd: cat {{ inputs[0] }}/head.csv {{ inputs[0] }}/tail.csv > {{ outputs[0] }}
    inputs: [s3://bucket/out/parts/]
    outputs: [out/merged.csv]
"#;

const DATA: &str = "id,x\n1,5\n2,7\n3,9\n";

#[test]
fn stages_read_and_write_s3_and_a_second_run_downloads_nothing() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new().pipeline(PIPELINE);
    let first = run(&t, &server, &["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(server.read("out/copy.csv").unwrap(), DATA.as_bytes());
    assert_eq!(t.read("out/count.txt"), "4\n");
    assert_eq!(t.read("out/merged.csv"), "id,x\n1,5\n3,9\n");
    assert_eq!(
        server.keys(),
        [
            "out/copy.csv",
            "out/parts/_imba_manifest.json",
            "out/parts/head.csv",
            "out/parts/tail.csv",
            "raw/data.csv"
        ],
        "no staging objects are left behind"
    );

    // Nothing changed: every stage is skipped, from HEAD and LIST requests alone.
    server.reset_counts();
    let second = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.stderr.contains("0 ran, 4 up to date"),
        "{}",
        second.stderr
    );
    let counts = server.counts();
    assert_eq!(counts.get("GET object"), 0, "{counts:?}");
    assert_eq!(counts.get("PUT"), 0, "{counts:?}");
    assert!(counts.get("HEAD") > 0, "{counts:?}");

    // `status` too.
    server.reset_counts();
    let status = run(&t, &server, &["status", "pipeline.yaml"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert_eq!(server.counts().get("GET object"), 0);

    // A new input object re-runs its downstream, and only that.
    server.put("raw/data.csv", "id,x\n1,5\n2,8\n3,9\n");
    let third = run(&t, &server, &["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert!(
        third
            .stderr
            .contains("run  copy (input s3://bucket/raw/data.csv changed)"),
        "{}",
        third.stderr
    );
    // The copy changed, so its readers ran; `merge` read identical parts and was cut off.
    assert!(third.stderr.contains("run  count"), "{}", third.stderr);
    assert!(third.stderr.contains("run  split"), "{}", third.stderr);
    assert!(
        third.stderr.contains("done split (") && third.stderr.contains("outputs unchanged"),
        "{}",
        third.stderr
    );
    assert!(
        third.stderr.contains("skip merge (up to date)"),
        "{}",
        third.stderr
    );
}

/// The shipped monthly pipeline, reading its orders from S3 and writing its whole layout there:
/// every object is byte for byte what a local run writes.
#[test]
fn the_monthly_pipeline_on_s3_writes_what_a_local_run_writes() {
    let server = S3Server::start();
    let repo = common::repo();
    let orders = std::fs::read(repo.join("examples/instacart/orders.csv")).unwrap();
    server.put("raw/orders.csv", &orders);
    let t = Test::new()
        .file(
            "pipelines/monthly.yaml",
            std::fs::read(repo.join("pipelines/monthly.yaml")).unwrap(),
        )
        .file("examples/instacart/orders.csv", &orders);
    let local = run(&t, &server, &["run", "pipelines/monthly.yaml"]);
    assert_eq!(local.code, 0, "{}", local.stderr);
    let remote = run(
        &t,
        &server,
        &[
            "run",
            "pipelines/monthly.yaml",
            "--set",
            "input=s3://bucket/raw/orders.csv",
            "--set",
            "out=s3://bucket/monthly",
        ],
    );
    assert_eq!(remote.code, 0, "{}", remote.stderr);
    let mut compared = 0;
    for entry in walkdir::WalkDir::new(t.path().join("out/monthly")) {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let relative = entry
            .path()
            .strip_prefix(t.path().join("out/monthly"))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let key = format!("monthly/{relative}");
        let remote = server.read(&key);
        // A version's metadata says when and from where it was made: the only file that
        // differs by design.
        if relative.ends_with("_meta.json") {
            assert!(remote.is_some(), "{key} is missing");
            continue;
        }
        assert!(
            remote.as_deref() == Some(std::fs::read(entry.path()).unwrap().as_slice()),
            "{key} differs from the local run"
        );
        compared += 1;
    }
    assert!(compared >= 20, "the whole layout: {compared} files");
    for manifest in ["imputed", "diagnostics", "features/features_v1"] {
        assert!(
            server
                .read(&format!("monthly/{manifest}/_imba_manifest.json"))
                .is_some(),
            "{manifest}/ is committed with its manifest"
        );
    }
    server.reset_counts();
    let again = run(
        &t,
        &server,
        &[
            "run",
            "pipelines/monthly.yaml",
            "--set",
            "input=s3://bucket/raw/orders.csv",
            "--set",
            "out=s3://bucket/monthly",
        ],
    );
    assert!(
        again.stderr.contains("0 ran, 5 up to date"),
        "{}",
        again.stderr
    );
    assert_eq!(
        server.counts().get("GET object"),
        0,
        "{:?}",
        server.counts()
    );
}

/// The server dies while a directory output is being uploaded: the stage fails naming the
/// object, nothing under the prefix changed (no manifest, the earlier files intact), and the
/// next run, with the server back, commits.
#[test]
fn a_server_that_dies_mid_upload_leaves_the_committed_version() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new().pipeline(
        r#"
stages:
  split:
    cmd:
      - cp {{ inputs[0] }} {{ outputs[0] }}/a.csv
      - cp {{ inputs[0] }} {{ outputs[0] }}/b.csv
      - cp {{ inputs[0] }} {{ outputs[0] }}/c.csv
    inputs: [s3://bucket/raw/data.csv]
    outputs: [s3://bucket/out/parts/]
"#,
    );
    assert_eq!(run(&t, &server, &["run", "pipeline.yaml"]).code, 0);
    let manifest = server.read("out/parts/_imba_manifest.json").unwrap();

    server.put("raw/data.csv", "id,x\n9,9\n");
    server.stop_after_puts(2);
    let failed = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    let error = failed.stage_error();
    assert!(
        error.starts_with("error: stage `split` failed: cannot upload s3://bucket/.imba-staging/")
            && error.ends_with("the output `s3://bucket/out/parts/` was not committed"),
        "{error}"
    );
    assert_eq!(
        server.read("out/parts/_imba_manifest.json").unwrap(),
        manifest
    );
    for part in ["a", "b", "c"] {
        assert_eq!(
            server.read(&format!("out/parts/{part}.csv")).unwrap(),
            DATA.as_bytes()
        );
    }

    server.resume();
    let fixed = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(fixed.code, 0, "{}", fixed.stderr);
    assert_eq!(server.read("out/parts/a.csv").unwrap(), b"id,x\n9,9\n");
    // The successful run's staging copies are gone; the killed run's upload stays a day, in
    // case it belongs to a run still going elsewhere.
    let staged = |server: &S3Server| -> Vec<String> {
        server
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(".imba-staging/"))
            .collect()
    };
    let abandoned = staged(&server);
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    assert!(
        abandoned[0].starts_with(".imba-staging/out/parts/") && abandoned[0].ends_with("/a.csv")
    );
    server.age(&abandoned[0], std::time::Duration::from_secs(2 * 86_400));
    server.put("raw/data.csv", "id,x\n8,8\n");
    assert_eq!(run(&t, &server, &["run", "pipeline.yaml"]).code, 0);
    assert_eq!(staged(&server), Vec::<String>::new());
}

/// Wrong credentials, a missing bucket, an unreachable endpoint: a clear error naming the
/// bucket, the key and the S3 error, exit 1, nothing committed.
#[test]
fn s3_errors_name_the_bucket_the_key_and_the_code() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let pipeline = |input: &str| {
        format!(
            "stages:\n  copy:\n    cmd: cp {{{{ inputs[0] }}}} {{{{ outputs[0] }}}}\n    inputs: [{input}]\n    outputs: [out/copy.csv]\n"
        )
    };
    // The whole output, as the error catalogue (docs/errors.md) shows it.
    let snapshot = |name: &str, out: &Output| {
        assert_eq!(out.code, 1, "{}", out.stderr);
        insta::with_settings!({filters => vec![
            (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
            (r"\d+\.\d{2}s", "[TIME]"),
            (r"127\.0\.0\.1:\d+", "127.0.0.1:[PORT]"),
        ]}, {
            insta::assert_snapshot!(name, out.all());
        });
    };

    let t = Test::new().pipeline(&pipeline("s3://nobucket/raw/data.csv"));
    snapshot(
        "a_bucket_that_does_not_exist",
        &run(&t, &server, &["run", "pipeline.yaml"]),
    );

    let t = Test::new().pipeline(&pipeline("s3://bucket/raw/nothing.csv"));
    snapshot(
        "an_s3_input_that_does_not_exist",
        &run(&t, &server, &["run", "pipeline.yaml"]),
    );

    let t = Test::new().pipeline(&pipeline("s3://bucket/raw/data.csv"));
    let denied = run_with(
        &t,
        &server,
        &["run", "pipeline.yaml"],
        &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
    );
    snapshot("a_wrong_secret_key", &denied);

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let endpoint = format!("http://127.0.0.1:{port}");
    let unreachable = run_with(
        &t,
        &server,
        &["run", "pipeline.yaml"],
        &[("AWS_ENDPOINT_URL", endpoint.as_str())],
    );
    snapshot("an_s3_endpoint_nothing_listens_on", &unreachable);
    assert!(!t.path().join("out/copy.csv").exists());
}

/// Credentials and region from a profile of the shared AWS files, as the AWS CLI reads them.
#[test]
fn credentials_come_from_an_aws_profile() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new()
        .pipeline("stages:\n  copy:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [s3://bucket/raw/data.csv]\n    outputs: [out/copy.csv]\n")
        .file(
            "aws/credentials",
            format!(
                "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[imba]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                s3::ACCESS_KEY,
                s3::SECRET_KEY
            ),
        )
        .file("aws/config", "[profile imba]\nregion = us-east-1\n");
    let credentials = t.path().join("aws/credentials");
    let config = t.path().join("aws/config");
    let out = run_with(
        &t,
        &server,
        &["run", "pipeline.yaml"],
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_REGION", ""),
            ("AWS_SHARED_CREDENTIALS_FILE", credentials.to_str().unwrap()),
            ("AWS_CONFIG_FILE", config.to_str().unwrap()),
            ("AWS_PROFILE", "imba"),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(t.read("out/copy.csv"), DATA);
}

/// A `change` check on an S3 output compares with the object committed there, and a failed
/// check keeps the committed object.
#[test]
fn a_change_check_compares_with_the_committed_s3_object() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new().pipeline(
        "stages:\n  copy:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [s3://bucket/raw/data.csv]\n    outputs: [s3://bucket/out/copy.csv]\n    checks:\n      - change: {metric: rows, max_pct: 50}\n",
    );
    let first = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    server.put("raw/data.csv", "id,x\n1,5\n2,7\n3,9\n4,1\n5,1\n6,1\n7,1\n");
    let second = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert!(
        second.stderr.contains(
            "check `change(rows)` on s3://bucket/out/copy.csv: rows changed by 133.33%: 3 → 7, expected ≤ 50%"
        ),
        "{}",
        second.stderr
    );
    assert_eq!(server.read("out/copy.csv").unwrap(), DATA.as_bytes());
}

/// The baseline of a versioned S3 output is its latest version (not the whole prefix, with every
/// version in it), as for a local one.
#[test]
fn a_versioned_s3_output_is_compared_with_its_latest_version() {
    let server = S3Server::start();
    server.put("raw/data.csv", "id,x\n1,5\n2,7\n3,1\n4,2\n");
    let t = Test::new().pipeline(
        r#"
stages:
  copy:
    cmd: mkdir -p {{ outputs[0] }} && cp {{ inputs[0] }} {{ outputs[0] }}/table.csv
    inputs: [s3://bucket/raw/data.csv]
    outputs: [s3://bucket/out/tables/]
    version: auto
    checks:
      - change: {metric: rows, max_pct: 30}
        output: s3://bucket/out/tables/table.csv
"#,
    );
    let first = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    server.put("raw/data.csv", "id,x\n1,5\n2,7\n3,1\n4,2\n5,0\n");
    let grew = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(grew.code, 0, "{}", grew.stderr);
    server.put("raw/data.csv", "id,x\n1,5\n");
    let shrank = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(shrank.code, 1, "{}", shrank.stderr);
    assert!(
        shrank
            .stderr
            .contains("rows changed by 80%: 5 → 1, expected ≤ 30%"),
        "{}",
        shrank.stderr
    );
    assert!(server.read("out/tables/tables_v3/table.csv").is_none());
}

/// Throttling (`503 SlowDown`) is retried with backoff; a run through it succeeds.
#[test]
fn throttled_requests_are_retried() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new().pipeline(PIPELINE);
    server.throttle(3);
    let out = run(&t, &server, &["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(server.counts().get("throttled"), 3);
    assert_eq!(server.read("out/copy.csv").unwrap(), DATA.as_bytes());

    // Throttled past the last try: the error says so.
    server.put("raw/data.csv", "id,x\n0,0\n");
    server.throttle(usize::MAX);
    let t = Test::new().pipeline(
        "storage:\n  retries: 1\nstages:\n  copy:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [s3://bucket/raw/data.csv]\n    outputs: [out/copy.csv]\n",
    );
    let out = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "cannot read `s3://bucket/raw/data.csv`: SlowDown: Please reduce your request rate."
        ),
        "{}",
        out.stderr
    );
}

/// A stage reading one file of a prefix another stage writes, in the same run: what was looked
/// up before the run does not hide what the upstream stage committed.
#[test]
fn a_file_of_a_prefix_written_in_the_same_run_is_read() {
    let server = S3Server::start();
    let t = Test::new().file("in.csv", "a\n1\n").pipeline(
        "stages:\n  dir:\n    cmd: mkdir -p {{ outputs[0] }}/sub && cp {{ inputs[0] }} {{ outputs[0] }}/sub/f.csv\n    inputs: [in.csv]\n    outputs: [s3://bucket/d/]\n  read:\n    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}\n    inputs: [s3://bucket/d/sub/f.csv]\n    outputs: [out.txt]\n",
    );
    let out = run(&t, &server, &["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(t.read("out.txt"), "a\n1\n");
    let again = run(&t, &server, &["run", "pipeline.yaml"]);
    assert!(
        again.stderr.contains("0 ran, 2 up to date"),
        "{}",
        again.stderr
    );
}

/// `kill -9` of imba while it uploads: the committed version stays, and the next run re-runs
/// only the stage whose outputs were not committed.
#[test]
fn killing_imba_mid_upload_loses_nothing() {
    let server = S3Server::start();
    let t = Test::new().file("in.csv", "a\n1\n").pipeline(
        "stages:\n  local:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [in.csv]\n    outputs: [out/local.csv]\n  upload:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}/a.csv && cp {{ inputs[0] }} {{ outputs[0] }}/b.csv\n    inputs: [out/local.csv]\n    outputs: [s3://bucket/out/parts/]\n",
    );
    assert_eq!(
        run(&t, &server, &["run", "pipeline.yaml", "-j", "1"]).code,
        0
    );
    let manifest = server.read("out/parts/_imba_manifest.json").unwrap();

    t.write("in.csv", "a\n2\n");
    server.reset_counts();
    server.hold_puts();
    let mut command = t.command(&["run", "pipeline.yaml", "-j", "1"]);
    for (key, value) in server.env() {
        command.env(key, value);
    }
    let mut child = command.stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.counts().get("PUT") == 0 {
        assert!(std::time::Instant::now() < deadline, "no upload started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    server.release_puts();

    assert_eq!(
        server.read("out/parts/_imba_manifest.json").unwrap(),
        manifest
    );
    assert_eq!(server.read("out/parts/a.csv").unwrap(), b"a\n1\n");
    let next = run(&t, &server, &["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(next.code, 0, "{}", next.stderr);
    assert!(
        next.stderr.contains("skip local (up to date)"),
        "{}",
        next.stderr
    );
    assert!(next.stderr.contains("run  upload"), "{}", next.stderr);
    assert_eq!(server.read("out/parts/a.csv").unwrap(), b"a\n2\n");
    assert_eq!(t.read("out/local.csv"), "a\n2\n");
}

/// `version: auto` on an S3 prefix: versions uploaded whole (manifest last), `LATEST`, the same
/// content reusing the latest version, `keep` moving old ones to `archive/`.
#[test]
fn versions_on_s3() {
    let server = S3Server::start();
    server.put("raw/orders.csv", "user_id,days\n1,3\n1,5\n2,7\n");
    let t = Test::new().pipeline(
        r#"
stages:
  user_features:
    uses: feature
    inputs: {orders: s3://bucket/raw/orders.csv}
    outputs: {features: s3://bucket/out/features/}
    version: auto
    keep: 1
    params:
      entity: user_id
      formats: [csv]
      groups:
        - name: orders
          from: orders
          features:
            - order_count: count(*)
"#,
    );
    assert_eq!(run(&t, &server, &["run", "pipeline.yaml"]).code, 0);
    assert_eq!(
        server.read("out/features/LATEST").unwrap(),
        b"features_v1\n"
    );
    assert_eq!(
        server
            .read("out/features/features_v1/features.csv")
            .unwrap(),
        b"user_id,order_count\n1,2\n2,1\n"
    );
    assert!(server
        .read("out/features/features_v1/_imba_manifest.json")
        .is_some());
    assert!(server.read("out/features/features_v1/_meta.json").is_some());

    server.reset_counts();
    let again = run(&t, &server, &["run", "pipeline.yaml"]);
    assert!(
        again.stderr.contains("0 ran, 1 up to date"),
        "{}",
        again.stderr
    );
    assert_eq!(
        server.counts().get("GET object"),
        0,
        "{:?}",
        server.counts()
    );
    let forced = run(&t, &server, &["run", "pipeline.yaml", "--force"]);
    assert!(
        forced.stderr.contains("outputs unchanged"),
        "{}",
        forced.stderr
    );

    server.put("raw/orders.csv", "user_id,days\n1,3\n2,7\n");
    assert_eq!(run(&t, &server, &["run", "pipeline.yaml"]).code, 0);
    assert_eq!(
        server.read("out/features/LATEST").unwrap(),
        b"features_v2\n"
    );
    assert_eq!(
        server.read("out/archive/features_v1/features.csv").unwrap(),
        b"user_id,order_count\n1,2\n2,1\n"
    );
    assert!(server
        .read("out/features/features_v1/features.csv")
        .is_none());

    // `imba gc --archive` removes what `keep:` archived in S3 too, never the version in place.
    let archived = |server: &S3Server| {
        server
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("out/archive/"))
            .count()
    };
    let before = archived(&server);
    assert!(before >= 3, "{:?}", server.keys());
    let dry = run(
        &t,
        &server,
        &["gc", "pipeline.yaml", "--archive", "--dry-run"],
    );
    assert_eq!(
        dry.stdout, "would remove 1 archived version\n",
        "{}",
        dry.stderr
    );
    let young = run(
        &t,
        &server,
        &["gc", "pipeline.yaml", "--archive", "--older-than", "1d"],
    );
    assert_eq!(
        young.stdout, "removed 0 archived versions\n",
        "{}",
        young.stderr
    );
    assert_eq!(archived(&server), before);
    let gone = run(&t, &server, &["gc", "pipeline.yaml", "--archive"]);
    assert_eq!(
        gone.stdout, "removed 1 archived version\n",
        "{}",
        gone.stderr
    );
    assert_eq!(archived(&server), 0, "{:?}", server.keys());
    assert_eq!(
        server.read("out/features/LATEST").unwrap(),
        b"features_v2\n"
    );
    assert!(server
        .read("out/features/features_v2/features.csv")
        .is_some());
}

/// A version number another run has claimed (and is still uploading) is not taken again: the
/// claim is a conditional PUT, so two runs committing at once get different numbers.
#[test]
fn a_claimed_version_number_is_not_reused_on_s3() {
    let server = S3Server::start();
    server.put("raw/orders.csv", "user_id,days\n1,3\n");
    server.put(".imba-staging/out/features/claims/features_v1", "claimed\n");
    let t = Test::new().pipeline(
        "stages:\n  f:\n    uses: feature\n    inputs: {orders: s3://bucket/raw/orders.csv}\n    outputs: {features: s3://bucket/out/features/}\n    version: auto\n    params:\n      entity: user_id\n      groups:\n        - name: g\n          from: orders\n          features:\n            - n: count(*)\n",
    );
    let out = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        server.read("out/features/LATEST").unwrap(),
        b"features_v2\n"
    );
    assert!(server
        .read("out/features/features_v1/features.parquet")
        .is_none());
    assert!(server
        .read("out/features/features_v2/features.parquet")
        .is_some());
}

/// Object names that URLs, query strings and object_store's own paths encode.
const ODD_NAMES: [&str; 5] = ["ü.csv", "a b.csv", "x~y.csv", "100%.csv", "a+b=c.csv"];
/// Where stage `copy{i}` writes `raw/ODD_NAMES[i]`.
const ODD_OUTPUTS: [&str; 5] = ["ü~.csv", "a b.csv", "x~y.csv", "100%.csv", "a+b=c.csv"];
/// A prefix output whose own name needs encoding, holding the odd names.
const ODD_DIR: &str = "out/dir ü+1";

/// One stage per odd name (an S3 object to an S3 object), one copying the prefix `raw/` whole
/// to [`ODD_DIR`], one reading that prefix and one file of it back.
fn odd_keys_pipeline() -> String {
    let mut yaml = String::from("stages:\n");
    for (i, (name, output)) in ODD_NAMES.iter().zip(ODD_OUTPUTS).enumerate() {
        yaml += &format!(
            "  copy{i}:\n    cmd: cp \"{{{{ inputs[0] }}}}\" \"{{{{ outputs[0] }}}}\"\n    inputs: [\"s3://bucket/raw/{name}\"]\n    outputs: [\"s3://bucket/out/{output}\"]\n"
        );
    }
    yaml += &format!(
        "  dir:\n    cmd: cp -R \"{{{{ inputs[0] }}}}/.\" \"{{{{ outputs[0] }}}}\"\n    inputs: [\"s3://bucket/raw/\"]\n    outputs: [\"s3://bucket/{ODD_DIR}/\"]\n"
    );
    yaml += &format!(
        "  back:\n    cmd: (cd \"{{{{ inputs[0] }}}}\" && ls | LC_ALL=C sort) > \"{{{{ outputs[0] }}}}\" && cat \"{{{{ inputs[1] }}}}\" >> \"{{{{ outputs[0] }}}}\"\n    inputs: [\"s3://bucket/{ODD_DIR}/\", \"s3://bucket/{ODD_DIR}/100%.csv\"]\n    outputs: [back.txt]\n"
    );
    yaml
}

fn odd_contents(name: &str) -> Vec<u8> {
    format!("name\n{name}\n").into_bytes()
}

/// Runs [`odd_keys_pipeline`] against a server (its environment, a way to write an object, to
/// list every key and to read one) and checks that every object lands under the exact key
/// written, that the listing maps back to the same names, and that nothing is stale after.
fn odd_keys_round_trip(
    env: &[(&'static str, String)],
    put: impl Fn(&str, &[u8]),
    keys: impl Fn() -> Vec<String>,
    read: impl Fn(&str) -> Option<Vec<u8>>,
) {
    for name in ODD_NAMES {
        put(&format!("raw/{name}"), &odd_contents(name));
    }
    let t = Test::new().pipeline(&odd_keys_pipeline());
    let run = |args: &[&str]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_env(&t, &env, args)
    };
    let first = run(&["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(first.code, 0, "{}", first.stderr);

    let mut expected: Vec<String> = ODD_NAMES.iter().map(|n| format!("raw/{n}")).collect();
    expected.extend(ODD_OUTPUTS.iter().map(|n| format!("out/{n}")));
    expected.extend(ODD_NAMES.iter().map(|n| format!("{ODD_DIR}/{n}")));
    expected.push(format!("{ODD_DIR}/_imba_manifest.json"));
    expected.sort();
    assert_eq!(keys(), expected, "every object under the exact key written");
    for (name, output) in ODD_NAMES.iter().zip(ODD_OUTPUTS) {
        assert_eq!(read(&format!("out/{output}")), Some(odd_contents(name)));
        assert_eq!(read(&format!("{ODD_DIR}/{name}")), Some(odd_contents(name)));
    }
    // A committed prefix's local copy holds its manifest too.
    let mut names: Vec<&str> = ODD_NAMES.to_vec();
    names.push("_imba_manifest.json");
    names.sort();
    assert_eq!(
        t.read("back.txt"),
        format!("{}\nname\n100%.csv\n", names.join("\n")),
        "the prefix's listing maps back to the names written"
    );

    let status = run(&["status", "pipeline.yaml"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert_eq!(status.stdout, "all 7 stages are up to date\n");
    let again = run(&["run", "pipeline.yaml"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("0 ran, 7 up to date"),
        "{}",
        again.stderr
    );
}

/// [`run`] with an explicit environment (no S3Server's).
fn run_env(t: &Test, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = t.command(args);
    command.env_remove("AWS_PROFILE");
    for (key, value) in env {
        command.env(key, value);
    }
    t.captured(&command.output().expect("run imba"))
}

/// Keys as written (UTF-8, a space, `~`, `%`, `+`, `=`), against s3s: not percent-encoded on
/// the way, nor twice.
#[test]
fn keys_are_used_exactly_as_written() {
    let server = S3Server::start();
    odd_keys_round_trip(
        &server.env(),
        |key, contents| server.put(key, contents),
        || server.keys(),
        |key| server.read(key),
    );
}

/// The same against moto, a server with URL handling of its own, listed and read with boto3.
#[test]
fn keys_are_used_exactly_as_written_on_moto() {
    let Some(moto) = moto::Moto::start() else {
        return;
    };
    odd_keys_round_trip(
        &moto.env(),
        |key, contents| moto.put(key, contents),
        || moto.keys(),
        |key| moto.read(key),
    );
}

/// The cached copy of an S3 input, changed behind imba's back (one byte, same size, its mtime
/// put back): noticed before the next use, and downloaded again with a warning. Cached copies
/// are read-only.
#[test]
fn a_changed_cached_copy_is_downloaded_again() {
    use std::os::unix::fs::PermissionsExt;
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new().pipeline(
        "stages:\n  copy:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [s3://bucket/raw/data.csv]\n    outputs: [out/copy.csv]\n",
    );
    assert_eq!(run(&t, &server, &["run", "pipeline.yaml"]).code, 0);
    let cached: Vec<std::path::PathBuf> =
        walkdir::WalkDir::new(t.path().join(".imba/cache/objects"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_name() == "data.csv")
            .map(|e| e.into_path())
            .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let cached = &cached[0];
    let meta = std::fs::metadata(cached).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o444,
        "cached copies are read-only"
    );

    // One byte flipped in place, the mtime put back: only the ctime (and the content) differ.
    let mtime = meta.modified().unwrap();
    std::fs::set_permissions(cached, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(cached).unwrap();
    bytes[DATA.len() - 2] = b'8';
    std::fs::write(cached, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(cached)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::set_permissions(cached, std::fs::Permissions::from_mode(0o444)).unwrap();

    server.reset_counts();
    let again = run(&t, &server, &["run", "pipeline.yaml", "--force"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again
            .stderr
            .contains("the cached copy of s3://bucket/raw/data.csv")
            && again.stderr.contains("was changed")
            && again.stderr.contains("downloading it again"),
        "{}",
        again.stderr
    );
    assert_eq!(server.counts().get("GET object"), 1);
    assert_eq!(t.read("out/copy.csv"), DATA);
    assert_eq!(std::fs::read(cached).unwrap(), DATA.as_bytes());

    // Unchanged since: used as it is.
    server.reset_counts();
    let third = run(&t, &server, &["run", "pipeline.yaml", "--force"]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert!(
        !third.stderr.contains("downloading it again"),
        "{}",
        third.stderr
    );
    assert_eq!(server.counts().get("GET object"), 0);
}

/// A shell stage that edits its S3 input in place (`sed -i` replaces the file, so a read-only
/// mode does not stop it, nor does anything stop root): the stage fails naming the file, and
/// the stage after it reads the object as it is on S3.
#[test]
fn a_stage_that_changes_its_s3_input_fails() {
    let server = S3Server::start();
    server.put("raw/data.csv", DATA);
    let t = Test::new().pipeline(
        "stages:\n  edit:\n    cmd: sed -i s/5/X/ {{ inputs[0] }} && cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [s3://bucket/raw/data.csv]\n    outputs: [edited.csv]\n  read:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [s3://bucket/raw/data.csv]\n    outputs: [read.csv]\n",
    );
    let out = run(
        &t,
        &server,
        &["run", "pipeline.yaml", "-j", "1", "--keep-going"],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    let error = out.stage_error();
    assert!(
        error.starts_with("error: stage `edit` failed: cannot use s3://bucket/raw/data.csv: its local copy [TMP]/.imba/cache/objects/")
            && error.contains("data.csv was changed"),
        "{error}"
    );
    assert!(!t.path().join("edited.csv").exists());
    assert_eq!(t.read("read.csv"), DATA);
}

/// A storage layer for library-level tests against `endpoint`, with credentials (the same for
/// every test of this file: set in the environment once).
fn storage_for(
    endpoint: &str,
    timeout: std::time::Duration,
    cache: &std::path::Path,
) -> imba::store::s3::Storage {
    static CREDENTIALS: std::sync::Once = std::sync::Once::new();
    CREDENTIALS.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
    });
    imba::store::s3::Storage::new(
        imba::model::StorageSettings {
            endpoint: Some(endpoint.to_owned()),
            timeout: Some(timeout),
            connect_timeout: Some(std::time::Duration::from_secs(1)),
            ..Default::default()
        },
        cache.to_path_buf(),
    )
}

/// An "S3 endpoint" that accepts connections and reads requests but never answers (a server
/// stopped with SIGSTOP, a dead load balancer). It stops accepting after a minute, and each
/// connection is dropped after a minute or when the client closes it.
fn stalled_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
                        let mut buffer = [0u8; 64 << 10];
                        while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
                    });
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    });
    endpoint
}

/// A server that stops answering fails a HEAD and an upload within `storage.timeout`, with an
/// error that says so and names the URL, rather than hanging.
#[test]
fn a_stalled_server_fails_requests_within_the_timeout() {
    let endpoint = stalled_endpoint();
    let cache = tempfile::tempdir().unwrap();
    let storage = storage_for(&endpoint, std::time::Duration::from_secs(1), cache.path());
    let clock = std::time::Instant::now();
    let error = storage.head("bucket", "raw/data.csv").unwrap_err();
    assert!(
        clock.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        clock.elapsed()
    );
    assert_eq!(
        error.to_string(),
        "cannot read s3://bucket/raw/data.csv: the S3 endpoint stopped answering: nothing for 1s (storage.timeout)"
    );

    let file = cache.path().join("upload.csv");
    std::fs::write(&file, DATA).unwrap();
    let clock = std::time::Instant::now();
    let error = storage
        .commit("bucket", "out/upload.csv", &file, false, "run")
        .unwrap_err();
    assert!(
        clock.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        clock.elapsed()
    );
    assert!(
        error.to_string().starts_with(
            "cannot upload s3://bucket/out/upload.csv: the S3 endpoint stopped answering"
        ),
        "{error}"
    );
}

/// Ctrl-C (the run's stop level reaching Cancel) abandons a stalled request within a second,
/// whatever the timeout, and later calls return at once.
#[test]
fn cancelling_abandons_a_stalled_request_within_a_second() {
    use imba::interrupt::Stop;
    let endpoint = stalled_endpoint();
    let cache = tempfile::tempdir().unwrap();
    let (stop, cancel) = tokio::sync::watch::channel(Stop::Go);
    let storage = std::sync::Arc::new(
        storage_for(&endpoint, std::time::Duration::from_secs(60), cache.path())
            .with_cancel(cancel),
    );
    let uploading = {
        let storage = storage.clone();
        std::thread::spawn(move || {
            let result = storage.put_small("bucket", "out/x.csv", DATA.as_bytes().to_vec());
            (result, std::time::Instant::now())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!uploading.is_finished(), "the request is stalled");
    let cancelled = std::time::Instant::now();
    stop.send(Stop::Cancel).unwrap();
    let (result, returned) = uploading.join().unwrap();
    assert!(
        returned - cancelled < std::time::Duration::from_secs(1),
        "{:?}",
        returned - cancelled
    );
    let error = result.unwrap_err();
    assert!(error.is_cancelled(), "{error}");
    assert_eq!(
        error.to_string(),
        "cannot upload s3://bucket/out/x.csv: cancelled (interrupted); the request was abandoned"
    );

    let clock = std::time::Instant::now();
    assert!(storage
        .head("bucket", "raw/data.csv")
        .unwrap_err()
        .is_cancelled());
    assert!(clock.elapsed() < std::time::Duration::from_secs(1));
}

/// Ctrl-C while an upload is stalled (the server holds the PUT): the run stops within a second,
/// as interrupted, and nothing is committed.
#[test]
fn ctrl_c_interrupts_a_stalled_upload_within_a_second() {
    let server = S3Server::start();
    let t = Test::new().file("in.csv", "a\n1\n").pipeline(
        "stages:\n  upload:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [in.csv]\n    outputs: [s3://bucket/out/x.csv]\n",
    );
    server.hold_puts();
    let mut command = t.command(&["run", "pipeline.yaml"]);
    for (key, value) in server.env() {
        command.env(key, value);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.counts().get("PUT") == 0 {
        assert!(std::time::Instant::now() < deadline, "no upload started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let interrupted = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if interrupted.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            panic!("still running 10 s after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let took = interrupted.elapsed();
    server.release_puts();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        took < std::time::Duration::from_secs(1),
        "{took:?}\n{stderr}"
    );
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("cancel upload") && !stderr.contains("error: stage"),
        "the stage is cancelled, not failed: {stderr}"
    );
    assert!(server.read("out/x.csv").is_none(), "nothing is committed");
}

/// An S3 layout and a local one run one after the other: from the third run on, nothing is
/// computed; every stage is `cached` (its outputs hold what the run cache recorded).
#[test]
fn alternating_an_s3_out_and_a_local_one_computes_each_once() {
    let server = S3Server::start();
    let t = common::monthly("");
    let decisions = || -> Vec<String> {
        t.decisions_of("pipelines/monthly.yaml")
            .into_iter()
            .map(|(_, decision)| decision)
            .collect()
    };
    let s3 = [
        "run",
        "pipelines/monthly.yaml",
        "--set",
        "out=s3://bucket/monthly",
    ];
    let local = ["run", "pipelines/monthly.yaml"];
    for (args, expected) in [
        (&s3[..], "ran"),
        (&local[..], "ran"),
        (&s3[..], "cached"),
        (&local[..], "cached"),
        (&s3[..], "cached"),
    ] {
        let out = run(&t, &server, args);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(decisions(), vec![expected; 5], "{args:?}\n{}", out.stderr);
    }
}

/// A versioned S3 output whose content comes back (a param changed and changed back) is its
/// first version again, restored from the run cache: `LATEST` moves back, no third version.
#[test]
fn a_versioned_s3_output_goes_back_to_the_version_with_that_content() {
    let server = S3Server::start();
    let t = common::monthly("");
    let out = ["--set", "out=s3://bucket/monthly"];
    for m in ["impute_days.m=7", "impute_days.m=5", "impute_days.m=7"] {
        let mut args = vec!["run", "pipelines/monthly.yaml", "--set", m];
        args.extend(out);
        let run = run(&t, &server, &args);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    assert_eq!(
        server.read("monthly/features/LATEST").unwrap(),
        b"features_v1\n"
    );
    let versions: std::collections::BTreeSet<String> = server
        .keys()
        .into_iter()
        .filter_map(|k| {
            k.strip_prefix("monthly/features/")
                .and_then(|rest| rest.split_once('/'))
                .map(|(v, _)| v.to_owned())
        })
        .collect();
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        ["features_v1", "features_v2"]
    );
    // The status agrees: everything is up to date, the features at their first version.
    let status = run(
        &t,
        &server,
        &[
            "status",
            "pipelines/monthly.yaml",
            "--set",
            "out=s3://bucket/monthly",
        ],
    );
    assert_eq!(
        status.stdout, "all 5 stages are up to date\n",
        "{}",
        status.stderr
    );
}

#[test]
fn months_are_discovered_on_s3_with_one_list() {
    let server = S3Server::start();
    for month in ["2017-01", "2017-02"] {
        server.put(&format!("raw/{month}/orders.csv"), DATA);
    }
    server.put("raw/notes.txt", "not a month");
    let t = Test::new().pipeline(
        r#"
partitions:
  month:
    discover: "s3://bucket/raw/{month}/orders.csv"
stages:
  count:
    cmd: wc -l < {{ inputs[0] }} | tr -d ' ' > {{ outputs[0] }}
    inputs: ["s3://bucket/raw/{{ month }}/orders.csv"]
    outputs: ["out/{{ month }}/count.txt"]
"#,
    );
    let out = run(&t, &server, &["run", "pipeline.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(t.read("out/2017-02/count.txt"), "4\n");
    server.put("raw/2017-03/orders.csv", DATA);
    server.reset_counts();
    let status = run(&t, &server, &["status", "pipeline.yaml"]);
    assert_eq!(
        status.stdout,
        "month    count\n2017-01  up to date\n2017-02  up to date\n2017-03  never run\n3 partitions of `month`: 2 up to date, 1 never run\n",
        "{}",
        status.stderr
    );
    assert_eq!(
        server.counts().get("GET list"),
        1,
        "one LIST finds the months"
    );
}
