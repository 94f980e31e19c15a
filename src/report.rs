//! What a command did, counted where it happens, and how it ended. Each event is one function that
//! writes the log line and bumps the counter together, so the journal and the figures cannot
//! disagree.
//!
//! The reporting core every command shares lives here: one [`Outcome`] (decided once), one
//! [`Ending`] that every command returns and the exit code follows from, one kind of per-file
//! error ([`FileErrorKind`], with [`file_error`] as its one log line), and one
//! [`summary!`](crate::summary) that logs a command's closing line at the level its exit code
//! calls for. The figures differ per command (a backup's, a verify's, a
//! restore's), so each command keeps its own counters.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::config::StorageClass;
use crate::exit;
use crate::keys::shown;
use crate::stop::Stop;

/// MESSAGE_ID of a backup's summary line in the journal, fixed so `journalctl MESSAGE_ID=…` finds
/// every run's summary (docs/operations.md).
pub const SUMMARY_MESSAGE_ID: &str = "6b3c2f0a9d7e4c1f8e5a2b4d6c8e0f13";

/// Live counters of a backup, shared by the pipeline stages.
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
    /// Queue polls answered (a coordinator waiting for workers, a worker waiting for work): they
    /// show the process is alive, so the watchdog is fed while it waits.
    polls: AtomicU64,
    /// Multipart uploads continued from an earlier run, and the bytes their parts already held.
    resumed_files: AtomicU64,
    resumed_bytes: AtomicU64,
    /// Files and bytes per storage class: index 0 is the bucket's default (no class sent), then
    /// `StorageClass::ALL` in order.
    by_class: [(AtomicU64, AtomicU64); CLASS_SLOTS],
}

const CLASS_SLOTS: usize = StorageClass::ALL.len() + 1;

fn class_slot(class: Option<StorageClass>) -> usize {
    class.map_or(0, |c| {
        1 + StorageClass::ALL
            .iter()
            .position(|x| *x == c)
            .expect("ALL lists every class")
    })
}

/// Why a single file could not be handled. The command goes on; the file is named in the journal
/// and counted (TransferErrors for a backup). A worker's report carries it by its `as_str` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileErrorKind {
    /// open/read/stat failed (permissions, I/O error).
    Unreadable,
    /// A directory could not be listed or a symlink loops: files below it were not seen.
    Walk,
    /// The file changed while it was read, twice in a row: left for the next run.
    #[serde(rename = "changed-while-reading")]
    Changed,
    /// The name cannot become a key (too long, or collides with another name's key), or a key
    /// cannot become a path below the restore target.
    BadName,
    /// S3 refused or failed the upload after retries.
    Upload,
    /// The download failed (after the SDK's retries, and one more attempt of our own).
    Download,
    /// The bytes are not what was backed up: a checksum or the manifest's SHA-256 disagrees.
    Corrupt,
    /// Writing a restored file, its directory or its metadata failed locally.
    Write,
    /// Listed, but gone when downloaded.
    Missing,
    /// Archived (GLACIER, DEEP_ARCHIVE, an Intelligent-Tiering archive tier) and not thawed: not
    /// downloaded (restore without `--thaw`, or a thaw request S3 refused).
    Cold,
    /// Larger than `source.max-file-size`: not read.
    TooLarge,
    /// A work message named a file a worker may not back up: outside the source, through a
    /// symlink, excluded, on another file system, or under a key that is not its path's.
    Refused,
}

