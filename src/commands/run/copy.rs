//! The copy itself: the walk, the listing and the manifest merged and planned on a blocking
//! thread (`merge`, `plan`), the planned uploads run side by side (`upload`), and their records
//! written to the next manifest in key order as they complete.

use std::io::Write;
use std::sync::Arc;

use futures::StreamExt;

use super::RunOptions;
use crate::config::Config;
use crate::error::Fatal;
use crate::keys::shown;
use crate::list::PARTITION_KEYS;
use crate::merge::Inputs;
use crate::offsite;
use crate::plan::{Planner, Step};
use crate::queue::Queues;
use crate::report::{FileErrorKind, Stats};
use crate::scan;
use crate::state::manifest::{self, ManifestEntry};
use crate::stop::Stop;
use crate::store::{ObjectStore, StoreError};
use crate::upload::{Resume, Upload, Uploader};

use super::coordinate::Coordinator;

/// How far the upload stage may run ahead of the oldest unfinished file. The manifest is written
/// in key order, so completed files wait here for slower ones (a large multipart) before them;
/// this bounds that wait's memory while leaving plenty of small files to keep the slots busy.
const ORDER_WINDOW: usize = 4096;

/// Planned steps queued between the planner's thread and the upload stage: a slow upload stage
/// pauses the walk instead of buffering the tree.
const STEPS_AHEAD: usize = 1024;

/// The copy over any store (tests wrap the real one to count or fail requests). Figures go to
/// `stats` as they happen, so they are there even when a fatal error ends the copy.
pub async fn copy<S: ObjectStore>(
    config: &Config,
    opts: &RunOptions,
    store: Arc<S>,
    stats: Arc<Stats>,
    stop: Stop,
    queues: Option<&Queues>,
) -> Result<(), Fatal> {
    let state_dir = &config.state_dir.0;
    let destination = config.destination_id();
    let manifest_error = |e| Fatal::Manifest(state_dir.display().to_string(), e);

    // A run installs the bucket's copy when the state directory has no manifest; a dry run only
    // reads it.
    let manifest = offsite::manifest(
        store.as_ref(),
        config,
        PARTITION_KEYS,
        !opts.dry_run,
        "deciding by size and upload time this once",
    )
    .await;
    let inputs = Inputs::with_manifest(config, store.clone(), stats.clone(), manifest).await?;
    if inputs.manifest.is_none() {
        tracing::info!(
            "no manifest for this destination yet: comparing with the bucket listing only"
        );
    }
    let (steps, planner) = spawn_planner(inputs, stats.clone());

    let mut writer = match opts.dry_run {
        true => None,
        false => Some(manifest::Writer::create(state_dir, &destination).map_err(manifest_error)?),
    };
    // A distributed run sends the plan to the workers instead (a dry run only prints it).
    if let Some((queues, writer)) = queues.zip(writer.take_if(|_| queues.is_some())) {
        let coordinator =
            Coordinator::new(config, queues, store.as_ref(), stats.clone(), stop.clone());
        let result = coordinator.run(steps, writer).await;
        let _ = planner.await;
        return result;
    }
    let started = std::time::SystemTime::now();
    let mut uploader = Uploader::for_config(store, stats.clone(), config, stop.clone());
    if !opts.dry_run {
        if let Some(resume) = Resume::for_config(config) {
            uploader = uploader.resuming(resume);
        }
    }
    let uploader = Arc::new(uploader);
    let result = upload_all(
        steps,
        uploader.clone(),
        &stats,
        opts.dry_run,
        &stop,
        &mut writer,
    )
    .await;
    let _ = planner.await;
    match result {
        // The old manifest stays: what this run uploaded is found by the listing next time.
        Err(UploadEnd::Store(e)) => return Err(Fatal::Store(e)),
        Err(UploadEnd::Manifest(e)) => return Err(manifest_error(e)),
        Ok(()) => {}
    }
    if let Some(sig) = stop.requested() {
        if let Some(w) = writer {
            keep_the_rest(w, state_dir, &destination).map_err(manifest_error)?;
        }
        return Err(Fatal::Stopped(sig));
    }
    if let Some(w) = writer {
        w.commit().map_err(manifest_error)?;
        // The whole tree was gone through: a recorded upload this run did not touch belongs to
        // a file that needs none. The margin covers filesystems whose timestamps lag the clock.
        uploader
            .abandon_stale(started - std::time::Duration::from_secs(2))
            .await;
    }
    Ok(())
}

