//! The nightly run as operators see it: lock and minimum interval, source and credentials checks,
//! READY/STATUS/WATCHDOG to systemd, the copy, then one outcome — and from that one outcome the
//! summary line, the CloudWatch metrics, the textfile, the run record, the heartbeat and the exit
//! code, so they can never disagree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_credential_types::provider::ProvideCredentials;

use crate::config::Config;
use crate::report::{Outcome, RunReport, Stats};
use crate::state::{self, RunRecord};
use crate::store::s3::S3Store;
use crate::{exit, guard, metrics, notify, Fatal, RunOptions};

/// MESSAGE_ID of the summary line in the journal, fixed so `journalctl MESSAGE_ID=…` finds every
/// run's summary (docs/operations.md).
pub const SUMMARY_MESSAGE_ID: &str = "6b3c2f0a9d7e4c1f8e5a2b4d6c8e0f13";

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads the AWS SDK configuration through the default chain: environment, profile, or the EC2
/// instance role over IMDSv2; the region from the config, else the environment or IMDS. Fails
/// first, with what to install, on a host without CA certificates (`guard::check_trust_store`):
/// the SDK cannot make any request there, and building its client is where it would panic.
pub async fn load_sdk(config: &Config) -> Result<aws_config::SdkConfig, Fatal> {
    guard::check_trust_store()?;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &config.destination.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    Ok(loader.load().await)
}

/// Proves credentials and a region can be had before anything is read. Error texts name the fix
/// and never contain a credential.
pub async fn check_credentials(sdk: &aws_config::SdkConfig) -> Result<(), Fatal> {
    if sdk.region().is_none() {
        return Err(Fatal::Region(
            "no AWS region: set destination.region in the config (or AWS_REGION)".into(),
        ));
    }
    let provider = sdk
        .credentials_provider()
        .ok_or_else(|| Fatal::Credentials("no AWS credentials provider is configured".into()))?;
    provider.provide_credentials().await.map_err(|e| {
        Fatal::Credentials(format!(
            "no AWS credentials: on EC2 attach an instance role to the instance (and allow IMDSv2 \
             from this host); elsewhere set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE ({})",
            aws_sdk_s3::error::DisplayErrorContext(&e)
        ))
    })?;
    Ok(())
}

/// One nightly run; returns the exit code.
pub async fn run(config: &Config, opts: &RunOptions, bar: Option<indicatif::ProgressBar>) -> u8 {
    let started = Instant::now();
    let started_unix = state::unix_now();
    let state_dir = &config.state_dir.0;

    // Guard, part 1: a run that is skipped leaves no trace but one log line and exit 75. A state
    // directory that cannot be used is a failure like any other (published, LastSuccess=0).
    let fail_early = |e: Fatal, previous| {
        let stats = Arc::new(Stats::default());
        finish(
            config,
            opts,
            None,
            stats,
            started,
            started_unix,
            Some(e),
            previous,
        )
    };
    if let Err(e) = guard::prepare_state_dir(state_dir) {
        return fail_early(e.into(), None).await;
    }
    let _lock = match state::lock(state_dir) {
        Ok(l) => l,
        Err(e @ state::LockError::Held { .. }) => return skip(&e.to_string()),
        Err(e) => return fail_early(e.into(), None).await,
    };
    let previous = state::read_record(state_dir);
    if !opts.force && !opts.dry_run {
        if let Some(why) =
            state::too_soon(previous.as_ref(), config.guard.min_interval.0, started_unix)
        {
            return skip(&why);
        }
    }

    // Guard, part 2: failures from here on are real failures, published as LastSuccess=0.
    let sdk = match load_sdk(config).await {
        Ok(s) => s,
        Err(e) => return fail_early(e, previous).await,
    };
    let stats = Arc::new(Stats::default());
    let checked = async {
        guard::check_source(&config.source.path.0, config.source.require_mountpoint)?;
        check_credentials(&sdk).await
    }
    .await;
    if let Err(e) = checked {
        return finish(
            config,
            opts,
            Some(&sdk),
            stats,
            started,
            started_unix,
            Some(e),
            previous,
        )
        .await;
    }

    let store = Arc::new(S3Store::for_config(&sdk, config));
    notify::ready(&format!(
        "backing up {} to s3://{}/{}",
        config.source.path.0.display(),
        config.destination.bucket.0,
        config.destination.prefix.as_str()
    ));
    let progress = notify::Progress::start(stats.clone(), started, bar);
    let stop = match crate::stop::Stop::on_signals() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM/SIGINT ({e}); a stop will kill the run");
            crate::stop::Stop::never()
        }
    };
    let result = crate::copy(config, opts, store, stats.clone(), stop).await;
    drop(progress);
    finish(
        config,
        opts,
        Some(&sdk),
        stats,
        started,
        started_unix,
        result.err(),
        previous,
    )
    .await
}