impl FileErrorKind {
    #[cfg(test)]
    const ALL: [FileErrorKind; 12] = [
        FileErrorKind::Unreadable,
        FileErrorKind::Walk,
        FileErrorKind::Changed,
        FileErrorKind::BadName,
        FileErrorKind::Upload,
        FileErrorKind::Download,
        FileErrorKind::Corrupt,
        FileErrorKind::Write,
        FileErrorKind::Missing,
        FileErrorKind::Cold,
        FileErrorKind::TooLarge,
        FileErrorKind::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FileErrorKind::Unreadable => "unreadable",
            FileErrorKind::Walk => "walk",
            FileErrorKind::Changed => "changed-while-reading",
            FileErrorKind::BadName => "bad-name",
            FileErrorKind::Upload => "upload",
            FileErrorKind::Download => "download",
            FileErrorKind::Corrupt => "corrupt",
            FileErrorKind::Write => "write",
            FileErrorKind::Missing => "missing",
            FileErrorKind::Cold => "cold",
            FileErrorKind::TooLarge => "too-large",
            FileErrorKind::Refused => "refused",
        }
    }
}

/// The one journal line of a per-file error: a warning naming the file (`PATH=`, its bytes as
/// they are) and the kind (`ERROR_KIND=`), with the name escaped in the message a person reads.
/// The caller counts it.
pub fn file_error<N: AsRef<std::ffi::OsStr> + ?Sized>(
    name: &N,
    kind: FileErrorKind,
    detail: &dyn fmt::Display,
) {
    tracing::warn!(
        path = %Path::new(name).display(),
        error_kind = kind.as_str(),
        "{}: {detail}",
        shown(name)
    );
}

/// Logs a command's closing summary line at the level its exit code calls for: info when it
/// succeeded, a warning when it completed with something to look at (file errors, problems found,
/// metrics not published, a skip), an error when it ended early. The arguments are `tracing`'s:
/// fields, then the message.
#[macro_export]
macro_rules! summary {
    ($exit_code:expr, $($arg:tt)+) => {
        match $crate::exit::severity($exit_code) {
            $crate::exit::Severity::Fine => tracing::info!($($arg)+),
            $crate::exit::Severity::Look => tracing::warn!($($arg)+),
            $crate::exit::Severity::Failed => tracing::error!($($arg)+),
        }
    };
}

impl Stats {
    pub fn file_error(&self, path: &Path, kind: FileErrorKind, detail: &dyn fmt::Display) {
        self.transfer_errors.fetch_add(1, Relaxed);
        file_error(path, kind, detail);
    }

    /// A second file whose key another already took: counted and named, never uploaded.
    pub fn duplicate_key(&self, path: &Path, prefix: &str, key: &str) {
        self.file_error(
            path,
            FileErrorKind::BadName,
            &format_args!(
                "its key {}{} is already used by another file's (escaped) name; rename one of them",
                shown(prefix),
                shown(key)
            ),
        );
    }

    pub fn scanned(&self) {
        self.scanned.fetch_add(1, Relaxed);
    }

    pub fn excluded(&self, path: &Path) {
        self.excluded.fetch_add(1, Relaxed);
        tracing::debug!(path = %path.display(), "excluded: {}", shown(path));
    }

    pub fn skipped_special(&self, path: &Path) {
        self.skipped_special.fetch_add(1, Relaxed);
        tracing::debug!(path = %path.display(), "skipped {}: not a regular file", shown(path));
    }

    pub fn skipped_symlink(&self, path: &Path) {
        self.skipped_symlinks.fetch_add(1, Relaxed);
        tracing::debug!(path = %path.display(), "skipped {}: a symlink (source.symlinks is skip)", shown(path));
    }

    /// A file that was in the scan but gone when it was opened: not an error, the tree moved.
    pub fn vanished(&self, path: &Path) {
        self.vanished.fetch_add(1, Relaxed);
        tracing::info!(path = %path.display(), "{}: vanished before it could be read", shown(path));
    }

    /// A scanned file whose name holds something else when it is opened (a symlink, a FIFO,
    /// another file): not read, not uploaded, counted as vanished. Said at warning level: it is
    /// what a swap by someone trying to make nightcopy read another file looks like.
    pub fn replaced(&self, path: &Path, by: &str) {
        self.vanished.fetch_add(1, Relaxed);
        tracing::warn!(
            path = %path.display(),
            "{}: replaced by {by} since the walk saw it: not read (the next run backs up what \
             is there then)",
            shown(path)
        );
    }

