//! The config file: typed, defaulted and strict, so that a typo is an error naming the key and the
//! line at install time (Ansible validates with `nightcopy check-config`), never a surprise at 2 AM.
//!
//! Values that can be wrong validate themselves as newtypes while the YAML is read, so their errors
//! carry a position too. Credentials are deliberately not configurable here: they come from the
//! SDK's default chain (the instance role on EC2).

mod classes;
mod excludes;
mod units;
mod url;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{de, Deserialize, Deserializer, Serialize};

pub use classes::{price, ClassRule, SmallFiles};
pub use excludes::Excludes;
pub use units::{HumanDuration, Size};
pub use url::{is_loopback, EndpointUrl};

pub const DEFAULT_PATH: &str = "/etc/nightcopy/config.yaml";

/// The environment variables the AWS SDK takes endpoints from, for the services nightcopy uses.
pub const ENDPOINT_VARIABLES: [&str; 4] = [
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_CLOUDWATCH",
    "AWS_ENDPOINT_URL_SQS",
];

/// S3's limits, which bound what the transfer section may ask for.
pub const MIN_PART_SIZE: u64 = 5 * Size::MIB;
pub const MAX_PART_SIZE: u64 = 5 * Size::GIB;
pub const MAX_SINGLE_PUT: u64 = 5 * Size::GIB;
pub const MAX_CONCURRENCY: usize = 256;
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * Size::GIB;
const MAX_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const MIN_BANDWIDTH: u64 = 64 * Size::KIB;
/// concurrency × part-size: the most memory multipart parts may hold (`upload::part_budget`).
const MAX_PART_BUDGET: u64 = 8 * Size::GIB;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub source: Source,
    pub destination: Destination,
    #[serde(default)]
    pub transfer: Transfer,
    #[serde(default = "default_state_dir")]
    pub state_dir: AbsPath,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub guard: Guard,
    /// A run with at most this many transfer errors still counts as a success (exit 0,
    /// LastSuccess=1): lets a permanently locked file be tolerated explicitly.
    #[serde(default)]
    pub success_max_errors: u64,
    /// Dead-man's-switch URL pinged after each run: as is on success, with `/fail` appended
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_url: Option<EndpointUrl>,
    /// Spread the uploads over workers through Amazon SQS (docs/scale-out.md): `nightcopy run`
    /// becomes the coordinator, `nightcopy worker` runs on the worker hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribute: Option<Distribute>,
    /// A secret shared by the coordinator and its workers (and by one host's runs over time):
    /// queue messages and the manifest's copy in the bucket are sealed with it and refused
    /// without it (auth.rs, docs/scale-out.md). A root- or user-owned file, mode 600 or stricter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key_file: Option<AbsPath>,
    /// The exclude list, compiled once when the config is loaded (200,000 globs take seconds).
    #[serde(skip)]
    compiled_excludes: Option<std::sync::Arc<Excludes>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Distribute {
    /// Where the coordinator sends batches of planned uploads, and workers take them from.
    pub queue_url: EndpointUrl,
    /// Where workers send one report per batch, and the coordinator collects them.
    pub results_queue_url: EndpointUrl,
    /// The work queue's dead-letter queue: batches that failed twice; the coordinator counts
    /// and names their files, `nightcopy dlq` shows and re-drives them.
    pub dead_letter_queue_url: EndpointUrl,
    /// Files per work message.
    #[serde(default = "default_batch_files")]
    pub batch_files: BatchFiles,
    /// Bytes per work message at most (a larger file goes alone).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: Size,
    /// How long after it starts the coordinator sends batches and waits for their reports;
    /// files not reported by then are transfer errors.
    #[serde(default = "default_deadline")]
    pub deadline: HumanDuration,
    /// Batches sent and not yet reported at most; the coordinator sends more as reports come.
    /// A stop or the deadline then leaves at most this many behind in the queue, and the
    /// results queue is drained while the walk goes on. The default, 10,000, keeps the backlog
    /// that Auto Scaling tracks (about 100 per worker) for up to 100 workers.
    #[serde(default = "default_max_queued")]
    pub max_queued: u64,
    /// What a worker asks for when it takes a batch, and extends while it works on it: a worker
    /// that dies gives its batch back after this long.
    #[serde(default = "default_visibility")]
    pub visibility_timeout: HumanDuration,
    /// The SQS endpoint, for tests and SQS-compatible services; omitted on AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<EndpointUrl>,
}

fn default_batch_files() -> BatchFiles {
    BatchFiles(20)
}
fn default_batch_bytes() -> Size {
    Size(Size::GIB)
}
fn default_deadline() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(6 * 3600))
}
fn default_max_queued() -> u64 {
    10_000
}
fn default_visibility() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(300))
}

