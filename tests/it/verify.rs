//! `nightcopy verify` end to end: the real binary backs a tree up to a real S3 API server
//! (s3s-fs behind the counting proxy), then the bucket is damaged behind its back and verify must
//! say so — one line per problem, the documented exit code, and never a write to the bucket.

use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use crate::common::run::{pseudo_random, unprivileged, Case, Output};
use crate::common::s3::s3;
use crate::common::wait::wait_for;
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};

/// A figure from verify's summary line, e.g. `figure(&out, "files compared")`.
fn figure(out: &Output, name: &str) -> u64 {
    crate::common::run::summary_figure(
        &out.stderr,
        |l| l.contains("verify ") && l.contains(" files compared"),
        name,
    )
}

/// The problem lines on stdout as (kind, path) pairs, sorted.
fn problems(out: &Output) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = out
        .stdout
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            (
                f.next().unwrap().to_owned(),
                f.next().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Replaces an object's bytes behind nightcopy's back, keeping its metadata (so it still looks
/// like the file's backup). `len` changes the size; `with_sha256` makes the new object carry the
/// SHA-256 of its new bytes, like an upload by another tool.
fn replace_object(c: &Case, rel: &str, len: Option<usize>, with_sha256: bool) {
    let key = c.key(rel);
    let original = s3().get(&c.dest, &key);
    let mut bytes = original.body.clone();
    for b in bytes.iter_mut().take(32) {
        *b ^= 0x33;
    }
    if let Some(len) = len {
        bytes.resize(len, b'x');
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
            use base64::Engine as _;
            put = put.checksum_sha256(
                base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes)),
            );
        }
        put.send().await.expect("replace the object");
    });
}

fn delete_object(c: &Case, rel: &str) {
    let client = s3().direct_client();
    s3().block_on(async {
        client
            .delete_object()
            .bucket(&c.dest.bucket)
            .key(c.key(rel))
            .send()
            .await
            .expect("delete (test setup, not through the proxy)");
    });
}

