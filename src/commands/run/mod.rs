//! `nightcopy run`, the nightly run as operators see it: lock and minimum interval, source and
//! credentials checks, READY/STATUS/WATCHDOG to systemd, the backup, then one outcome — and from
//! that one outcome the summary line, the CloudWatch metrics, the textfile, the run record, the
//! heartbeat and the exit code, so they can never disagree.
//!
//! The backup is planned here and carried out by one of two siblings, chosen here and nowhere
//! else: `copy` uploads on this host; `coordinate`, with `distribute:`, has the workers upload.
//! Neither knows the other; what both need (the steps, the per-file events, the manifest) is
//! machinery below them.

mod coordinate;
mod copy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::Fatal;
use crate::list::PARTITION_KEYS;
use crate::merge::Inputs;
use crate::plan::{Planner, StepResult};
use crate::queue::Queues;
use crate::report::{Ending, FileErrorKind, Outcome, RunReport, Stats, SUMMARY_MESSAGE_ID};
use crate::state::{self, manifest, RunRecord};
use crate::stop::Stop;
use crate::store::s3::S3Store;
use crate::store::sdk;
use crate::{fsutil, guard, metrics, notify, offsite, scan, tree};
use coordinate::Coordinator;

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Planned steps queued between the planner's thread and the upload stage: a slow upload stage
/// pauses the walk instead of buffering the tree.
const STEPS_AHEAD: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print each planned upload with its reason; send nothing but the listing; change no state.
    pub dry_run: bool,
    /// Run even when the last success is more recent than guard.min-interval (never overrides
    /// the lock).
    pub force: bool,
}

/// What finishing a run needs to know, gathered as the run goes.
struct RunContext<'a> {
    config: &'a Config,
    opts: &'a RunOptions,
    started: Instant,
    started_unix: u64,
    stats: Arc<Stats>,
    /// The SDK, once loaded: metrics are published with it.
    sdk: Option<aws_config::SdkConfig>,
    /// The last run's record: its last success carries over a failed run.
    previous: Option<RunRecord>,
}

/// One nightly run, and how it ended.
pub async fn run(
    config: &Config,
    opts: &RunOptions,
    bar: Option<indicatif::ProgressBar>,
) -> Ending {
    let mut ctx = RunContext {
        config,
        opts,
        started: Instant::now(),
        started_unix: fsutil::unix_now(),
        stats: Arc::new(Stats::default()),
        sdk: None,
        previous: None,
    };
    let state_dir = &config.state_dir.0;

    // Guard, part 1: a run that is skipped leaves no trace but one log line and exit 75. A state
    // directory that cannot be used is a failure like any other (published, LastSuccess=0).
    if let Err(e) = guard::prepare_state_dir(state_dir) {
        return ctx.finish(Some(e.into())).await;
    }
    let _lock = match state::lock(state_dir) {
        Ok(l) => l,
        Err(e @ state::LockError::Held { .. }) => return skip(&e.to_string()),
        Err(e) => return ctx.finish(Some(e.into())).await,
    };
    ctx.previous = state::read_record(state_dir);
    if !opts.force && !opts.dry_run {
        let min_interval = config.guard.min_interval.0;
        if let Some(why) = state::too_soon(ctx.previous.as_ref(), min_interval, ctx.started_unix) {
            return skip(&why);
        }
    }

    // Guard, part 2: failures from here on are real failures, published as LastSuccess=0.
    match sdk::load(config).await {
        Ok(s) => ctx.sdk = Some(s),
        Err(e) => return ctx.finish(Some(e.into())).await,
    }
    let sdk = ctx.sdk.clone().expect("just loaded");
    let checked = async {
        guard::check_source(&config.source.path.0, config.source.require_mountpoint)?;
        sdk::check_credentials(&sdk).await.map_err(Fatal::from)
    }
    .await;
    if let Err(e) = checked {
        return ctx.finish(Some(e)).await;
    }

    let key = match config.auth_key() {
        Ok(k) => k,
        Err(e) => return ctx.finish(Some(e.into())).await,
    };
    if config.distribute.is_some() && key.is_none() {
        tracing::warn!(
            "queue messages are not authenticated (no auth-key-file): anyone allowed to send to \
             the queues can have workers back up files under the source, and forge reports \
             (docs/scale-out.md, \"Trust\")"
        );
    }
    let store = Arc::new(S3Store::for_config(&sdk, config));
    if let Err(e) = crate::store::bucket::check(store.as_ref(), config).await {
        return ctx.finish(Some(e.into())).await;
    }
    notify::ready(&format!(
        "backing up {} to s3://{}/{}",
        config.source.path.0.display(),
        config.destination.bucket.0,
        config.destination.prefix.as_str()
    ));
    let progress = notify::Progress::start(ctx.stats.clone(), ctx.started, bar);
    let consequence =
        "no new uploads, multipart uploads in flight kept for the next run to continue, progress so far kept";
    let stop = Stop::on_signals(consequence).unwrap_or_else(|e| {
        tracing::warn!("cannot listen for SIGTERM/SIGINT ({e}); a stop will kill the run");
        Stop::never()
    });
    let result = back_up(config, opts, &sdk, key, store.clone(), &ctx.stats, &stop).await;
    let fatal = match result {
        Ok(walked) if !opts.dry_run => {
            let (started, stats) = (ctx.started_unix, &ctx.stats);
            save_manifest_copy(store.clone(), config, started, stop.clone(), stats).await;
            if let Some(tree) = walked {
                save_snapshot(store, config, tree, started, stop, stats).await;
            }
            None
        }
        Ok(_) => None,
        Err(e) => Some(e),
    };
    drop(progress);
    ctx.finish(fatal).await
}

