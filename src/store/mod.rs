//! The object store as nightcopy needs it: list, put, multipart, head, get — and deliberately no
//! delete of any kind, so no code path, flag or future change can send one without first changing
//! this trait. (AbortMultipartUpload discards the parts of an upload this run started; it cannot
//! touch a stored object.)
//!
//! One trait so that tests can wrap the real client to count calls or inject failures.

pub mod s3;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;

use bytes::Bytes;

use crate::plan::RemoteObject;

/// What the S3 error means for the run. Per-file errors are counted; the rest end the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request failed for this object (bad digest, a rejected key, retries used up on a
    /// transient error): count it and go on.
    PerObject,
    /// No credentials, access denied, bucket missing, endpoint unreachable: nothing else can work.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub class: ErrorClass,
    /// S3's error code when there is one (e.g. `NoSuchBucket`, `BadDigest`).
    pub code: Option<String>,
    pub message: String,
}

impl StoreError {
    pub fn is_fatal(&self) -> bool {
        self.class == ErrorClass::Fatal
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
        m
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

/// The bytes of a single PUT. Small files travel in memory; larger ones are re-read from the file
/// by the SDK (which can then retry them) and checked against the SHA-256 of the first read.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Bytes),
    File { path: PathBuf, len: u64 },
}

#[derive(Debug, Clone)]
pub struct PutRequest {
    pub key: String,
    pub body: Body,
    /// SHA-256 of the body; S3 verifies it on receipt and rejects the upload if it differs.
    pub sha256: [u8; 32],
    pub meta: ObjectMeta,
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
}

pub trait ObjectStore: Send + Sync + 'static {
    /// One page of ListObjectsV2 under `prefix`, keys returned relative to it, in key order.
    fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> impl Future<Output = Result<ListPage, StoreError>> + Send;

    fn put(&self, req: PutRequest) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Starts a multipart upload with SHA-256 part checksums; returns the upload id.
    fn create_multipart(
        &self,
        key: &str,
        meta: &ObjectMeta,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
        sha256: [u8; 32],
    ) -> impl Future<Output = Result<CompletedPart, StoreError>> + Send;

    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn abort_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Size, metadata and stored checksum of one object; `Ok(None)` when it does not exist.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<HeadInfo>, StoreError>> + Send;
}
