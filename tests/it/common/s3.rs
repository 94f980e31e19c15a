//! One real S3 API server per test binary, shared by all its tests, with the counting proxy in
//! front, so integration tests exercise the real client against a real server and can still
//! assert which requests were made.
//!
//! By default it starts s3s-fs (installed by `scripts/test-tools.sh`) on 127.0.0.1 with a
//! throw-away data folder and fake per-run credentials. Each test takes its own bucket from
//! [`S3Server::dest`], so tests run in parallel without seeing each other's objects.
//!
//! What s3s-fs 0.14.1 does differently from S3, found while building this (tests must not depend
//! on either side of these):
//! - it checks the SHA-256 of a PutObject (BadDigest), but writes the object *before* checking, so
//!   a refused PUT still leaves the object behind; over an existing object it leaves the new bytes
//!   under the old ETag and checksum, and the SDK's GET then fails with ChecksumMismatch;
//! - it ignores UploadPart checksums (a wrong one is accepted) and keeps no checksum for a
//!   multipart object;
//! - it ignores `encoding-type=url` in listings (keys come back raw although the reply says
//!   `url`), and a key with a control character such as U+0001 makes every listing that
//!   includes it unparsable for the SDK;
//! - HEAD/GET of a key that is also a "folder" prefix answers 500 instead of 404.
//!
//! With `NIGHTCOPY_TEST_S3_ENDPOINT` set, no server is started: the tests use that endpoint (plain
//! `http://` only, the proxy has no TLS), credentials from `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN` if set), region from
//! `NIGHTCOPY_TEST_S3_REGION` (default us-east-1) and the one bucket `NIGHTCOPY_TEST_S3_BUCKET`;
//! each test then gets a fresh prefix in that bucket instead of a bucket of its own.
//!
//! A missing s3s-fs binary is a test failure with install instructions, never a skip: a test
//! suite that quietly skips its storage tests proves nothing.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::types::ChecksumMode;
use aws_sdk_s3::Client;

use super::proxy::{self, Op, Proxy, Request};

const S3S_FS_VERSION: &str = "0.14.1";
/// How long s3s-fs may take to accept connections. It is ready in milliseconds; the margin is
/// for a machine busy compiling.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for anything run through [`S3Server::block_on`], so a stuck request fails the
/// test instead of hanging the suite.
const BLOCK_ON_LIMIT: Duration = Duration::from_secs(300);
/// Prefix of the state folders in the temp dir; stale ones are swept on the next start.
const STATE_DIR_PREFIX: &str = "nightcopy-s3s-";

