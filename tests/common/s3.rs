//! A real S3 server for tests: s3s-fs (S3 over a local directory) in the test process, on
//! 127.0.0.1 at a free port, with request counts and a switch to stop it mid-run.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};

pub const ACCESS_KEY: &str = "imba-test-access";
pub const SECRET_KEY: &str = "imba-test-secret-key";
pub const BUCKET: &str = "bucket";

/// Requests the server saw, by method (`GET`, `HEAD`, `PUT`, `POST`, `DELETE`), with `GET`
/// split into object reads (`GET object`) and listings (`GET list`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<String, usize>);

impl Counts {
    pub fn get(&self, kind: &str) -> usize {
        self.0.get(kind).copied().unwrap_or(0)
    }
}

struct Shared {
    counts: Mutex<Counts>,
    /// After this many `PUT`s the server stops answering, as if it were killed.
    stop_after_puts: AtomicUsize,
    puts: AtomicUsize,
    stopped: AtomicBool,
    /// Answer this many more requests with `503 SlowDown`, as S3 does when throttling.
    throttle: AtomicUsize,
    /// Hold every `PUT` (after counting it) until this is cleared.
    hold_puts: AtomicBool,
    /// s3s-fs checks `If-None-Match: *` and then writes, so two conditional creates at once
    /// could both succeed; one at a time, they are atomic as in S3.
    conditional: tokio::sync::Mutex<()>,
}

pub struct S3Server {
    pub endpoint: String,
    root: tempfile::TempDir,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Server {
    /// A server with one bucket, [`BUCKET`].
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("server root");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket");
        let shared = Arc::new(Shared {
            counts: Mutex::new(Counts::default()),
            stop_after_puts: AtomicUsize::new(usize::MAX),
            puts: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            throttle: AtomicUsize::new(0),
            hold_puts: AtomicBool::new(false),
            conditional: tokio::sync::Mutex::new(()),
        });
        let (shutdown, stop) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let fs_root = root.path().to_path_buf();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(serve(fs_root, state, stop, ready_tx));
        });
        let port = ready_rx.recv().expect("the server starts");
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
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

    /// Points `command` (an `imba` to run) at this server, and at nothing a profile names.
    pub fn point<'c>(
        &self,
        command: &'c mut std::process::Command,
    ) -> &'c mut std::process::Command {
        for (key, value) in self.env() {
            command.env(key, value);
        }
        command.env_remove("AWS_PROFILE")
    }

    /// The directory holding bucket `bucket`'s objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    /// Writes an object directly into the bucket's directory.
    pub fn put(&self, key: &str, contents: impl AsRef<[u8]>) {
        let path = self.bucket_dir().join(key);
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    /// Makes an object look `age` old (S3's Last-Modified is the file's mtime here).
    pub fn age(&self, key: &str, age: std::time::Duration) {
        let file = std::fs::File::options()
            .write(true)
            .open(self.bucket_dir().join(key))
            .unwrap();
        file.set_modified(std::time::SystemTime::now() - age)
            .unwrap();
    }

    /// Deletes an object behind imba's back.
    pub fn delete(&self, key: &str) {
        let _ = std::fs::remove_file(self.bucket_dir().join(key));
    }

    /// An object's bytes, read from the bucket's directory.
    pub fn read(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.bucket_dir().join(key)).ok()
    }

    /// Every object key in the bucket, sorted (s3s-fs keeps its own files outside it).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = walkdir::WalkDir::new(self.bucket_dir())
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| {
                let relative = e.path().strip_prefix(self.bucket_dir()).ok()?;
                Some(relative.to_string_lossy().into_owned())
            })
            .collect();
        keys.sort();
        keys
    }

    pub fn counts(&self) -> Counts {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn reset_counts(&self) {
        *self.shared.counts.lock().unwrap_or_else(|e| e.into_inner()) = Counts::default();
    }

    /// Stop answering (every later request gets its connection closed) once `n` more `PUT`s
    /// have arrived.
    pub fn stop_after_puts(&self, n: usize) {
        let seen = self.shared.puts.load(Ordering::SeqCst);
        self.shared
            .stop_after_puts
            .store(seen + n, Ordering::SeqCst);
    }

    /// Answer the next `n` requests with `503 SlowDown`.
    pub fn throttle(&self, n: usize) {
        self.shared.throttle.store(n, Ordering::SeqCst);
    }

    /// Hold every `PUT` until [`S3Server::release_puts`]: an upload in flight, for as long as
    /// a test needs one.
    pub fn hold_puts(&self) {
        self.shared.hold_puts.store(true, Ordering::SeqCst);
    }

    pub fn release_puts(&self) {
        self.shared.hold_puts.store(false, Ordering::SeqCst);
    }

    /// Answer again.
    pub fn resume(&self) {
        self.shared
            .stop_after_puts
            .store(usize::MAX, Ordering::SeqCst);
        self.shared.stopped.store(false, Ordering::SeqCst);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    root: PathBuf,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<u16>,
) {
    let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs");
    let service = {
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        builder.build()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("address").port();
    let _ = ready.send(port);
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let service = service.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let handler = Counting { service, shared };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), handler)
                .await;
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The S3 service, counting requests and refusing them once stopped.
struct Counting {
    service: s3s::service::S3Service,
    shared: Arc<Shared>,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Counting {
    type Response = s3s::HttpResponse;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let kind = match (
            request.method().as_str(),
            request
                .uri()
                .path()
                .trim_end_matches('/')
                .matches('/')
                .count(),
        ) {
            ("GET", 1) => "GET list".to_owned(),
            ("GET", _) => "GET object".to_owned(),
            (method, _) => method.to_owned(),
        };
        let shared = self.shared.clone();
        let hold = kind == "PUT";
        if kind == "PUT" {
            let seen = shared.puts.fetch_add(1, Ordering::SeqCst) + 1;
            if seen >= shared.stop_after_puts.load(Ordering::SeqCst) {
                shared.stopped.store(true, Ordering::SeqCst);
            }
        }
        if shared.stopped.load(Ordering::SeqCst) {
            return Box::pin(async { Err(boxed("the test stopped the server".to_owned())) });
        }
        let throttled = shared
            .throttle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttled {
            *shared
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .entry("throttled".to_owned())
                .or_default() += 1;
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            return Box::pin(async move {
                hyper::Response::builder()
                    .status(503)
                    .body(s3s::Body::from(body.to_owned()))
                    .map_err(|e| boxed(e.to_string()))
            });
        }
        *shared
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .entry(kind)
            .or_default() += 1;
        let service = self.service.clone();
        let conditional = hold && request.headers().get("if-none-match").is_some();
        Box::pin(async move {
            while hold && shared.hold_puts.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let _one_at_a_time = match conditional {
                true => Some(shared.conditional.lock().await),
                false => None,
            };
            hyper::service::Service::call(&service, request)
                .await
                .map_err(|e| boxed(format!("{e:?}")))
        })
    }
}

fn boxed(message: String) -> BoxError {
    message.into()
}
