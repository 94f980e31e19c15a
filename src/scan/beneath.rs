//! A file named from outside the walk — a work message's path and key — resolved beneath
//! `source.path` the way the walk would have reached it, or refused with the reason.
//!
//! A worker reads with the right to read every file on its host, and a work message is input from
//! anyone allowed to send to the queue. So the path is taken as raw bytes of plain components
//! only (no `/` at the start, no `.` or `..`, no empty or NUL-bearing name), opened component by
//! component from a handle of the source root with `O_NOFOLLOW|O_DIRECTORY` (a directory swapped
//! for a symlink after the coordinator's walk is refused, never followed), and held to the
//! walk's own rules: the excludes, `one-file-system`, `max-file-size`, the key length, and the
//! reserved `.nightcopy` part of the prefix. The key is derived again from the path and must equal
//! the message's, so a message cannot put one file's bytes under another file's key.
//!
//! The file's device and inode come from an `fstatat` relative to its directory's handle: the
//! uploader then opens the file and requires that very inode (`scan::open_entry`), exactly as
//! for a file of the walk — a swap between this resolution and the read is refused there.
//!
//! `source.symlinks: follow` is not honoured here: a worker cannot tell a symlink the walk chose
//! to follow from one planted since, so a path through a symlink is refused (docs/scale-out.md).
//!
//! Why not `openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`: it needs Linux 5.6 and would still
//! leave the per-directory checks (excludes of a directory, its device) to do one by one.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};

use super::{LocalEntry, ScanOptions};
use crate::keys;

/// Why a named file is not backed up. Each is a per-file error (or, for the last two, what the
/// walk itself would count), never fatal.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error(
        "not a plain path below the source (absolute, '.', '..', empty or a NUL byte): refused"
    )]
    NotBeneath,
    #[error("its key would be {derived:?}, and the message names {named:?}: refused")]
    KeyMismatch { derived: String, named: String },
    #[error("its key is in nightcopy's reserved .nightcopy/ part of the prefix: refused")]
    Reserved,
    #[error("its key is longer than the {0} bytes left after the prefix: refused")]
    KeyTooLong(usize),
    #[error("excluded by the config (source.exclude): refused")]
    Excluded,
    #[error("{} is a symlink or not a directory: nothing is read through it", keys::shown(.0))]
    NotADirectory(PathBuf),
    #[error("{} is on another file system (source.one-file-system): refused", keys::shown(.0))]
    OtherFileSystem(PathBuf),
    #[error("larger than source.max-file-size ({size} > {max} bytes): not read")]
    TooLarge { size: u64, max: u64 },
    /// Something else than a regular file is at its name: a symlink, a FIFO, a device.
    #[error("{0}")]
    NotAFile(&'static str),
    #[error("gone")]
    Vanished,
    #[error("{0}")]
    Io(String),
}

