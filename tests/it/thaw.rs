//! Restore through cold storage classes (docs/restore.md, "Cold storage classes").
//!
//! The real binary against moto, which keeps each object's class and implements RestoreObject:
//! GetObject of a DEEP_ARCHIVE object answers InvalidObjectState until RestoreObject (202), then
//! HEAD carries `x-amz-restore` and GetObject works. moto thaws at once, so the thaw that is still
//! running — what a rerun within the 48 hours of a bulk thaw meets — is tested through the library,
//! against the in-memory store, whose thaws end only when the test says so.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nightcopy::commands::restore::{
    restore, RestoreOptions, RestoreReport, RestoreStats, ThawOptions,
};
use nightcopy::config::StorageClass;
use nightcopy::report::{Ending, Outcome};
use nightcopy::snapshot::{self, Counts, Entry, Header, Kind, Writer};
use nightcopy::store::memory::{MemoryStore, Object, Op, ThawAsked};
use nightcopy::store::{ArchiveTier, ObjectMeta, ThawTier};
use sha2::{Digest, Sha256};

use crate::common::proxy::Op as Http;
use crate::common::run::{pseudo_random, Case, Output};
use crate::common::s3::moto_s3;

/// The restore's summary line.
fn summary(out: &Output) -> &str {
    out.stderr
        .lines()
        .rev()
        .find(|l| l.contains("restore ") && l.contains(" listed"))
        .unwrap_or_else(|| panic!("no summary line in:\n{}", out.stderr))
}

