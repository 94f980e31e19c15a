//! What a run did, counted where it happens. Each event is one function that writes the log line
//! and bumps the counter together, so the journal and the figures cannot disagree.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Live counters, shared by the pipeline stages.
#[derive(Debug, Default)]
pub struct Stats {
    files_transferred: AtomicU64,
    bytes_transferred: AtomicU64,
    checks: AtomicU64,
    transfer_errors: AtomicU64,
    scanned: AtomicU64,
    excluded: AtomicU64,
    skipped_special: AtomicU64,
    skipped_symlinks: AtomicU64,
    remote_only: AtomicU64,
    vanished: AtomicU64,
    /// Bytes of completed requests (single PUTs and parts): progress inside large files.
    bytes_sent: AtomicU64,
    listed: AtomicU64,
}

/// Why a single file was not backed up. The run goes on; the file is named in the journal and
/// counted in TransferErrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    /// open/read/stat failed (permissions, I/O error).
    Unreadable,
    /// A directory could not be listed or a symlink loops: files below it were not seen.
    Walk,
    /// The file changed while it was read, twice in a row: left for the next run.
    Changed,
    /// The name cannot become a key (too long, or collides with another name's key).
    BadName,
    /// S3 refused or failed the upload after retries.
    Upload,
}

impl FileErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileErrorKind::Unreadable => "unreadable",
            FileErrorKind::Walk => "walk",
            FileErrorKind::Changed => "changed-while-reading",
            FileErrorKind::BadName => "bad-name",
            FileErrorKind::Upload => "upload",
        }
    }
}

impl Stats {
    pub fn file_error(&self, path: &Path, kind: FileErrorKind, detail: &dyn fmt::Display) {
        self.transfer_errors.fetch_add(1, Relaxed);
        tracing::warn!(
            path = %path.display(),
            error_kind = kind.as_str(),
            "{}: {detail}",
            path.display()
        );
    }

    pub fn scanned(&self) {
        self.scanned.fetch_add(1, Relaxed);
    }

    pub fn excluded(&self, path: &Path) {
        self.excluded.fetch_add(1, Relaxed);
        tracing::debug!(path = %path.display(), "excluded: {}", path.display());
    }

    pub fn skipped_special(&self, path: &Path) {
        self.skipped_special.fetch_add(1, Relaxed);
        tracing::debug!(path = %path.display(), "skipped {}: not a regular file", path.display());
    }

    pub fn skipped_symlink(&self, path: &Path) {
        self.skipped_symlinks.fetch_add(1, Relaxed);
        tracing::debug!(path = %path.display(), "skipped {}: a symlink (source.symlinks is skip)", path.display());
    }

    /// A file that was in the scan but gone when it was opened: not an error, the tree moved.
    pub fn vanished(&self, path: &Path) {
        self.vanished.fetch_add(1, Relaxed);
        tracing::info!(path = %path.display(), "{}: vanished before it could be read", path.display());
    }

    pub fn remote_only(&self, key: &str) {
        self.remote_only.fetch_add(1, Relaxed);
        tracing::trace!(key, "{key}: only in the bucket, left alone");
    }

    pub fn checked(&self) {
        self.checks.fetch_add(1, Relaxed);
    }

    pub fn transferred(&self, path: &Path, key: &str, bytes: u64, reason: &dyn fmt::Display) {
        self.files_transferred.fetch_add(1, Relaxed);
        self.bytes_transferred.fetch_add(bytes, Relaxed);
        tracing::debug!(
            path = %path.display(),
            key,
            bytes,
            reason = %reason,
            "uploaded {} as {key} ({bytes} bytes, {reason})",
            path.display()
        );
    }

