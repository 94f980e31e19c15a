//! `nightcopy restore`: gets the files back. A backup is only as good as this command at 3 AM, so
//! its rules are the backup's rules turned around:
//!
//! - every object under the prefix (or `--path`) is downloaded into `--to`, each as a stream into
//!   a temp file beside its final name (a large one as ranges side by side, `ranges`), hashed on
//!   the way, checked (see `check`), given its mtime,
//!   mode and — as root — owner, flushed to disk, and only then renamed into place: a crash or a
//!   corrupt object never leaves a half or wrong file under a real name;
//! - an existing file is never replaced without `--overwrite` (the rename itself refuses, so a file
//!   appearing meanwhile is safe too); this also makes an interrupted restore resumable — rerun
//!   the same command and it downloads only what is not there yet;
//! - `--as-of` picks, per key, the version that was current at that time (ListObjectVersions);
//! - names come back byte-exact: an escaped key's object carries its raw path (docs/keys.md);
//! - one bad object never stops the restore: it is counted, named, and the exit code says so.
//!   Only the bucket, credentials, the listing and the target directory are fatal;
//! - an archived object (GLACIER, DEEP_ARCHIVE) is counted before anything is downloaded, and
//!   thawed with `--thaw` (`thaw`): the restore then ends with exit 5, to be run again later.
//!
//! Memory stays flat: the listing is read page by page, the manifest is merged in key order, and
//! at most `transfer.concurrency` downloads (or ranges of one) are in flight, each with one write
//! buffer.

mod ranges;
pub mod select;
mod target;
mod thaw;
mod tree;

pub use thaw::{thaw_days, ColdClass, ThawFigures, ThawOptions, THAW_PRICES};

use std::fmt;
use std::fs::{File, FileTimes, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::fsutil::{blocking, system_time};
use crate::integrity::{self as check, Reference, Stored, StreamHasher, Verdict};
use crate::keys::{self, shown};
use crate::offsite;
use crate::report::{self, Ending, FileErrorKind, Outcome};
use crate::sparse::{self, ZeroCheck};
use crate::state::manifest::{self, Cursor, ManifestEntry};
use crate::stop::{self, Stop};
use crate::store::s3::S3Store;
use crate::store::sdk::{self, SetupError};
use crate::store::{
    Download, ErrorKind, ObjectMeta, ObjectStore, StoreError, VersionMarker, META_RAW_PATH,
};
use crate::xattrs;
use ranges::Sink as _;
use select::{AsOfPicker, Pick};
use target::{Dir, PlaceError, Target};

/// Per download: bytes gathered before a write to the temp file.
const WRITE_BUF: usize = 256 * 1024;
/// A file of at most this many bytes is checked in memory before it is written (`Ctx::write`).
const IN_MEMORY: u64 = 64 * 1024;
/// Files in hand per download slot: the one downloading, and those being made durable and named
/// (`Ctx::downloads`). Into a mount where every create, write, utime, fsync and rename is a round
/// trip, these are what keeps its daemon busy: into the bench's 1 ms mount (5,000 files, 16
/// slots) 4 took 32.0 s, 8 took 24.1 s, 16 took 18.7 s. Each holds a file handle and at most
/// `IN_MEMORY` bytes, and no more than `MAX_IN_HAND` in all (or two per slot): file handles,
/// blocking threads and memory stay bounded at any concurrency (16 MiB of small files at most).
const FINISHING: usize = 16;
const MAX_IN_HAND: usize = 256;
/// Listed objects queued ahead of the downloads.
const JOBS_AHEAD: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Where the tree is recreated (the path below the source root is kept below it).
    pub to: PathBuf,
    /// Only this file or directory, relative to `source.path` (or absolute below it).
    pub path: Option<PathBuf>,
    /// Restore each key as it was at this time (nanoseconds since the epoch).
    pub as_of_ns: Option<i64>,
    /// Replace existing files.
    pub overwrite: bool,
    /// List what would be restored; download and write nothing.
    pub dry_run: bool,
    /// Keep set-user-ID and set-group-ID bits from the objects' metadata (stripped by default:
    /// whoever can write the prefix could otherwise plant a set-uid-root program).
    pub keep_setid: bool,
    /// Restore this snapshot (`nightcopy snapshots` lists them); default: the latest, or with
    /// `--as-of` the newest whose run had completed by then.
    pub snapshot: Option<String>,
    /// Every object under the path, not a snapshot's tree (files deleted before included).
    pub include_deleted: bool,
    /// Create device nodes the snapshot records (as root only).
    pub devices: bool,
    /// What to do with archived objects (`--thaw`), and the tier a thaw is priced at.
    pub thaw: ThawOptions,
}

/// Errors that end a restore. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A bad `--path`: exit 64 like any command-line error.
    #[error(transparent)]
    Usage(#[from] keys::SubpathError),
    #[error("{0}")]
    Unsupported(String),
    #[error("target directory {path}: {why}")]
    Target { path: String, why: String },
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A snapshot that cannot be used (damaged, foreign, not authenticated, a bad id).
    #[error("{0}")]
    BadSnapshot(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "interrupted by {}: files already restored are complete and stay; rerun the same command \
         to restore the rest (existing files are skipped)",
        stop::signal_name(*.0)
    )]
    Interrupted(i32),
}

impl RestoreError {
    /// How a restore this ended ends: a bad `--path` as a usage error (exit 64), an interruption
    /// with its signal, anything else as a failure.
    pub fn ending(&self) -> Ending {
        match self {
            RestoreError::Usage(_) => Ending::Usage,
            RestoreError::Interrupted(sig) => Ending::Stopped(*sig),
            _ => Ending::FAILED,
        }
    }
}

/// Live counters; each event logs its line and bumps its counter in one place.
#[derive(Debug, Default)]
pub struct RestoreStats {
    listed: AtomicU64,
    restored: AtomicU64,
    bytes: AtomicU64,
    existing: AtomicU64,
    errors: AtomicU64,
    unverified: AtomicU64,
    absent: AtomicU64,
    skipped: AtomicU64,
    dirs_created: AtomicU64,
    nodes: AtomicU64,
    not_created: AtomicU64,
    newer: AtomicU64,
    thaw: thaw::ThawStats,
    /// The snapshot being restored, once chosen.
    snapshot_id: std::sync::OnceLock<String>,
    /// Files and bytes to restore in all, when known.
    total: std::sync::OnceLock<(u64, u64)>,
}

