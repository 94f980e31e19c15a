//! The bucket listing as a stream in key order, fetched ahead of the planner — in several key
//! ranges at once when the last manifest says where to cut them.
//!
//! A flat ListObjectsV2 is one request per 1,000 keys, each waiting for the one before (the next
//! page needs the previous page's token): at tens of milliseconds per request on real S3, that
//! round trip, not the walk, bounds a run where nothing changed. So the key space is cut into
//! ranges at keys the manifest recorded (about every `PARTITION_KEYS` keys), each range is listed
//! from its own `StartAfter` by its own task, and the ranges are handed to the planner in order.
//! Without a manifest there are no cuts and the listing is one sequential range.
//!
//! Memory stays bounded whatever the size of the bucket: at most `RANGES_AHEAD` ranges are being
//! listed, each at most `PAGES_AHEAD` pages ahead of its consumer (a bounded channel); a range that
//! holds far more keys than the manifest knew of just waits for the planner.
//!
//! The first page is awaited before the run goes on, so that a missing bucket or denied access
//! fails the run before any file is read.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::keys::shown;
use crate::report::Stats;
use crate::store::{ObjectStore, RemoteObject, StoreError};

/// Keys between two cuts: four pages on S3. A range's end costs no extra request when its cut key
/// is still in the bucket (the usual case), else at most one page of overshoot.
pub const PARTITION_KEYS: usize = 4_000;
/// Ranges listed at once (each one request in flight).
const RANGES_AHEAD: usize = 8;
/// Pages buffered per range (1,000 keys each on S3): a whole range, so that a range ahead of the
/// planner finishes instead of waiting for it — and no more, so memory stays bounded by
/// `RANGES_AHEAD` × this, however large the bucket.
const PAGES_AHEAD: usize = PARTITION_KEYS / 1000 + 1;

type Page = Result<Vec<RemoteObject>, StoreError>;

/// A blocking iterator over the listing, for the planner's thread.
pub struct Listing {
    current: std::vec::IntoIter<RemoteObject>,
    rx: mpsc::Receiver<Page>,
}

impl Iterator for Listing {
    type Item = Result<RemoteObject, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(o) = self.current.next() {
                return Some(Ok(o));
            }
            match self.rx.blocking_recv()? {
                Ok(page) => self.current = page.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Keys `> after` and `<= upto` (relative to the prefix); `None` is open.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    after: Option<String>,
    upto: Option<String>,
}

/// The ranges that `cuts` (sorted, distinct) divide the key space into.
fn ranges(cuts: Vec<String>) -> Vec<Range> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut after = None;
    for cut in cuts {
        out.push(Range {
            after: after.take(),
            upto: Some(cut.clone()),
        });
        after = Some(cut);
    }
    out.push(Range { after, upto: None });
    out
}

/// Starts listing `prefix`, cut at `cuts` (keys relative to the prefix, sorted; empty for one
/// sequential listing), and returns once the first page has arrived.
pub async fn start<S: ObjectStore>(
    store: Arc<S>,
    prefix: String,
    stats: Arc<Stats>,
    cuts: Vec<String>,
) -> Result<Listing, StoreError> {
    let (tx, mut rx) = mpsc::channel(PAGES_AHEAD);
    tokio::spawn(relay(store, prefix, stats, ranges(cuts), tx));
    let current = match rx.recv().await {
        Some(Ok(page)) => page,
        Some(Err(e)) => return Err(e),
        None => Vec::new(),
    };
    Ok(Listing {
        current: current.into_iter(),
        rx,
    })
}

/// Keeps up to `RANGES_AHEAD` ranges listing and passes their pages on, range after range.
async fn relay<S: ObjectStore>(
    store: Arc<S>,
    prefix: String,
    stats: Arc<Stats>,
    ranges: Vec<Range>,
    tx: mpsc::Sender<Page>,
) {
    let mut ranges = ranges.into_iter();
    let mut running: VecDeque<mpsc::Receiver<Page>> = VecDeque::new();
    loop {
        while running.len() < RANGES_AHEAD {
            let Some(range) = ranges.next() else { break };
            let (range_tx, range_rx) = mpsc::channel(PAGES_AHEAD);
            tokio::spawn(list_range(
                store.clone(),
                prefix.clone(),
                stats.clone(),
                range,
                range_tx,
            ));
            running.push_back(range_rx);
        }
        let Some(mut rx) = running.pop_front() else {
            return;
        };
        while let Some(page) = rx.recv().await {
            let failed = page.is_err();
            // A closed receiver (the run ended) or an error ends everything; dropping the other
            // ranges' receivers stops their tasks at their next send.
            if tx.send(page).await.is_err() || failed {
                return;
            }
        }
    }
}

