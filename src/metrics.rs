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
    /// The Prometheus name and help text.
    pub prom: &'static str,
    pub help: &'static str,
}

/// The six data points of a run; `success` is the run's one success decision.
pub fn data(figures: &Figures, success: bool) -> [Datum; 6] {
    let d = |name, unit, value, prom, help| Datum {
        name,
        unit,
        value,
        prom,
        help,
    };
    [
        d(
            LAST_SUCCESS,
            "None",
            if success { 1.0 } else { 0.0 },
            "nightcopy_last_success",
            "1 if the last run succeeded, else 0.",
        ),
        d(
            FILES_TRANSFERRED,
            "Count",
            figures.files_transferred as f64,
            "nightcopy_files_transferred",
            "Files uploaded by the last run.",
        ),
        d(
            BYTES_TRANSFERRED,
            "Bytes",
            figures.bytes_transferred as f64,
            "nightcopy_bytes_transferred",
            "Bytes uploaded by the last run.",
        ),
        d(
            CHECKS,
            "Count",
            figures.checks as f64,
            "nightcopy_checks",
            "Files found unchanged by the last run.",
        ),
        d(
            TRANSFER_ERRORS,
            "Count",
            figures.transfer_errors as f64,
            "nightcopy_transfer_errors",
            "Files the last run could not back up.",
        ),
        d(
            ELAPSED_SECONDS,
            "Seconds",
            figures.elapsed_seconds,
            "nightcopy_elapsed_seconds",
            "Duration of the last run.",
        ),
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

/// One PutMetricData with all six points, retried with back-off. `Err` says why it was not
/// published.
pub async fn publish_cloudwatch(
    sdk: &aws_config::SdkConfig,
    cfg: &config::Metrics,
    allow_insecure_endpoint: bool,
    instance_id: &str,
    data: &[Datum],
) -> Result<(), String> {
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
                last = aws_sdk_cloudwatch::error::DisplayErrorContext(&e).to_string();
                tracing::debug!(attempt, "PutMetricData failed: {last}");
                if attempt < PUBLISH_TRIES {
                    tokio::time::sleep(Duration::from_secs(2u64.pow(attempt))).await;
                }
            }
        }
    }
    Err(format!(
        "PutMetricData to namespace {} failed {PUBLISH_TRIES} times: {last}",
        cfg.namespace
    ))
}

/// The Prometheus textfile, replaced atomically so the collector never reads half of it (the
/// temp file's name does not end in `.prom`, so the collector never reads it either).
pub fn write_textfile(path: &Path, data: &[Datum], finished_unix: u64) -> std::io::Result<()> {
    let mut text = String::new();
    for d in data {
        let _ = write!(
            text,
            "# HELP {} {}\n# TYPE {} gauge\n{} {}\n",
            d.prom, d.help, d.prom, d.prom, d.value
        );
    }
    let _ = write!(
        text,
        "# HELP nightcopy_last_run_timestamp_seconds When the last run ended.\n\
         # TYPE nightcopy_last_run_timestamp_seconds gauge\n\
         nightcopy_last_run_timestamp_seconds {finished_unix}\n"
    );
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
        write_textfile(&p, &data(&Figures::default(), true), 1234).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("nightcopy_last_success 1\n"), "{text}");
        assert!(text.contains("nightcopy_last_run_timestamp_seconds 1234\n"));
        assert_eq!(text.matches("# TYPE").count(), 7);
        // Nothing else is left beside it (no temp file).
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["nightcopy.prom"]);
    }
}
