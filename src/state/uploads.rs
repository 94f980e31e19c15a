//! Multipart uploads left unfinished by a run that ended (a stop, `RuntimeMaxSec`, SIGKILL, a lost
//! network): one small record per upload in `uploads/` of the state directory, so that the next
//! run continues it instead of sending the whole file again. A file that takes longer than one
//! night to send would otherwise never land.
//!
//! A record names the upload (destination, key, upload id), the file it was cut from (size, mtime
//! and ctime in ns, inode, device) and the part size. It is only a hint: the next run uses the
//! upload only if the file still has that identity, and uses a part only if the SHA-256 S3
//! reports for it equals that of the bytes it reads now (`upload`). A record is written once the
//! upload exists, before any part is sent, so even a SIGKILL leaves it behind; an upload created
//! but never recorded (killed between the two) is left to the bucket's lifecycle rule.
//!
//! One file per upload, named by the SHA-256 of its key: records are looked up by key, written
//! atomically (0600: they hold key names), and few — at most the multipart files in flight when
//! a run ended. `uploads/` is opened once, never through a link, and held to the state
//! directory's rule (`guard::check_private`): every record is read, written and removed relative
//! to that handle.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::{self, Dir};

const DIR: &str = "uploads";
const VERSION: u32 = 1;

/// The file a multipart upload was cut from, as its stat said when the upload started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

/// One unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: u32,
    /// `Config::destination_id`: a record is never used for another bucket or prefix.
    pub destination: String,
    /// The full object key, prefix included.
    pub key: String,
    pub upload_id: String,
    pub file: FileIdentity,
    pub part_size: u64,
    /// When the upload was started (Unix seconds): how old an abandoned one is.
    pub started: u64,
}

impl Pending {
    pub fn new(
        destination: &str,
        key: &str,
        upload_id: &str,
        file: FileIdentity,
        part_size: u64,
    ) -> Pending {
        Pending {
            version: VERSION,
            destination: destination.to_owned(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            file,
            part_size,
            started: fsutil::unix_now(),
        }
    }
}

/// The records of one state directory.
pub struct Uploads {
    dir: Dir,
    destination: String,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads")
            .field("dir", &self.dir.path())
            .field("destination", &self.destination)
            .finish()
    }
}

impl Uploads {
    /// Creates `uploads/` (0700) if needed, and the state directory with it.
    pub fn open(state_dir: &Path, destination: &str) -> io::Result<Uploads> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        let dir = Dir::open(state_dir)?.subdir(DIR, 0o700)?;
        crate::guard::check_private(&dir).map_err(io::Error::other)?;
        Ok(Uploads {
            dir,
            destination: destination.to_owned(),
        })
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }

    fn name(&self, key: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.destination.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        format!("{}.json", hex::encode(h.finalize()))
    }

    /// For messages.
    fn path(&self, key: &str) -> PathBuf {
        self.dir.path().join(self.name(key))
    }

    /// The record for `key` in this destination, if there is a readable one. A damaged record is
    /// dropped with a warning: the worst it costs is one file sent again.
    pub fn find(&self, key: &str) -> Option<Pending> {
        let name = self.name(key);
        let mut text = Vec::new();
        let read = self
            .dir
            .open_read(&name)
            .and_then(|mut f| f.read_to_end(&mut text));
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    "cannot read {}: {e}; the upload starts over",
                    self.path(key).display()
                );
                return None;
            }
        }
        match serde_json::from_slice::<Pending>(&text) {
            Ok(p) if p.version == VERSION && p.key == key && p.destination == self.destination => {
                Some(p)
            }
            _ => {
                tracing::warn!(
                    "{} is not a record of an upload of this key; removed",
                    self.path(key).display()
                );
                let _ = self.dir.remove(&name);
                None
            }
        }
    }

    /// Writes (or refreshes) a record.
    pub fn save(&self, p: &Pending) -> io::Result<()> {
        let text = serde_json::to_vec(p).map_err(io::Error::other)?;
        self.dir.replace(self.name(&p.key), &text, 0o600)
    }

    /// Drops the record of `key` (its upload completed or was aborted).
    pub fn forget(&self, key: &str) {
        match self.dir.remove(self.name(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the upload record of {key}: {e}"),
        }
    }

    /// Records of this destination not written since `since`: uploads this run neither resumed
    /// nor started, whose files were not uploaded at all (deleted, excluded, now unchanged).
    pub fn older_than(&self, since: SystemTime) -> io::Result<Vec<Pending>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.dir.path())? {
            let name = entry?.file_name();
            // Read through the handle: a name that is a link or no file is skipped.
            let Ok(mut file) = self.dir.open_read(&name) else {
                continue;
            };
            let modified = file.metadata().and_then(|m| m.modified());
            if modified.is_ok_and(|m| m >= since) {
                continue;
            }
            let mut text = Vec::new();
            if file.read_to_end(&mut text).is_err() {
                continue;
            }
            if let Ok(p) = serde_json::from_slice::<Pending>(&text) {
                if p.destination == self.destination {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn identity() -> FileIdentity {
        FileIdentity {
            size: 100 << 20,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_700_000_000_223_456_789,
            ino: 42,
            dev: 7,
        }
    }

    #[test]
    fn a_record_is_found_by_its_key_only_in_its_destination() {
        let t = tempfile::tempdir().unwrap();
        let u = Uploads::open(t.path(), "aws|b|p/").unwrap();
        let p = Pending::new("aws|b|p/", "p/big.bin", "id-1", identity(), 8 << 20);
        u.save(&p).unwrap();
        assert_eq!(u.find("p/big.bin"), Some(p.clone()));
        assert_eq!(u.find("p/other.bin"), None);
        let mode = fs::metadata(u.path("p/big.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(t.path().join(DIR))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        let other = Uploads::open(t.path(), "aws|b2|p/").unwrap();
        assert_eq!(other.find("p/big.bin"), None);
        assert!(other.older_than(SystemTime::now()).unwrap().is_empty());

        let stale = u
            .older_than(SystemTime::now() + std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(stale, [p]);
        u.forget("p/big.bin");
        assert_eq!(u.find("p/big.bin"), None);
    }

    #[test]
    fn a_damaged_record_is_dropped() {
        let t = tempfile::tempdir().unwrap();
        let u = Uploads::open(t.path(), "d").unwrap();
        fs::write(u.path("k"), b"{not json").unwrap();
        assert_eq!(u.find("k"), None);
        assert!(!u.path("k").exists());
    }

    #[test]
    fn records_are_never_read_or_written_through_a_link() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join(DIR)).unwrap();
        assert!(Uploads::open(t.path(), "d").is_err());
        fs::remove_file(t.path().join(DIR)).unwrap();

        let u = Uploads::open(t.path(), "d").unwrap();
        let victim = outside.path().join("victim");
        let planted =
            serde_json::to_vec(&Pending::new("d", "k", "x", identity(), 1 << 20)).unwrap();
        fs::write(&victim, &planted).unwrap();
        std::os::unix::fs::symlink(&victim, u.path("k")).unwrap();
        assert_eq!(u.find("k"), None);
        let later = SystemTime::now() + std::time::Duration::from_secs(1);
        assert!(u.older_than(later).unwrap().is_empty());
        let p = Pending::new("d", "k", "id", identity(), 8 << 20);
        u.save(&p).unwrap();
        assert_eq!(u.find("k"), Some(p));
        assert_eq!(fs::read(&victim).unwrap(), planted);
    }
}
