//! The object store as nightcopy needs it: list, put, multipart, head, get (and the version
//! listing restore uses for `--as-of`, and the thaw of an archived object restore asks for with
//! `--thaw`) — and deliberately no delete of any kind, so no code path, flag or future change can
//! send one without first changing this trait. (AbortMultipartUpload discards the parts of an
//! upload this run started; it cannot touch a stored object. RestoreObject makes a temporary
//! readable copy of an archived object; the object itself stays as it is.)
//!
//! One trait, so that unit tests run against `memory`, an in-memory implementation with operation
//! counters (the integration tests count and fail requests at an HTTP proxy in front of a real S3
//! API server instead); `s3` is the real client, and `sdk` loads the AWS SDK's configuration and
//! proves credentials before anything is read.

pub mod bucket;
pub mod memory;
pub mod s3;
pub mod sdk;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

use crate::config::StorageClass;

/// One object of the bucket listing, its key relative to the destination prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteObject {
    pub key: String,
    pub size: u64,
    /// The upload time (S3's LastModified), not the file's mtime.
    pub last_modified_ns: i64,
    /// The class the listing names (`None`: none said, which is STANDARD, or one nightcopy does
    /// not know). Restore counts the cold ones from it before anything is downloaded.
    pub storage_class: Option<StorageClass>,
}

/// The storage class of an S3 name (`DEEP_ARCHIVE`); `None` for a name nightcopy does not know.
pub fn storage_class_named(name: &str) -> Option<StorageClass> {
    StorageClass::ALL.into_iter().find(|c| c.as_str() == name)
}

/// What the S3 error means for the run. Per-file errors are counted; the rest end the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request failed for this object (bad digest, a rejected key, retries used up on a
    /// transient error): count it and go on.
    PerObject,
    /// No credentials, access denied, bucket missing, endpoint unreachable: nothing else can work.
    Fatal,
}

/// What an error means, for the code that acts on it: S3's string codes are read once, in the
/// store, and everything above matches on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// S3 received other bytes than the SHA-256 we sent says (BadDigest, InvalidDigest): the
    /// file changed between our read and the upload's.
    DigestMismatch,
    /// A download's bytes do not match the checksum S3 stored with the object.
    ChecksumMismatch,
    /// The server does not implement the operation (e.g. ListObjectVersions).
    NotImplemented,
    /// No credentials could be loaded: the request was never built.
    NoCredentials,
    /// The credentials were rejected (unknown key, bad signature, expired token).
    BadCredentials,
    AccessDenied,
    NoSuchBucket,
    /// The bucket lives in another region than the one signed for.
    WrongRegion,
    /// The host's clock is too far off for S3 to accept a signature.
    ClockSkew,
    /// The endpoint refuses the configured storage class.
    StorageClass,
    /// The KMS key cannot be used.
    Kms,
    /// No connection to the endpoint (DNS, refused, timeout before an answer).
    Unreachable,
    /// The endpoint's TLS certificate was refused (unknown CA, another name, expired).
    Tls,
    /// The endpoint asked to slow down, on every attempt (SlowDown, 503).
    Throttled,
    /// The request would have gone over plain http to a host that is not loopback, and was not
    /// sent (`sdk::TransportGuard`).
    InsecureEndpoint,
    /// The multipart upload is gone (completed, aborted, or expired by a lifecycle rule).
    NoSuchUpload,
    /// The object is archived (GLACIER, DEEP_ARCHIVE, an Intelligent-Tiering archive tier) and
    /// cannot be read until it is thawed with RestoreObject (InvalidObjectState; a 403 for the
    /// archive tiers). One object's state, never the run's.
    Cold,
    Other,
}

