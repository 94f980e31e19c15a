//! Restore of a snapshot through the library, against the in-memory store: snapshots written by
//! hand, so that hostile ones (a symlink with a file "below" it, a path with `..`) can be given
//! too. The real binary against a real server is in `snapshots.rs`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nightcopy::commands::restore::{restore, RestoreOptions, RestoreStats};
use nightcopy::fsutil::Dir;
use nightcopy::snapshot::{self, Counts, Entry, Header, Kind, Writer};
use nightcopy::store::memory::{MemoryStore, Op};
use nightcopy::store::{Body, ObjectMeta, ObjectStore, PutRequest};
use sha2::{Digest, Sha256};

const T1: i64 = 1_700_000_000_111_111_111;
const T2: i64 = 1_700_100_000_222_222_222;

fn config(state: &Path) -> nightcopy::config::Config {
    nightcopy::config::Config::parse(
        &format!(
            "source:\n  path: /nonexistent\ndestination:\n  bucket: b-1\n  prefix: p/\n  \
             region: us-east-1\nstate-dir: {}\nmetrics:\n  cloudwatch: false\n",
            state.display()
        ),
        Path::new("test.yaml"),
    )
    .unwrap()
}

fn entry(path: &str, kind: Kind, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode,
        uid: 4242,
        gid: 4243,
        mtime_ns: T1,
        size: 0,
        key: None,
        sha256: None,
        version: None,
        stale: false,
        link: None,
        rdev: None,
        extents: None,
        xattrs: None,
        xattrs_dropped: false,
    }
}

fn file(path: &str, body: &[u8], version: Option<String>) -> Entry {
    Entry {
        size: body.len() as u64,
        key: Some(path.into()),
        sha256: Some(hex::encode(Sha256::digest(body))),
        version,
        ..entry(path, Kind::File, 0o100640)
    }
}

/// Uploads `body` at `key` below `p/` as nightcopy does; returns the version id.
async fn put(store: &MemoryStore, key: &str, body: &[u8]) -> Option<String> {
    store
        .put(PutRequest {
            key: format!("p/{key}"),
            body: Body::Bytes(body.to_vec().into()),
            sha256: Sha256::digest(body).into(),
            meta: ObjectMeta {
                mtime_ns: T2,
                mode: 0o100600,
                uid: 0,
                gid: 0,
                raw_path: None,
            },
            storage_class: None,
        })
        .await
        .unwrap()
}

/// Writes a snapshot of `entries` into the store; returns its id.
fn save(store: &MemoryStore, state: &Path, started: u64, entries: &[Entry]) -> String {
    fs::create_dir_all(state).unwrap();
    let dir = Dir::open(state).unwrap();
    let mut w = Writer::create(&dir).unwrap();
    for e in entries {
        w.push(e).unwrap();
    }
    let id =
        snapshot::new_id(std::time::UNIX_EPOCH + std::time::Duration::from_secs(started)).unwrap();
    let header = Header {
        nightcopy_snapshot: snapshot::FORMAT,
        id: id.clone(),
        destination: config(state).destination_id(),
        source: "%2Fnonexistent".into(),
        host: "h".into(),
        started,
        ended: started + 60,
        counts: Counts::default(),
        entries: 0,
        body_sha256: String::new(),
        mac: None,
    };
    w.finish(&dir, "out.gz", header, None).unwrap();
    let bytes = fs::read(state.join("out.gz")).unwrap();
    store.insert(
        &snapshot::object_key("p/", &id),
        nightcopy::store::memory::Object::new(bytes, None),
    );
    id
}

fn run(store: &Arc<MemoryStore>, state: &Path, opts: &RestoreOptions) -> Arc<RestoreStats> {
    let stats = Arc::new(RestoreStats::default());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(restore(&config(state), opts, store.clone(), stats.clone()))
        .unwrap();
    stats
}