pub(super) type StepResult = Result<Step, StoreError>;

/// Scans and plans on a blocking thread; the steps come out of the channel in key order.
fn spawn_planner(
    inputs: Inputs,
    stats: Arc<Stats>,
) -> (
    tokio::sync::mpsc::Receiver<StepResult>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<StepResult>(STEPS_AHEAD);
    let planner = tokio::task::spawn_blocking(move || {
        let local = scan::scan(inputs.scan, stats);
        let manifest_entries = inputs.manifest.into_iter().flatten();
        for step in Planner::new(local, inputs.remote, manifest_entries) {
            let failed = step.is_err();
            if tx.blocking_send(step).is_err() || failed {
                break;
            }
        }
    });
    (rx, planner)
}

enum UploadEnd {
    Store(StoreError),
    Manifest(std::io::Error),
}

/// Handles every step, many at once, and writes each one's record in key order. On a stop
/// request no new step enters; the steps in flight resolve quickly (uploads not yet started are
/// skipped, multipart uploads abort) and their records are still written.
async fn upload_all<S: ObjectStore>(
    steps: tokio::sync::mpsc::Receiver<StepResult>,
    uploader: Arc<Uploader<S>>,
    stats: &Arc<Stats>,
    dry_run: bool,
    stop: &Stop,
    writer: &mut Option<manifest::Writer>,
) -> Result<(), UploadEnd> {
    let stats = stats.clone();
    let mut steps = steps;
    let mut outcomes = futures::stream::poll_fn(move |cx| steps.poll_recv(cx))
        .take_until(Box::pin(stop.clone().wait()))
        .map(move |step| {
            let uploader = uploader.clone();
            let stats = stats.clone();
            async move { handle(step, &uploader, &stats, dry_run).await }
        })
        .buffered(ORDER_WINDOW);
    while let Some(outcome) = outcomes.next().await {
        match outcome {
            Ok(Some(record)) => {
                if let Some(w) = writer.as_mut() {
                    w.push(&record).map_err(UploadEnd::Manifest)?;
                }
            }
            Ok(None) => {}
            Err(e) => return Err(UploadEnd::Store(e)),
        }
    }
    // Dropping the stream closes the channel: the planner stops at its next send.
    Ok(())
}

/// After a stop: what completed is written; for every key after it, the old record still
/// describes what the bucket holds, so it is carried over and the progress is kept.
pub(super) fn keep_the_rest(
    mut w: manifest::Writer,
    state_dir: &std::path::Path,
    destination: &str,
) -> std::io::Result<()> {
    if let Ok(Some(old)) = manifest::open(state_dir, destination, usize::MAX) {
        let last = w.last_key().map(str::to_owned);
        for entry in old.filter(|e| last.as_ref().is_none_or(|l| e.key > *l)) {
            w.push(&entry)?;
        }
    }
    w.commit().map(|_| ())
}

/// A second file whose key another already took: counted and named, never uploaded.
pub(super) fn duplicate_key(stats: &Stats, prefix: &str, entry: &crate::scan::LocalEntry) {
    stats.file_error(
        &entry.path,
        FileErrorKind::BadName,
        &format_args!(
            "its key {}{} is already used by another file's (escaped) name; rename one of them",
            shown(prefix),
            shown(&entry.key)
        ),
    );
}

/// One planned step: upload it (on a task of its own once it has a slot,
/// `Uploader::upload_on_task`), or pass its record through.
async fn handle<S: ObjectStore>(
    step: StepResult,
    uploader: &Arc<Uploader<S>>,
    stats: &Stats,
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
            duplicate_key(stats, uploader.prefix(), &entry);
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
                "upload\t{reason}\t{}\t{}{}\t{}",
                entry.size,
                shown(uploader.prefix()),
                shown(&entry.key),
                shown(&entry.path)
            );
            let class = uploader.class_for(entry.size);
            stats.transferred(&entry.path, &entry.key, entry.size, &reason, class);
            Ok(previous)
        }
        Step::Upload {
            entry,
            reason,
            previous,
        } => {
            Ok(match uploader.upload_on_task(entry, reason).await? {
                Upload::Stored(record, _) => Some(record),
                // The old record still describes what the bucket holds.
                Upload::Skipped(_) => previous,
            })
        }
    }
}
