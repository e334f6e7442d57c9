//! S3 behind one storage layer (object_store): identities by HEAD/LIST, a local download cache,
//! uploads that commit atomically, and errors that name the bucket, the key and the S3 code.
//!
//! Stages never see S3: an input is downloaded into `.imba/cache/` (once per ETag) and the stage
//! reads the local copy; an output is written to local staging and uploaded when the stage and
//! its checks succeeded. Deciding whether a stage is up to date takes HEAD and LIST requests
//! only, never a download.
//!
//! A directory output (`s3://bucket/prefix/`) is committed in three steps: its files are uploaded
//! under `s3://bucket/.imba-staging/PREFIX/RUN/…` (the long part, which touches nothing under the
//! prefix), then copied into place server-side, then the manifest `prefix/_imba_manifest.json`
//! is written last; files of the previous version that the new one does not have are deleted only
//! after that. A prefix whose objects do not match what was committed counts as modified, so the
//! stage runs again.
//!
//! Keys are sent exactly as written (see `object_path`). Cached copies are read-only and are
//! checked against the BLAKE3 of their download before reuse and, through
//! [`Storage::verify_cached`], after a stage read them. Every request has a connect timeout and
//! an idle timeout ([`StorageSettings`]), and a cancelled run ([`Storage::with_cancel`]) abandons the
//! request in flight at once.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::HttpClient;
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::versions::{LATEST, META};
use super::{versions, Baseline, Staged, Store, StoreError, Version};
use crate::interrupt::Stop;
use crate::model::{Declared, Location, StorageSettings, Versioning, CONNECT_TIMEOUT, TIMEOUT};
use crate::store::hash::ContentHash;

/// The manifest of a directory output: written last, its commit marker.
pub const MANIFEST: &str = "_imba_manifest.json";
/// Where directory outputs are uploaded before they are copied into place.
const STAGING_PREFIX: &str = ".imba-staging";
/// Files above this size are uploaded in parts, this big.
const PART_SIZE: usize = 16 << 20;
/// HEAD/LIST requests in flight at once (status of many inputs).
pub const CONCURRENCY: usize = 32;

/// Why an S3 request failed, in words: the operation, the URL, the S3 code when there is one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot {operation} s3://{bucket}/{key}: {reason}")]
pub struct StorageError {
    pub operation: &'static str,
    pub bucket: String,
    pub key: String,
    pub reason: String,
    pub kind: ErrorKind,
}

/// What kind of failure a [`StorageError`] is, for callers that treat some apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request failed (S3 said no, the network, a local file).
    #[default]
    Failed,
    /// The run was cancelled ([`Storage::with_cancel`]) while the request was in flight: it was
    /// dropped, and nothing after it was done.
    Cancelled,
    /// A cached copy no longer holds what was downloaded ([`Storage::verify_cached`]).
    Changed,
}

impl StorageError {
    /// Whether the request was abandoned because the run was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }
}

/// An object as HEAD or LIST describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub etag: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Nothing run-specific: the same files give the same manifest, and so the same identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    imba_manifest: u32,
    files: Vec<crate::store::versions::MetaFile>,
}

/// The S3 side of a run: clients per bucket, built on first use, and a runtime of their own so
/// that any thread (a blocking task, the CLI) can wait on them.
pub struct Storage {
    settings: StorageSettings,
    cache_dir: PathBuf,
    runtime: OnceLock<Result<tokio::runtime::Runtime, String>>,
    stores: Mutex<HashMap<String, Arc<AmazonS3>>>,
    cache_index: Mutex<Option<CacheIndex>>,
    /// Identities looked up ahead, concurrently ([`Storage::prefetch`]), until they are used or
    /// the location is written.
    memo: Mutex<HashMap<Lookup, Result<Option<ContentHash>, StorageError>>>,
    /// The run's stop level: every request in flight is dropped when it reaches
    /// [`Stop::Cancel`], and the call waiting on it returns a cancelled error at once.
    cancel: Option<watch::Receiver<Stop>>,
    /// Where warnings go (a cached copy that had to be downloaded again); the log without one.
    warn: Option<Warn>,
}

/// A sink for warnings meant for the person running imba.
pub type Warn = Arc<dyn Fn(String) + Send + Sync>;

/// One identity lookup.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lookup {
    pub bucket: String,
    pub key: String,
    /// A prefix rather than one object.
    pub dir: bool,
    /// Only a committed prefix (one with its manifest) counts.
    pub committed: bool,
}

impl Lookup {
    fn new(bucket: &str, key: &str, dir: bool, committed: bool) -> Self {
        Lookup {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            dir,
            committed,
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Downloaded objects: `bucket/key` → the ETag downloaded, its BLAKE3 and the cached file; and
/// the local copies of prefixes assembled from them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CacheIndex {
    objects: BTreeMap<String, CachedObject>,
    /// A prefix's local copy (its path) → what it holds.
    #[serde(default)]
    dirs: BTreeMap<String, CachedDir>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CachedObject {
    etag: String,
    size: u64,
    blake3: String,
    file: String,
    /// The file as it was when its content was last found to be `blake3`.
    #[serde(default)]
    stamp: Option<Stamp>,
}

/// A prefix's local copy: its files (relative path → content), each a hard link to (or a copy
/// of) a cached object.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CachedDir {
    bucket: String,
    key: String,
    files: BTreeMap<String, CachedFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CachedFile {
    size: u64,
    blake3: String,
    #[serde(default)]
    stamp: Option<Stamp>,
}

/// What a cached file looked like when its content was last verified. Writing it changes its
/// mtime and ctime, replacing it (`sed -i` renames a new file over it) changes its inode, and
/// a ctime cannot be set back: while all of these match, the content is what was verified, and
/// reading it again is not needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        // Not following a symlink: one put in a file's place is a change.
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// Whether `path` still holds the `size` bytes hashing to `blake3`: at once when it looks as it
/// did when last verified (`stamp`), else by reading it. `Ok` is how it looks now; `Err` says
/// what happened to it, to follow its path in a message.
fn check_file(path: &Path, size: u64, blake3: &str, stamp: Option<Stamp>) -> Result<Stamp, String> {
    let now = Stamp::of(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "was removed".to_owned(),
        _ => format!("cannot be checked ({e})"),
    })?;
    if Some(now) == stamp {
        return Ok(now);
    }
    if now.size != size {
        return Err(format!(
            "was changed ({} bytes now, {size} downloaded)",
            now.size
        ));
    }
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap(path)
        .map_err(|e| format!("cannot be checked ({e})"))?;
    if hasher.finalize().to_hex().as_str() != blake3 {
        return Err("was changed (its content is not what was downloaded)".to_owned());
    }
    Ok(now)
}

/// Makes a cached file read-only (0444), so that a stage writing to its input fails rather than
/// changing the copy other stages read. (Root ignores modes, and a file can be replaced
/// without writing to it: [`Storage::verify_cached`] is what catches those.)
fn make_read_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o222 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))?;
    }
    Ok(())
}

/// A name no other download or assembly under way uses: this process, and a counter.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{n}", std::process::id())
}

impl Storage {
    /// A storage layer caching downloads under `cache_dir` (`.imba/cache`). Nothing is built
    /// until the first S3 request.
    pub fn new(settings: StorageSettings, cache_dir: PathBuf) -> Self {
        Storage {
            settings,
            cache_dir,
            runtime: OnceLock::new(),
            stores: Mutex::new(HashMap::new()),
            cache_index: Mutex::new(None),
            memo: Mutex::new(HashMap::new()),
            cancel: None,
            warn: None,
        }
    }

    /// Makes every S3 call give up, within moments, once `cancel` reaches [`Stop::Cancel`]:
    /// the request in flight is dropped (its connection closed) and the call returns an error
    /// whose [`StorageError::is_cancelled`] is true. Nothing half-done is committed: a
    /// directory output's files stay under its staging prefix, without a manifest.
    pub fn with_cancel(mut self, cancel: watch::Receiver<Stop>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Sends warnings (a cached copy that was changed and is downloaded again) to `warn`
    /// rather than to the log.
    pub fn with_warnings(mut self, warn: Warn) -> Self {
        self.warn = Some(warn);
        self
    }

    fn warn(&self, message: String) {
        match &self.warn {
            Some(warn) => warn(message),
            None => tracing::warn!("{message}"),
        }
    }

    fn connect_timeout(&self) -> Duration {
        self.settings.connect_timeout.unwrap_or(CONNECT_TIMEOUT)
    }

    fn timeout(&self) -> Duration {
        self.settings.timeout.unwrap_or(TIMEOUT)
    }

    /// Looks up many identities at once, at most [`CONCURRENCY`] requests in flight, so that
    /// the status of a pipeline with many S3 locations takes a few round trips, not one each.
    pub fn prefetch(&self, lookups: Vec<Lookup>) {
        let mut lookups = lookups;
        lookups.sort();
        lookups.dedup();
        if lookups.is_empty() {
            return;
        }
        let per_thread = lookups.len().div_ceil(CONCURRENCY);
        let chunks: Vec<&[Lookup]> = lookups.chunks(per_thread).collect();
        imba_stages::threads::each(chunks.len(), |i| {
            for lookup in chunks[i] {
                let found = if lookup.committed {
                    self.committed_dir_now(&lookup.bucket, &lookup.key)
                } else {
                    self.identity_now(&lookup.bucket, &lookup.key, lookup.dir)
                };
                self.memo
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(lookup.clone(), found);
            }
        });
    }

    fn remembered(&self, lookup: Lookup) -> Option<Result<Option<ContentHash>, StorageError>> {
        self.memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lookup)
            .cloned()
    }