/// The figures of a restore.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RestoreFigures {
    pub listed: u64,
    /// Files restored (in a dry run: that would be).
    pub restored: u64,
    pub bytes: u64,
    /// Files left alone because they exist (no `--overwrite`).
    pub existing: u64,
    pub errors: u64,
    /// Restored, but no SHA-256 covered them (see `check`).
    pub unverified: u64,
    /// `--as-of`: keys that did not exist at that time.
    pub absent: u64,
    /// Keys that are not files (folder markers ending in `/`).
    pub skipped: u64,
    /// Directories created below the target: from a snapshot with their recorded metadata, from
    /// the listing each 0700.
    pub dirs_created: u64,
    /// Symlinks, hard links, FIFOs and device nodes made (from a snapshot).
    pub nodes: u64,
    /// Paths of the snapshot not made: sockets, and device nodes without `--devices`.
    pub not_created: u64,
    /// Files whose snapshot names no version (an unversioned bucket) and whose object changed
    /// since: restored with their newest bytes, not the snapshot's.
    pub newer: u64,
    /// Archived objects: met cold, thaws asked for, found running; cold ones listed (`thaw`).
    #[serde(flatten)]
    pub thaw: ThawFigures,
    pub elapsed_seconds: f64,
}

impl RestoreStats {
    fn listed(&self) {
        self.listed.fetch_add(1, Relaxed);
    }

    pub fn file_error(&self, what: &str, kind: FileErrorKind, detail: &dyn fmt::Display) {
        self.errors.fetch_add(1, Relaxed);
        report::file_error(what, kind, &format_args!("not restored: {detail}"));
    }

    fn restored(&self, target: &Path, key: &str, bytes: u64, verdict: &Verdict, why: &str) {
        self.restored.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        match verdict {
            Verdict::Verified(against) => tracing::debug!(
                path = %target.display(),
                key,
                bytes,
                "restored {} from {} ({bytes} bytes, equal to {})",
                shown(target),
                shown(key),
                against.join(" and ")
            ),
            _ => {
                self.unverified.fetch_add(1, Relaxed);
                tracing::info!(
                    path = %target.display(),
                    key,
                    bytes,
                    "restored {} from {} ({bytes} bytes), but no SHA-256 covers it: {why}",
                    shown(target),
                    shown(key),
                );
            }
        }
    }

    fn planned(&self, target: &Path, key: &str, bytes: u64) {
        self.restored.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        println!("restore\t{bytes}\t{}\t{}", shown(key), shown(target));
    }

    fn existing(&self, target: &Path, key: &str, bytes: u64, dry_run: bool) {
        self.existing.fetch_add(1, Relaxed);
        if dry_run {
            println!("exists\t{bytes}\t{}\t{}", shown(key), shown(target));
        }
        tracing::debug!(
            path = %target.display(),
            "{} exists: kept (--overwrite replaces it)",
            shown(target)
        );
    }

    fn absent(&self, key: &str) {
        self.absent.fetch_add(1, Relaxed);
        tracing::debug!(key, "{}: did not exist at the --as-of time", shown(key));
    }

    fn node_made(&self) {
        self.nodes.fetch_add(1, Relaxed);
    }

    fn not_created(&self, path: &Path, what: &str) {
        self.not_created.fetch_add(1, Relaxed);
        tracing::info!(path = %path.display(), "{}: {what}, not created", shown(path));
    }

    fn newer(&self, target: &Path, key: &str) {
        self.newer.fetch_add(1, Relaxed);
        tracing::warn!(
            path = %target.display(),
            key,
            "{}: newer than the snapshot (bucket not versioned): restored with the bytes backed              up last, not those of the snapshot's run",
            shown(target)
        );
    }

    fn skipped(&self, key: &str) {
        self.skipped.fetch_add(1, Relaxed);
        tracing::debug!(key, "{}: a folder marker, not a file: skipped", shown(key));
    }

    /// The whole restore's size, when it is known before it ends (a snapshot's whole tree).
    fn expect(&self, files: u64, bytes: u64) {
        let _ = self.total.set((files, bytes));
    }
}

impl crate::notify::Watched for RestoreStats {
    /// Files and bytes so far (of the total, when known), the rates, and with a total the time
    /// left at the rate so far.
    fn status_line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(0.001);
        let (files, bytes) = (self.restored.load(Relaxed), self.bytes.load(Relaxed));
        let (existing, errors) = (self.existing.load(Relaxed), self.errors.load(Relaxed));
        let iec = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
        let rate = bytes as f64 / secs;
        let mut line = match self.total.get() {
            Some(&(all, all_bytes)) => format!(
                "{files} of {all} files restored ({} of {})",
                iec(bytes),
                iec(all_bytes)
            ),
            None => format!(
                "{files} of {} listed restored ({})",
                self.listed.load(Relaxed),
                iec(bytes)
            ),
        };
        line += &format!(
            ", {}/s, {:.0} files/s, {existing} already there, {errors} errors",
            iec(rate as u64),
            files as f64 / secs
        );
        if let Some(&(all, all_bytes)) = self.total.get() {
            // By bytes when there are many, else by files: small files are request-bound.
            let done = (files + existing + errors) as f64;
            let left = if all_bytes > 0 && bytes > 0 {
                (all_bytes.saturating_sub(bytes)) as f64 / rate
            } else if done > 0.0 {
                (all as f64 - done).max(0.0) * secs / done
            } else {
                f64::NAN
            };
            if left.is_finite() {
                line += &format!(
                    ", about {} left",
                    humantime::format_duration(Duration::from_secs(left.ceil() as u64))
                );
            }
        }
        line
    }

    fn activity(&self) -> u64 {
        [
            &self.listed,
            &self.restored,
            &self.bytes,
            &self.existing,
            &self.errors,
            &self.nodes,
        ]
        .iter()
        .map(|a| a.load(Relaxed))
        .sum()
    }
}

impl RestoreStats {
    pub fn snapshot(&self, elapsed: Duration) -> RestoreFigures {
        RestoreFigures {
            listed: self.listed.load(Relaxed),
            restored: self.restored.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            existing: self.existing.load(Relaxed),
            errors: self.errors.load(Relaxed),
            unverified: self.unverified.load(Relaxed),
            absent: self.absent.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            dirs_created: self.dirs_created.load(Relaxed),
            nodes: self.nodes.load(Relaxed),
            not_created: self.not_created.load(Relaxed),
            newer: self.newer.load(Relaxed),
            thaw: self.thaw.snapshot(),
            elapsed_seconds: elapsed.as_secs_f64(),
        }
    }
}

/// The one summary line of a restore, and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub figures: RestoreFigures,
    /// The snapshot restored; `None`: every object under the path.
    pub snapshot: Option<String>,
    pub to: PathBuf,
    pub dry_run: bool,
    pub error: Option<String>,
}

impl RestoreReport {
    pub fn outcome(&self) -> Outcome {
        if self.error.is_some() {
            Outcome::Failed
        } else if self.figures.errors > 0 {
            Outcome::FileErrors
        } else {
            Outcome::Success
        }
    }

