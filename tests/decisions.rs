//! What is stale and why (`plan::reasons`), and what the scheduler decides run after run, with
//! the data held by an in-memory store: every decision comes from identities the test sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use imba::graph::dag::{self, BuildOptions, Dag};
use imba::model::{Declared, Location, Versioning};
use imba::plan::{self, Reason, Selection};
use imba::run::{self, Event, Events, RunOptions};
use imba::store::{versions, Baseline, ContentHash, Staged, Store, StoreError, Version};

/// A store that keeps every file in memory, by path; what a stage reads is copied out to a
/// scratch folder, what it commits is read back in.
struct Memory {
    files: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
    scratch: PathBuf,
    copies: Mutex<usize>,
}

impl Memory {
    fn new(scratch: &Path) -> Self {
        Memory {
            files: Mutex::new(BTreeMap::new()),
            scratch: scratch.to_path_buf(),
            copies: Mutex::new(0),
        }
    }

    fn set(&self, path: &Path, bytes: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), bytes.to_vec());
    }

    fn remove(&self, path: &Path) {
        self.files.lock().unwrap().remove(path);
    }

    fn read(&self, path: &Path) -> Option<Vec<u8>> {
        self.files.lock().unwrap().get(path).cloned()
    }
}

fn path_of(at: &Location) -> &Path {
    at.local_path().expect("the test uses local paths")
}

fn hash_of(bytes: &[u8]) -> ContentHash {
    ContentHash {
        hash: blake3::hash(bytes).to_hex().to_string(),
        size: bytes.len() as u64,
        files: None,
        etag: None,
    }
}

impl Store for Memory {
    fn identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        Ok(self.read(path_of(&at.location)).map(|b| hash_of(&b)))
    }

    fn local_copy(&self, at: &Declared) -> Result<PathBuf, StoreError> {
        let bytes = self
            .read(path_of(&at.location))
            .ok_or_else(|| StoreError::Other("no such file".to_owned()))?;
        let mut copies = self.copies.lock().unwrap();
        *copies += 1;
        let copy = self.scratch.join(format!("copy-{copies}"));
        std::fs::write(&copy, bytes).unwrap();
        Ok(copy)
    }

    fn commit(&self, outputs: &[Staged], _run: &str) -> Result<Vec<ContentHash>, StoreError> {
        let mut hashes = Vec::new();
        for staged in outputs {
            let bytes = std::fs::read(staged.from).map_err(|e| StoreError::Other(e.to_string()))?;
            hashes.push(hash_of(&bytes));
            self.set(path_of(&staged.to.location), &bytes);
        }
        Ok(hashes)
    }

    fn baseline(&self, _at: &Declared, _recorded: Option<&str>) -> Baseline {
        Baseline::None
    }

    fn commit_version(
        &self,
        _staged: Staged,
        _versioning: &Versioning,
        _meta: versions::MetaInput,
        _run: &str,
    ) -> Result<Version, StoreError> {
        Err(StoreError::Other("no versions in memory".to_owned()))
    }

    fn version_identity(&self, _at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        Ok(None)
    }

    fn latest_version(&self, _at: &Declared) -> Option<PathBuf> {
        None
    }

    fn get(&self, at: &Location) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read(path_of(at)))
    }

    fn put(&self, at: &Location, bytes: &[u8]) -> Result<(), StoreError> {
        self.set(path_of(at), bytes);
        Ok(())
    }

    fn create(&self, at: &Location, bytes: &[u8]) -> Result<bool, StoreError> {
        let mut files = self.files.lock().unwrap();
        if files.contains_key(path_of(at)) {
            return Ok(false);
        }
        files.insert(path_of(at).to_path_buf(), bytes.to_vec());
        Ok(true)
    }
}

struct Quiet;

impl Events for Quiet {
    fn event(&self, _event: Event) {}
}

/// `a` upper-cases `data/in.txt`; `b` counts the bytes of what `a` wrote.
const PIPELINE: &str = r#"
stages:
  a:
    cmd: tr a-z A-Z < {{ inputs.src }} > {{ outputs.up }}
    inputs: {src: data/in.txt}
    outputs: {up: out/a.txt}
  b:
    cmd: wc -c < {{ inputs.up }} | tr -d ' ' > {{ outputs.n }}
    inputs: {up: out/a.txt}
    outputs: {n: out/b.txt}
"#;

struct Fixture {
    _work: tempfile::TempDir,
    workdir: PathBuf,
    dag: Arc<Dag>,
    store: Arc<Memory>,
}