    /// Drops what is remembered of a location that is being written: the location itself, what
    /// lies under it (a file in a prefix output) and what holds it (a prefix read as a whole).
    fn forget(&self, bucket: &str, key: &str) {
        let within = |inner: &str, outer: &str| {
            inner == outer
                || inner
                    .strip_prefix(outer)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        self.memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l, _| !(l.bucket == bucket && (within(&l.key, key) || within(key, &l.key))));
    }

    /// Runs `future` on the storage runtime and waits for it, from any thread. A cancelled run
    /// drops the future (and with it the request in flight) and returns at once.
    fn block<F>(&self, future: F) -> Result<F::Output, Halt>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self
            .runtime
            .get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("imba-s3")
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the S3 runtime: {e}"))
            })
            .as_ref()
            .map_err(|e| Halt::Failed(e.clone()))?;
        let cancel = self.cancel.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let outcome = match cancel {
                None => Some(future.await),
                Some(mut cancel) => {
                    let cancelled = async move {
                        // A run that ended (its sender gone) never cancels.
                        if cancel.wait_for(|stop| *stop >= Stop::Cancel).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        biased;
                        () = cancelled => None,
                        output = future => Some(output),
                    }
                }
            };
            let _ = tx.send(outcome);
        });
        match rx.recv() {
            Ok(Some(output)) => Ok(output),
            Ok(None) => Err(Halt::Cancelled),
            Err(_) => Err(Halt::Failed("the S3 request was dropped".to_owned())),
        }
    }

    fn store(&self, bucket: &str) -> Result<Arc<AmazonS3>, String> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = stores.get(bucket) {
            return Ok(store.clone());
        }
        let store = Arc::new(self.build(bucket)?);
        stores.insert(bucket.to_owned(), store.clone());
        Ok(store)
    }

    fn build(&self, bucket: &str) -> Result<AmazonS3, String> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        // The AWS SDKs' names, which object_store does not all read.
        let endpoint = self
            .settings
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"));
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let profile = Profile::load();
        if env("AWS_ACCESS_KEY_ID").is_none() {
            if let Some((key, secret, token)) = &profile.credentials {
                builder = builder
                    .with_access_key_id(key)
                    .with_secret_access_key(secret);
                if let Some(token) = token {
                    builder = builder.with_token(token);
                }
            }
        }
        let region = self
            .settings
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or(profile.region);
        if let Some(region) = region {
            builder = builder.with_region(region);
        }
        // Custom endpoints are path-style unless told otherwise; AWS itself is virtual-hosted.
        let path_style = self.settings.path_style.unwrap_or(endpoint.is_some());
        builder = builder.with_virtual_hosted_style_request(!path_style);
        let retries = self.settings.retries.unwrap_or(4);
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
            || env("AWS_ALLOW_HTTP").is_some_and(|v| v == "true");
        builder = builder
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: retries,
                // No new try after `timeout`: a server that stopped answering fails the
                // operation after about `timeout`, not once per try.
                retry_timeout: self.timeout(),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(self.connect_timeout())
                    // No limit on a whole request: a large download may take as long as it
                    // needs while it moves; `timeout` bounds the silences instead.
                    .with_timeout_disabled(),
            )
            .with_http_connector(Connector {
                idle: self.timeout(),
            });
        builder
            .build()
            .map_err(|e| format!("cannot set up S3 for bucket `{bucket}`: {e}"))
    }

    /// HEAD: the object's identity, or `None` when there is no such object (in a bucket that
    /// exists).
    pub fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("read", bucket, key, r))?;
        let path = object_path("read", bucket, key)?;
        let outcome = self
            .block(async move { store.head(&path).await })
            .map_err(|r| error("read", bucket, key, r))?;
        match outcome {
            Ok(meta) => Ok(Some(info(&meta))),
            Err(object_store::Error::NotFound { .. }) => {
                self.bucket_exists(bucket, key)?;
                Ok(None)
            }
            // HEAD errors have no body; the same request as a GET says which S3 error it is.
            Err(e) => Err(self.explain("read", bucket, key, e)),
        }
    }

    /// Fails with `NoSuchBucket` when the bucket is missing (a HEAD says only "not found").
    fn bucket_exists(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("read", bucket, key, r))?;
        // Listed under the key itself (so that nothing is listed in a bucket that exists), in
        // plain characters only: a listing's prefix travels in the query string, where some
        // servers read `+` as a space and others do not.
        let plain: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_./".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let prefix = Key::parse(&plain).unwrap_or_else(|_| Key::from(plain.as_str()));
        let listed = self
            .block(async move { store.list_with_delimiter(Some(&prefix)).await.map(|_| ()) })
            .map_err(|r| error("read", bucket, key, r))?;
        listed.map_err(|e| self.describe("read", bucket, key, &e))
    }

    /// [`describe_error`], with the setting that applies to a request that timed out.
    fn describe(
        &self,
        operation: &'static str,
        bucket: &str,
        key: &str,
        e: &object_store::Error,
    ) -> StorageError {
        let mut described = describe_error(operation, bucket, key, e);
        let chain = error_chain(e);
        if chain.contains("timed out") || chain.contains("deadline has elapsed") {
            let connecting = chain.contains("connect");
            described.reason = if connecting {
                format!(
                    "the S3 endpoint cannot be reached: no connection within {} (storage.connect_timeout)",
                    humantime::format_duration(self.connect_timeout())
                )
            } else {
                format!(
                    "the S3 endpoint stopped answering: nothing for {} (storage.timeout)",
                    humantime::format_duration(self.timeout())
                )
            };
        }
        described
    }

    /// The same failed request again as a one-byte GET, whose error body names the S3 code.
    fn explain(
        &self,
        operation: &'static str,
        bucket: &str,
        key: &str,
        first: object_store::Error,
    ) -> StorageError {
        let described = self.describe(operation, bucket, key, &first);
        if described.reason.contains(':') {
            return described;
        }
        let Ok(store) = self.store(bucket) else {
            return described;
        };
        let Ok(path) = object_path(operation, bucket, key) else {
            return described;
        };
        match self.block(async move { store.get_range(&path, 0..1).await }) {
            Ok(Err(e)) => {
                let again = self.describe(operation, bucket, key, &e);
                if again.reason.contains(':') {
                    again
                } else {
                    described
                }
            }
            _ => described,
        }
    }

    /// LIST: every object under `prefix/`, by its path relative to the prefix, sorted.
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, ObjectInfo)>, StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("list", bucket, prefix, r))?;
        let root = object_path("list", bucket, prefix)?;
        let listed = self
            .block(async move {
                let listed: Vec<object_store::ObjectMeta> =
                    store.list(Some(&root)).try_collect().await?;
                // A store that leaves ETags out of its listings (s3s-fs does; AWS and MinIO do
                // not) is asked for each one, so that identities stay ETags.
                futures::stream::iter(listed)
                    .map(|meta| {
                        let store = store.clone();
                        async move {
                            match meta.e_tag {
                                Some(_) => Ok(meta),
                                None => store.head(&meta.location).await,
                            }
                        }
                    })
                    .buffered(16)
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(|r| error("list", bucket, prefix, r))?
            .map_err(|e| self.describe("list", bucket, prefix, &e))?;
        let base = format!("{}/", prefix.trim_end_matches('/'));
        let mut objects: Vec<(String, ObjectInfo)> = listed
            .into_iter()
            .filter_map(|meta| {
                let full = meta.location.to_string();
                let relative = full.strip_prefix(&base)?.to_owned();
                Some((relative, info(&meta)))
            })
            .collect();
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(objects)
    }

    /// The identity of an S3 location, from HEAD or LIST only: `None` when absent. A directory
    /// holding an imba manifest counts only with it; one without any object is absent.
    pub fn identity(
        &self,
        bucket: &str,
        key: &str,
        dir: bool,
    ) -> Result<Option<ContentHash>, StorageError> {
        match self.remembered(Lookup::new(bucket, key, dir, false)) {
            Some(found) => found,
            None => self.identity_now(bucket, key, dir),
        }
    }

    fn identity_now(
        &self,
        bucket: &str,
        key: &str,
        dir: bool,
    ) -> Result<Option<ContentHash>, StorageError> {
        if !dir {
            return Ok(self.head(bucket, key)?.map(|object| ContentHash {
                hash: object_identity(&object),
                size: object.size,
                files: None,
                etag: Some(object.etag),
            }));
        }
        let objects = self.list(bucket, key)?;
        if objects.is_empty() {
            return Ok(None);
        }
        Ok(Some(prefix_identity(&objects)))
    }

    /// The identity of a directory output as committed: absent without its manifest.
    pub fn committed_dir(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ContentHash>, StorageError> {
        match self.remembered(Lookup::new(bucket, key, true, true)) {
            Some(found) => found,
            None => self.committed_dir_now(bucket, key),
        }
    }

    fn committed_dir_now(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ContentHash>, StorageError> {
        let objects = self.list(bucket, key)?;
        if !objects.iter().any(|(path, _)| path == MANIFEST) {
            return Ok(None);
        }
        Ok(Some(prefix_identity(&objects)))
    }

    /// A local copy of an S3 input, downloaded unless the cache holds this ETag already. The
    /// copy is read-only, and it is checked against the BLAKE3 recorded at its download before
    /// it is used again (without reading it while it looks as it did at the last check): one
    /// that was changed is downloaded again, with a warning.
    pub fn fetch(&self, bucket: &str, key: &str, dir: bool) -> Result<PathBuf, StorageError> {
        if !dir {
            // The identity the run decided on (looked up once, ahead), not another HEAD.
            let found = self
                .identity(bucket, key, false)?
                .ok_or_else(|| error("read", bucket, key, "no such object (NoSuchKey)"))?;
            let object = ObjectInfo {
                etag: found.etag.unwrap_or_default(),
                size: found.size,
                version: None,
            };
            return self
                .fetch_object(bucket, key, &object)
                .map(|(file, _)| file);
        }
        let objects = self.list(bucket, key)?;
        let identity = prefix_identity(&objects);
        let target = self.cache_dir.join("dirs").join(&identity.hash[..32]);
        let io = |e: std::io::Error| error("download", bucket, key, e.to_string());
        if target.is_dir() {
            let recorded =
                self.with_index(|index| index.dirs.get(&target.display().to_string()).cloned());
            // One without a record (an older imba's) cannot be checked: it is assembled again.
            if let Some(recorded) = recorded {
                match self.check_dir(&target, &recorded) {
                    Ok(()) => return Ok(target),
                    Err(why) => self.warn(format!(
                        "the local copy of s3://{bucket}/{key}/: {why}; assembling it again"
                    )),
                }
            }
            std::fs::remove_dir_all(&target).map_err(io)?;
        }
        let building = self.cache_dir.join("dirs").join(format!(
            ".{}.{}",
            &identity.hash[..32],
            unique_suffix()
        ));
        let _ = std::fs::remove_dir_all(&building);
        let mut files = BTreeMap::new();
        for (relative, object) in &objects {
            if relative.starts_with(STAGING_PREFIX) {
                continue;
            }
            let (cached, entry) =
                self.fetch_object(bucket, &format!("{key}/{relative}"), object)?;
            let path = building.join(relative);
            std::fs::create_dir_all(path.parent().unwrap_or(&building)).map_err(io)?;
            // A copy (where links cannot be made) is read-only too.
            std::fs::hard_link(&cached, &path)
                .or_else(|_| std::fs::copy(&cached, &path).and_then(|_| make_read_only(&path)))
                .map_err(io)?;
            files.insert(
                relative.clone(),
                CachedFile {
                    size: entry.size,
                    blake3: entry.blake3,
                    stamp: None,
                },
            );
        }
        std::fs::create_dir_all(&building)
            .and_then(|()| std::fs::rename(&building, &target))
            .or_else(|e| if target.is_dir() { Ok(()) } else { Err(e) })
            .map_err(io)?;
        // A link changes its file's ctime: stamped now, as verified just before.
        for (relative, file) in &mut files {
            file.stamp = Stamp::of(&target.join(relative)).ok();
        }
        self.with_index(|index| {
            for (relative, file) in &files {
                let id = format!("{bucket}/{key}/{relative}");
                if let Some(object) = index.objects.get_mut(&id) {
                    match Stamp::of(Path::new(&object.file)) {
                        // The same file, linked: its new ctime is not a change.
                        Ok(now) if Some(now.ino) == file.stamp.map(|f| f.ino) => {
                            object.stamp = Some(now);
                        }
                        _ => {}
                    }
                }
            }
            index.dirs.insert(
                target.display().to_string(),
                CachedDir {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                    files,
                },
            );
            let _ = self.save_index(index);
        });
        Ok(target)
    }

    /// Checks a local copy that [`Storage::fetch`] returned, after a stage read it: an error
    /// naming the S3 URL and the file when the copy no longer holds what was downloaded
    /// (written to, replaced, removed, or a file added to a prefix's copy). A path that is not
    /// a cached copy is fine. Cheap while the copy's files look as they did at their last check
    /// (nothing is read then).
    pub fn verify_cached(&self, local: &Path) -> Result<(), StorageError> {
        let shown = local.display().to_string();
        let (object, dir) = self.with_index(|index| {
            let object = index
                .objects
                .iter()
                .find(|(_, cached)| cached.file == shown)
                .map(|(id, cached)| (id.clone(), cached.clone()));
            (object, index.dirs.get(&shown).cloned())
        });
        if let Some((id, cached)) = object {
            let (bucket, key) = id.split_once('/').unwrap_or((id.as_str(), ""));
            return match check_file(local, cached.size, &cached.blake3, cached.stamp) {
                Ok(stamp) => {
                    if Some(stamp) != cached.stamp {
                        self.with_index(|index| {
                            if let Some(entry) = index.objects.get_mut(&id) {
                                entry.stamp = Some(stamp);
                            }
                            let _ = self.save_index(index);
                        });
                    }
                    Ok(())
                }
                Err(why) => Err(changed(bucket, key, format!("{shown} {why}"))),
            };
        }
        if let Some(recorded) = dir {
            return self
                .check_dir(local, &recorded)
                .map_err(|why| changed(&recorded.bucket, &format!("{}/", recorded.key), why));
        }
        Ok(())
    }

    /// Whether a prefix's local copy holds exactly the files recorded, each as downloaded; the
    /// stamps of files that had to be read (and were fine) are recorded anew.
    fn check_dir(&self, root: &Path, recorded: &CachedDir) -> Result<(), String> {
        let mut present = std::collections::BTreeSet::new();
        for entry in walkdir::WalkDir::new(root).min_depth(1) {
            let entry = entry.map_err(|e| format!("cannot be checked ({e})"))?;
            if entry.file_type().is_dir() {
                continue;
            }
            let relative = entry
                .path()
                .strip_prefix(root)
                .unwrap_or(entry.path())
                .to_string_lossy()
                .into_owned();
            if !recorded.files.contains_key(&relative) {
                return Err(format!("{} was added", entry.path().display()));
            }
            present.insert(relative);
        }
        let mut restamped = Vec::new();
        for (relative, file) in &recorded.files {
            let path = root.join(relative);
            let stamp = check_file(&path, file.size, &file.blake3, file.stamp)
                .map_err(|why| format!("{} {why}", path.display()))?;
            if Some(stamp) != file.stamp {
                restamped.push((relative.clone(), stamp));
            }
        }
        if !restamped.is_empty() {
            self.with_index(|index| {
                if let Some(dir) = index.dirs.get_mut(&root.display().to_string()) {
                    for (relative, stamp) in restamped {
                        if let Some(file) = dir.files.get_mut(&relative) {
                            file.stamp = Some(stamp);
                        }
                    }
                }
                let _ = self.save_index(index);
            });
        }
        Ok(())
    }

    /// Runs `f` on the cache index, loaded on first use.
    fn with_index<T>(&self, f: impl FnOnce(&mut CacheIndex) -> T) -> T {
        let mut index = self.cache_index.lock().unwrap_or_else(|e| e.into_inner());
        f(index.get_or_insert_with(|| self.load_index()))
    }

    /// The cached copy of one object at `object`'s ETag (checked, and downloaded again when it
    /// was changed), or a new download; with what the index records of it.
    fn fetch_object(
        &self,
        bucket: &str,
        key: &str,
        object: &ObjectInfo,
    ) -> Result<(PathBuf, CachedObject), StorageError> {
        let id = format!("{bucket}/{key}");
        // The object's own file name, under a folder named by its identity: stages tell CSV
        // from Parquet by the extension.
        let name = key
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("object");
        let file = self
            .cache_dir
            .join("objects")
            .join(&blake3::hash(format!("{id}\0{}", object.etag).as_bytes()).to_hex()[..32])
            .join(name);
        let shown = file.display().to_string();
        let cached = self
            .with_index(|index| index.objects.get(&id).cloned())
            .filter(|cached| cached.etag == object.etag && cached.file == shown);
        if let Some(mut cached) = cached {
            match check_file(&file, cached.size, &cached.blake3, cached.stamp) {
                Ok(stamp) => {
                    // Copies made before they were kept read-only become so now.
                    let stamp = match make_read_only(&file) {
                        Ok(()) => Stamp::of(&file).unwrap_or(stamp),
                        Err(_) => stamp,
                    };
                    if Some(stamp) != cached.stamp {
                        cached.stamp = Some(stamp);
                        self.with_index(|index| {
                            index.objects.insert(id.clone(), cached.clone());
                            let _ = self.save_index(index);
                        });
                    }
                    return Ok((file, cached));
                }
                Err(why) if file.exists() => self.warn(format!(
                    "the cached copy of s3://{bucket}/{key}: {shown} {why}; downloading it again"
                )),
                Err(_) => {}
            }
        }
        let io = |e: std::io::Error| error("download", bucket, key, e.to_string());
        let folder = file.parent().unwrap_or(&self.cache_dir);
        std::fs::create_dir_all(folder).map_err(io)?;
        let partial = folder.join(format!(".{name}.part{}", unique_suffix()));
        let clock = std::time::Instant::now();
        let (blake3, size) = self
            .download(bucket, key, &partial)?
            .ok_or_else(|| error("download", bucket, key, "the object is gone".to_owned()))?;
        make_read_only(&partial)
            .and_then(|()| std::fs::rename(&partial, &file))
            .map_err(|e| {
                let _ = std::fs::remove_file(&partial);
                io(e)
            })?;
        tracing::debug!(bucket, key, bytes = size, elapsed = ?clock.elapsed(), "downloaded");
        let cached = CachedObject {
            etag: object.etag.clone(),
            size,
            blake3,
            file: shown,
            stamp: Stamp::of(&file).ok(),
        };
        self.with_index(|index| {
            index.objects.insert(id, cached.clone());
            let _ = self.save_index(index);
        });
        Ok((file, cached))
    }

    fn load_index(&self) -> CacheIndex {
        std::fs::read(self.cache_dir.join("index.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save_index(&self, index: &CacheIndex) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(index).map_err(std::io::Error::other)?;
        crate::store::fs::write_atomic(&self.cache_dir.join("index.json"), &text)
    }

    /// Uploads one local file to `key`: in one request, or in parts for a large file. S3 makes
    /// the object visible only when the upload is complete.
    /// Downloads `key` into the local file `to`, hashing it on the way: its BLAKE3 and size, or
    /// `None` when there is no such object. A failed download leaves no file at `to`.
    pub fn download(
        &self,
        bucket: &str,
        key: &str,
        to: &Path,
    ) -> Result<Option<(String, u64)>, StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("download", bucket, key, r))?;
        let path = object_path("download", bucket, key)?;
        let target = to.to_path_buf();
        let downloaded = self.block(async move {
            use std::io::Write;
            let got = match store.get(&path).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut stream = got.into_stream();
            // Plain blocking writes: this runtime exists for S3 requests, and a write per
            // chunk through tokio::fs costs a thread hop each.
            let file = std::fs::File::create(&target).map_err(local)?;
            let mut out = std::io::BufWriter::with_capacity(4 << 20, file);
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                out.write_all(&chunk).map_err(local)?;
            }
            out.flush().map_err(local)?;
            Ok::<_, object_store::Error>(Some((hasher.finalize().to_hex().to_string(), size)))
        });
        match downloaded {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(to);
                Err(self.describe("download", bucket, key, &e))
            }
            Err(halt) => {
                let _ = std::fs::remove_file(to);
                Err(error("download", bucket, key, halt))
            }
        }
    }

    /// Every object under `prefix/`: relative key, size, last modification. One LIST (paged),
    /// nothing else: a run cache's housekeeping needs no ETags.
    pub fn list_plain(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<super::Listed>, StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("list", bucket, prefix, r))?;
        let root = object_path("list", bucket, prefix)?;
        let listed = self
            .block(async move {
                store
                    .list(Some(&root))
                    .try_collect::<Vec<object_store::ObjectMeta>>()
                    .await
            })
            .map_err(|r| error("list", bucket, prefix, r))?
            .map_err(|e| self.describe("list", bucket, prefix, &e))?;
        let base = format!("{}/", prefix.trim_end_matches('/'));
        let mut objects: Vec<super::Listed> = listed
            .into_iter()
            .filter_map(|meta| {
                let full = meta.location.to_string();
                let path = full.strip_prefix(&base)?.to_owned();
                let millis = meta.last_modified.timestamp_millis();
                let modified = u64::try_from(millis).ok().map(|ms| {
                    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
                });
                Some(super::Listed {
                    path,
                    size: meta.size,
                    modified,
                })
            })
            .collect();
        objects.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(objects)
    }

    /// Deletes `key` (nothing there is fine).
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        self.forget(bucket, key);
        let store = self
            .store(bucket)
            .map_err(|r| error("delete", bucket, key, r))?;
        let path = object_path("delete", bucket, key)?;
        let outcome = self
            .block(async move { store.delete(&path).await })
            .map_err(|r| error("delete", bucket, key, r))?;
        match outcome {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.describe("delete", bucket, key, &e)),
        }
    }

    pub(super) fn upload_file(
        &self,
        bucket: &str,
        key: &str,
        file: &Path,
    ) -> Result<(), StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("upload", bucket, key, r))?;
        let path = object_path("upload", bucket, key)?;
        let size = std::fs::metadata(file)
            .map_err(|e| error("upload", bucket, key, e.to_string()))?
            .len();
        let source = file.to_path_buf();
        let clock = std::time::Instant::now();
        let uploaded = self
            .block(async move {
                if size <= PART_SIZE as u64 {
                    let bytes = tokio::fs::read(&source).await.map_err(local)?;
                    store.put(&path, PutPayload::from(bytes)).await?;
                    return Ok(());
                }
                let upload = store.put_multipart(&path).await?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                let mut input = std::fs::File::open(&source).map_err(local)?;
                let mut buffer = vec![0u8; PART_SIZE];
                loop {
                    let n = input.read(&mut buffer).map_err(local)?;
                    if n == 0 {
                        break;
                    }
                    if let Err(e) = writer.wait_for_capacity(4).await {
                        let _ = writer.abort().await;
                        return Err(e);
                    }
                    writer.write(&buffer[..n]);
                }
                writer.finish().await.map(|_| ())
            })
            .map_err(|r| error("upload", bucket, key, r))?;
        uploaded.map_err(|e| self.describe("upload", bucket, key, &e))?;
        tracing::debug!(bucket, key, bytes = size, elapsed = ?clock.elapsed(), "uploaded");
        Ok(())
    }

    /// A small object's bytes (a pointer, a metadata file); `None` when it is not there.
    pub fn get_small(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let store = self
            .store(bucket)
            .map_err(|r| error("read", bucket, key, r))?;
        let path = object_path("read", bucket, key)?;
        let got = self
            .block(async move {
                match store.get(&path).await {
                    Ok(result) => result.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|r| error("read", bucket, key, r))?;
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| self.describe("read", bucket, key, &e))
    }

    /// Creates `key` only if nothing is there (`If-None-Match: *`): `true` when this call
    /// created it, `false` when it existed. Two runs claiming the same key: one wins.
    pub fn claim(&self, bucket: &str, key: &str) -> Result<bool, StorageError> {
        self.create(bucket, key, b"claimed\n".to_vec())
    }

    /// Writes `bytes` at `key` only if nothing is there, in one conditional request.
    pub fn create(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<bool, StorageError> {
        self.forget(bucket, key);
        let store = self
            .store(bucket)
            .map_err(|r| error("upload", bucket, key, r))?;
        let path = object_path("upload", bucket, key)?;
        let outcome = self
            .block(async move {
                let options = object_store::PutOptions {
                    mode: object_store::PutMode::Create,
                    ..Default::default()
                };
                store
                    .put_opts(&path, PutPayload::from(bytes), options)
                    .await
            })
            .map_err(|r| error("upload", bucket, key, r))?;
        match outcome {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.describe("upload", bucket, key, &e)),
        }
    }

    /// Writes a small object in one request.
    pub fn put_small(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.forget(bucket, key);
        let store = self
            .store(bucket)
            .map_err(|r| error("upload", bucket, key, r))?;
        let path = object_path("upload", bucket, key)?;
        self.block(async move { store.put(&path, PutPayload::from(bytes)).await })
            .map_err(|r| error("upload", bucket, key, r))?
            .map(|_| ())
            .map_err(|e| self.describe("upload", bucket, key, &e))
    }

    /// Moves every object under `from/` to `to/` (copy, then delete the original).
    pub fn move_prefix(&self, bucket: &str, from: &str, to: &str) -> Result<(), StorageError> {
        self.forget(bucket, from);
        self.forget(bucket, to);
        let objects = self.list(bucket, from)?;
        let store = self
            .store(bucket)
            .map_err(|r| error("move", bucket, from, r))?;
        let pairs = objects
            .iter()
            .map(|(relative, _)| {
                Ok((
                    object_path("move", bucket, &format!("{from}/{relative}"))?,
                    object_path("move", bucket, &format!("{to}/{relative}"))?,
                ))
            })
            .collect::<Result<Vec<(Key, Key)>, StorageError>>()?;
        self.block(async move {
            for (source, target) in pairs {
                store.copy(&source, &target).await?;
                store.delete(&source).await?;
            }
            Ok::<_, object_store::Error>(())
        })
        .map_err(|r| error("move", bucket, from, r))?
        .map_err(|e| self.describe("move", bucket, from, &e))
    }

    /// Commits a staged output to S3 and returns its identity as committed.
    pub fn commit(
        &self,
        bucket: &str,
        key: &str,
        staged: &Path,
        dir: bool,
        run: &str,
    ) -> Result<ContentHash, StorageError> {
        self.forget(bucket, key);
        if !dir {
            self.upload_file(bucket, key, staged)?;
            return self.identity(bucket, key, false)?.ok_or_else(|| {
                error("upload", bucket, key, "the object is gone after its upload")
            });
        }
        let files = crate::store::versions::files_in(staged, None)
            .map_err(|e| error("upload", bucket, key, e.to_string()))?;
        let before = self.list(bucket, key)?;
        // 1. Everything to staging: nothing under the prefix changes if this fails.
        // By output, then run: a later commit of the same output finds what killed runs left.
        let staging_root = format!("{STAGING_PREFIX}/{key}");
        let staging = format!("{staging_root}/{run}");
        for file in &files {
            self.upload_file(
                bucket,
                &format!("{staging}/{}", file.path),
                &staged.join(&file.path),
            )?;
        }
        // 2. Into place, server-side.
        let store = self
            .store(bucket)
            .map_err(|r| error("upload", bucket, key, r))?;
        let pairs = files
            .iter()
            .map(|file| {
                Ok((
                    object_path("upload", bucket, &format!("{staging}/{}", file.path))?,
                    object_path("upload", bucket, &format!("{key}/{}", file.path))?,
                ))
            })
            .collect::<Result<Vec<(Key, Key)>, StorageError>>()?;
        let copier = store.clone();
        self.block(async move {
            futures::stream::iter(pairs)
                .map(|(from, to)| {
                    let store = copier.clone();
                    async move { store.copy(&from, &to).await }
                })
                .buffer_unordered(8)
                .try_collect::<Vec<()>>()
                .await
        })
        .map_err(|r| error("upload", bucket, key, r))?
        .map_err(|e| self.describe("upload", bucket, key, &e))?;
        // 3. The manifest, last: the commit marker.
        let manifest = Manifest {
            imba_manifest: 1,
            files: files.clone(),
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| error("upload", bucket, key, e.to_string()))?;
        let manifest_key = object_path("upload", bucket, &format!("{key}/{MANIFEST}"))?;
        let putter = store.clone();
        self.block(async move { putter.put(&manifest_key, PutPayload::from(text)).await })
            .map_err(|r| error("upload", bucket, key, r))?
            .map_err(|e| self.describe("upload", bucket, key, &e))?;
        // Then the old version's leftovers and the staging copies go.
        let keep: std::collections::BTreeSet<&str> = files
            .iter()
            .map(|file| file.path.as_str())
            .chain([MANIFEST])
            .collect();
        let mut doomed: Vec<Key> = before
            .iter()
            .filter(|(relative, _)| !keep.contains(relative.as_str()))
            .filter_map(|(relative, _)| Key::parse(format!("{key}/{relative}")).ok())
            .collect();
        doomed.extend(
            files
                .iter()
                .filter_map(|file| Key::parse(format!("{staging}/{}", file.path)).ok()),
        );
        // Uploads of runs that were killed before their commit, a day old or more (younger ones
        // may belong to a run still going, on another machine).
        let abandoned_root = object_path("upload", bucket, &staging_root)?;
        let lister = store.clone();
        let own = format!("{staging}/");
        if let Ok(Ok(old)) = self.block(async move {
            lister
                .list(Some(&abandoned_root))
                .try_collect::<Vec<_>>()
                .await
        }) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let cutoff = now - 24 * 3600;
            doomed.extend(
                old.into_iter()
                    .filter(|meta| meta.last_modified.timestamp() < cutoff)
                    .filter(|meta| !meta.location.as_ref().starts_with(&own))
                    .map(|meta| meta.location),
            );
        }
        let deleter = store.clone();
        let cleaned = self.block(async move {
            futures::stream::iter(doomed)
                .map(|path| {
                    let store = deleter.clone();
                    async move { store.delete(&path).await }
                })
                .buffer_unordered(8)
                .try_collect::<Vec<()>>()
                .await
        });
        if !matches!(cleaned, Ok(Ok(_))) {
            tracing::warn!(
                bucket,
                key,
                "could not delete every leftover object after the commit"
            );
        }
        self.committed_dir(bucket, key)?.ok_or_else(|| {
            error(
                "upload",
                bucket,
                key,
                "the manifest is gone after the commit",
            )
        })
    }
}