/// The server for this test binary, started on first use.
pub fn s3() -> &'static S3Server {
    // The error is kept, not retried: every later test fails at once with the same message
    // instead of each waiting out its own start timeout.
    static SERVER: OnceLock<Result<S3Server, String>> = OnceLock::new();
    match SERVER.get_or_init(S3Server::start) {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

/// moto's S3 (the moto that serves CloudWatch and SQS), behind its own counting proxy: what the
/// tests use where s3s-fs falls short — versions, storage classes, Object Lock.
pub fn moto_s3() -> &'static S3Server {
    static SERVER: OnceLock<Result<S3Server, String>> = OnceLock::new();
    let started = SERVER.get_or_init(|| {
        let target = Target {
            endpoint: super::cloudwatch::cloudwatch().moto_endpoint.clone(),
            region: "us-east-1".to_owned(),
            shared_bucket: None,
            // moto accepts any credentials; fixed ones keep its state per test run apart
            // from nothing else.
            access_key: "testing".to_owned(),
            secret_key: "testing".to_owned(),
            session_token: None,
        };
        S3Server::start_with(target, None)
    });
    match started {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

/// Garage (scripts/test-tools.sh installs it), behind its own counting proxy: an S3 server that
/// keeps the SHA-256 of every part and lists it in ListParts, as AWS does.
pub fn garage() -> &'static S3Server {
    static SERVER: OnceLock<Result<S3Server, String>> = OnceLock::new();
    let started = SERVER.get_or_init(|| {
        let server = super::garage::Garage::start()?;
        let target = Target {
            endpoint: server.endpoint.clone(),
            region: "us-east-1".to_owned(),
            shared_bucket: None,
            access_key: server.access_key.clone(),
            secret_key: server.secret_key.clone(),
            session_token: None,
        };
        let log = server.log.clone();
        let mut started = S3Server::start_with(target, None)?;
        started.log = Some(log);
        std::mem::forget(server);
        Ok(started)
    });
    match started {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

/// Where a test's objects go: its own bucket (prefix empty) or, against an external endpoint, its
/// own prefix in the shared bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    pub bucket: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
}

impl Dest {
    /// The full key of `relative` under this destination.
    pub fn key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }
}

/// An object read back for assertions.
#[derive(Debug, Clone)]
pub struct Object {
    pub body: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    /// Base64, as S3 reports it. For a multipart object this is the composite checksum
    /// (`<base64>-<parts>`), not the SHA-256 of the whole body; s3s-fs reports none there.
    pub checksum_sha256: Option<String>,
    pub content_length: u64,
    pub e_tag: Option<String>,
}

pub struct S3Server {
    /// The proxy, `http://127.0.0.1:PORT`: what the code under test must talk to.
    pub endpoint: String,
    /// The server itself, bypassing the proxy: nothing sent here is recorded.
    pub upstream: String,
    pub region: String,
    /// Fake per-run values for s3s-fs, the caller's real ones in external mode: never printed,
    /// hence no Debug on this struct.
    credentials: Credentials,
    /// Set in external mode: the one bucket all tests share.
    shared_bucket: Option<String>,
    run_id: String,
    next_dest: AtomicU64,
    runtime: tokio::runtime::Runtime,
    proxy: Proxy,
    /// Bypasses the proxy, so assertions do not show up in the request log.
    direct: Client,
    /// The server's log, when this harness started it.
    log: Option<PathBuf>,
}

impl S3Server {
    fn start() -> Result<S3Server, String> {
        let (target, server) = match std::env::var("NIGHTCOPY_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => (Target::from_env(endpoint)?, None),
            _ => {
                let access_key = format!("nctest{}", random_hex(7));
                let secret_key = random_hex(20);
                let server = LocalServer::start(&access_key, &secret_key)?;
                let target = Target {
                    endpoint: format!("http://{}", server.addr),
                    region: "us-east-1".to_owned(),
                    shared_bucket: None,
                    access_key,
                    secret_key,
                    session_token: None,
                };
                (target, Some(server))
            }
        };
        S3Server::start_with(target, server.map(|s| s.log))
    }

    fn start_with(target: Target, log: Option<PathBuf>) -> Result<S3Server, String> {
        // Built only now: a runtime dropped on an error path above would panic when the first
        // caller is an async test.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-s3")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build the test runtime: {e}"))?;
        let proxy = match Proxy::start(runtime.handle(), &target.endpoint) {
            Ok(proxy) => proxy,
            Err(e) => {
                runtime.shutdown_background();
                return Err(format!("cannot start the test proxy: {e}"));
            }
        };
        let credentials = Credentials::new(
            target.access_key,
            target.secret_key,
            target.session_token,
            None,
            "nightcopy-test",
        );
        Ok(S3Server {
            endpoint: format!("http://{}", proxy.addr()),
            direct: make_client(&target.endpoint, &target.region, &credentials),
            upstream: target.endpoint,
            region: target.region,
            credentials,
            shared_bucket: target.shared_bucket,
            run_id: random_hex(4),
            next_dest: AtomicU64::new(0),
            runtime,
            proxy,
            log,
        })
    }

    /// A fresh destination for one test. `hint` (say, the test's name) only makes the name
    /// readable in a listing; uniqueness comes from a per-run random id and a counter, so
    /// parallel tests and reruns against an external endpoint never share a destination.
    pub fn dest(&self, hint: &str) -> Dest {
        let n = self.next_dest.fetch_add(1, Ordering::Relaxed);
        let hint = bucket_safe(hint);
        let name = format!("{hint}-{}-{n}", self.run_id);
        if let Some(bucket) = &self.shared_bucket {
            return Dest {
                bucket: bucket.clone(),
                prefix: format!("nightcopy-test/{name}/"),
            };
        }
        // Created behind the proxy's back so that a test's request log holds only its own work.
        let created = self.block_on(self.direct.create_bucket().bucket(&name).send());
        if let Err(e) = created {
            panic!("cannot create bucket {name}: {}", DisplayErrorContext(&e));
        }
        Dest {
            bucket: name,
            prefix: String::new(),
        }
    }

    /// [`S3Server::dest`] with versioning on (moto).
    pub fn versioned_dest(&self, hint: &str) -> Dest {
        let dest = self.dest(hint);
        let status = aws_sdk_s3::types::VersioningConfiguration::builder()
            .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
            .build();
        let set = self.block_on(
            self.direct
                .put_bucket_versioning()
                .bucket(&dest.bucket)
                .versioning_configuration(status)
                .send(),
        );
        if let Err(e) = set {
            panic!(
                "cannot version {}: {}",
                dest.bucket,
                DisplayErrorContext(&e)
            );
        }
        dest
    }

    /// A bucket created with Object Lock enabled (and so versioned), as AWS requires (moto).
    pub fn locked_dest(&self, hint: &str) -> Dest {
        let n = self.next_dest.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{}-{n}", bucket_safe(hint), self.run_id);
        let created = self.block_on(
            self.direct
                .create_bucket()
                .bucket(&name)
                .object_lock_enabled_for_bucket(true)
                .send(),
        );
        if let Err(e) = created {
            panic!("cannot create bucket {name}: {}", DisplayErrorContext(&e));
        }
        Dest {
            bucket: name,
            prefix: String::new(),
        }
    }

    /// Environment for a child process (the nightcopy binary) so it finds these credentials and
    /// nothing from the developer's own AWS setup. The endpoint is not included: pass
    /// [`S3Server::endpoint`] the way the program under test expects it.
    pub fn env(&self) -> Vec<(String, String)> {
        let c = &self.credentials;
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", c.access_key_id().to_owned()),
            ("AWS_SECRET_ACCESS_KEY", c.secret_access_key().to_owned()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ];
        if let Some(token) = c.session_token() {
            env.push(("AWS_SESSION_TOKEN", token.to_owned()));
        }
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// A path-style client that goes through the proxy, so its requests are recorded like those
    /// of the code under test. A new client each call: a client's connection pool is bound to
    /// the runtime that first used it, and tests may bring their own runtime.
    pub fn client(&self) -> Client {
        self.client_for(&self.endpoint)
    }

    /// Like [`S3Server::client`] but straight to the server: for setup and checks that must not
    /// appear in [`S3Server::requests`].
    pub fn direct_client(&self) -> Client {
        self.client_for(&self.upstream)
    }

    fn client_for(&self, endpoint: &str) -> Client {
        make_client(endpoint, &self.region, &self.credentials)
    }

    /// Run `f` on the shared runtime, so a plain `#[test]` can call the SDK. Panics after five
    /// minutes rather than hang.
    ///
    /// Also works from inside an async test (tokio refuses a nested `block_on` on the calling
    /// thread, so it then runs on a helper thread); the calling task is blocked meanwhile.
    pub fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let run = || {
            self.runtime
                .block_on(async { tokio::time::timeout(BLOCK_ON_LIMIT, f).await })
                .unwrap_or_else(|_| panic!("block_on: no result after {BLOCK_ON_LIMIT:?}"))
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|scope| match scope.spawn(run).join() {
                Ok(output) => output,
                Err(panic) => std::panic::resume_unwind(panic),
            })
        } else {
            run()
        }
    }

    /// Fault requests to `dest`'s bucket as `plan` says (`None`: stop). External mode shares one
    /// bucket between tests, so faults are only for the local server.
    pub fn set_faults(&self, dest: &Dest, plan: Option<proxy::FaultPlan>) {
        self.proxy.set_faults(&dest.bucket, plan);
    }

    /// The most `op` requests to `dest`'s bucket that the proxy was answering at one time.
    pub fn peak_in_flight(&self, dest: &Dest, op: Op) -> usize {
        self.proxy.peak_in_flight(&dest.bucket, op)
    }

    /// What the proxy saw for `dest`, in arrival order, one entry per attempt (an SDK retry shows
    /// up twice): requests for its bucket, and in external mode only those whose key or list
    /// prefix lies under its prefix (bucket-level requests such as HeadBucket cannot be told
    /// apart there and are left out).
    ///
    /// Requests for nightcopy's own objects (the manifest's copy and snapshots under
    /// `.nightcopy/`) are left out: tests count the requests for files. [`S3Server::own_requests`] has those.
    pub fn requests(&self, dest: &Dest) -> Vec<Request> {
        self.requests_with_own(dest)
            .into_iter()
            .filter(|r| !is_own_request(dest, r))
            .collect()
    }

    /// The requests for nightcopy's own objects under `dest` (the manifest's copy, snapshots).
    pub fn own_requests(&self, dest: &Dest) -> Vec<Request> {
        self.requests_with_own(dest)
            .into_iter()
            .filter(|r| is_own_request(dest, r))
            .collect()
    }

    /// Every request for `dest`, nightcopy's own objects included.
    pub fn requests_with_own(&self, dest: &Dest) -> Vec<Request> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.bucket == dest.bucket)
            .filter(|r| {
                dest.prefix.is_empty()
                    || r.key.starts_with(&dest.prefix)
                    || r.query_param("prefix")
                        .is_some_and(|p| p.starts_with(&dest.prefix))
            })
            .collect()
    }

    /// [`S3Server::requests`] counted by operation.
    pub fn counts(&self, dest: &Dest) -> BTreeMap<Op, usize> {
        proxy::count(&self.requests(dest))
    }

    /// The s3s-fs log (its stdout and stderr), to read when a test fails in a puzzling way.
    /// `RUST_LOG` for the server comes from `NIGHTCOPY_S3S_LOG` (default `warn`). `None` in
    /// external mode.
    pub fn server_log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Every request the proxy has seen from any test of this binary.
    pub fn all_requests(&self) -> Vec<Request> {
        self.proxy.requests()
    }

    /// The keys of the files under the destination (nightcopy's own objects left out), full
    /// keys, sorted. Not recorded by the proxy.
    pub fn list_keys(&self, dest: &Dest) -> Vec<String> {
        let mut keys = self.list_all_keys(dest);
        keys.retain(|k| !is_own_key(dest, k));
        keys
    }

    /// Every key under the destination, nightcopy's own objects included.
    pub fn list_all_keys(&self, dest: &Dest) -> Vec<String> {
        let listed = self.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .direct
                .list_objects_v2()
                .bucket(&dest.bucket)
                .prefix(&dest.prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| DisplayErrorContext(e).to_string())?;
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
            }
            Ok::<_, String>(keys)
        });
        let mut keys = listed
            .unwrap_or_else(|e| panic!("cannot list s3://{}/{}: {e}", dest.bucket, dest.prefix));
        keys.sort();
        keys
    }

    /// Read back one object, `key` being the full key. Not recorded by the proxy.
    pub fn get(&self, dest: &Dest, key: &str) -> Object {
        let fetched = self.block_on(async {
            let output = self
                .direct
                .get_object()
                .bucket(&dest.bucket)
                .key(key)
                .checksum_mode(ChecksumMode::Enabled)
                .send()
                .await
                .map_err(|e| DisplayErrorContext(e).to_string())?;
            let metadata = output.metadata().cloned().unwrap_or_default();
            let checksum_sha256 = output.checksum_sha256().map(str::to_owned);
            let e_tag = output.e_tag().map(str::to_owned);
            let content_length = output.content_length().unwrap_or_default();
            let body = output
                .body
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_vec();
            Ok::<_, String>(Object {
                body,
                metadata: metadata.into_iter().collect(),
                checksum_sha256,
                content_length: u64::try_from(content_length).unwrap_or_default(),
                e_tag,
            })
        });
        fetched.unwrap_or_else(|e| panic!("cannot get s3://{}/{key}: {e}", dest.bucket))
    }
}