/// Files in one work message, 1 to 100 (a message holds at most 256 KiB; 100 keys of 1,024
/// bytes and their paths fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BatchFiles(pub usize);

impl<'de> Deserialize<'de> for BatchFiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if !(1..=100).contains(&n) {
            return Err(de::Error::custom(format!("{n} is outside 1 to 100")));
        }
        Ok(BatchFiles(n as usize))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Metrics {
    /// Publish the six figures to CloudWatch at the end of every run.
    #[serde(default = "yes")]
    pub cloudwatch: bool,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Extra dimensions, e.g. {Environment: prod}. InstanceId is always added.
    #[serde(default)]
    pub dimensions: std::collections::BTreeMap<String, String>,
    /// The InstanceId dimension's value; default: from instance metadata, else the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Also write the figures as a Prometheus textfile (node_exporter's textfile collector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub textfile: Option<AbsPath>,
    /// The CloudWatch endpoint, for tests and CloudWatch-compatible services; omitted on AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<EndpointUrl>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            cloudwatch: true,
            namespace: default_namespace(),
            dimensions: Default::default(),
            instance_id: None,
            textfile: None,
            endpoint_url: None,
        }
    }
}

fn default_namespace() -> String {
    "Nightcopy".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Guard {
    /// A run is skipped (exit 75) when the last successful run started less than this ago, so the
    /// timer's catch-up after a reboot does not run the backup twice. `--force` overrides.
    #[serde(default = "default_min_interval")]
    pub min_interval: HumanDuration,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            min_interval: default_min_interval(),
        }
    }
}

fn default_min_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(20 * 3600))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Source {
    pub path: AbsPath,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_from: Option<AbsPath>,
    #[serde(default = "yes")]
    pub one_file_system: bool,
    /// Refuse to run when `path` is not a mount point: an empty mount point must never look like a
    /// successful backup of nothing.
    #[serde(default = "yes")]
    pub require_mountpoint: bool,
    #[serde(default)]
    pub symlinks: SymlinkPolicy,
    /// Larger files are not read: each is a transfer error naming this setting. S3 holds no
    /// object above 5TiB, the default; a sparse file is read and stored at its apparent size
    /// (S3 has no sparse objects), so lower this, or exclude them, to keep huge sparse files
    /// (VM images, core dumps) out.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: Size,
    /// Threads that read directories and stat files side by side. On a network or FUSE mount
    /// each metadata operation is a round trip, and this many are in flight at once; 1 walks
    /// one entry at a time.
    #[serde(default = "default_walk_concurrency")]
    pub walk_concurrency: Concurrency,
    /// Record extended attributes and POSIX ACLs in the night's snapshot (`xattrs.rs` says which):
    /// one `listxattr` per file and directory on the walk, and a `getxattr` per attribute — a
    /// round trip each on a network mount, so off unless asked for.
    #[serde(default)]
    pub xattrs: bool,
}

fn default_walk_concurrency() -> Concurrency {
    Concurrency(32)
}

