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

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Distribute};
use crate::error::Fatal;
use crate::integrity::{self, Held};
use crate::keys;
use crate::plan::{Step, StepResult};
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

/// A report as it was taken, and the version of each of its files' objects.
type Taken = (Report, Vec<Option<String>>);

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

    /// A report taken, with the version of each object it names (as the coordinator's HEAD
    /// found it; `None` for a file not uploaded or a bucket without versions).
    fn record(&mut self, report: &Report, versions: &[Option<String>]) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&(report, versions))?;
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

    fn report(&self, batch: u64) -> std::io::Result<Option<Taken>> {
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

/// What goes into which batch and which call, and whether to send, collect or stop sending: the
/// batching, decided without a queue (`Sender` does the sending).
struct Batches {
    batch_files: usize,
    batch_bytes: u64,
    max_queued: u64,
    /// The number of the batch being filled.
    next: u64,
    current: Vec<WorkFile>,
    current_bytes: u64,
    /// Closed batches, as their messages, waiting to be sent.
    ready: VecDeque<String>,
    /// Batches sent, which are batches `0..sent`: they are numbered and sent in order.
    sent: u64,
    /// Past the deadline: batches are still numbered (the plan names them) but never sent.
    closed: bool,
}

/// A batch closed to be sent: its number and files.
type Closed = (u64, Vec<WorkFile>);

/// What the sender does next (`Batches::next_move`).
#[derive(Debug, PartialEq, Eq)]
enum Move {
    /// Send up to this many ready batches: the room left in the queue.
    Send(usize),
    /// The queue holds max-queued batches awaited: collect a report first.
    Collect,
    /// The deadline passed, or a stop came: nothing more is sent.
    Close,
    /// Nothing is ready to send (or sending is closed).
    Idle,
}

impl Batches {
    fn new(batch_files: usize, batch_bytes: u64, max_queued: u64) -> Batches {
        Batches {
            batch_files,
            batch_bytes,
            max_queued,
            next: 0,
            current: Vec::new(),
            current_bytes: 0,
            ready: VecDeque::new(),
            sent: 0,
            closed: false,
        }
    }

    /// Adds a file; returns its batch and place in it, and the batch closed to make room for it.
    fn add(&mut self, file: WorkFile) -> ((u64, usize), Option<Closed>) {
        let fits = self.current.len() < self.batch_files
            && (self.current.is_empty() || self.current_bytes + file.size <= self.batch_bytes);
        let closed = if fits { None } else { self.close_batch() };
        self.current_bytes += file.size;
        self.current.push(file);
        ((self.next, self.current.len() - 1), closed)
    }

    /// Closes the batch being filled, if it holds anything.
    fn close_batch(&mut self) -> Option<Closed> {
        if self.current.is_empty() {
            return None;
        }
        let closed = (self.next, std::mem::take(&mut self.current));
        self.next += 1;
        self.current_bytes = 0;
        Some(closed)
    }

    /// Queues a closed batch's message (made only if it is to be sent).
    fn queue(&mut self, message: impl FnOnce() -> String) {
        if !self.closed {
            self.ready.push_back(message());
        }
    }

    /// A call's worth of batches is ready.
    fn call_ready(&self) -> bool {
        self.ready.len() >= MAX_PER_CALL
    }

    /// What to do with the ready batches, `accounted` of those sent being reported.
    fn next_move(&self, accounted: u64, past_deadline: bool, stopped: bool) -> Move {
        if self.ready.is_empty() || self.closed {
            return Move::Idle;
        }
        if past_deadline || stopped {
            return Move::Close;
        }
        match self.max_queued.saturating_sub(self.sent - accounted) {
            0 => Move::Collect,
            room => Move::Send(usize::try_from(room).unwrap_or(usize::MAX)),
        }
    }

    /// The next call: up to `left` ready batches, at most ten and `MAX_CALL_BYTES` (a first
    /// batch goes alone however large). They count as sent from here.
    fn next_call(&mut self, left: usize) -> Vec<String> {
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
        self.sent += call.len() as u64;
        call
    }

    /// Nothing more is sent; returns how many closed batches that leaves unsent.
    fn close(&mut self) -> usize {
        self.closed = true;
        std::mem::take(&mut self.ready).len()
    }
}

/// The batches as they are sealed, recorded and sent to the work queue.
struct Sender<'a> {
    queues: &'a Queues,
    run: String,
    destination: String,
    batches: Batches,
    /// Where each closed batch's digest goes (the spool's `distribute.batches`).
    digests: File,
}