/// The backup: the walk, the listing and the manifest merged and planned on a blocking thread
/// (`merge`, `plan`), and the plan carried out on this host or by the workers. Returns the walk
/// spooled for the night's snapshot (`tree`), unless it was a dry run or the spool was given up.
async fn back_up(
    config: &Config,
    opts: &RunOptions,
    sdk: &aws_config::SdkConfig,
    key: Option<crate::auth::AuthKey>,
    store: Arc<S3Store>,
    stats: &Arc<Stats>,
    stop: &Stop,
) -> Result<Option<tree::Tree>, Fatal> {
    let state_dir = &config.state_dir.0;
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
    let spool = match opts.dry_run {
        true => None,
        false => Some(tree::Spool::start(state_dir, &config.source.path.0)),
    };
    let (steps, planner) = spawn_planner(inputs, spool, stats.clone());
    let writer = match opts.dry_run {
        true => None,
        false => Some(
            manifest::Writer::create(state_dir, &config.destination_id())
                .map_err(|e| Fatal::manifest(state_dir, e))?,
        ),
    };
    let (stats, stop) = (stats.clone(), stop.clone());
    let result = match (&config.distribute, writer) {
        // The workers upload; the manifest is written from their reports.
        (Some(d), Some(writer)) => {
            let insecure = config.destination.allow_insecure_endpoint;
            let queues = Queues::new(sdk, d, insecure, key);
            let coordinator = Coordinator::new(config, d, &queues, store.as_ref(), stats, stop);
            coordinator.run(steps, writer).await
        }
        // This host uploads; so does the dry run of a distributed one, which only prints the plan.
        (_, writer) => copy::copy(config, store, stats, stop, steps, writer).await,
    };
    // Once the steps are dropped, the planner stops at its next send; its figures count.
    let walked = planner.await.ok().flatten();
    result.map(|()| walked)
}

/// Scans and plans on a blocking thread; the steps come out of the channel in key order. With a
/// `spool` (not in a dry run) the walk yields the whole tree, spooled for the night's snapshot
/// as it goes by, and the planner still gets the files; the spooled tree comes back once the
/// walk went to its end.
fn spawn_planner(
    inputs: Inputs,
    spool: Option<tree::Spool>,
    stats: Arc<Stats>,
) -> (
    tokio::sync::mpsc::Receiver<StepResult>,
    tokio::task::JoinHandle<Option<tree::Tree>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<StepResult>(STEPS_AHEAD);
    let planner = tokio::task::spawn_blocking(move || {
        let manifest_entries = inputs.manifest.into_iter().flatten();
        let plan = |local: &mut dyn Iterator<Item = scan::LocalEntry>| {
            for step in Planner::new(local, inputs.remote, manifest_entries) {
                let failed = step.is_err();
                if tx.blocking_send(step).is_err() || failed {
                    break;
                }
            }
        };
        match spool {
            None => {
                plan(&mut scan::scan(inputs.scan, stats));
                None
            }
            Some(mut spool) => {
                plan(&mut spool.files(scan::scan_tree(inputs.scan, stats)));
                spool.finish()
            }
        }
    });
    (rx, planner)
}

