//! A counting HTTP/1.1 reverse proxy between the code under test and the S3 server, so tests can
//! assert which S3 requests a run made ("no DeleteObject ever", "an unchanged tree lists but never
//! PUTs") without trusting the client's own account of it.
//!
//! It forwards every request byte-for-byte in meaning: same method, path, query and headers —
//! including `Host`, which SigV4 signs, so the proxy must not rewrite it to the upstream's address.
//! Bodies are streamed both ways (multipart parts of many MiB pass through), never buffered.
//!
//! Every request goes through `handle`, which records it and then either forwards it or, when a
//! fault plan for its bucket says so, answers itself: a 503 SlowDown, a 500 InternalError, a
//! response cut off mid-body (the connection dies), or a stall. Plans are per bucket so tests
//! sharing the proxy do not disturb each other; the choice is deterministic per plan (a seeded
//! generator), so a failing run can be replayed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::percent_decode_str;

/// What the proxy answers with. Boxed so a forwarded upstream body and a body the proxy makes up
/// itself have one type.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The S3 operation a request is, as far as the proxy can tell from method, path and query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    ListObjectsV2,
    PutObject,
    CreateMultipartUpload,
    UploadPart,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
    HeadObject,
    GetObject,
    /// A thaw of an archived object (POST `?restore`).
    RestoreObject,
    DeleteObject,
    DeleteObjects,
    CreateBucket,
    HeadBucket,
    /// Anything else: ListBuckets, CopyObject, tagging, ACLs, DeleteBucket, …
    Other,
}

/// One request as the proxy saw it. Path-style addressing is assumed: the first path segment is
/// the bucket.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Raw, still percent-encoded.
    pub path: String,
    /// Raw query string without the `?`, still percent-encoded.
    pub query: String,
    /// Percent-decoded.
    pub bucket: String,
    /// Percent-decoded; empty for bucket-level requests.
    pub key: String,
    pub op: Op,
    /// Lower-case names, in arrival order. `authorization` and `x-amz-security-token` are left
    /// out so that printing a request never shows credentials.
    pub headers: Vec<(String, String)>,
    /// The access key id the request was signed with (from `Credential=` in the authorization
    /// header; the id is not a secret, the signature is).
    pub access_key_id: Option<String>,
    /// SHA-256 (hex) of the session token, so a test can check which token was used without the
    /// token itself ever being stored.
    pub session_token_sha256: Option<String>,
    /// When the proxy received it.
    pub at: std::time::Instant,
    /// The fault the proxy answered with instead of forwarding, if any.
    pub fault: Option<FaultKind>,
    /// The status the proxy answered with; `None` while the request is in flight, or if the
    /// client went away before an answer.
    pub status: Option<u16>,
}