impl Sender<'_> {
    /// Adds a file; returns its batch and place in it.
    fn add(&mut self, file: WorkFile) -> std::io::Result<(u64, usize)> {
        let (place, closed) = self.batches.add(file);
        if let Some(closed) = closed {
            self.seal(closed)?;
        }
        Ok(place)
    }

    /// Closes the batch being filled, at the end of the plan.
    fn close_batch(&mut self) -> std::io::Result<()> {
        match self.batches.close_batch() {
            Some(closed) => self.seal(closed),
            None => Ok(()),
        }
    }

    /// Records a closed batch's digest, and queues its message.
    fn seal(&mut self, (number, files): Closed) -> std::io::Result<()> {
        let batch = WorkBatch {
            run: self.run.clone(),
            batch: number,
            destination: self.destination.clone(),
            files,
        };
        self.digests.write_all_at(&batch.digest(), number * 32)?;
        let queues = self.queues;
        self.batches.queue(|| queues.encode_batch(&batch));
        Ok(())
    }

    /// Sends up to `n` of the ready batches, in calls of at most ten messages and 256 KiB.
    async fn send(&mut self, n: usize) -> Result<(), Fatal> {
        let mut left = n.min(self.batches.ready.len());
        while left > 0 {
            let call = self.batches.next_call(left);
            left -= call.len();
            self.queues.send(&self.queues.work, call).await?;
        }
        Ok(())
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

/// A distributed run while it lasts: its id, the spool, the batches and the reports counted.
struct Round<'a> {
    run: String,
    spool: Spool,
    sender: Sender<'a>,
    collect: Collect,
}