fn skip(why: &str) -> u8 {
    tracing::info!(outcome = "skipped", exit_code = exit::SKIPPED, "{why}");
    // READY=1 first: systemd fails a Type=notify unit whose process exits cleanly without it
    // (Result=protocol), and SuccessExitStatus=75 would not apply. A skip is a start that is
    // complete at once.
    notify::ready(why);
    notify::stopping(why);
    exit::SKIPPED
}

/// Decides the outcome once and tells everyone.
#[allow(clippy::too_many_arguments)]
async fn finish(
    config: &Config,
    opts: &RunOptions,
    sdk: Option<&aws_config::SdkConfig>,
    stats: Arc<Stats>,
    started: Instant,
    started_unix: u64,
    fatal: Option<Fatal>,
    previous: Option<RunRecord>,
) -> u8 {
    let figures = stats.snapshot(started.elapsed());
    let report = RunReport::new(
        figures,
        fatal.as_ref().map(ToString::to_string),
        config.success_max_errors,
        opts.dry_run,
    );
    let mut code = match &fatal {
        Some(Fatal::Stopped(sig)) => crate::stop::Stop::exit_code(*sig),
        _ => report.outcome.exit_code(),
    };
    if opts.dry_run {
        log_summary(&report, code);
        notify::stopping(&report.to_string());
        return code;
    }

    let data = metrics::data(&report.figures, report.outcome.is_success());
    let mut published = true;
    if config.metrics.cloudwatch {
        let sdk = match sdk {
            Some(s) => Ok(s.clone()),
            None => load_sdk(config).await.map_err(|e| e.to_string()),
        };
        let sent = match sdk {
            Ok(sdk) => {
                let instance = metrics::instance_id(&config.metrics).await;
                metrics::publish_cloudwatch(&sdk, &config.metrics, &instance, &data).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            published = false;
            tracing::error!(
                error_kind = "metrics",
                "metrics were NOT published ({e}); the backup itself {}",
                match report.outcome {
                    Outcome::Success => "completed successfully",
                    Outcome::FileErrors => "completed with file errors",
                    Outcome::Failed => "failed",
                }
            );
        }
    }
    if let Some(path) = &config.metrics.textfile {
        if let Err(e) = metrics::write_textfile(&path.0, &data, state::unix_now()) {
            published = false;
            tracing::error!(
                error_kind = "metrics",
                "cannot write the metrics textfile {}: {e}",
                path.0.display()
            );
        }
    }
    if !published && code == exit::SUCCESS {
        code = exit::METRICS_NOT_PUBLISHED;
    }

    let record = RunRecord {
        started: started_unix,
        ended: state::unix_now(),
        outcome: report.outcome,
        exit_code: code,
        figures: report.figures.clone(),
        error: report.error.clone(),
        last_success_started: if report.outcome.is_success() {
            Some(started_unix)
        } else {
            previous.and_then(|p| p.last_success_started)
        },
        metrics_published: published,
    };
    if let Err(e) = state::write_record(&config.state_dir.0, &record) {
        tracing::warn!(
            "cannot write the run record in {}: {e}",
            config.state_dir.0.display()
        );
    }
    if let Some(url) = &config.heartbeat_url {
        heartbeat(&url.0, report.outcome.is_success()).await;
    }
    log_summary(&report, code);
    notify::stopping(&report.to_string());
    code
}

/// The summary line: all six figures as journal fields, under a fixed MESSAGE_ID.
fn log_summary(report: &RunReport, exit_code: u8) {
    let g = &report.figures;
    macro_rules! summary {
        ($level:ident) => {
            tracing::$level!(
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
            )
        };
    }
    match report.outcome {
        Outcome::Success if exit_code == exit::SUCCESS => summary!(info),
        Outcome::Failed => summary!(error),
        _ => summary!(warn),
    }
}

/// The dead-man's switch: the URL on success, URL/fail otherwise. Never fatal.
async fn heartbeat(url: &str, success: bool) {
    let target = if success {
        url.to_owned()
    } else {
        format!("{}/fail", url.trim_end_matches('/'))
    };
    let client = match reqwest::Client::builder()
        .timeout(HEARTBEAT_TIMEOUT)
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
