//! `nightcopy run` with `distribute:`: the coordinator. It walks, lists and plans exactly as a
//! single host does, but sends the planned uploads in batches to the work queue instead of
//! uploading them, and collects the workers' reports (and counts what fell into the dead-letter
//! queue) until every batch is accounted for or the deadline passes. Only then does it write the
//! manifest, so the summary line, the run record and the six metrics describe the whole run, over
//! all workers, exactly as for a single host.
//!
//! At most `distribute.max-queued` batches are awaited at once: with that many sent and not
//! reported, the coordinator collects reports before it sends more, and the walk waits. A stop or
//! the deadline then leaves a bounded backlog behind, and reports never pile up unread.
//!
//! Memory stays flat in the number of files: the plan is spooled to the state directory as it is
//! made (one line per file, in key order), reports are appended to a second file as they come,
//! and an index of eight bytes per batch, also on disk, says where each batch's report is (or that
//! it was lost). The manifest is then written from the plan in key order, looking each batch's
//! report up once. In memory: the batch being filled and at most ten waiting to be sent.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::copy::StepResult;
use crate::config::{Config, Distribute};
use crate::error::Fatal;
use crate::integrity::{self, Held};
use crate::keys;
use crate::plan::Step;
use crate::queue::{FileOutcome, FileReport, Queues, Report, WorkBatch, WorkFile, MAX_PER_CALL};
use crate::report::{FileErrorKind, Stats};
use crate::state::manifest::{self, ManifestEntry};
use crate::stop::Stop;
use crate::store::ObjectStore;

/// SendMessageBatch takes at most 256 KiB in all; a little is left for the envelope.
const MAX_CALL_BYTES: usize = 250 * 1024;
/// How often the dead-letter queue is looked at while reports are awaited.
const DLQ_EVERY: Duration = Duration::from_secs(30);
/// Reports are received invisibly for this long, and deleted once counted.
const REPORT_VISIBILITY: Duration = Duration::from_secs(120);
/// A batch in the dead-letter queue is looked at, and left there for `nightcopy dlq`.
const DLQ_VISIBILITY: Duration = Duration::from_secs(60);
/// Index values: where a batch's report starts in the results file (+1), or that it was lost.
const LOST: u64 = u64::MAX;

/// One line of the spooled plan.
#[derive(Serialize, Deserialize)]
enum PlanLine {
    /// Unchanged: the record goes into the next manifest as it is (a manifest line).
    Keep(String),
    /// Sent as file `index` of batch `batch`; `previous` (a manifest line) is kept if the upload
    /// does not happen.
    Sent {
        batch: u64,
        index: usize,
        path: String,
        previous: Option<String>,
    },
}

/// The plan, the reports and their index, and each batch's digest (`queue::batch_digest`, 32
/// bytes a batch), in the state directory while the run lasts.
struct Spool {
    dir: PathBuf,
    plan: BufWriter<File>,
    results: File,
    results_len: u64,
    index: File,
    digests: File,
}

const SPOOL_FILES: [&str; 4] = [
    "distribute.plan",
    "distribute.reports",
    "distribute.index",
    "distribute.batches",
];

impl Spool {
    fn create(dir: &Path) -> std::io::Result<Spool> {
        // Created new through the state directory's handle, never through a link planted at the
        // name; a leftover of a killed run is removed first (fsutil::Dir::create_fresh).
        let state = crate::fsutil::Dir::open(dir)?;
        let open = |name: &str| state.create_fresh(name, 0o600);
        Ok(Spool {
            dir: dir.to_owned(),
            plan: BufWriter::with_capacity(256 * 1024, open(SPOOL_FILES[0])?),
            results: open(SPOOL_FILES[1])?,
            results_len: 0,
            index: open(SPOOL_FILES[2])?,
            digests: open(SPOOL_FILES[3])?,
        })
    }

