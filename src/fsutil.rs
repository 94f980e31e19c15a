//! File-system helpers more than one stage needs: a file replaced atomically (the manifest, the
//! run record, the metrics textfile), blocking work handed to tokio's pool, and the conversions
//! between stat times and nanoseconds.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A file written beside its final name (`NAME.new`) and renamed over it only by `commit`, after
/// an fsync of the file and followed by one of its directory: a reader sees the old file or the
/// whole new one, never half, even across a power cut. Dropped without `commit` (a fatal error, a
/// full disk), the unfinished file is removed instead of lingering.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path, mode: u32) -> io::Result<AtomicFile> {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".new");
        let tmp = path.with_file_name(name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            path: path.to_owned(),
        })
    }

    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.path)?;
        // Renamed: nothing left to clean up, whatever the directory sync says.
        self.tmp = PathBuf::new();
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
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
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Replaces `path` with `bytes` atomically (see [`AtomicFile`]), in one write.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = AtomicFile::create(path, mode)?;
    f.write_all(bytes)?;
    f.commit()
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

    #[test]
    fn an_uncommitted_file_is_removed_and_the_old_one_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        replace(&p, b"old", 0o644).unwrap();
        let mut f = AtomicFile::create(&p, 0o644).unwrap();
        f.write_all(b"half").unwrap();
        assert!(d.path().join("f.new").exists());
        drop(f);
        assert!(!d.path().join("f.new").exists());
        assert_eq!(fs::read(&p).unwrap(), b"old");
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