fn mtime(m: &fs::Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

#[test]
fn a_snapshot_comes_back_as_the_tree_it_recorded_and_nothing_goes_through_its_links() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let store = MemoryStore::new(1000).keeping_versions();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (old, new) = (b"first night".as_slice(), b"second night!".as_slice());
    let v1 = rt.block_on(put(&store, "a/f", old));
    assert!(v1.is_some(), "the store keeps versions");
    rt.block_on(put(&store, "a/g", old));
    rt.block_on(put(&store, "t/x", b"through the link"));
    rt.block_on(put(&store, "gone", b"deleted before the snapshot"));
    // Changed since the snapshot: the snapshot's version must come back, not this one.
    rt.block_on(put(&store, "a/f", new));

    let dir = |p: &str, mode: u32, mtime_ns: i64| Entry {
        mtime_ns,
        ..entry(p, Kind::Dir, mode)
    };
    let link = |p: &str, kind: Kind, to: &str| Entry {
        link: Some(to.into()),
        ..entry(p, kind, 0o120777)
    };
    let hard = Entry {
        kind: Kind::Hardlink,
        link: Some("a/f".into()),
        ..file("a/g", old, v1.clone())
    };
    let entries = vec![
        dir("a", 0o40750, T1),
        file("a/f", old, v1.clone()),
        hard,
        link("a/l", Kind::Symlink, "..%2F..%2F..%2Fetc%2Fpasswd"),
        link("abs", Kind::Symlink, "%2Fetc%2Fshadow"),
        dir("e", 0o40705, T2),
        entry("fifo", Kind::Fifo, 0o10640),
        entry("sock", Kind::Socket, 0o140755),
        // Hostile: a symlink out of the target, then a file "below" it.
        link(
            "t",
            Kind::Symlink,
            &outside.display().to_string().replace('/', "%2F"),
        ),
        file("t/x", b"through the link", None),
        file("..%2Fescape", b"x", None),
    ];
    save(&store, &state, 1_765_000_000, &entries);
    let store = Arc::new(store);
    let to = tmp.path().join("restored");
    let opts = RestoreOptions {
        to: to.clone(),
        ..Default::default()
    };
    let stats = run(&store, &state, &opts);
    let g = stats.snapshot(Duration::ZERO);

    assert_eq!(
        fs::read(to.join("a/f")).unwrap(),
        old,
        "the snapshot's version"
    );
    let f = fs::symlink_metadata(to.join("a/f")).unwrap();
    let g_meta = fs::symlink_metadata(to.join("a/g")).unwrap();
    assert_eq!(f.ino(), g_meta.ino(), "a hard link, not a copy");
    assert_eq!((f.mode() & 0o7777, mtime(&f)), (0o640, T1));
    assert_eq!(
        fs::read_link(to.join("a/l")).unwrap(),
        Path::new("../../../etc/passwd")
    );
    assert_eq!(
        fs::read_link(to.join("abs")).unwrap(),
        Path::new("/etc/shadow")
    );
    let e = fs::symlink_metadata(to.join("e")).unwrap();
    assert!(e.is_dir());
    assert_eq!(
        (e.mode() & 0o7777, mtime(&e)),
        (0o705, T2),
        "an empty directory"
    );
    let a = fs::symlink_metadata(to.join("a")).unwrap();
    assert_eq!(
        (a.mode() & 0o7777, mtime(&a)),
        (0o750, T1),
        "set after its contents"
    );
    assert!(fs::symlink_metadata(to.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!to.join("sock").exists());
    assert!(!to.join("gone").exists(), "not in the snapshot");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            (a.uid(), a.gid(), f.uid(), f.gid()),
            (4242, 4243, 4242, 4243)
        );
        let l = fs::symlink_metadata(to.join("abs")).unwrap();
        assert_eq!((l.uid(), mtime(&l)), (4242, T1));
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written through the symlink"
    );
    assert!(!tmp.path().join("escape").exists());
    assert_eq!(
        (g.restored, g.errors, g.nodes, g.not_created),
        (1, 2, 5, 1),
        "{g:?}"
    );

    // Again: everything is there, nothing is downloaded, nothing changes.
    let gets = store.count(Op::Get);
    let again = run(&store, &state, &opts).snapshot(Duration::ZERO);
    assert_eq!(
        store.count(Op::Get),
        gets + 1,
        "a rerun downloads the snapshot only"
    );
    assert_eq!((again.restored, again.errors), (0, 2), "{again:?}");
    assert_eq!(fs::read(to.join("a/f")).unwrap(), old);

    // --include-deleted: every current object, the deleted one too.
    let union = tmp.path().join("union");
    let opts = RestoreOptions {
        to: union.clone(),
        include_deleted: true,
        ..Default::default()
    };
    run(&store, &state, &opts);
    assert_eq!(fs::read(union.join("a/f")).unwrap(), new);
    assert!(union.join("gone").exists());
}

