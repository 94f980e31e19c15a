//! Uploads one planned file and says what the manifest should now record for it.
//!
//! The rule this module exists to keep: a file is recorded as backed up only after S3 accepted
//! bytes whose SHA-256 equals the SHA-256 of what we read, and the file's stat (size, mtime,
//! ctime, inode) was the same before and after that read. A file that changes while it is read is
//! retried once, then left for the next run and counted.
//!
//! Sizes: up to `SMALL_BODY` the file is read once into memory and sent from there. Up to the
//! multipart threshold it is hashed in one pass and then streamed by the SDK from disk with that
//! hash as the checksum — S3 rejects the upload if the second read differs, so the object can only
//! ever be what the first read saw. Above the threshold, multipart: parts are read sequentially
//! (one pass, whole-file hash and part hashes together) and uploaded concurrently.
//!
//! A multipart upload that a run leaves unfinished (a stop, a kill, a lost network) is recorded
//! (`state::uploads`) and continued by the next run: the file is read again whole (the object's
//! SHA-256 needs every byte), and each part S3 already holds is used only if the SHA-256 S3
//! reports for it equals the SHA-256 of the bytes read now; the others are sent. An upload whose
//! file changed is aborted, which removes no object.
//!
//! Each object's storage class comes from its size (`config::ClassRule`).

use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{ClassRule, Config, Sse, StorageClass, MAX_PART_SIZE, MIN_PART_SIZE};
use crate::fsutil::{self, blocking};
use crate::keys::shown;
use crate::plan::Reason;
use crate::report::{FileErrorKind, Stats};
use crate::scan::{open_entry, LocalEntry, OpenError};
use crate::state::manifest::ManifestEntry;
use crate::state::uploads::{FileIdentity, Pending, Uploads};
use crate::store::{
    etag_md5, Body, CompletedPart, ErrorKind, ListedPart, ObjectMeta, ObjectStore, PutRequest,
    StoreError,
};

/// Files up to this size are read into memory once. Bounded by concurrency × this.
pub const SMALL_BODY: u64 = 1024 * 1024;
/// S3 allows at most this many parts; larger files get larger parts.
const MAX_PARTS: u64 = 10_000;
const READ_BUF: usize = 256 * 1024;

type Limiter = governor::DefaultDirectRateLimiter;

pub struct Uploader<S> {
    store: Arc<S>,
    stats: Arc<Stats>,
    prefix: String,
    threshold: u64,
    part_size: u64,
    /// Files in flight.
    files: Arc<Semaphore>,
    /// Requests (single PUTs and parts) in flight.
    requests: Arc<Semaphore>,
    /// Multipart part buffers in memory, in KiB: a part takes its size from here before it is
    /// read and gives it back once it is sent, so memory stays within the budget however large
    /// the parts of a huge file grow (see `part_budget`).
    part_bytes: Arc<Semaphore>,
    part_budget_kib: u32,
    /// The bandwidth limiter and its burst (one second's worth of bytes).
    limiter: Option<(Limiter, u32)>,
    stop: crate::stop::Stop,
    classes: ClassRule,
    /// Where unfinished multipart uploads are recorded for the next run; `None`: they are aborted.
    resume: Option<Resume>,
}

/// What continuing an interrupted multipart upload needs.
pub struct Resume {
    pub uploads: Uploads,
    /// Whether the ETag of a part is the MD5 of its bytes (not with SSE-KMS): how a listed part
    /// is checked on a server that keeps no SHA-256 for parts.
    pub etag_is_md5: bool,
}

/// What became of a planned upload.
#[derive(Debug)]
pub enum Upload {
    /// Stored: the record for the manifest, and for a multipart object the composite checksum
    /// S3 keeps for it (the SHA-256 of its parts' SHA-256s), which a worker reports so that the
    /// coordinator can hold the object to it.
    Stored(ManifestEntry, Option<[u8; 32]>),
    Skipped(Skip),
}

/// Why a planned upload was not stored; each is counted where it happened.
#[derive(Debug)]
pub enum Skip {
    /// A stop was requested first.
    Stopped,
    Vanished,
    /// Something else is at the file's name now.
    Replaced(String),
    /// A transfer error.
    Error(FileErrorKind, String),
}

/// What was read for a single PUT, with the stat before and after the read.
struct Checked {
    sha256: [u8; 32],
    before: Fingerprint,
    after: Fingerprint,
}

impl Resume {
    /// The upload records in `config`'s state directory; `None`, with a warning, when they cannot
    /// be kept there (interrupted uploads are then aborted, as they would be without this).
    pub fn for_config(config: &Config) -> Option<Resume> {
        match Uploads::open(&config.state_dir.0, &config.destination_id()) {
            Ok(uploads) => Some(Resume {
                uploads,
                etag_is_md5: config.destination.sse != Some(Sse::Kms),
            }),
            Err(e) => {
                tracing::warn!(
                    "cannot keep upload records in {}: {e}; an interrupted multipart upload will \
                     be sent again from the start",
                    config.state_dir.0.display()
                );
                None
            }
        }
    }
}

