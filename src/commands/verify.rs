//! `nightcopy verify`: does the bucket hold the source? A read-only comparison (list, head, get —
//! never a write) that an operator can run after a backup or on its own timer.
//!
//! The walk, the bucket listing and the manifest are merged in key order like the backup's plan,
//! so memory does not grow with the tree. Per file, from cheap to thorough:
//! - always: the object exists and has the file's size;
//! - `--full`: the file is re-read and its SHA-256 compared with both recorded ones — the
//!   manifest's (what was read at upload, when the entry describes the object) and the object's
//!   own checksum (a HEAD per file; a multipart object's composite is recomputed from the part
//!   boundaries). This catches a file that changed without its size changing, and an object that
//!   was replaced; it cannot see an object whose bytes went bad while its checksum stayed — only a
//!   download can;
//! - `--sample N`: N files picked at random over the whole walk (reservoir sampling: memory holds N
//!   entries, not the tree) are downloaded, their bytes checked against the recorded SHA-256 and
//!   against the local file, end to end.
//!
//! A file that changed after the last completed backup started (its ctime is later) differs from
//! the bucket for a good reason: the next run uploads it. Those are counted as "changed since the
//! last backup" (`-v` names them) but are not problems; without a run record every difference is
//! one.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::error::Fatal;
use crate::fsutil;
use crate::integrity::{self as check, Reference, Stored, StreamHasher, Verdict};
use crate::keys::shown;
use crate::merge::{Inputs, Merge, Merged};
use crate::report::{Ending, Outcome, Stats};
use crate::scan::{self, LocalEntry, OpenError};
use crate::state::{self, manifest::ManifestEntry};
use crate::store::s3::S3Store;
use crate::store::{sdk, ErrorKind, ObjectMeta, ObjectStore, StoreError};

const READ_BUF: usize = 256 * 1024;
/// Merged files queued ahead of the checks.
const ITEMS_AHEAD: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Re-read and hash every local file that has an object of its size.
    pub full: bool,
    /// Download and hash this many files picked at random.
    pub sample: usize,
    /// JSON Lines on stdout instead of text.
    pub json: bool,
}

/// What is wrong with one file. Everything but `Unchecked` means the bucket does not hold the
/// file as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// No object for the file.
    Missing,
    /// The object's size differs from the file's.
    SizeMismatch,
    /// The file's SHA-256 differs from the one recorded for its object (or from the downloaded
    /// object's bytes).
    ContentMismatch,
    /// The downloaded object's bytes differ from the SHA-256 recorded at upload: the bucket does
    /// not hold what was uploaded.
    Corrupt,
    /// The file could not be checked (unreadable, or its download failed).
    Unchecked,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::SizeMismatch => "size-mismatch",
            Kind::ContentMismatch => "content-mismatch",
            Kind::Corrupt => "corrupt",
            Kind::Unchecked => "unchecked",
        }
    }
}

/// Live counters; each event writes its line and bumps its counter in one place.
#[derive(Debug, Default)]
pub struct VerifyStats {
    compared: AtomicU64,
    hashed: AtomicU64,
    sampled: AtomicU64,
    missing: AtomicU64,
    size_mismatch: AtomicU64,
    content_mismatch: AtomicU64,
    corrupt: AtomicU64,
    unchecked: AtomicU64,
    changed: AtomicU64,
    unverifiable: AtomicU64,
    remote_only: AtomicU64,
    json: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerifyFigures {
    /// Local files compared with the listing.
    pub compared: u64,
    /// Local files re-read and hashed (`--full`).
    pub hashed: u64,
    /// Files downloaded and hashed (`--sample`).
    pub sampled: u64,
    pub missing: u64,
    pub size_mismatch: u64,
    pub content_mismatch: u64,
    pub corrupt: u64,
    /// Files that could not be checked (walk or read errors, failed downloads).
    pub unchecked: u64,
    /// Differences explained by a change after the last backup started: not problems.
    pub changed_since_backup: u64,
    /// Hashed, but no recorded SHA-256 to compare with.
    pub unverifiable: u64,
    pub only_in_bucket: u64,
    pub elapsed_seconds: f64,
}

impl VerifyFigures {
    pub fn problems(&self) -> u64 {
        self.missing + self.size_mismatch + self.content_mismatch + self.corrupt
    }