impl ErrorKind {
    /// The kind of an S3 error code.
    pub fn of_code(code: &str) -> ErrorKind {
        match code {
            "BadDigest" | "InvalidDigest" => ErrorKind::DigestMismatch,
            "NotImplemented" => ErrorKind::NotImplemented,
            "NoSuchBucket" => ErrorKind::NoSuchBucket,
            "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => ErrorKind::AccessDenied,
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken" => {
                ErrorKind::BadCredentials
            }
            "RequestTimeTooSkewed" => ErrorKind::ClockSkew,
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException" => ErrorKind::Throttled,
            "InvalidStorageClass" => ErrorKind::StorageClass,
            "NoSuchUpload" => ErrorKind::NoSuchUpload,
            "InvalidObjectState" => ErrorKind::Cold,
            "AuthorizationHeaderMalformed"
            | "PermanentRedirect"
            | "IllegalLocationConstraintException" => ErrorKind::WrongRegion,
            c if c.starts_with("KMS.") => ErrorKind::Kms,
            _ => ErrorKind::Other,
        }
    }

    /// Whether nothing else can work either once this happened (every request would meet it).
    pub fn ends_the_run(self) -> bool {
        !matches!(
            self,
            ErrorKind::DigestMismatch
                | ErrorKind::ChecksumMismatch
                | ErrorKind::NotImplemented
                | ErrorKind::Throttled
                | ErrorKind::NoSuchUpload
                | ErrorKind::Cold
                | ErrorKind::Other
        )
    }

    /// What to do about it, for the one-line message; empty where the error says it all.
    pub fn advice(self) -> &'static str {
        match self {
            ErrorKind::NoCredentials => {
                "could not build the request — usually no AWS credentials: on EC2 attach an \
                 instance role (IMDSv2 reachable); elsewhere set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            }
            ErrorKind::Unreachable => {
                "cannot reach the endpoint: check destination.endpoint-url / region and the network"
            }
            ErrorKind::Tls => {
                "the endpoint's TLS certificate was refused: check that the endpoint's name \
                 matches its certificate and that the CA is trusted (the system's CA bundle, or \
                 SSL_CERT_FILE)"
            }
            ErrorKind::Throttled => {
                "S3 asked to slow down on every attempt: lower transfer.concurrency or set \
                 transfer.bandwidth-limit; the file is tried again next run"
            }
            ErrorKind::InsecureEndpoint => {
                "nothing was sent: the endpoint is plain http to a host that is not loopback"
            }
            ErrorKind::NoSuchBucket => {
                "the bucket does not exist: create it or correct destination.bucket"
            }
            ErrorKind::AccessDenied => {
                "access denied: the instance role needs s3:ListBucket on the bucket and \
                 s3:PutObject on the prefix to back up, s3:GetObject to verify or restore \
                 (plus s3:ListBucketVersions and s3:GetObjectVersion for --as-of, and \
                 s3:RestoreObject for restore --thaw: the restore policy, \
                 packaging/aws/iam-restore-policy.json) (docs/operations.md)"
            }
            ErrorKind::BadCredentials => {
                "the credentials were rejected: check the instance role or the keys in the environment"
            }
            ErrorKind::ClockSkew => {
                "this host's clock is more than 15 minutes off: fix time sync (chrony/NTP) and rerun"
            }
            ErrorKind::StorageClass => {
                "the endpoint does not accept this storage class: change destination.storage-class"
            }
            ErrorKind::Kms => {
                "the KMS key cannot be used: check destination.sse-kms-key-id and the role's kms:GenerateDataKey permission"
            }
            ErrorKind::WrongRegion => {
                "the bucket is in another region: set destination.region to the bucket's region"
            }
            ErrorKind::DigestMismatch
            | ErrorKind::ChecksumMismatch
            | ErrorKind::NotImplemented
            | ErrorKind::NoSuchUpload
            | ErrorKind::Cold
            | ErrorKind::Other => "",
        }
    }
}

/// A failed request. Whether it ends the command follows from its kind
/// ([`ErrorKind::ends_the_run`]), so the two cannot disagree; only [`StoreError::into_fatal`]
/// makes an error fatal that its kind alone would not.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub kind: ErrorKind,
    pub message: String,
    /// Fatal whatever the kind (`into_fatal`).
    escalated: bool,
}