    /// How it ends: as its outcome says, except that a restore with nothing wrong but thaws to
    /// wait for ends `Thawing` (exit 5): run it again later.
    pub fn ending(&self) -> Ending {
        match self.outcome() {
            Outcome::Success if self.figures.thaw.pending() => Ending::Thawing,
            outcome => outcome.into(),
        }
    }
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.figures;
        match (&self.error, self.dry_run, g.errors) {
            (Some(e), _, _) => write!(f, "restore FAILED: {e}")?,
            (None, true, _) => write!(f, "restore dry run finished (nothing written)")?,
            (None, false, 0) if g.thaw.pending() => {
                write!(f, "restore waits for thaws (run it again later)")?
            }
            (None, false, 0) => write!(f, "restore finished")?,
            (None, false, _) => write!(f, "restore completed with errors")?,
        }
        let restored = if self.dry_run {
            "would be restored"
        } else {
            "restored"
        };
        write!(
            f,
            ": {} files {restored} ({}) to {}, {} already there (kept; --overwrite replaces \
             them), {} errors, {} not verifiable by SHA-256, {:.1}s ({}/s, {:.0} files/s); {} \
             listed",
            g.restored,
            bytesize::ByteSize(g.bytes).display().iec(),
            self.to.display(),
            g.existing,
            g.errors,
            g.unverified,
            g.elapsed_seconds,
            bytesize::ByteSize((g.bytes as f64 / g.elapsed_seconds.max(0.001)) as u64)
                .display()
                .iec(),
            g.restored as f64 / g.elapsed_seconds.max(0.001),
            g.listed,
        )?;
        if g.absent > 0 {
            write!(f, ", {} did not exist at the --as-of time", g.absent)?;
        }
        if g.skipped > 0 {
            write!(f, ", {} folder markers skipped", g.skipped)?;
        }
        if g.newer > 0 {
            write!(
                f,
                ", {} newer than the snapshot (bucket not versioned: restored with their latest \
                 bytes)",
                g.newer
            )?;
        }
        if g.not_created > 0 {
            write!(f, ", {} sockets or device nodes not created", g.not_created)?;
        }
        thaw::summary(f, &g.thaw, self.dry_run)?;
        if let Some(id) = &self.snapshot {
            write!(
                f,
                "; snapshot {id}: {} directories made with their recorded modes, owners and \
                 mtimes, {} links and special files",
                g.dirs_created, g.nodes
            )?;
        } else if g.dirs_created > 0 {
            write!(
                f,
                "; {} directories created 0700, owned by the restoring user (directory modes \
                 and owners are not backed up: set them as needed)",
                g.dirs_created
            )?;
        }
        Ok(())
    }
}

/// `nightcopy restore` as the command runs it: credentials, the restore, the summary line; and
/// how it ended.
pub async fn run(
    config: &Config,
    opts: &RestoreOptions,
    bar: Option<indicatif::ProgressBar>,
) -> Ending {
    let started = Instant::now();
    let stats = Arc::new(RestoreStats::default());
    let progress = crate::notify::Progress::start(stats.clone(), started, bar);
    let result = async {
        let sdk = sdk::load_checked(config).await?;
        let store = Arc::new(S3Store::for_config(&sdk, config));
        restore(config, opts, store, stats.clone()).await
    }
    .await;
    drop(progress);
    let ending = result.as_ref().err().map(RestoreError::ending);
    let report = RestoreReport {
        figures: stats.snapshot(started.elapsed()),
        snapshot: stats.snapshot_id.get().cloned(),
        to: opts.to.clone(),
        dry_run: opts.dry_run,
        error: result.err().map(|e| e.to_string()),
    };
    let ending = ending.unwrap_or_else(|| report.ending());
    let code = ending.exit_code();
    let g = &report.figures;
    crate::summary!(
        code,
        outcome = match ending {
            Ending::Thawing => "thawing",
            _ => report.outcome().as_str(),
        },
        files_restored = g.restored,
        bytes_restored = g.bytes,
        existing = g.existing,
        errors = g.errors,
        unverified = g.unverified,
        cold = g.thaw.cold,
        thaw_requests = g.thaw.thaw_requests,
        thawing = g.thaw.thawing,
        exit_code = code,
        dry_run = report.dry_run,
        "{report}"
    );
    ending
}

/// One object to restore.
#[derive(Debug)]
struct Job {
    /// Relative to the destination prefix.
    key: String,
    size: u64,
    version_id: Option<String>,
    /// The manifest's entry for this key, if any.
    record: Option<ManifestEntry>,
    /// From a snapshot: where it goes and what it was.
    snap: Option<Box<tree::SnapFile>>,
}

impl From<tree::FileJob> for Job {
    fn from(j: tree::FileJob) -> Job {
        Job {
            key: j.key,
            size: j.size,
            version_id: j.version_id,
            record: None,
            snap: Some(Box::new(j.snap)),
        }
    }
}

impl From<tree::Refusal> for RestoreError {
    fn from(r: tree::Refusal) -> RestoreError {
        match r {
            tree::Refusal::Snapshot(why) => RestoreError::BadSnapshot(why),
            tree::Refusal::Key(why) => RestoreError::Unsupported(why),
            tree::Refusal::Store(e) => RestoreError::Store(e),
        }
    }
}

impl tree::Counter for RestoreStats {
    fn listed(&self) {
        RestoreStats::listed(self)
    }

    fn file_error(&self, what: &str, kind: FileErrorKind, detail: &dyn fmt::Display) {
        RestoreStats::file_error(self, what, kind, detail)
    }

    fn existing(&self, target: &Path, key: &str, bytes: u64, dry_run: bool) {
        RestoreStats::existing(self, target, key, bytes, dry_run)
    }

    fn node_made(&self) {
        RestoreStats::node_made(self)
    }

    fn not_created(&self, path: &Path, what: &str) {
        RestoreStats::not_created(self, path, what)
    }

    fn dir_planned(&self) {
        self.dirs_created.fetch_add(1, Relaxed);
    }
}

