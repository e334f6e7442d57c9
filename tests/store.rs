//! The `Store` contract, checked the same way against both implementations: local files in a
//! temporary workdir, and S3 on the in-process s3s server. Each check runs through
//! `imba::store::Stores`, the router every caller uses, with a location of each scheme.

#[path = "common/s3.rs"]
mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use imba::model::{Declared, Versioning};
use imba::store::{versions::MetaInput, Baseline, Staged, StatCache, Store, Stores};
use s3::S3Server;

/// Both stores over one workdir, S3 on `server`.
struct Fixture {
    _work: tempfile::TempDir,
    workdir: PathBuf,
    stores: Stores,
}

fn fixture(server: &S3Server) -> Fixture {
    static CREDENTIALS: std::sync::Once = std::sync::Once::new();
    CREDENTIALS.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
    });
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().canonicalize().unwrap();
    let storage = imba::store::s3::Storage::new(
        imba::model::StorageSettings {
            endpoint: Some(server.endpoint.clone()),
            ..Default::default()
        },
        workdir.join(".imba/cache"),
    );
    let stores = Stores::new(&workdir, StatCache::in_memory(), storage);
    Fixture {
        _work: work,
        workdir,
        stores,
    }
}

/// A location of each scheme for the same relative name.
fn places(fixture: &Fixture, name: &str) -> Vec<Declared> {
    let dir = name.ends_with('/');
    vec![
        Declared::parse(&format!("out/{name}"), &fixture.workdir).unwrap(),
        Declared::parse(&format!("s3://{}/out/{name}", s3::BUCKET), &fixture.workdir).unwrap(),
    ]
    .into_iter()
    .inspect(|d| assert_eq!(d.dir, dir))
    .collect()
}

fn staged_file(fixture: &Fixture, name: &str, bytes: &[u8]) -> PathBuf {
    let path = fixture.workdir.join(".imba/staging").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn staged_dir(fixture: &Fixture, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = fixture.workdir.join(".imba/staging").join(name);
    for (file, bytes) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    dir
}

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = walkdir(dir)
        .into_iter()
        .filter(|(name, _)| !name.starts_with('_'))
        .collect();
    files.sort();
    files
}

fn walkdir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for (name, bytes) in walkdir(&path) {
                out.push((
                    format!("{}/{name}", path.file_name().unwrap().to_string_lossy()),
                    bytes,
                ));
            }
        } else {
            out.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn nothing_is_there_before_a_commit() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    for at in places(&fixture, "absent.txt")
        .into_iter()
        .chain(places(&fixture, "absent/"))
    {
        let shown = at.location.display(&fixture.workdir);
        assert_eq!(fixture.stores.identity(&at).unwrap(), None, "{shown}");
        assert_eq!(
            fixture.stores.committed_identity(&at).unwrap(),
            None,
            "{shown}"
        );
        assert_eq!(
            fixture.stores.baseline(&at, None),
            Baseline::None,
            "{shown}"
        );
    }
}

#[test]
fn a_committed_file_reads_back_as_written_and_its_identity_follows_its_content() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    for at in places(&fixture, "table.csv") {
        let shown = at.location.display(&fixture.workdir);
        let from = staged_file(&fixture, "a/table.csv", b"a,b\n1,2\n");
        let staged = [Staged {
            from: &from,
            to: &at,
            shown: &shown,
        }];
        let hashes = fixture.stores.commit(&staged, "run-1").unwrap();
        assert_eq!(hashes.len(), 1);
        let identity = fixture.stores.identity(&at).unwrap().expect("committed");
        assert_eq!(
            identity.hash, hashes[0].hash,
            "{shown}: commit and identity agree"
        );
        assert_eq!(identity.size, 8, "{shown}");
        let copy = fixture.stores.local_copy(&at).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"a,b\n1,2\n", "{shown}");
        fixture.stores.verify_copy(&at, &copy).unwrap();
        assert_eq!(
            fixture.stores.baseline(&at, Some(&identity.hash)),
            Baseline::Found(copy.clone()),
            "{shown}"
        );

        // Other bytes: another identity; the same bytes again: the same one.
        let from = staged_file(&fixture, "b/table.csv", b"a,b\n1,3\n");
        let staged = [Staged {
            from: &from,
            to: &at,
            shown: &shown,
        }];
        let changed = fixture.stores.commit(&staged, "run-2").unwrap();
        assert_ne!(changed[0].hash, identity.hash, "{shown}");
        let from = staged_file(&fixture, "c/table.csv", b"a,b\n1,3\n");
        let staged = [Staged {
            from: &from,
            to: &at,
            shown: &shown,
        }];
        let again = fixture.stores.commit(&staged, "run-3").unwrap();
        assert_eq!(again[0].hash, changed[0].hash, "{shown}");
        assert_eq!(
            std::fs::read(fixture.stores.local_copy(&at).unwrap()).unwrap(),
            b"a,b\n1,3\n",
            "{shown}"
        );
    }
}