/// object_store's HTTP client, with an idle timeout: reqwest's read timeout, which object_store's
/// [`ClientOptions`] do not reach, bounds the wait for a response's headers and for each chunk
/// of its body. Everything else follows the options object_store passes in (its metadata
/// client, for instance, allows http and connects within a second).
#[derive(Debug)]
struct Connector {
    idle: Duration,
}

impl object_store::client::HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        use object_store::ClientConfigKey;
        let value = |key| options.get_config_value(&key);
        let connect = value(ClientConfigKey::ConnectTimeout)
            .and_then(|text| humantime::parse_duration(&text).ok())
            .unwrap_or(CONNECT_TIMEOUT);
        let client = reqwest::Client::builder()
            .user_agent(concat!("imba/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect)
            .read_timeout(self.idle)
            .https_only(value(ClientConfigKey::AllowHttp).as_deref() != Some("true"))
            .danger_accept_invalid_certs(
                value(ClientConfigKey::AllowInvalidCertificates).as_deref() == Some("true"),
            )
            // Sizes come from Content-Length: nothing may decompress a body on the way.
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}

/// What the shared AWS files say for `AWS_PROFILE` (or `default`): `~/.aws/credentials` (or
/// `AWS_SHARED_CREDENTIALS_FILE`) and `~/.aws/config` (or `AWS_CONFIG_FILE`), as the AWS CLI reads
/// them. The environment wins over both.
#[derive(Default)]
struct Profile {
    credentials: Option<(String, String, Option<String>)>,
    region: Option<String>,
}

impl Profile {
    fn load() -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let name = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
        let home = env("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
        };
        let read = |path: Option<PathBuf>| path.and_then(|p| ini::Ini::load_from_file(p).ok());
        let mut profile = Profile::default();
        if let Some(ini) = read(file("AWS_SHARED_CREDENTIALS_FILE", "credentials")) {
            if let Some(section) = ini.section(Some(name.as_str())) {
                if let (Some(key), Some(secret)) = (
                    section.get("aws_access_key_id"),
                    section.get("aws_secret_access_key"),
                ) {
                    profile.credentials = Some((
                        key.to_owned(),
                        secret.to_owned(),
                        section.get("aws_session_token").map(str::to_owned),
                    ));
                }
            }
        }
        if let Some(ini) = read(file("AWS_CONFIG_FILE", "config")) {
            // `[default]`, or `[profile NAME]`.
            let section_name = if name == "default" {
                name.clone()
            } else {
                format!("profile {name}")
            };
            profile.region = ini
                .section(Some(section_name.as_str()))
                .and_then(|s| s.get("region"))
                .map(str::to_owned);
        }
        profile
    }
}