/// What a single upload attempt ran into.
enum Failure {
    /// The file changed under the read (or S3 saw other bytes than we hashed).
    Changed(String),
    Vanished,
    /// Something else is at the file's name now (see `scan::open_entry`).
    Replaced(String),
    Unreadable(io::Error),
    Store(StoreError),
    /// A stop was requested: the upload was not started, or its multipart upload was aborted.
    Stopped,
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        // The bytes S3 received are not the ones we hashed: the file changed between the hash
        // pass and the upload.
        if e.kind == ErrorKind::DigestMismatch {
            Failure::Changed(e.message)
        } else {
            Failure::Store(e)
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            Failure::Vanished
        } else {
            Failure::Unreadable(e)
        }
    }
}

impl From<OpenError> for Failure {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Vanished => Failure::Vanished,
            OpenError::Replaced(by) => Failure::Replaced(by),
            OpenError::Io(e) => Failure::from(e),
        }
    }
}

/// What a read of a scanned file returns: the open file and its stat, or a failure to hand back.
fn open_checked(entry: &LocalEntry) -> io::Result<Result<(File, std::fs::Metadata), Failure>> {
    Ok(open_entry(entry).map_err(Failure::from))
}

/// The parts of a stat that change when content changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

impl Fingerprint {
    fn of(f: &File) -> io::Result<Fingerprint> {
        Ok(Fingerprint::of_meta(&f.metadata()?))
    }

    fn of_meta(m: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            size: m.len(),
            mtime_ns: fsutil::ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: fsutil::ns(m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    fn identity(self) -> FileIdentity {
        FileIdentity {
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
            ino: self.ino,
            dev: self.dev,
        }
    }
}

/// An upload to send parts to: a new one, or one continued with the parts it already holds.
struct Target {
    upload_id: String,
    part_size: u64,
    /// Sorted by part number.
    listed: Vec<ListedPart>,
}

/// A multipart upload's parts as they are read and sent: the file and the whole file's hash
/// (taken to the blocking thread for each read and given back), the parts in flight and done.
struct Parts {
    file: Option<File>,
    whole: Option<Sha256>,
    in_flight: JoinSet<Result<CompletedPart, StoreError>>,
    done: Vec<CompletedPart>,
    reused_parts: usize,
    reused_bytes: u64,
}

/// One part read: its number, bytes and SHA-256, and the request slot and memory it holds.
struct Part {
    number: i32,
    data: Bytes,
    sha256: [u8; 32],
    held: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

impl Parts {
    fn new(file: File) -> Parts {
        Parts {
            file: Some(file),
            whole: Some(Sha256::new()),
            in_flight: JoinSet::new(),
            done: Vec::new(),
            reused_parts: 0,
            reused_bytes: 0,
        }
    }

    /// Reads the next `want` bytes on a blocking thread, adding them to the whole file's hash;
    /// returns them with their own SHA-256. A file that ends early changed under the read.
    async fn read(&mut self, want: usize) -> Result<(Bytes, [u8; 32]), Failure> {
        let (f, h) = (
            self.file.take().expect("file"),
            self.whole.take().expect("hasher"),
        );
        let (f, h, data, part_sha) = blocking(move || {
            let mut f = f;
            let mut h = h;
            let mut buf = BytesMut::zeroed(want);
            let mut filled = 0;
            while filled < want {
                let n = read_retrying(&mut f, &mut buf[filled..])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file became shorter while it was read",
                    ));
                }
                filled += n;
            }
            h.update(&buf);
            let part_sha: [u8; 32] = Sha256::digest(&buf).into();
            Ok((f, h, buf.freeze(), part_sha))
        })
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Failure::Changed(e.to_string()),
            _ => Failure::from(e),
        })?;
        self.file = Some(f);
        self.whole = Some(h);
        Ok((data, part_sha))
    }
}

/// The transfer settings for nightcopy's own objects (the manifest's copy, the night's
/// snapshot): sent after the backup, alone, one part of 8 MiB at a time — their memory stays a few
/// MiB whatever `transfer.concurrency × part-size` allows the files (a million-entry snapshot is
/// about 70 MB: sent with the files' settings, its parts in flight took the million-file run's
/// peak RSS from 46 to 130 MiB), at the cost of a second or so for one that large.
pub fn own_objects(transfer: &crate::config::Transfer) -> crate::config::Transfer {
    use crate::config::{Concurrency, Size};
    crate::config::Transfer {
        concurrency: Concurrency(1),
        multipart_threshold: Size(8 * Size::MIB),
        part_size: Size(8 * Size::MIB),
        ..transfer.clone()
    }
}

