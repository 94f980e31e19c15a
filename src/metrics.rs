//! The six figures of a run, published where operators watch: CloudWatch (one PutMetricData per
//! run) and, optionally, a Prometheus textfile for node_exporter. Metric names live here and only
//! here; docs/metrics.md describes each.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};

use crate::config;
use crate::report::Figures;

pub const LAST_SUCCESS: &str = "LastSuccess";
pub const FILES_TRANSFERRED: &str = "FilesTransferred";
pub const BYTES_TRANSFERRED: &str = "BytesTransferred";
pub const CHECKS: &str = "Checks";
pub const TRANSFER_ERRORS: &str = "TransferErrors";
pub const ELAPSED_SECONDS: &str = "ElapsedSeconds";
pub const INSTANCE_ID: &str = "InstanceId";

/// Tries of the whole PutMetricData (each already retried by the SDK), with back-off between.
const PUBLISH_TRIES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Datum {
    pub name: &'static str,
    pub unit: &'static str,
    pub value: f64,
}

/// The six data points of a run; `success` is the run's one success decision.
pub fn data(figures: &Figures, success: bool) -> [Datum; 6] {
    let d = |name, unit, value| Datum { name, unit, value };
    [
        d(LAST_SUCCESS, "None", if success { 1.0 } else { 0.0 }),
        d(FILES_TRANSFERRED, "Count", figures.files_transferred as f64),
        d(BYTES_TRANSFERRED, "Bytes", figures.bytes_transferred as f64),
        d(CHECKS, "Count", figures.checks as f64),
        d(TRANSFER_ERRORS, "Count", figures.transfer_errors as f64),
        d(ELAPSED_SECONDS, "Seconds", figures.elapsed_seconds),
    ]
}

/// The InstanceId dimension: configured, else from instance metadata, else the hostname.
pub async fn instance_id(cfg: &config::Metrics) -> String {
    if let Some(id) = &cfg.instance_id {
        return id.clone();
    }
    // AWS_EC2_METADATA_DISABLED is honoured here as in the SDK's credential chain: off EC2 the
    // metadata address must not even be tried.
    let disabled =
        std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if !disabled {
        let client = aws_config::imds::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(1))
            .max_attempts(2)
            .build();
        match client.get("/latest/meta-data/instance-id").await {
            Ok(id) => return id.as_ref().to_owned(),
            Err(e) => {
                tracing::debug!("no instance id from instance metadata ({e}); using the hostname")
            }
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Why the metrics were not published. Never fatal: the run says so and exits 3 after a success.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No SDK to publish with (the run failed before it was loaded, and loading it again failed).
    #[error(transparent)]
    Setup(#[from] crate::store::sdk::SetupError),
    #[error("PutMetricData to namespace {namespace} failed {tries} times: {why}")]
    Refused {
        namespace: String,
        tries: u32,
        why: String,
    },
}

/// One PutMetricData with all six points, retried with back-off. `Err` says why it was not
/// published.
pub async fn publish_cloudwatch(
    sdk: &aws_config::SdkConfig,
    cfg: &config::Metrics,
    allow_insecure_endpoint: bool,
    instance_id: &str,
    data: &[Datum],
) -> Result<(), PublishError> {
    let mut b = aws_sdk_cloudwatch::config::Builder::from(sdk).interceptor(
        crate::store::sdk::TransportGuard {
            allow_insecure: allow_insecure_endpoint,
        },
    );
    if let Some(url) = &cfg.endpoint_url {
        b = b.endpoint_url(&url.0);
    }
    let client = aws_sdk_cloudwatch::Client::from_conf(b.build());
    let mut dims = vec![Dimension::builder()
        .name(INSTANCE_ID)
        .value(instance_id)
        .build()];
    dims.extend(
        cfg.dimensions
            .iter()
            .map(|(k, v)| Dimension::builder().name(k).value(v).build()),
    );
    let now = DateTime::from(std::time::SystemTime::now());
    let points: Vec<MetricDatum> = data
        .iter()
        .map(|d| {
            MetricDatum::builder()
                .metric_name(d.name)
                .unit(StandardUnit::from(d.unit))
                .value(d.value)
                .timestamp(now)
                .set_dimensions(Some(dims.clone()))
                .build()
        })
        .collect();
    let mut last = String::new();
    for attempt in 1..=PUBLISH_TRIES {
        match client
            .put_metric_data()
            .namespace(&cfg.namespace)
            .set_metric_data(Some(points.clone()))
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                last = crate::store::sdk::explain(&e);
                tracing::debug!(attempt, "PutMetricData failed: {last}");
                if attempt < PUBLISH_TRIES {
                    tokio::time::sleep(Duration::from_secs(2u64.pow(attempt))).await;
                }
            }
        }
    }
    Err(PublishError::Refused {
        namespace: cfg.namespace.clone(),
        tries: PUBLISH_TRIES,
        why: last,
    })
}

/// What the Prometheus textfile says about the last run.
#[derive(Debug, Clone, PartialEq)]
pub struct LastRun<'a> {
    pub figures: &'a Figures,
    pub success: bool,
    pub exit_code: u8,
    /// When this run ended, and when the last successful one did (this one, or one before).
    pub ended_unix: u64,
    pub last_success_ended_unix: Option<u64>,
}

