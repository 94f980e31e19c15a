//! The one merge of the three key-ordered streams — the walk, the bucket listing and the last
//! manifest — that the backup's planner and `verify` both consume, so that what "the same key"
//! means (duplicates, objects only in the bucket, which record belongs to a file) is decided once.
//! It holds one entry of each stream at a time: memory does not grow with the tree.
//!
//! Also here: opening those three inputs for a config (the manifest checked, the listing started
//! with its first page awaited, the walk's options), which both commands need before they merge.

use std::sync::Arc;

use crate::config::Config;
use crate::error::Fatal;
use crate::list::{self, Listing};
use crate::report::Stats;
use crate::scan::{LocalEntry, ScanOptions};
use crate::state::manifest::{self, Cursor, ManifestEntry, Reader};
use crate::store::{ObjectStore, RemoteObject};

/// One step of the merge, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merged {
    /// A local file, with what the bucket and the manifest hold for its key.
    File {
        entry: LocalEntry,
        remote: Option<RemoteObject>,
        record: Option<ManifestEntry>,
    },
    /// A second local file whose key an earlier one already took (an escaped name equal to a
    /// real one): only the first can be backed up.
    DuplicateKey { entry: LocalEntry },
    /// An object only in the bucket.
    RemoteOnly { key: String },
}

/// The merge. `R` yields `Result` because a listing can fail half way; the merge then yields the
/// error and stops, rather than treating the rest of the tree as missing from the bucket.
pub struct Merge<L, R, M, E>
where
    L: Iterator<Item = LocalEntry>,
    R: Iterator<Item = Result<RemoteObject, E>>,
    M: Iterator<Item = ManifestEntry>,
{
    local: std::iter::Peekable<L>,
    remote: std::iter::Peekable<R>,
    manifest: Cursor<M>,
    last_local: Option<String>,
    failed: bool,
}

impl<L, R, M, E> Merge<L, R, M, E>
where
    L: Iterator<Item = LocalEntry>,
    R: Iterator<Item = Result<RemoteObject, E>>,
    M: Iterator<Item = ManifestEntry>,
{
    pub fn new(local: L, remote: R, manifest: M) -> Self {
        Merge {
            local: local.peekable(),
            remote: remote.peekable(),
            manifest: Cursor::new(manifest),
            last_local: None,
            failed: false,
        }
    }
}

impl<L, R, M, E> Iterator for Merge<L, R, M, E>
where
    L: Iterator<Item = LocalEntry>,
    R: Iterator<Item = Result<RemoteObject, E>>,
    M: Iterator<Item = ManifestEntry>,
{
    type Item = Result<Merged, E>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Some(Err(_)) = self.remote.peek() {
            self.failed = true;
            return self.remote.next().map(|r| r.map(|_| unreachable!()));
        }
        let remote_key = self
            .remote
            .peek()
            .and_then(|r| r.as_ref().ok().map(|o| o.key.as_str()));
        let local_key = self.local.peek().map(|l| l.key.as_str());
        match (local_key, remote_key) {
            (None, None) => None,
            (Some(l), _) if self.last_local.as_deref() == Some(l) => {
                let entry = self.local.next()?;
                Some(Ok(Merged::DuplicateKey { entry }))
            }
            (l, Some(r)) if l.is_none_or(|l| r < l) => {
                let key = self.remote.next()?.ok()?.key;
                Some(Ok(Merged::RemoteOnly { key }))
            }
            (Some(l), r) => {
                let matched = r == Some(l);
                let entry = self.local.next()?;
                self.last_local = Some(entry.key.clone());
                let remote = if matched {
                    self.remote.next()?.ok()
                } else {
                    None
                };
                let record = self.manifest.record(&entry.key);
                Some(Ok(Merged::File {
                    entry,
                    remote,
                    record,
                }))
            }
            (None, Some(_)) => unreachable!("handled by the remote-only arm"),
        }
    }
}

/// The three inputs of a merge for `config`, opened.
pub struct Inputs {
    /// The last manifest, checked whole; `None` when there is none (or it was rejected).
    pub manifest: Option<Reader>,
    /// The listing, its first page already in: a missing bucket or denied access failed
    /// `open` before a single file was read.
    pub remote: Listing,
    pub scan: ScanOptions,
}

impl Inputs {
    /// `fallback` says, for the warning about a rejected manifest, what the command does
    /// without it.
    pub async fn open<S: ObjectStore>(
        config: &Config,
        store: Arc<S>,
        stats: Arc<Stats>,
        fallback: &str,
    ) -> Result<Inputs, Fatal> {
        let manifest = manifest::open_or_warn(
            &config.state_dir.0,
            &config.destination_id(),
            list::PARTITION_KEYS,
            fallback,
        );
        Self::with_manifest(config, store, stats, manifest).await
    }