/// What the coordinator needs besides the planned steps.
pub struct Coordinator<'a, S> {
    config: &'a Config,
    d: &'a Distribute,
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
        d: &'a Distribute,
        queues: &'a Queues,
        store: &'a S,
        stats: Arc<Stats>,
        stop: Stop,
    ) -> Self {
        Coordinator {
            config,
            d,
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
        Fatal::Spool(self.config.state_dir.0.display().to_string(), e)
    }

    /// Sends the plan, waits for it to be done, and writes the manifest.
    pub async fn run(
        &self,
        steps: tokio::sync::mpsc::Receiver<StepResult>,
        writer: manifest::Writer,
    ) -> Result<(), Fatal> {
        let mut round = self.set_up()?;
        self.plan_and_send(&mut round, steps).await?;
        self.await_reports(&mut round).await?;
        self.write_manifest(&mut round, writer)
    }

    /// Stage one: the spool, the batches and the clock of the deadline.
    fn set_up(&self) -> Result<Round<'a>, Fatal> {
        let d = self.d;
        let run = crate::queue::run_id();
        let spool = Spool::create(&self.config.state_dir.0).map_err(|e| self.spool_error(e))?;
        let sender = Sender {
            queues: self.queues,
            run: run.clone(),
            destination: self.config.destination_id(),
            batches: Batches::new(d.batch_files.0, d.batch_bytes.0, d.max_queued),
            digests: spool.digests.try_clone().map_err(|e| self.spool_error(e))?,
        };
        let collect = Collect {
            accounted: 0,
            deadline: Instant::now() + d.deadline.0,
            next_dlq: Instant::now() + DLQ_EVERY,
        };
        tracing::info!(
            "distributed run {run}: sending batches of planned uploads to {} (at most {} awaited \
             at once; deadline {})",
            self.queues.work,
            d.max_queued,
            humantime::format_duration(d.deadline.0)
        );
        Ok(Round {
            run,
            spool,
            sender,
            collect,
        })
    }

    /// Stage two: plan and send, collecting reports whenever the queue holds max-queued batches.
    /// A stop sends nothing more; past the deadline the plan is still read to its end (what is
    /// unchanged goes into the manifest) but nothing more is sent.
    async fn plan_and_send(
        &self,
        r: &mut Round<'_>,
        mut steps: tokio::sync::mpsc::Receiver<StepResult>,
    ) -> Result<(), Fatal> {
        loop {
            let step = tokio::select! {
                step = steps.recv() => step,
                () = self.stop.clone().wait() => None,
            };
            let Some(step) = step else { break };
            self.spool_step(r, step.map_err(Fatal::Store)?)
                .map_err(|e| self.spool_error(e))?;
            if r.sender.batches.call_ready() {
                self.send_ready(r).await?;
            }
        }
        drop(steps);
        if self.stop.requested().is_none() {
            r.sender.close_batch().map_err(|e| self.spool_error(e))?;
            self.send_ready(r).await?;
        }
        Ok(())
    }

    /// One planned step into the spool; an upload also into a batch.
    fn spool_step(&self, r: &mut Round<'_>, step: Step) -> std::io::Result<()> {
        match step {
            Step::Unchanged { record } => {
                self.stats.checked();
                r.spool.plan(&PlanLine::Keep(record.to_line()))
            }
            Step::RemoteOnly { key } => {
                self.stats.remote_only(&key);
                Ok(())
            }
            Step::DuplicateKey { entry } => {
                let prefix = self.config.destination.prefix.as_str();
                self.stats.duplicate_key(&entry.path, prefix, &entry.key);
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
                let (batch, index) = r.sender.add(file)?;
                r.spool.plan(&PlanLine::Sent {
                    batch,
                    index,
                    path,
                    previous: previous.map(|p| p.to_line()),
                })
            }
        }
    }

    /// Stage three: collect reports until every batch is accounted for, the deadline, or a stop.
    async fn await_reports(&self, r: &mut Round<'_>) -> Result<(), Fatal> {
        tracing::info!(
            "distributed run {}: {} batches sent; waiting for the workers' reports (deadline in \
             {})",
            r.run,
            r.sender.batches.sent,
            humantime::format_duration(Duration::from_secs(
                r.collect
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs()
            ))
        );
        self.collect(r, None).await
    }

    /// Stage four: name what was never accounted for, and write the manifest from the plan.
    fn write_manifest(&self, r: &mut Round<'_>, mut writer: manifest::Writer) -> Result<(), Fatal> {
        let spool_error = |e| self.spool_error(e);
        let manifest_error = |e| Fatal::manifest(&self.config.state_dir.0, e);
        let stopped = self.stop.requested();
        let total = r.sender.batches.sent;
        let plan = r.spool.read_plan().map_err(spool_error)?;
        let mut reports = BatchReports {
            spool: &r.spool,
            cached: None,
        };
        for line in plan {
            let entry = match line.map_err(spool_error)? {
                PlanLine::Keep(text) => Some(manifest_line(&text)),
                PlanLine::Sent {
                    batch,
                    index,
                    path,
                    previous,
                } => {
                    let (file, version) = reports.file(batch, index).map_err(spool_error)?;
                    let previous = previous.as_deref().map(manifest_line);
                    let unaccounted = !r.spool.has(batch).map_err(spool_error)?;
                    if unaccounted && stopped.is_none() {
                        self.name_unaccounted(&path, batch, total);
                    }
                    // Not uploaded: the old record still describes what the bucket holds.
                    file.and_then(|f| uploaded_record(f, version)).or(previous)
                }
            };
            if let Some(entry) = entry {
                writer.push(&entry).map_err(manifest_error)?;
            }
        }
        if let Some(sig) = stopped {
            writer
                .commit_with_the_rest(&self.config.state_dir.0, &self.config.destination_id())
                .map_err(manifest_error)?;
            return Err(Fatal::Stopped(sig));
        }
        writer.commit().map_err(manifest_error)?;
        tracing::info!(
            "distributed run {}: {} of {total} batches accounted for",
            r.run,
            r.collect.accounted
        );
        let refused = self.refused.load(std::sync::atomic::Ordering::Relaxed);
        if refused > 0 {
            tracing::warn!(
                "distributed run {}: {refused} reports refused (not authenticated, unreadable, \
                 or not naming exactly their batch's files); their batches were counted only from \
                 a report that held",
                r.run
            );
        }
        Ok(())
    }

    /// A planned upload no report accounts for, named as an error: its batch was not reported,
    /// or not sent, by the deadline.
    fn name_unaccounted(&self, path: &str, batch: u64, total: u64) {
        let deadline = humantime::format_duration(self.d.deadline.0);
        let why = if batch < total {
            format!(
                "not accounted for by the deadline ({deadline}): no worker reported its batch \
                 {batch}; the next run tries it again"
            )
        } else {
            format!(
                "not sent by the deadline ({deadline}): its batch {batch} was still waiting for \
                 room in the work queue (distribute.max-queued {}); the next run tries it again",
                self.d.max_queued
            )
        };
        self.stats
            .file_error(&self.path_of(path), FileErrorKind::Upload, &why);
    }

    /// Sends the ready batches as the queue has room for them, collecting reports to make room;
    /// past the deadline (or on a stop) it sends nothing more.
    async fn send_ready(&self, r: &mut Round<'_>) -> Result<(), Fatal> {
        loop {
            let stopped = self.stop.requested().is_some();
            let past_deadline = r.collect.past_deadline();
            match r
                .sender
                .batches
                .next_move(r.collect.accounted, past_deadline, stopped)
            {
                Move::Idle => return Ok(()),
                Move::Close => {
                    let unsent = r.sender.batches.close();
                    if !stopped {
                        tracing::warn!(
                            "distributed run {}: the deadline passed before the plan was all \
                             sent ({} batches awaited, {unsent} ready); nothing more is sent, and \
                             the rest of the plan is named as errors",
                            r.run,
                            r.sender.batches.sent - r.collect.accounted
                        );
                    }
                    return Ok(());
                }
                Move::Collect => self.collect(r, Some(1)).await?,
                Move::Send(room) => r.sender.send(room).await?,
            }
        }
    }

    /// Receives reports (and looks at the dead-letter queue) until all `total` batches sent
    /// are accounted for, the deadline passes, or a stop is requested; with `enough`, only
    /// until that many more are.
    async fn collect(&self, r: &mut Round<'_>, enough: Option<u64>) -> Result<(), Fatal> {
        let total = r.sender.batches.sent;
        let goal = enough.map_or(total, |n| (r.collect.accounted + n).min(total));
        while r.collect.accounted < goal
            && self.stop.requested().is_none()
            && !r.collect.past_deadline()
        {
            let wait = crate::queue::LONG_POLL
                .min(r.collect.deadline.saturating_duration_since(Instant::now()));
            let received = tokio::select! {
                r = self.queues.receive(&self.queues.results, MAX_PER_CALL, wait, REPORT_VISIBILITY) => r,
                () = self.stop.clone().wait() => break,
            }?;
            self.stats.polled();
            // Nothing came: the workers are busy, or stuck on a batch; a good time to look at
            // the dead-letter queue too.
            let idle = received.is_empty();
            let mut done = Vec::with_capacity(received.len());
            for m in received {
                if self
                    .take_report(&r.run, total, &m.body, &mut r.spool)
                    .await?
                {
                    r.collect.accounted += 1;
                }
                done.push(m.receipt);
            }
            // Deleted once recorded, all of one receive in one request: a report whose delete
            // is lost comes again and is dropped as a repeat.
            self.queues.delete_all(&self.queues.results, done).await?;
            if idle || Instant::now() >= r.collect.next_dlq {
                r.collect.accounted += self
                    .look_at_dead_letters(&r.run, total, &mut r.spool)
                    .await?;
                r.collect.next_dlq = Instant::now() + DLQ_EVERY;
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
        let versions = self.hold_to_bucket(&mut report).await?;
        for f in &report.files {
            self.count(f);
        }
        spool.record(&report, &versions).map_err(err)?;
        tracing::debug!(
            "batch {} done by {} ({} files)",
            report.batch,
            keys::shown(&report.worker),
            report.files.len()
        );
        Ok(true)
    }

    /// Turns each reported upload the bucket does not bear out into an error: one HEAD per
    /// uploaded file, side by side. Returns, per file, the version of the object the HEAD found,
    /// for the manifest: the bucket's word, not the worker's, and the version of bytes held to
    /// the report's checksum.
    async fn hold_to_bucket(&self, report: &mut Report) -> Result<Vec<Option<String>>, Fatal> {
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
        let mut versions = vec![None; report.files.len()];
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
            let version = head.and_then(|h| h.version_id);
            match held {
                Ok(Held::Checksum) => versions[i] = version,
                Ok(Held::SizeAndMtime) => {
                    versions[i] = version;
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
        Ok(versions)
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
                .await?;
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

/// The report of each batch, read from the spool once per batch as the plan goes by.
struct BatchReports<'s> {
    spool: &'s Spool,
    cached: Option<(u64, Option<Taken>)>,
}

impl BatchReports<'_> {
    /// The report on file `index` of batch `batch`, if a report on the batch was taken, and the
    /// version of its object.
    fn file(
        &mut self,
        batch: u64,
        index: usize,
    ) -> std::io::Result<(Option<&FileReport>, Option<String>)> {
        if self.cached.as_ref().is_none_or(|(b, _)| *b != batch) {
            self.cached = Some((batch, self.spool.report(batch)?));
        }
        let taken = self.cached.as_ref().and_then(|(_, t)| t.as_ref());
        Ok((
            taken.and_then(|(r, _)| r.files.get(index)),
            taken.and_then(|(_, v)| v.get(index).cloned().flatten()),
        ))
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

/// The manifest record of an uploaded file, from its report and the version the bucket named.
fn uploaded_record(f: &FileReport, version: Option<String>) -> Option<ManifestEntry> {
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
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> WorkFile {
        WorkFile {
            key: format!("k{size}"),
            path: format!("p{size}"),
            size,
            mtime_ns: 0,
            reason: "new".into(),
            escaped: false,
        }
    }

    /// Pairs of numbers: (batch, place in it) or (batch, files in it).
    type Pairs = Vec<(u64, usize)>;

    /// Adds files of these sizes; returns each one's place and the batches closed on the way.
    fn fill(b: &mut Batches, sizes: &[u64]) -> (Pairs, Pairs) {
        let (mut places, mut closed) = (Vec::new(), Vec::new());
        for &size in sizes {
            let (place, c) = b.add(file(size));
            places.push(place);
            closed.extend(c.map(|(n, files)| (n, files.len())));
        }
        (places, closed)
    }

    #[test]
    fn a_batch_closes_at_batch_files() {
        let mut b = Batches::new(2, u64::MAX, 10);
        let (places, closed) = fill(&mut b, &[1, 1, 1, 1, 1]);
        assert_eq!(places, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]);
        assert_eq!(closed, [(0, 2), (1, 2)]);
        assert_eq!(b.close_batch().map(|(n, f)| (n, f.len())), Some((2, 1)));
        assert_eq!(
            b.close_batch().map(|(n, f)| (n, f.len())),
            None,
            "nothing left to close"
        );
    }

    #[test]
    fn a_batch_closes_at_batch_bytes_and_a_larger_file_goes_alone() {
        let mut b = Batches::new(100, 100, 10);
        let (places, closed) = fill(&mut b, &[60, 40, 1, 500, 10]);
        // 60 + 40 fills the first to the byte; one more byte is a new batch; a file over the cap
        // is a batch of its own rather than never sent.
        assert_eq!(places, [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)]);
        assert_eq!(closed, [(0, 2), (1, 1), (2, 1)]);
    }

    #[test]
    fn a_call_takes_at_most_ten_messages_and_max_call_bytes() {
        let mut b = Batches::new(1, u64::MAX, 100);
        for _ in 0..25 {
            b.queue(|| "x".repeat(10));
        }
        assert!(b.call_ready());
        let calls: Vec<usize> = (0..3).map(|_| b.next_call(25).len()).collect();
        assert_eq!(calls, [10, 10, 5]);
        assert_eq!(b.sent, 25);
        assert!(!b.call_ready());

        let big = MAX_CALL_BYTES / 2 - 1;
        for len in [big, big, big, MAX_CALL_BYTES + 1, 1] {
            b.queue(|| "x".repeat(len));
        }
        let calls: Vec<usize> = (0..3).map(|_| b.next_call(10).len()).collect();
        // Two halves fit, a third does not; a message over the limit goes alone.
        assert_eq!(calls, [2, 1, 1]);
        assert_eq!(b.next_call(3).len(), 1);
        assert_eq!(b.sent, 30);
    }

    #[test]
    fn at_most_max_queued_batches_are_awaited() {
        let mut b = Batches::new(1, u64::MAX, 3);
        assert_eq!(b.next_move(0, false, false), Move::Idle, "nothing ready");
        for _ in 0..5 {
            b.queue(|| "batch".into());
        }
        assert_eq!(b.next_move(0, false, false), Move::Send(3));
        assert_eq!(b.next_call(3).len(), 3);
        // Three sent, none reported: a report first.
        assert_eq!(b.next_move(0, false, false), Move::Collect);
        assert_eq!(b.next_move(1, false, false), Move::Send(1));
        assert_eq!(b.next_move(3, false, false), Move::Send(3));
        assert_eq!(b.next_call(2).len(), 2);
        assert_eq!(b.next_move(3, false, false), Move::Idle, "all sent");
    }

    #[test]
    fn past_the_deadline_or_on_a_stop_nothing_more_is_sent() {
        let mut b = Batches::new(1, u64::MAX, 10);
        for _ in 0..4 {
            b.queue(|| "batch".into());
        }
        assert_eq!(b.next_move(0, true, false), Move::Close);
        assert_eq!(b.next_move(0, false, true), Move::Close);
        assert_eq!(b.close(), 4, "the batches left unsent");
        assert_eq!(b.next_move(0, false, false), Move::Idle);
        // Batches are still numbered, for the plan to name, but no message is made or queued.
        let (places, closed) = fill(&mut b, &[1, 1]);
        assert_eq!(places, [(0, 0), (1, 0)]);
        assert_eq!(closed, [(0, 1)]);
        b.queue(|| unreachable!("no message is made once sending is closed"));
        assert!(b.ready.is_empty() && b.sent == 0);

        let now = Instant::now();
        let collect = Collect {
            accounted: 0,
            deadline: now,
            next_dlq: now,
        };
        assert!(collect.past_deadline());
    }
}
