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

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_cloudwatch as cw;
use aws_sdk_cloudwatch::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, DimensionFilter, Metric, MetricDataQuery, MetricStat};

/// The pip install line the servers need; `scripts/test-tools.sh` runs it into the cache venv.
const INSTALL_HINT: &str =
    "run scripts/test-tools.sh (it creates $HOME/.cache/nightcopy-tools/venv-1 \
     with `pip install 'moto[server]==5.2.5' cbor2`), or point NIGHTCOPY_MOTO and NIGHTCOPY_PYTHON \
     at a moto_server and a python that has cbor2";

/// Bounds every wait for a server to come up; moto is ready in < 1 s on an idle machine, but
/// tests start while the compiler may still hold both cores.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

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

fn sdk_config_for(endpoint: &str) -> SdkConfig {
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

fn tool_path(var: &str, venv_file: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home)
        .join(".cache/nightcopy-tools/venv-1/bin")
        .join(venv_file)
}

/// The Python that runs the test servers: `NIGHTCOPY_PYTHON`, else the cache venv's.
pub(super) fn python() -> PathBuf {
    tool_path("NIGHTCOPY_PYTHON", "python")
}

/// Path of a script in `tests/servers/`.
pub(super) fn server_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/servers")
        .join(name)
}

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// Spawns a server with stdout and stderr drained into `output` (a pipe nobody reads would
/// eventually block a chatty server such as moto, which logs every request).
pub(super) fn spawn_server(mut cmd: Command, output: &Output, name: &str) -> io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd)?;
    output.drain(child.stdout.take(), name);
    output.drain(child.stderr.take(), name);
    Ok(child)
}

/// Spawns a server that prints its port as the first stdout line, and waits (bounded) for it.
pub(super) fn spawn_with_port_line(
    mut cmd: Command,
    output: &Output,
    name: &str,
) -> io::Result<(Child, u16)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd)?;
    let stderr_done = output.drain(child.stderr.take(), name);
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let out = output.clone();
    let tag = name.to_owned();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().transpose());
        for line in lines.map_while(Result::ok) {
            out.push(&tag, &line);
        }
    });
    let first = match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => {
            let _ = child.wait();
            // Let the traceback reach the buffer before the caller quotes it.
            let _ = stderr_done.recv_timeout(Duration::from_secs(2));
            return Err(io::Error::other(format!(
                "{name} exited before printing its port"
            )));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "{name} printed no port within {STARTUP_TIMEOUT:?}"
            )));
        }
    };
    match first.trim().parse() {
        Ok(port) => Ok((child, port)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other(format!(
                "{name} printed {first:?} instead of a port"
            )))
        }
    }
}

/// The last lines of the servers' stdout/stderr, kept for failure messages.
#[derive(Clone, Default)]
pub(super) struct Output(Arc<Mutex<VecDeque<String>>>);

impl Output {
    const KEEP: usize = 200;

    fn push(&self, name: &str, line: &str) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == Self::KEEP {
            q.pop_front();
        }
        q.push_back(format!("[{name}] {line}"));
    }

    pub(super) fn tail(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Copies `stream` line by line into the buffer on a thread; the receiver gets a message at
    /// end of stream, so a caller can wait (bounded) for a dead child's last words.
    pub(super) fn drain<R: Read + Send + 'static>(
        &self,
        stream: Option<R>,
        name: &str,
    ) -> mpsc::Receiver<()> {
        let (done, finished) = mpsc::channel();
        let Some(stream) = stream else {
            return finished;
        };
        let out = self.clone();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                out.push(&tag, &line);
            }
            let _ = done.send(());
        });
        finished
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the child is SIGKILLed when the test process dies, however it dies.
///
/// Trap: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
/// Test threads end with their test, so every child is forked by one dedicated thread that never
/// returns; the signal then fires only when the whole process goes.
pub(super) fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-server-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so the loop never ends; if it ever did, this
                // thread must still not exit.
                loop {
                    std::thread::park();
                }
            })
            .expect("cannot start the server-spawning thread");
        tx
    });

    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe calls
    // (prctl, getppid); io::Error from an errno code does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died between fork and prctl; then no signal would come.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner
        .send((cmd, tx))
        .map_err(|_| io::Error::other("the server-spawning thread is gone"))?;
    rx.recv_timeout(STARTUP_TIMEOUT)
        .map_err(|_| io::Error::other("the server-spawning thread did not answer"))?
}

/// A minimal HTTP/1.1 GET to 127.0.0.1 with bounded timeouts (no proxy settings apply).
pub fn http_get(endpoint: &str, path: &str) -> io::Result<(u16, String)> {
    let addr: SocketAddr = endpoint
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .filter(|a: &SocketAddr| a.ip().is_loopback())
        .ok_or_else(|| io::Error::other(format!("not a loopback endpoint: {endpoint}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no HTTP status in {head:?}")))?;
    Ok((status, body.to_owned()))
}