#[test]
fn a_committed_directory_replaces_the_old_one_whole() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    for at in places(&fixture, "parts/") {
        let shown = at.location.display(&fixture.workdir);
        let from = staged_dir(
            &fixture,
            "d1/parts",
            &[("m0.csv", b"0\n"), ("m1.csv", b"1\n"), ("sub/x.txt", b"x")],
        );
        let staged = [Staged {
            from: &from,
            to: &at,
            shown: &shown,
        }];
        let first = fixture.stores.commit(&staged, "run-1").unwrap();
        let committed = fixture.stores.committed_identity(&at).unwrap();
        assert!(committed.is_some(), "{shown}: a committed directory counts");
        let copy = fixture.stores.local_copy(&at).unwrap();
        assert_eq!(
            read_all(&copy),
            vec![
                ("m0.csv".to_owned(), b"0\n".to_vec()),
                ("m1.csv".to_owned(), b"1\n".to_vec()),
                ("sub/x.txt".to_owned(), b"x".to_vec()),
            ],
            "{shown}"
        );
        // A file gone from the new version is gone from the committed one.
        let from = staged_dir(&fixture, "d2/parts", &[("m0.csv", b"zero\n")]);
        let staged = [Staged {
            from: &from,
            to: &at,
            shown: &shown,
        }];
        let second = fixture.stores.commit(&staged, "run-2").unwrap();
        assert_ne!(first[0].hash, second[0].hash, "{shown}");
        let copy = fixture.stores.local_copy(&at).unwrap();
        assert_eq!(
            read_all(&copy),
            vec![("m0.csv".to_owned(), b"zero\n".to_vec())],
            "{shown}"
        );
    }
}

#[test]
fn a_failed_commit_leaves_every_output_as_it_was() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    let ones = places(&fixture, "one.txt");
    let twos = places(&fixture, "two.txt");
    // Each scheme alone, and an S3 output (committed first) beside a local one not written.
    let pairs = [
        (&ones[0], &twos[0]),
        (&ones[1], &twos[1]),
        (&ones[1], &twos[0]),
    ];
    for (first, second) in pairs {
        let shown = first.location.display(&fixture.workdir);
        let old = staged_file(&fixture, "old/one.txt", b"old");
        fixture
            .stores
            .commit(
                &[Staged {
                    from: &old,
                    to: first,
                    shown: &shown,
                }],
                "run-1",
            )
            .unwrap();
        // The second output was never written: nothing is committed, the first stays old.
        let new = staged_file(&fixture, "new/one.txt", b"new");
        let missing = fixture.workdir.join(".imba/staging/new/two.txt");
        let error = fixture
            .stores
            .commit(
                &[
                    Staged {
                        from: &new,
                        to: first,
                        shown: &shown,
                    },
                    Staged {
                        from: &missing,
                        to: second,
                        shown: "two.txt",
                    },
                ],
                "run-2",
            )
            .unwrap_err();
        assert!(error.to_string().contains("two.txt"), "{shown}: {error}");
        let copy = fixture.stores.local_copy(first).unwrap();
        assert_eq!(std::fs::read(copy).unwrap(), b"old", "{shown}");
        assert_eq!(fixture.stores.identity(second).unwrap(), None, "{shown}");
    }
}