impl Request {
    fn new(req: &hyper::Request<Incoming>) -> Request {
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let headers = req
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())));
        Request::from_parts(req.method().as_str(), path_and_query, headers)
    }

    /// Parse and classify a request from its method, origin-form target (`/bucket/key?query`) and
    /// headers. The proxy uses it for every request; tests can use it to check classification.
    pub fn from_parts<N, V>(
        method: &str,
        path_and_query: &str,
        headers: impl IntoIterator<Item = (N, V)>,
    ) -> Request
    where
        N: AsRef<str>,
        V: AsRef<str>,
    {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let (bucket, key) = match path.trim_start_matches('/').split_once('/') {
            Some((bucket, key)) => (decode(bucket), decode(key)),
            None => (decode(path.trim_start_matches('/')), String::new()),
        };
        let all: Vec<(String, String)> = headers
            .into_iter()
            .map(|(name, value)| {
                (
                    name.as_ref().to_ascii_lowercase(),
                    value.as_ref().to_owned(),
                )
            })
            .collect();
        let find = |n: &str| {
            all.iter()
                .find(|(name, _)| name == n)
                .map(|(_, v)| v.clone())
        };
        let access_key_id = find("authorization").and_then(|a| {
            let cred = a.split("Credential=").nth(1)?;
            Some(cred.split('/').next()?.to_owned())
        });
        let session_token_sha256 = find("x-amz-security-token").map(|t| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(t.as_bytes()))
        });
        let headers = all
            .into_iter()
            .filter(|(name, _)| !matches!(name.as_str(), "authorization" | "x-amz-security-token"))
            .collect();
        let mut request = Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            bucket,
            key,
            op: Op::Other,
            headers,
            access_key_id,
            session_token_sha256,
            at: std::time::Instant::now(),
            fault: None,
            status: None,
        };
        request.op = classify(&request);
        request
    }

    /// The decoded value of a query parameter; `Some("")` for a bare flag such as `?uploads`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_params()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value)
    }

    /// The value of a header (first one if repeated), by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.as_str())
    }

    fn query_params(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(name), decode(value))
            })
    }
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Classify by method, whether there is a key, and the query's sub-resource parameters. The Rust
/// SDK adds `x-id=<Operation>` to some requests; other clients do not, so it is not relied on.
///
/// Deletes are classified generously: any DELETE of a key that is not an abort or a tagging
/// removal counts as `DeleteObject`, so the append-only invariant cannot slip past through an
/// unusual query parameter.
fn classify(r: &Request) -> Op {
    let names: Vec<String> = r.query_params().map(|(name, _)| name).collect();
    let has = |name: &str| names.iter().any(|n| n == name);
    // Parameters that do not turn a request into a different operation.
    let plain = |allowed: &[&str]| {
        names
            .iter()
            .all(|n| n == "x-id" || n.starts_with("response-") || allowed.contains(&n.as_str()))
    };
    let copy = r.header("x-amz-copy-source").is_some();
    if r.bucket.is_empty() {
        return Op::Other;
    }
    if r.key.is_empty() {
        return match r.method.as_str() {
            "GET" if r.query_param("list-type").as_deref() == Some("2") => Op::ListObjectsV2,
            "POST" if has("delete") => Op::DeleteObjects,
            "PUT" if plain(&[]) => Op::CreateBucket,
            "HEAD" if plain(&[]) => Op::HeadBucket,
            _ => Op::Other,
        };
    }
    match r.method.as_str() {
        "PUT" if has("uploadId") && has("partNumber") && !copy => Op::UploadPart,
        "PUT" if plain(&[]) && !copy => Op::PutObject,
        "POST" if has("uploads") => Op::CreateMultipartUpload,
        "POST" if has("uploadId") => Op::CompleteMultipartUpload,
        "POST" if has("restore") => Op::RestoreObject,
        "DELETE" if has("uploadId") => Op::AbortMultipartUpload,
        "GET" if has("uploadId") && plain(&["uploadId", "part-number-marker", "max-parts"]) => {
            Op::ListParts
        }
        "DELETE" if !has("tagging") => Op::DeleteObject,
        "HEAD" if plain(&["versionId", "partNumber"]) => Op::HeadObject,
        "GET" if plain(&["versionId", "partNumber"]) => Op::GetObject,
        _ => Op::Other,
    }
}

/// How many requests of each kind; handy for `assert_eq!` against a small literal map.
pub fn count(requests: &[Request]) -> BTreeMap<Op, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts.entry(r.op).or_insert(0) += 1;
    }
    counts
}

/// A running proxy. It lives as long as the runtime it was started on.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    /// `http://host:port` of the real server, without a trailing slash.
    upstream: String,
    client: Client<HttpConnector, Incoming>,
    log: Mutex<Vec<Request>>,
    faults: Mutex<BTreeMap<String, FaultPlan>>,
    /// Per bucket and operation: requests being answered now, and the most there ever were.
    in_flight: Mutex<BTreeMap<(String, Op), (usize, usize)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// 503 with S3's SlowDown error: the client must back off.
    SlowDown,
    /// 500 InternalError.
    Internal,
    /// The upstream answer is cut after its headers: the connection dies mid-body.
    Reset,
    /// No answer for a long time: the client's timeout must fire.
    Stall,
    /// An S3 error answer with this status and code, for what the local server does not enforce
    /// (a policy that denies, a wrong region, a skewed clock).
    Refuse { status: u16, code: &'static str },
    /// A ranged GET answered with another ETag than the object's: what a server that ignores
    /// If-Match sends once the object was replaced. Other requests pass untouched.
    OtherETag,
}