    /// Problems outweigh files that could not be checked.
    pub fn outcome(&self) -> Outcome {
        if self.problems() > 0 {
            Outcome::Problems
        } else if self.unchecked > 0 {
            Outcome::FileErrors
        } else {
            Outcome::Success
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.outcome().exit_code()
    }
}

#[derive(Serialize)]
struct ProblemLine<'a> {
    r#type: &'static str,
    kind: Kind,
    path: String,
    key: &'a str,
    detail: &'a str,
}

impl VerifyStats {
    fn new(json: bool) -> VerifyStats {
        VerifyStats {
            json,
            ..Default::default()
        }
    }

    /// One problem: a line on stdout (text or JSON). The log gets it only at debug level (with
    /// its fields), so a terminal or the journal shows each problem once.
    fn problem(&self, kind: Kind, path: &Path, key: &str, detail: &str) {
        let counter = match kind {
            Kind::Missing => &self.missing,
            Kind::SizeMismatch => &self.size_mismatch,
            Kind::ContentMismatch => &self.content_mismatch,
            Kind::Corrupt => &self.corrupt,
            Kind::Unchecked => &self.unchecked,
        };
        counter.fetch_add(1, Relaxed);
        let mut out = io::stdout().lock();
        let _ = if self.json {
            let line = ProblemLine {
                r#type: "problem",
                kind,
                path: path.display().to_string(),
                key,
                detail,
            };
            writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
        } else {
            writeln!(out, "{}\t{}\t{detail}", kind.as_str(), shown(path))
        };
        tracing::debug!(
            path = %path.display(),
            key,
            problem = kind.as_str(),
            "{}: {}: {detail}",
            shown(path),
            kind.as_str()
        );
    }

    fn changed(&self, kind: Kind, path: &Path, detail: &str) {
        self.changed.fetch_add(1, Relaxed);
        // Debug: on a busy tree these are many, and expected; -v lists them.
        tracing::debug!(
            path = %path.display(),
            "{}: {} ({detail}), but it changed after the last backup started: the next run \
             uploads it",
            shown(path),
            kind.as_str()
        );
    }

    fn unverifiable(&self, path: &Path) {
        self.unverifiable.fetch_add(1, Relaxed);
        tracing::info!(
            path = %path.display(),
            "{}: hashed, but there is no recorded SHA-256 to compare it with",
            shown(path)
        );
    }

    pub fn snapshot(&self, elapsed: Duration) -> VerifyFigures {
        VerifyFigures {
            compared: self.compared.load(Relaxed),
            hashed: self.hashed.load(Relaxed),
            sampled: self.sampled.load(Relaxed),
            missing: self.missing.load(Relaxed),
            size_mismatch: self.size_mismatch.load(Relaxed),
            content_mismatch: self.content_mismatch.load(Relaxed),
            corrupt: self.corrupt.load(Relaxed),
            unchecked: self.unchecked.load(Relaxed),
            changed_since_backup: self.changed.load(Relaxed),
            unverifiable: self.unverifiable.load(Relaxed),
            only_in_bucket: self.remote_only.load(Relaxed),
            elapsed_seconds: elapsed.as_secs_f64(),
        }
    }
}

/// The summary of a verify: one line, and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    #[serde(serialize_with = "outcome_word")]
    pub outcome: Outcome,
    #[serde(skip)]
    pub ending: Ending,
    pub exit_code: u8,
    pub error: Option<String>,
    #[serde(flatten)]
    pub figures: VerifyFigures,
}

/// A verify's outcome in its own words: a bucket is "clean", not a "success".
fn word(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "clean",
        Outcome::Problems => "problems",
        Outcome::FileErrors => "incomplete",
        Outcome::Failed => "failed",
    }
}

fn outcome_word<S: serde::Serializer>(o: &Outcome, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(word(*o))
}