impl StoreError {
    pub fn new(kind: ErrorKind, message: String) -> StoreError {
        StoreError {
            kind,
            message,
            escalated: false,
        }
    }

    /// A per-object error of kind `Other`: a local problem or a reply that makes no sense.
    pub fn per_object(message: String) -> StoreError {
        StoreError::new(ErrorKind::Other, message)
    }

    /// What the error means for the command: its kind's, unless it was made fatal.
    pub fn class(&self) -> ErrorClass {
        match self.escalated || self.kind.ends_the_run() {
            true => ErrorClass::Fatal,
            false => ErrorClass::PerObject,
        }
    }

    pub fn is_fatal(&self) -> bool {
        self.class() == ErrorClass::Fatal
    }

    /// The same error, made fatal: a listing that fails half way leaves the rest unknown.
    pub fn into_fatal(self) -> StoreError {
        StoreError {
            escalated: true,
            ..self
        }
    }
}

pub struct ListPage {
    pub objects: Vec<RemoteObject>,
    pub next: Option<String>,
}

/// Object metadata nightcopy writes: enough to restore mtime, mode and ownership exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub raw_path: Option<String>,
}

pub const META_MTIME: &str = "nightcopy-mtime-ns";
pub const META_MODE: &str = "nightcopy-mode";
pub const META_UID: &str = "nightcopy-uid";
pub const META_GID: &str = "nightcopy-gid";
pub const META_RAW_PATH: &str = "nightcopy-raw-path";
/// rclone's modification time (Unix seconds with nine decimals): written beside nightcopy's own,
/// so that `rclone copy` from the bucket restores mtimes too, and read when nightcopy's is absent
/// (a bucket filled by rclone; docs/keys.md).
pub const META_RCLONE_MTIME: &str = "mtime";

impl ObjectMeta {
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            (META_MTIME.to_owned(), self.mtime_ns.to_string()),
            (META_MODE.to_owned(), format!("{:o}", self.mode)),
            (META_UID.to_owned(), self.uid.to_string()),
            (META_GID.to_owned(), self.gid.to_string()),
        ]);
        if let Some(raw) = &self.raw_path {
            m.insert(META_RAW_PATH.to_owned(), raw.clone());
        }
        m.insert(
            META_RCLONE_MTIME.to_owned(),
            format!(
                "{}.{:09}",
                self.mtime_ns.div_euclid(1_000_000_000),
                self.mtime_ns.rem_euclid(1_000_000_000)
            ),
        );
        m
    }

    /// rclone's `mtime` (`1614834367.123456789`), in nanoseconds.
    pub fn rclone_mtime(m: &HashMap<String, String>) -> Option<i64> {
        let text = m.get(META_RCLONE_MTIME)?;
        let (secs, frac) = text.split_once('.').unwrap_or((text, "0"));
        let secs: i64 = secs.parse().ok()?;
        let digits: String = frac.chars().take(9).collect();
        if !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let nanos: i64 = format!("{digits:0<9}").parse().ok()?;
        secs.checked_mul(1_000_000_000)?.checked_add(nanos)
    }

    pub fn from_map(m: &HashMap<String, String>) -> Option<ObjectMeta> {
        Some(ObjectMeta {
            mtime_ns: m.get(META_MTIME)?.parse().ok()?,
            mode: u32::from_str_radix(m.get(META_MODE)?, 8).ok()?,
            uid: m.get(META_UID)?.parse().ok()?,
            gid: m.get(META_GID)?.parse().ok()?,
            raw_path: m.get(META_RAW_PATH).cloned(),
        })
    }
}

/// The bytes of a single PUT. Small files travel in memory; larger ones are re-read by the SDK
/// (which can then retry them) from the file nightcopy opened and checked — never reopened by
/// path — and checked by S3 against the SHA-256 of the first read.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Bytes),
    File {
        file: std::sync::Arc<std::fs::File>,
        len: u64,
    },
}