fn local(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "local file",
        source: Box::new(e),
    }
}

/// An object's identity as S3 reports it. A store that leaves the ETag out of its listings
/// (s3s-fs does) gets the modification time in its place, so that a rewrite is still seen.
fn info(meta: &object_store::ObjectMeta) -> ObjectInfo {
    let etag = match &meta.e_tag {
        Some(etag) => etag.trim_matches('"').to_owned(),
        None => format!("modified:{}", meta.last_modified.to_rfc3339()),
    };
    ObjectInfo {
        etag,
        size: meta.size,
        version: meta.version.clone(),
    }
}

/// An object's identity as a hash: its ETag, size and version.
fn object_identity(object: &ObjectInfo) -> String {
    let text = format!(
        "s3-object\0{}\0{}\0{}",
        object.etag,
        object.size,
        object.version.as_deref().unwrap_or("")
    );
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// A prefix's identity: the sorted listing of its objects (staging excluded).
fn prefix_identity(objects: &[(String, ObjectInfo)]) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"s3-prefix\0");
    let mut size = 0;
    let mut files = 0;
    for (relative, object) in objects {
        if relative.starts_with(STAGING_PREFIX) {
            continue;
        }
        hasher.update(relative.as_bytes());
        hasher.update(b"\0");
        hasher.update(object_identity(object).as_bytes());
        hasher.update(b"\n");
        size += object.size;
        files += 1;
    }
    ContentHash {
        hash: hasher.finalize().to_hex().to_string(),
        size,
        files: Some(files),
        etag: None,
    }
}