impl VerifyReport {
    pub fn new(figures: VerifyFigures, result: Result<(), Fatal>) -> VerifyReport {
        let (outcome, ending) = match &result {
            Err(e) => (Outcome::Failed, e.ending()),
            Ok(()) => (figures.outcome(), Ending::from(figures.outcome())),
        };
        VerifyReport {
            outcome,
            ending,
            exit_code: ending.exit_code(),
            error: result.err().map(|e| e.to_string()),
            figures,
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.figures;
        match (&self.error, self.outcome) {
            (Some(e), _) => write!(f, "verify FAILED: {e}")?,
            (None, Outcome::Success) => write!(f, "verify clean")?,
            (None, Outcome::Problems) => write!(
                f,
                "verify found {} problems: {} missing, {} size mismatches, {} content \
                 mismatches, {} corrupt",
                g.problems(),
                g.missing,
                g.size_mismatch,
                g.content_mismatch,
                g.corrupt
            )?,
            (None, _) => write!(f, "verify incomplete: some files could not be checked")?,
        }
        write!(
            f,
            ": {} files compared ({} hashed in full, {} downloaded and hashed), {} not \
             checkable, {} changed since the last backup, {} without a SHA-256 to compare, {} \
             only in the bucket, {:.1}s",
            g.compared,
            g.hashed,
            g.sampled,
            g.unchecked,
            g.changed_since_backup,
            g.unverifiable,
            g.only_in_bucket,
            g.elapsed_seconds
        )
    }
}

/// `nightcopy verify` as the command runs it, and how it ended.
pub async fn run(config: &Config, opts: &VerifyOptions) -> Ending {
    let started = Instant::now();
    let stats = Arc::new(VerifyStats::new(opts.json));
    let result = async {
        let sdk = sdk::load_checked(config).await?;
        let store = Arc::new(S3Store::for_config(&sdk, config));
        verify(config, opts, store, stats.clone()).await
    }
    .await;
    let report = VerifyReport::new(stats.snapshot(started.elapsed()), result);
    if opts.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["type"] = "summary".into();
        println!("{v}");
    }
    let g = &report.figures;
    crate::summary!(
        report.exit_code,
        outcome = word(report.outcome),
        problems = g.problems(),
        compared = g.compared,
        unchecked = g.unchecked,
        exit_code = report.exit_code,
        "{report}"
    );
    report.ending
}

/// The comparison over any store. Figures go to `stats` as they happen.
pub async fn verify<S: ObjectStore>(
    config: &Config,
    opts: &VerifyOptions,
    store: Arc<S>,
    stats: Arc<VerifyStats>,
) -> Result<(), Fatal> {
    let prefix = config.destination.prefix.as_str().to_owned();
    let cutoff = backup_cutoff(&config.state_dir.0);
    if cutoff.is_none() {
        tracing::info!(
            "no completed backup recorded on this host: every difference counts as a problem"
        );
    }
    let scan_stats = Arc::new(Stats::default());
    let inputs = Inputs::open(
        config,
        store.clone(),
        scan_stats.clone(),
        "comparing with the objects' own checksums",
    )
    .await?;
    let (files, merger) = spawn_merge(inputs, scan_stats, stats.clone());
    let ctx = Arc::new(Ctx {
        store,
        stats: stats.clone(),
        prefix,
        cutoff,
        full: opts.full,
    });
    let concurrency = config.transfer.concurrency.0.max(1);
    let mut files = files;
    let mut checked = futures::stream::poll_fn(move |cx| files.poll_recv(cx))
        .map(|item| {
            let ctx = ctx.clone();
            async move {
                match item {
                    Ok(item) => Ok(tokio::spawn(ctx.check(item))
                        .await
                        .expect("verify task panicked")),
                    Err(e) => Err(e),
                }
            }
        })
        .buffered(concurrency);

    let mut sampler = Reservoir::new(opts.sample);
    let mut fatal = None;
    while let Some(outcome) = checked.next().await {
        match outcome {
            Ok(Ok(Some(sample))) => sampler.offer(sample),
            Ok(Ok(None)) => {}
            Ok(Err(e)) | Err(e) => {
                fatal = Some(e);
                break;
            }
        }
    }
    drop(checked); // closes the channel: the walk stops at its next send
    let scan_stats = merger.await.expect("the walk panicked");
    stats
        .unchecked
        .fetch_add(scan_stats.snapshot(Duration::ZERO).transfer_errors, Relaxed);
    if let Some(e) = fatal {
        return Err(Fatal::Store(e));
    }

    check_samples(ctx, sampler.into_items(), concurrency).await
}

type MergedFile = Result<Merged, StoreError>;

/// Walks and merges on a blocking thread; the local files come out of the channel in key order
/// (objects only in the bucket are counted there). The thread returns the walk's own figures.
fn spawn_merge(
    inputs: Inputs,
    scan_stats: Arc<Stats>,
    stats: Arc<VerifyStats>,
) -> (
    tokio::sync::mpsc::Receiver<MergedFile>,
    tokio::task::JoinHandle<Arc<Stats>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<MergedFile>(ITEMS_AHEAD);
    let merger = tokio::task::spawn_blocking(move || {
        let local = scan::scan(inputs.scan, scan_stats.clone());
        let manifest = inputs.manifest.into_iter().flatten();
        for merged in Merge::new(local, inputs.remote, manifest) {
            if let Ok(Merged::RemoteOnly { .. }) = merged {
                stats.remote_only.fetch_add(1, Relaxed);
                continue;
            }
            let failed = merged.is_err();
            if tx.blocking_send(merged).is_err() || failed {
                break;
            }
        }
        scan_stats
    });
    (rx, merger)
}

