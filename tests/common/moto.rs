//! moto's S3 server (PyPI `moto[server]`) for tests: a second S3 implementation, with URL
//! parsing and signing of its own (Werkzeug's, in Python), beside the in-process s3s one. A test
//! starts it on 127.0.0.1 at a free port and it is killed, by its PID, when dropped. boto3, which
//! moto installs, is the independent client: it makes the bucket, writes the inputs and lists
//! and reads what imba wrote.
//!
//! Without moto a test is skipped with a message, except in CI (`CI=true`), where that fails it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "bucket";
const ACCESS_KEY: &str = "moto-test-access";
const SECRET_KEY: &str = "moto-test-secret";

pub struct Moto {
    pub endpoint: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// moto on a free port with an empty bucket [`BUCKET`]; `None` when moto is not installed
    /// (outside CI).
    pub fn start() -> Option<Moto> {
        match Self::try_start() {
            Ok(moto) => Some(moto),
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("moto's S3 server is needed in CI and did not start: {why}")
            }
            Err(why) => {
                eprintln!(
                    "skipped: moto's S3 server did not start ({why}); pip install 'moto[server]'"
                );
                None
            }
        }
    }

    fn try_start() -> Result<Moto, String> {
        let probe = Command::new("python3")
            .args(["-c", "import moto.server, boto3"])
            .output()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        if !probe.status.success() {
            return Err(String::from_utf8_lossy(&probe.stderr)
                .lines()
                .last()
                .unwrap_or("moto is not installed")
                .to_owned());
        }
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            listener.local_addr().map_err(|e| e.to_string())?.port()
        };
        let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.reopen().map_err(|e| e.to_string())?)
            .stderr(log.reopen().map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start moto: {e}"))?;
        let mut moto = Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(format!("moto exited ({status}): {}", moto.log_tail()));
            }
            if answers(port) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "moto did not answer within 60 s: {}",
                    moto.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.boto(&format!("s3.create_bucket(Bucket={BUCKET:?})"), &[]);
        Ok(moto)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// The environment imba needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }

    /// Runs `script` with boto3's client for this server as `s3` and the JSON `args` as
    /// `args`; returns what it printed.
    pub fn boto(&self, script: &str, args: &[String]) -> String {
        let program = format!(
            "import boto3, json, sys\n\
             s3 = boto3.client('s3', endpoint_url={:?}, aws_access_key_id={ACCESS_KEY:?}, \
             aws_secret_access_key={SECRET_KEY:?}, region_name='us-east-1')\n\
             args = json.loads(sys.stdin.read())\n{script}\n",
            self.endpoint
        );
        let mut child = Command::new("python3")
            .args(["-c", &program])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(serde_json::to_string(args).unwrap().as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Writes an object with boto3.
    pub fn put(&self, key: &str, contents: &[u8]) {
        self.boto(
            &format!("s3.put_object(Bucket={BUCKET:?}, Key=args[0], Body=bytes.fromhex(args[1]))"),
            &[key.to_owned(), hex(contents)],
        );
    }

    /// An object's bytes, read with boto3; `None` when there is no such key.
    pub fn read(&self, key: &str) -> Option<Vec<u8>> {
        let out = self.boto(
            &format!(
                "try:\n    print(s3.get_object(Bucket={BUCKET:?}, Key=args[0])['Body'].read().hex())\n\
                 except s3.exceptions.NoSuchKey:\n    print('-')"
            ),
            &[key.to_owned()],
        );
        let out = out.trim();
        (out != "-").then(|| unhex(out))
    }

    /// Every key in the bucket, as boto3 lists them, sorted.
    pub fn keys(&self) -> Vec<String> {
        let out = self.boto(
            &format!(
                "keys = []\n\
                 for page in s3.get_paginator('list_objects_v2').paginate(Bucket={BUCKET:?}):\n    \
                 keys += [o['Key'] for o in page.get('Contents', [])]\n\
                 print(json.dumps(sorted(keys)))"
            ),
            &[],
        );
        serde_json::from_str(out.trim()).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether an HTTP server answers on `port`.
fn answers(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