    pub fn remote_only(&self, key: &str) {
        self.remote_only.fetch_add(1, Relaxed);
        tracing::trace!(key, "{}: only in the bucket, left alone", shown(key));
    }

    pub fn checked(&self) {
        self.checks.fetch_add(1, Relaxed);
    }

    pub fn transferred(
        &self,
        path: &Path,
        key: &str,
        bytes: u64,
        reason: &dyn fmt::Display,
        class: Option<StorageClass>,
    ) {
        self.files_transferred.fetch_add(1, Relaxed);
        self.bytes_transferred.fetch_add(bytes, Relaxed);
        let (files, class_bytes) = &self.by_class[class_slot(class)];
        files.fetch_add(1, Relaxed);
        class_bytes.fetch_add(bytes, Relaxed);
        tracing::debug!(
            path = %path.display(),
            key,
            bytes,
            reason = %reason,
            "uploaded {} as {} ({bytes} bytes, {reason})",
            shown(path),
            shown(key)
        );
    }

    pub fn sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Relaxed);
    }

    /// A multipart upload continued from an earlier run: `bytes` were already in the bucket, in
    /// parts whose SHA-256 matched the file, and were not sent again.
    pub fn resumed(&self, key: &str, parts: usize, bytes: u64, sent: u64) {
        self.resumed_files.fetch_add(1, Relaxed);
        self.resumed_bytes.fetch_add(bytes, Relaxed);
        tracing::info!(
            key,
            resumed_bytes = bytes,
            sent_bytes = sent,
            "continued the interrupted upload of {}: {parts} parts ({}) were already in the \
             bucket, {} sent now",
            shown(key),
            bytesize::ByteSize(bytes).display().iec(),
            bytesize::ByteSize(sent).display().iec()
        );
    }

    /// A queue poll came back (with messages or empty).
    pub fn polled(&self) {
        self.polls.fetch_add(1, Relaxed);
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
            &self.polls,
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
            resumed_files: self.resumed_files.load(Relaxed),
            resumed_bytes: self.resumed_bytes.load(Relaxed),
            classes: std::iter::once(None)
                .chain(StorageClass::ALL.iter().copied().map(Some))
                .zip(&self.by_class)
                .filter(|(_, (files, _))| files.load(Relaxed) > 0)
                .map(|(class, (files, bytes))| ClassFigures {
                    class: class.map_or("default", |c| c.as_str()).to_owned(),
                    files: files.load(Relaxed),
                    bytes: bytes.load(Relaxed),
                })
                .collect(),
        }
    }
}

/// Files and bytes uploaded to one storage class ("default": no class sent, the bucket's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ClassFigures {
    pub class: String,
    pub files: u64,
    pub bytes: u64,
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
    #[serde(default)]
    pub resumed_files: u64,
    #[serde(default)]
    pub resumed_bytes: u64,
    /// Only the classes something went to.
    #[serde(default)]
    pub classes: Vec<ClassFigures>,
}

/// How a command ended, decided once; the exit code, LastSuccess, the summary line, `status` and
/// the heartbeat all derive from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Completed, with at most `success-max-errors` transfer errors.
    Success,
    /// Completed, but more files than tolerated could not be handled (named in the journal).
    FileErrors,
    /// `verify` completed and found files the bucket does not hold as they are.
    Problems,
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
            Outcome::Success => exit::SUCCESS,
            Outcome::FileErrors => exit::FILE_ERRORS,
            Outcome::Problems => exit::VERIFY_PROBLEMS,
            Outcome::Failed => exit::FATAL,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::FileErrors => "file-errors",
            Outcome::Problems => "problems",
            Outcome::Failed => "failed",
        }
    }
}

