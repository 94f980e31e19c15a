//! What changed between two snapshots — pure, so every rule is tested without a bucket.
//!
//! Both snapshots' entries come as streams in the walk's order, and are merge-joined in that
//! order, so memory does not grow with the tree. The order is recomputed from each entry's path,
//! never taken on trust (anyone who can write the prefix can write a snapshot): a file's,
//! hard link's, symlink's or special file's key (`keys::relative_key` of its path), a
//! directory's key with a `/` after it. An entry out of that order, a path that is no path below
//! the source, or a path given twice is refused with the entry's number, rather than compared.
//!
//! Each path comes out at most once, classed:
//! - `added` / `removed`: only in the newer / older snapshot;
//! - `changed`: its content differs — a file's or hard link's size or SHA-256, a symlink's target,
//!   the earlier name a hard link shares its inode with, a device's number — or its kind (a file
//!   that became a symlink, a directory that became a file);
//! - `metadata`: only its permission bits, owner, mtime or extended attributes differ.
//!
//! Two names can share a key (an escaped name equal to a real one, docs/keys.md): such entries
//! come together in the walk, are met as one group and joined by their raw paths. Two
//! *directories* whose names share a key do not: the walk gives the second after the first's
//! whole subtree, out of key order, so a snapshot of such a tree is refused like any other out of
//! order.
//!
//! A path that is a directory on one side and not on the other sorts at two places (`name` and
//! `name/`, with `name-b` and `name.txt` between them). Its first entry is held, with the changes
//! that follow it, until the merge passes `name/`; then it is one `changed` line at its first
//! place. What is held is bounded (`HOLD_CHANGES`, `HOLD_BYTES`): past that, the held entry is
//! given up as `removed` or `added` and its other half comes out on its own, so the output stays
//! in order and memory flat.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::keys::{self, shown};
use crate::snapshot::{Entry, Kind};

/// Changes held behind a path whose kind may have changed between a directory and something
/// else, at most.
pub const HOLD_CHANGES: usize = 1024;
/// Their paths and targets, at most.
pub const HOLD_BYTES: usize = 8 << 20;
/// Paths of one snapshot that share one key, at most: an escaped name and a real one can, a
/// handful could in a directory of deliberately awkward names; more is no walk's output.
pub const MAX_ALIKE: usize = 16;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Added,
    Removed,
    Changed,
    Metadata,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Added => "added",
            Class::Removed => "removed",
            Class::Changed => "changed",
            Class::Metadata => "metadata",
        }
    }
}

/// Which snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Older,
    Newer,
}

/// One difference of a path found on both sides: old value, new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Kind(Kind, Kind),
    Size(u64, u64),
    Sha256(Option<String>, Option<String>),
    /// A symlink's target, raw bytes.
    Target(Vec<u8>, Vec<u8>),
    /// The earlier path a hard link shares its inode with, raw bytes.
    Link(Vec<u8>, Vec<u8>),
    Rdev(Option<u64>, Option<u64>),
    /// Permission bits (the type is the kind).
    Mode(u32, u32),
    /// (uid, gid).
    Owner((u32, u32), (u32, u32)),
    Mtime(i64, i64),
    Xattrs,
}

impl What {
    /// Content, not metadata: it makes the path `changed`.
    pub fn is_content(&self) -> bool {
        !matches!(
            self,
            What::Mode(..) | What::Owner(..) | What::Mtime(..) | What::Xattrs
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            What::Kind(..) => "kind",
            What::Size(..) => "size",
            What::Sha256(..) => "sha256",
            What::Target(..) => "target",
            What::Link(..) => "link",
            What::Rdev(..) => "rdev",
            What::Mode(..) => "mode",
            What::Owner(..) => "owner",
            What::Mtime(..) => "mtime",
            What::Xattrs => "xattrs",
        }
    }

    fn bytes(&self) -> usize {
        match self {
            What::Target(a, b) | What::Link(a, b) => a.len() + b.len(),
            What::Sha256(a, b) => {
                a.as_ref().map_or(0, String::len) + b.as_ref().map_or(0, String::len)
            }
            _ => 0,
        }
    }
}

/// One path that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub class: Class,
    /// What it is now (what it was, when removed).
    pub kind: Kind,
    /// Relative to the source, raw bytes (received input: escape it to show it).
    pub path: Vec<u8>,
    /// For `changed` and `metadata`: what differs, content first.
    pub what: Vec<What>,
}

impl Change {
    fn bytes(&self) -> usize {
        64 + self.path.len() + self.what.iter().map(What::bytes).sum::<usize>()
    }
}