/// Whether `key` (full) is one of nightcopy's own objects under `dest`, not a file's.
fn is_own_key(dest: &Dest, key: &str) -> bool {
    key.strip_prefix(&dest.prefix)
        .is_some_and(nightcopy::keys::is_reserved)
}

/// Whether a request is for nightcopy's own objects: one of them, or a listing inside them (a
/// new snapshot's key is listed before it is written).
fn is_own_request(dest: &Dest, r: &Request) -> bool {
    match r.key.is_empty() {
        true => r
            .query_param("prefix")
            .is_some_and(|p| is_own_key(dest, &p)),
        false => is_own_key(dest, &r.key),
    }
}

fn make_client(endpoint: &str, region: &str, credentials: &Credentials) -> Client {
    // Bounded so that a wedged server fails a test rather than hanging it.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(60))
        .operation_timeout(Duration::from_secs(180))
        .build();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(credentials.clone())
        .endpoint_url(endpoint)
        .force_path_style(true)
        .timeout_config(timeouts)
        .build();
    Client::from_conf(config)
}

/// Where the tests' S3 requests go, and as whom.
struct Target {
    /// `http://host:port` of the server itself.
    endpoint: String,
    region: String,
    /// Set in external mode: the one bucket all tests share.
    shared_bucket: Option<String>,
    access_key: String,
    secret_key: String,
    session_token: Option<String>,
}

