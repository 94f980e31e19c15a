//! The restore target as directory handles: every directory below `--to` is created and opened
//! relative to its parent's handle with `O_NOFOLLOW|O_DIRECTORY`, and every file is created,
//! checked for and renamed relative to its directory's handle — never by joining strings and
//! opening paths. A symlink anywhere below the target (planted before the restore, or swapped in
//! during it) is therefore never followed: opening it fails, and that file is a counted error
//! naming the symlink. Restore runs as root into trees users may control (`--to /mnt/fs --path
//! home/alice`), so this is the line between a restore and a root write anywhere.
//!
//! `--to` itself is the operator's own argument and is opened as given.
//!
//! Why not a crate: `cap-std`'s `Dir` keeps paths beneath the directory but follows symlinks that
//! stay inside it, and a restore must not follow any (a planted `home/alice/.ssh -> ../bob/.ssh`
//! stays inside). `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` would resolve a whole parent
//! path in one call but needs Linux 5.6 and gives no directory creation; opening component by
//! component with `openat` works on every kernel, creates as it goes, and costs one call per
//! directory level per file, which a download does not notice.
//!
//! Directories nightcopy creates are 0700 and owned by the restoring user: the backup does not
//! record directory metadata, and a directory that was private must not come back
//! world-readable (docs/restore.md says how to set them afterwards).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

use crate::keys::shown;

/// Why a file's place below the target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(
        "{} is a symlink or not a directory: nothing is written through it (remove or rename it \
         to restore below it)",
        shown(.0)
    )]
    NotADirectory(PathBuf),
    #[error("{}: {}", shown(.0), .1)]
    Io(PathBuf, io::Error),
}

/// The open restore target.
pub struct Target {
    root: Arc<OwnedFd>,
    path: PathBuf,
    dirs_created: AtomicU64,
    /// Directories opened lately, by their path below the target: files come in key order, so
    /// the next file's directory is nearly always one just used, and on a network or FUSE mount
    /// each open is a round trip (two, with its close). A handle stays the directory it was
    /// opened as — a name swapped for a symlink later is still not followed.
    opened: std::sync::Mutex<std::collections::HashMap<PathBuf, Dir>>,
    root_setgid: bool,
    root_made: bool,
}

/// Directory handles kept open for reuse; past this the set starts over.
const OPEN_DIRS: usize = 256;

/// A directory below the target, open, and where it is (for messages).
#[derive(Clone)]
pub struct Dir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
    /// Set-group-ID: files made in it take its group, not the creator's.
    pub setgid: bool,
    /// Made empty by this restore (or the target, empty when it began): nothing is in it that
    /// this restore did not put there, so a name needs no lookup to know it is free.
    made: bool,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

impl Target {
    /// Opens `path` (creating it first when `create`), following it as given.
    pub fn open(path: &Path, create: bool) -> io::Result<Target> {
        let existed = path.exists();
        if create {
            std::fs::create_dir_all(path)?;
        }
        let fd = File::open(path)?;
        let m = fd.metadata()?;
        if !m.is_dir() {
            return Err(io::Error::other("not a directory"));
        }
        let root_made = !existed || std::fs::read_dir(path)?.next().is_none();
        Ok(Target {
            root_made,
            root_setgid: std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o2000 != 0,
            root: Arc::new(OwnedFd::from(fd)),
            path: path.to_owned(),
            dirs_created: AtomicU64::new(0),
            opened: std::sync::Mutex::default(),
        })
    }

    /// Directories created so far (each 0700).
    pub fn dirs_created(&self) -> u64 {
        self.dirs_created.load(Relaxed)
    }

    /// The directory that holds `rel` (a relative path of normal components, as
    /// `select::target_rel` makes them), opened component by component without following a
    /// symlink; missing directories are created 0700 when `create`, else `Ok(None)`.
    pub fn parent_of(&self, rel: &Path, create: bool) -> Result<Option<Dir>, PlaceError> {
        self.dir(rel.parent().unwrap_or(Path::new("")), create)
    }

