//! Decides, file by file, what to upload and why, over the merge of three streams sorted by key
//! (`merge`): the local scan, the bucket listing and the last run's manifest. No I/O here, so every
//! rule is tested directly, including by property tests.
//!
//! There is no delete in this vocabulary: an object only in the bucket is reported and left alone,
//! which is what makes an accidental local delete impossible to propagate.

use std::fmt;

use crate::merge::{Merge, Merged};
use crate::scan::LocalEntry;
use crate::state::manifest::ManifestEntry;
use crate::store::{RemoteObject, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Neither in the bucket nor in the manifest.
    New,
    /// Recorded as uploaded, but the bucket no longer has it.
    MissingRemotely,
    /// Size differs from the bucket's or the manifest's.
    SizeChanged,
    /// Same size, but the mtime differs from the manifest's (either direction), or — with no
    /// manifest entry — the file is newer than the object.
    MtimeChanged,
}

impl Reason {
    /// The reason its `Display` names (it travels as text in a work batch).
    pub fn from_name(name: &str) -> Option<Reason> {
        [
            Reason::New,
            Reason::MissingRemotely,
            Reason::SizeChanged,
            Reason::MtimeChanged,
        ]
        .into_iter()
        .find(|r| r.to_string() == name)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::New => "new",
            Reason::MissingRemotely => "missing-remotely",
            Reason::SizeChanged => "size-changed",
            Reason::MtimeChanged => "mtime-changed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Upload {
        entry: LocalEntry,
        reason: Reason,
        /// The manifest entry of what the bucket holds now, kept if this upload fails.
        previous: Option<ManifestEntry>,
    },
    /// Nothing to do; `record` goes into the next manifest.
    Unchanged { record: ManifestEntry },
    /// A second local file mapped to the same key (an escaped name equal to a real one).
    DuplicateKey { entry: LocalEntry },
    /// Only in the bucket: left alone.
    RemoteOnly { key: String },
}

/// A step as a run receives it: a listing that failed half way ends the plan with its error.
pub type StepResult = Result<Step, StoreError>;

/// The decisions over the merge of the walk, the listing and the manifest (`merge`). A listing
/// that fails half way stops the plan rather than making the rest of the tree look new.
pub struct Planner<L, R, M, E>
where
    L: Iterator<Item = LocalEntry>,
    R: Iterator<Item = Result<RemoteObject, E>>,
    M: Iterator<Item = ManifestEntry>,
{
    merge: Merge<L, R, M, E>,
}

impl<L, R, M, E> Planner<L, R, M, E>
where
    L: Iterator<Item = LocalEntry>,
    R: Iterator<Item = Result<RemoteObject, E>>,
    M: Iterator<Item = ManifestEntry>,
{
    pub fn new(local: L, remote: R, manifest: M) -> Self {
        Planner {
            merge: Merge::new(local, remote, manifest),
        }
    }
}

/// The rules for one file, given what the bucket and the manifest hold for its key.
fn decide(
    entry: LocalEntry,
    remote: Option<RemoteObject>,
    recorded: Option<ManifestEntry>,
) -> Step {
    let reason = match (&remote, &recorded) {
        (None, None) => Some(Reason::New),
        (None, Some(_)) => Some(Reason::MissingRemotely),
        (Some(r), _) if r.size != entry.size => Some(Reason::SizeChanged),
        (Some(_), Some(m)) if m.size != entry.size => Some(Reason::SizeChanged),
        (Some(_), Some(m)) if m.mtime_ns != entry.mtime_ns => Some(Reason::MtimeChanged),
        (Some(_), Some(_)) => None,
        // No record of our own (a new host, or a manifest lost): trust an object that is as
        // large as the file and younger than its mtime.
        (Some(r), None) if entry.mtime_ns > r.last_modified_ns => Some(Reason::MtimeChanged),
        (Some(_), None) => None,
    };
    match reason {
        Some(reason) => Step::Upload {
            previous: recorded.filter(|_| remote.is_some()),
            entry,
            reason,
        },
        None => Step::Unchanged {
            record: recorded.unwrap_or(ManifestEntry {
                key: entry.key,
                size: entry.size,
                mtime_ns: entry.mtime_ns,
                sha256: None,
                version: None,
            }),
        },
    }
}

