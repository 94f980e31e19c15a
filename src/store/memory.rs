//! An object store in memory, with a counter per operation: what unit tests and library-level
//! tests run the machinery against when a real S3 API server cannot produce the case (a composite
//! checksum, an exact page size, a request count). Like the trait, it has no delete.
//!
//! It behaves as S3 does where nightcopy depends on it: keys listed in byte order, pages of
//! `page_size` keys with a continuation token, `StartAfter`, SHA-256 checksums verified on every
//! PUT and part (a wrong one is `DigestMismatch`), composite `…-N` checksums for multipart
//! objects, metadata kept as given. Objects can also be inserted with any checksum and part
//! layout, to test how a reader judges them.
//!
//! Versions are kept only when asked for ([`MemoryStore::keeping_versions`]): then every write
//! gets a version id (`v1`, `v2` …) that put, complete and head return, and `get` of an older
//! version gives its bytes. By default it is an unversioned bucket: no version ids, and `get`
//! gives the current object whatever version is asked for. (ListObjectVersions is not modelled.)
//!
//! Archived objects are modelled as S3 keeps them, with a thaw that takes as long as the test
//! says: an object [`MemoryStore::freeze`]s into a cold class and GET refuses it (`Cold`, S3's
//! InvalidObjectState); RestoreObject starts a thaw, which HEAD reports as running
//! (`ongoing-request="true"`) and which a second request does not restart (S3's 409
//! RestoreAlreadyInProgress); only [`MemoryStore::finish_thaw`] makes it readable, with HEAD's
//! `ongoing-request="false"` and an expiry. Every thaw request is kept with its days and tier.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{
    Archive, ArchiveTier, Body, BodyStream, CompletedPart, Download, ErrorKind, HeadInfo, ListPage,
    ListedPart, ObjectMeta, ObjectStore, PartLayout, PutRequest, RemoteObject, StoreError, Thaw,
    ThawRequest, ThawTier, VersionMarker, VersionPage, Versioning,
};
use crate::config::StorageClass;

/// The operations of [`ObjectStore`], for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    List,
    Put,
    CreateMultipart,
    ListParts,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
    Head,
    Get,
    GetRange,
    ListVersions,
    PartLayout,
    Versioning,
    ObjectLock,
    RestoreObject,
}

/// Where an archived object is in its thaw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frozen {
    /// Unreadable, no thaw asked for.
    Cold,
    /// A thaw was asked for and is running: still unreadable.
    Thawing,
    /// Readable (a thawed copy).
    Thawed,
}

/// One RestoreObject request as the store received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThawAsked {
    pub key: String,
    pub version_id: Option<String>,
    pub days: Option<u32>,
    pub tier: ThawTier,
}

/// One stored object.
#[derive(Debug, Clone, Default)]
pub struct Object {
    pub body: Bytes,
    pub meta: HashMap<String, String>,
    /// `x-amz-checksum-sha256` as S3 reports it (base64, `…-N` for a composite).
    pub checksum: Option<String>,
    pub layout: Option<PartLayout>,
    pub last_modified_ns: i64,
    /// As it was sent; `None` for the bucket's default.
    pub storage_class: Option<String>,
    /// Set by a store that keeps versions.
    pub version_id: Option<String>,
}

impl Object {
    /// What S3's ETag is to a client: a name of these bytes (here their SHA-256 and when they
    /// were stored), changed by every new upload.
    pub fn etag(&self) -> String {
        let sha = Sha256::digest(&self.body);
        format!("\"{}-{}\"", hex::encode(&sha[..16]), self.last_modified_ns)
    }

    /// An object as a single PUT of `body` would store it.
    pub fn new(body: impl Into<Bytes>, meta: Option<&ObjectMeta>) -> Object {
        let body = body.into();
        Object {
            checksum: Some(b64(&Sha256::digest(&body))),
            meta: meta.map(ObjectMeta::to_map).unwrap_or_default(),
            body,
            layout: None,
            last_modified_ns: 0,
            storage_class: None,
            version_id: None,
        }
    }
}

struct Upload {
    key: String,
    meta: HashMap<String, String>,
    storage_class: Option<String>,
    parts: BTreeMap<i32, (Bytes, [u8; 32])>,
}

pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Object>>,
    /// Every version written, by key and version id, when versions are kept.
    versions: Option<Mutex<BTreeMap<(String, String), Object>>>,
    uploads: Mutex<HashMap<String, Upload>>,
    counts: Mutex<BTreeMap<Op, usize>>,
    /// Archived objects by key, with the Intelligent-Tiering tier they are in, if they are.
    frozen: Mutex<HashMap<String, (Frozen, Option<ArchiveTier>)>>,
    thaws: Mutex<Vec<ThawAsked>>,
    /// Keys per listing page (S3's is 1,000).
    page_size: usize,
    /// Bytes per chunk of a download's body, so that readers meet chunk boundaries.
    chunk: usize,
    /// Stands in for S3's clock: each write is one tick later.
    clock: AtomicU64,
    next_upload: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(1000)
    }
}

fn b64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

impl MemoryStore {
    pub fn new(page_size: usize) -> MemoryStore {
        MemoryStore {
            objects: Mutex::default(),
            versions: None,
            uploads: Mutex::default(),
            counts: Mutex::default(),
            frozen: Mutex::default(),
            thaws: Mutex::default(),
            page_size: page_size.max(1),
            chunk: 333,
            clock: AtomicU64::new(1),
            next_upload: AtomicU64::new(1),
        }
    }

    /// The same store, keeping every version of every object written from now on.
    pub fn keeping_versions(mut self) -> MemoryStore {
        self.versions = Some(Mutex::default());
        self
    }

    pub fn insert(&self, key: &str, object: Object) {
        self.objects.lock().unwrap().insert(key.to_owned(), object);
    }

    pub fn object(&self, key: &str) -> Option<Object> {
        self.objects.lock().unwrap().get(key).cloned()
    }

    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }

    /// How many times `op` was called.
    pub fn count(&self, op: Op) -> usize {
        self.counts.lock().unwrap().get(&op).copied().unwrap_or(0)
    }

    /// Archives the object at `key` in `class` (GLACIER, DEEP_ARCHIVE; INTELLIGENT_TIERING with
    /// the archive tier it went to): unreadable until a thaw is asked for and finished.
    pub fn freeze(&self, key: &str, class: StorageClass, tier: Option<ArchiveTier>) {
        if let Some(o) = self.objects.lock().unwrap().get_mut(key) {
            o.storage_class = Some(class.as_str().to_owned());
        }
        if let Some(versions) = &self.versions {
            for ((k, _), o) in versions.lock().unwrap().iter_mut() {
                if k == key {
                    o.storage_class = Some(class.as_str().to_owned());
                }
            }
        }
        self.frozen
            .lock()
            .unwrap()
            .insert(key.to_owned(), (Frozen::Cold, tier));
    }

    /// Finishes the thaw running for `key`: readable from now on. Panics when no thaw was asked
    /// for, so a test cannot finish one that nightcopy never requested.
    pub fn finish_thaw(&self, key: &str) {
        let mut frozen = self.frozen.lock().unwrap();
        let state = frozen.get_mut(key).expect("a frozen object");
        assert_eq!(state.0, Frozen::Thawing, "{key}: no thaw was requested");
        state.0 = Frozen::Thawed;
    }

    /// The RestoreObject requests received, in order.
    pub fn thaw_requests(&self) -> Vec<ThawAsked> {
        self.thaws.lock().unwrap().clone()
    }

    /// The object, or one version of it where versions are kept.
    fn version_of(&self, key: &str, version_id: Option<&str>) -> Option<Object> {
        match (&self.versions, version_id) {
            (Some(versions), Some(v)) => versions
                .lock()
                .unwrap()
                .get(&(key.to_owned(), v.to_owned()))
                .cloned(),
            _ => self.object(key),
        }
    }

    /// A body as the store streams it, in chunks of `chunk` bytes.
    fn chunked(&self, body: Bytes) -> BodyStream {
        let chunks: Vec<Result<Bytes, StoreError>> = (0..body.len())
            .step_by(self.chunk)
            .map(|at| Ok(body.slice(at..(at + self.chunk).min(body.len()))))
            .collect();
        Box::pin(futures::stream::iter(chunks))
    }

    fn readable(&self, key: &str) -> bool {
        self.frozen
            .lock()
            .unwrap()
            .get(key)
            .is_none_or(|(f, _)| *f == Frozen::Thawed)
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.uploads.lock().unwrap().len()
    }

    fn called(&self, op: Op) {
        *self.counts.lock().unwrap().entry(op).or_default() += 1;
    }

    /// Stores a write; returns its version id when versions are kept.
    fn store(&self, key: &str, mut object: Object) -> Option<String> {
        let tick = self.clock.fetch_add(1, Relaxed);
        object.last_modified_ns = tick as i64;
        if let Some(versions) = &self.versions {
            let id = format!("v{tick}");
            object.version_id = Some(id.clone());
            versions
                .lock()
                .unwrap()
                .insert((key.to_owned(), id), object.clone());
        }
        let id = object.version_id.clone();
        self.insert(key, object);
        id
    }
}

