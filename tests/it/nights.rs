//! A tree backed up night after night, restored from the bucket alone: every snapshot must come
//! back as exactly the tree that night's run saw — types, bytes, modes, owners, mtimes, symlinks,
//! hard links, empty directories, the holes of sparse files — not the union of every file ever
//! backed up.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::run::Case;
use crate::common::s3::moto_s3;
use crate::common::slowfs::SlowFs;
use crate::common::wait::clock_past_second;
use sha2::{Digest, Sha256};

/// What a path is, as a restore must give it back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    File([u8; 32]),
    /// A later name of a file seen before (in sorted order): that first name.
    HardLink(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    what: What,
    /// Permission bits (not for symlinks, which have none of their own).
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    /// A file with fewer blocks allocated than its size needs: it has holes.
    holes: bool,
}

type Tree = BTreeMap<Vec<u8>, Node>;

/// The tree below `root` (itself left out), nothing followed.
fn tree_of(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut first_name: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root)
        .min_depth(1)
        .sort_by_file_name()
        .follow_links(false)
    {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let m = fs::symlink_metadata(e.path()).unwrap();
        let t = m.file_type();
        let what = if t.is_symlink() {
            What::Symlink(
                fs::read_link(e.path())
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if t.is_dir() {
            What::Dir
        } else if t.is_fifo() {
            What::Fifo
        } else if t.is_file() {
            match first_name.get(&(m.dev(), m.ino())) {
                Some(first) if m.nlink() > 1 => What::HardLink(first.clone()),
                _ => {
                    first_name.insert((m.dev(), m.ino()), rel.clone());
                    What::File(Sha256::digest(fs::read(e.path()).unwrap()).into())
                }
            }
        } else {
            continue;
        };
        let mode = if t.is_symlink() { 0 } else { m.mode() & 0o7777 };
        out.insert(
            rel,
            Node {
                what,
                mode,
                uid: m.uid(),
                gid: m.gid(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                holes: t.is_file() && m.blocks() * 512 < m.size(),
            },
        );
    }
    out
}

/// The differences, one line each, for a readable failure.
fn differences(want: &Tree, got: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => out.push(format!("missing {}", String::from_utf8_lossy(k))),
            Some(g) if g != w => out.push(format!(
                "differs {}: want {w:?}, got {g:?}",
                String::from_utf8_lossy(k)
            )),
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("extra {}", String::from_utf8_lossy(k)));
    }
    out
}

#[track_caller]
fn assert_same(want: &Tree, got: &Tree, what: &str) {
    let d = differences(want, got);
    assert!(d.is_empty(), "{what}:\n{}", d.join("\n"));
}

