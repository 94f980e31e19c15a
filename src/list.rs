//! The bucket listing as a stream in key order, fetched page by page ahead of the planner.
//!
//! Only the first page is awaited before the run goes on, so that a missing bucket or denied access
//! fails the run before any file is read; the rest is fetched by a task that stays at most a few
//! pages ahead (a bounded channel), so memory does not grow with the bucket.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::plan::RemoteObject;
use crate::store::{ObjectStore, StoreError};

/// Pages buffered ahead of the planner (1,000 keys each on S3).
const PAGES_AHEAD: usize = 4;

/// A blocking iterator over the listing, for the planner's thread.
pub struct Listing {
    current: std::vec::IntoIter<RemoteObject>,
    rx: mpsc::Receiver<Result<Vec<RemoteObject>, StoreError>>,
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

pub async fn start<S: ObjectStore>(
    store: Arc<S>,
    prefix: String,
    stats: Arc<crate::report::Stats>,
) -> Result<Listing, StoreError> {
    let first = store.list_page(&prefix, None).await?;
    stats.listed(first.objects.len() as u64);
    let (tx, rx) = mpsc::channel(PAGES_AHEAD);
    let mut next = first.next;
    tokio::spawn(async move {
        while let Some(token) = next.take() {
            match store.list_page(&prefix, Some(token)).await {
                Ok(page) => {
                    next = page.next;
                    stats.listed(page.objects.len() as u64);
                    if tx.send(Ok(page.objects)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    Ok(Listing {
        current: first.objects.into_iter(),
        rx,
    })
}