impl ObjectStore for MemoryStore {
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError> {
        self.called(Op::List);
        // The continuation token is the last key returned, relative to the prefix.
        let from = continuation.or(start_after.map(str::to_owned));
        let objects = self.objects.lock().unwrap();
        let mut matching = objects
            .iter()
            .filter_map(|(k, o)| Some((k.strip_prefix(prefix)?, o)))
            .filter(|(k, _)| from.as_deref().is_none_or(|f| *k > f));
        let page: Vec<RemoteObject> = matching
            .by_ref()
            .take(self.page_size)
            .map(|(k, o)| RemoteObject {
                key: k.to_owned(),
                size: o.body.len() as u64,
                last_modified_ns: o.last_modified_ns,
                storage_class: o
                    .storage_class
                    .as_deref()
                    .and_then(super::storage_class_named),
            })
            .collect();
        let next = match matching.next() {
            Some(_) => page.last().map(|o| o.key.clone()),
            None => None,
        };
        Ok(ListPage {
            objects: page,
            next,
        })
    }

    async fn put(&self, req: PutRequest) -> Result<Option<String>, StoreError> {
        self.called(Op::Put);
        let body = match req.body {
            Body::Bytes(b) => b,
            Body::File { file, len } => {
                use std::os::unix::fs::FileExt;
                let mut data = vec![0; len as usize];
                file.read_exact_at(&mut data, 0).map_err(|e| {
                    StoreError::per_object(format!("cannot read the open file again: {e}"))
                })?;
                Bytes::from(data)
            }
        };
        let got: [u8; 32] = Sha256::digest(&body).into();
        if got != req.sha256 {
            return Err(StoreError::new(
                ErrorKind::DigestMismatch,
                format!("upload of {} failed: BadDigest", req.key),
            ));
        }
        Ok(self.store(
            &req.key,
            Object {
                body,
                meta: req.meta.to_map(),
                checksum: Some(b64(&got)),
                layout: None,
                last_modified_ns: 0,
                storage_class: req.storage_class.map(|c| c.as_str().to_owned()),
                version_id: None,
            },
        ))
    }