#[test]
fn a_clean_backup_verifies_clean_and_verify_only_reads() {
    let c = Case::new("verify-clean");
    c.write("a.txt", b"a");
    c.write("dir/b.txt", b"bb");
    c.write("big.bin", &pseudo_random(7 * 1024 * 1024 + 3, 2)); // multipart
    fs::write(
        c.src
            .join(std::ffi::OsString::from_vec(b"caf\xe9".to_vec())),
        b"latin-1",
    )
    .unwrap();
    assert_eq!(c.run(&["run"]).code, 0);
    // A file that only exists in the bucket is not a problem (nothing is ever deleted there).
    fs::remove_file(c.src.join("a.txt")).unwrap();

    let before = c.ops();
    let out = c.run(&["verify"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(figure(&out, "files compared"), 3);
    assert_eq!(figure(&out, "only in the bucket"), 1);

    let out = c.run(&["verify", "--full", "--sample", "100"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("verify clean"), "{}", out.stderr);
    assert_eq!(figure(&out, "hashed in full"), 3);
    assert_eq!(figure(&out, "downloaded and hashed"), 3);
    assert_eq!(figure(&out, "without a SHA-256 to compare"), 0);

    let out = c.run(&["verify", "--json", "--sample", "1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "only the summary: {}", out.stdout);
    assert_eq!(lines[0]["type"], "summary");
    assert_eq!(lines[0]["outcome"], "clean");
    assert_eq!(lines[0]["exit_code"], 0);
    assert_eq!(lines[0]["sampled"], 1);

    // Read-only: lists, heads and gets, nothing else.
    for (op, n) in c.ops() {
        if n > before.get(&op).copied().unwrap_or(0) {
            assert!(
                ["ListObjectsV2", "HeadObject", "GetObject"].contains(&op.as_str()),
                "verify sent {op}"
            );
        }
    }
    c.assert_no_delete();
}

#[test]
fn missing_objects_and_size_mismatches_are_reported_one_line_each() {
    let c = Case::new("verify-missing");
    for name in ["a.txt", "b.txt", "c.txt", "d.txt"] {
        c.write(name, name.repeat(10).as_bytes());
    }
    assert_eq!(c.run(&["run"]).code, 0);
    delete_object(&c, "b.txt");
    replace_object(&c, "c.txt", Some(3), false);

    let out = c.run(&["verify"]);
    assert_eq!(out.code, 4, "problems exit 4:\n{}", out.stderr);
    let path = |rel: &str| c.src.join(rel).display().to_string();
    assert_eq!(
        problems(&out),
        [
            ("missing".to_owned(), path("b.txt")),
            ("size-mismatch".to_owned(), path("c.txt")),
        ]
    );
    assert!(
        out.stdout.contains("although the manifest records it"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("verify found 2 problems"),
        "{}",
        out.stderr
    );

    let out = c.run(&["verify", "--json"]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Problems are printed as the concurrent checks find them, so in no fixed order (as the
    // text form, sorted by `problems`).
    let mut found: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|l| Some((l["kind"].as_str()?, l["key"].as_str()?)))
        .collect();
    found.sort();
    let (b, c_key) = (c.key("b.txt"), c.key("c.txt"));
    assert_eq!(
        found,
        [("missing", b.as_str()), ("size-mismatch", c_key.as_str())]
    );
    let summary = lines.last().unwrap();
    assert_eq!(summary["outcome"], "problems");
    assert_eq!(summary["missing"], 1);
    assert_eq!(summary["size_mismatch"], 1);
}

#[test]
fn a_file_changed_after_the_backup_is_counted_but_not_a_problem() {
    let c = Case::new("verify-changed");
    c.write("stable.txt", b"stable");
    let p = c.write("busy.log", b"line 1\n");
    assert_eq!(c.run(&["run"]).code, 0);
    // Changed after the backup started: verify takes a file whose ctime is later than the start
    // in the run record (whole seconds, rounded up). Written until both are.
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(c.state_dir().join("last-run.json")).unwrap()).unwrap();
    let cutoff_ns = (record["started"].as_i64().expect("the run's start") + 1) * 1_000_000_000;
    let ctime_ns = |p: &std::path::Path| {
        let m = fs::metadata(p).unwrap();
        m.ctime() * 1_000_000_000 + m.ctime_nsec()
    };
    wait_for(
        Duration::from_secs(5),
        "busy.log and new.txt changed after the backup's start",
        || {
            fs::write(&p, b"line 1\nline 2\n").unwrap();
            let new = c.write("new.txt", b"created after the backup");
            ctime_ns(&p) > cutoff_ns && ctime_ns(&new) > cutoff_ns
        },
    );

    let out = c.run(&["-v", "verify"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(figure(&out, "changed since the last backup"), 2);
    assert!(
        out.stderr.contains("busy.log: size-mismatch") && out.stderr.contains("new.txt: missing"),
        "-v names them:\n{}",
        out.stderr
    );
}

#[test]
fn a_corrupt_object_is_caught_by_sample_and_a_replaced_one_by_full() {
    let c = Case::new("verify-corrupt");
    c.write("good.txt", b"good");
    c.write("rotten.txt", b"these bytes will rot in the bucket");
    c.write(
        "replaced.txt",
        b"this object will be replaced by another tool",
    );
    assert_eq!(c.run(&["run"]).code, 0);
    replace_object(&c, "rotten.txt", None, false);
    replace_object(&c, "replaced.txt", None, true);
    let path = |rel: &str| c.src.join(rel).display().to_string();

    // Sizes agree: the cheap comparison cannot see it.
    assert_eq!(c.run(&["verify"]).code, 0);

    // --sample downloads: both objects differ from the SHA-256 recorded at upload.
    let out = c.run(&["verify", "--sample", "100"]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert_eq!(
        problems(&out),
        [
            ("corrupt".to_owned(), path("replaced.txt")),
            ("corrupt".to_owned(), path("rotten.txt")),
        ]
    );
    assert_eq!(figure(&out, "downloaded and hashed"), 3);

    // --full re-reads the files: the replaced object's own checksum disagrees with its file.
    // (The rotten one carries no SHA-256 of its own, and the file still matches the manifest:
    // only a download can show that one.)
    let out = c.run(&["verify", "--full"]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert_eq!(
        problems(&out),
        [("content-mismatch".to_owned(), path("replaced.txt"))]
    );
}

#[test]
fn a_file_that_cannot_be_read_leaves_the_verify_incomplete() {
    let c = Case::new("verify-unreadable");
    c.write("a.txt", b"a");
    let locked = c.write("locked.txt", b"secret");
    assert_eq!(c.run(&["run"]).code, 0);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let out = c.run_with(&["verify", "--full"], unprivileged());
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(
        problems(&out),
        [("unchecked".to_owned(), locked.display().to_string())]
    );
    assert!(out.stderr.contains("verify incomplete"), "{}", out.stderr);
}