/// `--sample`: the picked files downloaded and checked, several at once.
async fn check_samples<S: ObjectStore>(
    ctx: Arc<Ctx<S>>,
    picked: Vec<Sample>,
    concurrency: usize,
) -> Result<(), Fatal> {
    let samples = futures::stream::iter(picked)
        .map(|s| {
            let ctx = ctx.clone();
            async move {
                tokio::spawn(ctx.check_sample(s))
                    .await
                    .expect("sample task panicked")
            }
        })
        .buffer_unordered(concurrency);
    futures::pin_mut!(samples);
    while let Some(r) = samples.next().await {
        r?;
    }
    Ok(())
}

/// The start (ns) of the last backup that completed (with or without file errors): a file whose
/// ctime is later may differ from the bucket for a good reason.
fn backup_cutoff(state_dir: &Path) -> Option<i64> {
    let record = state::read_record(state_dir)?;
    let started = if record.outcome == Outcome::Failed {
        record.last_success_started?
    } else {
        record.started
    };
    // The record keeps whole seconds. Rounded up, so a file changed in the second the backup
    // started counts as a problem if it differs: the doubt goes to reporting, not to excusing.
    Some((started as i64 + 1) * 1_000_000_000)
}

/// A file picked for `--sample`.
struct Sample {
    entry: LocalEntry,
    record: Option<ManifestEntry>,
}

struct Ctx<S> {
    store: Arc<S>,
    stats: Arc<VerifyStats>,
    prefix: String,
    cutoff: Option<i64>,
    full: bool,
}

impl<S: ObjectStore> Ctx<S> {
    /// A difference is a problem unless the file changed after the last backup started.
    fn report(&self, kind: Kind, entry: &LocalEntry, detail: &str) {
        if kind != Kind::Unchecked && changed_after(&entry.path, self.cutoff) {
            self.stats.changed(kind, &entry.path, detail);
        } else {
            self.stats.problem(
                kind,
                &entry.path,
                &format!("{}{}", self.prefix, entry.key),
                detail,
            );
        }
    }

    /// The object a HEAD or GET found for `entry`; `None` after reporting that it is gone (listed,
    /// then missing) or could not be had (`failed` prefixes the error), `Err` only when the
    /// error ends the verify.
    fn found<T>(
        &self,
        entry: &LocalEntry,
        result: Result<Option<T>, StoreError>,
        failed: &str,
    ) -> Result<Option<T>, StoreError> {
        match result {
            Ok(Some(found)) => Ok(Some(found)),
            Ok(None) => {
                let gone = "the object disappeared during the verify";
                self.report(Kind::Missing, entry, gone);
                Ok(None)
            }
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => {
                self.report(Kind::Unchecked, entry, &format!("{failed}{e}"));
                Ok(None)
            }
        }
    }

    /// Compares one file; returns it as a sampling candidate when its object looks right.
    async fn check(self: Arc<Self>, file: Merged) -> Result<Option<Sample>, StoreError> {
        self.stats.compared.fetch_add(1, Relaxed);
        let (entry, remote, record) = match file {
            Merged::File {
                entry,
                remote,
                record,
            } => (entry, remote, record),
            Merged::DuplicateKey { entry } => {
                self.report(
                    Kind::Missing,
                    &entry,
                    "its key is also another file's (an escaped name equal to a real one); only \
                     one of them can be backed up: rename one",
                );
                return Ok(None);
            }
            Merged::RemoteOnly { .. } => unreachable!("counted by the merge"),
        };
        let Some(remote) = remote else {
            let detail = if record.is_some() {
                "no object in the bucket, although the manifest records it as backed up"
            } else {
                "no object in the bucket"
            };
            self.report(Kind::Missing, &entry, detail);
            return Ok(None);
        };
        if remote.size != entry.size {
            self.report(
                Kind::SizeMismatch,
                &entry,
                &format!(
                    "the file has {} bytes, its object {}",
                    entry.size, remote.size
                ),
            );
            return Ok(None);
        }
        if self.full {
            self.check_full(&entry, record.as_ref(), remote.size)
                .await?;
        }
        Ok(Some(Sample { entry, record }))
    }

