//! File-system helpers more than one stage needs: files in a directory nightcopy keeps (the state
//! directory, the metrics textfile's) created, replaced, read and removed relative to a handle of
//! that directory, blocking work handed to tokio's pool, and the conversions between stat times
//! and nanoseconds.
//!
//! nightcopy runs as root or with CAP_DAC_READ_SEARCH, so a name in such a directory is never
//! trusted to be what nightcopy left there: a link planted at it would take root's write or read
//! elsewhere. New files are created `O_CREAT|O_EXCL|O_NOFOLLOW` (an existing name, a symlink
//! included, is an error, never opened); a temp file's name carries 64 random bits, so nobody can
//! plant something at it beforehand; reads are `O_NOFOLLOW|O_NONBLOCK` and take only a regular
//! file; renames and removals are `renameat`/`unlinkat` within the directory's handle, which
//! replace or remove a link itself, never what it points at. Whether such a directory may be used
//! at all (its owner, its mode) is `guard`'s rule.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag, AT_FDCWD};
use nix::sys::stat::{fstat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};

/// An open directory. Its path is for messages (and for `read_dir`); every file operation goes
/// through the handle, so a component of the path swapped for a link after the open changes
/// nothing.
#[derive(Clone)]
pub struct Dir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl Dir {
    /// Opens `path` as given: it is the operator's (a config key), so links on the way to it are
    /// followed, as they would be by any path.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd: Arc::new(fd),
            path: path.to_owned(),
        })
    }

    /// The directory `name` in this one, created with `mode` if missing; a symlink there is an
    /// error (ELOOP/ENOTDIR), never followed.
    pub fn subdir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<Dir> {
        let name = name.as_ref();
        match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd: Arc::new(fd),
            path: self.path.join(name),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's own stat, from its handle.
    pub fn stat(&self) -> io::Result<FileStat> {
        Ok(fstat(self.fd.as_fd())?)
    }

    /// Opens `name` for reading: only a regular file, never through a symlink, and a FIFO planted
    /// at the name cannot make the open wait. `NotFound` when there is nothing there.
    pub fn open_read(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
        open_regular(self.fd.as_fd(), name.as_ref(), OFlag::O_RDONLY, 0)
    }

    /// Creates `name` new, read-write, with `mode`: an existing name, a symlink included, is
    /// `AlreadyExists`.
    pub fn create_new(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        let fd = openat(
            self.fd.as_fd(),
            name.as_ref(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        Ok(File::from(fd))
    }

    /// [`create_new`](Dir::create_new) after removing whatever is at `name` (a leftover of a
    /// process that was killed, or a planted link: the link goes, not what it points at). For
    /// working files of a fixed name; if something is planted again in between, this fails.
    pub fn create_fresh(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        match self.remove(name.as_ref()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.create_new(name, mode)
    }

    /// Opens `name` read-write, creating it if missing (a lock file): never through a symlink
    /// (ELOOP), and only a regular file with no other name, so nothing written to it lands in a
    /// file linked there.
    pub fn open_or_create(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        let file = open_regular(
            self.fd.as_fd(),
            name.as_ref(),
            OFlag::O_RDWR | OFlag::O_CREAT,
            mode,
        )?;
        if file.metadata()?.nlink() != 1 {
            return Err(io::Error::other(format!(
                "{} has other names (hard links)",
                self.path.join(name.as_ref()).display()
            )));
        }
        Ok(file)
    }

    /// Removes the name `name` (a link itself, never its target).
    pub fn remove(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        Ok(unlinkat(
            self.fd.as_fd(),
            name.as_ref(),
            UnlinkatFlags::NoRemoveDir,
        )?)
    }

    /// Replaces `name` with `bytes` atomically (see [`AtomicFile`]), in one write.
    pub fn replace(&self, name: impl AsRef<OsStr>, bytes: &[u8], mode: u32) -> io::Result<()> {
        let mut f = AtomicFile::create_in(self, name, mode)?;
        f.write_all(bytes)?;
        f.commit()
    }

    /// Removes the temp files of [`AtomicFile`]s that were never committed nor dropped (their
    /// process was killed) and not written to for `age`: a fixed temp name would be reused, a
    /// random one is not. Errors are ignored: this is housekeeping.
    pub fn remove_stale_temp_files(&self, age: Duration) -> usize {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for name in entries.filter_map(|e| e.ok()).map(|e| e.file_name()) {
            if !is_temp_name(&name) {
                continue;
            }
            let Ok(file) = self.open_read(&name) else {
                continue;
            };
            let idle = file
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok());
            if idle.is_some_and(|idle| idle >= age) && self.remove(&name).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    fn sync(&self) -> io::Result<()> {
        Ok(fsync(self.fd.as_fd())?)
    }
}

/// `openat(dir, name, flags|O_NOFOLLOW|O_NONBLOCK|O_NOCTTY|O_CLOEXEC)`, then `fstat`: a regular
/// file or an error naming what is there instead. What is refused (a symlink, another type, a
/// second name in `open_or_create`) is an `ErrorKind::Other` error, which callers tell apart from
/// the system's own.
fn open_regular(dir: impl AsFd, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| match e {
        Errno::ELOOP => io::Error::other(format!(
            "{} is a symlink: it is not followed",
            Path::new(name).display()
        )),
        e => e.into(),
    })?;
    let st = fstat(fd.as_fd())?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            Path::new(name).display()
        )));
    }
    // O_NONBLOCK was for the open only; on a regular file it changes nothing after it.
    Ok(File::from(fd))
}

