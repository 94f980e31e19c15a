//! The walk through a FUSE mount with attribute and entry caching off (scripts/slowfs.py, no
//! delay), counting the operations the kernel sent: on a network or FUSE client each is a round
//! trip, so how many a nightly run causes is what decides its speed there.

use crate::common::run::Case;
use crate::common::slowfs::SlowFs;

const DIRS: usize = 10;
const PER_DIR: usize = 20;

#[test]
fn a_nothing_changed_run_costs_two_lookups_per_file_opens_none_and_never_enters_an_excluded_dir() {
    let mut c = Case::new("mount-ops");
    for d in 0..DIRS {
        for f in 0..PER_DIR {
            c.write(&format!("d{d:02}/f{f:02}"), format!("{d}/{f}").as_bytes());
        }
    }
    c.write("top", b"top");
    for f in 0..5 {
        c.write(&format!("skip/s{f}"), b"excluded");
    }
    let files = (DIRS * PER_DIR + 1) as u64;
    let mount = SlowFs::mount(&c.src.clone(), &c.root.join("mnt"));
    c.src = mount.mountpoint.clone();
    c.require_mountpoint = true;
    c.source_extra = "  exclude: [\"skip/**\"]\n".into();

    let first = c.run(&["run"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.figure("files transferred"), files, "{}", first.stderr);

    mount.reset();
    let again = c.run(&["run"]);
    let ops = mount.ops();
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 0, "{}", again.stderr);
    let op = |name: &str| ops.get(name).copied().unwrap_or(0);
    // Nothing changed, so nothing is read: the manifest and a stat decide.
    assert_eq!(op("open") + op("read"), 0, "files opened: {ops:?}");
    // The root (twice: the mount-point check, then the walk) and the ten directories; `skip/`
    // would be one more.
    assert!(
        op("opendir") <= DIRS as u64 + 2,
        "directories opened: {ops:?}"
    );
    // With attribute caching off the kernel sends per file a GETATTR of the directory (its
    // permission check) and a LOOKUP of the name, both served by getattr here: 2 per file, and
    // about 5 per directory (its lookup, open and fstat) — 458 in all when this was written. A
    // stat that asked for the file's attributes again would be a third per file (statx without
    // AT_STATX_DONT_SYNC, or fstatat: 659).
    let bound = 2 * files + 5 * (DIRS as u64 + 1) + 20;
    assert!(
        op("getattr") <= bound,
        "{} getattr for {files} files (at most {bound}): {ops:?}",
        op("getattr")
    );
}