/// The restore over any store. Figures go to `stats` as they happen.
pub async fn restore<S: ObjectStore>(
    config: &Config,
    opts: &RestoreOptions,
    store: Arc<S>,
    stats: Arc<RestoreStats>,
) -> Result<(), RestoreError> {
    let prefix = config.destination.prefix.as_str().to_owned();
    let sub = match &opts.path {
        Some(p) => keys::subpath_key(p, &config.source.path.0)?,
        None => String::new(),
    };
    check_target(&opts.to)?;

    let stop = Stop::on_signals("downloads in flight cancelled, files already restored kept")
        .map_err(|e| RestoreError::Target {
            path: opts.to.display().to_string(),
            why: format!("cannot listen for SIGTERM/SIGINT: {e}"),
        })?;
    let choice = tree::Choice {
        include_deleted: opts.include_deleted,
        as_of_ns: opts.as_of_ns,
        snapshot: opts.snapshot.as_deref(),
    };
    let source = tree::choose(store.as_ref(), config, &choice).await?;
    // Before anything is downloaded: what is archived under the path, and what a thaw costs.
    thaw::survey(
        store.as_ref(),
        &prefix,
        &sub,
        (opts.thaw, opts.dry_run),
        &stats.thaw,
    )
    .await
    .map_err(|e| listing_error(e, false))?;
    let fetched = match source {
        tree::Source::Snapshot(fetched) => fetched,
        tree::Source::Listing => {
            return restore_listing(config, opts, store, stats, prefix, sub, &stop).await
        }
    };
    let _ = stats.snapshot_id.set(fetched.header.id.clone());
    if opts.path.is_none() {
        let c = &fetched.header.counts;
        stats.expect(c.files, c.bytes);
    }
    let target = open_target(opts)?;
    let ctx = Ctx::new(config, opts, store, stats.clone(), prefix, target.clone());
    let pass = Arc::new(tree::Pass {
        stats: stats.clone(),
        target: target.clone(),
        to: opts.to.clone(),
        sub,
        dry_run: opts.dry_run,
        overwrite: opts.overwrite,
        as_root: ctx.as_root,
        devices: opts.devices,
        next_tmp: ctx.next_tmp.clone(),
    });
    let fetched: Arc<crate::snapshot::Fetched> = Arc::from(fetched);
    // Files (and directories, symlinks, special files) first; then hard links to them; then
    // each directory's own metadata.
    for links in [false, true] {
        let (tx, rx) = mpsc::channel::<Result<Job, StoreError>>(JOBS_AHEAD);
        let (p, f) = (pass.clone(), fetched.clone());
        let producer = tokio::task::spawn_blocking(move || match links {
            false => p.first(&f, &tx),
            true => p.links(&f, &tx),
        });
        let done = run_jobs(ctx.clone(), rx, opts, &stop).await;
        let produced = producer.await.expect("the snapshot's reader panicked");
        done?;
        produced?;
    }
    let (p, f) = (pass.clone(), fetched.clone());
    tokio::task::spawn_blocking(move || p.dir_meta(&f))
        .await
        .expect("the snapshot's reader panicked")?;
    if let Some(t) = target.filter(|t| t.dirs_created() > 0) {
        stats.dirs_created.fetch_add(t.dirs_created(), Relaxed);
    }
    Ok(())
}

/// The target directory, created unless this is a dry run (whose target may not exist).
fn open_target(opts: &RestoreOptions) -> Result<Option<Arc<Target>>, RestoreError> {
    match Target::open(&opts.to, !opts.dry_run) {
        Ok(t) => Ok(Some(Arc::new(t))),
        Err(e) if opts.dry_run && e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RestoreError::Target {
            path: opts.to.display().to_string(),
            why: format!("cannot create or open it: {e}"),
        }),
    }
}

/// Every object under the path (or each one's version at `--as-of`): the restore before
/// snapshots, and with `--include-deleted`.
async fn restore_listing<S: ObjectStore>(
    config: &Config,
    opts: &RestoreOptions,
    store: Arc<S>,
    stats: Arc<RestoreStats>,
    prefix: String,
    sub: String,
    stop: &Stop,
) -> Result<(), RestoreError> {
    // The manifest's SHA-256s are the strongest check there is (they cover multipart objects
    // too); on another host the bucket's copy of it is used (read, not installed: a restore
    // leaves the backup's state alone), and without either the objects' own checksums have to do.
    let manifest = offsite::manifest(
        store.as_ref(),
        config,
        usize::MAX,
        false,
        "downloads are checked against the objects' own checksums only",
    )
    .await;

    // The first page is awaited here, so a missing bucket, denied access or a server without
    // versioning ends the restore before anything is written.
    let mut pager = Pager::new(store.clone(), format!("{prefix}{sub}"), opts.as_of_ns);
    let first = pager
        .next_page()
        .await
        .map_err(|e| listing_error(e, opts.as_of_ns.is_some()))?;
    let target = open_target(opts)?;

    let (tx, rx) = mpsc::channel::<Result<Job, StoreError>>(JOBS_AHEAD);
    let producer = tokio::spawn(produce(pager, first, sub, manifest, stats.clone(), tx));

    let ctx = Ctx::new(config, opts, store, stats.clone(), prefix, target.clone());
    let result = run_jobs(ctx, rx, opts, stop).await;
    producer.abort();
    if let Some(t) = target.filter(|t| t.dirs_created() > 0) {
        stats.dirs_created.store(t.dirs_created(), Relaxed);
    }
    result
}

/// Restores the listed objects, `transfer.concurrency` at a time, until the listing is done, a
/// fatal error, or a stop signal.
async fn run_jobs<S: ObjectStore>(
    ctx: Arc<Ctx<S>>,
    mut rx: mpsc::Receiver<Result<Job, StoreError>>,
    opts: &RestoreOptions,
    stop: &Stop,
) -> Result<(), RestoreError> {
    let stop = stop.clone().signalled();
    tokio::pin!(stop);
    let mut running: JoinSet<Result<(), StoreError>> = JoinSet::new();
    let in_hand = (ctx.concurrency * FINISHING)
        .min(MAX_IN_HAND)
        .max(ctx.concurrency * 2);
    let mut listing_done = false;
    let mut fatal: Option<RestoreError> = None;
    // `stop` never ends by itself, so the loop ends explicitly when the work is done.
    while !(listing_done && running.is_empty()) {
        tokio::select! {
            biased;
            signal = &mut stop => {
                fatal = Some(RestoreError::Interrupted(signal));
                break;
            }
            done = running.join_next(), if !running.is_empty() => {
                if let Some(Err(e)) = done.map(|r| r.expect("restore task panicked")) {
                    fatal = Some(e.into());
                    break;
                }
            }
            job = rx.recv(), if !listing_done && running.len() < in_hand => match job {
                Some(Ok(job)) => {
                    running.spawn(ctx.clone().restore_one(job));
                }
                Some(Err(e)) => {
                    fatal = Some(listing_error(e, opts.as_of_ns.is_some()));
                    break;
                }
                None => listing_done = true,
            },
        }
    }
    // On a fatal error or a signal the downloads in flight are cancelled; each one's temp file
    // is removed as its task is dropped.
    running.shutdown().await;
    fatal.map_or(Ok(()), Err)
}

/// A listing error mid-way is fatal like the first page's: the rest cannot be known.
fn listing_error(e: StoreError, as_of: bool) -> RestoreError {
    if as_of && e.kind == ErrorKind::NotImplemented {
        return RestoreError::Unsupported(format!(
            "--as-of needs ListObjectVersions, which this server does not implement ({e})"
        ));
    }
    RestoreError::Store(e.into_fatal())
}

fn check_target(to: &Path) -> Result<(), RestoreError> {
    match std::fs::metadata(to) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(RestoreError::Target {
            path: to.display().to_string(),
            why: "exists and is not a directory: give --to a directory".into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::Target {
            path: to.display().to_string(),
            why: e.to_string(),
        }),
    }
}

/// The listing, page by page: current objects, or with `--as-of` each key's version then.
struct Pager<S> {
    store: Arc<S>,
    list_prefix: String,
    mode: Mode,
    done: bool,
}

