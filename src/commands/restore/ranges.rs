//! A large object comes down as ranged GETs side by side: one stream per object is what one
//! connection and one server disk give (about 120 MiB/s each on the bench), and a restore of a
//! few big files would otherwise leave most download slots idle.
//!
//! The promise of the single stream is kept: every byte that gets a file its name is hashed, in
//! order, and checked against what was backed up. Ranges land in the temp file at their offsets
//! (`pwrite`) in whatever order they finish; the hash follows the finished prefix by reading the
//! file back (from the page cache), so memory is one buffer per range in flight, not the ranges
//! that arrived early. Every range is of the same bytes: a version is pinned by its id, an
//! unversioned object by the ETag of the GET that began it (If-Match: a replaced object fails
//! the file's attempt, it never mixes two objects).
//!
//! Extra streams take free download slots only (`try_acquire`): files waiting for a slot are
//! never held up by another file's ranges, and a file always progresses on the slot it began
//! with.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::fsutil::blocking;
use crate::store::{ObjectStore, StoreError};

/// Streams one object is fetched with at most (its first GET's slot included).
pub const MAX_STREAMS: usize = 8;
/// Ranges fetched ahead of the hashed prefix at most: what one slow range lets pile up on disk
/// unhashed.
const WINDOW: u64 = 2 * MAX_STREAMS as u64;
/// Bytes gathered from a range's stream (as the chunks they came in, not copied) before one
/// positional write, and read back at a time. Measured on the bench's 4 × 256 MiB: 1 MiB took
/// twice the system time of 256 KiB (buffers that large are mapped and unmapped by the
/// allocator each time, and page-faulted in).
const BUF: usize = 256 * 1024;

/// Takes the file's bytes in order (the hashes, the zero check of sparse extents).
pub trait Sink: Send + 'static {
    fn update(&mut self, bytes: &[u8]);
}

/// Which bytes every range must be of.
#[derive(Debug, Clone)]
pub enum Pin {
    Version(String),
    ETag(String),
}

/// The object, and the part of it still to fetch: `from..size` in ranges of `range` bytes.
pub struct Rest<S> {
    pub store: Arc<S>,
    pub key: String,
    pub pin: Pin,
    pub from: u64,
    pub size: u64,
    pub range: u64,
}

#[derive(Debug)]
pub enum RangeError {
    Store(StoreError),
    Local(String),
}

impl<S> Rest<S> {
    fn count(&self) -> u64 {
        (self.size - self.from).div_ceil(self.range)
    }

    fn span(&self, index: u64) -> Range<u64> {
        let start = self.from + index * self.range;
        start..(start + self.range).min(self.size)
    }
}

/// What the ranges tell the one that hashes.
enum Report {
    Done(u64),
    Failed(RangeError),
    /// A stream ended: nothing left to claim.
    Left,
}

struct Shared<S> {
    rest: Rest<S>,
    file: Arc<File>,
    /// The next range no stream has claimed yet.
    next: AtomicU64,
    /// Ranges hashed so far (a prefix).
    hashed: watch::Sender<u64>,
    reports: mpsc::UnboundedSender<Report>,
}

