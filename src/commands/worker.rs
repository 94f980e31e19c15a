//! `nightcopy worker`: a long-running process on a host that mounts the same filesystem as the
//! coordinator. It takes batches of planned uploads from the work queue, uploads each file through
//! the same SHA-256-checked path as a single-host run, sends one report per batch to the results
//! queue, and only then deletes the batch's message — a worker that dies mid-batch gives the batch
//! back when its visibility runs out, and another worker does it again (the same bytes stored
//! twice is harmless; the coordinator counts the first report).
//!
//! Each file is stat'ed again on this host (its device and inode are this host's): a file that
//! changed since the plan is uploaded as it is now — the plan said it needs a backup, and the
//! newest content is what a backup wants — and the report carries the size, mtime and SHA-256 of
//! what was read, which is what the coordinator records in the manifest.
//!
//! A worker keeps `transfer.concurrency` uploads going across batches: it takes the next batch
//! when fewer files than that are waiting for a slot, so the end of one batch (its last uploads,
//! the report, the delete) overlaps the start of the next, and a concurrency above batch-files is
//! used. At most concurrency ÷ batch-files + 1 batches are in hand, so a worker does not hoard what
//! idle workers could take.
//!
//! While a batch is in hand its visibility is extended every half visibility-timeout. A fatal
//! store error (credentials, access denied) ends the worker with exit 1 (systemd restarts it; a
//! batch that fails twice goes to the dead-letter queue): no new receive, the one in flight and
//! the batches in hand are worked to their end, and those that failed go back to the queue.
//! SIGTERM: no new receive; the batches in hand and what the receive in flight brought go back,
//! exit 0. Nothing goes back while a receive is in flight: it could take the batch again, and
//! spend one of its two receives.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::config::{Config, Distribute};
use crate::error::{self, Fatal};
use crate::keys;
use crate::notify;
use crate::plan::Reason;
use crate::queue::{
    self, FileOutcome, FileReport, QueueError, Queues, Received, Report, WorkBatch, WorkFile,
};
use crate::report::{Ending, FileErrorKind, Stats};
use crate::scan::beneath::{Beneath, Refused};
use crate::scan::ScanOptions;
use crate::state::manifest::ManifestEntry;
use crate::stop::Stop;
use crate::store::s3::S3Store;
use crate::store::{sdk, StoreError};
use crate::upload::{Resume, Skip, Upload, Uploader};

/// The receive's wait while batches are in hand (a stop waits for it; idle, it is the long poll).
const BUSY_POLL: Duration = Duration::from_secs(2);

/// Upload records a worker keeps: as long as the shipped lifecycle rule keeps the upload.
const STALE_UPLOAD_RECORDS: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// `nightcopy worker` as the command runs it: set up, serve until stopped, one summary line.
pub async fn run(config: &Config, bar: Option<indicatif::ProgressBar>) -> Ending {
    let started = Instant::now();
    let worker = match Worker::start(config).await {
        Ok(w) => w,
        Err(e) => return error::ending("worker", Err(e)),
    };
    notify::ready(&format!(
        "worker: taking batches from {}",
        worker.d.queue_url.0
    ));
    let progress = notify::Progress::start(worker.stats.clone(), started, bar);
    let result = worker.serve().await;
    let refused = worker.refused.load(Relaxed);
    drop(progress);
    let g = worker.stats.snapshot(started.elapsed());
    let (ending, how) = match &result {
        Ok(()) => (Ending::SUCCESS, "worker stopped".to_owned()),
        Err(e) => (e.ending(), format!("worker FAILED: {e}")),
    };
    let code = ending.exit_code();
    crate::summary!(
        code,
        files_transferred = g.files_transferred,
        bytes_transferred = g.bytes_transferred,
        transfer_errors = g.transfer_errors,
        exit_code = code,
        refused_messages = refused,
        "{how}: {} files transferred ({}), {} transfer errors, {} vanished, {} messages \
         refused, {:.1}s",
        g.files_transferred,
        bytesize::ByteSize(g.bytes_transferred).display().iec(),
        g.transfer_errors,
        g.vanished,
        refused,
        g.elapsed_seconds
    );
    notify::stopping(&how);
    ending
}