/// `key` as an object_store path, exactly as written. `Path::parse` keeps every character
/// (UTF-8, spaces, `~`, `%`, `+`, `=`), and the S3 client percent-encodes it once for the URL
/// and its signature; `Path::from` would encode `%`, `~` and every non-ASCII byte first, so
/// that the request named another key (`ü.csv` as `%C3%BC.csv`). A key object_store cannot
/// carry (a `.` or `..` segment, a control character) is an error naming it.
fn object_path(operation: &'static str, bucket: &str, key: &str) -> Result<Key, StorageError> {
    Key::parse(key).map_err(|e| {
        let why = match e {
            object_store::path::Error::EmptySegment { .. } => "an empty segment (`//`)",
            _ if key.split('/').any(|part| part == "." || part == "..") => "a `.` or `..` segment",
            _ if key.chars().any(|c| c.is_ascii_control()) => "a control character",
            _ => "characters object_store cannot send",
        };
        error(
            operation,
            bucket,
            key,
            format!("imba cannot address a key with {why}"),
        )
    })
}

/// The error of a cached copy that no longer holds what was downloaded.
fn changed(bucket: &str, key: &str, what: String) -> StorageError {
    StorageError {
        operation: "use",
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        reason: format!("its local copy {what}; a stage must not change its inputs"),
        kind: ErrorKind::Changed,
    }
}

