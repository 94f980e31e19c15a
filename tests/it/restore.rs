//! `nightcopy restore` end to end: the real binary backs a tree up to a real S3 API server and
//! brings it back, and the two trees are compared byte for byte and metadata for metadata.
//!
//! Most tests run against s3s-fs through the counting proxy (tests/it/common). `--as-of` needs object
//! versions, which s3s-fs does not keep, so those tests run against moto (in memory, versioning,
//! but it checks no checksums), through the shared harness (`common::s3::moto_s3`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, FileTimes};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::proxy::Op;
use crate::common::run::{pseudo_random, Case, Output, AWKWARD_NAMES};
use crate::common::s3::{moto_s3, s3};
use crate::common::wait::{clock_past_second, require_root};
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};

/// One restored or original file, as compared: content hash, size, mtime (ns), permission bits,
/// owner.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileState {
    sha256: String,
    size: u64,
    mtime_ns: i64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Every regular file below `root`, keyed by its relative path as raw bytes.
fn files_of(root: &Path) -> BTreeMap<Vec<u8>, FileState> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let m = e.metadata().unwrap();
        let rel = e.path().strip_prefix(root).unwrap();
        out.insert(
            rel.as_os_str().as_bytes().to_vec(),
            FileState {
                sha256: hex::encode(Sha256::digest(fs::read(e.path()).unwrap())),
                size: m.len(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
            },
        );
    }
    out
}

fn set_mtime_ns(path: &Path, ns: u64) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_nanos(ns)))
        .unwrap();
}

fn raw_name(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

/// A figure from restore's summary line, e.g. `figure(&out, "already there")`.
fn figure(out: &Output, name: &str) -> u64 {
    crate::common::run::summary_figure(
        &out.stderr,
        |l| l.contains("restore ") && l.contains(" listed"),
        name,
    )
}

/// Leftover temp files of a restore below `root` (there must never be any).
fn temp_files(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().as_bytes();
            n.starts_with(b".nightcopy-restore-") && n.ends_with(b".part")
        })
        .map(|e| e.into_path())
        .collect()
}

/// Overwrites an object behind nightcopy's back with other bytes (same length unless `len` says
/// otherwise) and the same metadata, like a silent corruption or a tool that replaced it.
fn corrupt_object(c: &Case, rel: &str, with_sha256: bool) {
    let key = c.key(rel);
    let original = s3().get(&c.dest, &key);
    let mut bytes = original.body.clone();
    for b in bytes.iter_mut().take(64) {
        *b ^= 0x5a;
    }
    if bytes.is_empty() {
        bytes.push(1);
    }
    let client = s3().direct_client();
    s3().block_on(async {
        let mut put = client
            .put_object()
            .bucket(&c.dest.bucket)
            .key(&key)
            .set_metadata(Some(original.metadata.clone().into_iter().collect()))
            .body(ByteStream::from(bytes.clone()));
        if with_sha256 {
            put = put.checksum_sha256(base64_sha(&bytes));
        }
        put.send().await.expect("overwrite the object");
    });
    assert_ne!(
        s3().get(&c.dest, &key).body,
        original.body,
        "{key} not changed"
    );
}

fn base64_sha(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b))
}