    /// `--full`: the file's SHA-256 against both recorded ones — the manifest's (what was read
    /// at upload) and the object's own checksum (what the bucket holds, from a HEAD per file), so
    /// a changed file and a replaced object are both caught.
    async fn check_full(
        &self,
        entry: &LocalEntry,
        record: Option<&ManifestEntry>,
        size: u64,
    ) -> Result<(), StoreError> {
        let key = format!("{}{}", self.prefix, entry.key);
        let Some(head) = self.found(entry, self.store.head(&key).await, "")? else {
            return Ok(());
        };
        let meta = ObjectMeta::from_map(&head.meta);
        let reference = Reference::new(
            check::manifest_sha(record, head.size, meta.as_ref()),
            Stored::parse(head.checksum_sha256.as_deref()),
            head.etag_md5,
        );
        let layout = if reference.stored.is_composite() {
            self.part_layout(&key, None).await?
        } else {
            None
        };
        let digests = match hash_file(entry, size, layout, reference.md5.is_some()).await {
            Ok(d) => d,
            Err(e) => {
                self.report(Kind::Unchecked, entry, &format!("cannot read it: {e}"));
                return Ok(());
            }
        };
        self.stats.hashed.fetch_add(1, Relaxed);
        match check::judge(&reference, &digests) {
            Verdict::Verified(against) => tracing::debug!(
                path = %entry.path.display(),
                "{}: matches {}",
                shown(&entry.path),
                against.join(" and ")
            ),
            Verdict::Unverified => self.stats.unverifiable(&entry.path),
            Verdict::Mismatch {
                against,
                expected,
                actual,
            } => self.report(
                Kind::ContentMismatch,
                entry,
                &format!(
                    "the file's SHA-256 {actual} differs from {against} ({expected}): the file \
                     changed without its size changing, or the object is not what was uploaded \
                     (--sample or a restore of it tells which)"
                ),
            ),
        }
        Ok(())
    }

    async fn part_layout(
        &self,
        key: &str,
        version: Option<&str>,
    ) -> Result<Option<crate::store::PartLayout>, StoreError> {
        match self.store.part_layout(key, version).await {
            Ok(l) => Ok(l),
            Err(e) if e.is_fatal() => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// `--sample`: download the object, check it against what was recorded, then against the
    /// file itself.
    async fn check_sample(self: Arc<Self>, s: Sample) -> Result<(), StoreError> {
        let entry = &s.entry;
        let key = format!("{}{}", self.prefix, entry.key);
        let found = self.store.get(&key, None).await;
        let Some(download) = self.found(entry, found, "download failed: ")? else {
            return Ok(());
        };
        let meta = ObjectMeta::from_map(&download.meta);
        let reference = Reference::new(
            check::manifest_sha(s.record.as_ref(), download.size, meta.as_ref()),
            Stored::parse(download.checksum_sha256.as_deref()),
            download.etag_md5,
        );
        let layout = if reference.manifest.is_none() && reference.stored.is_composite() {
            self.part_layout(&key, None).await?
        } else {
            None
        };
        let mut hasher = StreamHasher::new(download.size, layout).with_md5(reference.md5.is_some());
        let mut body = download.body;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => hasher.update(&c),
                Err(e) if e.kind == ErrorKind::ChecksumMismatch => {
                    self.stats.sampled.fetch_add(1, Relaxed);
                    self.stats.problem(
                        Kind::Corrupt,
                        &entry.path,
                        &key,
                        &format!("the object's bytes do not match its checksum: {e}"),
                    );
                    return Ok(());
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    self.report(Kind::Unchecked, entry, &format!("download failed: {e}"));
                    return Ok(());
                }
            }
        }
        let remote = hasher.finish();
        self.stats.sampled.fetch_add(1, Relaxed);
        match check::judge(&reference, &remote) {
            // Not a matter of the local file: the bucket holds other bytes than were uploaded.
            Verdict::Mismatch {
                against,
                expected,
                actual,
            } => {
                self.stats.problem(
                    Kind::Corrupt,
                    &entry.path,
                    &key,
                    &format!(
                        "the downloaded object's SHA-256 {actual} differs from {against} \
                         ({expected}): the bucket does not hold what was uploaded"
                    ),
                );
                return Ok(());
            }
            Verdict::Unverified => self.stats.unverifiable(&entry.path),
            Verdict::Verified(_) => {}
        }
        let local = match hash_file(entry, entry.size, None, false).await {
            Ok(d) => d,
            Err(e) => {
                self.report(Kind::Unchecked, entry, &format!("cannot read it: {e}"));
                return Ok(());
            }
        };
        if local.whole != remote.whole {
            self.report(
                Kind::ContentMismatch,
                entry,
                &format!(
                    "the file's SHA-256 {} differs from its downloaded object's {}",
                    hex::encode(local.whole),
                    hex::encode(remote.whole)
                ),
            );
        }
        Ok(())
    }
}