    async fn create_multipart(
        &self,
        key: &str,
        meta: &ObjectMeta,
        storage_class: Option<crate::config::StorageClass>,
    ) -> Result<String, StoreError> {
        self.called(Op::CreateMultipart);
        let id = format!("upload-{}", self.next_upload.fetch_add(1, Relaxed));
        self.uploads.lock().unwrap().insert(
            id.clone(),
            Upload {
                key: key.to_owned(),
                meta: meta.to_map(),
                storage_class: storage_class.map(|c| c.as_str().to_owned()),
                parts: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, StoreError> {
        self.called(Op::ListParts);
        let uploads = self.uploads.lock().unwrap();
        Ok(uploads.get(upload_id).filter(|u| u.key == key).map(|u| {
            u.parts
                .iter()
                .map(|(n, (data, sha))| ListedPart {
                    number: *n,
                    size: data.len() as u64,
                    etag: hex::encode(&sha[..8]),
                    sha256: Some(*sha),
                })
                .collect()
        }))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
        sha256: [u8; 32],
    ) -> Result<CompletedPart, StoreError> {
        self.called(Op::UploadPart);
        let got: [u8; 32] = Sha256::digest(&data).into();
        if got != sha256 {
            return Err(StoreError::new(
                ErrorKind::DigestMismatch,
                format!("upload of part {number} of {key} failed: BadDigest"),
            ));
        }
        let mut uploads = self.uploads.lock().unwrap();
        let upload = uploads
            .get_mut(upload_id)
            .filter(|u| u.key == key)
            .ok_or_else(|| StoreError::per_object(format!("no upload {upload_id} of {key}")))?;
        upload.parts.insert(number, (data, got));
        Ok(CompletedPart {
            number,
            etag: hex::encode(&got[..8]),
            sha256: got,
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<Option<String>, StoreError> {
        self.called(Op::CompleteMultipart);
        let upload = self
            .uploads
            .lock()
            .unwrap()
            .remove(upload_id)
            .filter(|u| u.key == key)
            .ok_or_else(|| StoreError::per_object(format!("no upload {upload_id} of {key}")))?;
        let mut body = Vec::new();
        let mut outer = Sha256::new();
        let mut first_part_size = 0;
        for p in &parts {
            let (data, sha) = upload.parts.get(&p.number).ok_or_else(|| {
                StoreError::per_object(format!("part {} of {key} was never uploaded", p.number))
            })?;
            if *sha != p.sha256 {
                return Err(StoreError::new(
                    ErrorKind::DigestMismatch,
                    format!("part {} of {key}: checksum differs", p.number),
                ));
            }
            if first_part_size == 0 {
                first_part_size = data.len() as u64;
            }
            outer.update(sha);
            body.extend_from_slice(data);
        }
        Ok(self.store(
            key,
            Object {
                body: Bytes::from(body),
                meta: upload.meta,
                storage_class: upload.storage_class,
                checksum: Some(format!("{}-{}", b64(&outer.finalize()), parts.len())),
                layout: Some(PartLayout {
                    parts: parts.len() as u32,
                    first_part_size,
                }),
                last_modified_ns: 0,
                version_id: None,
            },
        ))
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.called(Op::AbortMultipart);
        self.uploads.lock().unwrap().remove(upload_id);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<HeadInfo>, StoreError> {
        self.head_version(key, None).await
    }

    async fn head_version(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<HeadInfo>, StoreError> {
        self.called(Op::Head);
        let frozen = self.frozen.lock().unwrap().get(key).copied();
        let object = self.version_of(key, version_id);
        Ok(object.map(|o| HeadInfo {
            size: o.body.len() as u64,
            etag_md5: None,
            archive: Archive {
                class: o
                    .storage_class
                    .as_deref()
                    .and_then(super::storage_class_named),
                tier: frozen.and_then(|(f, tier)| tier.filter(|_| f != Frozen::Thawed)),
                thaw: match frozen {
                    Some((Frozen::Thawing, _)) => Some(Thaw::Running),
                    Some((Frozen::Thawed, None)) => Some(Thaw::Done {
                        expiry: Some("Fri, 21 Dec 2012 00:00:00 GMT".to_owned()),
                    }),
                    Some((Frozen::Thawed, Some(_))) => Some(Thaw::Done { expiry: None }),
                    _ => None,
                },
            },
            meta: o.meta,
            checksum_sha256: o.checksum,
            version_id: o.version_id,
        }))
    }

    async fn get(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<Download>, StoreError> {
        self.called(Op::Get);
        if !self.readable(key) {
            return Err(StoreError::new(
                ErrorKind::Cold,
                format!(
                    "downloading {key} failed: InvalidObjectState: The operation is not valid \
                     for the object's storage class, HTTP 403"
                ),
            ));
        }
        let object = self.version_of(key, version_id);
        Ok(object.map(|o| Download {
            size: o.body.len() as u64,
            etag_md5: None,
            etag: Some(o.etag()),
            meta: o.meta,
            checksum_sha256: o.checksum,
            body: self.chunked(o.body),
        }))
    }

    async fn get_range(
        &self,
        key: &str,
        version_id: Option<&str>,
        if_match: Option<&str>,
        range: std::ops::Range<u64>,
    ) -> Result<BodyStream, StoreError> {
        self.called(Op::GetRange);
        let object = self.version_of(key, version_id);
        let Some(o) = object else {
            return Err(StoreError::per_object(format!(
                "downloading {key} failed: NoSuchKey"
            )));
        };
        if if_match.is_some_and(|e| e != o.etag()) {
            return Err(StoreError::per_object(format!(
                "downloading {key} failed: PreconditionFailed, HTTP 412"
            )));
        }
        let end = range.end.min(o.body.len() as u64) as usize;
        let start = (range.start as usize).min(end);
        Ok(self.chunked(o.body.slice(start..end)))
    }

    async fn list_versions_page(
        &self,
        prefix: &str,
        _marker: Option<VersionMarker>,
    ) -> Result<VersionPage, StoreError> {
        self.called(Op::ListVersions);
        Err(StoreError::new(
            ErrorKind::NotImplemented,
            format!("listing versions of {prefix} failed: NotImplemented"),
        ))
    }

    async fn part_layout(
        &self,
        key: &str,
        _version_id: Option<&str>,
    ) -> Result<Option<PartLayout>, StoreError> {
        self.called(Op::PartLayout);
        Ok(self.object(key).and_then(|o| o.layout))
    }

    async fn restore_object(
        &self,
        key: &str,
        version_id: Option<&str>,
        days: Option<u32>,
        tier: ThawTier,
    ) -> Result<ThawRequest, StoreError> {
        self.called(Op::RestoreObject);
        self.thaws.lock().unwrap().push(ThawAsked {
            key: key.to_owned(),
            version_id: version_id.map(str::to_owned),
            days,
            tier,
        });
        let mut frozen = self.frozen.lock().unwrap();
        match frozen.get_mut(key) {
            Some((state @ Frozen::Cold, _)) => {
                *state = Frozen::Thawing;
                Ok(ThawRequest::Sent)
            }
            Some((Frozen::Thawing, _)) => Ok(ThawRequest::AlreadyRunning),
            Some((Frozen::Thawed, _)) => Ok(ThawRequest::Sent),
            None => Err(StoreError::new(
                ErrorKind::Cold,
                format!(
                    "requesting the thaw of {key} failed: InvalidObjectState: restore is not \
                     allowed for the object's current storage class, HTTP 403"
                ),
            )),
        }
    }

    async fn versioning(&self) -> Result<Versioning, StoreError> {
        self.called(Op::Versioning);
        Ok(Versioning::Enabled)
    }

    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        self.called(Op::ObjectLock);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn lists_in_pages_and_refuses_a_wrong_digest() {
        let store = MemoryStore::new(2);
        for k in ["p/a", "p/b", "p/c", "q/x"] {
            store.insert(k, Object::new(&b"x"[..], None));
        }
        let first = block_on(store.list_page("p/", None, None)).unwrap();
        assert_eq!(first.objects.len(), 2);
        let second = block_on(store.list_page("p/", None, first.next)).unwrap();
        assert_eq!(second.objects[0].key, "c");
        assert!(second.next.is_none());
        let after = block_on(store.list_page("p/", Some("a"), None)).unwrap();
        assert_eq!(after.objects[0].key, "b");
        assert_eq!(store.count(Op::List), 3);

        let err = block_on(store.put(PutRequest {
            key: "p/d".into(),
            body: Body::Bytes(Bytes::from_static(b"data")),
            sha256: [0; 32],
            meta: ObjectMeta::default(),
            storage_class: None,
        }))
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::DigestMismatch);
        assert!(store.object("p/d").is_none());
    }

    #[test]
    fn multipart_objects_carry_a_composite_checksum_and_their_layout() {
        let store = MemoryStore::default();
        let id = block_on(store.create_multipart("k", &ObjectMeta::default(), None)).unwrap();
        let mut parts = Vec::new();
        for (n, data) in [(1, &b"abcd"[..]), (2, &b"ef"[..])] {
            let sha: [u8; 32] = Sha256::digest(data).into();
            parts.push(block_on(store.upload_part("k", &id, n, Bytes::from(data), sha)).unwrap());
        }
        block_on(store.complete_multipart("k", &id, parts)).unwrap();
        let o = store.object("k").unwrap();
        assert_eq!(&o.body[..], b"abcdef");
        assert!(o.checksum.unwrap().ends_with("-2"));
        assert_eq!(
            o.layout,
            Some(PartLayout {
                parts: 2,
                first_part_size: 4
            })
        );
        assert_eq!(store.open_uploads(), 0);
    }

    fn put(store: &MemoryStore, key: &str, body: &'static [u8]) -> Option<String> {
        block_on(store.put(PutRequest {
            key: key.into(),
            body: Body::Bytes(Bytes::from_static(body)),
            sha256: Sha256::digest(body).into(),
            meta: ObjectMeta::default(),
            storage_class: None,
        }))
        .unwrap()
    }

    fn got(store: &MemoryStore, key: &str, version: Option<&str>) -> Vec<u8> {
        use futures::StreamExt;
        let d = block_on(store.get(key, version)).unwrap().unwrap();
        let chunks: Vec<_> = block_on(d.body.collect::<Vec<_>>());
        chunks
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect()
    }

    #[test]
    fn a_frozen_object_is_read_only_after_its_thaw_is_asked_for_and_finished() {
        let store = MemoryStore::default();
        put(&store, "k", b"cold bytes");
        store.freeze("k", StorageClass::DeepArchive, None);
        let listed = block_on(store.list_page("", None, None)).unwrap();
        assert_eq!(
            listed.objects[0].storage_class,
            Some(StorageClass::DeepArchive)
        );
        let refused = |s: &MemoryStore| match block_on(s.get("k", None)) {
            Err(e) => e.kind == ErrorKind::Cold,
            Ok(_) => false,
        };
        assert!(refused(&store));
        assert_eq!(
            block_on(store.head("k")).unwrap().unwrap().archive.thaw,
            None
        );
        let ask = || block_on(store.restore_object("k", None, Some(7), ThawTier::Bulk)).unwrap();
        assert_eq!(ask(), ThawRequest::Sent);
        assert!(refused(&store), "still thawing");
        let head = block_on(store.head("k")).unwrap().unwrap();
        assert_eq!(head.archive.thaw, Some(Thaw::Running));
        assert_eq!(head.archive.class, Some(StorageClass::DeepArchive));
        assert_eq!(ask(), ThawRequest::AlreadyRunning);
        store.finish_thaw("k");
        assert_eq!(got(&store, "k", None), b"cold bytes");
        assert!(matches!(
            block_on(store.head("k")).unwrap().unwrap().archive.thaw,
            Some(Thaw::Done { expiry: Some(_) })
        ));
        assert_eq!(store.count(Op::RestoreObject), 2);
        assert_eq!(
            store.thaw_requests()[0],
            ThawAsked {
                key: "k".into(),
                version_id: None,
                days: Some(7),
                tier: ThawTier::Bulk
            }
        );
        // Nothing to thaw in STANDARD: refused as S3 refuses it.
        put(&store, "warm", b"x");
        let e = block_on(store.restore_object("warm", None, Some(7), ThawTier::Bulk));
        assert!(e.is_err());
    }

    #[test]
    fn versions_are_kept_only_when_asked_for() {
        let plain = MemoryStore::default();
        assert_eq!(put(&plain, "k", b"one"), None);
        assert_eq!(block_on(plain.head("k")).unwrap().unwrap().version_id, None);

        let store = MemoryStore::default().keeping_versions();
        let first = put(&store, "k", b"one").expect("a version id");
        let second = put(&store, "k", b"two").expect("a version id");
        assert_ne!(first, second);
        let head = block_on(store.head("k")).unwrap().unwrap();
        assert_eq!(head.version_id.as_deref(), Some(second.as_str()));
        assert_eq!(got(&store, "k", Some(&first)), b"one");
        assert_eq!(got(&store, "k", Some(&second)), b"two");
        assert_eq!(got(&store, "k", None), b"two");
        let id = block_on(store.create_multipart("m", &ObjectMeta::default(), None)).unwrap();
        let sha: [u8; 32] = Sha256::digest(b"abc").into();
        let part = block_on(store.upload_part("m", &id, 1, Bytes::from_static(b"abc"), sha));
        let done = block_on(store.complete_multipart("m", &id, vec![part.unwrap()])).unwrap();
        assert!(done.is_some_and(|v| v != second));
    }
}