/// Builds a mixed tree: plain, nested, awkward and non-UTF-8 names, an empty file, a multipart
/// file, modes and nanosecond mtimes (another owner has a test of its own, which needs root).
/// Returns the source's state.
fn mixed_tree(c: &Case) -> BTreeMap<Vec<u8>, FileState> {
    let more: &[(&str, &[u8])] = &[
        ("script.sh", b"#!/bin/sh\necho hi\n"),
        ("private/secret", b"0600"),
        ("readonly.txt", b"0444"),
    ];
    for (rel, body) in AWKWARD_NAMES.iter().chain(more) {
        c.write(rel, body);
    }
    c.write("big.bin", &pseudo_random(13 * 1024 * 1024 + 17, 5)); // multipart: 3 parts
    c.write("medium.bin", &pseudo_random(2 * 1024 * 1024 + 3, 6)); // streamed single PUT
    let latin1 = c.src.join(raw_name(b"caf\xe9 \x01.txt"));
    fs::write(&latin1, b"latin-1 with a control char").unwrap();
    let raw_dir = c.src.join(raw_name(b"d\xff"));
    fs::create_dir(&raw_dir).unwrap();
    fs::write(raw_dir.join("inside.txt"), b"below a non-UTF-8 directory").unwrap();

    let mode = |rel: &str, m: u32| {
        fs::set_permissions(c.src.join(rel), fs::Permissions::from_mode(m)).unwrap();
    };
    mode("script.sh", 0o750);
    mode("private/secret", 0o600);
    mode("readonly.txt", 0o444);
    // Nanosecond mtimes, all different, some in the past.
    let mut n = 0u64;
    for e in walkdir::WalkDir::new(&c.src).sort_by_file_name() {
        let e = e.unwrap();
        if e.file_type().is_file() {
            n += 1;
            set_mtime_ns(e.path(), 1_600_000_000_123_456_789 + n * 1_000_000_007);
        }
    }
    files_of(&c.src)
}