fn set_mtime(p: &Path, ns: i64) {
    let t = nix::sys::time::TimeSpec::new(ns / 1_000_000_000, ns % 1_000_000_000);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// The end of a night: the clock past the second the run ended in (snapshots record whole
/// seconds), and the time that names this night's snapshot for `--as-of`.
fn night_ends() -> String {
    let ended = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let point = clock_past_second(ended);
    clock_past_second(point.duration_since(UNIX_EPOCH).unwrap().as_secs());
    humantime::format_rfc3339_seconds(point).to_string()
}

impl Case {
    fn restore_to(&self, name: &str, extra: &[&str]) -> (PathBuf, crate::common::run::Output) {
        let to = self.root.join(name);
        let mut args = vec!["restore", "--to", to.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        (to, out)
    }
}

#[test]
fn every_night_comes_back_as_it_was_from_the_bucket_alone() {
    let c = Case::on(moto_s3(), moto_s3().versioned_dest("nights"));
    let root = nix::unistd::geteuid().is_root();
    let s = &c.src;
    let report = c.write("docs/report.txt", b"version 1 of the report");
    c.write("docs/gone.txt", b"deleted before the second night");
    c.write("old-name/a.txt", b"a");
    c.write("old-name/sub/b.txt", b"b");
    fs::create_dir_all(s.join("links")).unwrap();
    symlink("/etc/passwd", s.join("links/absolute")).unwrap();
    symlink("../nowhere", s.join("links/dangling")).unwrap();
    symlink("../docs/report.txt", s.join("links/relative")).unwrap();
    c.write("hard/one", b"one inode, two names");
    fs::hard_link(s.join("hard/one"), s.join("hard/two")).unwrap();
    fs::create_dir_all(s.join("empty")).unwrap();
    nix::unistd::mkfifo(
        &s.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let secret = c.write("private/secret", b"only 4242 reads this");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(s.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(s.join("old-name/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    if root {
        for p in [s.join("private"), secret.clone()] {
            nix::unistd::chown(
                &p,
                Some(nix::unistd::Uid::from_raw(4242)),
                Some(nix::unistd::Gid::from_raw(4343)),
            )
            .unwrap();
        }
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &s.join("links/absolute"),
            Some(nix::unistd::Uid::from_raw(4242)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
    // 1 MiB of data, a 64 MiB hole, 1 MiB of data.
    let sparse = c.write("sparse/disk.img", &[0x5a; 1 << 20]);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(&sparse).unwrap();
        f.seek(SeekFrom::Start(65 << 20)).unwrap();
        f.write_all(&[0xa5; 1 << 20]).unwrap();
    }
    let m = fs::metadata(&sparse).unwrap();
    assert!(
        m.blocks() * 512 < m.size() / 8,
        "the test directory {} keeps no holes ({} blocks for {} bytes): this test needs a \
         filesystem that does (ext4, tmpfs)",
        s.display(),
        m.blocks(),
        m.size()
    );
    set_mtime(&report, 1_700_000_000_123_456_789);
    set_mtime(&s.join("links/absolute"), 1_600_000_000_000_000_001);
    set_mtime(&s.join("empty"), 1_650_000_000_000_000_002);
    let night1 = tree_of(s);
    assert_eq!(night1.len(), 20, "{night1:#?}");
    assert_eq!(
        night1[&b"hard/two"[..]].what,
        What::HardLink(b"hard/one".to_vec())
    );
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let first_night = night_ends();

    // The second night: a file changed, one deleted, a directory renamed, one added.
    fs::write(&report, b"version 2, longer than the first").unwrap();
    fs::remove_file(s.join("docs/gone.txt")).unwrap();
    fs::rename(s.join("old-name"), s.join("new-name")).unwrap();
    c.write("docs/new.txt", b"new on the second night");
    let night2 = tree_of(s);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let (to, out) = c.restore_to("latest", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_same(
        &night2,
        &tree_of(&to),
        "the latest snapshot is the second night's tree",
    );
    let restored = fs::metadata(to.join("sparse/disk.img")).unwrap();
    assert_eq!(restored.size(), 66 << 20);
    assert!(
        restored.blocks() * 512 <= 4 << 20,
        "the sparse file came back with {} blocks",
        restored.blocks()
    );
    let (to, out) = c.restore_to("first", &["--as-of", &first_night]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_same(
        &night1,
        &tree_of(&to),
        "--as-of between the nights is the first night's tree",
    );

    // The bucket alone suffices: no state directory, no manifest.
    fs::remove_dir_all(c.state_dir()).unwrap();
    let (to, out) = c.restore_to("latest-bare", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_same(&night2, &tree_of(&to), "latest, state directory wiped");
    let (to, out) = c.restore_to("first-bare", &["--as-of", &first_night]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_same(&night1, &tree_of(&to), "first night, state directory wiped");
    // Nothing was written through the restored symlinks.
    assert_eq!(
        fs::read(to.join("links/relative")).unwrap(),
        b"version 1 of the report"
    );

    // Every key ever backed up, as before snapshots.
    let (to, out) = c.restore_to("union", &["--include-deleted"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for f in [
        "docs/gone.txt",
        "old-name/a.txt",
        "new-name/sub/b.txt",
        "docs/new.txt",
    ] {
        assert!(to.join(f).is_file(), "{f} in the union");
    }
    assert_eq!(
        fs::read(to.join("docs/report.txt")).unwrap(),
        b"version 2, longer than the first"
    );
    c.assert_no_delete();
}

/// The extended attributes `source.xattrs` records (`user.*` and the POSIX ACLs) of every path
/// below `root` but symlinks, nothing followed.
fn xattrs_of(root: &Path) -> BTreeMap<Vec<u8>, Vec<Attr>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let e = e.unwrap();
        if e.path_is_symlink() {
            continue;
        }
        let mut names = vec![0u8; 64 * 1024];
        let n = rustix::fs::llistxattr(e.path(), &mut names).unwrap();
        let mut kept = Vec::new();
        for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let ours = name.starts_with(b"user.")
                || name == b"system.posix_acl_access"
                || name == b"system.posix_acl_default";
            if ours {
                let mut value = vec![0u8; 64 * 1024];
                let c = std::ffi::CString::new(name).unwrap();
                let len = rustix::fs::lgetxattr(e.path(), c.as_c_str(), &mut value).unwrap();
                kept.push((name.to_vec(), value[..len].to_vec()));
            }
        }
        kept.sort();
        if !kept.is_empty() {
            let rel = e.path().strip_prefix(root).unwrap();
            out.insert(rel.as_os_str().as_bytes().to_vec(), kept);
        }
    }
    out
}

/// An attribute's name and value.
type Attr = (Vec<u8>, Vec<u8>);

/// A POSIX ACL as the kernel keeps it in `system.posix_acl_*` (version 2, then tag, permissions
/// and id per entry, sorted by tag and id), so the test needs no `setfacl`.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap_or_else(|e| {
        panic!(
            "{name} cannot be set on {} ({e}): this test needs a filesystem that keeps user.* \
             attributes and POSIX ACLs (ext4, tmpfs since Linux 6.6)",
            p.display()
        )
    });
}

#[test]
fn extended_attributes_and_acls_come_back_with_source_xattrs_and_are_not_read_without() {
    const UNDEFINED: u32 = u32::MAX;
    // `setfacl -m u:4242:r` on a 644 file, and a directory's default ACL giving 4242 r-x.
    let access = acl(&[
        (0x01, 6, UNDEFINED),
        (0x02, 4, 4242),
        (0x04, 4, UNDEFINED),
        (0x10, 4, UNDEFINED),
        (0x20, 4, UNDEFINED),
    ]);
    let default = acl(&[
        (0x01, 7, UNDEFINED),
        (0x02, 5, 4242),
        (0x04, 5, UNDEFINED),
        (0x10, 5, UNDEFINED),
        (0x20, 5, UNDEFINED),
    ]);
    for (on, hint) in [(true, "xattrs-on"), (false, "xattrs-off")] {
        let mut c = Case::on(moto_s3(), moto_s3().versioned_dest(hint));
        c.source_extra = format!("  xattrs: {on}\n");
        let s = &c.src;
        let tagged = c.write("tagged.txt", b"blue");
        set_xattr(&tagged, "user.color", b"blue");
        let acl_file = c.write("acl.txt", b"4242 may read");
        fs::set_permissions(&acl_file, fs::Permissions::from_mode(0o644)).unwrap();
        set_xattr(&acl_file, "system.posix_acl_access", &access);
        fs::create_dir(s.join("shared")).unwrap();
        set_xattr(&s.join("shared"), "user.project", b"apollo");
        set_xattr(&s.join("shared"), "system.posix_acl_default", &default);
        // Created below the default ACL: it inherits an access ACL of its own.
        c.write("shared/inherited.txt", b"x");
        c.write("plain.txt", b"no attributes");
        symlink("tagged.txt", s.join("link")).unwrap();
        let tree = tree_of(s);
        let attrs = xattrs_of(s);
        assert_eq!(
            attrs
                .keys()
                .map(|k| String::from_utf8_lossy(k))
                .collect::<Vec<_>>(),
            ["acl.txt", "shared", "shared/inherited.txt", "tagged.txt"],
            "{attrs:?}"
        );
        let out = c.run(&["run"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let (to, out) = c.restore_to("restored", &[]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_same(&tree, &tree_of(&to), "the tree, modes included");
        if on {
            assert_eq!(xattrs_of(&to), attrs, "with source.xattrs: true");
        } else {
            // Nothing recorded: the restored files and directories have none (a restored file
            // below a directory with no default ACL inherits nothing either).
            assert_eq!(xattrs_of(&to), BTreeMap::new(), "with source.xattrs: false");
        }
        c.assert_no_delete();
    }
}

/// A small deterministic generator: the trees differ by seed, and a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Paths of regular files below `root` (relative), sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(root).unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// One night's changes to the tree at `s`.
fn mutate(s: &Path, r: &mut Rng, night: u32) {
    const DIRS: [&str; 4] = ["a", "a/b", "c", "d e"];
    for i in 0..(3 + r.below(5)) {
        let dir = s.join(DIRS[r.below(DIRS.len())]);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("f{night}-{i}"));
        let body: Vec<u8> = (0..r.below(3000)).map(|_| r.next() as u8).collect();
        fs::write(&p, body).unwrap();
    }
    let existing = files(s);
    for _ in 0..r.below(3) {
        if existing.is_empty() {
            break;
        }
        let p = s.join(&existing[r.below(existing.len())]);
        match r.below(4) {
            0 => {
                let _ = fs::remove_file(&p);
            }
            1 if p.exists() => fs::write(&p, format!("changed on night {night}")).unwrap(),
            2 if p.exists() => {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600 | (r.below(8) as u32)))
                    .unwrap()
            }
            _ if p.exists() => {
                let twin = p.with_extension(format!("link{night}"));
                let _ = fs::hard_link(&p, twin);
            }
            _ => {}
        }
    }
    let _ = symlink(
        format!("target-of-night-{night}"),
        s.join(format!("link{}", r.below(3))),
    );
    if night % 2 == 1 && s.join("c").exists() {
        let _ = fs::rename(s.join("c"), s.join(format!("c{night}")));
    }
}

#[test]
fn random_trees_over_several_nights_each_restore_as_that_night() {
    for seed in [0x9e37_79b9_7f4a_7c15_u64, 0x2545_f491_4f6c_dd1d] {
        let c = Case::on(moto_s3(), moto_s3().versioned_dest("random-nights"));
        let mut r = Rng(seed);
        let mut nights = Vec::new();
        for night in 0..4 {
            mutate(&c.src, &mut r, night);
            let tree = tree_of(&c.src);
            assert!(tree.len() > 3 * night as usize, "{tree:#?}");
            let out = c.run(&["run"]);
            assert_eq!(out.code, 0, "seed {seed:#x} night {night}: {}", out.stderr);
            nights.push((tree, night_ends()));
        }
        for (night, (tree, when)) in nights.iter().enumerate() {
            let (to, out) = c.restore_to(&format!("night{night}"), &["--as-of", when]);
            assert_eq!(out.code, 0, "seed {seed:#x} night {night}: {}", out.stderr);
            assert_same(
                tree,
                &tree_of(&to),
                &format!("seed {seed:#x}, night {night}"),
            );
        }
    }
}

#[test]
fn a_snapshot_restored_into_a_writable_fuse_mount_is_the_tree_and_costs_no_lookup_per_file() {
    let c = Case::on(moto_s3(), moto_s3().versioned_dest("nights-mount"));
    let s = &c.src;
    const DIRS: usize = 5;
    const PER_DIR: usize = 20;
    for d in 0..DIRS {
        for f in 0..PER_DIR {
            let p = c.write(
                &format!("d{d}/f{f:02}"),
                format!("{d}/{f}").repeat(f).as_bytes(),
            );
            fs::set_permissions(
                &p,
                fs::Permissions::from_mode(0o600 + (f as u32 % 8) * 0o10),
            )
            .unwrap();
            set_mtime(&p, 1_700_000_000_000_000_000 + (d * 100 + f) as i64);
        }
        fs::set_permissions(s.join(format!("d{d}")), fs::Permissions::from_mode(0o750)).unwrap();
    }
    symlink("d0/f01", s.join("link")).unwrap();
    fs::hard_link(s.join("d1/f01"), s.join("twin")).unwrap();
    fs::create_dir_all(s.join("empty")).unwrap();
    let tree = tree_of(s);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // An empty directory served through the writable mount, every operation counted.
    let backing = c.root.join("backing");
    fs::create_dir_all(&backing).unwrap();
    let mount = SlowFs::mount_rw(&backing, &c.root.join("mnt"));
    mount.reset();
    let to = mount.mountpoint.to_str().unwrap().to_owned();
    let out = c.run(&["restore", "--to", &to]);
    let ops = mount.ops();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_same(&tree, &tree_of(&backing), "restored through the mount");
    let op = |name: &str| ops.get(name).copied().unwrap_or(0);
    // "twin" is linked, not created.
    let (files, dirs) = ((DIRS * PER_DIR) as u64, DIRS as u64);
    assert_eq!(op("create"), files, "one create per file: {ops:?}");
    assert_eq!(op("link"), 1, "{ops:?}");
    assert_eq!(
        op("rename"),
        files + 1,
        "one rename per file and the symlink: {ops:?}"
    );
    assert_eq!(
        op("fsync"),
        files,
        "each file on disk before its name: {ops:?}"
    );
    // The files are the restoring user's already: no chown but the six directories' and the
    // symlink's.
    assert_eq!(op("chown"), dirs + 2, "{ops:?}");
    // Created with their modes: a chmod per directory, and per file only where the umask took
    // bits the mode has.
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    let stripped = tree
        .values()
        .filter(|n| matches!(n.what, What::File(_)) && n.mode & umask != 0)
        .count() as u64;
    assert_eq!(op("chmod"), dirs + 1 + stripped, "umask {umask:o}: {ops:?}");
    // Each directory opened once, not once per file below it.
    assert!(op("opendir") <= 2 * (dirs + 2), "{ops:?}");
    // In a directory this restore made, no name is looked up before it is created: the kernel's
    // own lookups (a create's, a rename's) are all that is left.
    assert!(op("getattr") <= 14 * files, "{ops:?}");
}
