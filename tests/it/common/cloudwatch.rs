//! A real CloudWatch API for tests: moto's CloudWatch behind a CBOR-to-JSON translating proxy,
//! started once per test process and shared by every test in it.
//!
//! aws-sdk-cloudwatch speaks Smithy RPCv2-CBOR, which moto 5.2.5 does not serve (404), so
//! `tests/servers/cloudwatch_cbor_proxy.py` sits in front of it (see that file for the protocol
//! traps). Metrics are stored and read back by moto's implementation, not by a recorder.
//!
//! Sharing rules, because one moto serves every test of the binary and tests run in parallel:
//! - give each test its own namespace ([`unique_namespace`]); moto keeps everything forever;
//! - count requests per namespace ([`CloudWatch::put_requests`]), never globally;
//! - moto's GetMetricData ignores the Namespace when dimensions are given, so
//!   [`CloudWatch::datapoints`] refuses (panics) when another namespace holds the same metric name
//!   with the same dimensions instead of silently mixing their values.
//!
//! A missing moto or Python fails the tests with install instructions; it never skips them.

// Each test binary compiles the whole of `common` and uses a part of it.
#![allow(dead_code)]

use std::future::Future;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_cloudwatch as cw;
use aws_sdk_cloudwatch::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, DimensionFilter, Metric, MetricDataQuery, MetricStat};

use super::process::{
    free_port, http_get, python, server_script, spawn_server, spawn_with_port_line, tool_path,
    Output, STARTUP_TIMEOUT,
};

/// The pip install line the servers need; `scripts/test-tools.sh` runs it into the cache venv.
const INSTALL_HINT: &str =
    "run scripts/test-tools.sh (it creates $HOME/.cache/nightcopy-tools/venv-1 \
     with `pip install 'moto[server]==5.2.5' cbor2`), or point NIGHTCOPY_MOTO and NIGHTCOPY_PYTHON \
     at a moto_server and a python that has cbor2";

/// The region the fake credentials sign for. moto keys its data by region (from the SigV4
/// credential scope), so every client of this endpoint must use the same one.
pub const REGION: &str = "us-east-1";

pub struct CloudWatch {
    /// `http://127.0.0.1:PORT` of the CBOR proxy: what an SDK client or the binary points at.
    pub endpoint: String,
    /// moto itself (JSON/query protocols), for debugging or for tools that speak JSON.
    pub moto_endpoint: String,
    /// Bound to this module's runtime; only the sync helpers use it (see [`runtime`]).
    client: cw::Client,
    output: Output,
    /// Kept so the processes are owned somewhere; PR_SET_PDEATHSIG ends them with the test
    /// process (statics are never dropped).
    _children: Mutex<Vec<Child>>,
}

/// One CloudWatch request as the proxy saw it (from its `GET /__requests`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    pub operation: String,
    /// The HTTP status answered: moto's, or the proxy's own 400 for a malformed request.
    pub status: u16,
    pub namespace: Option<String>,
    /// Number of MetricData entries in a PutMetricData; 0 for other operations.
    pub metric_data: usize,
}

/// The shared endpoint, started on first use. Panics (failing the calling test) when moto or the
/// proxy is missing or does not come up in time.
pub fn cloudwatch() -> &'static CloudWatch {
    // The failure is kept too, so the other tests fail at once instead of each retrying a
    // startup that timed out.
    static CW: OnceLock<Result<CloudWatch, String>> = OnceLock::new();
    match CW.get_or_init(start) {
        Ok(cw) => cw,
        Err(e) => panic!("{e}"),
    }
}

/// A namespace no other test of this process uses (moto lives as long as the process).
pub fn unique_namespace(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("nightcopy-test/{test}/{}-{n}", std::process::id())
}

/// Runs a future on this module's runtime. Do not call it from inside another runtime (e.g. a
/// `#[tokio::test]`): tokio panics on nested `block_on`; await the async functions there instead.
pub fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// One multi-thread runtime for the whole test process, never shut down. The sync helpers'
/// client lives here because hyper's pooled connections run on the runtime that opened them: a
/// client shared across `#[tokio::test]` runtimes breaks when the first one ends.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-cloudwatch-rt")
            .enable_all()
            .build()
            .expect("cannot build the tokio runtime for the CloudWatch test helpers")
    })
}

impl CloudWatch {
    /// An `SdkConfig` for this endpoint: static fake credentials, region [`REGION`], bounded
    /// timeouts. Build clients from it in the test's own runtime.
    pub fn sdk_config(&self) -> SdkConfig {
        sdk_config_for(&self.endpoint)
    }

    /// A fresh client for the calling test (see [`runtime`] for why it is not shared).
    pub fn client(&self) -> cw::Client {
        cw::Client::new(&self.sdk_config())
    }