fn default_max_file_size() -> Size {
    Size(MAX_OBJECT_SIZE)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SymlinkPolicy {
    /// Symlinks are counted and not stored: the default, because following them can leave the
    /// source tree or loop.
    #[default]
    Skip,
    /// Store what the link points to, as if it were the file itself.
    Follow,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Destination {
    pub bucket: BucketName,
    #[serde(default)]
    pub prefix: Prefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<EndpointUrl>,
    #[serde(default)]
    pub force_path_style: bool,
    /// Allow a plain-http endpoint-url that is not a loopback address. Off: a backup must never
    /// cross a network unencrypted by accident.
    #[serde(default)]
    pub allow_insecure_endpoint: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<StorageClass>,
    /// Files below a size go to another class (`classes`). Filled in from the storage class when
    /// absent; `below: 0` turns the rule off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub small_files: Option<SmallFiles>,
    /// A retain-until date on every object written (S3 Object Lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse: Option<Sse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse_kms_key_id: Option<String>,
}

impl Destination {
    /// The storage class of each object, by size.
    pub fn class_rule(&self) -> ClassRule {
        ClassRule {
            class: self.storage_class,
            small: self.small_files.filter(|s| s.below.0 > 0),
        }
    }
}

/// `destination.object-lock`: every object written is retained until `retain` after its upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectLock {
    pub mode: LockMode,
    pub retain: HumanDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LockMode {
    /// Users with s3:BypassGovernanceRetention can still shorten or remove the retention.
    Governance,
    /// Nobody, the root user included, can delete the object version before the date.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// The longest Object Lock retention S3 accepts is 100 years.
const MAX_RETENTION: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Transfer {
    #[serde(default = "default_concurrency")]
    pub concurrency: Concurrency,
    #[serde(default = "default_threshold")]
    pub multipart_threshold: Size,
    #[serde(default = "default_part_size")]
    pub part_size: Size,
    /// Bytes per second for uploaded data; 0 means unlimited.
    #[serde(default = "zero_size")]
    pub bandwidth_limit: Size,
    /// The longest one attempt of one request may take (a multipart part included) before it is
    /// abandoned and retried: what stops a stalled connection from hanging the run.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
}

pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn default_request_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_REQUEST_TIMEOUT)
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            concurrency: default_concurrency(),
            multipart_threshold: default_threshold(),
            part_size: default_part_size(),
            bandwidth_limit: zero_size(),
            request_timeout: default_request_timeout(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_state_dir() -> AbsPath {
    AbsPath(PathBuf::from("/var/lib/nightcopy"))
}
fn default_concurrency() -> Concurrency {
    Concurrency(16)
}
fn default_threshold() -> Size {
    Size(64 * Size::MIB)
}
fn default_part_size() -> Size {
    Size(16 * Size::MIB)
}
fn zero_size() -> Size {
    Size(0)
}

/// Why a config could not be used. Every variant names the file; most name the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config {path}: {source} (is the path right? set --config or NIGHTCOPY_CONFIG)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// The exclude list of a config that `parse` did not compile it for.
    #[error("{0}")]
    Excludes(String),
}

impl Config {
    /// Reads, parses and validates a config file, including the exclude list it names, and the
    /// endpoints the environment gives the SDK.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text, path)?;
        config
            .check_environment(|var| std::env::var(var).ok())
            .map_err(|message| ConfigError::Invalid {
                path: path.to_owned(),
                message,
            })?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut config: Config =
            serde_saphyr::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(invalid)?;
        let d = &mut config.destination;
        if d.small_files.is_none() {
            d.small_files = SmallFiles::default_for(d.storage_class);
        }
        config.compiled_excludes = Some(std::sync::Arc::new(
            config.compile_excludes().map_err(invalid)?,
        ));
        Ok(config)
    }

    /// Rules that span keys, section by section; single values were checked while parsing.
    fn validate(&self) -> Result<(), String> {
        self.transfer.validate()?;
        if let Some(d) = &self.distribute {
            d.validate()?;
        }
        self.source.validate()?;
        self.check_endpoints()?;
        self.destination.validate()?;
        if self.source.path.0 == self.state_dir.0
            || self.state_dir.0.starts_with(&self.source.path.0)
        {
            // Not fatal for correctness, but the manifest would be backed up while it is rewritten.
            tracing::debug!("state-dir lies inside the source tree");
        }
        self.metrics.validate()
    }

    /// Every endpoint nightcopy sends to: a request over plain http to another host shows its
    /// signed headers and session token to the network.
    fn check_endpoints(&self) -> Result<(), String> {
        let d = self.distribute.as_ref();
        for (key, url) in [
            ("destination.endpoint-url", &self.destination.endpoint_url),
            ("metrics.endpoint-url", &self.metrics.endpoint_url),
            ("heartbeat-url", &self.heartbeat_url),
            ("distribute.queue-url", &d.map(|d| d.queue_url.clone())),
            (
                "distribute.results-queue-url",
                &d.map(|d| d.results_queue_url.clone()),
            ),
            (
                "distribute.dead-letter-queue-url",
                &d.map(|d| d.dead_letter_queue_url.clone()),
            ),
            (
                "distribute.endpoint-url",
                &d.and_then(|d| d.endpoint_url.clone()),
            ),
        ] {
            if let Some(url) = url {
                self.check_transport(key, url)?;
            }
        }
        Ok(())
    }

    /// https, or plain http to loopback, unless `destination.allow-insecure-endpoint`.
    fn check_transport(&self, key: &str, url: &EndpointUrl) -> Result<(), String> {
        if url.is_encrypted_or_loopback() || self.destination.allow_insecure_endpoint {
            return Ok(());
        }
        Err(format!(
            "{key}: {} is plain http to a host that is not loopback: use https://, or set \
             destination.allow-insecure-endpoint: true if this network is trusted",
            url.redacted()
        ))
    }

    /// The endpoints the AWS SDK takes from the environment (`AWS_ENDPOINT_URL`,
    /// `AWS_ENDPOINT_URL_<SERVICE>`) obey the same rules as the config's: they are where the
    /// signed requests go. `env` is the process environment (a parameter, for tests). An
    /// endpoint from a profile's `endpoint_url` is checked when a request is about to be signed
    /// (`store::sdk::TransportGuard`).
    pub fn check_environment(&self, env: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        for var in ENDPOINT_VARIABLES {
            let Some(value) = env(var).filter(|v| !v.is_empty()) else {
                continue;
            };
            let url = EndpointUrl::new(&value).map_err(|e| format!("{var} (environment): {e}"))?;
            self.check_transport(&format!("{var} (environment)"), &url)?;
        }
        Ok(())
    }

    /// The compiled exclude set: inline patterns plus the `exclude-from` file.
    pub fn excludes(&self) -> Result<std::sync::Arc<Excludes>, ConfigError> {
        match &self.compiled_excludes {
            Some(e) => Ok(e.clone()),
            None => self
                .compile_excludes()
                .map(std::sync::Arc::new)
                .map_err(ConfigError::Excludes),
        }
    }

    fn compile_excludes(&self) -> Result<Excludes, String> {
        let mut patterns: Vec<(String, String)> = self
            .source
            .exclude
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), format!("source.exclude[{i}]")))
            .collect();
        if let Some(file) = &self.source.exclude_from {
            let text = std::fs::read_to_string(&file.0).map_err(|e| {
                format!(
                    "source.exclude-from: cannot read {}: {e} (create it, or remove the key)",
                    file.0.display()
                )
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim_end();
                if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
                    continue;
                }
                patterns.push((
                    line.to_owned(),
                    format!("{} line {}", file.0.display(), n + 1),
                ));
            }
        }
        // The top-level .nightcopy holds nightcopy's own objects in the bucket (the manifest):
        // a file there would take their keys.
        patterns.push((
            format!("/{}/**", crate::keys::RESERVED_DIR),
            "built-in (reserved for nightcopy's own objects)".into(),
        ));
        // Half-written files of a restore into the source tree are never backed up.
        patterns.push((
            ".nightcopy-restore-*.part".into(),
            "built-in (restore temp files)".into(),
        ));
        // The state directory, when inside the source, is never backed up: its manifest is being
        // rewritten during the run.
        if let Ok(rel) = self.state_dir.0.strip_prefix(&self.source.path.0) {
            if let Some(rel) = rel.to_str().filter(|r| !r.is_empty()) {
                patterns.push((
                    format!("/{}/**", globset::escape(rel)),
                    "state-dir (inside the source)".into(),
                ));
            }
        }
        Excludes::new(&patterns)
    }

    /// The key of `auth-key-file`, checked; `None` when none is configured.
    pub fn auth_key(&self) -> Result<Option<crate::auth::AuthKey>, crate::auth::KeyError> {
        self.auth_key_file
            .as_ref()
            .map(|p| crate::auth::AuthKey::load(&p.0))
            .transpose()
    }

    /// A stable name for where this config writes: the manifest is only trusted for the same one.
    pub fn destination_id(&self) -> String {
        let d = &self.destination;
        format!(
            "{}|{}|{}",
            d.endpoint_url.as_ref().map_or("aws", |u| u.0.as_str()),
            d.bucket.0,
            d.prefix.0
        )
    }
}