fn fixture(yaml: &str) -> Fixture {
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().canonicalize().unwrap();
    let scratch = workdir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    Fixture {
        dag: load(&workdir, yaml),
        store: Arc::new(Memory::new(&scratch)),
        _work: work,
        workdir,
    }
}

/// `yaml` as the workdir's `pipeline.yaml`, loaded into its graph.
fn load(workdir: &Path, yaml: &str) -> Arc<Dag> {
    let file = workdir.join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    let registry = imba_stages::Registry::standard();
    let (_, loaded) = imba::config::load(&file, &Default::default(), &registry);
    let pipeline = loaded.expect("a valid pipeline");
    let options = BuildOptions {
        check_sources: false,
        ..BuildOptions::default()
    };
    Arc::new(dag::build(pipeline, options).expect("a valid graph"))
}

impl Fixture {
    fn at(&self, path: &str) -> PathBuf {
        self.workdir.join(path)
    }

    /// Runs every stage; each stage's name and decision, in order.
    fn run(&self) -> Vec<(String, String)> {
        let (_stop_tx, stop) = tokio::sync::watch::channel(imba::interrupt::Stop::Go);
        let options = RunOptions {
            jobs: 2,
            budget: imba::run::admit::Budget::machine(),
            selection: Selection::default(),
            keep_going: false,
            no_wait: false,
            stop,
            remote: Default::default(),
            restore_only: false,
        };
        let store = self.store.clone();
        let summary = run::run_with(
            self.dag.clone(),
            imba_stages::Registry::standard(),
            options,
            Arc::new(Quiet),
            move |_| store as Arc<dyn Store>,
        )
        .expect("the run starts");
        summary
            .record
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.decision.to_string()))
            .collect()
    }

    /// Why each stage is stale now, by the static plan.
    fn reasons(&self) -> Vec<(String, Vec<Reason>)> {
        let state = imba::state::StateDir::new(&self.workdir);
        let lock = imba::state::lock::load_for_run(
            &imba::state::lock::lock_path(&self.dag.pipeline().file),
            &state,
            |_| {},
        )
        .unwrap();
        let all = (0..self.dag.pipeline().stages.len()).collect();
        plan::static_plan(
            &self.dag,
            &lock,
            &*self.store,
            None,
            &all,
            &Default::default(),
        )
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.reasons))
        .collect()
    }
}