/// Why an entry is not compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Empty, absolute, with an empty, `.` or `..` component, or a NUL byte.
    NotAPath(Vec<u8>),
    /// Its key sorts before the key of the entry before it.
    OutOfOrder { path: Vec<u8>, after: String },
    /// The same path twice.
    Twice(Vec<u8>),
    /// More than `MAX_ALIKE` paths with this key.
    TooManyAlike(String),
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |b: &[u8]| shown(OsStr::from_bytes(b)).to_string();
        match self {
            Bad::NotAPath(path) => write!(f, "its path {:?} is no path below the source", p(path)),
            Bad::OutOfOrder { path, after } => write!(
                f,
                "{:?} comes after {:?}, out of the walk's order",
                p(path),
                shown(after).to_string()
            ),
            Bad::Twice(path) => write!(f, "its path {:?} is there twice", p(path)),
            Bad::TooManyAlike(key) => write!(
                f,
                "more than {MAX_ALIKE} paths share the key {:?}",
                shown(key).to_string()
            ),
        }
    }
}

/// Why the comparison stopped.
#[derive(Debug)]
pub enum Error<E> {
    /// A snapshot could not be read.
    Read { side: Side, error: E },
    /// Entry number `entry` (from 1) of a snapshot is refused.
    Refused { side: Side, entry: u64, why: Bad },
}

/// A path's raw bytes, checked to name something below the source.
fn checked_path(raw: &[u8]) -> Result<&Path, Bad> {
    let bad = raw.is_empty()
        || raw
            .split(|&b| b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b".." || c.contains(&0));
    match bad {
        true => Err(Bad::NotAPath(raw.to_vec())),
        false => Ok(Path::new(OsStr::from_bytes(raw))),
    }
}

/// Where an entry sorts in the walk: its path's key, a directory's with a `/` after it; and its
/// raw path.
pub fn order_key(e: &Entry) -> Result<(String, Vec<u8>), Bad> {
    let raw = keys::decode_raw_path(&e.path);
    let mut key = keys::relative_key(checked_path(&raw)?).0;
    if e.kind == Kind::Dir {
        key.push('/');
    }
    Ok((key, raw))
}

/// Entries of one snapshot that share a key, with their raw paths, in raw-path order.
#[derive(Debug)]
struct Group {
    key: String,
    items: Vec<(Vec<u8>, Entry)>,
}

impl Group {
    /// The key of the path itself (a directory's without its `/`).
    fn path_key(&self) -> &str {
        self.key.strip_suffix('/').unwrap_or(&self.key)
    }
}

/// An entry with its raw path and where it sorts.
#[derive(Debug)]
struct Keyed {
    key: String,
    raw: Vec<u8>,
    entry: Entry,
}

/// One snapshot's entries as groups of equal keys, the order checked.
struct Groups<I> {
    side: Side,
    input: I,
    /// The entry read past the last group, with its key.
    ahead: Option<Keyed>,
    read: u64,
    ended: bool,
}

impl<I, E> Groups<I>
where
    I: Iterator<Item = Result<Entry, E>>,
{
    fn new(side: Side, input: I) -> Self {
        Groups {
            side,
            input,
            ahead: None,
            read: 0,
            ended: false,
        }
    }

    fn pull(&mut self) -> Result<Option<Keyed>, Error<E>> {
        if self.ended {
            return Ok(None);
        }
        let side = self.side;
        match self.input.next() {
            None => {
                self.ended = true;
                Ok(None)
            }
            Some(Err(error)) => Err(Error::Read { side, error }),
            Some(Ok(entry)) => {
                self.read += 1;
                let (key, raw) = order_key(&entry).map_err(|why| self.refused(why))?;
                Ok(Some(Keyed { key, raw, entry }))
            }
        }
    }

    fn refused(&self, why: Bad) -> Error<E> {
        Error::Refused {
            side: self.side,
            entry: self.read,
            why,
        }
    }

    fn next_group(&mut self) -> Result<Option<Group>, Error<E>> {
        let first = match self.ahead.take() {
            Some(a) => a,
            None => match self.pull()? {
                Some(a) => a,
                None => return Ok(None),
            },
        };
        let Keyed { key, raw, entry } = first;
        let mut items = vec![(raw, entry)];
        loop {
            let Some(next) = self.pull()? else {
                break;
            };
            match next.key.cmp(&key) {
                std::cmp::Ordering::Equal if items.len() >= MAX_ALIKE => {
                    return Err(self.refused(Bad::TooManyAlike(key)));
                }
                std::cmp::Ordering::Equal => items.push((next.raw, next.entry)),
                std::cmp::Ordering::Greater => {
                    self.ahead = Some(next);
                    break;
                }
                std::cmp::Ordering::Less => {
                    return Err(self.refused(Bad::OutOfOrder {
                        path: next.raw,
                        after: key,
                    }));
                }
            }
        }
        // The walk gives names with one key in the order it read them: join them by path.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = items.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::Refused {
                side: self.side,
                // The last of the group: the entry read ahead is not part of it.
                entry: self.read - u64::from(self.ahead.is_some()),
                why: Bad::Twice(w[0].0.clone()),
            });
        }
        Ok(Some(Group { key, items }))
    }
}