/// The textfile's metrics: name, help, value. Named after Prometheus's conventions (base units,
/// `_timestamp_seconds` for a time, `_last_run_` for what the latest run did), so that "how old is
/// the last good backup" is `time() - nightcopy_last_success_timestamp_seconds`, whatever the
/// nights since did (docs/metrics.md).
pub fn textfile_metrics(run: &LastRun) -> Vec<(&'static str, &'static str, f64)> {
    let g = run.figures;
    let mut m = Vec::with_capacity(9);
    if let Some(t) = run.last_success_ended_unix {
        m.push((
            "nightcopy_last_success_timestamp_seconds",
            "When the last successful run ended (Unix time); kept across failed runs.",
            t as f64,
        ));
    }
    m.extend([
        (
            "nightcopy_last_run_timestamp_seconds",
            "When the last run ended (Unix time).",
            run.ended_unix as f64,
        ),
        (
            "nightcopy_last_run_success",
            "1 if the last run succeeded (the value of LastSuccess), else 0.",
            if run.success { 1.0 } else { 0.0 },
        ),
        (
            "nightcopy_last_run_duration_seconds",
            "How long the last run took.",
            g.elapsed_seconds,
        ),
        (
            "nightcopy_last_run_files_transferred",
            "Files the last run uploaded.",
            g.files_transferred as f64,
        ),
        (
            "nightcopy_last_run_bytes_transferred",
            "Bytes the last run uploaded.",
            g.bytes_transferred as f64,
        ),
        (
            "nightcopy_last_run_checks",
            "Files the last run found unchanged.",
            g.checks as f64,
        ),
        (
            "nightcopy_last_run_transfer_errors",
            "Files the last run could not back up.",
            g.transfer_errors as f64,
        ),
        (
            "nightcopy_last_run_exit_code",
            "The last run's exit code (docs/exit-codes.md).",
            f64::from(run.exit_code),
        ),
    ]);
    m
}

/// The Prometheus textfile, replaced atomically so the collector never reads half of it (the
/// temp file's name does not end in `.prom`, so the collector never reads it either).
pub fn write_textfile(path: &Path, run: &LastRun) -> std::io::Result<()> {
    let mut text = String::new();
    for (name, help, value) in textfile_metrics(run) {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
    }
    crate::fsutil::replace(path, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_points_with_units() {
        let f = Figures {
            files_transferred: 3,
            bytes_transferred: 300,
            checks: 7,
            transfer_errors: 1,
            elapsed_seconds: 2.5,
            ..Default::default()
        };
        let d = data(&f, false);
        let got: Vec<_> = d.iter().map(|d| (d.name, d.unit, d.value)).collect();
        assert_eq!(
            got,
            [
                ("LastSuccess", "None", 0.0),
                ("FilesTransferred", "Count", 3.0),
                ("BytesTransferred", "Bytes", 300.0),
                ("Checks", "Count", 7.0),
                ("TransferErrors", "Count", 1.0),
                ("ElapsedSeconds", "Seconds", 2.5),
            ]
        );
    }

    #[test]
    fn textfile_is_complete_prometheus_text() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("nightcopy.prom");
        let figures = Figures {
            files_transferred: 3,
            bytes_transferred: 42,
            elapsed_seconds: 1.5,
            ..Default::default()
        };
        let run = LastRun {
            figures: &figures,
            success: false,
            exit_code: 2,
            ended_unix: 2000,
            last_success_ended_unix: Some(1000),
        };
        write_textfile(&p, &run).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let samples = parse_exposition(&text).unwrap();
        assert_eq!(samples.len(), 9);
        assert_eq!(samples["nightcopy_last_success_timestamp_seconds"], 1000.0);
        assert_eq!(samples["nightcopy_last_run_timestamp_seconds"], 2000.0);
        assert_eq!(samples["nightcopy_last_run_success"], 0.0);
        assert_eq!(samples["nightcopy_last_run_exit_code"], 2.0);
        assert_eq!(samples["nightcopy_last_run_files_transferred"], 3.0);
        assert_eq!(samples["nightcopy_last_run_duration_seconds"], 1.5);
        // Before the first success there is no such time, not a zero.
        let never = LastRun {
            last_success_ended_unix: None,
            ..run
        };
        write_textfile(&p, &never).unwrap();
        let samples = parse_exposition(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert!(!samples.contains_key("nightcopy_last_success_timestamp_seconds"));
        // Nothing else is left beside it (no temp file).
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["nightcopy.prom"]);
    }

    /// The text exposition format, strictly: every sample has a HELP and a TYPE line before it,
    /// names follow the metric-name grammar, values are floats, no name twice.
    fn parse_exposition(text: &str) -> Result<std::collections::BTreeMap<String, f64>, String> {
        let mut samples = std::collections::BTreeMap::new();
        let (mut help, mut typed) = (None::<String>, None::<String>);
        let valid = |n: &str| {
            n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help = rest.split_once(' ').map(|(n, _)| n.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(line)?;
                if kind != "gauge" {
                    return Err(format!("{name}: type {kind}"));
                }
                typed = Some(name.to_owned());
            } else {
                let (name, value) = line.split_once(' ').ok_or(line)?;
                if !valid(name) || help.as_deref() != Some(name) || typed.as_deref() != Some(name) {
                    return Err(format!("{line}: no HELP/TYPE, or a bad name"));
                }
                let v: f64 = value.parse().map_err(|_| format!("{line}: not a float"))?;
                if samples.insert(name.to_owned(), v).is_some() {
                    return Err(format!("{name} twice"));
                }
            }
        }
        Ok(samples)
    }
}