/// Opens the file at `path` for reading as [`Dir::open_read`] does: only a regular file, not
/// through a symlink at its last component (the ones before are the directory's path).
pub fn open_read(path: &Path) -> io::Result<File> {
    open_regular(AT_FDCWD, path.as_os_str(), OFlag::O_RDONLY, 0)
}

/// Where `path` is: its directory, opened, and its name in it.
fn split(path: &Path) -> io::Result<(Dir, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((Dir::open(parent)?, name.to_owned()))
}

/// The temp name of a file being written as `name`: `NAME.<16 hex digits>.new`. Never ends in the
/// final name's extension, so a collector reading `*.prom` from the metrics directory never reads
/// a half file.
fn temp_name(name: &OsStr) -> io::Result<OsString> {
    let mut random = [0u8; 8];
    // /dev/urandom through std: no crate for eight bytes a file.
    File::open("/dev/urandom")?.read_exact(&mut random)?;
    let mut tmp = name.to_owned();
    tmp.push(format!(".{}.new", hex::encode(random)));
    Ok(tmp)
}

fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    let Some(rest) = b.strip_suffix(b".new") else {
        return false;
    };
    rest.len() > 17
        && rest[rest.len() - 17] == b'.'
        && rest[rest.len() - 16..].iter().all(u8::is_ascii_hexdigit)
}

/// A file written under a temp name beside its final name and renamed over it only by `commit`,
/// after an fsync of the file and followed by one of its directory: a reader sees the old file or
/// the whole new one, never half, even across a power cut. Dropped without `commit` (a fatal
/// error, a full disk), the unfinished file is removed instead of lingering. Created, renamed and
/// removed relative to the directory's handle (see the module's note).
pub struct AtomicFile {
    file: Option<File>,
    dir: Dir,
    /// Empty once renamed.
    tmp: OsString,
    name: OsString,
}

impl AtomicFile {
    pub fn create(path: &Path, mode: u32) -> io::Result<AtomicFile> {
        let (dir, name) = split(path)?;
        AtomicFile::create_in(&dir, name, mode)
    }

    pub fn create_in(dir: &Dir, name: impl AsRef<OsStr>, mode: u32) -> io::Result<AtomicFile> {
        let name = name.as_ref().to_owned();
        let tmp = temp_name(&name)?;
        let file = dir.create_new(&tmp, mode)?;
        Ok(AtomicFile {
            file: Some(file),
            dir: dir.clone(),
            tmp,
            name,
        })
    }

    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()?;
        drop(file);
        let fd = self.dir.fd.as_fd();
        renameat(fd, self.tmp.as_os_str(), fd, self.name.as_os_str())?;
        // Renamed: nothing left to clean up, whatever the directory sync says.
        self.tmp = OsString::new();
        self.dir.sync()
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = self.dir.remove(&self.tmp);
        }
    }
}

/// Replaces `path` with `bytes` atomically (see [`AtomicFile`]), in one write.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = split(path)?;
    dir.replace(name, bytes, mode)
}

/// An unnamed file for scratch data (0600, in `$TMPDIR` or /tmp): it has no name anyone could
/// open or replace, and it is gone when closed, also after a crash. Where the filesystem has no
/// `O_TMPFILE`, a fresh name is created exclusively and unlinked at once.
pub fn anonymous_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    let rw = OFlag::O_RDWR | OFlag::O_CLOEXEC;
    match nix::fcntl::open(&dir, rw | OFlag::O_TMPFILE, Mode::from_bits_truncate(0o600)) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::EOPNOTSUPP | Errno::EISDIR) => {
            let mut random = [0u8; 8];
            File::open("/dev/urandom")?.read_exact(&mut random)?;
            let path = dir.join(format!(".nightcopy-scratch-{}", hex::encode(random)));
            let fd = nix::fcntl::open(
                &path,
                rw | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o600),
            )?;
            std::fs::remove_file(&path)?;
            Ok(File::from(fd))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs blocking file work on tokio's blocking pool; a panic there becomes an I/O error.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("file task failed: {e}"))))
}