/// Which requests of a bucket to fault: a share of them (0.0–1.0, deterministic from `seed`),
/// drawn from `kinds` in turn, optionally only for some operations.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub share: f64,
    pub kinds: Vec<FaultKind>,
    pub only: Option<Vec<Op>>,
    pub seed: u64,
    /// How long a stall lasts (the request is then forwarded).
    pub stall: std::time::Duration,
    /// Only requests whose key ends with this (a poison file).
    pub key_suffix: Option<String>,
    drawn: u64,
}

impl FaultPlan {
    pub fn new(share: f64, kinds: &[FaultKind], seed: u64) -> FaultPlan {
        FaultPlan {
            share,
            kinds: kinds.to_vec(),
            only: None,
            seed,
            stall: std::time::Duration::from_secs(60),
            key_suffix: None,
            drawn: 0,
        }
    }

    /// Faults only requests for keys ending in `suffix`.
    pub fn for_key(mut self, suffix: &str) -> FaultPlan {
        self.key_suffix = Some(suffix.to_owned());
        self
    }

    pub fn only(mut self, ops: &[Op]) -> FaultPlan {
        self.only = Some(ops.to_vec());
        self
    }

    pub fn stall_for(mut self, d: std::time::Duration) -> FaultPlan {
        self.stall = d;
        self
    }