struct Worker<'a> {
    config: &'a Config,
    d: &'a Distribute,
    queues: Queues,
    uploader: Uploader<S3Store>,
    stats: Arc<Stats>,
    stop: Stop,
    host: String,
    /// The source root and the walk's rules, for the paths the messages name.
    beneath: Arc<Beneath>,
    /// Upload slots shared by the batches in hand: `transfer.concurrency` of them.
    slots: tokio::sync::Semaphore,
    /// Files of the batches in hand that have no slot yet.
    waiting: AtomicUsize,
    /// Messages refused (not authenticated, not a batch).
    refused: AtomicUsize,
}

/// A file of a batch in hand that has no upload slot yet; counted in `Worker::waiting`.
struct Unstarted<'a>(&'a AtomicUsize);

impl<'a> Unstarted<'a> {
    fn new(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Relaxed);
        Unstarted(waiting)
    }
}

impl Drop for Unstarted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// What the worker does with what a receive brings, and whether it takes more.
///
/// A stop or a fatal error ends serving. Nothing goes back to the queue while a receive is in
/// flight (it could take it again at once, and a batch has only two receives before the
/// dead-letter queue): first the receive is answered and the batches in hand run to their end,
/// then what is left goes back, visible at once for other workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Batches are taken; a failed receive is fatal.
    Serving,
    /// After a fatal error, what the receive in flight brings is worked on like the batches in
    /// hand: an error of one key (access denied to it) must not spend a receive of the batches
    /// that merely came with it; an error of every key fails them at once.
    Failing,
    /// After a stop, what the receive in flight brings goes back unopened.
    Stopping,
}

