//! nightcopy: an additive-only nightly backup of a mounted filesystem to S3.
//!
//! The run is a pipeline whose stages are the modules, in order:
//! `config` → `guard` → `scan` ∥ `list` → `plan` → `upload` → `report` → `metrics`/`notify`.
//! The scan and the bucket listing run side by side; the planner merges them with the last
//! manifest in key order, so memory stays flat however many files there are. `agent` wraps the
//! copy (this file's `copy`) with what makes it a nightly job: lock, interval, systemd, metrics,
//! run record and heartbeat.

pub mod agent;
pub mod config;
pub mod exit;
pub mod guard;
pub mod keys;
pub mod list;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod report;
pub mod restore;
pub mod scan;
pub mod state;
pub mod stop;
pub mod store;
pub mod upload;
pub mod verify;

use std::io::Write;
use std::sync::Arc;

use futures::StreamExt;

use crate::config::Config;
use crate::manifest::ManifestEntry;
use crate::plan::{Planner, Step};
use crate::report::{FileErrorKind, Stats};
use crate::store::{ObjectStore, StoreError};
use crate::upload::Uploader;

/// How far the upload stage may run ahead of the oldest unfinished file. The manifest is written
/// in key order, so completed files wait here for slower ones (a large multipart) before them;
/// this bounds that wait's memory while leaving plenty of small files to keep the slots busy.
const ORDER_WINDOW: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print each planned upload with its reason; send nothing but the listing; change no state.
    pub dry_run: bool,
    /// Run even when the last success is more recent than guard.min-interval (never overrides
    /// the lock).
    pub force: bool,
}

/// Errors that end a run. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
    #[error(transparent)]
    Lock(#[from] state::LockError),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Region(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "cannot write the manifest in the state directory {0}: {1}: free space on its filesystem or \
         make it writable (is the disk full or read-only?); nothing is lost: the last complete \
         manifest is kept, and what this run uploaded stays in the bucket, where the next run \
         finds it"
    )]
    Manifest(String, std::io::Error),
    #[error("stopped by {} before the copy completed; what was uploaded is kept and the next run goes on from there",
            if *.0 == nix::libc::SIGINT { "SIGINT" } else { "SIGTERM" })]
    Stopped(i32),
}