#[test]
fn small_objects_are_created_once_and_replaced_whole() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    for at in places(&fixture, "cache/entry.json") {
        let at = at.location;
        let shown = at.display(&fixture.workdir);
        assert_eq!(fixture.stores.get(&at).unwrap(), None, "{shown}");
        assert!(fixture.stores.create(&at, b"first").unwrap(), "{shown}");
        assert!(!fixture.stores.create(&at, b"second").unwrap(), "{shown}");
        assert_eq!(
            fixture.stores.get(&at).unwrap().as_deref(),
            Some(&b"first"[..])
        );
        fixture.stores.put(&at, b"third").unwrap();
        assert_eq!(
            fixture.stores.get(&at).unwrap().as_deref(),
            Some(&b"third"[..])
        );
    }
}

/// Locally, `link(2)` decides. In S3 the server does (`If-None-Match: *`, which AWS and MinIO
/// apply atomically); s3s-fs, the test server, checks and writes in two steps, so that two
/// racing creates can both succeed there: this contract is checked on the local store, and in
/// S3 one create after another (above).
#[test]
fn of_many_creating_the_same_object_at_once_exactly_one_wins() {
    let server = S3Server::start();
    let fixture = Arc::new(fixture(&server));
    let at = places(&fixture, "claims/v1").remove(0).location;
    let winners: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let fixture = fixture.clone();
                let at = at.clone();
                scope.spawn(move || {
                    fixture
                        .stores
                        .create(&at, format!("writer {i}").as_bytes())
                        .unwrap() as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(winners, 1);
    let content = fixture.stores.get(&at).unwrap().unwrap();
    assert!(content.starts_with(b"writer "), "written whole");
}

#[test]
fn a_version_is_reused_for_the_same_content_and_new_for_other_content() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    let meta = |fixture: &Fixture| MetaInput {
        pipeline: "pipeline.yaml".to_owned(),
        stage: "features".to_owned(),
        fingerprint: "f".to_owned(),
        inputs: serde_json::json!({}),
        params: serde_json::json!({"k": 1}),
        report: serde_json::Value::Null,
        workdir: fixture.workdir.clone(),
        vars: serde_json::Value::Null,
        restored: None,
    };
    for at in places(&fixture, "features/") {
        let shown = at.location.display(&fixture.workdir);
        assert_eq!(
            fixture.stores.version_identity(&at).unwrap(),
            None,
            "{shown}"
        );
        let mut numbers = Vec::new();
        // Back to the first content: the first version again, never a duplicate; then back to
        // the second with `keep: 1`, which archives the first and keeps the one LATEST names.
        for (run, content, keep) in [
            ("r1", "a", None),
            ("r2", "a", None),
            ("r3", "b", None),
            ("r4", "a", None),
            ("r5", "b", Some(1)),
        ] {
            let versioning = Versioning { keep };
            let from = staged_dir(
                &fixture,
                &format!("{run}/{shown}"),
                &[("features.csv", content.as_bytes())],
            );
            let version = fixture
                .stores
                .commit_version(
                    Staged {
                        from: &from,
                        to: &at,
                        shown: &shown,
                    },
                    &versioning,
                    meta(&fixture),
                    run,
                )
                .unwrap();
            assert_eq!(
                fixture
                    .stores
                    .version_identity(&at)
                    .unwrap()
                    .map(|h| h.hash),
                Some(version.hash.hash.clone()),
                "{shown}: the latest version is what the lock records"
            );
            numbers.push((version.number, version.reused));
            let latest = fixture
                .stores
                .latest_version(&at)
                .expect("a latest version");
            assert_eq!(
                std::fs::read(latest.join("features.csv")).unwrap(),
                content.as_bytes(),
                "{shown} after {run}"
            );
        }
        assert_eq!(
            numbers,
            [(1, false), (1, true), (2, false), (1, false), (2, false)],
            "{shown}"
        );
        let latest = fixture
            .stores
            .latest_version(&at)
            .expect("a latest version");
        assert_eq!(
            std::fs::read(latest.join("features.csv")).unwrap(),
            b"b",
            "{shown}"
        );
    }
}

#[test]
fn a_location_of_the_other_scheme_is_refused_by_each_store() {
    let server = S3Server::start();
    let fixture = fixture(&server);
    let [local, remote] = <[Declared; 2]>::try_from(places(&fixture, "x.txt")).unwrap();
    assert!(fixture.stores.local.identity(&remote).is_err());
    assert!(fixture.stores.s3.identity(&local).is_err());
}