/// How a batch's work failed, by the step of the protocol (upload, report, delete) it failed in.
/// Either ends the worker.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// An upload, before any report: the message is given back at once, for another worker.
    #[error(transparent)]
    Upload(#[from] StoreError),
    /// The report, or the delete after it: the report may have gone out, or the batch is
    /// reported but not deleted, so the message is not given back. It comes back after its
    /// visibility timeout, and a second report is harmless.
    #[error(transparent)]
    Report(#[from] QueueError),
}

impl<'a> Worker<'a> {
    /// The source, the credentials, the queue and the bucket, checked before any batch is taken.
    async fn start(config: &'a Config) -> Result<Worker<'a>, Fatal> {
        let d = config
            .distribute
            .as_ref()
            .ok_or(Fatal::NotDistributed("worker"))?;
        let opts = ScanOptions::for_config(config)?;
        let beneath = Beneath::open(opts)
            .map_err(|e| Fatal::Source(keys::shown(&config.source.path.0).to_string(), e))?;
        let sdk = sdk::load_checked(config).await?;
        let key = config.auth_key()?;
        if key.is_none() {
            tracing::warn!(
                "queue messages are not authenticated (no auth-key-file): a forged batch is still \
                 held to the source and the walk's rules, but nothing proves it came from the \
                 coordinator (docs/scale-out.md, \"Trust\")"
            );
        }
        let queues = Queues::new(&sdk, d, config.destination.allow_insecure_endpoint, key);
        queues.check(&queues.work).await?;
        let stats = Arc::new(Stats::default());
        let stop =
            Stop::on_signals("no new batch is taken; the batches in hand go back to the queue")
                .unwrap_or_else(|e| {
                    tracing::warn!(
                        "cannot listen for SIGTERM/SIGINT ({e}); a stop will kill the worker"
                    );
                    Stop::never()
                });
        let store = Arc::new(S3Store::for_config(&sdk, config));
        crate::store::bucket::check(store.as_ref(), config).await?;
        let mut uploader = Uploader::for_config(store, stats.clone(), config, stop.clone());
        // A worker continues the uploads it was interrupted in when a batch comes back to it; one
        // that went to another worker is not, so records older than the bucket's lifecycle rule
        // (which aborts the upload itself after 7 days) are dropped here.
        if let Some(resume) = Resume::for_config(config) {
            uploader = uploader.resuming(resume);
            uploader
                .abandon_stale(std::time::SystemTime::now() - STALE_UPLOAD_RECORDS)
                .await;
        }
        Ok(Worker {
            config,
            d,
            queues,
            uploader,
            stats,
            stop,
            host: queue::host_name(),
            beneath: Arc::new(beneath),
            slots: tokio::sync::Semaphore::new(config.transfer.concurrency.0.max(1)),
            waiting: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        })
    }

    /// Takes batches until a stop or a fatal error, then winds down (`Mode`): one loop, whose
    /// every turn waits for the receive in flight, a batch in hand, or (serving) a stop.
    async fn serve(&self) -> Result<(), Fatal> {
        let visibility = self.d.visibility_timeout.0;
        let concurrency = self.config.transfer.concurrency.0.max(1);
        let most = concurrency.div_ceil(self.d.batch_files.0) + 1;
        let mut in_hand = futures::stream::FuturesUnordered::new();
        // Kept across turns of the loop, and never dropped unanswered: SQS hands a message to a
        // receive whose answer is never read all the same, and that message then stays invisible
        // for the visibility timeout with one of its two receives spent.
        let mut receiving = None;
        let mut failed = None;
        let mut back = Vec::new();
        let mut mode = Mode::Serving;
        loop {
            if mode == Mode::Serving {
                mode = self.mode(&failed, receiving.is_some());
            }
            if mode == Mode::Serving
                && receiving.is_none()
                && in_hand.len() < most
                && self.waiting.load(Relaxed) < concurrency
            {
                // With batches in hand, a short poll: a stop or a fatal error waits for the
                // receive in flight, and this bounds that wait.
                let wait = if in_hand.is_empty() {
                    queue::LONG_POLL
                } else {
                    BUSY_POLL
                };
                receiving = Some(Box::pin(self.queues.receive(
                    &self.queues.work,
                    1,
                    wait,
                    visibility,
                )));
            }
            tokio::select! {
                r = async { receiving.as_mut().expect("checked").await }, if receiving.is_some() => {
                    receiving = None;
                    for (m, batch) in self.received(mode, r, &mut failed, &mut back).await {
                        in_hand.push(self.take(m, batch));
                    }
                }
                Some((give_back, done)) = in_hand.next(), if !in_hand.is_empty() => {
                    back.extend(give_back);
                    if let Err(e) = done {
                        failed.get_or_insert(e);
                    }
                }
                () = self.stop.clone().wait(), if mode == Mode::Serving => {}
                else => break,
            }
        }
        for receipt in &back {
            if let Err(e) = self
                .queues
                .extend(&self.queues.work, receipt, Duration::ZERO)
                .await
            {
                tracing::warn!(
                    "cannot give a batch back (it returns after its visibility timeout): {e}"
                );
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Serving, until a fatal error or a stop; then how to wind down.
    fn mode(&self, failed: &Option<Fatal>, receiving: bool) -> Mode {
        match (failed, self.stop.requested()) {
            (Some(_), _) => Mode::Failing,
            (None, Some(_)) => {
                if receiving {
                    tracing::info!(
                        "stopping: waiting for the receive in flight (at most {}s), then the \
                         batches in hand go back to the queue",
                        queue::LONG_POLL.as_secs()
                    );
                }
                Mode::Stopping
            }
            (None, None) => Mode::Serving,
        }
    }

    /// What a receive brought, as `mode` wants it: the batches to take; stopping, the receipts
    /// to give back. An error that ends serving goes to `failed`.
    async fn received(
        &self,
        mode: Mode,
        r: Result<Vec<Received>, QueueError>,
        failed: &mut Option<Fatal>,
        back: &mut Vec<String>,
    ) -> Vec<(Received, WorkBatch)> {
        let received = match (mode, r) {
            (_, Ok(received)) => received,
            (Mode::Serving, Err(e)) => {
                failed.get_or_insert(e.into());
                Vec::new()
            }
            // Winding down already: said, and nothing more to give back.
            (_, Err(e)) => {
                tracing::warn!("{e}");
                Vec::new()
            }
        };
        if mode == Mode::Serving {
            self.stats.polled();
        }
        let mut taken = Vec::new();
        for m in received {
            if mode == Mode::Stopping {
                back.push(m.receipt);
                continue;
            }
            match self.accept(m).await {
                Ok(Some(batch)) => taken.push(batch),
                Ok(None) => {}
                Err(e) => _ = failed.get_or_insert(e),
            }
        }
        taken
    }

    /// A batch to work on, or `None` for a message that is not one of this worker's (left for
    /// the dead-letter queue, or given back for a worker that is configured for it).
    async fn accept(&self, m: Received) -> Result<Option<(Received, WorkBatch)>, Fatal> {
        let batch = match self.queues.decode_batch(&m.body) {
            Ok(batch) => batch,
            Err(e) => {
                // Never acted on. Left in the queue: after its second receive it moves to the
                // dead-letter queue, where `nightcopy dlq` shows it.
                self.refused.fetch_add(1, Relaxed);
                tracing::error!(
                    "a message in {} is refused: {} (received {} times): left for the dead-letter \
                     queue",
                    self.queues.work,
                    crate::keys::shown(&e.to_string()),
                    m.receives
                );
                return Ok(None);
            }
        };
        if batch.destination != self.config.destination_id() {
            // Not ours to write: after its second receive it moves to the dead-letter queue.
            tracing::error!(
                "batch {} of run {} is for {}, and this worker writes to {}: refused (check that \
                 the workers' destination: matches the coordinator's)",
                batch.batch,
                batch.run,
                batch.destination,
                self.config.destination_id()
            );
            // Back to the queue at once, for a worker that is configured for it.
            self.queues
                .extend(&self.queues.work, &m.receipt, Duration::ZERO)
                .await?;
            return Ok(None);
        }
        Ok(Some((m, batch)))
    }

    /// One batch, start to finish. A stop or a fatal error returns its receipt, for `serve` to
    /// give it back once no receive is in flight.
    async fn take(&self, m: Received, batch: WorkBatch) -> (Option<String>, Result<(), Fatal>) {
        let done = self.work(&m, batch).await;
        match done {
            Ok(true) => (None, Ok(())),
            Ok(false) => (Some(m.receipt), Ok(())),
            Err(BatchError::Upload(e)) => (Some(m.receipt), Err(e.into())),
            Err(BatchError::Report(e)) => (None, Err(e.into())),
        }
    }

    /// Uploads, reports and deletes the batch: `true`; `false` when a stop came first.
    async fn work(&self, m: &Received, batch: WorkBatch) -> Result<bool, BatchError> {
        // Counted as waiting from now, before this future first runs: the loop that took the
        // batch looks at the count before it asks for another.
        let unstarted = batch
            .files
            .iter()
            .map(|_| Unstarted::new(&self.waiting))
            .collect();
        notify::status(&format!(
            "batch {} of run {} ({} files): {}",
            batch.batch,
            batch.run,
            batch.files.len(),
            self.stats.status_line(Duration::ZERO)
        ));
        let extender = self.keep_invisible(&m.receipt);
        let done = self.upload_batch(&batch, unstarted).await;
        extender.abort();
        let files = match done {
            Ok(Some(files)) => files,
            // Stopped, or a fatal error: the batch goes back to the queue.
            Ok(None) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let report = Report {
            run: batch.run.clone(),
            batch: batch.batch,
            worker: self.host.clone(),
            files,
        };
        let body = self.queues.encode_report(&report);
        self.queues.send(&self.queues.results, vec![body]).await?;
        // Only now: a worker that dies before this point leaves the batch to another one.
        self.queues.delete(&self.queues.work, &m.receipt).await?;
        Ok(true)
    }

    /// Extends the batch's visibility every half timeout while it is in work.
    fn keep_invisible(&self, receipt: &str) -> tokio::task::JoinHandle<()> {
        let (queues, receipt) = (self.queues.clone(), receipt.to_owned());
        let visibility = self.d.visibility_timeout.0;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(visibility / 2).await;
                if let Err(e) = queues.extend(&queues.work, &receipt, visibility).await {
                    tracing::warn!("cannot extend the batch's visibility: {e}");
                }
            }
        })
    }

    /// Uploads the batch's files side by side; `None` when a stop interrupted it.
    async fn upload_batch(
        &self,
        batch: &WorkBatch,
        unstarted: Vec<Unstarted<'_>>,
    ) -> Result<Option<Vec<FileReport>>, StoreError> {
        let concurrency = self.config.transfer.concurrency.0.max(1);
        let mut reports = futures::stream::iter(batch.files.iter().zip(unstarted))
            .map(|(f, unstarted)| async move {
                let _slot = self.slots.acquire().await.expect("never closed");
                drop(unstarted);
                self.upload_one(f).await
            })
            .buffered(concurrency);
        let mut out = Vec::with_capacity(batch.files.len());
        while let Some(r) = reports.next().await {
            match r? {
                Some(report) => out.push(report),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// One file: resolved beneath the source (`scan::beneath`), stat'ed again here, uploaded as
    /// it is now. `None`: a stop came first.
    async fn upload_one(&self, f: &WorkFile) -> Result<Option<FileReport>, StoreError> {
        let raw = keys::decode_raw_path(&f.path);
        // For naming only: an absolute path "joins" to itself, which is what was asked for.
        let path = self
            .config
            .source
            .path
            .0
            .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw));
        let report = |outcome, detail: Option<String>, kind: Option<FileErrorKind>| FileReport {
            key: f.key.clone(),
            path: f.path.clone(),
            outcome,
            size: 0,
            mtime_ns: 0,
            sha256: None,
            composite: None,
            kind,
            detail,
        };
        let (beneath, key, escaped) = (self.beneath.clone(), f.key.clone(), f.escaped);
        let resolved =
            crate::fsutil::blocking(move || Ok(beneath.resolve(&raw, &key, escaped))).await;
        let entry = match resolved {
            Ok(Ok(entry)) => entry,
            Ok(Err(Refused::Vanished)) => {
                self.stats.vanished(&path);
                return Ok(Some(report(FileOutcome::Vanished, None, None)));
            }
            Ok(Err(Refused::NotAFile(by))) => {
                self.stats.replaced(&path, by);
                return Ok(Some(report(FileOutcome::Replaced, Some(by.into()), None)));
            }
            Ok(Err(refused)) => {
                let kind = match refused {
                    Refused::TooLarge { .. } => FileErrorKind::TooLarge,
                    Refused::KeyTooLong(_) => FileErrorKind::BadName,
                    Refused::Io(_) => FileErrorKind::Unreadable,
                    _ => FileErrorKind::Refused,
                };
                self.stats.file_error(&path, kind, &refused);
                let detail = Some(refused.to_string());
                return Ok(Some(report(FileOutcome::Error, detail, Some(kind))));
            }
            Err(e) => {
                self.stats.file_error(&path, FileErrorKind::Unreadable, &e);
                let detail = Some(e.to_string());
                let kind = Some(FileErrorKind::Unreadable);
                return Ok(Some(report(FileOutcome::Error, detail, kind)));
            }
        };
        let reason = Reason::from_name(&f.reason).unwrap_or(Reason::New);
        Ok(Some(match self.uploader.upload(entry, reason).await? {
            Upload::Stored(record, composite) => uploaded(f, &record, composite),
            Upload::Skipped(Skip::Stopped) => return Ok(None),
            Upload::Skipped(Skip::Vanished) => report(FileOutcome::Vanished, None, None),
            Upload::Skipped(Skip::Replaced(by)) => report(FileOutcome::Replaced, Some(by), None),
            Upload::Skipped(Skip::Error(kind, why)) => {
                report(FileOutcome::Error, Some(why), Some(kind))
            }
        }))
    }
}

fn uploaded(f: &WorkFile, record: &ManifestEntry, composite: Option<[u8; 32]>) -> FileReport {
    FileReport {
        key: f.key.clone(),
        path: f.path.clone(),
        outcome: FileOutcome::Uploaded,
        size: record.size,
        mtime_ns: record.mtime_ns,
        sha256: record.sha256.map(hex::encode),
        composite: composite.map(hex::encode),
        kind: None,
        detail: None,
    }
}