/// Fetches `rest` into `file` at its offsets and feeds `sink` the bytes `rest.from..rest.size`
/// in order, read back from the file. `slot` is the file's own download slot; more are taken
/// from `slots` while they are free. Returns the sink once every byte went through it.
pub async fn fetch<S: ObjectStore, K: Sink>(
    rest: Rest<S>,
    file: Arc<File>,
    slot: OwnedSemaphorePermit,
    slots: Arc<Semaphore>,
    sink: K,
) -> Result<K, RangeError> {
    let count = rest.count();
    let (reports, mut inbox) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        rest,
        file,
        next: AtomicU64::new(0),
        hashed: watch::Sender::new(0),
        reports,
    });
    // Dropped on an error: the streams still running are aborted with it.
    let mut streams = JoinSet::new();
    streams.spawn(stream(shared.clone(), slot, true));
    let mut running = 1;
    let mut arrived = BTreeSet::new();
    let mut sink = Some((sink, vec![0; BUF]));
    let mut hashed = 0;
    while hashed < count {
        while running < MAX_STREAMS && shared.unclaimed(hashed) > running as u64 {
            let Ok(more) = slots.clone().try_acquire_owned() else {
                break;
            };
            streams.spawn(stream(shared.clone(), more, false));
            running += 1;
        }
        match inbox.recv().await.expect("a sender is held here") {
            Report::Done(index) => {
                arrived.insert(index);
            }
            Report::Failed(e) => return Err(e),
            Report::Left => running -= 1,
        }
        while arrived.remove(&hashed) {
            let (file, span) = (shared.file.clone(), shared.rest.span(hashed));
            let (mut taken, mut buf) = sink.take().expect("put back after each range");
            sink = Some(
                blocking(move || {
                    read_back(&file, span, &mut taken, &mut buf).map(|()| (taken, buf))
                })
                .await
                .map_err(|e| RangeError::Local(format!("cannot read the file back: {e}")))?,
            );
            hashed += 1;
            shared.hashed.send_replace(hashed);
        }
        if running == 0 && hashed < count {
            // Unreachable unless a stream ended without reporting its range.
            return Err(RangeError::Local(format!(
                "{} of {count} ranges never arrived",
                count - hashed
            )));
        }
    }
    // Every range is in: the streams are ending, and with them their hold on the file.
    while streams.join_next().await.is_some() {}
    Ok(sink.expect("put back after each range").0)
}

impl<S> Shared<S> {
    /// Ranges no stream has claimed yet that are within the window of `hashed`.
    fn unclaimed(&self, hashed: u64) -> u64 {
        let end = (hashed + WINDOW).min(self.rest.count());
        end.saturating_sub(self.next.load(Relaxed))
    }

    /// The next range within the window, or `None` when there is none: a stream on a slot of
    /// its own never waits for the hash to catch up while holding it (another file may want
    /// it); the coordinator starts one again when there is work.
    fn claim_within(&self, hashed: u64) -> Option<u64> {
        let end = (hashed + WINDOW).min(self.rest.count());
        let mut next = self.next.load(Relaxed);
        loop {
            if next >= end {
                return None;
            }
            match self
                .next
                .compare_exchange_weak(next, next + 1, Relaxed, Relaxed)
            {
                Ok(_) => return Some(next),
                Err(now) => next = now,
            }
        }
    }
}

/// Tells the coordinator a stream has ended, however it ended: a stream that stopped without
/// reporting its range (a panic) fails the file, rather than leave it waiting for that range.
struct Leaving<'a> {
    reports: &'a mpsc::UnboundedSender<Report>,
    clean: bool,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        if !self.clean {
            let why = "a range's download ended without a result".to_owned();
            let _ = self.reports.send(Report::Failed(RangeError::Local(why)));
        }
        let _ = self.reports.send(Report::Left);
    }
}

/// One stream: claims ranges in order until none is left, on one download slot. The file's own
/// stream (`own`) waits for the hash to come within reach of its next range; another ends.
async fn stream<S: ObjectStore>(shared: Arc<Shared<S>>, slot: OwnedSemaphorePermit, own: bool) {
    let count = shared.rest.count();
    let mut hashed = shared.hashed.subscribe();
    let mut leaving = Leaving {
        reports: &shared.reports,
        clean: false,
    };
    loop {
        let index = if own {
            let index = shared.next.fetch_add(1, Relaxed);
            if index >= count || hashed.wait_for(|&h| index < h + WINDOW).await.is_err() {
                break;
            }
            index
        } else {
            match shared.claim_within(*hashed.borrow()) {
                Some(index) => index,
                None => break,
            }
        };
        match fetch_range(&shared, index).await {
            Ok(()) => {
                let _ = shared.reports.send(Report::Done(index));
            }
            Err(e) => {
                let _ = shared.reports.send(Report::Failed(e));
                break;
            }
        }
    }
    drop(slot);
    leaving.clean = true;
}

