//! The copy on this host: the planned steps handled side by side (`upload`), and their records
//! written to the next manifest in key order as they complete. (With `distribute:` the workers
//! upload instead: `coordinate`.)

use std::io::Write;
use std::sync::Arc;

use futures::StreamExt;

use crate::config::Config;
use crate::error::Fatal;
use crate::keys::shown;
use crate::plan::{Step, StepResult};
use crate::report::Stats;
use crate::state::manifest::{self, ManifestEntry};
use crate::stop::Stop;
use crate::store::{ObjectStore, StoreError};
use crate::upload::{Resume, Upload, Uploader};

/// How far the upload stage may run ahead of the oldest unfinished file. The manifest is written
/// in key order, so completed files wait here for slower ones (a large multipart) before them;
/// this bounds that wait's memory while leaving plenty of small files to keep the slots busy.
const ORDER_WINDOW: usize = 4096;

/// The copy of the planned `steps` over any store (the integration tests count and fail requests
/// at an HTTP proxy in front of a real S3 API server). Figures go to `stats` as they happen, so
/// they are there even when a fatal error ends the copy. `writer` is the next manifest; `None` in
/// a dry run, which prints each planned upload instead.
pub async fn copy<S: ObjectStore>(
    config: &Config,
    store: Arc<S>,
    stats: Arc<Stats>,
    stop: Stop,
    steps: tokio::sync::mpsc::Receiver<StepResult>,
    mut writer: Option<manifest::Writer>,
) -> Result<(), Fatal> {
    let state_dir = &config.state_dir.0;
    let dry_run = writer.is_none();
    let started = std::time::SystemTime::now();
    let mut uploader = Uploader::for_config(store, stats.clone(), config, stop.clone());
    if !dry_run {
        if let Some(resume) = Resume::for_config(config) {
            uploader = uploader.resuming(resume);
        }
    }
    let uploader = Arc::new(uploader);
    let result = upload_all(steps, uploader.clone(), &stats, dry_run, &stop, &mut writer).await;
    match result {
        // The old manifest stays: what this run uploaded is found by the listing next time.
        Err(UploadEnd::Store(e)) => return Err(Fatal::Store(e)),
        Err(UploadEnd::Manifest(e)) => return Err(Fatal::manifest(state_dir, e)),
        Ok(()) => {}
    }
    if let Some(sig) = stop.requested() {
        if let Some(w) = writer {
            w.commit_with_the_rest(state_dir, &config.destination_id())
                .map_err(|e| Fatal::manifest(state_dir, e))?;
        }
        return Err(Fatal::Stopped(sig));
    }
    if let Some(w) = writer {
        w.commit().map_err(|e| Fatal::manifest(state_dir, e))?;
        // The whole tree was gone through: a recorded upload this run did not touch belongs to
        // a file that needs none. The margin covers filesystems whose timestamps lag the clock.
        uploader
            .abandon_stale(started - std::time::Duration::from_secs(2))
            .await;
    }
    Ok(())
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
            stats.duplicate_key(&entry.path, uploader.prefix(), &entry.key);
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