async fn list_range<S: ObjectStore>(
    store: Arc<S>,
    prefix: String,
    stats: Arc<Stats>,
    range: Range,
    tx: mpsc::Sender<Page>,
) {
    let mut token = None;
    // The last key of the page before: the next one must begin past it.
    let mut last: Option<String> = None;
    loop {
        let page = match store
            .list_page(&prefix, range.after.as_deref(), token.take())
            .await
        {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if let Err(e) = follows(&prefix, last.as_deref(), &page.objects) {
            let _ = tx.send(Err(e)).await;
            return;
        }
        if let Some(o) = page.objects.last() {
            last = Some(o.key.clone());
        }
        let mut objects = page.objects;
        let mut done = page.next.is_none();
        if let Some(upto) = &range.upto {
            let end = objects.partition_point(|o| o.key <= *upto);
            // Reaching the cut key itself also ends the range: no page is fetched just to find
            // the next key beyond it.
            done |= end < objects.len() || objects.last().is_some_and(|o| o.key == *upto);
            objects.truncate(end);
        }
        // nightcopy's own objects (the manifest's copy) are no file's.
        objects.retain(|o| !crate::keys::is_reserved(&o.key));
        stats.listed(objects.len() as u64);
        if tx.send(Ok(objects)).await.is_err() || done {
            return;
        }
        token = page.next;
    }
}

/// Whether a page begins past the page before it. The store refuses a token given back
/// unchanged; a server that goes round through several tokens hands out keys already listed, and
/// without this the listing would go round with it.
fn follows(prefix: &str, last: Option<&str>, page: &[RemoteObject]) -> Result<(), StoreError> {
    match (last, page.first()) {
        (Some(last), Some(first)) if first.key.as_str() <= last => {
            Err(StoreError::per_object(format!(
                "listing {}: a page begins at {}, which is not past the last key of the page \
                 before ({}): the server went back, and the listing stopped there instead of \
                 going round",
                shown(prefix),
                shown(&first.key),
                shown(last)
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::store::memory::{MemoryStore, Object, Op};

    fn bucket(keys: impl IntoIterator<Item = String>, page: usize) -> MemoryStore {
        let store = MemoryStore::new(page);
        for k in keys {
            store.insert(&k, Object::default());
        }
        store
    }

    /// Lists `bucket` under `p/` cut at `cuts`; returns the keys and the number of requests.
    fn list_all(bucket: MemoryStore, cuts: Vec<String>) -> (Vec<String>, usize) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let bucket = Arc::new(bucket);
        let stats = Arc::new(Stats::default());
        let listing = rt
            .block_on(start(bucket.clone(), "p/".into(), stats, cuts))
            .unwrap();
        let keys = std::thread::spawn(move || listing.map(|o| o.unwrap().key).collect())
            .join()
            .unwrap();
        (keys, bucket.count(Op::List))
    }

    proptest! {
        /// Whatever the cuts — keys of the bucket, keys it no longer has, keys beyond its end —
        /// the listing yields exactly the bucket's keys under the prefix, once each, in order.
        #[test]
        fn cut_listing_is_the_whole_listing(
            keys in proptest::collection::btree_set("[a-c/.-]{1,6}", 0..300),
            other in proptest::collection::btree_set("[a-c/.-]{1,6}", 0..20),
            stride in 1usize..50,
            extra in proptest::collection::btree_set("[a-d]{1,6}", 0..5),
            page in 1usize..20,
        ) {
            let mut cuts: BTreeSet<String> = keys.iter().step_by(stride).cloned().collect();
            cuts.extend(extra);
            let mut all: BTreeSet<String> = keys.iter().map(|k| format!("p/{k}")).collect();
            all.extend(other.iter().map(|k| format!("q/{k}"))); // outside the prefix
            let bucket = bucket(all, page);
            let (listed, _) = list_all(bucket, cuts.into_iter().collect());
            prop_assert_eq!(listed, keys.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn cuts_at_existing_keys_cost_no_extra_request() {
        let keys: BTreeSet<String> = (0..10_000).map(|i| format!("p/k{i:05}")).collect();
        let cuts: Vec<String> = (1..10).map(|i| format!("k{:05}", i * 1000 - 1)).collect();
        let bucket = || bucket(keys.clone(), 100);
        let (one, sequential) = list_all(bucket(), vec![]);
        let (cut, partitioned) = list_all(bucket(), cuts);
        assert_eq!(one, cut);
        assert_eq!(one.len(), 10_000);
        assert_eq!(sequential, 100);
        assert_eq!(partitioned, 100);
    }

    fn s(k: &str) -> String {
        k.to_owned()
    }

    #[test]
    fn a_page_has_to_begin_past_the_page_before() {
        let page = |keys: &[&str]| -> Vec<RemoteObject> {
            keys.iter()
                .map(|k| RemoteObject {
                    key: s(k),
                    size: 0,
                    last_modified_ns: 0,
                    storage_class: None,
                })
                .collect()
        };
        // (last key of the page before, page, follows)
        let cases: &[(Option<&str>, &[&str], bool)] = &[
            (None, &["a"], true),
            (Some("a"), &["b", "c"], true),
            (Some("a"), &[], true),
            (Some("b"), &["b"], false),
            (Some("c"), &["a", "b"], false),
        ];
        for (last, keys, want) in cases {
            let got = follows("p/", *last, &page(keys));
            assert_eq!(got.is_ok(), *want, "{last:?} {keys:?}: {got:?}");
        }
    }

    #[test]
    fn cuts_make_adjacent_ranges_that_cover_everything() {
        assert_eq!(
            ranges(vec![]),
            vec![Range {
                after: None,
                upto: None
            }]
        );
        assert_eq!(
            ranges(vec![s("b"), s("d")]),
            vec![
                Range {
                    after: None,
                    upto: Some(s("b"))
                },
                Range {
                    after: Some(s("b")),
                    upto: Some(s("d"))
                },
                Range {
                    after: Some(s("d")),
                    upto: None
                },
            ]
        );
    }
}