enum Mode {
    Latest(Option<String>),
    AsOf {
        marker: Option<VersionMarker>,
        picker: AsOfPicker,
    },
}

/// One page, reduced to what to restore; keys relative to the listed prefix.
type Page = Vec<Candidate>;

enum Candidate {
    Object {
        key: String,
        size: u64,
        version_id: Option<String>,
    },
    Absent(String),
}

impl<S: ObjectStore> Pager<S> {
    fn new(store: Arc<S>, list_prefix: String, as_of_ns: Option<i64>) -> Self {
        let mode = match as_of_ns {
            None => Mode::Latest(None),
            Some(t) => Mode::AsOf {
                marker: None,
                picker: AsOfPicker::new(t),
            },
        };
        Pager {
            store,
            list_prefix,
            mode,
            done: false,
        }
    }

    /// `Ok(None)` after the last page.
    async fn next_page(&mut self) -> Result<Option<Page>, StoreError> {
        if self.done {
            return Ok(None);
        }
        match &mut self.mode {
            Mode::Latest(token) => {
                let page = self
                    .store
                    .list_page(&self.list_prefix, None, token.take())
                    .await?;
                *token = page.next;
                self.done = token.is_none();
                Ok(Some(
                    page.objects
                        .into_iter()
                        .map(|o| Candidate::Object {
                            key: o.key,
                            size: o.size,
                            version_id: None,
                        })
                        .collect(),
                ))
            }
            Mode::AsOf { marker, picker } => {
                let page = self
                    .store
                    .list_versions_page(&self.list_prefix, marker.take())
                    .await?;
                *marker = page.next;
                self.done = marker.is_none();
                let mut picks: Vec<Pick> = page
                    .versions
                    .into_iter()
                    .flat_map(|v| picker.offer(v))
                    .collect();
                if self.done {
                    picks.extend(picker.finish());
                }
                Ok(Some(
                    picks
                        .into_iter()
                        .map(|p| match p {
                            Pick::Version(v) => Candidate::Object {
                                key: v.key,
                                size: v.size,
                                version_id: Some(v.version_id),
                            },
                            Pick::Absent(key) => Candidate::Absent(key),
                        })
                        .collect(),
                ))
            }
        }
    }
}

/// Turns the listing into jobs, each with its manifest entry (both are in key order, so the
/// manifest is merged in one pass). Reading a manifest line is a buffered local read: cheap
/// enough not to need a blocking thread.
async fn produce<S: ObjectStore>(
    mut pager: Pager<S>,
    first: Option<Page>,
    sub: String,
    manifest: Option<manifest::Reader>,
    stats: Arc<RestoreStats>,
    tx: mpsc::Sender<Result<Job, StoreError>>,
) {
    let mut manifest = Cursor::new(manifest.into_iter().flatten());
    let mut page = first;
    while let Some(candidates) = page {
        for c in candidates {
            match c {
                Candidate::Absent(key) => {
                    let key = format!("{sub}{key}");
                    if keys::in_subpath(&key, &sub) && !keys::is_reserved(&key) {
                        stats.absent(&key);
                    }
                }
                Candidate::Object {
                    key,
                    size,
                    version_id,
                } => {
                    let key = format!("{sub}{key}");
                    // The listing prefix "home/alice" also lists "home/alice2/…". nightcopy's own
                    // objects (the manifest's copy) are no file to restore.
                    if !keys::in_subpath(&key, &sub) || keys::is_reserved(&key) {
                        continue;
                    }
                    stats.listed();
                    let record = manifest.record(&key);
                    let job = Job {
                        key,
                        size,
                        version_id,
                        record,
                        snap: None,
                    };
                    if tx.send(Ok(job)).await.is_err() {
                        return;
                    }
                }
            }
        }
        page = match pager.next_page().await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
    }
}

struct Ctx<S> {
    store: Arc<S>,
    stats: Arc<RestoreStats>,
    prefix: String,
    /// `None` only in a dry run whose `--to` does not exist yet: then nothing exists below it.
    target: Option<Arc<Target>>,
    to: PathBuf,
    overwrite: bool,
    dry_run: bool,
    as_root: bool,
    keep_setid: bool,
    thaw: ThawOptions,
    next_tmp: Arc<AtomicU64>,
    /// Downloads in flight (`transfer.concurrency`). A file gives its slot back once its bytes
    /// are written and checked: making it durable and giving it its name (chown, mtime, fsync,
    /// rename — local calls, or round trips on a mount) overlaps the next downloads instead of
    /// holding them up.
    downloads: Arc<tokio::sync::Semaphore>,
    /// `transfer.concurrency`: the slots above.
    concurrency: usize,
    /// `transfer.part-size`: an object over twice this comes down in ranges of it, side by side
    /// (`ranges`), aligned with the parts nightcopy uploaded it in.
    range: u64,
}

impl<S> Ctx<S> {
    fn new(
        config: &Config,
        opts: &RestoreOptions,
        store: Arc<S>,
        stats: Arc<RestoreStats>,
        prefix: String,
        target: Option<Arc<Target>>,
    ) -> Arc<Ctx<S>> {
        let concurrency = config.transfer.concurrency.0.max(1);
        Arc::new(Ctx {
            store,
            stats,
            prefix,
            target,
            to: opts.to.clone(),
            overwrite: opts.overwrite,
            dry_run: opts.dry_run,
            as_root: nix::unistd::geteuid().is_root(),
            keep_setid: opts.keep_setid,
            thaw: opts.thaw,
            next_tmp: Arc::new(AtomicU64::new(0)),
            downloads: Arc::new(tokio::sync::Semaphore::new(concurrency)),
            concurrency,
            range: config.transfer.part_size.0.max(1),
        })
    }
}

/// What one attempt at a file ran into.
enum Failure {
    Download(StoreError),
    /// Archived, not thawed (InvalidObjectState): never retried as a download (`thaw`).
    Cold(StoreError),
    Corrupt(String),
    Local(String),
    /// Already counted and logged (a missing object, a bad name, an existing target).
    Counted,
    Fatal(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        if e.is_fatal() {
            Failure::Fatal(e)
        } else if e.kind == ErrorKind::ChecksumMismatch {
            Failure::Corrupt(e.message)
        } else if e.kind == ErrorKind::Cold {
            Failure::Cold(e)
        } else {
            Failure::Download(e)
        }
    }
}

impl From<PlaceError> for Failure {
    fn from(e: PlaceError) -> Self {
        Failure::Local(e.to_string())
    }
}