    /// [`Inputs::open`] with a manifest the caller found (say, the bucket's copy).
    pub async fn with_manifest<S: ObjectStore>(
        config: &Config,
        store: Arc<S>,
        stats: Arc<Stats>,
        mut manifest: Option<Reader>,
    ) -> Result<Inputs, Fatal> {
        let prefix = config.destination.prefix.as_str().to_owned();
        let cuts = manifest.as_mut().map(Reader::take_cuts).unwrap_or_default();
        let remote = list::start(store, prefix, stats, cuts).await?;
        let scan = ScanOptions::for_config(config)?;
        Ok(Inputs {
            manifest,
            remote,
            scan,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    use proptest::prelude::*;

    fn local(key: &str) -> LocalEntry {
        LocalEntry {
            key: key.into(),
            path: key.into(),
            raw_path: None,
            size: 1,
            mtime_ns: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            dev: 0,
            ino: 0,
            nlink: 1,
            blocks: u64::MAX,
            xattrs: None,
            followed: false,
        }
    }

    fn remote(key: &str) -> Result<RemoteObject, Infallible> {
        Ok(RemoteObject {
            key: key.into(),
            size: 1,
            last_modified_ns: 1,
            storage_class: None,
        })
    }

    fn rec(key: &str) -> ManifestEntry {
        ManifestEntry {
            key: key.into(),
            size: 1,
            mtime_ns: 1,
            sha256: None,
            version: None,
        }
    }

    fn merged(locals: &[&str], remotes: &[&str], records: &[&str]) -> Vec<String> {
        Merge::new(
            locals.iter().map(|k| local(k)),
            remotes.iter().map(|k| remote(k)),
            records.iter().map(|k| rec(k)),
        )
        .map(|m| match m.unwrap() {
            Merged::File {
                entry,
                remote,
                record,
            } => format!(
                "{}{}{}",
                entry.key,
                if remote.is_some() { " +remote" } else { "" },
                if record.is_some() { " +record" } else { "" }
            ),
            Merged::DuplicateKey { entry } => format!("duplicate {}", entry.key),
            Merged::RemoteOnly { key } => format!("remote-only {key}"),
        })
        .collect()
    }

    #[test]
    fn keys_meet_in_order() {
        assert_eq!(
            merged(&["b", "b", "d"], &["a", "b", "c"], &["0", "b", "c", "d"]),
            [
                "remote-only a",
                "b +remote +record",
                "duplicate b",
                "remote-only c",
                "d +record"
            ]
        );
    }

    #[test]
    fn a_listing_error_is_yielded_once_and_ends_the_merge() {
        let r: Vec<Result<RemoteObject, &str>> = vec![
            Ok(RemoteObject {
                key: "a".into(),
                size: 1,
                last_modified_ns: 1,
                storage_class: None,
            }),
            Err("boom"),
        ];
        let out: Vec<_> = Merge::new(
            vec![local("a"), local("b")].into_iter(),
            r.into_iter(),
            std::iter::empty(),
        )
        .collect();
        assert_eq!(out.len(), 2);
        assert!(
            out[1].is_err(),
            "b must not come out as a file without an object"
        );
    }

    /// A key of few names and separators below '/', so that overlaps and ordering traps are
    /// common (the planner's property tests use it too).
    pub(crate) fn key() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "b", "a-", "a/", "a.b", "é"], 1..4)
            .prop_map(|v| v.concat())
            .prop_filter("no empty or trailing-slash keys", |k| {
                !k.ends_with('/') && !k.contains("//")
            })
    }

    fn keys() -> impl Strategy<Value = std::collections::BTreeSet<String>> {
        proptest::collection::btree_set(key(), 0..12)
    }

    proptest! {
        /// Every local file comes out once, with exactly its key's object and record; every
        /// object without a file comes out as remote-only; nothing else comes out.
        #[test]
        fn each_key_is_met_once_with_what_belongs_to_it(l in keys(), r in keys(), m in keys()) {
            let out: Vec<Merged> = Merge::new(
                l.iter().map(|k| local(k)),
                r.iter().map(|k| remote(k)),
                m.iter().map(|k| rec(k)),
            )
            .map(Result::unwrap)
            .collect();
            let mut files = BTreeMap::new();
            let mut remote_only = Vec::new();
            for step in out {
                match step {
                    Merged::File { entry, remote, record } => {
                        prop_assert!(remote.as_ref().is_none_or(|o| o.key == entry.key));
                        prop_assert!(record.as_ref().is_none_or(|e| e.key == entry.key));
                        files.insert(entry.key, (remote.is_some(), record.is_some()));
                    }
                    Merged::RemoteOnly { key } => remote_only.push(key),
                    Merged::DuplicateKey { .. } => prop_assert!(false, "no duplicates in a set"),
                }
            }
            let want: BTreeMap<String, (bool, bool)> = l
                .iter()
                .map(|k| (k.clone(), (r.contains(k), m.contains(k))))
                .collect();
            prop_assert_eq!(files, want);
            let want_remote_only: Vec<String> = r.iter().filter(|k| !l.contains(*k)).cloned().collect();
            prop_assert_eq!(remote_only, want_remote_only);
        }
    }
}