/// What is held while a path may still turn out to have changed between a directory and
/// something else.
#[derive(Debug)]
enum Held {
    Ready(Change),
    /// A path that is not a directory, on one side only so far: its directory key (`name/`) is
    /// where its other half would be.
    Open {
        side: Side,
        dir_key: String,
        path: Vec<u8>,
        kind: Kind,
    },
}

impl Held {
    fn bytes(&self) -> usize {
        match self {
            Held::Ready(c) => c.bytes(),
            Held::Open { dir_key, path, .. } => 64 + dir_key.len() + path.len(),
        }
    }
}

fn one_sided(side: Side, kind: Kind, path: Vec<u8>) -> Change {
    Change {
        class: match side {
            Side::Older => Class::Removed,
            Side::Newer => Class::Added,
        },
        kind,
        path,
        what: Vec::new(),
    }
}

/// One path of a key, with its entry on each side that has it.
struct Pair {
    path: Vec<u8>,
    older: Option<Entry>,
    newer: Option<Entry>,
}

/// The two sides' paths of one key, joined by raw path (both in raw-path order).
fn join(older: Option<Group>, newer: Option<Group>) -> Vec<Pair> {
    let mut olds = older
        .map(|g| g.items)
        .unwrap_or_default()
        .into_iter()
        .peekable();
    let mut news = newer
        .map(|g| g.items)
        .unwrap_or_default()
        .into_iter()
        .peekable();
    let mut out = Vec::new();
    loop {
        let order = match (olds.peek(), news.peek()) {
            (None, None) => return out,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(o), Some(n)) => o.0.cmp(&n.0),
        };
        out.push(match order {
            std::cmp::Ordering::Equal => {
                let (path, o) = olds.next().expect("peeked");
                let (_, n) = news.next().expect("peeked");
                Pair {
                    path,
                    older: Some(o),
                    newer: Some(n),
                }
            }
            std::cmp::Ordering::Less => {
                let (path, o) = olds.next().expect("peeked");
                Pair {
                    path,
                    older: Some(o),
                    newer: None,
                }
            }
            std::cmp::Ordering::Greater => {
                let (path, n) = news.next().expect("peeked");
                Pair {
                    path,
                    older: None,
                    newer: Some(n),
                }
            }
        });
    }
}

/// A link's target, as raw bytes.
fn link_of(e: &Entry) -> Vec<u8> {
    e.link
        .as_deref()
        .map(keys::decode_raw_path)
        .unwrap_or_default()
}

/// Extended attributes, in a stable order, and whether they were dropped as too large.
fn xattrs_of(e: &Entry) -> (Vec<&(String, String)>, bool) {
    let mut v: Vec<_> = e.xattrs.iter().flatten().collect();
    v.sort();
    (v, e.xattrs_dropped)
}

/// How one path differs between its older entry `o` and its newer `n`; `None` when it does not.
/// A SHA-256 differs only when both are known (a file adopted from the listing on a host without
/// a manifest has none recorded).
pub fn compare(path: Vec<u8>, o: &Entry, n: &Entry) -> Option<Change> {
    let mut what = Vec::new();
    if o.kind != n.kind {
        what.push(What::Kind(o.kind, n.kind));
    } else {
        match n.kind {
            Kind::File | Kind::Hardlink => {
                if o.size != n.size {
                    what.push(What::Size(o.size, n.size));
                }
                if o.sha256.is_some() && n.sha256.is_some() && o.sha256 != n.sha256 {
                    what.push(What::Sha256(o.sha256.clone(), n.sha256.clone()));
                }
                if n.kind == Kind::Hardlink && link_of(o) != link_of(n) {
                    what.push(What::Link(link_of(o), link_of(n)));
                }
            }
            Kind::Symlink if link_of(o) != link_of(n) => {
                what.push(What::Target(link_of(o), link_of(n)));
            }
            Kind::Char | Kind::Block if o.rdev != n.rdev => {
                what.push(What::Rdev(o.rdev, n.rdev));
            }
            _ => {}
        }
        if o.mode & 0o7777 != n.mode & 0o7777 {
            what.push(What::Mode(o.mode & 0o7777, n.mode & 0o7777));
        }
        if (o.uid, o.gid) != (n.uid, n.gid) {
            what.push(What::Owner((o.uid, o.gid), (n.uid, n.gid)));
        }
        if o.mtime_ns != n.mtime_ns {
            what.push(What::Mtime(o.mtime_ns, n.mtime_ns));
        }
        if xattrs_of(o) != xattrs_of(n) {
            what.push(What::Xattrs);
        }
    }
    let class = match what.iter().any(What::is_content) {
        true => Class::Changed,
        false if what.is_empty() => return None,
        false => Class::Metadata,
    };
    Some(Change {
        class,
        kind: n.kind,
        path,
        what,
    })
}