impl<S: ObjectStore> Ctx<S> {
    /// Restores one object. `Err` only for a fatal store error; everything else is counted.
    async fn restore_one(self: Arc<Self>, job: Job) -> Result<(), StoreError> {
        let full_key = format!("{}{}", self.prefix, job.key);
        if job.snap.is_none() && (job.key.is_empty() || job.key.ends_with('/')) {
            self.stats.skipped(&full_key);
            return Ok(());
        }
        // A key without '%' was not escaped, so its path is known without a request: an existing
        // file costs nothing, which is what makes a rerun after an interruption quick. A
        // snapshot names every path.
        let may_be_escaped = job.snap.is_none() && job.key.contains('%');
        if !may_be_escaped || self.dry_run {
            let raw = if may_be_escaped {
                match self.store.head(&full_key).await {
                    Ok(h) => h.and_then(|h| h.meta.get(META_RAW_PATH).cloned()),
                    Err(e) if e.is_fatal() => return Err(e),
                    Err(_) => None,
                }
            } else {
                None
            };
            let rel = match &job.snap {
                Some(snap) => snap.rel.clone(),
                None => match self.rel(&job.key, &full_key, raw.as_deref()) {
                    Some(rel) => rel,
                    None => return Ok(()),
                },
            };
            match self.exists(&rel) {
                Ok(true) if !self.overwrite => {
                    self.stats
                        .existing(&self.shown_path(&rel), &full_key, job.size, self.dry_run);
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    self.stats.file_error(&full_key, FileErrorKind::Write, &e);
                    return Ok(());
                }
            }
            if self.dry_run {
                self.stats
                    .planned(&self.shown_path(&rel), &full_key, job.size);
                return Ok(());
            }
        }

        let mut last = None;
        for attempt in 0..2 {
            match self.attempt(&job, &full_key, may_be_escaped).await {
                Ok(()) => return Ok(()),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Cold(e)) => {
                    let met = thaw::Met {
                        key: &full_key,
                        version_id: job.version_id.as_deref(),
                        size: job.size,
                    };
                    let thawing = (self.thaw, &self.stats.thaw);
                    match thaw::cold(self.store.as_ref(), thawing, met, e, attempt == 1).await? {
                        thaw::Cold::TryAgain => {}
                        thaw::Cold::Thawing => return Ok(()),
                        thaw::Cold::NotRestored(kind, why) => {
                            self.stats.file_error(&full_key, kind, &why);
                            return Ok(());
                        }
                    }
                }
                // A download that broke off is tried once more; anything else is final.
                Err(Failure::Download(e)) => {
                    tracing::debug!(key = full_key, "download failed, retrying: {e}");
                    last = Some(e);
                }
                Err(Failure::Corrupt(why)) => {
                    self.stats
                        .file_error(&full_key, FileErrorKind::Corrupt, &why);
                    return Ok(());
                }
                Err(Failure::Local(why)) => {
                    self.stats.file_error(&full_key, FileErrorKind::Write, &why);
                    return Ok(());
                }
                Err(Failure::Counted) => return Ok(()),
            }
        }
        if let Some(e) = last {
            self.stats
                .file_error(&full_key, FileErrorKind::Download, &e);
        }
        Ok(())
    }

    /// The path below the target, or `None` after counting a key that cannot be one.
    fn rel(&self, key: &str, full_key: &str, raw: Option<&str>) -> Option<PathBuf> {
        match select::target_rel(key, raw) {
            Ok(rel) => Some(rel),
            Err(why) => {
                self.stats
                    .file_error(full_key, FileErrorKind::BadName, &why);
                None
            }
        }
    }

    fn exists(&self, rel: &Path) -> Result<bool, PlaceError> {
        match &self.target {
            Some(t) => t.exists(rel),
            None => Ok(false),
        }
    }

    /// Where `rel` is, for messages and the dry run's list.
    fn shown_path(&self, rel: &Path) -> PathBuf {
        self.to.join(rel)
    }

    async fn attempt(
        &self,
        job: &Job,
        full_key: &str,
        may_be_escaped: bool,
    ) -> Result<(), Failure> {
        let version = job.version_id.as_deref();
        let slot = self
            .downloads
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let Some(download) = self.store.get(full_key, version).await? else {
            let why = match (&job.snap, version) {
                (Some(_), Some(v)) => format!(
                    "the version the snapshot names ({}) is gone from the bucket (a lifecycle \
                     rule on noncurrent versions?); an older snapshot, or --include-deleted, may \
                     find another",
                    shown(v)
                ),
                (Some(_), None) => "the snapshot names it, but the bucket has no such object \
                                    (deleted by hand or by a lifecycle rule?)"
                    .to_owned(),
                (None, _) => "listed, but gone when it was downloaded".to_owned(),
            };
            self.stats
                .file_error(full_key, FileErrorKind::Missing, &why);
            return Err(Failure::Counted);
        };
        let rel = match &job.snap {
            Some(snap) => snap.rel.clone(),
            None => {
                let raw = download.meta.get(META_RAW_PATH).cloned();
                match self.rel(&job.key, full_key, raw.as_deref()) {
                    Some(rel) => rel,
                    None => return Err(Failure::Counted),
                }
            }
        };
        if may_be_escaped && !self.overwrite && self.exists(&rel)? {
            self.stats
                .existing(&self.shown_path(&rel), full_key, job.size, false);
            return Err(Failure::Counted);
        }
        let meta = ObjectMeta::from_map(&download.meta);
        let stored = Stored::parse(download.checksum_sha256.as_deref());
        let reference = Reference::new(
            match &job.snap {
                Some(snap) => snap.sha256,
                None => check::manifest_sha(job.record.as_ref(), download.size, meta.as_ref()),
            },
            stored,
            download.etag_md5,
        );
        // Without a version, an object that changed since the snapshot is not corrupt: it is
        // newer, which its own checksum tells (`write`).
        // Only an object uploaded again since says so: its own mtime or size is not the
        // snapshot's. Other bytes under the same mtime and size are corrupt.
        let newer_check = job
            .snap
            .as_ref()
            .filter(|s| s.unversioned && s.sha256.is_some())
            .filter(|s| {
                download.size != job.size
                    || meta.as_ref().map(|m| m.mtime_ns) != Some(s.meta.mtime_ns)
            })
            .map(|_| Reference::new(None, stored, download.etag_md5));
        // The composite checksum needs the part boundaries: one HEAD, only when nothing better
        // covers the object.
        let needs_layout = reference.manifest.is_none() || newer_check.is_some();
        let layout = if needs_layout && reference.stored.is_composite() {
            match self.store.part_layout(full_key, version).await {
                Ok(l) => l,
                Err(e) if e.is_fatal() => return Err(Failure::Fatal(e)),
                Err(e) => {
                    tracing::debug!(key = full_key, "no part layout: {e}");
                    None
                }
            }
        } else {
            None
        };
        let rclone_mtime = ObjectMeta::rclone_mtime(&download.meta);
        if meta.is_none() {
            tracing::debug!(
                key = full_key,
                "{} has no nightcopy metadata: restored with mode 644 and {}",
                shown(full_key),
                if rclone_mtime.is_some() {
                    "rclone's mtime"
                } else {
                    "the current time"
                }
            );
        }
        // An object from rclone carries its mtime only: that much comes back.
        let meta = meta.or(rclone_mtime.map(|mtime_ns| ObjectMeta {
            mtime_ns,
            mode: 0o644,
            uid: 0,
            gid: 0,
            raw_path: None,
        }));
        let owned = ObjectMeta::from_map(&download.meta).is_some();
        let why_unverified = check::why_unverified(&reference, layout.is_some());
        // From a snapshot, the snapshot's metadata (nightcopy's own, so the owner too); the
        // object's only for bytes newer than the snapshot.
        let (meta, owned, newer) = match &job.snap {
            Some(snap) => {
                let newer = newer_check.map(|r| (r, meta.or(Some(snap.meta.clone()))));
                (Some(snap.meta.clone()), true, newer)
            }
            None => (meta, owned, None),
        };
        let (holes, attrs) = job
            .snap
            .as_ref()
            .map(|s| (s.holes.clone(), s.xattrs.clone()))
            .unwrap_or_default();
        let (verdict, bytes, was_newer) = self
            .write(
                &rel,
                full_key,
                (download, version, slot),
                (reference, layout),
                (meta, newer),
                (owned, holes, attrs),
            )
            .await?;
        let target = self.shown_path(&rel);
        if was_newer {
            self.stats.newer(&target, full_key);
        }
        self.stats
            .restored(&target, full_key, bytes, &verdict, why_unverified);
        Ok(())
    }

    async fn write(
        &self,
        rel: &Path,
        full_key: &str,
        (download, version, slot): (Download, Option<&str>, tokio::sync::OwnedSemaphorePermit),
        (reference, layout): (Reference, Option<crate::store::PartLayout>),
        (meta, newer): (Option<ObjectMeta>, Option<(Reference, Option<ObjectMeta>)>),
        (owned, holes, attrs): (bool, Vec<(u64, u64)>, Vec<xattrs::Attr>),
    ) -> Result<(Verdict, u64, bool), Failure> {
        let local = |what: &str, e: io::Error| Failure::Local(format!("{what}: {e}"));
        let target = self.target.clone().expect("only a dry run has no target");
        let name = rel.file_name().expect("a target has a name").to_owned();
        let tmp = TempFile::new(select::temp_name(self.next_tmp.fetch_add(1, Relaxed)));
        // Created with its final permission bits (set-id aside): one chmod less per file, a
        // round trip on a network or FUSE mount.
        let created = final_mode(meta.as_ref(), false) & 0o777;
        let make = {
            let (rel, state) = (rel.to_owned(), tmp.state.clone());
            move || -> io::Result<(Dir, File)> {
                let dir = target
                    .parent_of(&rel, true)
                    .map_err(io::Error::other)?
                    .expect("created");
                TempFile::create(&state, &dir, created).map(|file| (dir, file))
            }
        };
        // A small file stays in memory until its bytes are checked: its download slot is then
        // held for the GET alone, and making the file (create, write, metadata, fsync, rename,
        // each a round trip on a mount) is one hand-over to a blocking thread after it.
        let in_memory = download.size <= IN_MEMORY;
        let mut held = Vec::new();
        let mut out = None;
        if !in_memory {
            let (dir, file) = blocking(make.clone())
                .await
                .map_err(|e| local("cannot create the file", e))?;
            let file = tokio::fs::File::from_std(file);
            out = Some((dir, tokio::io::BufWriter::with_capacity(WRITE_BUF, file)));
        }
        let md5 = reference.md5.is_some() || newer.as_ref().is_some_and(|n| n.0.md5.is_some());
        let hasher = StreamHasher::new(download.size, layout).with_md5(md5);
        // The holes to punch once the bytes are checked: only where they came as zeros, so
        // that no recorded extent, however wrong, changes what the file reads.
        let zeros = (!holes.is_empty()).then(|| ZeroCheck::new(holes));
        let mut checking = Checking { hasher, zeros };
        // A large object: this GET gives its first range (and the headers every check needs),
        // ranged GETs the rest.
        let size = download.size;
        let pin = match version {
            Some(v) => Some(ranges::Pin::Version(v.to_owned())),
            None => download.etag.clone().map(ranges::Pin::ETag),
        };
        let ranged = pin.filter(|_| size > 2 * self.range && !in_memory);
        let first = if ranged.is_some() {
            self.range
        } else {
            u64::MAX
        };
        let mut written = 0u64;
        let mut body = download.body;
        while written < first {
            let Some(chunk) = body.next().await else {
                break;
            };
            let mut chunk = chunk?;
            if (chunk.len() as u64) > first - written {
                chunk.truncate((first - written) as usize);
            }
            written += chunk.len() as u64;
            checking.update(&chunk);
            match out.as_mut() {
                Some((_, out)) => out
                    .write_all(&chunk)
                    .await
                    .map_err(|e| local("cannot write", e))?,
                // Never more than the size the answer gave, whatever the body goes on with.
                None if written > size => break,
                None => held.extend_from_slice(&chunk),
            }
        }
        // The rest of the first GET's body is not read: its connection is closed, not reused.
        drop(body);
        // The temp file, once made: only after the check for a file held in memory.
        let made = match out {
            Some((dir, mut out)) => {
                out.flush().await.map_err(|e| local("cannot write", e))?;
                Some((dir, Arc::new(out.into_inner().into_std().await)))
            }
            None => None,
        };
        let mut slot = Some(slot);
        if let (Some(pin), true) = (ranged, written == first) {
            let rest = ranges::Rest {
                store: self.store.clone(),
                key: full_key.to_owned(),
                pin,
                from: first,
                size,
                range: self.range,
            };
            let (own, slots) = (slot.take().expect("held"), self.downloads.clone());
            let file = made.as_ref().expect("not in memory").1.clone();
            checking = ranges::fetch(rest, file, own, slots, checking)
                .await
                .map_err(|e| match e {
                    ranges::RangeError::Store(e) => Failure::from(e),
                    ranges::RangeError::Local(why) => Failure::Local(why),
                })?;
        }
        let Checking { hasher, zeros } = checking;
        let digests = hasher.finish();
        if digests.bytes != download.size {
            return Err(Failure::Download(StoreError::per_object(format!(
                "the download ended after {} of {} bytes",
                digests.bytes, download.size
            ))));
        }
        let mut verdict = check::judge(&reference, &digests);
        let mut meta = meta;
        let mut was_newer = false;
        if let (Verdict::Mismatch { against, .. }, Some((own, own_meta))) = (&verdict, newer) {
            if *against == check::MANIFEST {
                let again = check::judge(&own, &digests);
                if !matches!(again, Verdict::Mismatch { .. }) {
                    (verdict, meta, was_newer) = (again, own_meta, true);
                }
            }
        }
        if let Verdict::Mismatch {
            against,
            expected,
            actual,
        } = &verdict
        {
            return Err(Failure::Corrupt(format!(
                "its content is not what was backed up: SHA-256 {actual} differs from {against} \
                 ({expected}); the file was not written. On a versioned bucket, --as-of an \
                 earlier time may find an intact version"
            )));
        }

        drop(slot);
        let (as_root, keep_setid, overwrite) = (self.as_root, self.keep_setid, self.overwrite);
        let tmp_name = tmp.name().to_owned();
        let shown_at = self.shown_path(rel);
        let placed = tokio::task::spawn_blocking(move || -> Result<(), Finish> {
            let (place_dir, file) = match made {
                Some(made) => made,
                None => {
                    let (dir, mut file) = make().map_err(Finish::Create)?;
                    io::Write::write_all(&mut file, &held).map_err(Finish::Write)?;
                    (dir, Arc::new(file))
                }
            };
            // An owner only from nightcopy's own metadata; rclone's carries none. A file the
            // restoring user makes is theirs already (and their group's, unless the directory
            // is set-group-ID): no chown, one round trip less.
            let owner = meta
                .as_ref()
                .filter(|_| as_root && owned)
                .filter(|m| place_dir.setgid || (m.uid, m.gid) != *EFFECTIVE)
                .map(|m| (m.uid, m.gid));
            // Before the mtime is set: punching a hole changes it.
            if let Some(z) = zeros {
                sparse::punch(&file, z.zero_holes());
            }
            // Before the mode: an access ACL sets the group bits (to its mask), so the chmod
            // is then always done, and gives the recorded mode back.
            let acl = xattrs::set(&file, &attrs, &shown_at);
            let created = if acl { u32::MAX } else { created };
            apply_meta(&file, meta.as_ref(), owner, keep_setid, created).map_err(Finish::Place)?;
            // On disk before it gets its real name: after a power cut the name never points
            // at a file whose data was not written yet.
            file.sync_data().map_err(Finish::Place)?;
            drop(file);
            place_dir
                .place(&tmp_name, &name, overwrite)
                .map_err(Finish::Place)
        })
        .await
        .unwrap_or_else(|e| {
            Err(Finish::Place(io::Error::other(format!(
                "file task failed: {e}"
            ))))
        });
        match placed {
            Ok(()) => {
                tmp.disarm();
                Ok((verdict, digests.bytes, was_newer))
            }
            Err(Finish::Place(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.stats
                    .existing(&self.shown_path(rel), full_key, digests.bytes, false);
                Err(Failure::Counted)
            }
            Err(Finish::Create(e)) => Err(local("cannot create the file", e)),
            Err(Finish::Write(e)) => Err(local("cannot write", e)),
            Err(Finish::Place(e)) => Err(local("cannot finish the file", e)),
        }
    }
}