#[derive(Debug, Clone)]
pub struct PutRequest {
    pub key: String,
    pub body: Body,
    /// SHA-256 of the body; S3 verifies it on receipt and rejects the upload if it differs.
    pub sha256: [u8; 32],
    pub meta: ObjectMeta,
    /// `None`: the bucket's default (STANDARD).
    pub storage_class: Option<StorageClass>,
}

/// One part of an unfinished multipart upload, as ListParts reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub number: i32,
    pub size: u64,
    pub etag: String,
    /// The SHA-256 S3 verified when the part arrived; `None` when the server keeps none (then the
    /// ETag, if it is a plain MD5, is what the part can be checked by).
    pub sha256: Option<[u8; 32]>,
}

/// Whether the bucket keeps old versions of an overwritten object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Versioning {
    Enabled,
    /// Was on, now off: new overwrites replace the current version.
    Suspended,
    /// Never turned on.
    Off,
}

#[derive(Debug, Clone)]
pub struct CompletedPart {
    pub number: i32,
    pub etag: String,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct HeadInfo {
    pub size: u64,
    pub meta: HashMap<String, String>,
    pub checksum_sha256: Option<String>,
    /// The MD5 the ETag is, when it is one (see [`etag_md5`]).
    pub etag_md5: Option<[u8; 16]>,
    /// The current version's id, where the bucket keeps versions ([`version_id`]).
    pub version_id: Option<String>,
    /// Where the object lies when it is archived, and its thaw.
    pub archive: Archive,
}

/// What HEAD says of an object that may be archived: its class (`x-amz-storage-class`), the
/// Intelligent-Tiering archive tier it is in (`x-amz-archive-status`), and its thaw
/// (`x-amz-restore`). All `None` for an object in STANDARD that was never thawed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archive {
    pub class: Option<StorageClass>,
    pub tier: Option<ArchiveTier>,
    pub thaw: Option<Thaw>,
}

/// The archive tiers of INTELLIGENT_TIERING, where an object is as cold as in GLACIER or
/// DEEP_ARCHIVE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveTier {
    ArchiveAccess,
    DeepArchiveAccess,
}

impl ArchiveTier {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveTier::ArchiveAccess => "ARCHIVE_ACCESS",
            ArchiveTier::DeepArchiveAccess => "DEEP_ARCHIVE_ACCESS",
        }
    }
}

/// A thaw S3 knows of (`x-amz-restore`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thaw {
    /// `ongoing-request="true"`: requested, not done yet.
    Running,
    /// `ongoing-request="false"`: a readable copy exists, until `expiry` (as S3 wrote it; none
    /// for an Intelligent-Tiering object, which moved back to its Frequent Access tier).
    Done { expiry: Option<String> },
}

/// The value of `x-amz-restore` (`ongoing-request="false", expiry-date="Fri, 21 Dec 2012
/// 00:00:00 GMT"`). A header that is there but says neither is taken as a thaw still running:
/// it means S3 holds a thaw request for the object, and asking again would be a second one.
pub fn parse_restore_header(value: &str) -> Thaw {
    let mut ongoing = None;
    let mut expiry = None;
    let mut rest = value.trim();
    while let Some((name, after)) = rest.split_once('=') {
        let name = name
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((v, next)) => (v, next),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        match name.as_str() {
            "ongoing-request" => ongoing = Some(v.trim().to_ascii_lowercase()),
            "expiry-date" => expiry = Some(v.trim().to_owned()),
            _ => {}
        }
        rest = next;
    }
    match ongoing.as_deref() {
        Some("false") => Thaw::Done {
            expiry: expiry.filter(|e| !e.is_empty()),
        },
        _ => Thaw::Running,
    }
}

/// How fast, and at what price, an archived object is thawed (RestoreObject's retrieval tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ThawTier {
    #[default]
    Bulk,
    Standard,
    Expedited,
}

impl ThawTier {
    pub const ALL: [ThawTier; 3] = [ThawTier::Bulk, ThawTier::Standard, ThawTier::Expedited];