    /// The digest of batch `batch` as it was sent; `None` for a batch never closed.
    fn digest(&self, batch: u64) -> std::io::Result<Option<[u8; 32]>> {
        let mut d = [0u8; 32];
        match self.digests.read_exact_at(&mut d, batch * 32) {
            Ok(()) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn plan(&mut self, line: &PlanLine) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.plan, line)?;
        self.plan.write_all(b"\n")
    }

    fn slot(&self, batch: u64) -> std::io::Result<Option<u64>> {
        let mut b = [0u8; 8];
        match self.index.read_exact_at(&mut b, batch * 8) {
            Ok(()) => Ok(Some(u64::from_le_bytes(b)).filter(|v| *v != 0)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn has(&self, batch: u64) -> std::io::Result<bool> {
        Ok(self.slot(batch)?.is_some())
    }

    fn record(&mut self, report: &Report) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(report)?;
        line.push(b'\n');
        self.results.write_all_at(&line, self.results_len)?;
        self.index
            .write_all_at(&(self.results_len + 1).to_le_bytes(), report.batch * 8)?;
        self.results_len += line.len() as u64;
        Ok(())
    }

    fn lost(&mut self, batch: u64) -> std::io::Result<()> {
        self.index.write_all_at(&LOST.to_le_bytes(), batch * 8)
    }

    fn report(&self, batch: u64) -> std::io::Result<Option<Report>> {
        match self.slot(batch)? {
            None | Some(LOST) => Ok(None),
            Some(at) => {
                let mut f = &self.results;
                f.seek(SeekFrom::Start(at - 1))?;
                let mut line = String::new();
                BufReader::new(f.take(1 << 20)).read_line(&mut line)?;
                Ok(serde_json::from_str(&line).ok())
            }
        }
    }

    /// The plan, read back from the start.
    fn read_plan(&mut self) -> std::io::Result<impl Iterator<Item = std::io::Result<PlanLine>>> {
        self.plan.flush()?;
        let f = self.plan.get_ref().try_clone()?;
        let mut reader = BufReader::with_capacity(256 * 1024, f);
        reader.seek(SeekFrom::Start(0))?;
        Ok(reader
            .lines()
            .map(|l| l.and_then(|l| serde_json::from_str(&l).map_err(std::io::Error::other))))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        for name in SPOOL_FILES {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }
}

/// The batches being filled and sent.
struct Sender<'a> {
    queues: &'a Queues,
    d: &'a Distribute,
    run: String,
    destination: String,
    next: u64,
    current: Vec<WorkFile>,
    current_bytes: u64,
    ready: std::collections::VecDeque<String>,
    /// Where each closed batch's digest goes (the spool's `distribute.batches`).
    digests: File,
    /// Batches sent, which are batches `0..sent`: they are numbered and sent in order.
    sent: u64,
    /// Past the deadline: batches are still numbered (the plan names them) but never sent.
    closed: bool,
}

impl Sender<'_> {
    /// Adds a file; returns its batch and place in it.
    fn add(&mut self, file: WorkFile) -> std::io::Result<(u64, usize)> {
        let fits = self.current.len() < self.d.batch_files.0
            && (self.current.is_empty() || self.current_bytes + file.size <= self.d.batch_bytes.0);
        if !fits {
            self.close_batch()?;
        }
        self.current_bytes += file.size;
        self.current.push(file);
        Ok((self.next, self.current.len() - 1))
    }

    fn close_batch(&mut self) -> std::io::Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let batch = WorkBatch {
            run: self.run.clone(),
            batch: self.next,
            destination: self.destination.clone(),
            files: std::mem::take(&mut self.current),
        };
        self.digests
            .write_all_at(&batch.digest(), batch.batch * 32)?;
        self.next += 1;
        self.current_bytes = 0;
        if !self.closed {
            self.ready.push_back(self.queues.encode_batch(&batch));
        }
        Ok(())
    }