/// The manifest this run completed, copied to the bucket (`offsite`). A copy that fails is a
/// transfer error like a file's: the backup is whole, but a rebuilt host would not find it.
async fn save_manifest_copy(
    store: Arc<S3Store>,
    config: &Config,
    started_unix: u64,
    stop: Stop,
    stats: &Stats,
) {
    let key = offsite::key(config);
    match offsite::save(store, config, started_unix, stop).await {
        Ok(size) => tracing::info!(
            "manifest copied to s3://{}/{} ({})",
            config.destination.bucket.0,
            crate::keys::shown(&key),
            bytesize::ByteSize(size).display().iec()
        ),
        Err(why) => stats.file_error(
            std::path::Path::new(&key),
            FileErrorKind::Upload,
            &format_args!(
                "the manifest's copy in the bucket was not saved ({why}); the backup itself is \
                 complete, and the next run tries again"
            ),
        ),
    }
}

/// The night's snapshot (`tree`), saved after the manifest's copy. One that fails is a transfer
/// error like the copy's: the backup is whole, but this night cannot be restored as a tree.
async fn save_snapshot(
    store: Arc<S3Store>,
    config: &Config,
    walked: tree::Tree,
    started_unix: u64,
    stop: Stop,
    stats: &Stats,
) {
    let began = Instant::now();
    match tree::save(store, config, walked, started_unix, stop).await {
        // The seconds are what the snapshot adds to the run once the walk is done (the join,
        // the compression and the upload): `make bench` reads them from this line.
        Ok(saved) => tracing::info!(
            "snapshot {} saved: {} entries, {} bytes in {:.2}s (s3://{}/{})",
            saved.header.id,
            saved.header.entries,
            saved.size,
            began.elapsed().as_secs_f64(),
            config.destination.bucket.0,
            crate::keys::shown(&saved.key)
        ),
        Err(why) => stats.file_error(
            std::path::Path::new(&format!(
                "{}{}",
                config.destination.prefix.as_str(),
                crate::snapshot::DIR
            )),
            FileErrorKind::Upload,
            &format_args!(
                "the night's snapshot was not saved ({why}); the backup itself is complete, \
                 but this night cannot be restored as a tree"
            ),
        ),
    }
}

fn skip(why: &str) -> Ending {
    let ending = Ending::Skipped;
    tracing::info!(outcome = "skipped", exit_code = ending.exit_code(), "{why}");
    // READY=1 first: systemd fails a Type=notify unit whose process exits cleanly without it
    // (Result=protocol), and SuccessExitStatus=75 would not apply. A skip is a start that is
    // complete at once.
    notify::ready(why);
    notify::stopping(why);
    ending
}

impl RunContext<'_> {
    /// Decides the outcome once and tells everyone.
    async fn finish(self, fatal: Option<Fatal>) -> Ending {
        let config = self.config;
        let figures = self.stats.snapshot(self.started.elapsed());
        let report = RunReport::new(
            figures,
            fatal.as_ref().map(ToString::to_string),
            config.success_max_errors,
            self.opts.dry_run,
        );
        let mut ending = match &fatal {
            Some(e) => e.ending(),
            None => Ending::from(report.outcome),
        };
        if self.opts.dry_run {
            // The dry run's summary line names no error: what ended it is said before.
            if let Some(e) = &fatal {
                tracing::error!("{e}");
            }
            log_summary(&report, ending.exit_code());
            notify::stopping(&report.to_string());
            return ending;
        }

        let mut published = publish_cloudwatch(config, self.sdk.as_ref(), &report).await;
        if !published {
            ending = ending.without_metrics();
        }
        let ended = fsutil::unix_now();
        let success = report.outcome.is_success();
        let previous = self.previous.as_ref();
        let last_success_started = match success {
            true => Some(self.started_unix),
            false => previous.and_then(|p| p.last_success_started),
        };
        let last_success_ended = match success {
            true => Some(ended),
            // A record from before ends were kept: its last success's start is close enough.
            false => previous.and_then(|p| p.last_success_ended.or(p.last_success_started)),
        };
        if let Some(path) = &config.metrics.textfile {
            let run = metrics::LastRun {
                figures: &report.figures,
                success,
                exit_code: ending.exit_code(),
                ended_unix: ended,
                last_success_ended_unix: last_success_ended,
            };
            if let Err(e) = metrics::write_textfile(&path.0, &run) {
                published = false;
                ending = ending.without_metrics();
                tracing::error!(
                    error_kind = "metrics",
                    "cannot write the metrics textfile {}: {e}",
                    path.0.display()
                );
            }
        }
        let record = RunRecord {
            started: self.started_unix,
            ended,
            outcome: report.outcome,
            exit_code: ending.exit_code(),
            figures: report.figures.clone(),
            error: report.error.clone(),
            last_success_started,
            last_success_ended,
            metrics_published: published,
        };
        // A state directory the guard refused (another owner, open to others) is not written to,
        // not even the record of that refusal.
        let refused = matches!(
            fatal,
            Some(Fatal::Guard(
                guard::GuardError::StateDirOwner { .. } | guard::GuardError::StateDirShared { .. }
            ))
        );
        let written = match refused {
            true => Ok(()),
            false => state::write_record(&config.state_dir.0, &record),
        };
        if let Err(e) = written {
            tracing::warn!(
                "cannot write the run record in {}: {e}",
                config.state_dir.0.display()
            );
        }
        if let Some(url) = &config.heartbeat_url {
            heartbeat(&url.0, report.outcome.is_success()).await;
        }
        log_summary(&report, ending.exit_code());
        notify::stopping(&report.to_string());
        ending
    }
}

