//! Every completed run writes a snapshot of the tree it walked to the bucket: the real binary on a
//! real tree, against moto in a versioned bucket (versions are what a snapshot's entries name),
//! each snapshot read back with the library's own reader. `nightcopy snapshots` lists them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nightcopy::snapshot::{self, Entry, Expected, Header, Kind};
use sha2::{Digest, Sha256};

use crate::common::proxy::{FaultKind, FaultPlan, Op};
use crate::common::run::{Case, Output};
use crate::common::s3::moto_s3;
use crate::common::sqs::queues;
use crate::common::wait::clock_past_second;
use crate::common::worker::Worker;

fn destination_id(c: &Case) -> String {
    let text = fs::read_to_string(c.config_path()).unwrap();
    nightcopy::config::Config::parse(&text, Path::new("config.yaml"))
        .unwrap()
        .destination_id()
}

/// Every snapshot under the case's prefix, oldest first, read whole and checked.
pub fn snapshots(c: &Case) -> Vec<(Header, Vec<Entry>)> {
    let folder = c.key(snapshot::DIR);
    let destination = destination_id(c);
    let expected = Expected {
        destination: &destination,
        key: None,
    };
    c.server
        .list_all_keys(&c.dest)
        .into_iter()
        .filter(|k| k.starts_with(&folder))
        .map(|k| {
            let body = c.server.get(&c.dest, &k).body;
            let mut r = snapshot::Reader::open(&body[..], &expected, snapshot::LIMITS)
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            let mut entries = Vec::new();
            while let Some(e) = r.next_entry().unwrap_or_else(|e| panic!("{k}: {e}")) {
                entries.push(e);
            }
            assert_eq!(k, c.key(&format!("{}{}.gz", snapshot::DIR, r.header.id)));
            (r.header, entries)
        })
        .collect()
}

/// A case on moto's S3, in a versioned bucket.
fn versioned_case(hint: &str) -> Case {
    Case::on(moto_s3(), moto_s3().versioned_dest(hint))
}

/// The next run starts in a later second than the last one, so that their headers' start times
/// (whole seconds) differ too (the clock itself is what is waited for).
fn next_second() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    clock_past_second(now.as_secs());
}

fn hex_sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The bytes of one version of `key` (relative to the prefix).
fn version_bytes(c: &Case, key: &str, version: &str) -> Vec<u8> {
    let client = c.server.direct_client();
    c.server.block_on(async {
        let out = client
            .get_object()
            .bucket(&c.dest.bucket)
            .key(c.key(key))
            .version_id(version)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{key} version {version}: {e:?}"));
        out.body.collect().await.unwrap().to_vec()
    })
}

/// What a path of the source is now, as an entry of a snapshot records it (without SHA-256 and
/// version).
fn as_walked(c: &Case, rel: &str, kind: Kind, link: Option<&str>) -> Entry {
    let m = fs::symlink_metadata(c.src.join(rel)).unwrap();
    let file = matches!(kind, Kind::File | Kind::Hardlink);
    Entry {
        path: rel.into(),
        kind,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        size: if file { m.size() } else { 0 },
        key: file.then(|| rel.to_owned()),
        sha256: None,
        version: None,
        stale: false,
        link: link.map(str::to_owned),
        rdev: None,
        extents: None,
        xattrs: None,
        xattrs_dropped: false,
    }
}