    /// Every CloudWatch request the proxy has answered so far, all tests included.
    pub fn requests(&self) -> Vec<ProxyRequest> {
        let (status, body) = http_get(&self.endpoint, "/__requests")
            .unwrap_or_else(|e| panic!("cannot read the proxy's request log: {e}"));
        assert_eq!(status, 200, "proxy /__requests answered {status}: {body}");
        body.lines().map(parse_request_line).collect()
    }

    /// The PutMetricData requests for `namespace` (other tests' requests excluded).
    pub fn put_requests(&self, namespace: &str) -> Vec<ProxyRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.operation == "PutMetricData" && r.namespace.as_deref() == Some(namespace))
            .collect()
    }

    /// The values stored for one metric (Sum per 60-second bucket, oldest first) within the last
    /// hour. `dims` must be the metric's full dimension set, as in CloudWatch itself.
    pub fn datapoints(&self, namespace: &str, metric: &str, dims: &[(&str, &str)]) -> Vec<f64> {
        self.datapoints_stat(namespace, metric, dims, "Sum", 60)
    }

    /// Like [`Self::datapoints`] with another statistic (`SampleCount` tells how many values
    /// landed in each bucket) or period.
    pub fn datapoints_stat(
        &self,
        namespace: &str,
        metric: &str,
        dims: &[(&str, &str)],
        stat: &str,
        period_secs: i32,
    ) -> Vec<f64> {
        block_on(read_datapoints(
            &self.client,
            namespace,
            metric,
            dims,
            stat,
            period_secs,
        ))
    }

    /// The metrics (name and dimensions, sorted) published to `namespace`.
    pub fn metrics(&self, namespace: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut metrics = block_on(list_metrics(&self.client, Some(namespace), None, &[]))
            .into_iter()
            .map(|m| (m.metric_name.unwrap_or_default(), dims_of(&m.dimensions)))
            .collect::<Vec<_>>();
        metrics.sort();
        metrics
    }

    /// The last lines moto and the proxy wrote to stdout/stderr, for failure messages.
    pub fn server_output(&self) -> String {
        self.output.tail()
    }
}

pub fn sdk_config_for(endpoint: &str) -> SdkConfig {
    let creds = Credentials::new(
        "AKIDNIGHTCOPYTEST",
        "nightcopy-test-secret",
        None,
        None,
        "nightcopy-test",
    );
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(SharedCredentialsProvider::new(creds))
        // Bounded, so a wedged server fails a test instead of hanging it.
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .build()
}

/// Async form of [`CloudWatch::datapoints_stat`] for tests that already run in a runtime; pass a
/// client made there ([`CloudWatch::client`]).
pub async fn read_datapoints(
    client: &cw::Client,
    namespace: &str,
    metric: &str,
    dims: &[(&str, &str)],
    stat: &str,
    period_secs: i32,
) -> Vec<f64> {
    let wanted = sorted_dims(dims);
    // ListMetrics does filter on Namespace: if the metric is not there, it has no data points,
    // whatever GetMetricData (which ignores Namespace when dimensions are given) would say.
    let here = list_metrics(client, Some(namespace), Some(metric), dims).await;
    if !here.iter().any(|m| dims_of(&m.dimensions) == wanted) {
        return Vec::new();
    }
    if !dims.is_empty() {
        let elsewhere: Vec<String> = list_metrics(client, None, Some(metric), dims)
            .await
            .into_iter()
            .filter(|m| dims_of(&m.dimensions) == wanted)
            .filter_map(|m| m.namespace)
            .filter(|ns| ns != namespace)
            .collect();
        assert!(
            elsewhere.is_empty(),
            "metric {metric} with dimensions {dims:?} also exists in namespaces {elsewhere:?}; \
             moto's GetMetricData ignores the namespace when dimensions are given, so the values \
             would be mixed: use a unique dimension value per test"
        );
    }

    let now = SystemTime::now();
    let query = MetricDataQuery::builder()
        .id("m0")
        .metric_stat(
            MetricStat::builder()
                .metric(
                    Metric::builder()
                        .namespace(namespace)
                        .metric_name(metric)
                        .set_dimensions(Some(
                            dims.iter()
                                .map(|(k, v)| Dimension::builder().name(*k).value(*v).build())
                                .collect(),
                        ))
                        .build(),
                )
                .period(period_secs)
                .stat(stat)
                .build(),
        )
        .build();
    let out = client
        .get_metric_data()
        .start_time(DateTime::from(now - Duration::from_secs(3600)))
        .end_time(DateTime::from(now + Duration::from_secs(600)))
        .scan_by(cw::types::ScanBy::TimestampAscending)
        .metric_data_queries(query)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetMetricData for {namespace}/{metric} failed: {e:?}"));
    let result = out
        .metric_data_results()
        .iter()
        .find(|r| r.id() == Some("m0"))
        .unwrap_or_else(|| panic!("GetMetricData answered no result for {namespace}/{metric}"));
    result.values().to_vec()
}