#[test]
fn a_mixed_tree_round_trips_byte_for_byte_and_metadata_for_metadata() {
    let c = Case::new("restore-mixed");
    let want = mixed_tree(&c);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), want.len() as u64);

    let before = c.ops();
    let to = c.root.join("restored");
    let to_arg = to.to_str().unwrap();
    let out = c.run(&["restore", "--to", to_arg]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(figure(&out, "files restored"), want.len() as u64);
    assert_eq!(figure(&out, "errors"), 0);
    // The manifest of this host covers every object, the multipart one too.
    assert_eq!(figure(&out, "not verifiable"), 0, "{}", out.stderr);

    let got = files_of(&to);
    let show = |m: &BTreeMap<Vec<u8>, FileState>| {
        m.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(show(&got), show(&want), "the same names, byte for byte");
    for (path, state) in &want {
        assert_eq!(&got[path], state, "{}", String::from_utf8_lossy(path));
    }
    assert!(temp_files(&to).is_empty());

    // Read-only against the bucket: the restore listed and downloaded, nothing else.
    let after = c.ops();
    let mut delta: BTreeMap<String, usize> = BTreeMap::new();
    for (op, n) in &after {
        let d = n - before.get(op).copied().unwrap_or(0);
        if d > 0 {
            delta.insert(op.clone(), d);
        }
    }
    assert_eq!(
        delta.keys().map(String::as_str).collect::<Vec<_>>(),
        ["GetObject", "ListObjectsV2"],
        "{delta:?}"
    );
    // big.bin (13 MiB, over twice the 5 MiB part size) comes down as its first GET and two
    // ranged ones.
    assert_eq!(delta["GetObject"], want.len() + 2);
    c.assert_no_delete();
}

/// A file of another owner comes back with its owner and group, mode and mtime. Only root can
/// give files away, in the source and in the restore.
#[test]
fn a_file_of_another_owner_is_restored_with_its_owner_and_group() {
    if !require_root(
        "restore::a_file_of_another_owner_is_restored_with_its_owner_and_group",
        "it gives a file to uid 1234 and gid 5678, and restores it",
    ) {
        return;
    }
    let c = Case::new("restore-owner");
    let owned = c.write("owned.txt", b"someone else's");
    nix::unistd::chown(
        &owned,
        Some(nix::unistd::Uid::from_raw(1234)),
        Some(nix::unistd::Gid::from_raw(5678)),
    )
    .unwrap();
    fs::set_permissions(&owned, fs::Permissions::from_mode(0o640)).unwrap();
    set_mtime_ns(&owned, 1_600_000_000_123_456_789);
    c.write("mine.txt", b"root's own");
    let want = files_of(&c.src);
    assert_eq!(
        (want[&b"owned.txt"[..]].uid, want[&b"owned.txt"[..]].gid),
        (1234, 5678)
    );
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(files_of(&to), want);
}

#[test]
fn existing_files_are_kept_unless_overwrite_and_a_rerun_fetches_only_what_is_missing() {
    let c = Case::new("restore-overwrite");
    for i in 0..6 {
        c.write(&format!("f{i}.txt"), format!("backed up {i}").as_bytes());
    }
    assert_eq!(c.run(&["run"]).code, 0);
    let to = c.root.join("restored");
    fs::create_dir_all(&to).unwrap();
    fs::write(to.join("f1.txt"), b"local edit, keep me").unwrap();
    let to_arg = to.to_str().unwrap();

    let gets = c.count(Op::GetObject);
    let out = c.run(&["restore", "--to", to_arg]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(figure(&out, "files restored"), 5);
    assert_eq!(figure(&out, "already there"), 1);
    assert_eq!(fs::read(to.join("f1.txt")).unwrap(), b"local edit, keep me");
    assert_eq!(fs::read(to.join("f2.txt")).unwrap(), b"backed up 2");
    assert_eq!(
        c.count(Op::GetObject) - gets,
        5,
        "an existing file costs no download"
    );

    // An interrupted restore is resumed by running it again: only the missing file is fetched.
    fs::remove_file(to.join("f4.txt")).unwrap();
    let gets = c.count(Op::GetObject);
    let out = c.run(&["restore", "--to", to_arg]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(figure(&out, "files restored"), 1);
    assert_eq!(figure(&out, "already there"), 5);
    assert_eq!(c.count(Op::GetObject) - gets, 1);
    assert_eq!(fs::read(to.join("f4.txt")).unwrap(), b"backed up 4");

    let out = c.run(&["restore", "--to", to_arg, "--overwrite"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(figure(&out, "files restored"), 6);
    assert_eq!(fs::read(to.join("f1.txt")).unwrap(), b"backed up 1");
    assert!(temp_files(&to).is_empty());
}

#[test]
fn path_restores_one_directory_or_file_and_nothing_beside_it() {
    let c = Case::new("restore-path");
    c.write("home/alice/notes.txt", b"alice");
    c.write("home/alice/deep/er.txt", b"deeper");
    c.write("home/alice2/not-me.txt", b"alice2");
    c.write("home/alicea", b"alicea");
    c.write("home/bob/bob.txt", b"bob");
    assert_eq!(c.run(&["run"]).code, 0);

    let to = c.root.join("r1");
    let out = c.run(&[
        "restore",
        "--to",
        to.to_str().unwrap(),
        "--path",
        "home/alice/",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let got: Vec<String> = files_of(&to)
        .into_keys()
        .map(|k| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(got, ["home/alice/deep/er.txt", "home/alice/notes.txt"]);

    // An absolute path below source.path names the same thing; a single file works too.
    let to = c.root.join("r2");
    let abs = c.src.join("home/bob/bob.txt");
    let out = c.run(&[
        "restore",
        "--to",
        to.to_str().unwrap(),
        "--path",
        abs.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(fs::read(to.join("home/bob/bob.txt")).unwrap(), b"bob");
    assert_eq!(files_of(&to).len(), 1);

    let out = c.run(&["restore", "--to", to.to_str().unwrap(), "--path", "../etc"]);
    assert_eq!(
        out.code, 64,
        "a bad --path is a usage error:\n{}",
        out.stderr
    );
}

#[test]
fn dry_run_lists_what_would_be_restored_and_writes_nothing() {
    let c = Case::new("restore-dry");
    c.write("one.txt", b"1");
    c.write("two/three.txt", b"333");
    fs::write(c.src.join(raw_name(b"caf\xe9")), b"latin-1").unwrap();
    assert_eq!(c.run(&["run"]).code, 0);
    let to = c.root.join("not-created");
    let gets = c.count(Op::GetObject);
    let out = c.run(&["restore", "--to", to.to_str().unwrap(), "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!to.exists(), "a dry run creates nothing");
    assert_eq!(c.count(Op::GetObject), gets, "a dry run downloads nothing");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(
        lines.contains(
            &format!(
                "restore\t3\t{}\t{}",
                c.key("two/three.txt"),
                to.join("two/three.txt").display()
            )
            .as_str()
        ),
        "{}",
        out.stdout
    );
    // The escaped name is shown as the file it would become (read from its metadata), its
    // byte that is not UTF-8 printed as an escape.
    let latin1 = format!("{}/caf\\xe9", to.display());
    assert!(out.stdout.contains(&latin1), "{}", out.stdout);
    assert_eq!(figure(&out, "files would be restored"), 3);
}

#[test]
fn a_corrupted_object_is_detected_counted_named_and_not_left_under_its_name() {
    let c = Case::new("restore-corrupt");
    c.write("good.txt", b"good content");
    c.write("bad.txt", b"this object will be damaged in the bucket");
    c.write("big.bin", &pseudo_random(7 * 1024 * 1024, 8)); // multipart
    assert_eq!(c.run(&["run"]).code, 0);
    corrupt_object(&c, "bad.txt", false);
    corrupt_object(&c, "big.bin", true);

    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 2, "per-file errors exit 2:\n{}", out.stderr);
    assert_eq!(figure(&out, "errors"), 2);
    assert_eq!(figure(&out, "files restored"), 1);
    for rel in ["bad.txt", "big.bin"] {
        assert!(
            out.stderr
                .contains(&format!("{}: not restored", c.key(rel))),
            "the key is named:\n{}",
            out.stderr
        );
        assert!(!to.join(rel).exists(), "{rel} must not be written");
    }
    assert!(out.stderr.contains("manifest"), "{}", out.stderr);
    assert_eq!(fs::read(to.join("good.txt")).unwrap(), b"good content");
    assert!(temp_files(&to).is_empty(), "{:?}", temp_files(&to));
}

#[test]
fn an_interrupted_restore_leaves_no_partial_file_and_a_rerun_completes_it() {
    let mut c = Case::new("restore-sigint");
    c.transfer_extra = "  concurrency: 1\n".into();
    // Multipart-sized, so each download takes long enough to be caught in the middle.
    let big: Vec<Vec<u8>> = (0..3)
        .map(|i| pseudo_random(8 * 1024 * 1024, 20 + i))
        .collect();
    for (i, body) in big.iter().enumerate() {
        c.write(&format!("big{i}.bin"), body);
    }
    assert_eq!(c.run(&["run"]).code, 0);

    let to = c.root.join("restored");
    let mut child = c
        .command(&["restore", "--to", to.to_str().unwrap()], None)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt as soon as a download is being written.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while temp_files(&to).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no download started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "128 + SIGINT:\n{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert!(temp_files(&to).is_empty(), "{:?}", temp_files(&to));
    // Whatever is there is complete.
    for (i, body) in big.iter().enumerate() {
        if let Ok(got) = fs::read(to.join(format!("big{i}.bin"))) {
            assert!(got == *body, "big{i}.bin is there but not complete");
        }
    }

    let out = c.run(&["restore", "--to", to.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for (i, body) in big.iter().enumerate() {
        assert!(fs::read(to.join(format!("big{i}.bin"))).unwrap() == *body);
    }
}

#[test]
fn as_of_on_a_server_without_versions_is_fatal_and_says_why() {
    let c = Case::new("restore-noversions");
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    let to = c.root.join("r");
    let out = c.run(&["restore", "--to", to.to_str().unwrap(), "--as-of", "1h ago"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("--as-of needs ListObjectVersions"),
        "{}",
        out.stderr
    );
    assert!(!to.exists(), "nothing is created before the listing works");
}

// ---- --as-of against moto ---------------------------------------------------------------------

/// A case on moto's S3, in a versioned bucket (s3s-fs keeps no versions).
fn versioned_case(hint: &str) -> Case {
    Case::on(moto_s3(), moto_s3().versioned_dest(hint))
}

#[test]
fn as_of_restores_the_version_that_was_current_then() {
    let c = versioned_case("as-of");
    let doc = c.write("docs/report.txt", b"the real report, version 1");
    c.write("docs/stable.txt", b"never changes");
    set_mtime_ns(&doc, 1_700_000_000_111_111_111);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // moto keeps LastModified in whole seconds: the restore point (whole seconds too) lies in a
    // second after the one the first run ended in, and the second run starts in a later one.
    let ended = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let point = clock_past_second(ended);
    clock_past_second(point.duration_since(UNIX_EPOCH).unwrap().as_secs());

    // Last night: the file was "encrypted", and a ransom note appeared.
    fs::write(&doc, b"ENCRYPTED!!! pay up to get version 1 back").unwrap();
    c.write("docs/README-RANSOM.txt", b"pay");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 2, "{}", out.stderr);

    // Each key's version at that time (what --as-of did before snapshots; the snapshot chosen by
    // time is in snapshots.rs).
    let to = c.root.join("before");
    let at = humantime::format_rfc3339_seconds(point).to_string();
    let out = c.run(&[
        "restore",
        "--include-deleted",
        "--to",
        to.to_str().unwrap(),
        "--as-of",
        &at,
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        fs::read(to.join("docs/report.txt")).unwrap(),
        b"the real report, version 1"
    );
    let m = fs::metadata(to.join("docs/report.txt")).unwrap();
    assert_eq!(
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        1_700_000_000_111_111_111,
        "the old version's mtime"
    );
    assert_eq!(
        fs::read(to.join("docs/stable.txt")).unwrap(),
        b"never changes"
    );
    assert!(!to.join("docs/README-RANSOM.txt").exists());
    assert_eq!(figure(&out, "did not exist at the --as-of time"), 1);
    assert_eq!(figure(&out, "files restored"), 2);
    // moto stores no checksum and the manifest describes the newer version: the old one is
    // checked by its ETag, the MD5 of its single-part upload.
    assert_eq!(figure(&out, "not verifiable"), 0, "{}", out.stderr);

    // Without --as-of: the current versions.
    let (to, out) = c.restore_into("now");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        fs::read(to.join("docs/report.txt")).unwrap(),
        b"ENCRYPTED!!! pay up to get version 1 back"
    );
    assert!(to.join("docs/README-RANSOM.txt").exists());

    // A time before the first backup: nothing existed yet.
    let to = c.root.join("too-early");
    let out = c.run(&[
        "restore",
        "--to",
        to.to_str().unwrap(),
        "--as-of",
        "@1000000000",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(figure(&out, "files restored"), 0);
    assert_eq!(figure(&out, "did not exist at the --as-of time"), 3);

    let out = c.run(&[
        "restore",
        "--to",
        to.to_str().unwrap(),
        "--as-of",
        "yesterday",
    ]);
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert!(out.stderr.contains("--as-of"), "{}", out.stderr);
}

#[test]
fn a_key_that_would_leave_the_target_is_refused() {
    let c = versioned_case("evil-key");
    c.write("fine.txt", b"fine");
    assert_eq!(c.run(&["run"]).code, 0);
    let client = moto_s3().direct_client();
    moto_s3().block_on(async {
        for key in ["../escaped.txt", "a/../../escaped2.txt"] {
            client
                .put_object()
                .bucket(&c.dest.bucket)
                .key(key)
                .body(ByteStream::from_static(b"evil"))
                .send()
                .await
                .unwrap();
        }
    });
    // Not in any snapshot: only a restore of every object meets them.
    let to = c.root.join("deep/target");
    let out = c.run(&["restore", "--include-deleted", "--to", to.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(figure(&out, "errors"), 2);
    assert!(
        out.stderr.contains("bad-name") || out.stderr.contains("cannot be a path"),
        "{}",
        out.stderr
    );
    assert_eq!(fs::read(to.join("fine.txt")).unwrap(), b"fine");
    assert!(!c.root.join("deep/escaped.txt").exists());
    assert!(!c.root.join("escaped2.txt").exists());
    assert!(!c.root.join("deep/escaped2.txt").exists());
}

// ---- checksum paths no local server exercises -------------------------------------------------

// Real S3's composite checksums for multipart objects exist on no server these tests can start
// (s3s-fs stores none, moto's lacks the `-N`), so the restore's use of them is tested through the
// library, against the in-memory store serving objects with whatever checksum the test gives
// them, with everything else real.

#[test]
fn without_a_manifest_objects_are_checked_against_their_own_and_composite_checksums() {
    use base64::Engine as _;
    use nightcopy::store::memory::{MemoryStore, Object, Op};
    use nightcopy::store::{ObjectMeta, PartLayout};
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let sha = |b: &[u8]| Sha256::digest(b).to_vec();
    let composite = |b: &[u8], part: usize| {
        let mut outer = Sha256::new();
        for chunk in b.chunks(part) {
            outer.update(Sha256::digest(chunk));
        }
        format!("{}-{}", b64(&outer.finalize()), b.len().div_ceil(part))
    };
    let body = pseudo_random(2500, 4);
    let layout = Some(PartLayout {
        parts: 3,
        first_part_size: 1000,
    });
    let meta = Some(ObjectMeta {
        mtime_ns: 1_650_000_000_000_000_001,
        mode: 0o640,
        uid: 0,
        gid: 0,
        raw_path: None,
    });
    let object = |checksum: Option<String>, layout| Object {
        body: body.clone().into(),
        meta: meta.as_ref().map(ObjectMeta::to_map).unwrap_or_default(),
        checksum,
        layout,
        last_modified_ns: 0,
        storage_class: None,
        version_id: None,
    };
    let store = MemoryStore::default();
    let put = |k: &str, o| store.insert(&format!("p/{k}"), o);
    put("single", object(Some(b64(&sha(&body))), None));
    put("single-bad", object(Some(b64(&sha(b"other"))), None));
    put("multi", object(Some(composite(&body, 1000)), layout));
    let mut wrong = body.clone();
    wrong[1500] ^= 1;
    put("multi-bad", object(Some(composite(&wrong, 1000)), layout));
    // Parts of another size than the first: the composite cannot be recomputed.
    put(
        "multi-uneven",
        object(
            Some(composite(&body, 1000)),
            Some(PartLayout {
                parts: 2,
                first_part_size: 1000,
            }),
        ),
    );
    put("plain", object(None, None));

    let tmp = tempfile::tempdir().unwrap();
    let config = nightcopy::config::Config::parse(
        &format!(
            "source:\n  path: /nonexistent\ndestination:\n  bucket: b-1\n  prefix: p/\n  \
             region: us-east-1\nstate-dir: {}\nmetrics:\n  cloudwatch: false\n",
            tmp.path().join("state").display()
        ),
        Path::new("test.yaml"),
    )
    .unwrap();
    let to = tmp.path().join("restored");
    let opts = nightcopy::commands::restore::RestoreOptions {
        to: to.clone(),
        ..Default::default()
    };
    let store = std::sync::Arc::new(store);
    let stats = std::sync::Arc::new(nightcopy::commands::restore::RestoreStats::default());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(nightcopy::commands::restore::restore(
            &config,
            &opts,
            store.clone(),
            stats.clone(),
        ))
        .unwrap();
    let g = stats.snapshot(Duration::ZERO);
    assert_eq!((g.restored, g.errors, g.unverified), (4, 2, 2), "{g:?}");
    let mut restored: Vec<String> = files_of(&to)
        .into_keys()
        .map(|k| String::from_utf8(k).unwrap())
        .collect();
    restored.sort();
    assert_eq!(restored, ["multi", "multi-uneven", "plain", "single"]);
    assert_eq!(fs::read(to.join("multi")).unwrap(), body);
    let m = fs::metadata(to.join("multi")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!(
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        1_650_000_000_000_000_001
    );
    // One part-layout HEAD per composite object, none for the others.
    assert_eq!(store.count(Op::PartLayout), 3);
    // A restore only reads.
    for op in [
        Op::Put,
        Op::CreateMultipart,
        Op::UploadPart,
        Op::ListVersions,
    ] {
        assert_eq!(store.count(op), 0, "{op:?}");
    }
    assert!(temp_files(&to).is_empty());
}

#[test]
fn a_large_file_comes_down_in_ranges_side_by_side_every_byte_checked() {
    let mut c = Case::new("restore-ranges");
    c.transfer_extra = "  concurrency: 4\n".into();
    // Past twice the part size (5 MiB in the tests' config): the first GET brings 5 MiB,
    // ranged GETs the rest.
    let big = pseudo_random(23 * 1024 * 1024 + 1, 31);
    let damaged = pseudo_random(12 * 1024 * 1024, 32);
    c.write("big.bin", &big);
    c.write("damaged.bin", &damaged);
    set_mtime_ns(&c.src.join("big.bin"), 1_600_000_000_123_456_789);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // One byte in the last range: only read-back hashing of the ranges sees it.
    let key = c.key("damaged.bin");
    let mut bytes = s3().get(&c.dest, &key).body;
    bytes[11 * 1024 * 1024] ^= 1;
    let original = s3().get(&c.dest, &key);
    let client = s3().direct_client();
    s3().block_on(async {
        client
            .put_object()
            .bucket(&c.dest.bucket)
            .key(&key)
            .set_metadata(Some(original.metadata.clone().into_iter().collect()))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .expect("overwrite the object");
    });

    let before = c.server.requests(&c.dest).len();
    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(figure(&out, "files restored"), 1, "{}", out.stderr);
    assert_eq!(figure(&out, "errors"), 1, "{}", out.stderr);
    assert!(fs::read(to.join("big.bin")).unwrap() == big);
    let meta = fs::metadata(to.join("big.bin")).unwrap();
    assert_eq!(
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        1_600_000_000_123_456_789
    );
    assert!(!to.join("damaged.bin").exists());
    assert!(
        out.stderr.contains(&format!("{key}: not restored")),
        "{}",
        out.stderr
    );
    assert!(temp_files(&to).is_empty(), "{:?}", temp_files(&to));

    let requests = c.server.requests(&c.dest);
    let big_key = c.key("big.bin");
    let gets: Vec<_> = requests[before..]
        .iter()
        .filter(|r| r.op == Op::GetObject && r.key == big_key)
        .collect();
    let ranged: Vec<_> = gets
        .iter()
        .filter(|r| r.header("range").is_some())
        .collect();
    // 18 MiB + 1 byte after the first 5 MiB: ranges of 5, 5, 5 and 3 MiB + 1.
    assert_eq!((gets.len(), ranged.len()), (5, 4), "{gets:#?}");
    let mut asked: Vec<_> = ranged.iter().map(|r| r.header("range").unwrap()).collect();
    asked.sort();
    let mib = 1024 * 1024;
    let want: Vec<String> = (1..5)
        .map(|i| {
            let end = ((i + 1) * 5 * mib).min(23 * mib + 1) - 1;
            format!("bytes={}-{end}", i * 5 * mib)
        })
        .collect();
    let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(asked, want);
    // Unversioned: every range names the bytes the first GET began (If-Match its ETag).
    assert!(
        ranged.iter().all(|r| r.header("if-match").is_some()),
        "{ranged:#?}"
    );
}

#[test]
fn ranges_of_another_object_than_the_first_get_began_are_refused() {
    use crate::common::proxy::{FaultKind, FaultPlan};
    let mut c = Case::new("restore-ranges-etag");
    c.transfer_extra = "  concurrency: 4\n".into();
    let big = pseudo_random(12 * 1024 * 1024, 33);
    c.write("big.bin", &big);
    c.write("small.txt", b"small");
    assert_eq!(c.run(&["run"]).code, 0);
    // As a server that ignores If-Match answers once the object was replaced: the ranges'
    // ETag is not the first GET's. Not every such server can be caught by the checksum (an
    // object of another tool has none nightcopy can check), so the ETag is.
    c.server.set_faults(
        &c.dest,
        Some(
            FaultPlan::new(1.0, &[FaultKind::OtherETag], 1)
                .only(&[Op::GetObject])
                .for_key("big.bin"),
        ),
    );
    let (to, out) = c.restore_into("restored");
    c.server.set_faults(&c.dest, None);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(figure(&out, "errors"), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the object changed since its download began"),
        "{}",
        out.stderr
    );
    assert!(!to.join("big.bin").exists());
    assert_eq!(fs::read(to.join("small.txt")).unwrap(), b"small");
    assert!(temp_files(&to).is_empty(), "{:?}", temp_files(&to));
}