async fn fetch_range<S: ObjectStore>(shared: &Shared<S>, index: u64) -> Result<(), RangeError> {
    let rest = &shared.rest;
    let span = rest.span(index);
    let (version, etag) = match &rest.pin {
        Pin::Version(v) => (Some(v.as_str()), None),
        Pin::ETag(e) => (None, Some(e.as_str())),
    };
    let mut body = rest
        .store
        .get_range(&rest.key, version, etag, span.clone())
        .await
        .map_err(RangeError::Store)?;
    let mut at = span.start;
    let (mut chunks, mut gathered) = (Vec::new(), 0);
    let mut ended = false;
    while !ended {
        match body.next().await {
            Some(chunk) => {
                let chunk = chunk.map_err(RangeError::Store)?;
                gathered += chunk.len();
                chunks.push(chunk);
            }
            None => ended = true,
        }
        if at + gathered as u64 > span.end {
            return Err(RangeError::Store(StoreError::per_object(format!(
                "the range {}-{} came with more bytes than asked for",
                span.start,
                span.end - 1
            ))));
        }
        if gathered >= BUF || (ended && gathered > 0) {
            let (file, data, offset) = (shared.file.clone(), std::mem::take(&mut chunks), at);
            at += gathered as u64;
            gathered = 0;
            chunks = blocking(move || write_all_at(&file, &data, offset).map(|()| data))
                .await
                .map_err(|e| RangeError::Local(format!("cannot write: {e}")))?;
            chunks.clear();
        }
    }
    if at != span.end {
        return Err(RangeError::Store(StoreError::per_object(format!(
            "the download of bytes {}-{} ended after {} bytes",
            span.start,
            span.end - 1,
            at - span.start
        ))));
    }
    Ok(())
}

/// Writes `chunks` one after the other at `offset`, with as few calls as the kernel takes.
fn write_all_at(file: &File, chunks: &[bytes::Bytes], mut offset: u64) -> io::Result<()> {
    let (mut first, mut skip) = (0, 0);
    while first < chunks.len() {
        let slices: Vec<io::IoSlice> = chunks[first..]
            .iter()
            .enumerate()
            .map(|(i, c)| io::IoSlice::new(if i == 0 { &c[skip..] } else { c }))
            .take(512)
            .collect();
        let mut n = nix::sys::uio::pwritev(file, &slices, offset as i64)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        while n > 0 {
            let left = chunks[first].len() - skip;
            if n >= left {
                n -= left;
                (first, skip) = (first + 1, 0);
            } else {
                skip += n;
                n = 0;
            }
        }
        while first < chunks.len() && chunks[first].len() == skip {
            (first, skip) = (first + 1, 0);
        }
    }
    Ok(())
}