/// A stat time (seconds and nanoseconds) as nanoseconds since the epoch.
pub fn ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Nanoseconds since the epoch (negative before it) as a `SystemTime`.
pub fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Whole seconds since the epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replace_leaves_only_the_final_file_with_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        replace(&p, b"one", 0o600).unwrap();
        replace(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
    }

    fn names(dir: &Path) -> Vec<OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_uncommitted_file_is_removed_and_the_old_one_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        replace(&p, b"old", 0o644).unwrap();
        let mut f = AtomicFile::create(&p, 0o644).unwrap();
        f.write_all(b"half").unwrap();
        let during = names(d.path());
        assert_eq!(during.len(), 2, "{during:?}");
        assert!(during.iter().any(|n| is_temp_name(n)), "{during:?}");
        drop(f);
        assert_eq!(names(d.path()), ["f"]);
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    /// Regression: the temp file was `NAME.new`, opened with O_CREAT|O_TRUNC and no O_NOFOLLOW, so
    /// whoever could write the directory made root write the new contents into any file.
    #[test]
    fn a_link_planted_at_the_old_temp_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"root's").unwrap();
        for name in ["f.new", "f"] {
            std::os::unix::fs::symlink(&victim, d.path().join(name)).unwrap();
        }
        replace(&d.path().join("f"), b"chosen bytes", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"root's");
        // The link at the final name is replaced, not followed; the other one is left alone.
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"chosen bytes");
        assert!(fs::symlink_metadata(d.path().join("f"))
            .unwrap()
            .file_type()
            .is_file());
        assert!(fs::symlink_metadata(d.path().join("f.new"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn temp_names_are_unpredictable_and_recognised() {
        let a = temp_name(OsStr::new("manifest")).unwrap();
        let b = temp_name(OsStr::new("manifest")).unwrap();
        assert_ne!(a, b);
        assert!(is_temp_name(&a), "{a:?}");
        for not in [
            "manifest",
            "f.new",
            "manifest.0123456789abcdeg.new",
            "x.prom",
        ] {
            assert!(!is_temp_name(OsStr::new(not)), "{not}");
        }
    }

    #[test]
    fn only_regular_files_are_read_and_never_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let dir = Dir::open(d.path()).unwrap();
        fs::write(d.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("file"), d.path().join("link")).unwrap();
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::S_IRWXU).unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        assert!(dir.open_read("file").is_ok());
        assert!(open_read(&d.path().join("file")).is_ok());
        for name in ["link", "fifo", "sub"] {
            // A FIFO would block an open without O_NONBLOCK: the test would hang, not fail.
            assert!(dir.open_read(name).is_err(), "{name}");
            assert!(open_read(&d.path().join(name)).is_err(), "{name}");
        }
        assert_eq!(
            dir.open_read("missing").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_lock_is_never_opened_through_a_link_nor_a_second_name() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"root's").unwrap();
        let dir = Dir::open(d.path()).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("link")).unwrap();
        assert!(dir.open_or_create("link", 0o600).is_err());
        // A dangling link is not created through either.
        std::os::unix::fs::symlink(outside.path().join("new"), d.path().join("dangling")).unwrap();
        assert!(dir.open_or_create("dangling", 0o600).is_err());
        assert!(!outside.path().join("new").exists());
        fs::hard_link(&victim, d.path().join("hard")).unwrap();
        assert!(dir.open_or_create("hard", 0o600).is_err());
        assert!(dir.open_or_create("lock", 0o600).is_ok());
        assert!(dir.open_or_create("lock", 0o600).is_ok());
    }

    #[test]
    fn fresh_files_replace_what_was_at_their_name_without_following_it() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"root's").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("spool")).unwrap();
        let dir = Dir::open(d.path()).unwrap();
        dir.create_fresh("spool", 0o600)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"root's");
        assert_eq!(fs::read(d.path().join("spool")).unwrap(), b"x");
        assert!(dir.create_new("spool", 0o600).is_err());
    }

    #[test]
    fn a_subdir_is_created_private_and_a_link_in_its_place_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dir = Dir::open(d.path()).unwrap();
        let sub = dir.subdir("sub", 0o700).unwrap();
        assert_eq!(sub.path(), d.path().join("sub"));
        assert_eq!(sub.stat().unwrap().st_mode & 0o777, 0o700);
        dir.subdir("sub", 0o700).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("elsewhere")).unwrap();
        assert!(dir.subdir("elsewhere", 0o700).is_err());
    }

    #[test]
    fn stale_temp_files_are_removed_and_fresh_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dir = Dir::open(d.path()).unwrap();
        let writing = AtomicFile::create_in(&dir, "f", 0o600).unwrap();
        let stale = temp_name(OsStr::new("manifest")).unwrap();
        let file = dir.create_new(&stale, 0o600).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        file.set_times(fs::FileTimes::new().set_modified(old))
            .unwrap();
        fs::write(d.path().join("keep.new"), b"not ours").unwrap();
        assert_eq!(dir.remove_stale_temp_files(Duration::from_secs(3600)), 1);
        assert!(!d.path().join(&stale).exists());
        assert_eq!(names(d.path()).len(), 2, "{:?}", names(d.path()));
        writing.commit().unwrap();
        assert_eq!(names(d.path()), ["f", "keep.new"]);
    }

    #[test]
    fn times_round_trip() {
        for n in [0i64, 1, -1, 1_700_000_000_123_456_789, -86_400_000_000_000] {
            let t = system_time(n);
            let back = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i64,
                Err(e) => -(e.duration().as_nanos() as i64),
            };
            assert_eq!(back, n);
        }
        assert_eq!(ns(2, 5), 2_000_000_005);
        assert_eq!(ns(-1, 999_999_999), -1);
    }
}