impl Transfer {
    /// S3's limits on parts and single uploads, a sane request timeout and bandwidth, and the
    /// memory multipart parts may hold at once.
    fn validate(&self) -> Result<(), String> {
        if self.part_size.0 < MIN_PART_SIZE || self.part_size.0 > MAX_PART_SIZE {
            return Err(format!(
                "transfer.part-size: {} is outside S3's limits: use 5MiB to 5GiB",
                self.part_size
            ));
        }
        let timeout = self.request_timeout.0;
        if timeout < std::time::Duration::from_secs(1) || timeout > MAX_REQUEST_TIMEOUT {
            return Err(format!(
                "transfer.request-timeout: {} is outside 1s to 24h (default 5min): it bounds one \
                 attempt of one request",
                humantime::format_duration(timeout)
            ));
        }
        let threshold = self.multipart_threshold.0;
        if !(MIN_PART_SIZE..=MAX_SINGLE_PUT).contains(&threshold) {
            return Err(format!(
                "transfer.multipart-threshold: {} is outside 5MiB to 5GiB (S3's smallest part and \
                 largest single upload; default 64MiB)",
                self.multipart_threshold
            ));
        }
        let bandwidth = self.bandwidth_limit.0;
        if bandwidth != 0 && bandwidth < MIN_BANDWIDTH {
            return Err(format!(
                "transfer.bandwidth-limit: {} is below 64KiB (per second): use 0 for no limit, \
                 or at least 64KiB",
                self.bandwidth_limit
            ));
        }
        let budget = (self.concurrency.0 as u64).saturating_mul(self.part_size.0);
        if budget > MAX_PART_BUDGET {
            return Err(format!(
                "transfer.concurrency × transfer.part-size is {} × {} = {}: that is the memory \
                 multipart parts may hold at once, and at most 8GiB is allowed: lower one of them",
                self.concurrency.0,
                self.part_size,
                Size(budget)
            ));
        }
        Ok(())
    }
}