/// The tree of the first night: a file to change, one to delete, a directory with a file, an
/// empty directory, a symlink, a hard-link pair and a FIFO; and what its snapshot must hold.
fn first_night(c: &Case) -> Vec<Entry> {
    c.write("change.txt", b"the first night's words");
    c.write("dir/inner.txt", b"inside");
    c.write("gone.txt", b"deleted before the second night");
    c.write("hard1", b"one inode, two names");
    fs::hard_link(c.src.join("hard1"), c.src.join("hard2")).unwrap();
    c.write("keep.txt", b"never changes");
    fs::create_dir(c.src.join("empty")).unwrap();
    std::os::unix::fs::symlink("keep.txt", c.src.join("link")).unwrap();
    nix::unistd::mkfifo(
        &c.src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    // In key order: a directory sorts as "dir/".
    vec![
        as_walked(c, "change.txt", Kind::File, None),
        as_walked(c, "dir", Kind::Dir, None),
        as_walked(c, "dir/inner.txt", Kind::File, None),
        as_walked(c, "empty", Kind::Dir, None),
        as_walked(c, "fifo", Kind::Fifo, None),
        as_walked(c, "gone.txt", Kind::File, None),
        as_walked(c, "hard1", Kind::File, None),
        as_walked(c, "hard2", Kind::Hardlink, Some("hard1")),
        as_walked(c, "keep.txt", Kind::File, None),
        as_walked(c, "link", Kind::Symlink, Some("keep.txt")),
    ]
}

/// `entries` without SHA-256 and version, to compare with what the walk saw; each file's
/// SHA-256 and version checked against the bytes of that version in the bucket.
fn checked(c: &Case, entries: &[Entry], contents: &dyn Fn(&str) -> Vec<u8>) -> Vec<Entry> {
    entries
        .iter()
        .map(|e| {
            let mut bare = e.clone();
            if let Some(key) = &e.key {
                let sha = e.sha256.as_deref().expect("a file's SHA-256");
                let version = e.version.as_deref().expect("a versioned bucket's version");
                assert_eq!(sha, hex_sha(&contents(&e.path)), "{}", e.path);
                assert_eq!(hex_sha(&version_bytes(c, key, version)), sha, "{}", e.path);
            } else {
                assert_eq!((&e.sha256, &e.version), (&None, &None), "{}", e.path);
            }
            bare.sha256 = None;
            bare.version = None;
            bare
        })
        .collect()
}

fn saved_line(out: &Output, entries: usize) {
    assert!(
        out.stderr.lines().any(|l| l.contains("snapshot ")
            && l.contains(&format!(" saved: {entries} entries, "))
            && l.contains("s3://")),
        "{}",
        out.stderr
    );
}

#[test]
fn every_night_is_a_snapshot_of_the_whole_tree_naming_the_versions_that_hold_it() {
    let c = versioned_case("snapshots");
    let night1 = first_night(&c);
    let old_change = fs::read(c.src.join("change.txt")).unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    saved_line(&out, 10);
    // Recorded in the snapshot, not skipped: nothing but files becomes an object.
    assert_eq!(out.figure("special files skipped"), 0, "{}", out.stderr);
    assert_eq!(out.figure("symlinks skipped"), 0, "{}", out.stderr);

    next_second();
    fs::write(
        c.src.join("change.txt"),
        b"the second night's, longer words",
    )
    .unwrap();
    fs::remove_file(c.src.join("gone.txt")).unwrap();
    let mut night2: Vec<Entry> = night1
        .iter()
        .filter(|e| e.path != "gone.txt")
        .cloned()
        .collect();
    night2[0] = as_walked(&c, "change.txt", Kind::File, None);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    saved_line(&out, 9);
    // gone.txt's object stays in the bucket; the snapshots and the manifest's copy are not
    // files only in the bucket.
    assert_eq!(out.figure("only in the bucket"), 1, "{}", out.stderr);

    let snaps = snapshots(&c);
    assert_eq!(snaps.len(), 2, "one object per completed run");
    let (h1, e1) = &snaps[0];
    let (h2, e2) = &snaps[1];
    assert!(h1.id < h2.id && h1.started < h2.started, "{h1:?} {h2:?}");
    let now = |rel: &str| fs::read(c.src.join(rel)).unwrap();
    let then = |rel: &str| match rel {
        "change.txt" => old_change.clone(),
        "gone.txt" => b"deleted before the second night".to_vec(),
        _ => now(rel),
    };
    assert_eq!(checked(&c, e1, &then), night1);
    assert_eq!(checked(&c, e2, &now), night2);
    let version = |entries: &[Entry], path: &str| {
        entries
            .iter()
            .find(|e| e.path == path)
            .and_then(|e| e.version.clone())
            .unwrap()
    };
    assert_ne!(version(e1, "change.txt"), version(e2, "change.txt"));
    assert_eq!(
        version(e1, "keep.txt"),
        version(e2, "keep.txt"),
        "carried forward"
    );

    // The headers: what ran, and the counts.
    for h in [h1, h2] {
        assert!(h.started <= h.ended, "{h:?}");
        assert!(!h.host.is_empty());
        assert_eq!(h.source, nightcopy::keys::encode_raw_path(&c.src), "{h:?}");
    }
    let bytes = |entries: &[Entry]| -> u64 {
        entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.size)
            .sum()
    };
    let c1 = &h1.counts;
    assert_eq!(
        (
            c1.files,
            c1.dirs,
            c1.symlinks,
            c1.hardlinks,
            c1.specials,
            c1.errors
        ),
        (5, 2, 1, 1, 1, 0)
    );
    assert_eq!(c1.bytes, bytes(e1));
    assert_eq!((h2.counts.files, h2.counts.errors), (4, 0));
    assert_eq!(h2.counts.bytes, bytes(e2));

    // Listed by `nightcopy snapshots`, oldest first.
    let out = c.run(&["snapshots"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    for (line, h) in lines.iter().zip([h1, h2]) {
        let started =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(h.started));
        let ended = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(h.ended));
        let want = format!(
            "{}  {started} to {ended}  {} files  {}  0 errors  {}",
            h.id,
            h.counts.files,
            bytesize::ByteSize(h.counts.bytes).display().iec(),
            h.host
        );
        assert_eq!(*line, want);
    }
    let out = c.run(&["snapshots", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2);
    for (j, h) in json.iter().zip([h1, h2]) {
        assert_eq!(j["id"], h.id.as_str());
        assert_eq!(j["files"], h.counts.files);
        assert_eq!(j["bytes"], h.counts.bytes);
        assert_eq!(j["errors"], 0);
        assert_eq!(j["host"], h.host.as_str());
        let started =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(h.started));
        assert_eq!(j["started"], started.to_string());
    }
    c.assert_no_delete();
}