#[test]
fn on_an_unversioned_bucket_a_changed_file_comes_back_newer_and_a_corrupt_one_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let store = MemoryStore::new(1000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(put(&store, "changed", b"new bytes")), None);
    rt.block_on(put(&store, "same", b"same"));
    rt.block_on(put(&store, "rotten", b"good bytes"));
    let mut rotten = store.object("p/rotten").unwrap();
    rotten.body = b"bad  bytes".to_vec().into();
    store.insert("p/rotten", rotten);
    save(
        &store,
        &state,
        1_765_000_000,
        &[
            file("changed", b"old bytes", None),
            file("rotten", b"good bytes", None),
            file("same", b"same", None),
        ],
    );
    let store = Arc::new(store);
    let to = tmp.path().join("restored");
    let opts = RestoreOptions {
        to: to.clone(),
        ..Default::default()
    };
    let g = run(&store, &state, &opts).snapshot(Duration::ZERO);
    assert_eq!((g.restored, g.newer, g.errors), (2, 1, 1), "{g:?}");
    assert_eq!(fs::read(to.join("changed")).unwrap(), b"new bytes");
    // Its metadata is the object's (the newer bytes'), not the snapshot's.
    let m = fs::metadata(to.join("changed")).unwrap();
    assert_eq!((m.mode() & 0o7777, mtime(&m)), (0o600, T2));
    assert!(!to.join("rotten").exists());
}

#[test]
fn the_snapshot_restored_is_the_latest_or_the_one_asked_for_and_a_damaged_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let store = MemoryStore::new(1000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(put(&store, "one", b"1"));
    rt.block_on(put(&store, "two", b"2"));
    let first = save(&store, &state, 1_765_000_000, &[file("one", b"1", None)]);
    let second = save(
        &store,
        &state,
        1_765_086_400,
        &[file("one", b"1", None), file("two", b"2", None)],
    );
    let store = Arc::new(store);
    let names = |to: &Path| {
        let mut v: Vec<String> = fs::read_dir(to)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let restore_to = |name: &str, opts: RestoreOptions| {
        let to = tmp.path().join(name);
        run(
            &store,
            &state,
            &RestoreOptions {
                to: to.clone(),
                ..opts
            },
        );
        names(&to)
    };
    assert_eq!(
        restore_to("latest", RestoreOptions::default()),
        ["one", "two"]
    );
    let by_id = RestoreOptions {
        snapshot: Some(first.clone()),
        ..Default::default()
    };
    assert_eq!(restore_to("by-id", by_id), ["one"]);
    // The first run ended at +60 s; the second had not started by +1 h.
    let as_of = |secs: i64| RestoreOptions {
        as_of_ns: Some(secs * 1_000_000_000),
        ..Default::default()
    };
    assert_eq!(restore_to("as-of", as_of(1_765_003_600)), ["one"]);
    assert_eq!(restore_to("as-of-2", as_of(1_765_086_460)), ["one", "two"]);

    // A snapshot whose body was altered is refused, naming its key, before anything is written.
    let key = snapshot::object_key("p/", &second);
    let mut o = store.object(&key).unwrap();
    let mut body = o.body.to_vec();
    let n = body.len();
    body[n - 12] ^= 0xff;
    o.body = body.into();
    store.insert(&key, o);
    let to = tmp.path().join("refused");
    let stats = Arc::new(RestoreStats::default());
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(restore(
            &config(&state),
            &RestoreOptions {
                to: to.clone(),
                ..Default::default()
            },
            store.clone(),
            stats,
        ))
        .unwrap_err();
    assert!(err.to_string().contains(&second), "{err}");
    assert!(!to.exists() || names(&to).is_empty());
}