    /// As on the command line (`--thaw-tier bulk`).
    pub fn as_str(self) -> &'static str {
        match self {
            ThawTier::Bulk => "bulk",
            ThawTier::Standard => "standard",
            ThawTier::Expedited => "expedited",
        }
    }

    pub fn parse(name: &str) -> Option<ThawTier> {
        ThawTier::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// What a thaw request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThawRequest {
    /// S3 accepted it (202, or 200 for an object already thawed, whose copy is kept longer).
    Sent,
    /// A thaw of the object was already running (409 RestoreAlreadyInProgress): nothing new.
    AlreadyRunning,
}

/// The most bytes of a version id nightcopy records (S3's are 32; other servers' differ).
pub const MAX_VERSION_BYTES: usize = 1024;

/// Whether `id` is a version id nightcopy records: non-empty printable ASCII (no tab or other
/// control character, so it fits a manifest line and a snapshot entry as it is), at most
/// [`MAX_VERSION_BYTES`].
pub fn is_version_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_VERSION_BYTES
        && id.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// The version id a reply names, as nightcopy records it: `None` when there is none, when it is
/// `null` — what a bucket without versioning, or with versioning suspended, answers; such a
/// version is replaced by the next PUT of the key, so it protects nothing — and when it is not
/// one [`is_version_id`] accepts (said at debug level).
pub fn version_id(raw: Option<String>) -> Option<String> {
    let id = raw.filter(|v| v != "null")?;
    if is_version_id(&id) {
        return Some(id);
    }
    tracing::debug!(
        "a version id that is not printable ASCII of at most {MAX_VERSION_BYTES} bytes was \
         not recorded: {}",
        crate::keys::shown(&id)
    );
    None
}

/// The body of a download, chunk by chunk as it arrives: nothing holds a whole object.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// An object being downloaded: what S3 said about it, then its bytes.
pub struct Download {
    pub size: u64,
    pub meta: HashMap<String, String>,
    /// As S3 reports it (base64); `…-N` is a multipart object's composite checksum, not the
    /// SHA-256 of the body.
    pub checksum_sha256: Option<String>,
    /// The MD5 the ETag is, when it is one (see [`etag_md5`]).
    pub etag_md5: Option<[u8; 16]>,
    /// The ETag as sent: a ranged GET of the rest of an unversioned object names it (If-Match),
    /// so that every range is of the bytes this download began with.
    pub etag: Option<String>,
    pub body: BodyStream,
}

/// The MD5 of an object's bytes, from its ETag, when the ETag is one: a single-part upload that
/// S3 did not encrypt with KMS (or a customer key). A multipart ETag (`…-N`) is not.
pub fn etag_md5(etag: Option<&str>, kms_or_customer_key: bool) -> Option<[u8; 16]> {
    if kms_or_customer_key {
        return None;
    }
    let hex_text = etag?.trim_matches('"');
    if hex_text.len() != 32 {
        return None;
    }
    hex::decode(hex_text).ok()?.try_into().ok()
}

/// One entry of ListObjectVersions: a version of an object, or a delete marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// Relative to the listed prefix, like [`ListPage`]'s keys.
    pub key: String,
    pub version_id: String,
    pub size: u64,
    pub last_modified_ns: i64,
    /// A delete marker: the key did not exist from this time on (until a later version).
    pub delete_marker: bool,
}

/// Where ListObjectVersions goes on (its KeyMarker and VersionIdMarker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionMarker {
    pub key: String,
    pub version_id: String,
}

pub struct VersionPage {
    /// In key order; the entries of one key newest first, versions and delete markers together.
    pub versions: Vec<ObjectVersion>,
    pub next: Option<VersionMarker>,
}

/// How a multipart object was cut: enough to recompute its composite checksum from the bytes
/// when every part but the last has the first part's size (as nightcopy uploads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLayout {
    pub parts: u32,
    pub first_part_size: u64,
}