/// A DEEP_ARCHIVE object through the three runs an operator makes: without `--thaw` it is named,
/// counted and not downloaded (exit 2, nothing asked of S3); with `--thaw` exactly one
/// RestoreObject is sent and the restore ends with exit 5; the rerun downloads it, byte for byte,
/// and asks for no second thaw. What was readable is restored at the first run and kept after.
#[test]
fn a_deep_archive_object_is_named_then_thawed_once_then_restored_on_the_rerun() {
    let server = moto_s3();
    let mut c = Case::on(server, server.versioned_dest("thaw"));
    let cold = pseudo_random(200 * 1024, 7);
    c.write("warm.txt", b"small files stay in STANDARD");
    c.write("deep/cold.bin", &cold);
    // DEEP_ARCHIVE's default small-files rule keeps files under 189 KiB in STANDARD.
    c.destination_extra = "  storage-class: DEEP_ARCHIVE\n".into();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let to = c.root.join("restored");
    let to_arg = to.to_str().unwrap();
    let thaws = |c: &Case| c.count(Http::RestoreObject);

    // What a dry run says: the class, the bytes, and a price.
    let dry = c.run(&["restore", "--to", to_arg, "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stderr.contains(
            "cold storage under the path: 1 objects in DEEP_ARCHIVE (200.0 KiB; bulk thaw \
             within 48 hours, under $0.01)"
        ),
        "{}",
        dry.stderr
    );
    assert!(
        summary(&dry).contains("; cold storage under the path: DEEP_ARCHIVE 1 objects (200.0 KiB"),
        "{}",
        summary(&dry)
    );
    assert!(!to.exists(), "a dry run writes nothing");

    // Without --thaw: named, counted, not downloaded, no thaw asked for; exit 2.
    let before = c.count(Http::GetObject);
    let out = c.run(&["restore", "--to", to_arg]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let named: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("deep/cold.bin: not restored: archived in a cold storage class"))
        .collect();
    assert_eq!(named.len(), 1, "{}", out.stderr);
    assert!(named[0].contains("rerun with --thaw"), "{}", named[0]);
    let line = summary(&out);
    assert!(line.contains("1 files restored"), "{line}");
    assert!(line.contains("1 errors"), "{line}");
    assert!(
        line.contains(
            "1 cold objects (200.0 KiB) need a thaw (not restored; --thaw asks S3 for it)"
        ),
        "{line}"
    );
    assert_eq!(
        fs::read(to.join("warm.txt")).unwrap(),
        b"small files stay in STANDARD"
    );
    assert!(!to.join("deep/cold.bin").exists());
    assert_eq!(
        c.count(Http::GetObject) - before,
        2,
        "one GET each, the cold one refused and not retried"
    );
    assert_eq!(thaws(&c), 0);

    // --thaw: one RestoreObject, exit 5, what was there kept.
    let out = c.run(&["restore", "--to", to_arg, "--thaw"]);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert_eq!(thaws(&c), 1);
    let line = summary(&out);
    assert!(
        line.starts_with("restore waits for thaws") || line.contains("restore waits for thaws"),
        "{line}"
    );
    assert!(
        line.contains(
            "1 cold objects (200.0 KiB) need a thaw: 1 thaw requests sent, 0 already thawing"
        ),
        "{line}"
    );
    assert!(line.contains("1 already there"), "{line}");
    assert!(line.contains(" 0 errors"), "{line}");
    assert!(
        out.stderr.contains(
            "deep/cold.bin: in DEEP_ARCHIVE, thaw requested (bulk tier, readable for 7 days)"
        ),
        "{}",
        out.stderr
    );
    let request = server
        .requests(&c.dest)
        .into_iter()
        .find(|r| r.op == Http::RestoreObject)
        .unwrap();
    assert_eq!(request.key, c.key("deep/cold.bin"));
    // The thaw is of the version the snapshot names.
    assert!(request.query_param("versionId").is_some(), "{request:?}");
    assert!(!to.join("deep/cold.bin").exists());

    // The rerun: the object is thawed (moto does it at once), downloaded byte for byte, and no
    // second thaw is asked for.
    let out = c.run(&["restore", "--to", to_arg, "--thaw"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(thaws(&c), 1, "no second thaw request");
    let line = summary(&out);
    assert!(
        line.starts_with("restore finished") || line.contains("restore finished:"),
        "{line}"
    );
    assert!(line.contains("1 files restored"), "{line}");
    assert!(!line.contains("cold objects"), "{line}");
    assert_eq!(fs::read(to.join("deep/cold.bin")).unwrap(), cold);
    c.assert_no_delete();
}

// ---- the thaw that is still running: through the library, against the in-memory store ----

const T1: i64 = 1_700_000_000_111_111_111;

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

fn meta() -> ObjectMeta {
    ObjectMeta {
        mtime_ns: T1,
        mode: 0o100640,
        uid: 0,
        gid: 0,
        raw_path: None,
    }
}

fn file(path: &str, body: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::File,
        mode: 0o100640,
        uid: 0,
        gid: 0,
        mtime_ns: T1,
        size: body.len() as u64,
        key: Some(path.into()),
        sha256: Some(hex::encode(Sha256::digest(body))),
        version: None,
        stale: false,
        link: None,
        rdev: None,
        extents: None,
        xattrs: None,
        xattrs_dropped: false,
    }
}

/// A snapshot of `files` in the store, with their objects below `p/`.
fn bucket(state: &Path, files: &[(&str, &[u8])]) -> MemoryStore {
    let store = MemoryStore::default();
    for (path, body) in files {
        store.insert(
            &format!("p/{path}"),
            Object::new(body.to_vec(), Some(&meta())),
        );
    }
    fs::create_dir_all(state).unwrap();
    let dir = nightcopy::fsutil::Dir::open(state).unwrap();
    let mut w = Writer::create(&dir).unwrap();
    for (path, body) in files {
        w.push(&file(path, body)).unwrap();
    }
    let started = 1_796_522_400;
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
    store.insert(&snapshot::object_key("p/", &id), Object::new(bytes, None));
    store
}

/// One restore through the library, and how it would end.
fn restore_with(
    store: &Arc<MemoryStore>,
    state: &Path,
    to: &Path,
    thaw: ThawOptions,
) -> (nightcopy::commands::restore::RestoreFigures, Ending) {
    let stats = Arc::new(RestoreStats::default());
    let opts = RestoreOptions {
        to: to.to_owned(),
        thaw,
        ..Default::default()
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(restore(&config(state), &opts, store.clone(), stats.clone()))
        .unwrap();
    let report = RestoreReport {
        figures: stats.snapshot(Duration::ZERO),
        snapshot: None,
        to: to.to_owned(),
        dry_run: false,
        error: None,
    };
    (report.figures.clone(), report.ending())
}

#[test]
fn a_rerun_while_the_thaw_runs_asks_for_none_and_ends_thawing_again() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let to = tmp.path().join("restored");
    let (a, b, w) = (
        b"deep bytes".as_slice(),
        b"glacier bytes!".as_slice(),
        b"warm".as_slice(),
    );
    let store = Arc::new(bucket(&state, &[("a", a), ("b", b), ("w", w)]));
    store.freeze("p/a", StorageClass::DeepArchive, None);
    store.freeze("p/b", StorageClass::Glacier, None);
    let thaw = ThawOptions {
        request: true,
        ..Default::default()
    };

    // First run: the readable file restored, both cold ones asked for once.
    let (g, ending) = restore_with(&store, &state, &to, thaw);
    assert_eq!(ending, Ending::Thawing);
    assert_eq!(ending.exit_code(), 5);
    assert_eq!((g.restored, g.errors), (1, 0), "{g:?}");
    assert_eq!(
        (g.thaw.cold, g.thaw.cold_bytes),
        (2, (a.len() + b.len()) as u64),
        "{g:?}"
    );
    assert_eq!((g.thaw.thaw_requests, g.thaw.thawing), (2, 0), "{g:?}");
    let listed: Vec<(&str, u64, u64)> = g
        .thaw
        .cold_listed
        .iter()
        .map(|c| (c.class.as_str(), c.objects, c.bytes))
        .collect();
    assert_eq!(
        listed,
        [
            ("GLACIER", 1, b.len() as u64),
            ("DEEP_ARCHIVE", 1, a.len() as u64)
        ]
    );
    assert_eq!(fs::read(to.join("w")).unwrap(), w);
    assert!(!to.join("a").exists() && !to.join("b").exists());
    assert_eq!(store.count(Op::RestoreObject), 2);
    // Downloads run side by side: the requests come in any order.
    let mut asked: Vec<(String, Option<u32>, ThawTier)> = store
        .thaw_requests()
        .into_iter()
        .map(|t: ThawAsked| (t.key, t.days, t.tier))
        .collect();
    asked.sort();
    assert_eq!(
        asked,
        [
            ("p/a".to_owned(), Some(7), ThawTier::Bulk),
            ("p/b".to_owned(), Some(7), ThawTier::Bulk)
        ]
    );

    // A rerun while both thaws run: seen on the HEAD, nothing asked again, exit 5 again.
    let (g, ending) = restore_with(&store, &state, &to, thaw);
    assert_eq!(ending, Ending::Thawing);
    assert_eq!((g.restored, g.existing, g.errors), (0, 1, 0), "{g:?}");
    assert_eq!((g.thaw.thaw_requests, g.thaw.thawing), (0, 2), "{g:?}");
    assert_eq!(store.count(Op::RestoreObject), 2, "no second request");

    // One thaw done: that file comes back, the other is still waited for.
    store.finish_thaw("p/a");
    let (g, ending) = restore_with(&store, &state, &to, thaw);
    assert_eq!(ending, Ending::Thawing);
    assert_eq!(
        (g.restored, g.thaw.thaw_requests, g.thaw.thawing),
        (1, 0, 1),
        "{g:?}"
    );
    assert_eq!(fs::read(to.join("a")).unwrap(), a);

    // Both done: the restore is complete, and no thaw was ever asked for twice.
    store.finish_thaw("p/b");
    let (g, ending) = restore_with(&store, &state, &to, thaw);
    assert_eq!(ending, Ending::SUCCESS);
    assert_eq!(
        (g.restored, g.existing, g.thaw.cold, g.errors),
        (1, 2, 0, 0),
        "{g:?}"
    );
    assert_eq!(fs::read(to.join("b")).unwrap(), b);
    assert_eq!(store.count(Op::RestoreObject), 2);
}

#[test]
fn without_thaw_a_cold_object_is_a_file_error_and_no_thaw_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let to = tmp.path().join("restored");
    let store = Arc::new(bucket(&state, &[("a", b"deep"), ("w", b"warm")]));
    store.freeze("p/a", StorageClass::DeepArchive, None);
    let (g, ending) = restore_with(&store, &state, &to, ThawOptions::default());
    assert_eq!(ending, Ending::Ran(Outcome::FileErrors));
    assert_eq!((g.restored, g.errors, g.thaw.cold), (1, 1, 1), "{g:?}");
    assert_eq!((g.thaw.thaw_requests, g.thaw.thawing), (0, 0), "{g:?}");
    assert_eq!(store.count(Op::RestoreObject), 0);
    assert_eq!(
        store.count(Op::Head),
        0,
        "nothing is looked up without --thaw"
    );
    // The GET was refused once, not retried as a failed download.
    assert_eq!(store.count(Op::Get), 3, "the snapshot, w, and a once");
}