impl Distribute {
    /// SQS's visibility limits, and a deadline and queue bound a run can work with.
    fn validate(&self) -> Result<(), String> {
        let v = self.visibility_timeout.0.as_secs();
        if !(30..=12 * 3600).contains(&v) {
            return Err(format!(
                "distribute.visibility-timeout: {} is outside 30s to 12h (SQS's limit)",
                humantime::format_duration(self.visibility_timeout.0)
            ));
        }
        if self.deadline.0 < std::time::Duration::from_secs(5) {
            return Err("distribute.deadline: at least 5s (default 6h)".into());
        }
        if self.max_queued == 0 {
            return Err("distribute.max-queued: at least 1 (default 10000)".into());
        }
        Ok(())
    }
}

impl Source {
    fn validate(&self) -> Result<(), String> {
        if self.max_file_size.0 > MAX_OBJECT_SIZE {
            return Err(format!(
                "source.max-file-size: {} is above S3's largest object, 5TiB",
                self.max_file_size
            ));
        }
        Ok(())
    }
}

impl Destination {
    /// A retention S3 takes, a KMS key only with aws:kms, a region that is a region's name.
    fn validate(&self) -> Result<(), String> {
        if let Some(lock) = &self.object_lock {
            let r = lock.retain.0;
            if r < std::time::Duration::from_secs(1) || r > MAX_RETENTION {
                return Err(format!(
                    "destination.object-lock.retain: {} is outside 1s to 100 years (e.g. 30d)",
                    humantime::format_duration(r)
                ));
            }
        }
        match (&self.sse, &self.sse_kms_key_id) {
            (Some(Sse::Kms), _) | (_, None) => {}
            (_, Some(_)) => {
                return Err(
                    "destination.sse-kms-key-id is set but destination.sse is not aws:kms: set sse: aws:kms or drop the key id"
                        .into(),
                )
            }
        }
        if let Some(r) = &self.region {
            let ok = !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(format!(
                    "destination.region: {r:?} is not a region name (e.g. us-east-1)"
                ));
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// What CloudWatch accepts as a namespace and as dimensions.
    fn validate(&self) -> Result<(), String> {
        if self.namespace.is_empty()
            || self.namespace.len() > 255
            || self.namespace.starts_with(':')
        {
            return Err(format!(
                "metrics.namespace: {:?} is not a CloudWatch namespace (1 to 255 characters, not starting with ':')",
                self.namespace
            ));
        }
        if self.dimensions.len() > 29 {
            return Err(
                "metrics.dimensions: at most 29 (CloudWatch allows 30, InstanceId is one)".into(),
            );
        }
        for (k, v) in &self.dimensions {
            if k == "InstanceId" {
                return Err("metrics.dimensions: InstanceId is added automatically; set metrics.instance-id to override its value".into());
            }
            if k.is_empty() || v.is_empty() || k.len() > 255 || v.len() > 1024 {
                return Err(format!("metrics.dimensions: {k:?}: {v:?} — names and values must be non-empty (name ≤ 255, value ≤ 1024 characters)"));
            }
        }
        Ok(())
    }
}

/// An absolute path; relative paths depend on the working directory, which a timer does not fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AbsPath(pub PathBuf);

impl<'de> Deserialize<'de> for AbsPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(de::Error::custom(format!(
                "{s:?} is not an absolute path: start it with /"
            )));
        }
        Ok(AbsPath(PathBuf::from(s)))
    }
}

/// A bucket name as S3 accepts it (general purpose buckets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BucketName(pub String);