pub trait ObjectStore: Send + Sync + 'static {
    /// One page of ListObjectsV2 under `prefix`, keys returned relative to it, in key order.
    /// `start_after` (relative to `prefix`, first page only) begins the listing after that key,
    /// so that key ranges of one listing can be fetched side by side.
    fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        continuation: Option<String>,
    ) -> impl Future<Output = Result<ListPage, StoreError>> + Send;

    /// Stores one object; returns the version S3 gave it, where the bucket keeps versions
    /// ([`version_id`]: none for an unversioned or suspended bucket).
    fn put(
        &self,
        req: PutRequest,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Starts a multipart upload with SHA-256 part checksums; returns the upload id.
    fn create_multipart(
        &self,
        key: &str,
        meta: &ObjectMeta,
        storage_class: Option<StorageClass>,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// The parts an unfinished upload holds, in part order (all pages: S3 allows at most 10,000
    /// parts, so this is bounded); `Ok(None)` when the upload no longer exists.
    fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<Option<Vec<ListedPart>>, StoreError>> + Send;

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
        sha256: [u8; 32],
    ) -> impl Future<Output = Result<CompletedPart, StoreError>> + Send;

    /// Completes an upload; returns the version of the object it made, like [`ObjectStore::put`].
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Discards the parts of an unfinished upload; an upload that is already gone is not an error.
    fn abort_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The bucket's versioning state (GetBucketVersioning).
    fn versioning(&self) -> impl Future<Output = Result<Versioning, StoreError>> + Send;

    /// Whether Object Lock is enabled on the bucket (GetObjectLockConfiguration).
    fn object_lock_enabled(&self) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Size, metadata and stored checksum of one object; `Ok(None)` when it does not exist.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<HeadInfo>, StoreError>> + Send;

    /// [`ObjectStore::head`] of a given version (or the current one): a restore from a snapshot
    /// asks after the version it restores, whose thaw is its own.
    fn head_version(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> impl Future<Output = Result<Option<HeadInfo>, StoreError>> + Send;

    /// Starts downloading one object (a given version, or the current one); `Ok(None)` when it
    /// (or that version) does not exist. The body is read as a stream.
    fn get(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> impl Future<Output = Result<Option<Download>, StoreError>> + Send;

    /// Bytes `start..end` of one object (a ranged GET), of the version given or else of the
    /// object whose ETag is `if_match`: an object replaced meanwhile is an error
    /// (PreconditionFailed), never other bytes. The stream ends after exactly `end - start`
    /// bytes or with an error.
    fn get_range(
        &self,
        key: &str,
        version_id: Option<&str>,
        if_match: Option<&str>,
        range: std::ops::Range<u64>,
    ) -> impl Future<Output = Result<BodyStream, StoreError>> + Send;

    /// One page of ListObjectVersions under `prefix`, keys returned relative to it.
    fn list_versions_page(
        &self,
        prefix: &str,
        marker: Option<VersionMarker>,
    ) -> impl Future<Output = Result<VersionPage, StoreError>> + Send;

    /// Part count and first part size of a multipart object (HEAD with partNumber=1);
    /// `Ok(None)` when the object is not multipart or the server does not say.
    fn part_layout(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> impl Future<Output = Result<Option<PartLayout>, StoreError>> + Send;

    /// Asks S3 to thaw an archived object (RestoreObject): a readable copy for `days` days (none
    /// for an Intelligent-Tiering archive tier, which takes no days: the object moves back to its
    /// Frequent Access tier), at `tier`'s speed and price. The object itself is not changed.
    fn restore_object(
        &self,
        key: &str,
        version_id: Option<&str>,
        days: Option<u32>,
        tier: ThawTier,
    ) -> impl Future<Output = Result<ThawRequest, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::{parse_restore_header, version_id, ErrorClass, ErrorKind, StoreError, Thaw};

    #[test]
    fn the_restore_header_says_whether_a_thaw_runs_or_is_done() {
        let done = |e: Option<&str>| Thaw::Done {
            expiry: e.map(str::to_owned),
        };
        let cases = [
            ("ongoing-request=\"true\"", Thaw::Running),
            (
                "ongoing-request=\"false\", expiry-date=\"Fri, 21 Dec 2012 00:00:00 GMT\"",
                done(Some("Fri, 21 Dec 2012 00:00:00 GMT")),
            ),
            // The order of the fields, their case and the space around them do not matter.
            (
                " expiry-date=\"Fri, 21 Dec 2012 00:00:00 GMT\" ,Ongoing-Request=\"FALSE\"",
                done(Some("Fri, 21 Dec 2012 00:00:00 GMT")),
            ),
            // An Intelligent-Tiering object moved back to Frequent Access: no expiry.
            ("ongoing-request=\"false\"", done(None)),
            ("ongoing-request=false", done(None)),
            // A header that says neither: S3 holds a thaw request, so it is not asked again.
            ("", Thaw::Running),
            ("garbage", Thaw::Running),
            ("ongoing-request=\"maybe\"", Thaw::Running),
            ("ongoing-request=\"false", done(None)),
        ];
        for (header, want) in cases {
            assert_eq!(parse_restore_header(header), want, "{header:?}");
        }
    }

    #[test]
    fn invalid_object_state_is_one_cold_object_not_the_end_of_the_run() {
        assert_eq!(ErrorKind::of_code("InvalidObjectState"), ErrorKind::Cold);
        assert!(!StoreError::new(ErrorKind::Cold, "x".into()).is_fatal());
    }

    #[test]
    fn only_a_real_version_id_is_recorded() {
        let v = |s: &str| version_id(Some(s.to_owned()));
        assert_eq!(version_id(None), None);
        assert_eq!(
            v("null"),
            None,
            "unversioned or suspended: replaced by the next PUT"
        );
        assert_eq!(v(""), None);
        assert_eq!(v("a\tb"), None);
        assert_eq!(v("a\u{7f}"), None);
        assert_eq!(v("é"), None);
        assert_eq!(v(&"x".repeat(1025)), None);
        let s3 = "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo";
        assert_eq!(v(s3).as_deref(), Some(s3));
        assert_eq!(v(&"x".repeat(1024)).map(|s| s.len()), Some(1024));
    }

    #[test]
    fn an_error_is_fatal_as_its_kind_says_unless_made_fatal() {
        let kinds = [
            (ErrorKind::DigestMismatch, ErrorClass::PerObject),
            (ErrorKind::ChecksumMismatch, ErrorClass::PerObject),
            (ErrorKind::NotImplemented, ErrorClass::PerObject),
            (ErrorKind::Throttled, ErrorClass::PerObject),
            (ErrorKind::NoSuchUpload, ErrorClass::PerObject),
            (ErrorKind::Cold, ErrorClass::PerObject),
            (ErrorKind::Other, ErrorClass::PerObject),
            (ErrorKind::NoCredentials, ErrorClass::Fatal),
            (ErrorKind::BadCredentials, ErrorClass::Fatal),
            (ErrorKind::AccessDenied, ErrorClass::Fatal),
            (ErrorKind::NoSuchBucket, ErrorClass::Fatal),
            (ErrorKind::WrongRegion, ErrorClass::Fatal),
            (ErrorKind::ClockSkew, ErrorClass::Fatal),
            (ErrorKind::StorageClass, ErrorClass::Fatal),
            (ErrorKind::Kms, ErrorClass::Fatal),
            (ErrorKind::Unreachable, ErrorClass::Fatal),
            (ErrorKind::Tls, ErrorClass::Fatal),
            (ErrorKind::InsecureEndpoint, ErrorClass::Fatal),
        ];
        for (kind, class) in kinds {
            let e = StoreError::new(kind, "x".into());
            assert_eq!(e.class(), class, "{kind:?}");
            assert!(e.into_fatal().is_fatal(), "{kind:?}");
        }
        assert!(!StoreError::per_object("x".into()).is_fatal());
    }
}