/// The memory multipart parts may hold at once: one part per request slot at the configured part
/// size. A file so large that its parts had to grow (past 10,000 × part-size) has fewer parts in
/// flight instead of more memory: a 1 TiB sparse file, which any user can make, must not cost 16
/// parts of 105 MiB. One part larger than the whole budget is still sent, alone.
pub fn part_budget(concurrency: usize, part_size: u64) -> u64 {
    (concurrency as u64).saturating_mul(part_size)
}

impl<S: ObjectStore> Uploader<S> {
    pub fn new(
        store: Arc<S>,
        stats: Arc<Stats>,
        prefix: String,
        transfer: &crate::config::Transfer,
        stop: crate::stop::Stop,
    ) -> Self {
        let n = transfer.concurrency.0;
        let budget_kib =
            (part_budget(n, transfer.part_size.0) / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        let limiter =
            NonZeroU32::new(transfer.bandwidth_limit.0.min(u32::MAX as u64) as u32).map(|rate| {
                let limiter = governor::RateLimiter::direct(governor::Quota::per_second(rate));
                (limiter, rate.get())
            });
        Uploader {
            store,
            stats,
            prefix,
            threshold: transfer.multipart_threshold.0,
            part_size: transfer.part_size.0,
            files: Arc::new(Semaphore::new(n)),
            requests: Arc::new(Semaphore::new(n)),
            part_bytes: Arc::new(Semaphore::new(budget_kib as usize)),
            part_budget_kib: budget_kib,
            limiter,
            stop,
            classes: ClassRule::default(),
            resume: None,
        }
    }

    /// The uploader a command builds from its config: the destination's prefix and storage
    /// classes, the transfer settings.
    pub fn for_config(
        store: Arc<S>,
        stats: Arc<Stats>,
        config: &Config,
        stop: crate::stop::Stop,
    ) -> Self {
        Uploader::new(
            store,
            stats,
            config.destination.prefix.as_str().to_owned(),
            &config.transfer,
            stop,
        )
        .with_classes(config.destination.class_rule())
    }

    /// Objects take their storage class from `rule`.
    pub fn with_classes(mut self, rule: ClassRule) -> Self {
        self.classes = rule;
        self
    }

    /// Unfinished multipart uploads are recorded and continued.
    pub fn resuming(mut self, resume: Resume) -> Self {
        self.resume = Some(resume);
        self
    }

    /// Aborts the recorded uploads not resumed or started since `since` (their files were not
    /// uploaded by a run that went through the whole tree: deleted, excluded, unchanged since)
    /// and drops their records. Aborting removes no object.
    pub async fn abandon_stale(&self, since: std::time::SystemTime) {
        let Some(resume) = &self.resume else {
            return;
        };
        let stale = match resume.uploads.older_than(since) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot read the upload records: {e}");
                return;
            }
        };
        for p in stale {
            tracing::info!(
                "the upload of {} an earlier run left unfinished is no longer needed: aborted",
                shown(&p.key)
            );
            self.abort(&p.key, &p.upload_id).await;
            resume.uploads.forget(&p.key);
        }
    }

    /// The storage class a file of `size` bytes goes to.
    pub fn class_for(&self, size: u64) -> Option<StorageClass> {
        self.classes.for_size(size)
    }

    /// The destination prefix keys are uploaded under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Uploads `entry`: the new manifest record, or why it was not stored (already counted and
    /// logged); `Err` only for a fatal store error that must end the run.
    pub async fn upload(&self, entry: LocalEntry, reason: Reason) -> Result<Upload, StoreError> {
        let _file_slot = self.files.acquire().await.expect("never closed");
        self.upload_in_slot(entry, reason).await
    }

    /// [`Uploader::upload`] on a task of its own, so that signing and I/O of many small files
    /// use every runtime thread; the task is spawned only once the file has its slot. An upload's
    /// future is large (the SDK's request futures inside it, tens of KiB): spawned before its
    /// slot, every file of the run's ordering window (4,096) would hold one while it waited —
    /// peak RSS grew by about 100 MiB over a 100,000-file first copy that way.
    pub async fn upload_on_task(
        self: &Arc<Self>,
        entry: LocalEntry,
        reason: Reason,
    ) -> Result<Upload, StoreError> {
        let slot = self
            .files
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let me = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            me.upload_in_slot(entry, reason).await
        })
        .await
        .expect("upload task panicked")
    }

    async fn upload_in_slot(
        &self,
        entry: LocalEntry,
        reason: Reason,
    ) -> Result<Upload, StoreError> {
        let mut last_change = String::new();
        for _attempt in 0..2 {
            if self.stop.requested().is_some() {
                return Ok(Upload::Skipped(Skip::Stopped));
            }
            match self.attempt(&entry).await {
                Ok((record, composite)) => {
                    let class = self.class_for(record.size);
                    self.stats
                        .transferred(&entry.path, &entry.key, record.size, &reason, class);
                    return Ok(Upload::Stored(record, composite));
                }
                Err(Failure::Changed(why)) => {
                    tracing::debug!(path = %entry.path.display(), "changed while reading, retrying: {why}");
                    last_change = why;
                }
                Err(Failure::Stopped) => return Ok(Upload::Skipped(Skip::Stopped)),
                Err(Failure::Vanished) => {
                    self.stats.vanished(&entry.path);
                    return Ok(Upload::Skipped(Skip::Vanished));
                }
                Err(Failure::Replaced(by)) => {
                    self.stats.replaced(&entry.path, &by);
                    return Ok(Upload::Skipped(Skip::Replaced(by)));
                }
                Err(Failure::Unreadable(e)) => {
                    return Ok(self.failed(&entry, FileErrorKind::Unreadable, e.to_string()));
                }
                Err(Failure::Store(e)) if e.is_fatal() => return Err(e),
                Err(Failure::Store(e)) => {
                    return Ok(self.failed(&entry, FileErrorKind::Upload, e.to_string()));
                }
            }
        }
        let why = format!("kept changing while it was read ({last_change}); left for the next run");
        Ok(self.failed(&entry, FileErrorKind::Changed, why))
    }

    fn failed(&self, entry: &LocalEntry, kind: FileErrorKind, why: String) -> Upload {
        self.stats.file_error(&entry.path, kind, &why);
        Upload::Skipped(Skip::Error(kind, why))
    }

    async fn attempt(
        &self,
        entry: &LocalEntry,
    ) -> Result<(ManifestEntry, Option<[u8; 32]>), Failure> {
        let small_limit = SMALL_BODY.min(self.threshold);
        let scanned = entry.clone();
        // One trip to the blocking pool per small file — open, stat, read, hash, stat again — since
        // with many small files the hand-offs to that pool, not the reads, were what cost CPU.
        let (file, stat, small) = blocking(move || {
            let (mut f, stat) = match open_checked(&scanned)? {
                Ok(opened) => opened,
                Err(failure) => return Ok(Err(failure)),
            };
            if stat.len() > small_limit {
                return Ok(Ok((Some(f), stat, None)));
            }
            // Sized from the stat; one byte more lets a file that grew show it, and `take` keeps
            // a file growing without end from growing this buffer with it.
            let mut data = Vec::with_capacity(stat.len() as usize + 1);
            (&mut f).take(small_limit + 1).read_to_end(&mut data)?;
            let sha256: [u8; 32] = Sha256::digest(&data).into();
            Ok(Ok((None, stat, Some((data, sha256, Fingerprint::of(&f)?)))))
        })
        .await??;
        let before = Fingerprint::of_meta(&stat);
        // Mode and owner of the file that was opened and read, not of whatever the path named
        // when the walk passed.
        let meta = ObjectMeta {
            mtime_ns: before.mtime_ns,
            mode: stat.mode() & 0o7777,
            uid: stat.uid(),
            gid: stat.gid(),
            raw_path: entry.raw_path.clone(),
        };
        let key = format!("{}{}", self.prefix, entry.key);
        let class = self.class_for(before.size);
        let (sha256, composite, version) = match (small, file) {
            (Some((data, sha256, after)), _) => {
                let body = Body::Bytes(Bytes::from(data));
                let checked = Checked {
                    sha256,
                    before,
                    after,
                };
                let (sha256, version) = self.put(&key, body, checked, meta, class).await?;
                (sha256, None, version)
            }
            (None, Some(file)) if before.size > self.threshold => {
                let (whole, composite, version) =
                    self.multipart(&key, file, before, &meta, class).await?;
                (whole, Some(composite), version)
            }
            (None, Some(file)) => {
                let (sha256, version) = self.streamed(&key, file, before, meta, class).await?;
                (sha256, None, version)
            }
            (None, None) => unreachable!("a file is either read or handed back"),
        };
        let record = ManifestEntry {
            key: entry.key.clone(),
            size: before.size,
            mtime_ns: before.mtime_ns,
            sha256: Some(sha256),
            version,
        };
        Ok((record, composite))
    }

    /// A file between `SMALL_BODY` and the multipart threshold: hashed in one pass here, then
    /// streamed from disk by the SDK with that hash as its checksum.
    async fn streamed(
        &self,
        key: &str,
        file: File,
        before: Fingerprint,
        meta: ObjectMeta,
        class: Option<StorageClass>,
    ) -> Result<([u8; 32], Option<String>), Failure> {
        let file = Arc::new(file);
        let reader = file.clone();
        let (sha256, after) = blocking(move || {
            let mut hasher = Sha256::new();
            let mut buf = vec![0; READ_BUF];
            loop {
                let n = read_retrying(&mut reader.as_ref(), &mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            Ok((hasher.finalize().into(), Fingerprint::of(&reader)?))
        })
        .await?;
        // The SDK reads the open file again (never the path, which may name another file by
        // now); S3 refuses the upload if those bytes are not the ones hashed here.
        let body = Body::File {
            file,
            len: before.size,
        };
        let checked = Checked {
            sha256,
            before,
            after,
        };
        self.put(key, body, checked, meta, class).await
    }

    /// One PUT of what was read, unless the file changed while it was read: the SHA-256 sent and
    /// the version S3 gave the object.
    async fn put(
        &self,
        key: &str,
        body: Body,
        checked: Checked,
        meta: ObjectMeta,
        storage_class: Option<StorageClass>,
    ) -> Result<([u8; 32], Option<String>), Failure> {
        let Checked {
            sha256,
            before,
            after,
        } = checked;
        if after != before {
            return Err(Failure::Changed(format!(
                "stat {before:?} became {after:?}"
            )));
        }
        let _slot = self.requests.acquire().await.expect("never closed");
        self.throttle(before.size).await;
        let version = self
            .store
            .put(PutRequest {
                key: key.to_owned(),
                body,
                sha256,
                meta,
                storage_class,
            })
            .await?;
        self.stats.sent(before.size);
        Ok((sha256, version))
    }

    async fn multipart(
        &self,
        key: &str,
        file: File,
        before: Fingerprint,
        meta: &ObjectMeta,
        class: Option<StorageClass>,
    ) -> Result<([u8; 32], [u8; 32], Option<String>), Failure> {
        let target = match self.resumable(key, before).await? {
            Some(target) => target,
            None => {
                let upload_id = self.store.create_multipart(key, meta, class).await?;
                let part_size = part_size_for(before.size, self.part_size);
                if let Some(r) = &self.resume {
                    let destination = r.uploads.destination();
                    let record =
                        Pending::new(destination, key, &upload_id, before.identity(), part_size);
                    if let Err(e) = r.uploads.save(&record) {
                        tracing::warn!(
                            "cannot record the upload of {} for resuming ({e}); if this run is \
                             interrupted, the file is sent again from the start",
                            shown(key)
                        );
                    }
                }
                Target {
                    upload_id,
                    part_size,
                    listed: Vec::new(),
                }
            }
        };
        let result = self.parts(key, &target, file, before).await;
        let keep = matches!(result, Err(Failure::Stopped | Failure::Store(_)));
        match &self.resume {
            // What the upload holds stays valid as long as the file does: the next run continues
            // it. (The lifecycle rule removes uploads that no run ever comes back to.)
            Some(_) if keep => {
                tracing::debug!(
                    "the upload of {} is kept for the next run to continue",
                    shown(key)
                );
            }
            _ if result.is_ok() => self.forget(key),
            _ => {
                self.abort(key, &target.upload_id).await;
                self.forget(key);
            }
        }
        result
    }

    fn forget(&self, key: &str) {
        if let Some(r) = &self.resume {
            r.uploads.forget(key);
        }
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(e) = self.store.abort_multipart(key, upload_id).await {
            tracing::warn!(
                "could not abort the multipart upload {upload_id} of {}: {e}",
                shown(key)
            );
        }
    }

    /// The recorded upload of `key`, with the parts S3 holds, if it can be continued: the file has
    /// the identity it had when the upload started and the upload still exists. An upload of a
    /// file that changed since is aborted.
    async fn resumable(&self, key: &str, before: Fingerprint) -> Result<Option<Target>, Failure> {
        let Some(resume) = &self.resume else {
            return Ok(None);
        };
        let Some(record) = resume.uploads.find(key) else {
            return Ok(None);
        };
        let usable_layout = (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&record.part_size)
            && before.size.div_ceil(record.part_size) <= MAX_PARTS;
        if record.file != before.identity() || !usable_layout {
            tracing::info!(
                "{} changed since its upload was started by an earlier run: that upload is \
                 aborted and the file sent again",
                shown(key)
            );
            self.abort(key, &record.upload_id).await;
            resume.uploads.forget(key);
            return Ok(None);
        }
        // Written again so that this run's end sees the record as in use (`Uploads::older_than`),
        // even if the listing below fails and the upload is left for another night.
        if let Err(e) = resume.uploads.save(&record) {
            tracing::warn!("cannot refresh the upload record of {}: {e}", shown(key));
        }
        let Some(listed) = self.store.list_parts(key, &record.upload_id).await? else {
            tracing::info!(
                "the upload of {} an earlier run started is gone (completed, aborted or expired): \
                 the file is sent again",
                shown(key)
            );
            resume.uploads.forget(key);
            return Ok(None);
        };
        Ok(Some(Target {
            upload_id: record.upload_id,
            part_size: record.part_size,
            listed,
        }))
    }

    /// The part S3 already holds as number `number`, if it is the bytes just read.
    fn reusable(
        &self,
        target: &Target,
        number: i32,
        data: &[u8],
        sha: &[u8; 32],
    ) -> Option<String> {
        let i = target
            .listed
            .binary_search_by_key(&number, |p| p.number)
            .ok()?;
        let p = &target.listed[i];
        if p.size != data.len() as u64 {
            return None;
        }
        let same = match p.sha256 {
            Some(listed) => listed == *sha,
            // A server that keeps no part checksum: the ETag, when it is the MD5 of the part.
            None => {
                let md5 = etag_md5(Some(&p.etag), !self.resume.as_ref()?.etag_is_md5)?;
                use md5::Digest as _;
                md5 == <[u8; 16]>::from(md5::Md5::digest(data))
            }
        };
        same.then(|| p.etag.clone())
    }

    /// Sends the file's parts, at most one per request slot and within the part budget, reusing
    /// those the upload already holds; returns the file's SHA-256, the upload's composite and
    /// the object's version.
    async fn parts(
        &self,
        key: &str,
        target: &Target,
        file: File,
        before: Fingerprint,
    ) -> Result<([u8; 32], [u8; 32], Option<String>), Failure> {
        let mut parts = Parts::new(file);
        let (mut offset, mut number) = (0u64, 0i32);
        while offset < before.size {
            // The slot is taken before the part is read, so buffers in memory stay bounded.
            // Waiting for a slot or for memory can take as long as a part's upload: a stop
            // must not wait for it.
            let slot = self
                .until_stopped(self.requests.clone().acquire_owned())
                .await?
                .expect("never closed");
            let want = target.part_size.min(before.size - offset) as usize;
            let kib = (want as u64)
                .div_ceil(1024)
                .clamp(1, u64::from(self.part_budget_kib));
            let memory = self
                .until_stopped(self.part_bytes.clone().acquire_many_owned(kib as u32))
                .await?
                .expect("never closed");
            let (data, sha256) = parts.read(want).await?;
            number += 1;
            offset += want as u64;
            let part = Part {
                number,
                data,
                sha256,
                held: (slot, memory),
            };
            self.reuse_or_send(key, target, &mut parts, part).await?;
        }
        self.finish(key, target, parts, before).await
    }

    /// The part the upload already holds, if it is these bytes; else the part sent, on a task of
    /// its own that keeps its slot and memory until it is done.
    async fn reuse_or_send(
        &self,
        key: &str,
        target: &Target,
        parts: &mut Parts,
        part: Part,
    ) -> Result<(), Failure> {
        let Part {
            number,
            data,
            sha256,
            held,
        } = part;
        let len = data.len() as u64;
        if let Some(etag) = self.reusable(target, number, &data, &sha256) {
            parts.reused_parts += 1;
            parts.reused_bytes += len;
            parts.done.push(CompletedPart {
                number,
                etag,
                sha256,
            });
            return Ok(());
        }
        self.throttle(len).await;
        let store = self.store.clone();
        let stats = self.stats.clone();
        let (key, upload_id) = (key.to_owned(), target.upload_id.clone());
        parts.in_flight.spawn(async move {
            let _held = held;
            let part = store
                .upload_part(&key, &upload_id, number, data, sha256)
                .await?;
            stats.sent(len);
            Ok(part)
        });
        // Reap finished parts as we go, so an early failure stops reading.
        while let Some(r) = parts.in_flight.try_join_next() {
            parts.done.push(r.expect("part task panicked")?);
        }
        Ok(())
    }

    /// Waits for the parts in flight, holds the file to the stat it had before the read, and
    /// completes the upload.
    async fn finish(
        &self,
        key: &str,
        target: &Target,
        mut parts: Parts,
        before: Fingerprint,
    ) -> Result<([u8; 32], [u8; 32], Option<String>), Failure> {
        while let Some(r) = parts.in_flight.join_next().await {
            parts.done.push(r.expect("part task panicked")?);
        }
        let after = Fingerprint::of(parts.file.as_ref().expect("file"))?;
        if after != before {
            return Err(Failure::Changed(format!(
                "stat {before:?} became {after:?}"
            )));
        }
        let mut done = parts.done;
        done.sort_by_key(|p| p.number);
        let composite = crate::integrity::composite_of(done.iter().map(|p| &p.sha256));
        let version = self
            .store
            .complete_multipart(key, &target.upload_id, done)
            .await?;
        if !target.listed.is_empty() {
            let reused = parts.reused_bytes;
            self.stats
                .resumed(key, parts.reused_parts, reused, before.size - reused);
        }
        let whole = parts.whole.expect("hasher").finalize().into();
        Ok((whole, composite, version))
    }

    /// `f`, unless a stop is requested first.
    async fn until_stopped<T>(
        &self,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, Failure> {
        if self.stop.requested().is_some() {
            return Err(Failure::Stopped);
        }
        tokio::select! {
            out = f => Ok(out),
            () = self.stop.clone().wait() => Err(Failure::Stopped),
        }
    }

    /// Waits until `bytes` may be sent under the bandwidth limit (an average over about a second).
    async fn throttle(&self, bytes: u64) {
        let Some((limiter, burst)) = &self.limiter else {
            return;
        };
        let burst = u64::from(*burst);
        let mut left = bytes;
        while left > 0 {
            let n = left.min(burst);
            let cells = NonZeroU32::new(n as u32).expect("n > 0");
            // InsufficientCapacity cannot happen: n <= burst.
            let _ = limiter.until_n_ready(cells).await;
            left -= n;
        }
    }
}

/// The part size for a file: the configured one, grown (to whole MiB) so no file needs more than
/// S3's 10,000 parts.
pub fn part_size_for(file_size: u64, configured: u64) -> u64 {
    let min = file_size.div_ceil(MAX_PARTS);
    let mib = 1024 * 1024;
    configured.max(min.div_ceil(mib) * mib)
}

fn read_retrying(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{MemoryStore, Op};

    const MIB: u64 = 1024 * 1024;

    fn transfer() -> crate::config::Transfer {
        crate::config::Transfer {
            multipart_threshold: crate::config::Size(8 * MIB),
            part_size: crate::config::Size(5 * MIB),
            ..Default::default()
        }
    }

    fn entry_for(path: &std::path::Path, key: &str) -> LocalEntry {
        let m = std::fs::metadata(path).unwrap();
        LocalEntry::from_metadata(key.into(), path.into(), None, &m)
    }

    fn data(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A file `big` of `len` bytes in a fresh state directory, and the multipart upload of it
    /// that an earlier run started and recorded, holding `parts` parts of it (part 2 replaced by
    /// other bytes when `corrupt_second`); with the uploader of the next run.
    fn interrupted(
        len: u64,
        parts: usize,
        corrupt_second: bool,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Vec<u8>,
        Arc<MemoryStore>,
        Uploader<MemoryStore>,
    ) {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("big");
        let body = data(len);
        std::fs::write(&path, &body).unwrap();
        let store = Arc::new(MemoryStore::default());
        let u = uploader(&store, t.path());
        let uploads = &u.resume.as_ref().unwrap().uploads;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let id = rt
            .block_on(store.create_multipart("p/big", &ObjectMeta::default(), None))
            .unwrap();
        for (i, chunk) in body.chunks(5 * MIB as usize).take(parts).enumerate() {
            let mut chunk = chunk.to_vec();
            if corrupt_second && i == 1 {
                chunk[10] ^= 1;
            }
            let sha: [u8; 32] = Sha256::digest(&chunk).into();
            rt.block_on(store.upload_part("p/big", &id, i as i32 + 1, Bytes::from(chunk), sha))
                .unwrap();
        }
        let m = std::fs::metadata(&path).unwrap();
        let identity = Fingerprint::of_meta(&m).identity();
        let record = Pending::new(uploads.destination(), "p/big", &id, identity, 5 * MIB);
        uploads.save(&record).unwrap();
        (t, path, body, store, u)
    }

    fn uploader(store: &Arc<MemoryStore>, state: &std::path::Path) -> Uploader<MemoryStore> {
        let resume = Resume {
            uploads: Uploads::open(state, "dest").unwrap(),
            etag_is_md5: true,
        };
        Uploader::new(
            store.clone(),
            Arc::new(Stats::default()),
            "p/".into(),
            &transfer(),
            crate::stop::Stop::never(),
        )
        .resuming(resume)
    }

    fn run(u: &Uploader<MemoryStore>, e: LocalEntry) -> Upload {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(u.upload(e, Reason::New))
            .unwrap()
    }

    #[test]
    fn an_interrupted_upload_is_continued_with_only_the_missing_parts() {
        let (_t, path, body, store, u) = interrupted(38 * MIB, 3, false); // 8 parts: 7 × 5 MiB + 3 MiB

        let done = run(&u, entry_for(&path, "big"));
        assert!(matches!(done, Upload::Stored(..)), "{done:?}");
        assert_eq!(&store.object("p/big").unwrap().body[..], &body[..]);
        // 3 parts from the setup, 5 sent now; no second upload started.
        assert_eq!(store.count(Op::UploadPart), 3 + 5);
        assert_eq!(store.count(Op::CreateMultipart), 1);
        assert_eq!(store.count(Op::ListParts), 1);
        let f = u.stats.snapshot(std::time::Duration::ZERO);
        assert_eq!((f.resumed_files, f.resumed_bytes), (1, 15 * MIB));
        assert_eq!(u.resume.as_ref().unwrap().uploads.find("p/big"), None);
        assert_eq!(store.open_uploads(), 0);
    }

    #[test]
    fn a_listed_part_that_is_not_the_file_s_bytes_is_sent_again() {
        let (_t, path, body, store, u) = interrupted(38 * MIB, 3, true);

        assert!(matches!(
            run(&u, entry_for(&path, "big")),
            Upload::Stored(..)
        ));
        assert_eq!(&store.object("p/big").unwrap().body[..], &body[..]);
        assert_eq!(store.count(Op::UploadPart), 3 + 6);
    }

    #[test]
    fn the_upload_of_a_file_that_changed_since_is_aborted_and_started_over() {
        let (_t, path, body, store, u) = interrupted(38 * MIB, 3, false);
        // Same size, new content and mtime: the recorded identity no longer holds.
        let mut changed = body.clone();
        changed[0] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        let newer = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(newer)
            .unwrap();

        assert!(matches!(
            run(&u, entry_for(&path, "big")),
            Upload::Stored(..)
        ));
        assert_eq!(&store.object("p/big").unwrap().body[..], &changed[..]);
        assert_eq!(store.count(Op::AbortMultipart), 1);
        assert_eq!(store.count(Op::CreateMultipart), 2);
        assert_eq!(store.count(Op::UploadPart), 3 + 8);
        assert_eq!(store.count(Op::ListParts), 0);
    }

    #[test]
    fn a_recorded_upload_no_run_touched_is_aborted_at_the_end_of_a_whole_run() {
        let (_t, _, _, store, u) = interrupted(12 * MIB, 1, false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Written before this "run" began: kept.
        rt.block_on(
            u.abandon_stale(std::time::SystemTime::now() - std::time::Duration::from_secs(60)),
        );
        assert_eq!(store.count(Op::AbortMultipart), 0);
        // Not touched since the run began: its file needs no upload any more.
        rt.block_on(
            u.abandon_stale(std::time::SystemTime::now() + std::time::Duration::from_secs(1)),
        );
        assert_eq!(store.count(Op::AbortMultipart), 1);
        assert_eq!(store.open_uploads(), 0);
        assert_eq!(u.resume.as_ref().unwrap().uploads.find("p/big"), None);
    }

    #[test]
    fn small_files_go_to_their_class() {
        let t = tempfile::tempdir().unwrap();
        let store = Arc::new(MemoryStore::default());
        let rule = ClassRule {
            class: Some(StorageClass::DeepArchive),
            small: crate::config::SmallFiles::default_for(Some(StorageClass::DeepArchive)),
        };
        let u = uploader(&store, t.path()).with_classes(rule);
        for (name, len) in [
            ("small", 1000u64),
            ("large", 300 * 1024),
            ("multi", 9 * MIB),
        ] {
            let path = t.path().join(name);
            std::fs::write(&path, data(len)).unwrap();
            assert!(matches!(
                run(&u, entry_for(&path, name)),
                Upload::Stored(..)
            ));
        }
        let class = |k: &str| store.object(k).unwrap().storage_class;
        assert_eq!(class("p/small").as_deref(), Some("STANDARD"));
        assert_eq!(class("p/large").as_deref(), Some("DEEP_ARCHIVE"));
        assert_eq!(class("p/multi").as_deref(), Some("DEEP_ARCHIVE"));
        let f = u.stats.snapshot(std::time::Duration::ZERO);
        let split: Vec<_> = f
            .classes
            .iter()
            .map(|c| (c.class.as_str(), c.files))
            .collect();
        assert_eq!(split, [("STANDARD", 1), ("DEEP_ARCHIVE", 2)]);
    }

    #[test]
    fn the_record_names_the_version_each_upload_made() {
        let t = tempfile::tempdir().unwrap();
        let store = Arc::new(MemoryStore::default().keeping_versions());
        let u = uploader(&store, t.path());
        // A PUT from memory, a PUT streamed from the file, and a multipart upload.
        for (name, len) in [("small", 1000u64), ("large", 3 * MIB), ("multi", 9 * MIB)] {
            let path = t.path().join(name);
            std::fs::write(&path, data(len)).unwrap();
            let Upload::Stored(record, _) = run(&u, entry_for(&path, name)) else {
                panic!("{name} not stored");
            };
            let object = store.object(&format!("p/{name}")).unwrap();
            assert!(object.version_id.is_some(), "{name}");
            assert_eq!(record.version, object.version_id, "{name}");
        }
        let plain = Arc::new(MemoryStore::default());
        let u = uploader(&plain, t.path());
        let Upload::Stored(record, _) = run(&u, entry_for(&t.path().join("small"), "small")) else {
            panic!("not stored");
        };
        assert_eq!(record.version, None, "an unversioned bucket gives none");
    }

    #[test]
    fn part_size_grows_for_huge_files() {
        let mib = 1024 * 1024;
        assert_eq!(part_size_for(100 * mib, 16 * mib), 16 * mib);
        // 5 TiB at 16 MiB would be 327,680 parts
        let tib5 = 5 * 1024 * 1024 * mib;
        let p = part_size_for(tib5, 16 * mib);
        assert!(tib5.div_ceil(p) <= MAX_PARTS, "{p}");
        assert_eq!(p % mib, 0);
    }
}