/// The source root, open, and the walk's rules.
pub struct Beneath {
    root: OwnedFd,
    root_dev: u64,
    opts: ScanOptions,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

impl Beneath {
    /// Opens `opts.root` (the operator's `source.path`, followed as given).
    pub fn open(opts: ScanOptions) -> std::io::Result<Beneath> {
        let root = nix::fcntl::open(
            &opts.root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let root_dev = fstat(root.as_fd())?.st_dev;
        Ok(Beneath {
            root,
            root_dev,
            opts,
        })
    }

    /// The entry for the file at `raw` (the relative path's bytes) whose key the message says is
    /// `key` (and `escaped`, whether a component had to be escaped).
    pub fn resolve(&self, raw: &[u8], key: &str, escaped: bool) -> Result<LocalEntry, Refused> {
        let rel = plain_relative(raw)?;
        let (derived, derived_escaped) = keys::relative_key(rel);
        if derived != key || derived_escaped != escaped {
            return Err(Refused::KeyMismatch {
                derived,
                named: key.to_owned(),
            });
        }
        if keys::is_reserved(key) {
            return Err(Refused::Reserved);
        }
        if key.len() > self.opts.max_key_bytes {
            return Err(Refused::KeyTooLong(self.opts.max_key_bytes));
        }
        let names: Vec<&OsStr> = rel.iter().collect();
        let (name, dirs) = names.split_last().ok_or(Refused::NotBeneath)?;
        let mut fd: Option<OwnedFd> = None;
        let mut at = PathBuf::new();
        for dir in dirs {
            at.push(dir);
            if self.opts.excludes.is_excluded(&at, true) {
                return Err(Refused::Excluded);
            }
            let parent = fd.as_ref().unwrap_or(&self.root);
            let opened = match openat(parent.as_fd(), *dir, dir_flags(), Mode::empty()) {
                Ok(d) => d,
                Err(Errno::ENOENT) => return Err(Refused::Vanished),
                Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(Refused::NotADirectory(at)),
                Err(e) => return Err(Refused::Io(format!("{}: {e}", keys::shown(&at)))),
            };
            if self.opts.one_file_system {
                let dev = fstat(opened.as_fd())
                    .map_err(|e| Refused::Io(format!("{}: {e}", keys::shown(&at))))?
                    .st_dev;
                if dev != self.root_dev {
                    return Err(Refused::OtherFileSystem(at));
                }
            }
            fd = Some(opened);
        }
        if self.opts.excludes.is_excluded(rel, false) {
            return Err(Refused::Excluded);
        }
        let parent = fd.as_ref().unwrap_or(&self.root);
        let st = match fstatat(parent.as_fd(), *name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Err(Refused::Vanished),
            Err(e) => return Err(Refused::Io(e.to_string())),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind != SFlag::S_IFREG {
            return Err(Refused::NotAFile(match kind {
                SFlag::S_IFLNK => "a symlink",
                SFlag::S_IFIFO => "a FIFO",
                SFlag::S_IFDIR => "a directory",
                SFlag::S_IFSOCK => "a socket",
                SFlag::S_IFBLK | SFlag::S_IFCHR => "a device",
                _ => "not a regular file",
            }));
        }
        if self.opts.one_file_system && st.st_dev != self.root_dev {
            return Err(Refused::OtherFileSystem(rel.to_owned()));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size > self.opts.max_file_size {
            return Err(Refused::TooLarge {
                size,
                max: self.opts.max_file_size,
            });
        }
        Ok(LocalEntry {
            key: derived,
            path: self.opts.root.join(rel),
            raw_path: escaped.then(|| keys::encode_raw_path(rel)),
            size,
            mtime_ns: crate::fsutil::ns(st.st_mtime, st.st_mtime_nsec),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink as u64,
            blocks: st.st_blocks.max(0) as u64,
            xattrs: None,
            followed: false,
        })
    }
}

/// `raw` as a relative path of plain components, or `NotBeneath`.
fn plain_relative(raw: &[u8]) -> Result<&Path, Refused> {
    if raw.is_empty() || raw.contains(&0) {
        return Err(Refused::NotBeneath);
    }
    let rel = Path::new(OsStr::from_bytes(raw));
    // `components()` folds "a//b" and "a/./b" and drops a trailing "/": anything it would
    // normalise is refused, so that the path is exactly the walk's.
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)))
        && raw
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..");
    if plain {
        Ok(rel)
    } else {
        Err(Refused::NotBeneath)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn beneath(root: &Path, patterns: &[&str], max_file_size: u64) -> Beneath {
        let patterns: Vec<(String, String)> = patterns
            .iter()
            .map(|p| ((*p).to_owned(), "test".to_owned()))
            .collect();
        Beneath::open(ScanOptions {
            root: root.to_owned(),
            excludes: Arc::new(crate::config::Excludes::new(&patterns).unwrap()),
            one_file_system: true,
            symlinks: crate::config::SymlinkPolicy::Skip,
            max_key_bytes: 1024,
            max_file_size,
            walk_concurrency: 1,
            xattrs: false,
        })
        .unwrap()
    }

    #[test]
    fn only_plain_relative_paths_are_taken() {
        for bad in [
            &b""[..],
            b"/etc/shadow",
            b"../outside",
            b"a/../../outside",
            b"./a",
            b"a/./b",
            b"a//b",
            b"a/",
            b"a\0b",
            b"..",
        ] {
            assert_eq!(
                plain_relative(bad),
                Err(Refused::NotBeneath),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(plain_relative(b"a/b c/d").is_ok());
        assert!(plain_relative(b"a/..b/c.").is_ok());
    }

    #[test]
    fn a_file_below_the_root_resolves_to_its_inode() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), b"data").unwrap();
        let b = beneath(d.path(), &[], u64::MAX);
        let e = b.resolve(b"a/b/f", "a/b/f", false).unwrap();
        let m = std::fs::metadata(d.path().join("a/b/f")).unwrap();
        assert_eq!((e.dev, e.ino, e.size), (m.dev(), m.ino(), 4));
        assert_eq!(e.path, d.path().join("a/b/f"));
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"root only").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("link")).unwrap();
        let b = beneath(d.path(), &[], u64::MAX);
        assert_eq!(
            b.resolve(b"dir/secret", "dir/secret", false),
            Err(Refused::NotADirectory("dir".into()))
        );
        assert_eq!(
            b.resolve(b"link", "link", false),
            Err(Refused::NotAFile("a symlink"))
        );
    }

    #[test]
    fn the_walk_s_rules_hold() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("cache")).unwrap();
        std::fs::create_dir_all(d.path().join(".nightcopy")).unwrap();
        std::fs::write(d.path().join("cache/f"), b"x").unwrap();
        std::fs::write(d.path().join("f.tmp"), b"x").unwrap();
        std::fs::write(d.path().join("big"), vec![0; 100]).unwrap();
        std::fs::write(d.path().join("small"), b"x").unwrap();
        std::fs::write(d.path().join(".nightcopy/manifest.gz"), b"x").unwrap();
        let b = beneath(d.path(), &["cache/**", "*.tmp"], 10);
        assert_eq!(
            b.resolve(b"cache/f", "cache/f", false),
            Err(Refused::Excluded)
        );
        assert_eq!(b.resolve(b"f.tmp", "f.tmp", false), Err(Refused::Excluded));
        assert_eq!(
            b.resolve(b"big", "big", false),
            Err(Refused::TooLarge { size: 100, max: 10 })
        );
        assert_eq!(
            b.resolve(b".nightcopy/manifest.gz", ".nightcopy/manifest.gz", false),
            Err(Refused::Reserved)
        );
        assert!(matches!(
            b.resolve(b"small", "big", false),
            Err(Refused::KeyMismatch { .. })
        ));
        assert_eq!(b.resolve(b"gone", "gone", false), Err(Refused::Vanished));
        assert!(b.resolve(b"small", "small", false).is_ok());
    }
}