/// Feeds `sink` the bytes of `span` as the file holds them.
fn read_back(
    file: &File,
    span: Range<u64>,
    sink: &mut impl Sink,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut at = span.start;
    while at < span.end {
        let want = ((span.end - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..want], at)?;
        sink.update(&buf[..want]);
        at += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{MemoryStore, Object, Op};
    use sha2::{Digest, Sha256};

    struct Hash(Sha256, u64);
    impl Sink for Hash {
        fn update(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
            self.1 += bytes.len() as u64;
        }
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    async fn fetch_into(
        store: Arc<MemoryStore>,
        pin: Pin,
        size: u64,
        slots: usize,
    ) -> (Result<Hash, RangeError>, File) {
        let file = tempfile::tempfile().unwrap();
        let copy = file.try_clone().unwrap();
        let slots = Arc::new(Semaphore::new(slots));
        let slot = slots.clone().acquire_owned().await.unwrap();
        let rest = Rest {
            store,
            key: "k".into(),
            pin,
            from: 100,
            size,
            range: 1000,
        };
        let got = fetch(rest, Arc::new(file), slot, slots, Hash(Sha256::new(), 0)).await;
        (got, copy)
    }

    #[tokio::test]
    async fn the_ranges_land_at_their_offsets_and_are_hashed_in_order() {
        for (len, slots) in [(100_000, 16), (10_101, 1), (1_100, 3), (5_000, 2)] {
            let data = body(len);
            let store = Arc::new(MemoryStore::new(1000));
            store.insert("k", Object::new(data.clone(), None));
            let etag = store.object("k").unwrap().etag();
            let (got, file) = fetch_into(store.clone(), Pin::ETag(etag), len as u64, slots).await;
            let got = got.unwrap();
            assert_eq!(got.1, len as u64 - 100);
            assert_eq!(
                got.0.finalize().as_slice(),
                Sha256::digest(&data[100..]).as_slice()
            );
            let mut back = vec![0; len - 100];
            file.read_exact_at(&mut back, 100).unwrap();
            assert_eq!(back, data[100..]);
            assert_eq!(
                store.count(Op::GetRange) as u64,
                (len as u64 - 100).div_ceil(1000)
            );
        }
    }

    #[test]
    fn a_stream_that_ends_without_a_result_fails_the_file_instead_of_leaving_it_waiting() {
        let (reports, mut inbox) = mpsc::unbounded_channel();
        // As a panic in the middle of a range would leave it.
        drop(Leaving {
            reports: &reports,
            clean: false,
        });
        assert!(matches!(
            inbox.try_recv(),
            Ok(Report::Failed(RangeError::Local(_)))
        ));
        assert!(matches!(inbox.try_recv(), Ok(Report::Left)));
        drop(Leaving {
            reports: &reports,
            clean: true,
        });
        assert!(matches!(inbox.try_recv(), Ok(Report::Left)));
        assert!(inbox.try_recv().is_err());
    }

    #[test]
    fn chunks_are_written_one_after_the_other_empty_ones_too() {
        let file = tempfile::tempfile().unwrap();
        let chunks: Vec<bytes::Bytes> = ["", "ab", "", "cde", "f", ""]
            .iter()
            .map(|s| bytes::Bytes::from_static(s.as_bytes()))
            .collect();
        write_all_at(&file, &chunks, 3).unwrap();
        let mut back = vec![0; 9];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, b"\0\0\0abcdef");
    }

    #[tokio::test]
    async fn a_replaced_object_fails_the_file_rather_than_mix_two() {
        let store = Arc::new(MemoryStore::new(1000));
        store.insert("k", Object::new(body(50_000), None));
        let stale = store.object("k").unwrap().etag();
        store.insert("k", Object::new(vec![1u8; 50_000], None));
        let (got, _) = fetch_into(store, Pin::ETag(stale), 50_000, 4).await;
        match got {
            Err(RangeError::Store(e)) => assert!(e.message.contains("PreconditionFailed")),
            other => panic!("{:?}", other.map(|h| h.1)),
        }
    }

    #[tokio::test]
    async fn a_short_object_is_an_error_not_a_short_file() {
        let store = Arc::new(MemoryStore::new(1000));
        store.insert("k", Object::new(body(3_000), None));
        let etag = store.object("k").unwrap().etag();
        let (got, _) = fetch_into(store, Pin::ETag(etag), 9_000, 4).await;
        assert!(
            matches!(got, Err(RangeError::Store(_))),
            "{:?}",
            got.map(|h| h.1)
        );
    }

    #[tokio::test]
    async fn extra_streams_take_only_free_slots_and_give_them_back() {
        let data = body(40_000);
        let store = Arc::new(MemoryStore::new(1000));
        store.insert("k", Object::new(data, None));
        let etag = store.object("k").unwrap().etag();
        let slots = Arc::new(Semaphore::new(4));
        let held = slots.clone().acquire_many_owned(3).await.unwrap();
        let slot = slots.clone().acquire_owned().await.unwrap();
        let rest = Rest {
            store,
            key: "k".into(),
            pin: Pin::ETag(etag),
            from: 0,
            size: 40_000,
            range: 1000,
        };
        let file = Arc::new(tempfile::tempfile().unwrap());
        // Every slot is taken: the file goes on on its own.
        let got = fetch(rest, file, slot, slots.clone(), Hash(Sha256::new(), 0))
            .await
            .unwrap();
        assert_eq!(got.1, 40_000);
        drop(held);
        assert_eq!(slots.available_permits(), 4);
    }
}