    /// A call's worth of batches is ready.
    fn call_ready(&self) -> bool {
        self.ready.len() >= MAX_PER_CALL
    }

    /// Sends up to `n` of the ready batches, in calls of at most ten messages and 256 KiB.
    async fn send(&mut self, n: usize) -> Result<(), Fatal> {
        let mut left = n.min(self.ready.len());
        while left > 0 {
            let mut call = Vec::new();
            let mut bytes = 0;
            while call.len() < left.min(MAX_PER_CALL) {
                let Some(b) = self.ready.front() else { break };
                if !call.is_empty() && bytes + b.len() > MAX_CALL_BYTES {
                    break;
                }
                bytes += b.len();
                call.push(self.ready.pop_front().expect("looked at"));
            }
            left -= call.len();
            self.sent += call.len() as u64;
            self.queues
                .send(&self.queues.work, call)
                .await
                .map_err(|e| Fatal::Queue(e.to_string()))?;
        }
        Ok(())
    }

    /// Nothing more is sent; returns how many closed batches that leaves unsent.
    fn close(&mut self) -> usize {
        self.closed = true;
        std::mem::take(&mut self.ready).len()
    }
}

/// The reports counted so far, and when the coordinator stops waiting for more.
struct Collect {
    accounted: u64,
    deadline: Instant,
    next_dlq: Instant,
}

impl Collect {
    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// What the coordinator needs besides the planned steps.
pub(super) struct Coordinator<'a, S> {
    config: &'a Config,
    queues: &'a Queues,
    /// For the HEAD that holds each reported upload to the object it names.
    store: &'a S,
    stats: Arc<Stats>,
    stop: Stop,
    /// The endpoint returned an object without a checksum (said once a run).
    unchecksummed: std::sync::atomic::AtomicBool,
    /// Reports refused: not authenticated, unreadable, or not naming their batch's files.
    refused: std::sync::atomic::AtomicU64,
}

impl<'a, S: ObjectStore> Coordinator<'a, S> {
    pub fn new(
        config: &'a Config,
        queues: &'a Queues,
        store: &'a S,
        stats: Arc<Stats>,
        stop: Stop,
    ) -> Self {
        Coordinator {
            config,
            queues,
            store,
            stats,
            stop,
            unchecksummed: Default::default(),
            refused: Default::default(),
        }
    }