/// The copy itself over any store (tests wrap the real one to count or fail requests). Figures go
/// to `stats` as they happen, so they are there even when a fatal error ends the copy.
pub async fn copy<S: ObjectStore>(
    config: &Config,
    opts: &RunOptions,
    store: Arc<S>,
    stats: Arc<Stats>,
    stop: stop::Stop,
) -> Result<(), Fatal> {
    let prefix = config.destination.prefix.as_str().to_owned();
    let destination = config.destination_id();
    let manifest_error = |e| Fatal::Manifest(config.state_dir.0.display().to_string(), e);

    let mut manifest = match manifest::open(&config.state_dir.0, &destination) {
        Ok(m) => m,
        Err(why) => {
            tracing::warn!(
                "the manifest in {} is not used: {why}; deciding by size and upload time this once",
                config.state_dir.0.display()
            );
            None
        }
    };
    if manifest.is_none() {
        tracing::info!(
            "no manifest for this destination yet: comparing with the bucket listing only"
        );
    }

    // The first listing page is awaited here so that a missing bucket or denied access is a clear
    // fatal error before a single file is read.
    let cuts = manifest.as_mut().map(|m| m.take_cuts()).unwrap_or_default();
    let remote = list::start(store.clone(), prefix.clone(), stats.clone(), cuts).await?;

    let excludes = config.excludes().map_err(Fatal::Config)?;
    let scan_opts = scan::ScanOptions {
        root: config.source.path.0.clone(),
        excludes,
        one_file_system: config.source.one_file_system,
        symlinks: config.source.symlinks,
        max_key_bytes: keys::MAX_KEY_BYTES - prefix.len(),
    };

    // Scan and plan on a blocking thread; steps flow to the async upload stage through a bounded
    // channel, so a slow upload stage pauses the walk instead of buffering the tree.
    let (step_tx, step_rx) = tokio::sync::mpsc::channel::<Result<Step, StoreError>>(1024);
    let plan_stats = stats.clone();
    let planner = tokio::task::spawn_blocking(move || {
        let local = scan::scan(scan_opts, plan_stats);
        let manifest_entries = manifest.into_iter().flatten();
        for step in Planner::new(local, remote, manifest_entries) {
            let stop = step.is_err();
            if step_tx.blocking_send(step).is_err() || stop {
                break;
            }
        }
    });

    let mut writer = if opts.dry_run {
        None
    } else {
        Some(manifest::Writer::create(&config.state_dir.0, &destination).map_err(manifest_error)?)
    };
    let uploader = Arc::new(Uploader::new(
        store.clone(),
        stats.clone(),
        prefix.clone(),
        &config.transfer,
        stop.clone(),
    ));
    let dry_run = opts.dry_run;
    let handle_stats = stats.clone();
    // On a stop request no new step enters; the steps in flight resolve quickly (uploads not yet
    // started are skipped, multipart uploads abort) and their records are still written.
    let mut outcomes = tokio_stream_from(step_rx)
        .take_until(Box::pin(stop.clone().wait()))
        .map(move |step| {
            let uploader = uploader.clone();
            let stats = handle_stats.clone();
            let prefix = prefix.clone();
            async move { handle(step, &uploader, &stats, &prefix, dry_run).await }
        })
        .buffered(ORDER_WINDOW);

    let mut fatal = None;
    while let Some(outcome) = outcomes.next().await {
        match outcome {
            Ok(Some(record)) => {
                if let Some(w) = writer.as_mut() {
                    w.push(&record).map_err(manifest_error)?;
                }
            }
            Ok(None) => {}
            Err(e) => {
                fatal = Some(e);
                break;
            }
        }
    }
    drop(outcomes); // closes the channel: the planner stops at its next send
    let _ = planner.await;
    if let Some(e) = fatal {
        // The old manifest stays: what this run uploaded is found by the listing next time.
        return Err(Fatal::Store(e));
    }
    if let Some(sig) = stop.requested() {
        // Keep the progress: what completed is written; for every key after it, the old record
        // still describes what the bucket holds.
        if let Some(mut w) = writer {
            if let Ok(Some(old)) = manifest::open(&config.state_dir.0, &destination) {
                let last = w.last_key().map(str::to_owned);
                for entry in old.filter(|e| last.as_ref().is_none_or(|l| e.key > *l)) {
                    w.push(&entry).map_err(manifest_error)?;
                }
            }
            w.commit().map_err(manifest_error)?;
        }
        return Err(Fatal::Stopped(sig));
    }
    if let Some(w) = writer {
        w.commit().map_err(manifest_error)?;
    }
    Ok(())
}

/// One planned step: upload it (on its own task, so signing and I/O of many small files run in
/// parallel), or pass its record through.
async fn handle<S: ObjectStore>(
    step: Result<Step, StoreError>,
    uploader: &Arc<Uploader<S>>,
    stats: &Stats,
    prefix: &str,
    dry_run: bool,
) -> Result<Option<ManifestEntry>, StoreError> {
    match step? {
        Step::Unchanged { record } => {
            stats.checked();
            Ok(Some(record))
        }
        Step::RemoteOnly { key } => {
            stats.remote_only(&key);
            Ok(None)
        }
        Step::DuplicateKey { entry } => {
            stats.file_error(
                &entry.path,
                FileErrorKind::BadName,
                &format_args!(
                    "its key {prefix}{} is already used by another file's (escaped) name; rename one of them",
                    entry.key
                ),
            );
            Ok(None)
        }
        Step::Upload {
            entry,
            reason,
            previous,
        } if dry_run => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "upload\t{reason}\t{}\t{prefix}{}\t{}",
                entry.size,
                entry.key,
                entry.path.display()
            );
            stats.transferred(&entry.path, &entry.key, entry.size, &reason);
            Ok(previous)
        }
        Step::Upload {
            entry,
            reason,
            previous,
        } => {
            let uploader = uploader.clone();
            tokio::spawn(async move { uploader.upload(entry, reason, previous).await })
                .await
                .expect("upload task panicked")
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
