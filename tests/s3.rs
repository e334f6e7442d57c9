//! S3 inputs and outputs against a real S3 server (s3s-fs, started by the test on 127.0.0.1):
//! the same skipping, atomicity and errors as with local files.

mod common;
#[path = "common/s3.rs"]
mod s3;

use common::{Output, Test};
use s3::S3Server;

fn run(t: &Test, server: &S3Server, args: &[&str]) -> Output {
    let mut command = t.command(args);
    for (key, value) in server.env() {
        command.env(key, value);
    }
    command.env_remove("AWS_PROFILE");
    let output = command.output().expect("run imba");
    let tmp = t.path().to_string_lossy().into_owned();
    let clean = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace(&tmp, "[TMP]");
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: clean(&output.stdout),
        stderr: clean(&output.stderr),
    }
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