#[test]
fn a_file_this_run_could_not_back_up_is_stale_and_one_never_backed_up_is_absent() {
    let c = versioned_case("snapshot-errors");
    c.write("fine.txt", b"fine");
    c.write("x.poison", b"the first night's bytes");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (_, first) = snapshots(&c).remove(0);
    let before = first.iter().find(|e| e.path == "x.poison").unwrap().clone();

    // The second night, every PUT of a *.poison key is refused: the changed file keeps its old
    // record, and the new one has none.
    next_second();
    c.write("x.poison", b"the second night's bytes, longer");
    c.write("y.poison", b"never backed up");
    c.server.set_faults(
        &c.dest,
        Some(
            FaultPlan::new(
                1.0,
                &[FaultKind::Refuse {
                    status: 400,
                    code: "InvalidRequest",
                }],
                5,
            )
            .only(&[Op::PutObject])
            .for_key(".poison"),
        ),
    );
    let out = c.run(&["run"]);
    c.server.set_faults(&c.dest, None);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 2, "{}", out.stderr);
    saved_line(&out, 2);

    let snaps = snapshots(&c);
    assert_eq!(snaps.len(), 2);
    let (h, entries) = &snaps[1];
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["fine.txt", "x.poison"], "y.poison is absent");
    let stale = &entries[1];
    assert!(stale.stale, "{stale:?}");
    // The bytes the bucket holds for it: the first night's, with their size, mtime and version.
    assert_eq!(
        (stale.size, stale.mtime_ns, &stale.sha256, &stale.version),
        (
            before.size,
            before.mtime_ns,
            &before.sha256,
            &before.version
        )
    );
    assert_eq!(
        hex_sha(&version_bytes(
            &c,
            "x.poison",
            stale.version.as_deref().unwrap()
        )),
        hex_sha(b"the first night's bytes")
    );
    assert!(!entries[0].stale);
    assert_eq!(
        (h.counts.files, h.counts.errors),
        (2, 2),
        "the stale and the absent file"
    );
    let out = c.run(&["snapshots", "--json"]);
    let last: serde_json::Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["errors"], 2, "{}", out.stdout);
}

#[test]
fn a_dry_run_writes_no_snapshot_and_snapshots_says_there_is_none() {
    let c = versioned_case("snapshot-none");
    c.write("a.txt", b"a");
    let out = c.run(&["run", "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(snapshots(&c).is_empty());
    let left: Vec<_> = fs::read_dir(c.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("snapshot"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let out = c.run(&["snapshots"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(out.stderr.contains("no snapshot under"), "{}", out.stderr);
}

#[test]
fn a_distributed_run_s_snapshot_names_the_versions_the_coordinator_found() {
    let mut c = versioned_case("snapshot-dist");
    let q = queues("snapshot-dist");
    c.top_extra = format!(
        "guard:\n  min-interval: 0s\n{}",
        q.section(2, "3min", "30s")
    );
    for i in 0..5 {
        c.write(&format!("d/f{i}.txt"), format!("file {i}").as_bytes());
    }
    std::os::unix::fs::symlink("d/f0.txt", c.src.join("link")).unwrap();
    let mut worker = Worker::start(&c, None, 0);
    let out = c.run(&["run"]);
    worker.terminate();
    assert_eq!(worker.wait(), Some(0), "{}", worker.log());
    assert_eq!(out.code, 0, "{}\n{}", out.stderr, worker.log());
    assert_eq!(out.figure("files transferred"), 5, "{}", out.stderr);
    saved_line(&out, 7);
    let snaps = snapshots(&c);
    assert_eq!(snaps.len(), 1);
    let (h, entries) = &snaps[0];
    assert_eq!(
        (h.counts.files, h.counts.dirs, h.counts.symlinks),
        (5, 1, 1)
    );
    let now = |rel: &str| fs::read(c.src.join(rel)).unwrap();
    let bare = checked(&c, entries, &now);
    assert_eq!(bare[0].path, "d");
    assert_eq!(bare[6].link.as_deref(), Some("d/f0.txt"));
}