/// The merge-join of two snapshots' entries: the paths that differ, in the walk's order (a path
/// whose kind changed between a directory and something else at its first place), each once.
/// It stops at the first error.
pub struct Diff<A, B, E>
where
    A: Iterator<Item = Result<Entry, E>>,
    B: Iterator<Item = Result<Entry, E>>,
{
    older: Groups<A>,
    newer: Groups<B>,
    /// The next group of each side, once read.
    heads: (Option<Group>, Option<Group>),
    started: bool,
    /// Only the path with this key and what is below it ("" = all).
    sub: String,
    held: VecDeque<Held>,
    held_bytes: usize,
    opens: usize,
    limits: (usize, usize),
    finished: bool,
}

impl<A, B, E> Diff<A, B, E>
where
    A: Iterator<Item = Result<Entry, E>>,
    B: Iterator<Item = Result<Entry, E>>,
{
    /// `sub`: the key of the one file or directory to compare (`keys::subpath_key`), or "".
    pub fn new(older: A, newer: B, sub: &str) -> Self {
        Diff {
            older: Groups::new(Side::Older, older),
            newer: Groups::new(Side::Newer, newer),
            heads: (None, None),
            started: false,
            sub: sub.to_owned(),
            held: VecDeque::new(),
            held_bytes: 0,
            opens: 0,
            limits: (HOLD_CHANGES, HOLD_BYTES),
            finished: false,
        }
    }

    /// With other bounds on what is held.
    pub fn with_limits(mut self, changes: usize, bytes: usize) -> Self {
        self.limits = (changes, bytes);
        self
    }

    /// Entries read so far from the older and the newer snapshot.
    pub fn read(&self) -> (u64, u64) {
        (self.older.read, self.newer.read)
    }

    fn hold(&mut self, h: Held) {
        self.held_bytes += h.bytes();
        if matches!(h, Held::Open { .. }) {
            self.opens += 1;
        }
        self.held.push_back(h);
    }

    /// Gives up on the open paths whose directory key sorts before `key` (all, with `None`):
    /// their other half did not come.
    fn close_before(&mut self, key: Option<&str>) {
        if self.opens == 0 {
            return;
        }
        for h in self.held.iter_mut() {
            if let Held::Open {
                side,
                dir_key,
                path,
                kind,
            } = h
            {
                if key.is_none_or(|k| dir_key.as_str() < k) {
                    let change = one_sided(*side, *kind, std::mem::take(path));
                    *h = Held::Ready(change);
                    self.opens -= 1;
                }
            }
        }
    }

    /// A directory at `dir_key` on `side` only: the other half of an open path of the other
    /// side, which becomes one change of kind. `false` when none is held.
    fn complete(&mut self, side: Side, dir_key: &str, path: &[u8]) -> bool {
        if self.opens == 0 {
            return false;
        }
        for h in self.held.iter_mut() {
            let Held::Open {
                side: open_side,
                dir_key: d,
                path: p,
                kind,
            } = h
            else {
                continue;
            };
            if *open_side == side || d != dir_key || p != path {
                continue;
            }
            let (what, now) = match open_side {
                Side::Older => (What::Kind(*kind, Kind::Dir), Kind::Dir),
                Side::Newer => (What::Kind(Kind::Dir, *kind), *kind),
            };
            let change = Change {
                class: Class::Changed,
                kind: now,
                path: std::mem::take(p),
                what: vec![what],
            };
            *h = Held::Ready(change);
            self.opens -= 1;
            return true;
        }
        false
    }

    /// Reads and compares the next key of either side; `false` once both have ended.
    fn step(&mut self) -> Result<bool, Error<E>> {
        if !self.started {
            self.started = true;
            self.heads = (self.older.next_group()?, self.newer.next_group()?);
        }
        let order = match (&self.heads.0, &self.heads.1) {
            (None, None) => return Ok(false),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(o), Some(n)) => o.key.cmp(&n.key),
        };
        let (older, newer) = match order {
            std::cmp::Ordering::Equal => {
                let taken = std::mem::take(&mut self.heads);
                self.heads = (self.older.next_group()?, self.newer.next_group()?);
                taken
            }
            std::cmp::Ordering::Less => {
                let o = self.heads.0.take();
                self.heads.0 = self.older.next_group()?;
                (o, None)
            }
            std::cmp::Ordering::Greater => {
                let n = self.heads.1.take();
                self.heads.1 = self.newer.next_group()?;
                (None, n)
            }
        };
        let group = older.as_ref().or(newer.as_ref()).expect("one side has it");
        let key = group.key.clone();
        let in_sub = keys::in_subpath(group.path_key(), &self.sub);
        self.close_before(Some(&key));
        if !in_sub {
            return Ok(true);
        }
        for Pair { path, older, newer } in join(older, newer) {
            let (side, e) = match (older, newer) {
                (Some(o), Some(n)) => {
                    if let Some(c) = compare(path, &o, &n) {
                        self.hold(Held::Ready(c));
                    }
                    continue;
                }
                (Some(o), None) => (Side::Older, o),
                (None, Some(n)) => (Side::Newer, n),
                (None, None) => unreachable!("a path of one side at least"),
            };
            if e.kind == Kind::Dir {
                if !self.complete(side, &key, &path) {
                    self.hold(Held::Ready(one_sided(side, Kind::Dir, path)));
                }
            } else {
                self.hold(Held::Open {
                    side,
                    dir_key: format!("{key}/"),
                    path,
                    kind: e.kind,
                });
            }
        }
        Ok(true)
    }
}