impl<L, R, M, E> Iterator for Planner<L, R, M, E>
where
    L: Iterator<Item = LocalEntry>,
    R: Iterator<Item = Result<RemoteObject, E>>,
    M: Iterator<Item = ManifestEntry>,
{
    type Item = Result<Step, E>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.merge.next()?.map(|m| match m {
            Merged::File {
                entry,
                remote,
                record,
            } => decide(entry, remote, record),
            Merged::DuplicateKey { entry } => Step::DuplicateKey { entry },
            Merged::RemoteOnly { key } => Step::RemoteOnly { key },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    fn local(key: &str, size: u64, mtime_ns: i64) -> LocalEntry {
        LocalEntry {
            key: key.into(),
            path: key.into(),
            raw_path: None,
            size,
            mtime_ns,
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

    fn remote(key: &str, size: u64, last_modified_ns: i64) -> Result<RemoteObject, Infallible> {
        Ok(RemoteObject {
            key: key.into(),
            size,
            last_modified_ns,
            storage_class: None,
        })
    }

    fn rec(key: &str, size: u64, mtime_ns: i64) -> ManifestEntry {
        ManifestEntry {
            key: key.into(),
            size,
            mtime_ns,
            sha256: Some([1; 32]),
            version: None,
        }
    }

    fn plan(
        l: Vec<LocalEntry>,
        r: Vec<Result<RemoteObject, Infallible>>,
        m: Vec<ManifestEntry>,
    ) -> Vec<Step> {
        Planner::new(l.into_iter(), r.into_iter(), m.into_iter())
            .map(Result::unwrap)
            .collect()
    }

    fn reason_of(steps: &[Step], key: &str) -> Option<Reason> {
        steps.iter().find_map(|s| match s {
            Step::Upload { entry, reason, .. } if entry.key == key => Some(*reason),
            _ => None,
        })
    }

    #[test]
    fn rules_table() {
        // (local, remote, manifest) -> expected reason (None = unchanged)
        let cases: Vec<(_, _, _, Option<Reason>)> = vec![
            (local("f", 10, 100), None, None, Some(Reason::New)),
            (
                local("f", 10, 100),
                None,
                Some(rec("f", 10, 100)),
                Some(Reason::MissingRemotely),
            ),
            (
                local("f", 10, 100),
                Some(remote("f", 11, 500)),
                Some(rec("f", 10, 100)),
                Some(Reason::SizeChanged),
            ),
            (
                local("f", 10, 100),
                Some(remote("f", 10, 500)),
                Some(rec("f", 9, 100)),
                Some(Reason::SizeChanged),
            ),
            (
                local("f", 10, 100),
                Some(remote("f", 10, 500)),
                Some(rec("f", 10, 100)),
                None,
            ),
            // content changed, same size, mtime moved backwards: caught by the manifest
            (
                local("f", 10, 50),
                Some(remote("f", 10, 500)),
                Some(rec("f", 10, 100)),
                Some(Reason::MtimeChanged),
            ),
            // no manifest: listing fallback
            (local("f", 10, 100), Some(remote("f", 10, 500)), None, None),
            (
                local("f", 10, 600),
                Some(remote("f", 10, 500)),
                None,
                Some(Reason::MtimeChanged),
            ),
        ];
        for (l, r, m, want) in cases {
            let steps = plan(
                vec![l.clone()],
                r.into_iter().collect(),
                m.into_iter().collect(),
            );
            assert_eq!(steps.len(), 1, "{steps:?}");
            assert_eq!(reason_of(&steps, "f"), want, "{l:?}");
        }
    }

    // A reference model of the rules over maps, for the property tests.
    type Tree = BTreeMap<String, (u64, i64)>;

    fn tree_strategy() -> impl Strategy<Value = Tree> {
        proptest::collection::btree_map(crate::merge::tests::key(), (0u64..3, 0i64..4), 0..12)
    }

    type Streams = (
        Vec<LocalEntry>,
        Vec<Result<RemoteObject, Infallible>>,
        Vec<ManifestEntry>,
    );

    /// The three sorted streams of the trees (key → (size, mtime or upload time)).
    fn streams(local_tree: &Tree, remote_tree: &Tree, manifest_tree: &Tree) -> Streams {
        (
            local_tree
                .iter()
                .map(|(k, &(s, m))| local(k, s, m))
                .collect(),
            remote_tree
                .iter()
                .map(|(k, &(s, m))| remote(k, s, m))
                .collect(),
            manifest_tree
                .iter()
                .map(|(k, &(s, t))| rec(k, s, t))
                .collect(),
        )
    }

    proptest! {
        #[test]
        fn plan_never_deletes_and_uploads_exactly_the_changed(
            local_tree in tree_strategy(),
            remote_tree in tree_strategy(),
            manifest_tree in tree_strategy(),
        ) {
            let (l, r, m) = streams(&local_tree, &remote_tree, &manifest_tree);
            let steps = plan(l, r, m);

            let mut uploaded = BTreeMap::new();
            let mut remote_only = Vec::new();
            let mut unchanged = Vec::new();
            for s in &steps {
                match s {
                    Step::Upload { entry, .. } => { uploaded.insert(entry.key.clone(), ()); }
                    Step::RemoteOnly { key } => remote_only.push(key.clone()),
                    Step::Unchanged { record } => unchanged.push(record.key.clone()),
                    Step::DuplicateKey { .. } => prop_assert!(false, "no duplicates in a map"),
                }
            }
            // Every local file is decided exactly once; every bucket-only object is left alone.
            prop_assert_eq!(uploaded.len() + unchanged.len(), local_tree.len());
            let want_remote_only: Vec<_> = remote_tree.keys().filter(|k| !local_tree.contains_key(*k)).cloned().collect();
            prop_assert_eq!(remote_only, want_remote_only);
            // Uploads are exactly the new or changed files.
            for (k, &(size, mtime)) in &local_tree {
                let must = match (remote_tree.get(k), manifest_tree.get(k)) {
                    (None, _) => true,
                    (Some(&(rs, _)), _) if rs != size => true,
                    (Some(_), Some(&m)) => m != (size, mtime),
                    (Some(&(_, lm)), None) => mtime > lm,
                };
                prop_assert_eq!(uploaded.contains_key(k), must, "key {:?}", k);
            }
        }

        #[test]
        fn second_run_over_an_unchanged_tree_plans_nothing(
            local_tree in tree_strategy(),
            remote_tree in tree_strategy(),
            manifest_tree in tree_strategy(),
        ) {
            let (l, r, m) = streams(&local_tree, &remote_tree, &manifest_tree);
            // Apply the first run: uploads land in the bucket (uploaded "now", after every mtime)
            // and in the manifest; unchanged records carry over.
            let mut bucket = remote_tree.clone();
            let mut next_manifest = Vec::new();
            for s in plan(l.clone(), r, m) {
                match s {
                    Step::Upload { entry, .. } => {
                        bucket.insert(entry.key.clone(), (entry.size, 1_000));
                        next_manifest.push(rec(&entry.key, entry.size, entry.mtime_ns));
                    }
                    Step::Unchanged { record } => next_manifest.push(record),
                    _ => {}
                }
            }
            let r2: Vec<_> = bucket.iter().map(|(k, &(s, m))| remote(k, s, m)).collect();
            let again = plan(l, r2, next_manifest);
            prop_assert!(again.iter().all(|s| !matches!(s, Step::Upload { .. })), "{:?}", again);
        }
    }
}