impl Target {
    /// External mode: a server someone else runs, configured from the environment.
    fn from_env(endpoint: String) -> Result<Target, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if !endpoint.starts_with("http://") {
            return Err(format!(
                "NIGHTCOPY_TEST_S3_ENDPOINT={endpoint}: only http:// endpoints work, because the \
                 counting proxy in front of the server speaks plain HTTP"
            ));
        }
        let missing =
            |name: &str| format!("NIGHTCOPY_TEST_S3_ENDPOINT is set, so {name} must be set too");
        Ok(Target {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            region: var("NIGHTCOPY_TEST_S3_REGION").unwrap_or_else(|| "us-east-1".to_owned()),
            shared_bucket: Some(
                var("NIGHTCOPY_TEST_S3_BUCKET")
                    .ok_or_else(|| missing("NIGHTCOPY_TEST_S3_BUCKET"))?,
            ),
            access_key: var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?,
            secret_key: var("AWS_SECRET_ACCESS_KEY")
                .ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }
}

/// An s3s-fs child process. Its state folder in the temp dir holds `data/` (one folder per
/// bucket) and `server.log`.
struct LocalServer {
    addr: SocketAddr,
    log: PathBuf,
}

pub(super) fn new_random_hex(bytes: usize) -> String {
    random_hex(bytes)
}

impl LocalServer {
    fn start(access_key: &str, secret_key: &str) -> Result<LocalServer, String> {
        let binary = s3s_fs_binary()?;
        sweep_stale_state_dirs();
        let state = std::env::temp_dir().join(format!(
            "{STATE_DIR_PREFIX}{}-{}",
            std::process::id(),
            random_hex(4)
        ));
        let data = state.join("data");
        std::fs::create_dir_all(&data)
            .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        let log = state.join("server.log");

        // The port is picked by binding and releasing it; another process could take it in
        // between, which shows up as s3s-fs exiting with "address in use": then try another.
        let mut last_error = String::new();
        for _ in 0..3 {
            let addr = free_port()?;
            match spawn(&binary, addr, access_key, secret_key, &data, &log)? {
                Started::Ready => return Ok(LocalServer { addr, log }),
                Started::PortTaken(message) => last_error = message,
            }
        }
        Err(last_error)
    }
}

fn s3s_fs_binary() -> Result<PathBuf, String> {
    let binary = match std::env::var_os("NIGHTCOPY_S3S_FS") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            // Same default as scripts/test-tools.sh.
            let cache = match std::env::var_os("NIGHTCOPY_TOOLS") {
                Some(dir) if !dir.is_empty() => PathBuf::from(dir),
                _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/nightcopy-tools"),
            };
            cache.join(format!("s3s-fs-{S3S_FS_VERSION}/bin/s3s-fs"))
        }
    };
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "the S3 test server s3s-fs {S3S_FS_VERSION} is not installed at {}: run \
             `scripts/test-tools.sh` (or `make test`, which runs it), or point NIGHTCOPY_S3S_FS at \
             the binary, or NIGHTCOPY_TEST_S3_ENDPOINT at another S3 server",
            binary.display()
        ))
    }
}