/// The tier asked for is the one the class has: DEEP_ARCHIVE (and Intelligent-Tiering's Deep
/// Archive Access) has no expedited tier, so gets standard; an Intelligent-Tiering object takes
/// no days; `--thaw-days` is passed on.
#[test]
fn each_object_is_asked_for_at_the_tier_its_class_has() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let to = tmp.path().join("restored");
    let files: &[(&str, &[u8])] = &[("d", b"1"), ("g", b"22"), ("i", b"333"), ("j", b"4444")];
    let store = Arc::new(bucket(&state, files));
    store.freeze("p/d", StorageClass::DeepArchive, None);
    store.freeze("p/g", StorageClass::Glacier, None);
    store.freeze(
        "p/i",
        StorageClass::IntelligentTiering,
        Some(ArchiveTier::DeepArchiveAccess),
    );
    store.freeze(
        "p/j",
        StorageClass::IntelligentTiering,
        Some(ArchiveTier::ArchiveAccess),
    );
    let thaw = ThawOptions {
        request: true,
        tier: ThawTier::Expedited,
        days: 3,
    };
    let (g, ending) = restore_with(&store, &state, &to, thaw);
    assert_eq!(ending, Ending::Thawing);
    assert_eq!((g.thaw.cold, g.thaw.thaw_requests), (4, 4), "{g:?}");
    let mut asked: Vec<(String, Option<u32>, ThawTier)> = store
        .thaw_requests()
        .into_iter()
        .map(|t| (t.key, t.days, t.tier))
        .collect();
    asked.sort();
    assert_eq!(
        asked,
        [
            ("p/d".to_owned(), Some(3), ThawTier::Standard),
            ("p/g".to_owned(), Some(3), ThawTier::Expedited),
            ("p/i".to_owned(), None, ThawTier::Standard),
            ("p/j".to_owned(), None, ThawTier::Expedited),
        ]
    );
    // The listing before the downloads counts the Intelligent-Tiering objects apart: it cannot
    // tell which of them are archived.
    let listed: Vec<(&str, u64)> = g
        .thaw
        .cold_listed
        .iter()
        .map(|c| (c.class.as_str(), c.objects))
        .collect();
    assert_eq!(
        listed,
        [
            ("GLACIER", 1),
            ("DEEP_ARCHIVE", 1),
            ("INTELLIGENT_TIERING", 2)
        ]
    );
    assert!(g.thaw.cold_listed[2].thaw_usd.is_none());
}

/// The flags and the exit code are on the command line's help, and a bad tier or a thaw of no
/// days is a usage error (64) before anything is read.
#[test]
fn thaw_flags_and_exit_5_are_documented_and_checked() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nightcopy"))
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, help) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(
        help.lines()
            .any(|l| l.trim_start().starts_with("5 ") && l.contains("restore --thaw")),
        "{help}"
    );
    let (code, help) = run(&["restore", "--help"]);
    assert_eq!(code, Some(0));
    for flag in ["--thaw ", "--thaw-tier <TIER>", "--thaw-days <DAYS>"] {
        assert!(
            help.contains(flag),
            "{flag} missing from restore --help:\n{help}"
        );
    }
    for bad in [
        &["--thaw-tier", "fast"][..],
        &["--thaw-days", "0"],
        &["--thaw-days", "-1"],
    ] {
        let mut args = vec![
            "restore",
            "--to",
            "/nonexistent/x",
            "--config",
            "/nonexistent",
        ];
        args.extend_from_slice(bad);
        assert_eq!(run(&args).0, Some(64), "{bad:?}");
    }
}