impl BucketName {
    pub fn new(s: &str) -> Result<Self, String> {
        let allowed = "3 to 63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit";
        let b = s.as_bytes();
        let chars_ok = b
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
        let ends_ok = b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric);
        if !(3..=63).contains(&b.len()) || !chars_ok || !ends_ok {
            return Err(format!("{s:?} is not a valid bucket name: {allowed}"));
        }
        if s.contains("..") || s.contains(".-") || s.contains("-.") {
            return Err(format!(
                "{s:?} is not a valid bucket name: no '..', '.-' or '-.'"
            ));
        }
        if s.parse::<std::net::Ipv4Addr>().is_ok() {
            return Err(format!(
                "{s:?} is not a valid bucket name: it looks like an IP address"
            ));
        }
        Ok(BucketName(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for BucketName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BucketName::new(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// A key prefix: empty (the bucket root) or ending in `/`, never starting with `/` (S3 would keep
/// that slash as part of every key, which nobody means).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Prefix(pub String);

impl Prefix {
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Prefix(String::new()));
        }
        if s.starts_with('/') {
            return Err(format!(
                "{s:?} starts with '/': write it without, e.g. \"fs/\""
            ));
        }
        if !s.ends_with('/') {
            return Err(format!("{s:?} must end with '/', e.g. \"{s}/\""));
        }
        if s.contains("//") {
            return Err(format!("{s:?} contains an empty path segment '//'"));
        }
        if s.chars().any(char::is_control) {
            return Err(format!("{s:?} contains a control character"));
        }
        if s.len() > 512 {
            return Err(
                "a prefix of over 512 bytes leaves too little of S3's 1,024-byte key limit".into(),
            );
        }
        Ok(Prefix(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Prefix::new(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StorageClass {
    Standard,
    StandardIa,
    OnezoneIa,
    IntelligentTiering,
    GlacierIr,
    Glacier,
    DeepArchive,
    ReducedRedundancy,
}

impl StorageClass {
    pub const ALL: [StorageClass; 8] = [
        StorageClass::Standard,
        StorageClass::StandardIa,
        StorageClass::OnezoneIa,
        StorageClass::IntelligentTiering,
        StorageClass::GlacierIr,
        StorageClass::Glacier,
        StorageClass::DeepArchive,
        StorageClass::ReducedRedundancy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StorageClass::Standard => "STANDARD",
            StorageClass::StandardIa => "STANDARD_IA",
            StorageClass::OnezoneIa => "ONEZONE_IA",
            StorageClass::IntelligentTiering => "INTELLIGENT_TIERING",
            StorageClass::GlacierIr => "GLACIER_IR",
            StorageClass::Glacier => "GLACIER",
            StorageClass::DeepArchive => "DEEP_ARCHIVE",
            StorageClass::ReducedRedundancy => "REDUCED_REDUNDANCY",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Sse {
    #[serde(rename = "AES256")]
    Aes256,
    #[serde(rename = "aws:kms")]
    Kms,
}

impl Sse {
    pub fn as_str(self) -> &'static str {
        match self {
            Sse::Aes256 => "AES256",
            Sse::Kms => "aws:kms",
        }
    }
}

/// How many uploads (and multipart parts) are in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Concurrency(pub usize);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if n < 1 || n > MAX_CONCURRENCY as i64 {
            return Err(de::Error::custom(format!(
                "{n} is outside 1 to {MAX_CONCURRENCY}"
            )));
        }
        Ok(Concurrency(n as usize))
    }
}

/// The effective config as YAML, for `check-config`. The heartbeat URL's path is replaced: for
/// dead-man's-switch services it is the secret that lets anyone ping (or fail) the check.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.clone();
        if let Some(url) = &mut shown.heartbeat_url {
            if let Some((scheme, rest)) = url.0.split_once("://") {
                let host = rest.split('/').next().unwrap_or_default();
                url.0 = format!("{scheme}://{host}/<redacted>");
            }
        }
        match serde_saphyr::to_string(&shown) {
            Ok(s) => f.write_str(&s),
            Err(e) => write!(f, "# cannot render config: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "source:\n  path: /mnt/fs\ndestination:\n  bucket: my-backups\n";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/nightcopy/config.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.source.one_file_system);
        assert!(c.source.require_mountpoint);
        assert_eq!(c.source.symlinks, SymlinkPolicy::Skip);
        assert_eq!(c.destination.prefix.as_str(), "");
        assert_eq!(c.transfer.concurrency.0, 16);
        assert_eq!(c.transfer.multipart_threshold.0, 64 * Size::MIB);
        assert_eq!(c.transfer.part_size.0, 16 * Size::MIB);
        assert_eq!(c.transfer.bandwidth_limit.0, 0);
        assert_eq!(c.state_dir.0, PathBuf::from("/var/lib/nightcopy"));
    }

    #[test]
    fn extended_attributes_are_read_only_when_asked_for() {
        let base = "source:\n  path: /mnt/fs\ndestination:\n  bucket: b-1\n";
        assert!(!parse(base).unwrap().source.xattrs);
        let on = base.replace("/mnt/fs\n", "/mnt/fs\n  xattrs: true\n");
        assert!(parse(&on).unwrap().source.xattrs);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../config/nightcopy.example.yaml");
        // exclude-from names a file on the target host; check the rest.
        let text = text.replace("exclude-from: /etc/nightcopy/exclude.txt", "");
        let c = parse(&text).unwrap();
        assert_eq!(c.destination.storage_class, Some(StorageClass::StandardIa));
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let cases: &[(&str, &[&str])] = &[
            ("source:\n  path: /mnt/fs\n  pth: x\ndestination:\n  bucket: my-backups\n", &["pth", "line 3"]),
            ("source:\n  path: mnt/fs\ndestination:\n  bucket: my-backups\n", &["absolute", "line 2"]),
            ("source:\n  path: /mnt/fs\ndestination:\n  bucket: My_Bucket\n", &["My_Bucket", "bucket name", "line 4"]),
            ("source:\n  path: /mnt/fs\ndestination:\n  bucket: b-1\n  prefix: fs\n", &["end with '/'", "line 5"]),
            ("source:\n  path: /mnt/fs\ndestination:\n  bucket: b-1\ntransfer:\n  part-size: lots\n", &["not a size", "line 6"]),
            ("source:\n  path: /mnt/fs\ndestination:\n  bucket: b-1\ntransfer:\n  concurrency: 0\n", &["outside 1 to 256", "line 6"]),
            ("source:\n  path: /mnt/fs\ndestination:\n  bucket: b-1\n  storage-class: COLD\n", &["COLD", "line 5"]),
            ("source:\n  path: /mnt/fs\ndestination:\n  bucket: b-1\n  sse: rot13\n", &["rot13", "line 5"]),
        ];
        for (text, wants) in cases {
            let err = parse(text).unwrap_err();
            for want in *wants {
                assert!(err.contains(want), "{err:?} should mention {want:?}");
            }
        }
    }

    #[test]
    fn cross_key_rules() {
        let cases: &[(&str, &str)] = &[
            ("transfer:\n  part-size: 1MiB\n", "transfer.part-size"),
            (
                "transfer:\n  multipart-threshold: 6GiB\n",
                "transfer.multipart-threshold",
            ),
            (
                "source:\n  path: /mnt/fs\n  exclude: ['a[']\n",
                "source.exclude[0]",
            ),
            (
                "source:\n  path: /mnt/fs\n  exclude-from: /nonexistent/exclude.txt\n",
                "source.exclude-from",
            ),
        ];
        for (extra, want) in cases {
            let text = if extra.starts_with("source:") {
                format!("{extra}destination:\n  bucket: b-1\n")
            } else {
                format!("{MINIMAL}{extra}")
            };
            let err = parse(&text).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let kms = format!("{MINIMAL}  sse: AES256\n  sse-kms-key-id: k\n");
        assert!(parse(&kms).unwrap_err().contains("sse-kms-key-id"));
    }

    #[test]
    fn absurd_transfer_settings_are_refused_with_the_allowed_range() {
        let cases: &[(&str, &[&str])] = &[
            (
                "  request-timeout: 100000000000years\n",
                &["request-timeout", "1s to 24h"],
            ),
            (
                "  request-timeout: 25h\n",
                &["request-timeout", "1s to 24h"],
            ),
            ("  bandwidth-limit: 1\n", &["bandwidth-limit", "64KiB"]),
            (
                "  multipart-threshold: 0\n",
                &["multipart-threshold", "5MiB to 5GiB"],
            ),
            (
                "  concurrency: 256\n  part-size: 5GiB\n",
                &["256 × 5GiB = 1280GiB", "at most 8GiB"],
            ),
        ];
        for (extra, wants) in cases {
            let err = parse(&format!("{MINIMAL}transfer:\n{extra}")).unwrap_err();
            for want in *wants {
                assert!(
                    err.contains(want),
                    "{extra}: {err:?} should mention {want:?}"
                );
            }
        }
        for ok in [
            "  bandwidth-limit: 0\n",
            "  bandwidth-limit: 64KiB\n",
            "  concurrency: 32\n  part-size: 256MiB\n",
            "  request-timeout: 24h\n",
        ] {
            parse(&format!("{MINIMAL}transfer:\n{ok}")).unwrap();
        }
        let big =
            parse("source:\n  path: /mnt/fs\n  max-file-size: 6TiB\ndestination:\n  bucket: b-1\n")
                .unwrap_err();
        assert!(big.contains("max-file-size"), "{big}");
    }

    #[test]
    fn every_endpoint_is_held_to_the_transport_rule() {
        for (extra, want) in [
            (
                "  endpoint-url: http://127.0.0.1:80@other-host.invalid\n",
                "user name or password",
            ),
            (
                "  endpoint-url: http://[::1]@other-host.invalid:9000\n",
                "user name or password",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let err = parse(&format!(
            "{MINIMAL}heartbeat-url: http://hc.invalid/ping/secret-token\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("heartbeat-url") && err.contains("plain http"),
            "{err}"
        );
        assert!(!err.contains("secret-token"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}metrics:\n  endpoint-url: http://cw.invalid\n"
        ))
        .unwrap_err();
        assert!(err.contains("metrics.endpoint-url"), "{err}");

        let c = parse(MINIMAL).unwrap();
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        c.check_environment(env(&[("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")]))
            .unwrap();
        c.check_environment(env(&[("AWS_ENDPOINT_URL_S3", "https://s3.example.com")]))
            .unwrap();
        let err = c
            .check_environment(env(&[("AWS_ENDPOINT_URL_S3", "http://s3.invalid:9000")]))
            .unwrap_err();
        assert!(err.contains("AWS_ENDPOINT_URL_S3 (environment)"), "{err}");
        let err = c
            .check_environment(env(&[("AWS_ENDPOINT_URL", "http://127.0.0.1@s3.invalid")]))
            .unwrap_err();
        assert!(err.contains("AWS_ENDPOINT_URL (environment)"), "{err}");
    }

    #[test]
    fn a_state_dir_inside_the_source_is_excluded() {
        let c = parse(
            "source:\n  path: /srv\ndestination:\n  bucket: b-1\nstate-dir: /srv/.state [x]\n",
        )
        .unwrap();
        let ex = c.excludes().unwrap();
        assert!(ex.is_excluded(Path::new(".state [x]"), true));
        assert!(!ex.is_excluded(Path::new(".state x"), true));
        assert!(!ex.is_excluded(Path::new("other"), true));
        assert!(ex.is_excluded(Path::new("d/.nightcopy-restore-12-3.part"), false));
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        let with = |url: &str, allow: bool| {
            format!("{MINIMAL}  endpoint-url: {url}\n  allow-insecure-endpoint: {allow}\n")
        };
        for (url, ok) in [
            ("https://s3.example.com", true),
            ("http://127.0.0.1:9000", true),
            ("http://127.8.9.10", true),
            ("http://localhost:9000/", true),
            ("http://[::1]:9000", true),
            ("http://10.0.0.5:9000", false),
            ("http://s3.internal", false),
            ("http://127.0.0.1.evil.example", false),
        ] {
            assert_eq!(parse(&with(url, false)).is_ok(), ok, "{url}");
            assert!(
                parse(&with(url, true)).is_ok(),
                "{url} with allow-insecure-endpoint"
            );
        }
        let err = parse(&with("http://10.0.0.5", false)).unwrap_err();
        assert!(
            err.contains("destination.endpoint-url") && err.contains("allow-insecure-endpoint"),
            "{err}"
        );
    }

    proptest::proptest! {
        // The loader never panics, whatever the bytes: every input is a config or an error.
        #[test]
        fn loader_never_panics(text in "\\PC{0,400}") {
            let _ = parse(&text);
        }

        #[test]
        fn loader_never_panics_on_near_valid_yaml(
            key in "[a-z-]{1,20}",
            value in "\\PC{0,40}",
        ) {
            let _ = parse(&format!("{MINIMAL}transfer:\n  {key}: {value}\n"));
            let _ = parse(&format!("source:\n  path: /x\n  {key}: {value}\ndestination:\n  bucket: b-1\n"));
        }
    }

    #[test]
    fn bucket_names() {
        for ok in ["abc", "my-backups", "a.b.c", "0abc9", &"a".repeat(63)] {
            assert!(BucketName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "Abc",
            "a_b",
            "-ab",
            "ab-",
            "a..b",
            "a.-b",
            "192.168.1.1",
            &"a".repeat(64),
            "",
        ] {
            assert!(BucketName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        for (p, ok) in [
            ("", true),
            ("fs/", true),
            ("a/b/", true),
            ("fs", false),
            ("/fs/", false),
            ("a//b/", false),
            ("a\n/", false),
        ] {
            assert_eq!(Prefix::new(p).is_ok(), ok, "{p:?}");
        }
    }

    #[test]
    fn effective_config_hides_the_heartbeat_token() {
        let c = parse(&format!(
            "{MINIMAL}heartbeat-url: https://hc.example/ping/5e3a-secret\n"
        ))
        .unwrap();
        let shown = c.to_string();
        assert!(!shown.contains("5e3a-secret"), "{shown}");
        assert!(shown.contains("https://hc.example/<redacted>"), "{shown}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = parse(MINIMAL).unwrap();
        let again = parse(&c.to_string()).unwrap();
        assert_eq!(again.destination.bucket, c.destination.bucket);
        assert_eq!(again.transfer.part_size, c.transfer.part_size);
    }
}