fn decisions(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn the_scheduler_runs_what_changed_and_cuts_off_what_came_out_the_same() {
    let f = fixture(PIPELINE);
    let input = f.at("data/in.txt");
    f.store.set(&input, b"abc");
    assert_eq!(f.run(), decisions(&[("a", "ran"), ("b", "ran")]));
    assert_eq!(f.store.read(&f.at("out/a.txt")).unwrap(), b"ABC");
    assert_eq!(f.store.read(&f.at("out/b.txt")).unwrap(), b"3\n");

    assert_eq!(f.run(), decisions(&[("a", "skipped"), ("b", "skipped")]));

    f.store.set(&input, b"abcd");
    assert_eq!(f.run(), decisions(&[("a", "ran"), ("b", "ran")]));
    assert_eq!(f.store.read(&f.at("out/b.txt")).unwrap(), b"4\n");

    // Other input, same upper-cased output: `b` is up to date (early cutoff).
    f.store.set(&input, b"ABCD");
    assert_eq!(f.run(), decisions(&[("a", "ran"), ("b", "skipped")]));

    // An output gone: only its stage comes back, from the run cache (through this store's
    // commit, as a computed output would).
    f.store.remove(&f.at("out/b.txt"));
    assert_eq!(f.run(), decisions(&[("a", "skipped"), ("b", "restored")]));
    assert_eq!(f.store.read(&f.at("out/b.txt")).unwrap(), b"4\n");

    // The source gone: `a` fails, `b` never starts.
    f.store.remove(&input);
    assert_eq!(f.run(), decisions(&[("a", "failed"), ("b", "blocked")]));
}

#[test]
fn reasons_say_exactly_what_changed() {
    let f = fixture(PIPELINE);
    let input = f.at("data/in.txt");
    f.store.set(&input, b"abc");
    let reasons = f.reasons();
    assert_eq!(reasons[0].1, [Reason::NeverRun]);
    assert_eq!(
        reasons[1].1,
        [
            Reason::Upstream {
                stage: "a".to_owned()
            },
            Reason::NeverRun
        ],
        "an input an upstream stage is about to write is not missing"
    );
    f.run();
    assert!(f.reasons().iter().all(|(_, r)| r.is_empty()));

    f.store.set(&input, b"xyz");
    assert_eq!(
        f.reasons(),
        vec![
            (
                "a".to_owned(),
                vec![Reason::InputChanged {
                    path: "data/in.txt".to_owned()
                }]
            ),
            (
                "b".to_owned(),
                vec![Reason::Upstream {
                    stage: "a".to_owned()
                }]
            ),
        ]
    );
    f.run();

    f.store.set(&f.at("out/a.txt"), b"edited by hand");
    f.store.remove(&f.at("out/b.txt"));
    assert_eq!(
        f.reasons(),
        vec![
            (
                "a".to_owned(),
                vec![Reason::OutputModified {
                    path: "out/a.txt".to_owned()
                }]
            ),
            (
                "b".to_owned(),
                vec![
                    Reason::Upstream {
                        stage: "a".to_owned()
                    },
                    Reason::OutputMissing {
                        path: "out/b.txt".to_owned()
                    }
                ]
            ),
        ]
    );

    f.store.remove(&input);
    let reasons = f.reasons();
    assert_eq!(
        reasons[0].1,
        [
            Reason::InputMissing {
                path: "data/in.txt".to_owned()
            },
            Reason::OutputModified {
                path: "out/a.txt".to_owned()
            }
        ]
    );
}

#[test]
fn a_changed_var_is_named_with_its_old_and_new_value() {
    let mut f = fixture(
        r#"
vars: {n: 3}
stages:
  head:
    cmd: head -c {{ params.n }} < {{ inputs.src }} > {{ outputs.out }}
    params: {n: "{{ n }}"}
    inputs: {src: data/in.txt}
    outputs: {out: out/head.txt}
"#,
    );
    f.store.set(&f.at("data/in.txt"), b"abcdef");
    f.run();
    let edited = std::fs::read_to_string(f.at("pipeline.yaml"))
        .unwrap()
        .replace("n: 3", "n: 4");
    f.dag = load(&f.workdir, &edited);
    assert_eq!(
        f.reasons()[0].1,
        // The var is named: not the command and the param it renders into.
        [Reason::VarChanged {
            name: "n".to_owned(),
            old: serde_json::json!(3),
            new: serde_json::json!(4),
        }]
    );
    assert_eq!(f.run(), decisions(&[("head", "ran")]));
    assert_eq!(f.store.read(&f.at("out/head.txt")).unwrap(), b"abcd");
}

/// A run-cache entry is found by fingerprint, and a built-in's implementation version is part of
/// it: an entry computed by another implementation of the stage never matches. (One from
/// another imba release line never matches either: `store::cache`'s own tests.)
#[test]
fn an_entry_of_another_implementation_version_never_matches() {
    let f = fixture(
        "stages:\n  agg:\n    uses: aggregate\n    inputs: {orders: data/o.parquet}\n    outputs: {table: out/t.parquet}\n    params:\n      by: [user_id]\n      aggs:\n        n: {count: user_id}\n",
    );
    f.store.set(&f.at("data/o.parquet"), b"not read here");
    let stage = f.dag.stage(0).clone();
    let now = plan::snapshot(&stage, &f.workdir, &*f.store).unwrap();
    let cache = imba::store::RunCache::new(f.workdir.join(".imba/cache"));
    let entry = imba::store::cache::Entry {
        format: imba::store::cache::ENTRY_FORMAT,
        imba: imba::store::cache::release_line(),
        fingerprint: now.fingerprint.clone(),
        stage: "agg".to_owned(),
        created_at: "2026-12-03T00:00:00Z".to_owned(),
        duration_ms: 1,
        outputs: BTreeMap::new(),
        reported_checks: Vec::new(),
        checks: Vec::new(),
        report: serde_json::Value::Null,
    };
    cache.put_entry(&entry).unwrap();
    assert!(cache.entry(&now.fingerprint).is_some());

    let mut other = stage.clone();
    let imba::model::StageKind::Builtin { version, .. } = &mut other.kind else {
        panic!("a built-in stage")
    };
    *version += 1;
    let then = plan::snapshot(&other, &f.workdir, &*f.store).unwrap();
    assert_ne!(then.fingerprint, now.fingerprint);
    assert!(cache.entry(&then.fingerprint).is_none());
    assert!(plan::from_cache(&other, &then, &cache, &*f.store, &f.workdir).is_none());
}