/// Why a call on the storage runtime returned without its future's output.
#[derive(Debug)]
enum Halt {
    Failed(String),
    /// The run was cancelled ([`Storage::with_cancel`]).
    Cancelled,
}

/// The reason of a [`StorageError`] and its kind: plain text is a failure.
struct Cause(String, ErrorKind);

impl From<String> for Cause {
    fn from(reason: String) -> Self {
        Cause(reason, ErrorKind::Failed)
    }
}

impl From<&str> for Cause {
    fn from(reason: &str) -> Self {
        Cause(reason.to_owned(), ErrorKind::Failed)
    }
}

impl From<Halt> for Cause {
    fn from(halt: Halt) -> Self {
        match halt {
            Halt::Failed(reason) => Cause(reason, ErrorKind::Failed),
            Halt::Cancelled => Cause(
                "cancelled (interrupted); the request was abandoned".to_owned(),
                ErrorKind::Cancelled,
            ),
        }
    }
}

fn error(
    operation: &'static str,
    bucket: &str,
    key: &str,
    cause: impl Into<Cause>,
) -> StorageError {
    let Cause(reason, kind) = cause.into();
    StorageError {
        operation,
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        reason,
        kind,
    }
}

/// An object_store error in words: the S3 error code and message when the response had them,
/// else the HTTP status or the network failure, with the endpoint.
fn describe_error(
    operation: &'static str,
    bucket: &str,
    key: &str,
    e: &object_store::Error,
) -> StorageError {
    let chain = error_chain(e);
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = chain.find(&open)? + open.len();
        let end = chain[start..].find(&close)? + start;
        Some(chain[start..end].to_owned())
    };
    let reason = match (tag("Code"), tag("Message")) {
        (Some(code), message) => {
            let meaning = match code.as_str() {
                "NoSuchBucket" => Some(format!("bucket `{bucket}` does not exist")),
                "NoSuchKey" => Some("no such object".to_owned()),
                "AccessDenied" => Some("the credentials may not do this".to_owned()),
                "InvalidAccessKeyId" => {
                    Some("the store knows no such access key (AWS_ACCESS_KEY_ID)".to_owned())
                }
                "SignatureDoesNotMatch" => Some(
                    "the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)"
                        .to_owned(),
                ),
                "ExpiredToken" => {
                    Some("the session token has expired (AWS_SESSION_TOKEN)".to_owned())
                }
                _ => None,
            };
            match (meaning, message) {
                (Some(meaning), _) => format!("{code}: {meaning}"),
                (None, Some(message)) => format!("{code}: {message}"),
                (None, None) => code,
            }
        }
        _ => {
            if matches!(e, object_store::Error::NotFound { .. }) {
                "no such object (NoSuchKey)".to_owned()
            } else if let Some(status) = http_status(&chain) {
                match status {
                    403 => "access denied (HTTP 403: AccessDenied or SignatureDoesNotMatch; check the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)".to_owned(),
                    404 => "not found (HTTP 404)".to_owned(),
                    other => format!("HTTP {other}"),
                }
            } else if chain.contains("error sending request")
                || chain.contains("Connection refused")
                || chain.contains("dns error")
                || chain.contains("timed out")
            {
                format!("the S3 endpoint cannot be reached ({})", last_cause(&chain))
            } else {
                last_cause(&chain)
            }
        }
    };
    error(operation, bucket, key, reason)
}

/// An error and its sources, joined by `: `.
fn error_chain(e: &object_store::Error) -> String {
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        chain.push_str(": ");
        chain.push_str(&inner.to_string());
        source = inner.source();
    }
    chain
}

fn http_status(text: &str) -> Option<u16> {
    for marker in ["status: ", "status code ", "status "] {
        if let Some(at) = text.find(marker) {
            let digits: String = text[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(status) = digits.parse() {
                return Some(status);
            }
        }
    }
    None
}

/// The most specific part of an error chain, shortened.
fn last_cause(chain: &str) -> String {
    let last = chain
        .rsplit(": ")
        .find(|part| !part.trim().is_empty())
        .unwrap_or(chain);
    let last = last.trim();
    if last.len() > 300 {
        let mut end = 300;
        while !last.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &last[..end])
    } else {
        last.to_owned()
    }
}

// Versioned outputs in S3: the same layout as on disk, claimed by conditional PUTs.

/// The versions in place under an S3 prefix, oldest first, each complete (with its manifest).
fn s3_versions(storage: &Storage, bucket: &str, key: &str, base: &str) -> Result<Vec<u32>, String> {
    s3_listing(storage, bucket, key, base).map(|(versions, _)| versions)
}

/// The complete versions under `key/`, oldest first, and the ETag of its `LATEST`: one LIST.
fn s3_listing(
    storage: &Storage,
    bucket: &str,
    key: &str,
    base: &str,
) -> Result<(Vec<u32>, Option<String>), String> {
    let listed = storage.list(bucket, key).map_err(|e| e.to_string())?;
    let latest = listed
        .iter()
        .find(|(relative, _)| relative == LATEST)
        .map(|(_, info)| info.etag.clone());
    let mut versions: Vec<u32> = listed
        .into_iter()
        .filter_map(|(relative, _)| {
            let (folder, rest) = relative.split_once('/')?;
            (rest == MANIFEST).then_some(())?;
            versions::parse_version(folder, base)
        })
        .collect();
    versions.sort();
    versions.dedup();
    Ok((versions, latest))
}

/// The name of the latest complete version under an S3 prefix (`features_v3`): the one `LATEST`
/// names, else the highest (LIST, and a GET of `LATEST`).
fn latest_version(storage: &Storage, bucket: &str, key: &str) -> Result<Option<String>, String> {
    let base = versions::base_name(Path::new(key));
    let (in_place, etag) = s3_listing(storage, bucket, key, &base)?;
    Ok(
        pointed_version(storage, bucket, key, &base, &in_place, etag.as_deref())?
            .map(|latest| format!("{base}_v{latest}")),
    )
}

/// The identity of an S3 versioned output as status compares it: its latest complete version,
/// found by LIST alone.
fn current_version_hash(
    storage: &Storage,
    bucket: &str,
    key: &str,
) -> Result<Option<ContentHash>, String> {
    let Some(name) = latest_version(storage, bucket, key)? else {
        return Ok(None);
    };
    storage
        .committed_dir(bucket, &format!("{key}/{name}"))
        .map_err(|e| e.to_string())
}