/// Where making a file on disk failed: a name already taken is an existing file only when the
/// final rename finds it.
enum Finish {
    Create(io::Error),
    Write(io::Error),
    Place(io::Error),
}

/// What every downloaded byte goes through, in order.
struct Checking {
    hasher: StreamHasher,
    zeros: Option<ZeroCheck>,
}

impl ranges::Sink for Checking {
    fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        if let Some(z) = self.zeros.as_mut() {
            z.update(bytes);
        }
    }
}

/// The set-user-ID and set-group-ID bits. Object metadata is not covered by any checksum, and
/// whoever can write the prefix can write it: restored as root, a mode of 4755 with uid 0 would
/// hand them a root shell. Kept only with `--keep-setid`.
const SETID: u32 = 0o6000;

/// Who this process creates files as.
static EFFECTIVE: std::sync::LazyLock<(u32, u32)> = std::sync::LazyLock::new(|| {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
});

/// The mode a restored file ends with: its recorded one, set-id bits only with `--keep-setid`;
/// 0644 for an object without nightcopy's metadata.
fn final_mode(meta: Option<&ObjectMeta>, keep_setid: bool) -> u32 {
    match meta {
        None => 0o644,
        Some(m) if keep_setid => m.mode & 0o7777,
        Some(m) => m.mode & 0o7777 & !SETID,
    }
}