    /// The directory `rel` itself (`""`: the target), opened as [`Target::parent_of`] opens a
    /// parent, created with its parents when `create`.
    pub fn dir(&self, parent: &Path, create: bool) -> Result<Option<Dir>, PlaceError> {
        let rel = parent;
        // The deepest directory on the way that is open already.
        let (start, mut below) = {
            let opened = self.opened.lock().expect("not poisoned");
            let mut hit = None;
            for (n, a) in parent.ancestors().enumerate() {
                if let Some(d) = opened.get(a) {
                    hit = Some((d.clone(), n));
                    break;
                }
            }
            match hit {
                Some((d, 0)) => return Ok(Some(d)),
                Some((d, n)) => (Some(d), parent.ancestors().nth(n).map(Path::to_path_buf)),
                None => (None, None),
            }
        };
        let (mut fd, mut path, mut setgid, mut made_all) = match start {
            Some(d) => (d.fd, d.path, d.setgid, d.made),
            None => (
                self.root.clone(),
                self.path.clone(),
                self.root_setgid,
                self.root_made,
            ),
        };
        let rest = match &below {
            Some(b) => rel.strip_prefix(b).unwrap_or(rel),
            None => rel,
        };
        let mut key = below.take().unwrap_or_default();
        let parents: Vec<&OsStr> = rest
            .components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(PlaceError::Io(
                    rel.to_owned(),
                    io::Error::other("not a plain relative path"),
                )),
            })
            .collect::<Result<_, _>>()?;
        for name in parents {
            path.push(name);
            // A directory made here inherits set-group-ID from its parent; one that was there
            // says with a stat.
            let mut made = false;
            let opened = match openat(fd.as_fd(), name, dir_flags(), Mode::empty()) {
                Err(Errno::ENOENT) if create => {
                    match mkdirat(fd.as_fd(), name, Mode::S_IRWXU) {
                        Ok(()) => {
                            made = true;
                            self.dirs_created.fetch_add(1, Relaxed);
                        }
                        // Made meanwhile by another download: open what is there, as strictly.
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(PlaceError::Io(path, e.into())),
                    }
                    openat(fd.as_fd(), name, dir_flags(), Mode::empty())
                }
                other => other,
            };
            fd = match opened {
                Ok(f) => Arc::new(f),
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(PlaceError::NotADirectory(path)),
                Err(e) => return Err(PlaceError::Io(path, e.into())),
            };
            made_all = made;
            if !made {
                setgid = fstat(fd.as_fd())
                    .map_err(|e| PlaceError::Io(path.clone(), e.into()))?
                    .st_mode
                    & 0o2000
                    != 0;
            }
            key.push(name);
            self.keep(&key, &fd, &path, (setgid, made));
        }
        Ok(Some(Dir {
            fd,
            path,
            setgid,
            made: made_all,
        }))
    }

    fn keep(&self, key: &Path, fd: &Arc<OwnedFd>, path: &Path, (setgid, made): (bool, bool)) {
        let mut opened = self.opened.lock().expect("not poisoned");
        if opened.len() >= OPEN_DIRS {
            opened.clear();
        }
        opened.insert(
            key.to_owned(),
            Dir {
                fd: fd.clone(),
                path: path.to_owned(),
                setgid,
                made,
            },
        );
    }

    /// Whether something (a file, a directory, a symlink — even a dangling one) is at `rel`.
    pub fn exists(&self, rel: &Path) -> Result<bool, PlaceError> {
        match self.parent_of(rel, false)? {
            None => Ok(false),
            Some(dir) => dir.exists(rel.file_name().unwrap_or_default()),
        }
    }
}