    fn path_of(&self, rel: &str) -> PathBuf {
        let raw = keys::decode_raw_path(rel);
        self.config
            .source
            .path
            .0
            .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw))
    }

    fn spool_error(&self, e: std::io::Error) -> Fatal {
        Fatal::Manifest(self.config.state_dir.0.display().to_string(), e)
    }

    /// Sends the plan, waits for it to be done, and writes the manifest.
    pub async fn run(
        &self,
        mut steps: tokio::sync::mpsc::Receiver<StepResult>,
        mut writer: manifest::Writer,
    ) -> Result<(), Fatal> {
        let d = self.config.distribute.as_ref().expect("a distributed run");
        let run = crate::queue::run_id();
        let mut spool = Spool::create(&self.config.state_dir.0).map_err(|e| self.spool_error(e))?;
        let mut sender = Sender {
            queues: self.queues,
            d,
            run: run.clone(),
            destination: self.config.destination_id(),
            next: 0,
            current: Vec::new(),
            current_bytes: 0,
            ready: Default::default(),
            digests: spool.digests.try_clone().map_err(|e| self.spool_error(e))?,
            sent: 0,
            closed: false,
        };
        let mut collect = Collect {
            accounted: 0,
            deadline: Instant::now() + d.deadline.0,
            next_dlq: Instant::now() + DLQ_EVERY,
        };
        let prefix = self.config.destination.prefix.as_str();
        tracing::info!(
            "distributed run {run}: sending batches of planned uploads to {} (at most {} awaited \
             at once; deadline {})",
            self.queues.work,
            d.max_queued,
            humantime::format_duration(d.deadline.0)
        );
        // 1. Plan and send, collecting reports whenever the queue holds max-queued batches.
        // A stop sends nothing more; past the deadline the plan is still read to its end (what
        // is unchanged goes into the manifest) but nothing more is sent.
        loop {
            let step = tokio::select! {
                step = steps.recv() => step,
                () = self.stop.clone().wait() => None,
            };
            let Some(step) = step else { break };
            match step.map_err(Fatal::Store)? {
                Step::Unchanged { record } => {
                    self.stats.checked();
                    spool.plan(&PlanLine::Keep(record.to_line()))
                }
                Step::RemoteOnly { key } => {
                    self.stats.remote_only(&key);
                    Ok(())
                }
                Step::DuplicateKey { entry } => {
                    super::copy::duplicate_key(&self.stats, prefix, &entry);
                    Ok(())
                }
                Step::Upload {
                    entry,
                    reason,
                    previous,
                } => {
                    let rel = entry
                        .path
                        .strip_prefix(&self.config.source.path.0)
                        .unwrap_or(&entry.path);
                    let path = keys::encode_raw_path(rel);
                    let file = WorkFile {
                        key: entry.key.clone(),
                        path: path.clone(),
                        size: entry.size,
                        mtime_ns: entry.mtime_ns,
                        reason: reason.to_string(),
                        escaped: entry.raw_path.is_some(),
                    };
                    let (batch, index) = sender.add(file).map_err(|e| self.spool_error(e))?;
                    spool.plan(&PlanLine::Sent {
                        batch,
                        index,
                        path,
                        previous: previous.map(|p| p.to_line()),
                    })
                }
            }
            .map_err(|e| self.spool_error(e))?;
            if sender.call_ready() {
                self.send_ready(&run, &mut sender, &mut collect, &mut spool)
                    .await?;
            }
        }
        drop(steps);
        if self.stop.requested().is_none() {
            sender.close_batch().map_err(|e| self.spool_error(e))?;
            self.send_ready(&run, &mut sender, &mut collect, &mut spool)
                .await?;
        }
        let total = sender.sent;
        tracing::info!(
            "distributed run {run}: {total} batches sent; waiting for the workers' reports \
             (deadline in {})",
            humantime::format_duration(Duration::from_secs(
                collect
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs()
            ))
        );

        // 2. Collect reports until every batch is accounted for, the deadline, or a stop.
        self.collect(&run, total, &mut collect, &mut spool, None)
            .await?;
        let accounted = collect.accounted;

        // 3. Name what was never accounted for, and write the manifest from the plan.
        let stopped = self.stop.requested();
        let mut batch_cache: Option<(u64, Option<Report>)> = None;
        for line in spool.read_plan().map_err(|e| self.spool_error(e))? {
            let line = line.map_err(|e| self.spool_error(e))?;
            let entry = match line {
                PlanLine::Keep(text) => Some(manifest_line(&text)),
                PlanLine::Sent {
                    batch,
                    index,
                    path,
                    previous,
                } => {
                    if batch_cache.as_ref().is_none_or(|(b, _)| *b != batch) {
                        let r = spool.report(batch).map_err(|e| self.spool_error(e))?;
                        batch_cache = Some((batch, r));
                    }
                    let report = batch_cache.as_ref().and_then(|(_, r)| r.as_ref());
                    let file = report.and_then(|r| r.files.get(index));
                    let previous = previous.as_deref().map(manifest_line);
                    let unaccounted = !spool.has(batch).map_err(|e| self.spool_error(e))?;
                    if unaccounted && stopped.is_none() {
                        let deadline = humantime::format_duration(d.deadline.0);
                        let why = if batch < total {
                            format!(
                                "not accounted for by the deadline ({deadline}): no worker \
                                 reported its batch {batch}; the next run tries it again"
                            )
                        } else {
                            format!(
                                "not sent by the deadline ({deadline}): its batch {batch} was \
                                 still waiting for room in the work queue (distribute.max-queued \
                                 {}); the next run tries it again",
                                d.max_queued
                            )
                        };
                        self.stats
                            .file_error(&self.path_of(&path), FileErrorKind::Upload, &why);
                    }
                    // Not uploaded: the old record still describes what the bucket holds.
                    file.and_then(uploaded_record).or(previous)
                }
            };
            if let Some(entry) = entry {
                writer.push(&entry).map_err(|e| self.spool_error(e))?;
            }
        }
        if let Some(sig) = stopped {
            super::copy::keep_the_rest(
                writer,
                &self.config.state_dir.0,
                &self.config.destination_id(),
            )
            .map_err(|e| self.spool_error(e))?;
            return Err(Fatal::Stopped(sig));
        }
        writer.commit().map_err(|e| self.spool_error(e))?;
        tracing::info!("distributed run {run}: {accounted} of {total} batches accounted for");
        let refused = self.refused.load(std::sync::atomic::Ordering::Relaxed);
        if refused > 0 {
            tracing::warn!(
                "distributed run {run}: {refused} reports refused (not authenticated, unreadable, \
                 or not naming exactly their batch's files); their batches were counted only from \
                 a report that held"
            );
        }
        Ok(())
    }

    /// Sends the ready batches as the queue has room for them, collecting reports to make room;
    /// past the deadline (or on a stop) it sends nothing more.
    async fn send_ready(
        &self,
        run: &str,
        sender: &mut Sender<'_>,
        collect: &mut Collect,
        spool: &mut Spool,
    ) -> Result<(), Fatal> {
        let max = sender.d.max_queued;
        while !sender.ready.is_empty() && !sender.closed {
            if collect.past_deadline() || self.stop.requested().is_some() {
                let unsent = sender.close();
                if self.stop.requested().is_none() {
                    tracing::warn!(
                        "distributed run {run}: the deadline passed before the plan was all \
                         sent ({} batches awaited, {unsent} ready); nothing more is sent, and \
                         the rest of the plan is named as errors",
                        sender.sent - collect.accounted
                    );
                }
                break;
            }
            let room = max.saturating_sub(sender.sent - collect.accounted);
            if room == 0 {
                self.collect(run, sender.sent, collect, spool, Some(1))
                    .await?;
                continue;
            }
            sender
                .send(usize::try_from(room).unwrap_or(usize::MAX))
                .await?;
        }
        Ok(())
    }

    /// Receives reports (and looks at the dead-letter queue) until all `total` batches sent
    /// are accounted for, the deadline passes, or a stop is requested; with `enough`, only
    /// until that many more are.
    async fn collect(
        &self,
        run: &str,
        total: u64,
        c: &mut Collect,
        spool: &mut Spool,
        enough: Option<u64>,
    ) -> Result<(), Fatal> {
        let queue_error = |e: crate::queue::QueueError| Fatal::Queue(e.to_string());
        let goal = enough.map_or(total, |n| (c.accounted + n).min(total));
        while c.accounted < goal && self.stop.requested().is_none() && !c.past_deadline() {
            let wait =
                crate::queue::LONG_POLL.min(c.deadline.saturating_duration_since(Instant::now()));
            let received = tokio::select! {
                r = self.queues.receive(&self.queues.results, MAX_PER_CALL, wait, REPORT_VISIBILITY) => r,
                () = self.stop.clone().wait() => break,
            }
            .map_err(queue_error)?;
            self.stats.polled();
            // Nothing came: the workers are busy, or stuck on a batch; a good time to look at
            // the dead-letter queue too.
            let idle = received.is_empty();
            let mut done = Vec::with_capacity(received.len());
            for m in received {
                if self.take_report(run, total, &m.body, spool).await? {
                    c.accounted += 1;
                }
                done.push(m.receipt);
            }
            // Deleted once recorded, all of one receive in one request: a report whose delete
            // is lost comes again and is dropped as a repeat.
            self.queues
                .delete_all(&self.queues.results, done)
                .await
                .map_err(queue_error)?;
            if idle || Instant::now() >= c.next_dlq {
                c.accounted += self.look_at_dead_letters(run, total, spool).await?;
                c.next_dlq = Instant::now() + DLQ_EVERY;
            }
        }
        Ok(())
    }

    /// Counts one report; `false` for another run's, a repeat, something unreadable, or one that
    /// does not name exactly its batch's files (refused: the batch waits for a true report, or
    /// its files are named at the deadline). Each upload it reports is held to the object in the
    /// bucket first (`integrity::hold_to_report`): one the bucket does not bear out is an error,
    /// and the manifest keeps the file's old record.
    async fn take_report(
        &self,
        run: &str,
        total: u64,
        body: &str,
        spool: &mut Spool,
    ) -> Result<bool, Fatal> {
        let mut report = match self.queues.decode_report(body) {
            Ok(r) => r,
            Err(e) => {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    "a message in the results queue is refused: {}",
                    keys::shown(&e.to_string())
                );
                return Ok(false);
            }
        };
        if report.run != run || report.batch >= total {
            tracing::debug!(
                "a report of another run ({}) dropped",
                keys::shown(&report.run)
            );
            return Ok(false);
        }
        let err = |e| self.spool_error(e);
        // Delivered twice (the first report counts), or already counted as lost in the
        // dead-letter queue (its files were named as errors; the next run tries them again).
        if spool.has(report.batch).map_err(err)? {
            return Ok(false);
        }
        if spool.digest(report.batch).map_err(err)? != Some(report.digest()) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                "a report on batch {} (from {}, {} files) does not name exactly the files of \
                 that batch: refused, not counted (a forged or damaged report; the batch waits \
                 for its worker's)",
                report.batch,
                keys::shown(&report.worker),
                report.files.len()
            );
            return Ok(false);
        }
        self.hold_to_bucket(&mut report).await?;
        for f in &report.files {
            self.count(f);
        }
        spool.record(&report).map_err(err)?;
        tracing::debug!(
            "batch {} done by {} ({} files)",
            report.batch,
            keys::shown(&report.worker),
            report.files.len()
        );
        Ok(true)
    }

    /// Turns each reported upload the bucket does not bear out into an error: one HEAD per
    /// uploaded file, side by side.
    async fn hold_to_bucket(&self, report: &mut Report) -> Result<(), Fatal> {
        use futures::StreamExt as _;
        let prefix = self.config.destination.prefix.as_str();
        let heads: Vec<_> = futures::stream::iter(
            report
                .files
                .iter()
                .enumerate()
                .filter(|(_, f)| f.outcome == FileOutcome::Uploaded),
        )
        .map(|(i, f)| async move {
            let head = self.store.head(&format!("{prefix}{}", f.key)).await;
            (i, head)
        })
        .buffer_unordered(self.config.transfer.concurrency.0.max(1))
        .collect()
        .await;
        for (i, head) in heads {
            let f = &mut report.files[i];
            let head = match head {
                Ok(h) => h,
                Err(e) if e.is_fatal() => return Err(Fatal::Store(e)),
                Err(e) => {
                    mark_failed(
                        f,
                        &format_args!("cannot check the object a worker stored: {e}"),
                    );
                    continue;
                }
            };
            let held = integrity::hold_to_report(
                head.as_ref(),
                f.size,
                f.mtime_ns,
                f.sha256.as_deref(),
                f.composite.as_deref(),
            );
            match held {
                Ok(Held::Checksum) => {}
                Ok(Held::SizeAndMtime) => {
                    if !self
                        .unchecksummed
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "the endpoint returns no SHA-256 checksum for objects: workers' \
                             uploads are checked by size and mtime only"
                        );
                    }
                }
                Err(why) => mark_failed(
                    f,
                    &format_args!(
                        "a worker reported it uploaded, but the bucket does not bear it out: \
                         {why}; not recorded, the next run tries it again"
                    ),
                ),
            }
        }
        Ok(())
    }

    fn count(&self, f: &FileReport) {
        let path = self.path_of(&f.path);
        match f.outcome {
            FileOutcome::Uploaded => {
                self.stats.sent(f.size);
                // Workers share the destination settings, so the class is the one this rule gives.
                let class = self.config.destination.class_rule().for_size(f.size);
                self.stats
                    .transferred(&path, &f.key, f.size, &"by a worker", class);
            }
            FileOutcome::Vanished => self.stats.vanished(&path),
            // A worker's words are input like a name: shown escaped.
            FileOutcome::Replaced => self.stats.replaced(
                &path,
                &keys::shown(f.detail.as_deref().unwrap_or("something else")).to_string(),
            ),
            FileOutcome::Error => self.stats.file_error(
                &path,
                f.kind.unwrap_or(FileErrorKind::Upload),
                &keys::shown(f.detail.as_deref().unwrap_or("failed on a worker")),
            ),
        }
    }

    /// Counts this run's batches in the dead-letter queue as lost (they stay there for
    /// `nightcopy dlq`); returns how many were new.
    async fn look_at_dead_letters(
        &self,
        run: &str,
        total: u64,
        spool: &mut Spool,
    ) -> Result<u64, Fatal> {
        let mut lost = 0;
        let mut seen = std::collections::HashSet::new();
        loop {
            let received = self
                .queues
                .receive(
                    &self.queues.dead_letters,
                    MAX_PER_CALL,
                    Duration::ZERO,
                    DLQ_VISIBILITY,
                )
                .await
                .map_err(|e| Fatal::Queue(e.to_string()))?;
            let mut fresh = false;
            for m in received {
                // Looked at, not taken: it stays for `nightcopy dlq` (and another look later).
                let _ = self
                    .queues
                    .extend(&self.queues.dead_letters, &m.receipt, Duration::ZERO)
                    .await;
                if !seen.insert(m.body.clone()) {
                    continue;
                }
                fresh = true;
                let Ok(batch) = self.queues.decode_batch(&m.body) else {
                    continue;
                };
                if batch.run != run || batch.batch >= total {
                    continue;
                }
                if spool.has(batch.batch).map_err(|e| self.spool_error(e))? {
                    continue;
                }
                spool.lost(batch.batch).map_err(|e| self.spool_error(e))?;
                lost += 1;
                for f in &batch.files {
                    self.stats.file_error(
                        &self.path_of(&f.path),
                        FileErrorKind::Upload,
                        &format_args!(
                            "lost: its batch {} failed on workers twice and is in the dead-letter \
                             queue (nightcopy dlq shows it; the next run tries the file again)",
                            batch.batch
                        ),
                    );
                }
            }
            if !fresh {
                return Ok(lost);
            }
        }
    }
}

/// A reported upload that is not recorded: an upload error with `why`.
fn mark_failed(f: &mut FileReport, why: &dyn std::fmt::Display) {
    f.outcome = FileOutcome::Error;
    f.kind = Some(FileErrorKind::Upload);
    f.detail = Some(why.to_string());
}

fn manifest_line(text: &str) -> ManifestEntry {
    ManifestEntry::parse(text.trim_end_matches('\n')).expect("the spool holds lines it wrote")
}

/// The manifest record of an uploaded file, from its report.
fn uploaded_record(f: &FileReport) -> Option<ManifestEntry> {
    if f.outcome != FileOutcome::Uploaded {
        return None;
    }
    let sha256 = f
        .sha256
        .as_deref()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|v| <[u8; 32]>::try_from(v).ok());
    Some(ManifestEntry {
        key: f.key.clone(),
        size: f.size,
        mtime_ns: f.mtime_ns,
        sha256,
    })
}
