//! What persists in the state directory between runs: the manifest (`manifest`), the run lock
//! (one run at a time) and the record of the last run (what `nightcopy status` shows and what the
//! minimum interval is measured from). The small files are written atomically, and every file
//! here is created, read and replaced through `fsutil::Dir` (never through a link planted at its
//! name); `guard::check_state_dir` decides first whether the directory may be used at all.

pub mod manifest;
pub mod uploads;

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, Dir};
use crate::report::{Figures, Outcome};

const LOCK_FILE: &str = "lock";
const RECORD_FILE: &str = "last-run.json";
/// A temp file idle this long belonged to a process that was killed (see `lock`). An hour, not
/// less: a `restore` next to the run may be writing its download of the manifest's copy.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Held for the whole run; released when dropped (or when the process dies, by the kernel).
pub struct RunLock {
    _flock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another nightcopy run holds the lock in {dir} (PID {pid}): this run is skipped")]
    Held { dir: String, pid: String },
    #[error(
        "cannot open the lock file in {0}: {1} (the state directory must be writable by the user \
         nightcopy runs as: check its owner and mode, and that its filesystem is not read-only)"
    )]
    Io(String, io::Error),
    #[error(
        "the lock file {0}/lock is not a plain file of its own ({1}): nothing is written through \
         it; remove it (rm {0}/lock) and nightcopy creates a new one"
    )]
    NotAFile(String, io::Error),
}

/// Takes the run lock. The holder also removes the temp files a killed run left (their names
/// are random, so nothing reuses them).
pub fn lock(state_dir: &Path) -> Result<RunLock, LockError> {
    let dir = state_dir.display().to_string();
    let handle = Dir::open(state_dir).map_err(|e| LockError::Io(dir.clone(), e))?;
    // O_NOFOLLOW, a regular file, one name: the PID below is written into this file only.
    let file = handle.open_or_create(LOCK_FILE, 0o600).map_err(|e| {
        if e.kind() == io::ErrorKind::Other {
            LockError::NotAFile(dir.clone(), e)
        } else {
            LockError::Io(dir.clone(), e)
        }
    })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut flock) => {
            // The PID is for the message a second run prints; the lock itself is the flock.
            let _ = flock.set_len(0);
            let _ = flock.rewind();
            let _ = writeln!(flock, "{}", std::process::id());
            let removed = handle.remove_stale_temp_files(STALE_TEMP);
            if removed > 0 {
                tracing::info!("removed {removed} temp file(s) a killed run left in {dir}");
            }
            Ok(RunLock { _flock: flock })
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            Err(LockError::Held {
                dir,
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.into()
                },
            })
        }
        Err((_, e)) => Err(LockError::Io(dir, io::Error::from(e))),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Seconds since the epoch.
    pub started: u64,
    pub ended: u64,
    pub outcome: Outcome,
    pub exit_code: u8,
    pub figures: Figures,
    /// The error that ended a fatal run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Start of the most recent successful run, carried over by runs that did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_started: Option<u64>,
    /// Its end, carried over the same way (records written before it existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_ended: Option<u64>,
    #[serde(default)]
    pub metrics_published: bool,
}

pub fn read_record(state_dir: &Path) -> Option<RunRecord> {
    let mut text = String::new();
    match fsutil::open_read(&state_dir.join(RECORD_FILE)) {
        Ok(mut f) => f.read_to_string(&mut text).ok()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("ignoring {RECORD_FILE} in {}: {e}", state_dir.display());
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(
                "ignoring damaged {RECORD_FILE} in {}: {e}",
                state_dir.display()
            );
            None
        }
    }
}

pub fn write_record(state_dir: &Path, record: &RunRecord) -> io::Result<()> {
    // One write: serde_json writes token by token, a syscall each on an unbuffered file.
    let mut text = serde_json::to_vec_pretty(record)?;
    text.push(b'\n');
    fsutil::replace(&state_dir.join(RECORD_FILE), &text, 0o600)
}

/// `Some(message)` when the last success is too recent for another run.
pub fn too_soon(record: Option<&RunRecord>, min_interval: Duration, now: u64) -> Option<String> {
    let last = record?.last_success_started?;
    // A last success in the future means the clock was stepped back since: skipping would hold
    // off every backup until the clock catches up, so run, and say why.
    if last > now + 300 {
        tracing::warn!(
            "the last success is recorded at {}, in the future: the clock was changed; not skipping",
            format_time(last)
        );
        return None;
    }
    let ago = now.saturating_sub(last);
    (ago < min_interval.as_secs()).then(|| {
        format!(
            "skipped: the last successful run started {} ago ({}), less than guard.min-interval ({}); \
             nothing to do until then (nightcopy run --force runs anyway)",
            humantime::format_duration(Duration::from_secs(ago)),
            format_time(last),
            humantime::format_duration(min_interval)
        )
    })
}