/// The process's umask (from /proc; it cannot be read without being set, which would race with
/// the other threads). Unknown: every bit, so that every file gets its chmod.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o777)
    })
}

/// Owner (as root; first, because chown clears set-id bits), mode — unless the file was created
/// with it (`created`, before the umask) —, then mtime: all on the open file, never by path.
fn apply_meta(
    file: &File,
    meta: Option<&ObjectMeta>,
    owner: Option<(u32, u32)>,
    keep_setid: bool,
    created: u32,
) -> io::Result<()> {
    let mode = final_mode(meta, keep_setid);
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(
            file,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )?;
    }
    if mode != created & !umask() {
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    match meta {
        Some(m) => file.set_times(FileTimes::new().set_modified(system_time(m.mtime_ns))),
        None => Ok(()),
    }
}

/// A temp file that removes itself unless it was renamed into place: a failed, corrupt or
/// cancelled download leaves nothing behind — also when the download is cancelled while the file
/// is still being created on the blocking pool (that task runs on; whichever of the two comes
/// second removes the file).
struct TempFile {
    state: Arc<std::sync::Mutex<TempState>>,
    armed: bool,
}

struct TempState {
    name: std::ffi::OsString,
    created: Option<Dir>,
    dropped: bool,
}

impl TempFile {
    fn new(name: std::ffi::OsString) -> TempFile {
        TempFile {
            state: Arc::new(std::sync::Mutex::new(TempState {
                name,
                created: None,
                dropped: false,
            })),
            armed: true,
        }
    }

    fn name(&self) -> std::ffi::OsString {
        self.state.lock().unwrap().name.clone()
    }

    /// Creates the file in `dir` (blocking); refuses, leaving nothing, if the guard is gone.
    fn create(state: &std::sync::Mutex<TempState>, dir: &Dir, mode: u32) -> io::Result<File> {
        let mut s = state.lock().unwrap();
        if s.dropped {
            return Err(io::Error::other("cancelled"));
        }
        let file = dir.create_new(&s.name, mode)?;
        s.created = Some(dir.clone());
        Ok(file)
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap();
        s.dropped = true;
        if self.armed {
            if let Some(dir) = &s.created {
                let _ = dir.remove(&s.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::Watched;

    #[test]
    fn the_live_line_says_rates_and_with_a_total_the_time_left() {
        let s = RestoreStats::default();
        s.restored.store(100, Relaxed);
        s.bytes.store(50 << 20, Relaxed);
        let line = s.status_line(Duration::from_secs(10));
        assert_eq!(
            line,
            "100 of 0 listed restored (50.0 MiB), 5.0 MiB/s, 10 files/s, 0 already there, 0 errors"
        );
        s.expect(400, 200 << 20);
        let line = s.status_line(Duration::from_secs(10));
        assert_eq!(
            line,
            "100 of 400 files restored (50.0 MiB of 200.0 MiB), 5.0 MiB/s, 10 files/s, 0 already \
             there, 0 errors, about 30s left"
        );
        let before = s.activity();
        s.existing.fetch_add(1, Relaxed);
        assert!(s.activity() > before, "an existing file is progress too");
    }
}
