//! What persists in the state directory between runs: the manifest (`manifest`), the run lock
//! (one run at a time) and the record of the last run (what `nightcopy status` shows and what the
//! minimum interval is measured from). The small files are written atomically.

pub mod manifest;
pub mod uploads;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::report::{Figures, Outcome};

const LOCK_FILE: &str = "lock";
const RECORD_FILE: &str = "last-run.json";

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
}

pub fn lock(state_dir: &Path) -> Result<RunLock, LockError> {
    let dir = state_dir.display().to_string();
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| LockError::Io(dir.clone(), e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut flock) => {
            // The PID is for the message a second run prints; the lock itself is the flock.
            let _ = flock.set_len(0);
            let _ = flock.rewind();
            let _ = writeln!(flock, "{}", std::process::id());
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
    let text = fs::read_to_string(state_dir.join(RECORD_FILE)).ok()?;
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
    crate::fsutil::replace(&state_dir.join(RECORD_FILE), &text, 0o600)
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