pub fn format_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The human form of `nightcopy status`.
pub fn describe(record: &RunRecord, now: u64) -> String {
    let ago = |t: u64| humantime::format_duration(Duration::from_secs(now.saturating_sub(t)));
    let g = &record.figures;
    let mut s = format!(
        "last run:     {} ({} ago), took {:.0}s\n\
         outcome:      {} (exit code {}){}\n\
         figures:      {} files transferred ({} bytes), {} checks, {} transfer errors\n",
        format_time(record.started),
        ago(record.started),
        g.elapsed_seconds,
        record.outcome.as_str(),
        record.exit_code,
        if record.metrics_published {
            ""
        } else {
            ", metrics NOT published"
        },
        g.files_transferred,
        g.bytes_transferred,
        g.checks,
        g.transfer_errors,
    );
    if let Some(e) = &record.error {
        s.push_str(&format!("error:        {e}\n"));
    }
    match record.last_success_started {
        Some(t) => s.push_str(&format!(
            "last success: {} ({} ago)\n",
            format_time(t),
            ago(t)
        )),
        None => s.push_str("last success: never\n"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_pid() {
        let d = tempfile::tempdir().unwrap();
        let held = lock(d.path()).unwrap();
        match lock(d.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{:?}", other.err()),
        }
        drop(held);
        lock(d.path()).unwrap();
    }

    /// Regression: the lock was opened by name with O_CREAT and no O_NOFOLLOW, truncated and given
    /// the PID, so a link planted at `lock` made root overwrite any file.
    #[test]
    fn a_link_planted_at_the_lock_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(LOCK_FILE)).unwrap();
        let err = lock(d.path())
            .err()
            .expect("the lock is not taken through a link");
        assert!(err.to_string().contains("rm "), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        // Nor is a missing file created through a dangling link.
        std::fs::remove_file(d.path().join(LOCK_FILE)).unwrap();
        std::os::unix::fs::symlink(outside.path().join("new"), d.path().join(LOCK_FILE)).unwrap();
        assert!(lock(d.path()).is_err());
        assert!(!outside.path().join("new").exists());
    }

    /// Regression: `last-run.json.new` was opened the same way.
    #[test]
    fn a_link_planted_at_the_record_temp_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        let tmp = d.path().join(format!("{RECORD_FILE}.new"));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let r = RunRecord {
            started: 1,
            ended: 2,
            outcome: Outcome::Success,
            exit_code: 0,
            figures: Figures::default(),
            error: None,
            last_success_started: Some(1),
            last_success_ended: Some(2),
            metrics_published: true,
        };
        write_record(d.path(), &r).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        assert_eq!(read_record(d.path()), Some(r));
        // A record that is a link is not read either.
        std::fs::remove_file(d.path().join(RECORD_FILE)).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(RECORD_FILE)).unwrap();
        assert_eq!(read_record(d.path()), None);
    }

    #[test]
    fn record_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_record(d.path()).is_none());
        let r = RunRecord {
            started: 100,
            ended: 160,
            outcome: Outcome::Success,
            exit_code: 0,
            figures: Figures::default(),
            error: None,
            last_success_started: Some(100),
            last_success_ended: Some(160),
            metrics_published: true,
        };
        write_record(d.path(), &r).unwrap();
        assert_eq!(read_record(d.path()), Some(r));
    }

    #[test]
    fn min_interval_counts_from_the_last_success() {
        let h = 3600;
        let rec = |last| RunRecord {
            started: 0,
            ended: 0,
            outcome: Outcome::Failed,
            exit_code: 1,
            figures: Figures::default(),
            error: None,
            last_success_started: last,
            last_success_ended: None,
            metrics_published: true,
        };
        let twenty = Duration::from_secs(20 * h);
        assert!(too_soon(None, twenty, 100 * h).is_none());
        assert!(too_soon(Some(&rec(None)), twenty, 100 * h).is_none());
        assert!(too_soon(Some(&rec(Some(90 * h))), twenty, 100 * h).is_some());
        assert!(too_soon(Some(&rec(Some(80 * h))), twenty, 100 * h).is_none());
        // the clock went back a day after the last success: run anyway
        assert!(too_soon(Some(&rec(Some(124 * h))), twenty, 100 * h).is_none());
    }
}