    fn draw(&mut self, op: Op, key: &str) -> Option<FaultKind> {
        if self.only.as_ref().is_some_and(|ops| !ops.contains(&op)) || self.kinds.is_empty() {
            return None;
        }
        if self
            .key_suffix
            .as_ref()
            .is_some_and(|s| !key.ends_with(s.as_str()))
        {
            return None;
        }
        // splitmix64: a fixed sequence per seed.
        self.drawn += 1;
        let mut z = self
            .seed
            .wrapping_add(self.drawn.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        (unit < self.share).then(|| self.kinds[(z % self.kinds.len() as u64) as usize])
    }
}

impl Proxy {
    /// Listen on a free port of 127.0.0.1 and forward to `upstream` (`http://host:port`). The
    /// accept loop runs on `runtime`; the caller does not need to be inside it.
    pub fn start(runtime: &tokio::runtime::Handle, upstream: &str) -> std::io::Result<Proxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Idle upstream connections are dropped before any server's keep-alive timeout is likely
        // to close them: reusing one the server is closing would fail a request with a 502 here,
        // the SDK would retry it, and the log would show one request too many.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(4))
            .build(connector);
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client,
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(BTreeMap::new()),
            in_flight: Mutex::new(BTreeMap::new()),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(accept(listener, state.clone()));
        Ok(Proxy { addr, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fault the requests to `bucket` from now on as `plan` says; `None` stops faulting.
    pub fn set_faults(&self, bucket: &str, plan: Option<FaultPlan>) {
        let mut faults = self.state.faults.lock().unwrap();
        match plan {
            Some(p) => faults.insert(bucket.to_owned(), p),
            None => faults.remove(bucket),
        };
    }

    /// Every request seen so far, in arrival order. Each attempt counts: a request the client
    /// retried appears once per attempt, as the server saw it.
    pub fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    /// The most `op` requests to `bucket` that were being answered at one time.
    pub fn peak_in_flight(&self, bucket: &str, op: Op) -> usize {
        let in_flight = self.state.in_flight.lock().unwrap();
        in_flight.get(&(bucket.to_owned(), op)).map_or(0, |c| c.1)
    }
}

/// Counts a request in flight from its arrival until its answer's headers are ready.
struct InFlight {
    state: Arc<State>,
    key: (String, Op),
}

impl InFlight {
    fn new(state: &Arc<State>, bucket: &str, op: Op) -> InFlight {
        let key = (bucket.to_owned(), op);
        let mut all = state.in_flight.lock().unwrap();
        let c = all.entry(key.clone()).or_default();
        c.0 += 1;
        c.1 = c.1.max(c.0);
        InFlight {
            state: state.clone(),
            key,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = self.state.in_flight.lock().unwrap().get_mut(&self.key) {
            c.0 -= 1;
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the client will time out
                // and report it.
                eprintln!("test proxy: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            // An error here means the client hung up mid-exchange or sent garbage; the client
            // reports its own failure, so there is nothing useful to add.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut request = Request::new(&req);
    request.fault = state
        .faults
        .lock()
        .unwrap()
        .get_mut(&request.bucket)
        .and_then(|plan| plan.draw(request.op, &request.key));
    let stall = state
        .faults
        .lock()
        .unwrap()
        .get(&request.bucket)
        .map(|p| p.stall);
    let fault = request.fault;
    let _in_flight = InFlight::new(&state, &request.bucket, request.op);
    let index = {
        let mut log = state.log.lock().unwrap();
        log.push(request);
        log.len() - 1
    };
    let response = match fault {
        None => forward(&state, req).await,
        Some(FaultKind::SlowDown) => s3_error(503, "SlowDown", "Please reduce your request rate."),
        Some(FaultKind::Internal) => s3_error(
            500,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        Some(FaultKind::Refuse { status, code }) => {
            s3_error(status, code, "Refused by the test's fault plan.")
        }
        Some(FaultKind::Stall) => {
            tokio::time::sleep(stall.unwrap_or_default()).await;
            forward(&state, req).await
        }
        Some(FaultKind::OtherETag) => {
            let ranged = req.headers().contains_key(hyper::header::RANGE);
            let mut response = forward(&state, req).await;
            if ranged {
                response.headers_mut().insert(
                    hyper::header::ETAG,
                    "\"0123456789abcdef0123456789abcdef\"".parse().unwrap(),
                );
            }
            response
        }
        Some(FaultKind::Reset) => {
            // The request reaches the server; its answer is cut off after the headers.
            let (parts, _) = forward(&state, req).await.into_parts();
            let cut = http_body_util::StreamBody::new(futures::stream::once(async {
                Err::<hyper::body::Frame<Bytes>, BoxError>(
                    "connection cut by the fault plan".into(),
                )
            }));
            let mut parts = parts;
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            Response::from_parts(parts, BodyExt::boxed(cut))
        }
    };
    state.log.lock().unwrap()[index].status = Some(response.status().as_u16());
    Ok(response)
}

fn s3_error(status: u16, code: &str, message: &str) -> Response<Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>\
         <RequestId>fault-injected</RequestId></Error>"
    );
    let body = Full::new(Bytes::from(xml))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status");
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/xml".parse().unwrap(),
    );
    response
}

async fn forward(state: &State, mut req: hyper::Request<Incoming>) -> Response<Body> {
    let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let uri = match format!("{}{path_and_query}", state.upstream).parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => return bad_gateway(format!("cannot build upstream URI: {e}")),
    };
    // Only the URI changes. The `Host` header stays the client's (the legacy client adds one
    // from the URI only when it is missing), so the server checks the signature against the
    // host the client signed. `Expect: 100-continue` is answered by our server side when the
    // body is first read; the upstream's own 100 is skipped by the client side.
    *req.uri_mut() = uri;
    match state.client.request(req).await {
        Ok(response) => response.map(|b| b.map_err(BoxError::from).boxed()),
        Err(e) => bad_gateway(format!("upstream request failed: {e:?}")),
    }
}

fn bad_gateway(message: String) -> Response<Body> {
    let body = Full::new(Bytes::from(message))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