/// [`versions::commit`] for an output under `s3://bucket/key/`: a number is claimed with a conditional
/// PUT, the version is uploaded as a directory output (staging, copy, manifest last), then
/// `versions::LATEST` is written, then old versions move to `archive/`.
fn commit_version(
    storage: &Storage,
    bucket: &str,
    key: &str,
    staged: &Path,
    versioning: &Versioning,
    input: versions::MetaInput,
    run: &str,
) -> Result<(u32, bool, ContentHash), String> {
    let files =
        versions::files_of(staged).map_err(|e| format!("cannot read the staged output: {e}"))?;
    let content = versions::content_hash(&files);
    let base = versions::base_name(Path::new(key));
    let (in_place, etag) = s3_listing(storage, bucket, key, &base)?;
    let pointed = pointed_version(storage, bucket, key, &base, &in_place, etag.as_deref())?;
    let content_of = |version: u32| -> Result<Option<String>, String> {
        let name = format!("{base}_v{version}");
        let Some(bytes) = storage
            .get_small(bucket, &format!("{key}/{name}/{META}"))
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let meta: versions::Meta = serde_json::from_slice(&bytes)
            .map_err(|e| format!("s3://{bucket}/{key}/{name}/{META} is not valid: {e}"))?;
        Ok(Some(meta.content_hash))
    };
    let identity = |version: u32| -> Result<ContentHash, String> {
        let name = format!("{base}_v{version}");
        storage
            .committed_dir(bucket, &format!("{key}/{name}"))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("s3://{bucket}/{key}/{name} is gone"))
    };
    if let Some(latest) = pointed {
        if content_of(latest)?.as_deref() == Some(content.as_str()) {
            return Ok((latest, true, identity(latest)?));
        }
    }
    // The same content as an older version in place is that version, never a duplicate:
    // LATEST moves back to it (a param changed and back, a restore from the run cache).
    for &version in in_place.iter().rev() {
        if Some(version) != pointed && content_of(version)?.as_deref() == Some(content.as_str()) {
            let hash = identity(version)?;
            storage
                .put_small(
                    bucket,
                    &format!("{key}/{LATEST}"),
                    format!("{base}_v{version}\n").into_bytes(),
                )
                .map_err(|e| e.to_string())?;
            retire_s3(storage, bucket, key, &base, versioning, &in_place, version)?;
            return Ok((version, false, hash));
        }
    }
    let archive = archive_key(key);
    let archived = s3_versions(storage, bucket, &archive, &base)?;
    let mut next = in_place
        .last()
        .copied()
        .unwrap_or(0)
        .max(archived.last().copied().unwrap_or(0))
        + 1;
    // A number is taken by creating its claim only if it is not there (`If-None-Match`): two
    // runs committing at once get different numbers.
    while !storage
        .claim(
            bucket,
            &format!(".imba-staging/{key}/claims/{base}_v{next}"),
        )
        .map_err(|e| e.to_string())?
    {
        next += 1;
    }
    let tables = versions::describe_tables(staged, &files);
    let meta = versions::new_meta(
        &input,
        next,
        &base,
        &content,
        &files,
        &tables,
        &versions::git_commit(&input.workdir),
    );
    versions::write_meta(staged, &meta)?;
    let version_key = format!("{key}/{}", meta.name);
    let hash = storage
        .commit(bucket, &version_key, staged, true, run)
        .map_err(|e| e.to_string())?;
    storage
        .put_small(
            bucket,
            &format!("{key}/{LATEST}"),
            format!("{}\n", meta.name).into_bytes(),
        )
        .map_err(|e| e.to_string())?;
    let mut all = in_place.clone();
    all.push(next);
    retire_s3(storage, bucket, key, &base, versioning, &all, next)?;
    Ok((next, false, hash))
}