    pub fn sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Relaxed);
    }

    pub fn listed(&self, objects: u64) {
        self.listed.fetch_add(objects, Relaxed);
    }

    /// A number that grows whenever any stage makes progress: what the watchdog is fed on.
    pub fn activity(&self) -> u64 {
        [
            &self.scanned,
            &self.checks,
            &self.files_transferred,
            &self.transfer_errors,
            &self.vanished,
            &self.bytes_sent,
            &self.listed,
            &self.excluded,
            &self.remote_only,
        ]
        .iter()
        .map(|a| a.load(Relaxed))
        .sum()
    }

    /// The live one-line status for `systemctl status` and the terminal.
    pub fn status_line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(0.001);
        let sent = self.bytes_sent.load(Relaxed);
        format!(
            "{} scanned, {} uploaded ({}), {} unchanged, {} errors, {}/s",
            self.scanned.load(Relaxed),
            self.files_transferred.load(Relaxed),
            bytesize::ByteSize(self.bytes_transferred.load(Relaxed))
                .display()
                .iec(),
            self.checks.load(Relaxed),
            self.transfer_errors.load(Relaxed),
            bytesize::ByteSize((sent as f64 / secs) as u64)
                .display()
                .iec(),
        )
    }

    pub fn snapshot(&self, elapsed: Duration) -> Figures {
        Figures {
            files_transferred: self.files_transferred.load(Relaxed),
            bytes_transferred: self.bytes_transferred.load(Relaxed),
            checks: self.checks.load(Relaxed),
            transfer_errors: self.transfer_errors.load(Relaxed),
            elapsed_seconds: elapsed.as_secs_f64(),
            scanned: self.scanned.load(Relaxed),
            excluded: self.excluded.load(Relaxed),
            skipped_special: self.skipped_special.load(Relaxed),
            skipped_symlinks: self.skipped_symlinks.load(Relaxed),
            remote_only: self.remote_only.load(Relaxed),
            vanished: self.vanished.load(Relaxed),
        }
    }
}

/// The figures of a run: the first five (and elapsed) are the ones published as metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Figures {
    pub files_transferred: u64,
    pub bytes_transferred: u64,
    pub checks: u64,
    pub transfer_errors: u64,
    pub elapsed_seconds: f64,
    pub scanned: u64,
    pub excluded: u64,
    pub skipped_special: u64,
    pub skipped_symlinks: u64,
    pub remote_only: u64,
    pub vanished: u64,
}

/// How a run ended, decided once; the exit code, LastSuccess, the summary line, `status` and the
/// heartbeat all derive from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Completed, with at most `success-max-errors` transfer errors.
    Success,
    /// Completed, but more files than tolerated could not be backed up (named in the journal).
    FileErrors,
    /// Stopped by a fatal error.
    Failed,
}

impl Outcome {
    pub fn decide(figures: &Figures, fatal: bool, max_errors: u64) -> Outcome {
        if fatal {
            Outcome::Failed
        } else if figures.transfer_errors > max_errors {
            Outcome::FileErrors
        } else {
            Outcome::Success
        }
    }

    pub fn is_success(self) -> bool {
        self == Outcome::Success
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Success => crate::exit::SUCCESS,
            Outcome::FileErrors => crate::exit::FILE_ERRORS,
            Outcome::Failed => crate::exit::FATAL,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::FileErrors => "file-errors",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub outcome: Outcome,
    pub dry_run: bool,
    /// The fatal error, when there was one.
    pub error: Option<String>,
    /// `success-max-errors` in force.
    pub tolerated: u64,
    #[serde(flatten)]
    pub figures: Figures,
}

impl RunReport {
    pub fn new(figures: Figures, error: Option<String>, tolerated: u64, dry_run: bool) -> Self {
        RunReport {
            outcome: Outcome::decide(&figures, error.is_some(), tolerated),
            dry_run,
            error,
            tolerated,
            figures,
        }
    }
}

/// The one summary line of a run.
impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.figures;
        match (self.outcome, self.dry_run) {
            (_, true) => write!(f, "dry run finished (nothing uploaded)")?,
            (Outcome::Success, false) if g.transfer_errors > 0 => write!(
                f,
                "backup succeeded ({} transfer errors tolerated by success-max-errors: {})",
                g.transfer_errors, self.tolerated
            )?,
            (Outcome::Success, false) => write!(f, "backup succeeded")?,
            (Outcome::FileErrors, false) => write!(f, "backup completed with errors")?,
            (Outcome::Failed, false) => write!(
                f,
                "backup FAILED: {}",
                self.error.as_deref().unwrap_or("fatal error")
            )?,
        }
        let transferred = if self.dry_run {
            "would transfer"
        } else {
            "transferred"
        };
        write!(
            f,
            ": {} files {transferred} ({}), {} checks, {} transfer errors, {:.1}s; \
             {} scanned, {} excluded, {} special files skipped, {} symlinks skipped, \
             {} vanished, {} only in the bucket",
            g.files_transferred,
            bytesize::ByteSize(g.bytes_transferred).display().iec(),
            g.checks,
            g.transfer_errors,
            g.elapsed_seconds,
            g.scanned,
            g.excluded,
            g.skipped_special,
            g.skipped_symlinks,
            g.vanished,
            g.remote_only,
        )
    }
}