/// How a command ended, as its exit code tells it. Every command returns one, and `main` turns it
/// into the exit code: [`Ending::exit_code`] is the one place a code is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It ran; the outcome says how it went (`Failed`: a fatal error ended it).
    Ran(Outcome),
    /// A backup that succeeded, whose metrics could not be published.
    MetricsNotPublished,
    /// Not run: another run holds the lock, or the last success is within guard.min-interval.
    Skipped,
    /// A restore that read everything it could and waits for thaws of archived objects it asked
    /// for (or found running): to be run again later. Not a failure.
    Thawing,
    /// Stopped by this signal.
    Stopped(i32),
    /// The command line was wrong.
    Usage,
    /// The config cannot be used.
    Config,
}

impl Ending {
    pub const SUCCESS: Ending = Ending::Ran(Outcome::Success);
    pub const FAILED: Ending = Ending::Ran(Outcome::Failed);

    pub fn exit_code(self) -> u8 {
        match self {
            Ending::Ran(outcome) => outcome.exit_code(),
            Ending::MetricsNotPublished => exit::METRICS_NOT_PUBLISHED,
            Ending::Skipped => exit::SKIPPED,
            Ending::Thawing => exit::THAWING,
            Ending::Stopped(sig) => Stop::exit_code(sig),
            Ending::Usage => exit::USAGE,
            Ending::Config => exit::CONFIG,
        }
    }

    /// This ending, when the metrics were not published: a success says so; any other ending
    /// already says more.
    pub fn without_metrics(self) -> Ending {
        match self {
            Ending::SUCCESS => Ending::MetricsNotPublished,
            other => other,
        }
    }
}

impl From<Outcome> for Ending {
    fn from(outcome: Outcome) -> Ending {
        Ending::Ran(outcome)
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
            (Outcome::FileErrors | Outcome::Problems, false) => {
                write!(f, "backup completed with errors")?
            }
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
        )?;
        if g.resumed_files > 0 {
            write!(
                f,
                "; {} interrupted uploads continued ({} were already in the bucket)",
                g.resumed_files,
                bytesize::ByteSize(g.resumed_bytes).display().iec()
            )?;
        }
        // Said whenever a class other than the bucket's default was used, so the split a
        // small-files rule made is visible every night (and in a dry run, before it is made).
        if g.classes.iter().any(|c| c.class != "default") {
            let split: Vec<String> = g
                .classes
                .iter()
                .map(|c| {
                    format!(
                        "{} {} files ({})",
                        c.class,
                        c.files,
                        bytesize::ByteSize(c.bytes).display().iec()
                    )
                })
                .collect();
            write!(f, "; by storage class: {}", split.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Ending, FileErrorKind, Outcome};

    #[test]
    fn every_ending_has_its_documented_exit_code() {
        let cases = [
            (Ending::SUCCESS, 0),
            (Ending::FAILED, 1),
            (Ending::Ran(Outcome::FileErrors), 2),
            (Ending::MetricsNotPublished, 3),
            (Ending::Ran(Outcome::Problems), 4),
            (Ending::Thawing, 5),
            (Ending::Usage, 64),
            (Ending::Skipped, 75),
            (Ending::Config, 78),
            (Ending::Stopped(15), 143),
            (Ending::Stopped(2), 130),
        ];
        for (ending, code) in cases {
            assert_eq!(ending.exit_code(), code, "{ending:?}");
        }
        // Unpublished metrics turn only a success into exit 3.
        assert_eq!(
            Ending::SUCCESS.without_metrics(),
            Ending::MetricsNotPublished
        );
        for other in [
            Ending::FAILED,
            Ending::Ran(Outcome::FileErrors),
            Ending::Stopped(15),
        ] {
            assert_eq!(other.without_metrics(), other);
        }
    }

    #[test]
    fn a_report_names_a_kind_as_the_journal_does() {
        for k in FileErrorKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<FileErrorKind>(&json).unwrap(), k);
        }
        assert!(serde_json::from_str::<FileErrorKind>("\"made-up\"").is_err());
    }
}
