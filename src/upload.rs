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

use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::fsutil::{self, blocking};
use crate::plan::Reason;
use crate::report::{FileErrorKind, Stats};
use crate::scan::{open_entry, LocalEntry, OpenError};
use crate::state::manifest::ManifestEntry;
use crate::store::{
    Body, CompletedPart, ErrorKind, ObjectMeta, ObjectStore, PutRequest, StoreError,
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
    files: Semaphore,
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
}

/// What became of a planned upload.
#[derive(Debug)]
pub enum Upload {
    Stored(ManifestEntry),
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
        }
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
            files: Semaphore::new(n),
            requests: Arc::new(Semaphore::new(n)),
            part_bytes: Arc::new(Semaphore::new(budget_kib as usize)),
            part_budget_kib: budget_kib,
            limiter,
            stop,
        }
    }

    /// The destination prefix keys are uploaded under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Uploads `entry`: the new manifest record, or why it was not stored (already counted and
    /// logged); `Err` only for a fatal store error that must end the run.
    pub async fn upload(&self, entry: LocalEntry, reason: Reason) -> Result<Upload, StoreError> {
        let _file_slot = self.files.acquire().await.expect("never closed");
        let mut last_change = String::new();
        for _attempt in 0..2 {
            if self.stop.requested().is_some() {
                return Ok(Upload::Skipped(Skip::Stopped));
            }
            match self.attempt(&entry).await {
                Ok(record) => {
                    self.stats
                        .transferred(&entry.path, &entry.key, record.size, &reason);
                    return Ok(Upload::Stored(record));
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

    async fn attempt(&self, entry: &LocalEntry) -> Result<ManifestEntry, Failure> {
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
        let sha256 = match (small, file) {
            (Some((data, sha256, after)), _) => {
                let body = Body::Bytes(Bytes::from(data));
                self.put(&key, body, sha256, before, after, meta).await?
            }
            (None, Some(file)) if before.size > self.threshold => {
                self.multipart(&key, file, before, &meta).await?
            }
            (None, Some(file)) => self.streamed(&key, file, before, meta).await?,
            (None, None) => unreachable!("a file is either read or handed back"),
        };
        Ok(ManifestEntry {
            key: entry.key.clone(),
            size: before.size,
            mtime_ns: before.mtime_ns,
            sha256: Some(sha256),
        })
    }

    /// A file between `SMALL_BODY` and the multipart threshold: hashed in one pass here, then
    /// streamed from disk by the SDK with that hash as its checksum.
    async fn streamed(
        &self,
        key: &str,
        file: File,
        before: Fingerprint,
        meta: ObjectMeta,
    ) -> Result<[u8; 32], Failure> {
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
        self.put(key, body, sha256, before, after, meta).await
    }

    /// One PUT of what was read, unless the file changed while it was read.
    async fn put(
        &self,
        key: &str,
        body: Body,
        sha256: [u8; 32],
        before: Fingerprint,
        after: Fingerprint,
        meta: ObjectMeta,
    ) -> Result<[u8; 32], Failure> {
        if after != before {
            return Err(Failure::Changed(format!(
                "stat {before:?} became {after:?}"
            )));
        }
        let _slot = self.requests.acquire().await.expect("never closed");
        self.throttle(before.size).await;
        self.store
            .put(PutRequest {
                key: key.to_owned(),
                body,
                sha256,
                meta,
            })
            .await?;
        self.stats.sent(before.size);
        Ok(sha256)
    }

    async fn multipart(
        &self,
        key: &str,
        file: File,
        before: Fingerprint,
        meta: &ObjectMeta,
    ) -> Result<[u8; 32], Failure> {
        let upload_id = self.store.create_multipart(key, meta).await?;
        let result = self.parts(key, &upload_id, file, before).await;
        if result.is_err() {
            if let Err(e) = self.store.abort_multipart(key, &upload_id).await {
                tracing::warn!(key, "could not abort multipart upload {upload_id}: {e}");
            }
        }
        result
    }

    async fn parts(
        &self,
        key: &str,
        upload_id: &str,
        file: File,
        before: Fingerprint,
    ) -> Result<[u8; 32], Failure> {
        let part_size = part_size_for(before.size, self.part_size);
        let mut file = Some(file);
        let mut whole = Some(Sha256::new());
        let mut in_flight: JoinSet<Result<CompletedPart, StoreError>> = JoinSet::new();
        let mut done = Vec::new();
        let mut offset = 0u64;
        let mut number = 0i32;
        while offset < before.size {
            // The slot is taken before the part is read, so buffers in memory stay bounded.
            // Waiting for a slot or for memory can take as long as a part's upload: a stop
            // must not wait for it.
            let slot = self
                .until_stopped(self.requests.clone().acquire_owned())
                .await?
                .expect("never closed");
            let want = part_size.min(before.size - offset) as usize;
            let kib = (want as u64)
                .div_ceil(1024)
                .clamp(1, u64::from(self.part_budget_kib));
            let memory = self
                .until_stopped(self.part_bytes.clone().acquire_many_owned(kib as u32))
                .await?
                .expect("never closed");
            let (f, h) = (file.take().expect("file"), whole.take().expect("hasher"));
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
            file = Some(f);
            whole = Some(h);
            number += 1;
            offset += want as u64;
            self.throttle(want as u64).await;
            let store = self.store.clone();
            let (key, upload_id) = (key.to_owned(), upload_id.to_owned());
            in_flight.spawn(async move {
                let _slot = slot;
                let _memory = memory;
                store
                    .upload_part(&key, &upload_id, number, data, part_sha)
                    .await
            });
            // Reap finished parts as we go, so an early failure stops reading.
            while let Some(r) = in_flight.try_join_next() {
                done.push(r.expect("part task panicked")?);
            }
        }
        while let Some(r) = in_flight.join_next().await {
            done.push(r.expect("part task panicked")?);
        }
        let after = Fingerprint::of(file.as_ref().expect("file")).map_err(Failure::from)?;
        if after != before {
            return Err(Failure::Changed(format!(
                "stat {before:?} became {after:?}"
            )));
        }
        done.sort_by_key(|p| p.number);
        self.store.complete_multipart(key, upload_id, done).await?;
        Ok(whole.expect("hasher").finalize().into())
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