impl Dir {
    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self, name: &OsStr) -> Result<bool, PlaceError> {
        if self.made {
            return Ok(false);
        }
        match fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(PlaceError::Io(self.path.join(name), e.into())),
        }
    }

    /// Creates `name` new (never an existing name, never through a symlink) with permission
    /// bits `mode` (the file's own, set-id aside: a temp name nobody knows beforehand, holding
    /// bytes the final file shows to the same readers).
    pub fn create_new(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        // Read too: a large file's ranges are hashed as the file holds them (`ranges`). The
        // creating open has the access it asks for whatever `mode` says.
        let flags =
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            self.fd.as_fd(),
            name,
            flags,
            Mode::from_bits_truncate(mode & 0o777),
        )?;
        Ok(File::from(fd))
    }

    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        Ok(unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir)?)
    }

    /// Gives the finished temp file `tmp` its real name; without `overwrite` the rename itself
    /// refuses an existing name, so a file created meanwhile is never replaced. With it, a
    /// symlink at the name is replaced, never followed.
    pub fn place(&self, tmp: &OsStr, name: &OsStr, overwrite: bool) -> io::Result<()> {
        let fd = self.fd.as_fd();
        if overwrite {
            return Ok(renameat(fd, tmp, fd, name)?);
        }
        match renameat2(fd, tmp, fd, name, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            // Filesystems without RENAME_NOREPLACE: a hard link refuses an existing name just as
            // atomically.
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                linkat(fd, tmp, fd, name, nix::fcntl::AtFlags::empty())?;
                self.remove(tmp)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// How a symlink, FIFO or device node is given its owner and mtime: by name within its
/// directory, never following it.
pub struct NodeMeta {
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Only root can give a file to someone else.
    pub chown: bool,
}

impl Dir {
    /// Opens directory `name` itself (not following a symlink), to set its metadata.
    pub fn open_dir(&self, name: &OsStr) -> Result<File, PlaceError> {
        match openat(self.fd.as_fd(), name, dir_flags(), Mode::empty()) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                Err(PlaceError::NotADirectory(self.path.join(name)))
            }
            Err(e) => Err(PlaceError::Io(self.path.join(name), e.into())),
        }
    }

    /// Creates a symlink at `name` holding `target` (bytes as recorded: never resolved, never
    /// followed, by this or by anything later in the restore — every later open below the target
    /// is `O_NOFOLLOW`). Made under a temp name and renamed into place, so `overwrite` replaces
    /// what is there atomically and, without it, an existing name is never replaced.
    pub fn symlink(
        &self,
        tmp: &OsStr,
        name: &OsStr,
        target: &OsStr,
        meta: &NodeMeta,
        overwrite: bool,
    ) -> io::Result<()> {
        nix::unistd::symlinkat(target, self.fd.as_fd(), tmp)?;
        let done = self
            .node_meta(tmp, meta)
            .and_then(|()| self.place(tmp, name, overwrite));
        if done.is_err() {
            let _ = self.remove(tmp);
        }
        done
    }

    /// Creates a FIFO or (as root, when asked) a device node at `name`, like [`Dir::symlink`].
    pub fn node(
        &self,
        tmp: &OsStr,
        name: &OsStr,
        (kind, perm, rdev): (SFlag, u32, u64),
        meta: &NodeMeta,
        overwrite: bool,
    ) -> io::Result<()> {
        let perm = Mode::from_bits_truncate(perm & 0o777);
        nix::sys::stat::mknodat(self.fd.as_fd(), tmp, kind, perm, rdev)?;
        // mknod applied the umask. Not following a link: the name is the node just made, or
        // something swapped in, which is then not changed.
        let done = nix::sys::stat::fchmodat(
            self.fd.as_fd(),
            tmp,
            perm,
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(io::Error::from)
        .and_then(|()| self.node_meta(tmp, meta))
        .and_then(|()| self.place(tmp, name, overwrite));
        if done.is_err() {
            let _ = self.remove(tmp);
        }
        done
    }

    /// Owner and mtime of the node at `name` itself (`AT_SYMLINK_NOFOLLOW`).
    fn node_meta(&self, name: &OsStr, meta: &NodeMeta) -> io::Result<()> {
        if meta.chown {
            nix::unistd::fchownat(
                self.fd.as_fd(),
                name,
                Some(nix::unistd::Uid::from_raw(meta.uid)),
                Some(nix::unistd::Gid::from_raw(meta.gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        let t = nix::sys::time::TimeSpec::from_duration(
            crate::fsutil::system_time(meta.mtime_ns)
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        nix::sys::stat::utimensat(
            self.fd.as_fd(),
            name,
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }

    /// Links `name` here to `existing` in `from` (a hard link; `linkat` without
    /// `AT_SYMLINK_FOLLOW`, so a symlink at `existing` is linked itself, never what it points at).
    /// Never replaces an existing name.
    pub fn link_from(&self, from: &Dir, existing: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(linkat(
            from.fd.as_fd(),
            existing,
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::empty(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn nothing_is_written_through_a_symlink_on_the_way() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        let to = t.path().join("to");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(to.join("real")).unwrap();
        symlink(&outside, to.join("link")).unwrap();
        symlink("real", to.join("inside-link")).unwrap();
        let target = Target::open(&to, false).unwrap();

        for rel in ["link/profile.d/x.sh", "inside-link/x", "link/x"] {
            let err = target.parent_of(Path::new(rel), true).err();
            assert!(
                matches!(err, Some(PlaceError::NotADirectory(_))),
                "{rel}: {err:?}"
            );
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        let dir = target
            .parent_of(Path::new("a/b/c.txt"), true)
            .unwrap()
            .unwrap();
        assert_eq!(dir.path(), to.join("a/b"));
        assert_eq!(target.dirs_created(), 2);
        let mode = std::fs::metadata(to.join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(target
            .parent_of(Path::new("missing/x"), false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn placing_never_replaces_without_overwrite_and_never_follows() {
        let t = tempfile::tempdir().unwrap();
        let to = t.path().join("to");
        std::fs::create_dir_all(&to).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "root's").unwrap();
        symlink(&victim, to.join("f")).unwrap();
        let target = Target::open(&to, false).unwrap();
        let dir = target.parent_of(Path::new("f"), true).unwrap().unwrap();
        assert!(
            dir.exists(OsStr::new("f")).unwrap(),
            "a dangling or not, a symlink is there"
        );
        std::io::Write::write_all(
            &mut dir.create_new(OsStr::new("tmp"), 0o600).unwrap(),
            b"new",
        )
        .unwrap();
        let kept = dir
            .place(OsStr::new("tmp"), OsStr::new("f"), false)
            .unwrap_err();
        assert_eq!(kept.kind(), io::ErrorKind::AlreadyExists);
        dir.place(OsStr::new("tmp"), OsStr::new("f"), true).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        assert_eq!(std::fs::read(to.join("f")).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(to.join("f"))
            .unwrap()
            .is_symlink());
        // A name that exists is never opened for creation.
        assert!(dir.create_new(OsStr::new("f"), 0o600).is_err());
    }
}