/// Whether the file's inode changed (content, metadata, creation) after `cutoff`.
fn changed_after(path: &Path, cutoff: Option<i64>) -> bool {
    let Some(cutoff) = cutoff else {
        return false;
    };
    std::fs::symlink_metadata(path)
        .map(|m| fsutil::ns(m.ctime(), m.ctime_nsec()) > cutoff)
        .unwrap_or(false)
}

/// Hashes a scanned file as `upload` reads one: opened only as what the walk saw (no symlink
/// followed, no FIFO waited on; `scan::open_entry`).
async fn hash_file(
    entry: &LocalEntry,
    size: u64,
    layout: Option<crate::store::PartLayout>,
    md5: bool,
) -> io::Result<check::Digests> {
    let entry = entry.clone();
    fsutil::blocking(move || {
        let (mut f, _) = scan::open_entry(&entry).map_err(|e| match e {
            OpenError::Vanished => io::Error::from(io::ErrorKind::NotFound),
            OpenError::Replaced(by) => {
                io::Error::other(format!("replaced by {by} since the walk saw it"))
            }
            OpenError::Io(e) => e,
        })?;
        let mut hasher = StreamHasher::new(size, layout).with_md5(md5);
        let mut buf = vec![0; READ_BUF];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(hasher.finish())
    })
    .await
}

/// A uniform random sample of at most `n` items from a stream of unknown length, holding only the
/// sample (Algorithm R).
struct Reservoir<T> {
    n: usize,
    seen: u64,
    items: Vec<T>,
    rng: SplitMix,
}

impl<T> Reservoir<T> {
    fn new(n: usize) -> Self {
        Reservoir {
            n,
            seen: 0,
            items: Vec::with_capacity(n.min(4096)),
            rng: SplitMix::seeded(),
        }
    }

    fn offer(&mut self, item: T) {
        if self.n == 0 {
            return;
        }
        self.seen += 1;
        if self.items.len() < self.n {
            self.items.push(item);
        } else {
            let j = self.rng.below(self.seen);
            if let Some(slot) = self.items.get_mut(j as usize) {
                *slot = item;
            }
        }
    }

    fn into_items(self) -> Vec<T> {
        self.items
    }
}

/// SplitMix64: plenty for picking samples (not for secrets), seeded from the standard library's
/// per-process random hasher keys, so no RNG crate is needed.
struct SplitMix(u64);

impl SplitMix {
    fn seeded() -> SplitMix {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        SplitMix(h.finish())
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is below 2^-40 for any n this sees).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    #[test]
    fn reservoir_holds_at_most_n_and_samples_uniformly() {
        let mut counts = [0u32; 10];
        for _ in 0..2000 {
            let mut r = Reservoir::new(3);
            for i in 0..10 {
                r.offer(i);
            }
            let items = r.into_items();
            assert_eq!(items.len(), 3);
            for i in items {
                counts[i] += 1;
            }
        }
        // Each of 10 items is picked with probability 3/10: 600 of 2000 expected.
        for (i, c) in counts.iter().enumerate() {
            assert!(
                (450..750).contains(c),
                "item {i} picked {c} times: {counts:?}"
            );
        }
        let mut r = Reservoir::new(5);
        r.offer(1);
        assert_eq!(r.into_items(), [1]);
        let mut r = Reservoir::new(0);
        r.offer(1);
        assert!(r.into_items().is_empty());
    }

    #[test]
    fn exit_codes_follow_the_worst_finding() {
        let clean = VerifyFigures::default();
        assert_eq!(clean.exit_code(), exit::SUCCESS);
        let unchecked = VerifyFigures {
            unchecked: 1,
            changed_since_backup: 5,
            ..Default::default()
        };
        assert_eq!(unchecked.exit_code(), exit::FILE_ERRORS);
        let problems = VerifyFigures {
            unchecked: 1,
            corrupt: 1,
            ..Default::default()
        };
        assert_eq!(problems.exit_code(), exit::VERIFY_PROBLEMS);
        let changed_only = VerifyFigures {
            changed_since_backup: 3,
            ..Default::default()
        };
        assert_eq!(changed_only.exit_code(), exit::SUCCESS);
    }
}
