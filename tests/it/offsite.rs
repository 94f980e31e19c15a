//! The manifest's copy in the bucket: a host whose state directory is empty (new, or rebuilt)
//! uses it, so its first run sends no data for unchanged files and still catches a file whose
//! mtime went backwards; a copy for another source, or a damaged one, is refused loudly.

use std::fs;
use std::time::{Duration, SystemTime};

use crate::common::proxy::Op;
use crate::common::run::Case;
use crate::common::s3::s3;

const COPY_KEY: &str = ".nightcopy/manifest.gz";

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn a_rebuilt_host_uses_the_copy_sends_no_data_and_catches_a_backward_mtime() {
    let c = Case::new("rebuilt");
    for i in 0..30 {
        c.write(
            &format!("d{}/f{i:02}.txt", i % 3),
            format!("file {i:02}").as_bytes(),
        );
    }
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("manifest copied to s3://"),
        "{}",
        out.stderr
    );
    let own = s3().own_requests(&c.dest);
    assert_eq!(own.iter().filter(|r| r.op == Op::PutObject).count(), 1);

    // The host is rebuilt: its state directory is gone.
    fs::remove_dir_all(c.state_dir()).unwrap();
    let puts = c.count(Op::PutObject);
    let seen = s3().requests(&c.dest).len();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
    assert_eq!(out.figure("files transferred"), 0, "{}", out.stderr);
    assert_eq!(out.figure("checks"), 30, "{}", out.stderr);
    assert_eq!(c.count(Op::PutObject), puts, "no data was sent");
    let rerun: Vec<_> = s3().requests(&c.dest).into_iter().skip(seen).collect();
    eprintln!(
        "rebuilt-host run: {:?} (plus, for the copy, one GET and one PUT)",
        crate::common::proxy::count(&rerun)
    );
    assert!(rerun
        .iter()
        .all(|r| matches!(r.op, Op::ListObjectsV2 | Op::Other)));
    assert!(fs::read_to_string(c.state_dir().join("manifest"))
        .unwrap()
        .contains("d0/f00.txt\t"));

    // Rebuilt again, and meanwhile a file was rewritten at the same size with an older mtime
    // (a restore from elsewhere, `touch -d`, an application that keeps mtimes): the upload time
    // alone would call it unchanged; the manifest's copy knows its mtime.
    fs::remove_dir_all(c.state_dir()).unwrap();
    let changed = c.write("d1/f01.txt", b"FILE 01");
    set_mtime(
        &changed,
        SystemTime::now() - Duration::from_secs(30 * 86_400),
    );
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 1, "{}", out.stderr);
    assert_eq!(c.count(Op::PutObject), puts + 1);
    assert_eq!(s3().get(&c.dest, "d1/f01.txt").body, b"FILE 01");
    c.assert_no_delete();
}

#[test]
fn a_copy_made_for_another_source_or_damaged_is_not_used_and_says_so() {
    let first = Case::new("copy-source");
    first.write("a.txt", b"a");
    assert_eq!(first.run(&["run"]).code, 0);

    // Another tree writing to the same destination: the copy is not its manifest.
    let other = Case::on(s3(), first.dest.clone());
    other.write("a.txt", b"a");
    let out = other.run(&["run", "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("is not used: it was made for another source")
            && out
                .stderr
                .contains("deciding by size and upload time this once"),
        "{}",
        out.stderr
    );
    assert!(
        !other.state_dir().join("manifest").exists(),
        "a dry run leaves no state"
    );

    // A damaged copy (here: not gzip at all) is refused the same way.
    s3().block_on(
        s3().direct_client()
            .put_object()
            .bucket(&first.dest.bucket)
            .key(first.key(COPY_KEY))
            .body(b"\x1f\x8b not really".to_vec().into())
            .send(),
    )
    .unwrap();
    fs::remove_dir_all(first.state_dir()).unwrap();
    let out = first.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("is not used: it cannot be read")
            || out.stderr.contains("is not used: it is damaged"),
        "{}",
        out.stderr
    );
    // The run went on without it, and left a good copy for the next.
    let out = {
        fs::remove_dir_all(first.state_dir()).unwrap();
        first.run(&["run"])
    };
    assert!(
        out.stderr.contains("using the copy in the bucket"),
        "{}",
        out.stderr
    );
}

#[test]
fn restore_and_verify_never_see_the_copy_as_a_file() {
    let c = Case::new("copy-hidden");
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    assert!(s3().list_all_keys(&c.dest).contains(&c.key(COPY_KEY)));
    let out = c.run(&["verify"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.contains("manifest.gz"), "{}", out.stdout);
    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!to.join(".nightcopy").exists());
    assert_eq!(fs::read(to.join("a.txt")).unwrap(), b"a");
    // A source with a top-level .nightcopy of its own: left out, so it never takes the key.
    c.write(".nightcopy/manifest.gz", b"a user's file");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("1 excluded"), "{}", out.stderr);
}