impl<A, B, E> Iterator for Diff<A, B, E>
where
    A: Iterator<Item = Result<Entry, E>>,
    B: Iterator<Item = Result<Entry, E>>,
{
    type Item = Result<Change, Error<E>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            // Past the bounds, the first held path stops waiting for its other half.
            if self.held.len() > self.limits.0 || self.held_bytes > self.limits.1 {
                if let Some(front) = self.held.front_mut() {
                    if let Held::Open {
                        side, path, kind, ..
                    } = front
                    {
                        let change = one_sided(*side, *kind, std::mem::take(path));
                        *front = Held::Ready(change);
                        self.opens -= 1;
                    }
                }
            }
            if let Some(Held::Ready(_)) = self.held.front() {
                let Some(Held::Ready(c)) = self.held.pop_front() else {
                    unreachable!("the front is ready");
                };
                self.held_bytes = self.held_bytes.saturating_sub(c.bytes());
                return Some(Ok(c));
            }
            if self.finished {
                return None;
            }
            match self.step() {
                Ok(true) => {}
                Ok(false) => {
                    self.finished = true;
                    self.close_before(None);
                }
                Err(e) => {
                    self.finished = true;
                    self.held.clear();
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    fn entry(path: &[u8], kind: Kind) -> Entry {
        let p = std::path::PathBuf::from(OsString::from_vec(path.to_vec()));
        let file = matches!(kind, Kind::File | Kind::Hardlink);
        Entry {
            path: keys::encode_raw_path(&p),
            kind,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime_ns: 1_700_000_000_000_000_000,
            size: if file { 5 } else { 0 },
            key: file.then(|| keys::relative_key(&p).0),
            sha256: file.then(|| "ab".repeat(32)),
            version: None,
            stale: false,
            link: None,
            rdev: None,
            extents: None,
            xattrs: None,
            xattrs_dropped: false,
        }
    }

    fn file(path: &str) -> Entry {
        entry(path.as_bytes(), Kind::File)
    }

    fn dir(path: &str) -> Entry {
        entry(path.as_bytes(), Kind::Dir)
    }

    fn run(older: Vec<Entry>, newer: Vec<Entry>, sub: &str) -> Result<Vec<Change>, Error<()>> {
        Diff::new(older.into_iter().map(Ok), newer.into_iter().map(Ok), sub).collect()
    }

    /// `class path` per change, for short assertions.
    fn lines(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| format!("{} {}", c.class.as_str(), shown(OsStr::from_bytes(&c.path))))
            .collect()
    }

    #[test]
    fn each_difference_is_classed_content_or_metadata() {
        let f = file("f");
        let with = |change: &dyn Fn(&mut Entry)| {
            let mut e = f.clone();
            change(&mut e);
            e
        };
        let mut link = entry(b"f", Kind::Symlink);
        link.link = Some("a".into());
        let mut hard = entry(b"f", Kind::Hardlink);
        hard.link = Some("a".into());
        let mut dev = entry(b"f", Kind::Block);
        dev.rdev = Some(2049);
        let cases: Vec<(Entry, Entry, Option<Class>, Vec<&str>)> = vec![
            (f.clone(), f.clone(), None, vec![]),
            (
                f.clone(),
                with(&|e| e.size = 6),
                Some(Class::Changed),
                vec!["size"],
            ),
            (
                f.clone(),
                with(&|e| e.sha256 = Some("cd".repeat(32))),
                Some(Class::Changed),
                vec!["sha256"],
            ),
            // No SHA-256 recorded on one side: nothing to compare.
            (f.clone(), with(&|e| e.sha256 = None), None, vec![]),
            (
                f.clone(),
                with(&|e| e.mode = 0o600),
                Some(Class::Metadata),
                vec!["mode"],
            ),
            // The type bits are the kind's, not the mode's.
            (f.clone(), with(&|e| e.mode = 0o100644), None, vec![]),
            (
                f.clone(),
                with(&|e| e.gid = 0),
                Some(Class::Metadata),
                vec!["owner"],
            ),
            (
                f.clone(),
                with(&|e| e.mtime_ns += 1),
                Some(Class::Metadata),
                vec!["mtime"],
            ),
            (
                f.clone(),
                with(&|e| e.xattrs = Some(vec![("user.a".into(), "eA==".into())])),
                Some(Class::Metadata),
                vec!["xattrs"],
            ),
            (
                f.clone(),
                with(&|e| e.xattrs_dropped = true),
                Some(Class::Metadata),
                vec!["xattrs"],
            ),
            (f.clone(), with(&|e| e.xattrs = Some(vec![])), None, vec![]),
            // A stale record, a version, extents, the key: not what the file is.
            (
                f.clone(),
                with(&|e| {
                    e.stale = true;
                    e.version = Some("v".into());
                    e.extents = Some(vec![(0, 5)])
                }),
                None,
                vec![],
            ),
            (
                f.clone(),
                with(&|e| {
                    e.size = 1;
                    e.mode = 0o600
                }),
                Some(Class::Changed),
                vec!["size", "mode"],
            ),
            (f.clone(), link.clone(), Some(Class::Changed), vec!["kind"]),
            (
                link.clone(),
                Entry {
                    link: Some("b".into()),
                    ..link.clone()
                },
                Some(Class::Changed),
                vec!["target"],
            ),
            (
                link.clone(),
                Entry {
                    size: 9,
                    ..link.clone()
                },
                None,
                vec![],
            ),
            (
                hard.clone(),
                Entry {
                    link: Some("b".into()),
                    ..hard.clone()
                },
                Some(Class::Changed),
                vec!["link"],
            ),
            (
                dev.clone(),
                Entry {
                    rdev: Some(2050),
                    ..dev.clone()
                },
                Some(Class::Changed),
                vec!["rdev"],
            ),
            (
                dev.clone(),
                Entry {
                    kind: Kind::Char,
                    ..dev.clone()
                },
                Some(Class::Changed),
                vec!["kind"],
            ),
            (
                dir("f"),
                Entry {
                    size: 4096,
                    mtime_ns: 1,
                    ..dir("f")
                },
                Some(Class::Metadata),
                vec!["mtime"],
            ),
        ];
        for (i, (o, n, class, what)) in cases.into_iter().enumerate() {
            let got = compare(b"f".to_vec(), &o, &n);
            assert_eq!(got.as_ref().map(|c| c.class), class, "case {i}");
            let names: Vec<_> = got
                .iter()
                .flat_map(|c| c.what.iter().map(What::name))
                .collect();
            assert_eq!(names, what, "case {i}");
        }
    }

    #[test]
    fn added_removed_and_changed_paths_come_out_in_key_order() {
        let older = vec![
            file("a"),
            dir("d"),
            file("d/gone"),
            file("d/kept"),
            file("e"),
        ];
        let mut kept = file("d/kept");
        kept.size = 9;
        let newer = vec![
            dir("b"),
            file("b/new"),
            dir("d"),
            kept,
            file("d/new"),
            file("e"),
        ];
        assert_eq!(
            lines(&run(older, newer, "").unwrap()),
            [
                "removed a",
                "added b",
                "added b/new",
                "removed d/gone",
                "changed d/kept",
                "added d/new",
            ]
        );
    }

    #[test]
    fn a_path_that_became_a_directory_is_one_change_at_its_first_place() {
        // "a" sorts before "a-b" and "a.d/…", its directory form "a/" after them.
        let mut changed = file("a-b");
        changed.mode = 0o600;
        let older = vec![file("a"), file("a-b"), dir("a.d"), file("a.d/x"), file("z")];
        let newer = vec![
            changed,
            dir("a.d"),
            dir("a"),
            file("a/inside"),
            entry(b"z", Kind::Symlink),
        ];
        let mut newer = newer;
        newer.sort_by_key(|e| order_key(e).unwrap());
        let changes = run(older.clone(), newer.clone(), "").unwrap();
        assert_eq!(
            lines(&changes),
            [
                "changed a",
                "metadata a-b",
                "removed a.d/x",
                "added a/inside",
                "changed z",
            ]
        );
        assert_eq!(changes[0].what, [What::Kind(Kind::File, Kind::Dir)]);
        assert_eq!(changes[0].kind, Kind::Dir);
        // And back.
        let back = run(newer.clone(), older.clone(), "").unwrap();
        assert_eq!(lines(&back)[0], "changed a");
        assert_eq!(back[0].what, [What::Kind(Kind::Dir, Kind::File)]);
        assert_eq!(back[0].kind, Kind::File);

        // Past its bounds, the held path gives up waiting: it comes out as removed, and the
        // directory as added at its own place; the order holds.
        let bounded: Vec<Change> = Diff::new(
            older.into_iter().map(Ok::<_, ()>),
            newer.into_iter().map(Ok),
            "",
        )
        .with_limits(1, usize::MAX)
        .collect::<Result<_, _>>()
        .unwrap();
        assert_eq!(
            lines(&bounded),
            [
                "removed a",
                "metadata a-b",
                "removed a.d/x",
                "added a",
                "added a/inside",
                "changed z",
            ]
        );
    }

    #[test]
    fn names_that_share_a_key_are_joined_by_path() {
        // "\xff" escapes to "%FF", which is also a plain name: one key, two paths, in the order
        // the directory was read.
        let raw = entry(b"\xff", Kind::File);
        let plain = file("%FF");
        let mut plain2 = plain.clone();
        plain2.size = 1;
        let changes = run(
            vec![raw.clone(), plain.clone(), file("z")],
            vec![plain2, raw, file("z")],
            "",
        )
        .unwrap();
        assert_eq!(lines(&changes), ["changed %FF"]);
        assert_eq!(changes[0].path, b"%FF");
    }

    #[test]
    fn a_subpath_narrows_to_itself_and_what_is_below_it() {
        let older = vec![file("d"), file("d-e"), file("d.txt"), file("e")];
        let newer = vec![
            file("d-e"),
            file("d.txt"),
            dir("d"),
            file("d/x"),
            dir("dd"),
            file("e"),
        ];
        let mut newer = newer;
        newer.sort_by_key(|e| order_key(e).unwrap());
        assert_eq!(
            lines(&run(older.clone(), newer.clone(), "d").unwrap()),
            ["changed d", "added d/x"]
        );
        assert_eq!(
            lines(&run(older.clone(), newer.clone(), "d/x").unwrap()),
            ["added d/x"]
        );
        assert!(run(older, newer, "nothing").unwrap().is_empty());
    }

    fn refused(older: Vec<Entry>) -> (u64, Bad) {
        match run(older, vec![], "") {
            Err(Error::Refused {
                side: Side::Older,
                entry,
                why,
            }) => (entry, why),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn entries_out_of_the_walks_order_are_refused() {
        for (older, at) in [
            (vec![file("b"), file("a")], 2),
            (vec![dir("a"), file("a-b")], 2),
            (vec![file("a/x"), dir("a")], 2),
            (vec![file("a"), file("b"), file("c"), file("b")], 4),
        ] {
            let (n, why) = refused(older);
            assert_eq!(n, at);
            assert!(matches!(why, Bad::OutOfOrder { .. }), "{why}");
        }
        let (_, why) = refused(vec![file("b"), entry(b"a\nINFO forged", Kind::File)]);
        assert_eq!(
            why.to_string(),
            r#""a\\nINFO forged" comes after "b", out of the walk's order"#
        );
    }

    #[test]
    fn entries_no_walk_writes_are_refused() {
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"a//b",
            b"a/./b",
            b"../x",
            b"a/..",
            b"a\0b",
            b"a/",
        ] {
            let (n, why) = refused(vec![file("0"), entry(bad, Kind::File)]);
            assert_eq!(n, 2, "{bad:?}");
            assert!(matches!(why, Bad::NotAPath(_)), "{bad:?}: {why}");
        }
        let (n, why) = refused(vec![file("a"), file("a"), file("b")]);
        assert_eq!((n, why), (2, Bad::Twice(b"a".to_vec())));
        let alike: Vec<Entry> = (0..=MAX_ALIKE).map(|_| file("a")).collect();
        assert!(matches!(refused(alike).1, Bad::TooManyAlike(_)));
    }

    #[test]
    fn a_read_error_stops_the_diff() {
        let older = vec![Ok(file("a")), Err("broken"), Ok(file("c"))];
        let mut d = Diff::new(older.into_iter(), std::iter::empty(), "");
        assert!(matches!(
            d.next(),
            Some(Err(Error::Read {
                side: Side::Older,
                error: "broken"
            }))
        ));
        assert!(d.next().is_none());
    }

    // The property: for any two trees, every path of either appears exactly once, with the class
    // a plain comparison of the two gives it, in the order of its first key.

    #[derive(Debug, Clone, PartialEq)]
    struct Model {
        kind: Kind,
        size: u64,
        sha: u8,
        link: u8,
        mode: u32,
        mtime: i64,
    }

    fn model() -> impl proptest::strategy::Strategy<Value = Model> {
        use proptest::prelude::*;
        (
            prop_oneof![
                Just(Kind::File),
                Just(Kind::Dir),
                Just(Kind::Symlink),
                Just(Kind::Hardlink),
                Just(Kind::Fifo)
            ],
            0u64..2,
            0u8..2,
            0u8..2,
            prop_oneof![Just(0o644), Just(0o600)],
            0i64..2,
        )
            .prop_map(|(kind, size, sha, link, mode, mtime)| Model {
                kind,
                size,
                sha,
                link,
                mode,
                mtime,
            })
    }

    fn tree() -> impl proptest::strategy::Strategy<Value = BTreeMap<Vec<u8>, Model>> {
        use proptest::prelude::*;
        let name = prop_oneof![
            Just(b"a".to_vec()),
            Just(b"a-b".to_vec()),
            Just(b"a.c".to_vec()),
            Just(b"b".to_vec()),
            Just(b"%FF".to_vec()),
            Just(b"\xff".to_vec()),
            Just("é".as_bytes().to_vec()),
        ];
        let path = proptest::collection::vec(name, 1..4).prop_map(|parts| parts.join(&b'/'));
        proptest::collection::btree_map(path, model(), 0..24)
    }

    fn entries(tree: &BTreeMap<Vec<u8>, Model>, reverse_alike: bool) -> Vec<Entry> {
        let mut out: Vec<(String, Vec<u8>, Entry)> = tree
            .iter()
            .map(|(p, m)| {
                let mut e = entry(p, m.kind);
                e.size = m.size;
                e.sha256 = Some(format!("{:064}", m.sha));
                e.link = Some(format!("t{}", m.link));
                e.mode = m.mode;
                e.mtime_ns = m.mtime;
                let (k, raw) = order_key(&e).unwrap();
                (k, raw, e)
            })
            .collect();
        // Names that share a key come in the order their directory was read: either way.
        out.sort_by(|a, b| match reverse_alike {
            false => (&a.0, &a.1).cmp(&(&b.0, &b.1)),
            true => a.0.cmp(&b.0).then(b.1.cmp(&a.1)),
        });
        out.into_iter().map(|(_, _, e)| e).collect()
    }

    fn expected(o: &Model, n: &Model) -> Option<Class> {
        if o.kind != n.kind {
            return Some(Class::Changed);
        }
        let content = match o.kind {
            Kind::File => o.size != n.size || o.sha != n.sha,
            Kind::Hardlink => o.size != n.size || o.sha != n.sha || o.link != n.link,
            Kind::Symlink => o.link != n.link,
            _ => false,
        };
        match (content, o.mode != n.mode || o.mtime != n.mtime) {
            (true, _) => Some(Class::Changed),
            (false, true) => Some(Class::Metadata),
            (false, false) => None,
        }
    }

    proptest::proptest! {
        #[test]
        fn every_path_comes_out_once_with_its_class_in_order(
            older in tree(),
            newer in tree(),
            reverse in proptest::bool::ANY,
        ) {
            let mut want: BTreeMap<Vec<u8>, Class> = BTreeMap::new();
            for (p, o) in &older {
                match newer.get(p) {
                    None => { want.insert(p.clone(), Class::Removed); }
                    Some(n) => if let Some(c) = expected(o, n) { want.insert(p.clone(), c); },
                }
            }
            for p in newer.keys().filter(|p| !older.contains_key(*p)) {
                want.insert(p.clone(), Class::Added);
            }
            let changes = run(entries(&older, reverse), entries(&newer, !reverse), "").unwrap();
            let mut got = BTreeMap::new();
            for c in &changes {
                proptest::prop_assert!(got.insert(c.path.clone(), c.class).is_none(), "twice: {:?}", c);
            }
            proptest::prop_assert_eq!(&got, &want);
            // In the order of each path's first key (a directory's is `name/`).
            let first_key = |p: &Vec<u8>| {
                [older.get(p), newer.get(p)]
                    .into_iter()
                    .flatten()
                    .map(|m| order_key(&entry(p, m.kind)).unwrap().0)
                    .min()
                    .unwrap()
            };
            let order: Vec<String> = changes.iter().map(|c| first_key(&c.path)).collect();
            proptest::prop_assert!(order.windows(2).all(|w| w[0] <= w[1]), "{:?}", order);

            // Held to one change at a time, a path that turned into or out of a directory may
            // come out as removed and added instead; nothing else differs.
            let bounded: Vec<Change> = Diff::new(
                entries(&older, reverse).into_iter().map(Ok::<_, ()>),
                entries(&newer, reverse).into_iter().map(Ok),
                "",
            )
            .with_limits(1, usize::MAX)
            .collect::<Result<_, _>>()
            .unwrap();
            let mut seen: BTreeMap<Vec<u8>, BTreeSet<Class>> = BTreeMap::new();
            for c in &bounded {
                proptest::prop_assert!(seen.entry(c.path.clone()).or_default().insert(c.class));
            }
            for (p, classes) in &seen {
                let split = BTreeSet::from([Class::Added, Class::Removed]);
                let dir_change = matches!(
                    (older.get(p), newer.get(p)),
                    (Some(o), Some(n)) if (o.kind == Kind::Dir) != (n.kind == Kind::Dir)
                );
                proptest::prop_assert!(
                    *classes == BTreeSet::from([want[p]]) || (dir_change && *classes == split),
                    "{:?}: {:?}", p, classes
                );
            }
            proptest::prop_assert_eq!(
                seen.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            );
        }
    }
}