/// ListMetrics, all pages.
pub async fn list_metrics(
    client: &cw::Client,
    namespace: Option<&str>,
    metric: Option<&str>,
    dims: &[(&str, &str)],
) -> Vec<Metric> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    // Bounded: moto pages by 500, and no test publishes anywhere near 100 pages.
    for _ in 0..100 {
        let out = client
            .list_metrics()
            .set_namespace(namespace.map(str::to_owned))
            .set_metric_name(metric.map(str::to_owned))
            .set_dimensions(Some(
                dims.iter()
                    .map(|(k, v)| DimensionFilter::builder().name(*k).value(*v).build())
                    .collect(),
            ))
            .set_next_token(token.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListMetrics failed: {e:?}"));
        all.extend(out.metrics().iter().cloned());
        match out.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return all,
        }
    }
    panic!("ListMetrics did not finish in 100 pages");
}

fn dims_of(dims: &Option<Vec<Dimension>>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = dims
        .iter()
        .flatten()
        .map(|d| {
            (
                d.name().unwrap_or_default().to_owned(),
                d.value().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn sorted_dims(dims: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = dims
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    out.sort();
    out
}

fn parse_request_line(line: &str) -> ProxyRequest {
    let f: Vec<&str> = line.split('\t').collect();
    assert_eq!(f.len(), 4, "bad proxy request line {line:?}");
    ProxyRequest {
        operation: f[0].to_owned(),
        status: f[1].parse().expect("proxy status"),
        namespace: (f[2] != "-").then(|| f[2].to_owned()),
        metric_data: f[3].parse().expect("proxy metric data count"),
    }
}

// ---- starting the servers ---------------------------------------------------------------------

fn start() -> Result<CloudWatch, String> {
    let moto = tool_path("NIGHTCOPY_MOTO", "moto_server");
    let python = python();
    for (what, path) in [("moto_server", &moto), ("python", &python)] {
        if !path.is_file() {
            return Err(format!(
                "{what} not found at {}: {INSTALL_HINT}",
                path.display()
            ));
        }
    }
    let proxy_script = server_script("cloudwatch_cbor_proxy.py");
    let output = Output::default();

    // The free port is found by binding port 0 and releasing it, so another process can take it
    // before moto binds: moto then exits at once, and we retry on a new port.
    let mut last_error = String::new();
    for _ in 0..3 {
        let moto_port = free_port();
        let moto_endpoint = format!("http://127.0.0.1:{moto_port}");
        let mut cmd = Command::new(&moto);
        cmd.args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]);
        let mut moto_child = spawn_server(cmd, &output, "moto")
            .map_err(|e| format!("cannot start {}: {e}: {INSTALL_HINT}", moto.display()))?;

        let mut cmd = Command::new(&python);
        cmd.arg(&proxy_script)
            .args(["--listen", "127.0.0.1:0", "--moto", &moto_endpoint]);
        let (mut proxy_child, port) = match spawn_with_port_line(cmd, &output, "proxy") {
            Ok(started) => started,
            Err(e) => {
                let _ = moto_child.kill();
                let _ = moto_child.wait();
                return Err(format!(
                    "cannot start the CloudWatch proxy ({} {}): {e}\n{}\n{INSTALL_HINT}",
                    python.display(),
                    proxy_script.display(),
                    output.tail()
                ));
            }
        };
        let endpoint = format!("http://127.0.0.1:{port}");

        match wait_healthy(&endpoint, &mut moto_child, &mut proxy_child) {
            Ok(()) => {
                return Ok(CloudWatch {
                    client: cw::Client::new(&sdk_config_for(&endpoint)),
                    endpoint,
                    moto_endpoint,
                    output,
                    _children: Mutex::new(vec![moto_child, proxy_child]),
                });
            }
            Err(e) => {
                last_error = e;
                for child in [&mut moto_child, &mut proxy_child] {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
    Err(format!(
        "CloudWatch test endpoint did not come up: {last_error}\n--- server output ---\n{}",
        output.tail()
    ))
}

fn wait_healthy(endpoint: &str, moto: &mut Child, proxy: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        for (name, child) in [("moto_server", &mut *moto), ("proxy", &mut *proxy)] {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{name} exited early ({status})"));
            }
        }
        match http_get(endpoint, "/__health") {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => last = format!("/__health answered {status}: {body}"),
            Err(e) => last = format!("/__health: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "not healthy within {STARTUP_TIMEOUT:?} (last: {last})"
    ))
}