/// With `keep: K`, moves every version in place but `latest` and the newest `K - 1` others
/// to `archive/`.
fn retire_s3(
    storage: &Storage,
    bucket: &str,
    key: &str,
    base: &str,
    versioning: &Versioning,
    in_place: &[u32],
    latest: u32,
) -> Result<(), String> {
    let Some(keep) = versioning.keep else {
        return Ok(());
    };
    let archive = archive_key(key);
    let others: Vec<u32> = in_place.iter().copied().filter(|v| *v != latest).collect();
    let excess = others.len().saturating_sub(keep.max(1) as usize - 1);
    for version in &others[..excess] {
        let name = format!("{base}_v{version}");
        storage
            .move_prefix(
                bucket,
                &format!("{key}/{name}"),
                &format!("{archive}/{name}"),
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The version `LATEST` names, when it is complete and in place (a restore may have moved it
/// back to an older one); else the highest complete one. `etag` is `LATEST`'s, from the
/// listing: when it is the MD5 of the highest version's name, as it almost always is, nothing
/// is read.
fn pointed_version(
    storage: &Storage,
    bucket: &str,
    key: &str,
    base: &str,
    in_place: &[u32],
    etag: Option<&str>,
) -> Result<Option<u32>, String> {
    let highest = in_place.last().copied();
    if let (Some(highest), Some(etag)) = (highest, etag) {
        use md5::Digest;
        let name = format!("{base}_v{highest}\n");
        let digest = md5::Md5::digest(name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if etag.trim_matches('"') == hex {
            return Ok(Some(highest));
        }
    }
    let named = storage
        .get_small(bucket, &format!("{key}/{LATEST}"))
        .map_err(|e| e.to_string())?
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| versions::parse_version(text.trim(), base))
        .filter(|v| in_place.contains(v));
    Ok(named.or(highest))
}

/// `archive/` beside an S3 output prefix.
fn archive_key(key: &str) -> String {
    match key.rsplit_once('/') {
        Some((parent, _)) => format!("{parent}/archive"),
        None => "archive".to_owned(),
    }
}

/// S3 as a [`Store`](super::Store), over the client above.
pub struct S3Store {
    storage: Storage,
}

impl S3Store {
    pub fn new(storage: Storage) -> Self {
        S3Store { storage }
    }

    /// Uploads each staged output in turn (each atomic: the set is not), without first checking
    /// that all of them were written; [`Store::commit`] does.
    pub(super) fn upload(
        &self,
        outputs: &[Staged],
        run: &str,
    ) -> Result<Vec<ContentHash>, StoreError> {
        let mut hashes = Vec::with_capacity(outputs.len());
        for staged in outputs {
            let (bucket, key) = parts(&staged.to.location)?;
            tracing::trace!(from = %staged.from.display(), to = %staged.shown, "upload");
            let hash = self
                .storage
                .commit(bucket, key, staged.from, staged.to.dir, run)
                .map_err(|e| {
                    StoreError::Other(format!(
                        "{e}; the output `{}` was not committed",
                        staged.shown
                    ))
                })?;
            hashes.push(hash);
        }
        Ok(hashes)
    }
}

fn parts(at: &Location) -> Result<(&str, &str), StoreError> {
    match at {
        Location::S3 { bucket, key } => Ok((bucket, key)),
        Location::Local(path) => Err(StoreError::Other(format!(
            "`{}` is not in S3",
            path.display()
        ))),
    }
}

impl Store for S3Store {
    fn identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        let (bucket, key) = parts(&at.location)?;
        Ok(self.storage.identity(bucket, key, at.dir)?)
    }

    fn committed_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        let (bucket, key) = parts(&at.location)?;
        if at.dir {
            Ok(self.storage.committed_dir(bucket, key)?)
        } else {
            Ok(self.storage.identity(bucket, key, false)?)
        }
    }

    /// Every identity wanted, at once ([`Storage::prefetch`]); local locations are skipped.
    fn prefetch(&self, wanted: &[(&Declared, bool)]) {
        let lookups = wanted
            .iter()
            .filter_map(|(at, output)| {
                let (bucket, key) = parts(&at.location).ok()?;
                Some(Lookup::new(bucket, key, at.dir, at.dir && *output))
            })
            .collect();
        self.storage.prefetch(lookups);
    }

    fn local_copy(&self, at: &Declared) -> Result<PathBuf, StoreError> {
        let (bucket, key) = parts(&at.location)?;
        Ok(self.storage.fetch(bucket, key, at.dir)?)
    }

    fn verify_copy(&self, _at: &Declared, copy: &Path) -> Result<(), StoreError> {
        Ok(self.storage.verify_cached(copy)?)
    }

    /// Each output is checked before the first is uploaded: one that was not written leaves
    /// every output as it was. (A request failing half-way leaves the outputs before it
    /// committed: each is atomic, the set is not.)
    fn commit(&self, outputs: &[Staged], run: &str) -> Result<Vec<ContentHash>, StoreError> {
        super::all_written(outputs)?;
        self.upload(outputs, run)
    }

    /// Downloaded (once per ETag) only when a check asks for it.
    fn baseline(&self, at: &Declared, _recorded: Option<&str>) -> Baseline {
        match self.committed_identity(at) {
            Ok(Some(_)) => match self.local_copy(at) {
                Ok(copy) => Baseline::Found(copy),
                Err(_) => Baseline::None,
            },
            _ => Baseline::None,
        }
    }

    fn commit_version(
        &self,
        staged: Staged,
        versioning: &Versioning,
        meta: versions::MetaInput,
        run: &str,
    ) -> Result<Version, StoreError> {
        let (bucket, key) = parts(&staged.to.location)?;
        let (number, reused, hash) = commit_version(
            &self.storage,
            bucket,
            key,
            staged.from,
            versioning,
            meta,
            run,
        )
        .map_err(|e| StoreError::Other(format!("output `{}`: {e}", staged.shown)))?;
        Ok(Version {
            number,
            reused,
            hash,
        })
    }

    fn version_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        let (bucket, key) = parts(&at.location)?;
        current_version_hash(&self.storage, bucket, key).map_err(StoreError::Other)
    }

    fn latest_version(&self, at: &Declared) -> Option<PathBuf> {
        let (bucket, key) = parts(&at.location).ok()?;
        let name = latest_version(&self.storage, bucket, key).ok()??;
        self.storage
            .fetch(bucket, &format!("{key}/{name}"), true)
            .ok()
    }

    fn get(&self, at: &Location) -> Result<Option<Vec<u8>>, StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.get_small(bucket, key)?)
    }

    fn put(&self, at: &Location, bytes: &[u8]) -> Result<(), StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.put_small(bucket, key, bytes.to_vec())?)
    }

    fn create(&self, at: &Location, bytes: &[u8]) -> Result<bool, StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.create(bucket, key, bytes.to_vec())?)
    }

    fn send(&self, from: &Path, at: &Location) -> Result<(), StoreError> {
        let (bucket, key) = parts(at)?;
        self.storage.forget(bucket, key);
        Ok(self.storage.upload_file(bucket, key, from)?)
    }

    fn receive(&self, at: &Location, to: &Path) -> Result<Option<(String, u64)>, StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.download(bucket, key, to)?)
    }

    fn exists(&self, at: &Location) -> Result<bool, StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.head(bucket, key)?.is_some())
    }

    fn delete(&self, at: &Location) -> Result<(), StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.delete(bucket, key)?)
    }

    fn list(&self, at: &Location) -> Result<Vec<super::Listed>, StoreError> {
        let (bucket, key) = parts(at)?;
        Ok(self.storage.list_plain(bucket, key)?)
    }

    /// One listing of `archive/` beside the output; a version's age is its newest object's.
    fn archived(&self, at: &Declared) -> Result<Vec<super::Archived>, StoreError> {
        let (bucket, key) = parts(&at.location)?;
        let key = key.trim_end_matches('/');
        let base = key.rsplit('/').next().unwrap_or(key);
        let mut found: std::collections::BTreeMap<(u32, String), super::Archived> =
            Default::default();
        for object in self.storage.list_plain(bucket, &archive_key(key))? {
            let Some((name, _)) = object.path.split_once('/') else {
                continue;
            };
            let Some(version) = versions::parse_version(name, base) else {
                continue;
            };
            let entry =
                found
                    .entry((version, name.to_owned()))
                    .or_insert_with(|| super::Archived {
                        name: name.to_owned(),
                        modified: None,
                        bytes: 0,
                    });
            entry.modified = entry.modified.max(object.modified);
            entry.bytes += object.size;
        }
        Ok(found.into_values().collect())
    }

    /// A delete per object of the version.
    fn remove_archived(&self, at: &Declared, name: &str) -> Result<(), StoreError> {
        let (bucket, key) = parts(&at.location)?;
        let key = key.trim_end_matches('/');
        let base = key.rsplit('/').next().unwrap_or(key);
        if versions::parse_version(name, base).is_none() {
            return Err(StoreError::Other(format!(
                "`{name}` is not a version of `{}`",
                at.location.sort_key()
            )));
        }
        let prefix = format!("{}/{name}", archive_key(key));
        for object in self.storage.list_plain(bucket, &prefix)? {
            self.storage
                .delete(bucket, &format!("{prefix}/{}", object.path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn storage(dir: &Path) -> Storage {
        Storage::new(StorageSettings::default(), dir.join("cache"))
    }

    /// Puts `contents` in the cache as the download of `s3://bkt/KEY`, as `fetch_object` does.
    fn admit(storage: &Storage, key: &str, contents: &[u8]) -> PathBuf {
        let name = key.rsplit('/').next().unwrap();
        let file = storage.cache_dir.join("objects").join("0123").join(name);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, contents).unwrap();
        make_read_only(&file).unwrap();
        storage.with_index(|index| {
            index.objects.insert(
                format!("bkt/{key}"),
                CachedObject {
                    etag: "etag".to_owned(),
                    size: contents.len() as u64,
                    blake3: blake3::hash(contents).to_hex().to_string(),
                    file: file.display().to_string(),
                    stamp: Stamp::of(&file).ok(),
                },
            )
        });
        file
    }

    /// Writes `contents` over `file` in place (as root, or after a chmod, can), keeping its
    /// mtime: only its ctime tells.
    fn overwrite_in_place(file: &Path, contents: &[u8]) {
        let mtime = std::fs::metadata(file).unwrap().modified().unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(file, contents).unwrap();
        let handle = std::fs::File::options().write(true).open(file).unwrap();
        handle.set_modified(mtime).unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444)).unwrap();
    }

    /// What `sed -i` does: a new file renamed over the old one.
    fn replace_by_rename(file: &Path, contents: &[u8]) {
        let fresh = file.with_extension("sed-tmp");
        std::fs::write(&fresh, contents).unwrap();
        std::fs::rename(&fresh, file).unwrap();
    }

    #[test]
    fn keys_are_kept_exactly_as_written() {
        for key in [
            "raw/ü.csv",
            "raw/a b.csv",
            "raw/x~y.csv",
            "raw/100%.csv",
            "raw/a+b=c.csv",
            "o/ü~.csv",
            "dir ü+1/%C3%BC.csv",
        ] {
            assert_eq!(object_path("read", "bkt", key).unwrap().as_ref(), key);
        }
        let e = object_path("read", "bkt", "raw/../x.csv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read s3://bkt/raw/../x.csv: imba cannot address a key with a `.` or `..` segment"
        );
        let e = object_path("upload", "bkt", "raw/a\tb.csv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot upload s3://bkt/raw/a\tb.csv: imba cannot address a key with a control character"
        );
    }

    #[test]
    fn cached_copies_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = admit(&storage(dir.path()), "raw/data.csv", b"a\n1\n");
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
    }

    #[test]
    fn an_untouched_copy_and_a_path_outside_the_cache_verify() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path());
        let file = admit(&storage, "raw/data.csv", b"a\n1\n");
        storage.verify_cached(&file).unwrap();
        let elsewhere = dir.path().join("local.csv");
        std::fs::write(&elsewhere, "x").unwrap();
        storage.verify_cached(&elsewhere).unwrap();
    }

    #[test]
    fn a_copy_written_in_place_is_caught_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path());
        let file = admit(&storage, "raw/data.csv", b"a\n1\n");
        overwrite_in_place(&file, b"a\n2\n");
        let e = storage.verify_cached(&file).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Changed);
        assert_eq!(
            e.to_string(),
            format!(
                "cannot use s3://bkt/raw/data.csv: its local copy {} was changed (its content is not what was downloaded); a stage must not change its inputs",
                file.display()
            )
        );
    }

    #[test]
    fn a_copy_replaced_like_sed_i_does_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path());
        let file = admit(&storage, "raw/data.csv", b"a\n1\n");
        replace_by_rename(&file, b"a\n1\n2\n");
        let e = storage.verify_cached(&file).unwrap_err();
        assert!(
            e.to_string().ends_with(&format!(
                "{} was changed (6 bytes now, 4 downloaded); a stage must not change its inputs",
                file.display()
            )),
            "{e}"
        );
        std::fs::remove_file(&file).unwrap();
        let e = storage.verify_cached(&file).unwrap_err();
        assert!(e.to_string().contains("was removed"), "{e}");
    }

    #[test]
    fn the_same_content_under_a_new_stamp_verifies_and_is_stamped_anew() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path());
        let file = admit(&storage, "raw/data.csv", b"a\n1\n");
        replace_by_rename(&file, b"a\n1\n");
        storage.verify_cached(&file).unwrap();
        let recorded = storage.with_index(|index| index.objects["bkt/raw/data.csv"].stamp);
        assert_eq!(recorded, Some(Stamp::of(&file).unwrap()));
        // And the index on disk says so too, for the next run.
        let reloaded = storage.load_index();
        assert_eq!(reloaded.objects["bkt/raw/data.csv"].stamp, recorded);
    }

    #[test]
    fn a_prefix_copy_with_a_file_added_or_changed_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path());
        let root = storage.cache_dir.join("dirs").join("0123");
        let mut files = BTreeMap::new();
        for (relative, contents) in [("a.csv", &b"a\n"[..]), ("sub/b.csv", &b"b\n"[..])] {
            let path = root.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, contents).unwrap();
            make_read_only(&path).unwrap();
            files.insert(
                relative.to_owned(),
                CachedFile {
                    size: contents.len() as u64,
                    blake3: blake3::hash(contents).to_hex().to_string(),
                    stamp: Stamp::of(&path).ok(),
                },
            );
        }
        storage.with_index(|index| {
            index.dirs.insert(
                root.display().to_string(),
                CachedDir {
                    bucket: "bkt".to_owned(),
                    key: "parts".to_owned(),
                    files,
                },
            )
        });
        storage.verify_cached(&root).unwrap();

        std::fs::write(root.join("sub/new.csv"), "x").unwrap();
        let e = storage.verify_cached(&root).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot use s3://bkt/parts/: its local copy {} was added; a stage must not change its inputs",
                root.join("sub/new.csv").display()
            )
        );
        std::fs::remove_file(root.join("sub/new.csv")).unwrap();
        storage.verify_cached(&root).unwrap();

        overwrite_in_place(&root.join("sub/b.csv"), b"c\n");
        let e = storage.verify_cached(&root).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "{} was changed (its content",
                root.join("sub/b.csv").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_cancelled_run_makes_no_request() {
        let dir = tempfile::tempdir().unwrap();
        let (_stop, cancel) = watch::channel(Stop::Cancel);
        // Nothing listens there: a request would fail with another error.
        let settings = StorageSettings {
            endpoint: Some("http://127.0.0.1:9".to_owned()),
            ..StorageSettings::default()
        };
        let storage = Storage::new(settings, dir.path().to_path_buf()).with_cancel(cancel);
        let e = storage.head("bkt", "raw/data.csv").unwrap_err();
        assert!(e.is_cancelled(), "{e}");
    }
}