enum Started {
    Ready,
    PortTaken(String),
}

/// What the thread that owns the child reports back.
enum ChildEvent {
    SpawnFailed(io::Error),
    Spawned,
    Exited(io::Result<ExitStatus>),
}

fn spawn(
    binary: &Path,
    addr: SocketAddr,
    access_key: &str,
    secret_key: &str,
    data: &Path,
    log: &Path,
) -> Result<Started, String> {
    let log_file =
        std::fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| format!("cannot dup the log file: {e}"))?;
    let mut command = Command::new(binary);
    command
        .arg("--host")
        .arg(addr.ip().to_string())
        .arg("--port")
        .arg(addr.port().to_string())
        // On the command line because s3s-fs has no other way; they are fake per-run values.
        .arg("--access-key")
        .arg(access_key)
        .arg("--secret-key")
        .arg(secret_key)
        .arg(data)
        .env(
            "RUST_LOG",
            std::env::var("NIGHTCOPY_S3S_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: the closure only makes one async-signal-safe syscall, prctl.
    unsafe {
        command.pre_exec(|| {
            // The kernel sends this when the *thread* that forked the child exits, not the
            // process: hence the dedicated thread below that lives as long as the child.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)
        });
    }

    let (events, received) = mpsc::channel();
    std::thread::Builder::new()
        .name("s3s-fs".to_owned())
        .spawn(move || match command.spawn() {
            Err(e) => {
                let _ = events.send(ChildEvent::SpawnFailed(e));
            }
            Ok(mut child) => {
                let _ = events.send(ChildEvent::Spawned);
                // Blocks for the life of the test process; returning is fine only once the
                // child is gone.
                let status = child.wait();
                let _ = events.send(ChildEvent::Exited(status));
            }
        })
        .map_err(|e| format!("cannot start the s3s-fs thread: {e}"))?;

    match received.recv_timeout(START_TIMEOUT) {
        Ok(ChildEvent::Spawned) => {}
        Ok(ChildEvent::SpawnFailed(e)) => {
            return Err(format!("cannot run {}: {e}", binary.display()));
        }
        Ok(ChildEvent::Exited(_)) | Err(_) => {
            return Err(format!("{} did not start", binary.display()));
        }
    }

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(ChildEvent::Exited(status)) = received.try_recv() {
            let output = read_log(log);
            let message = format!(
                "{} exited during start-up ({}); its output ({}):\n{output}",
                binary.display(),
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                log.display()
            );
            return if output.contains("Address already in use") {
                Ok(Started::PortTaken(message))
            } else {
                Err(message)
            };
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(Started::Ready);
        }
        if Instant::now() > deadline {
            // The child stays behind until the test process exits (PDEATHSIG), which is soon:
            // every test using the server fails with this message.
            return Err(format!(
                "{} did not accept connections on {addr} within {START_TIMEOUT:?}; its output \
                 ({}):\n{}",
                binary.display(),
                log.display(),
                read_log(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(mut file) => {
            let _ = file.read_to_string(&mut text);
        }
        Err(e) => text = format!("(cannot read {}: {e})", path.display()),
    }
    text
}

fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// The data of a test binary's server is not removed at exit (statics are never dropped, and the
/// server is killed, not stopped). Instead each start removes the folders of test processes that
/// no longer run; the pid is part of the folder name.
fn sweep_stale_state_dirs() {
    sweep_stale_dirs(STATE_DIR_PREFIX);
}

/// Removes the temp folders named `<prefix><pid>-…` of test processes that no longer run.
pub(super) fn sweep_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A valid piece of a bucket name: lower-case letters, digits and single hyphens, at most 30
/// characters, never empty.
fn bucket_safe(hint: &str) -> String {
    let mut out = String::new();
    for c in hint.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= 30 {
            break;
        }
    }
    let out = out.trim_end_matches('-');
    if out.is_empty() {
        "test".to_owned()
    } else {
        out.to_owned()
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("cannot read /dev/urandom");
    hex::encode(buf)
}