/// CloudWatch, when configured; `false` when the metrics could not be published (said in the
/// journal).
async fn publish_cloudwatch(
    config: &Config,
    sdk: Option<&aws_config::SdkConfig>,
    report: &RunReport,
) -> bool {
    if !config.metrics.cloudwatch {
        return true;
    }
    let data = metrics::data(&report.figures, report.outcome.is_success());
    let sent = async {
        let sdk = match sdk {
            Some(s) => s.clone(),
            None => sdk::load(config).await?,
        };
        let instance = metrics::instance_id(&config.metrics).await;
        let insecure = config.destination.allow_insecure_endpoint;
        metrics::publish_cloudwatch(&sdk, &config.metrics, insecure, &instance, &data).await
    }
    .await;
    match sent {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                error_kind = "metrics",
                "metrics were NOT published ({e}); the backup itself {}",
                match report.outcome {
                    Outcome::Success => "completed successfully",
                    Outcome::FileErrors | Outcome::Problems => "completed with file errors",
                    Outcome::Failed => "failed",
                }
            );
            false
        }
    }
}

/// The summary line: all six figures as journal fields, under a fixed MESSAGE_ID.
fn log_summary(report: &RunReport, exit_code: u8) {
    let g = &report.figures;
    crate::summary!(
        exit_code,
        message_id = SUMMARY_MESSAGE_ID,
        outcome = report.outcome.as_str(),
        last_success = u8::from(report.outcome.is_success()),
        files_transferred = g.files_transferred,
        bytes_transferred = g.bytes_transferred,
        checks = g.checks,
        transfer_errors = g.transfer_errors,
        elapsed_seconds = format!("{:.3}", g.elapsed_seconds),
        exit_code,
        dry_run = report.dry_run,
        "{report}"
    );
}

/// The dead-man's switch: the URL on success, URL/fail otherwise. Never fatal.
async fn heartbeat(url: &str, success: bool) {
    let target = if success {
        url.to_owned()
    } else {
        format!("{}/fail", url.trim_end_matches('/'))
    };
    // No redirects: the URL was checked (https, or http to loopback) and a redirect could take
    // the request, and its token, elsewhere in clear text.
    let client = match reqwest::Client::builder()
        .timeout(HEARTBEAT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("heartbeat not sent: {e}");
            return;
        }
    };
    match client.get(&target).send().await {
        Ok(r) if r.status().is_success() => tracing::debug!("heartbeat sent"),
        Ok(r) => tracing::warn!("heartbeat {} answered {}", redact(&target), r.status()),
        Err(e) => tracing::warn!(
            "heartbeat to {} failed: {}",
            redact(&target),
            e.without_url()
        ),
    }
}

/// Heartbeat URLs embed a secret token: show only scheme and host.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}/…", rest.split('/').next().unwrap_or("")),
        None => "the heartbeat URL".into(),
    }
}
