//! The walk itself: parallel, yet yielding files in S3 key order, with bounded read-ahead.
//!
//! On a network or FUSE mount every metadata operation is a round trip, so a walk that does one
//! at a time spends the night waiting. Here a pool of `walk-concurrency` threads reads
//! directories ahead of the consumer and stats the entries of each directory side by side, while
//! the consumer (the planner's thread) takes the results strictly in key order:
//!
//! - every operation is relative to an open directory handle: `openat(parent, name,
//!   O_DIRECTORY|O_NOFOLLOW)` for a directory, `statx(dir, name, AT_SYMLINK_NOFOLLOW |
//!   AT_STATX_DONT_SYNC)` for a file (`statx_cached`; fstatat where there is no statx) — the
//!   kernel never resolves a whole path again (a LOOKUP per component when the client's caches
//!   are cold), and paths longer than PATH_MAX are walkable;
//! - `d_type` from readdir says what an entry is, so directories, symlinks (skipped), FIFOs,
//!   sockets and devices cost no stat; only files (and entries whose type the filesystem does not
//!   report, or symlinks when they are followed) are stat'ed;
//! - in tree mode (`scan_tree`) the pool also stats symlinks and specials (`fstatat` without
//!   following, but through a link `symlinks: follow` followed to a special) and reads symlinks
//!   (`readlinkat`), in the same stat tasks as files, smallest key first; a directory's metadata
//!   is the `fstat` of its handle, which the walk does anyway (one-file-system, loops), kept in
//!   its listing. Hard links are told apart on the consumer's side, in walk order (`HardLinks`).
//!   Without tree mode none of this is done, and symlinks and specials cost nothing;
//! - a directory's entries are sorted as keys sort (a directory as `name/`, `keys::sibling_order`)
//!   before any of them is handed out, and work is picked smallest key first, so what the
//!   consumer needs next is always what the pool does first;
//! - read-ahead is bounded in entries, not directories: a directory is read ahead only while
//!   fewer than `AHEAD_ENTRIES` entries wait for the consumer (the one the consumer needs next is
//!   always read). Memory is therefore at most that many entries plus the largest single
//!   directory, which has to be read whole to be sorted;
//! - an excluded directory is never opened; another filesystem is not entered with
//!   one-file-system (its device, from `fstat` of the opened handle, differs from the root's); a
//!   symlink is followed only with `symlinks: follow`, and a followed directory already on the
//!   path (same device and inode) is a loop, not entered.
//!
//! Open directory handles are closed as soon as nothing more is done in them, so a deep tree keeps
//! only the frontier open, not a handle per level.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use super::{HardLinks, Item, LocalEntry, ScanOptions, TreeEntry};
use crate::config::SymlinkPolicy;
use crate::keys;
use crate::report::{FileErrorKind, Stats};
use crate::xattrs::Xattrs;

/// Entries read ahead of the consumer before further directories wait (about 150 bytes each).
pub const AHEAD_ENTRIES: usize = 20_000;
/// Entries stat'ed by one task: small, so that a directory's stats spread over the pool.
const STAT_CHUNK: usize = 8;

/// What a stat says that the backup needs. 56 bytes, kept per file in a listing (a device's
/// number and a symlink's target, wanted only in tree mode, travel apart: `Node`): the listings
/// held are bounded by `AHEAD_ENTRIES` plus the largest directory, so each byte here is paid per
/// entry held. `blocks` took it from 48 to 56: it is what tells a file that may have holes from
/// one that cannot, with no call more (`tree.rs` reads extents only for the former). With
/// `Found::File`'s pointer to extended attributes, a `Slot` went from 120 to 136 bytes (320 KB
/// more at `AHEAD_ENTRIES`, 16 MB for a directory of a million files).
#[derive(Debug, Clone, Copy)]
struct Meta {
    size: u64,
    mtime_ns: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    dev: u64,
    ino: u64,
    /// Allocated 512-byte blocks; `u64::MAX` where the stat did not say.
    blocks: u64,
}

const _: () = assert!(std::mem::size_of::<Meta>() == 56);

impl Meta {
    fn of(st: &FileStat) -> Meta {
        Meta {
            size: st.st_size.max(0) as u64,
            mtime_ns: crate::fsutil::ns(st.st_mtime, st.st_mtime_nsec),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            dev: st.st_dev,
            ino: st.st_ino,
            blocks: st.st_blocks.max(0) as u64,
        }
    }

    fn tree_entry(&self, key: String, rel: PathBuf) -> TreeEntry {
        TreeEntry {
            key,
            rel,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime_ns: self.mtime_ns,
            size: self.size,
            rdev: 0,
            target: None,
            xattrs: None,
        }
    }

    fn is_dir(&self) -> bool {
        self.mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
    }

    fn is_file(&self) -> bool {
        self.mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
    }
}

/// What an entry is, as decided when its directory was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Excluded,
    Dir,
    File,
    Symlink,
    Special,
    /// A symlink to follow that points nowhere.
    Dangling,
    /// readdir gave no type: a stat decides (before the directory is sorted).
    Unknown,
    /// A symlink to follow: a stat of its target decides (before the directory is sorted).
    Link,
    /// A symlink to follow whose target cannot be stat'ed (a loop of links, no permission).
    Broken,
}

/// What the pool found for an entry.
enum Found {
    /// A file's stat, and in tree mode with `source.xattrs` its extended attributes.
    File(Meta, Option<Box<Xattrs>>),
    /// A symlink or a special file (tree mode only).
    Node(Box<Node>),
    /// A directory's listing, until the consumer enters it and takes it: a parent that kept its
    /// children's listings would keep every listing below it, and the root the whole tree (about
    /// 130 bytes per entry, 222 MiB for a million files) for as long as the walk lasts.
    Dir(Mutex<Option<Arc<Listing>>>),
    Vanished,
    Error(String),
    /// A directory on another filesystem (one-file-system): not entered, and its metadata (that
    /// of the filesystem's root, as `ls -ld` shows) recorded in tree mode.
    OtherFilesystem(Meta),
    Loop,
}

/// A symlink's or special file's own stat, its device number and a symlink's target.
struct Node {
    meta: Meta,
    rdev: u64,
    target: Option<OsString>,
}

/// The metadata calls the walk made, by kind, counted for the tests of what each mode costs.
#[derive(Default)]
struct Calls {
    /// Directories opened (`open`, `openat`).
    open: AtomicUsize,
    /// `fstat`, `statx`, `fstatat` (a statx refused and redone as fstatat counts once).
    stat: AtomicUsize,
    readlink: AtomicUsize,
    /// `listxattr`s (`source.xattrs`, tree mode).
    xattr: AtomicUsize,
}

impl Found {
    /// A file's result, carried from a resolve into the sorted listing.
    fn copy_file(&self) -> Found {
        match self {
            Found::File(m, x) => Found::File(*m, x.clone()),
            Found::Vanished => Found::Vanished,
            Found::Error(e) => Found::Error(e.clone()),
            _ => unreachable!("only a file's stat is kept"),
        }
    }
}

struct Slot {
    name: OsString,
    key: String,
    escaped: bool,
    kind: Kind,
    /// Reached through a symlink that `symlinks: follow` followed.
    followed: bool,
    found: OnceLock<Found>,
    /// A directory's read was started (it may be queued twice: once in key order, once when the
    /// consumer asks for it first).
    started: AtomicBool,
}

/// The device and inode of the directories on a path, for loop detection when following.
struct Ancestry {
    dev: u64,
    ino: u64,
    parent: Option<Arc<Ancestry>>,
}

impl Ancestry {
    fn contains(&self, dev: u64, ino: u64) -> bool {
        let mut a = Some(self);
        while let Some(x) = a {
            if (x.dev, x.ino) == (dev, ino) {
                return true;
            }
            a = x.parent.as_deref();
        }
        false
    }
}

/// One directory, read and sorted.
struct Listing {
    rel: PathBuf,
    key: String,
    escaped: bool,
    ancestry: Arc<Ancestry>,
    /// The directory's own `fstat` (its item in tree mode).
    meta: Meta,
    /// Its extended attributes (tree mode, `source.xattrs`).
    xattrs: Option<Box<Xattrs>>,
    /// Open while stats or subdirectory opens still need it.
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// Stat tasks and subdirectory reads not yet done.
    pending: AtomicUsize,
    slots: Vec<Slot>,
    /// `Shared::held`, which this listing's entries count in while it lives.
    held: Arc<AtomicUsize>,
}

impl Drop for Listing {
    fn drop(&mut self) {
        self.held.fetch_sub(self.slots.len(), SeqCst);
    }
}

impl Listing {
    fn fd(&self) -> Option<Arc<OwnedFd>> {
        self.fd.lock().unwrap().clone()
    }

    fn one_done(&self) {
        if self.pending.fetch_sub(1, SeqCst) == 1 {
            self.fd.lock().unwrap().take();
        }
    }

    fn child_key(&self, slot: &Slot) -> String {
        if self.key.is_empty() {
            slot.key.clone()
        } else {
            format!("{}/{}", self.key, slot.key)
        }
    }
}

enum Work {
    Stat {
        listing: Arc<Listing>,
        from: usize,
        to: usize,
    },
    List {
        parent: Option<Arc<Listing>>,
        index: usize,
        /// Started from `deferred` by `admit` (counted in `Queue::in_flight`).
        admitted: bool,
    },
    Resolve {
        unsorted: Arc<Unsorted>,
        from: usize,
        to: usize,
    },
}

/// A directory read, whose entries of unknown type (or symlinks to follow) are being stat'ed side
/// by side before it can be sorted; the last resolve finishes it.
struct Unsorted {
    place: Place,
    fd: OwnedFd,
    ancestry: Arc<Ancestry>,
    meta: Meta,
    xattrs: Option<Box<Xattrs>>,
    slots: Vec<Slot>,
    /// The indices of the entries to resolve, and what each turned out to be.
    unresolved: Vec<usize>,
    resolved: Vec<OnceLock<Resolved>>,
    /// Resolve tasks not yet done.
    left: AtomicUsize,
}

struct Resolved {
    kind: Kind,
    followed: bool,
    found: Option<Found>,
}

struct Task {
    /// The key the work is for: smallest first is the consumer's order.
    key: Vec<u8>,
    seq: u64,
    work: Work,
}

impl PartialEq for Task {
    fn eq(&self, other: &Self) -> bool {
        (&self.key, self.seq) == (&other.key, other.seq)
    }
}
impl Eq for Task {}
impl PartialOrd for Task {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Task {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.key, self.seq).cmp(&(&other.key, other.seq))
    }
}

#[derive(Default)]
struct Queue {
    ready: BinaryHeap<Reverse<Task>>,
    /// Directory reads waiting for the read-ahead to shrink.
    deferred: BinaryHeap<Reverse<Task>>,
    /// Entries read and not yet passed by the consumer.
    ahead: usize,
    /// Entries passed by the consumer.
    passed: usize,
    /// Directory reads admitted from `deferred` and not yet published.
    in_flight: usize,
    /// Directories read so far and their entries, for the size a read in flight is reckoned at.
    dirs_read: usize,
    entries_read: usize,
    seq: u64,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    done: Condvar,
    opts: Opts,
    /// The root directory's listing, once read.
    root: OnceLock<Found>,
    /// Entries of the listings alive, passed or not: what the walk's memory is made of.
    held: Arc<AtomicUsize>,
    calls: Calls,
}

/// What the workers need of the scan options.
struct Opts {
    root: PathBuf,
    excludes: Arc<crate::config::Excludes>,
    one_file_system: bool,
    follow: bool,
    root_dev: u64,
    ahead_entries: usize,
    threads: usize,
    /// Tree mode: symlinks and specials are stat'ed (and symlinks read) too.
    tree: bool,
    /// Tree mode with `source.xattrs`: files' and directories' extended attributes are read.
    xattrs: bool,
}

/// The walk, yielding files (`Iterator`); `Tree` yields every item.
pub(super) struct Walk {
    shared: Arc<Shared>,
    stack: Vec<(Arc<Listing>, usize)>,
    started: bool,
    stats: Arc<Stats>,
    max_key: usize,
    max_file_size: u64,
    /// Tree mode.
    links: Option<HardLinks>,
}

/// The walk in tree mode.
pub(super) struct Tree(Walk);

impl Walk {
    pub(super) fn start(opts: &ScanOptions, stats: Arc<Stats>) -> Walk {
        Walk::with_ahead(opts, stats, AHEAD_ENTRIES)
    }

    pub(super) fn start_tree(opts: &ScanOptions, stats: Arc<Stats>, links: usize) -> Tree {
        Walk::tree_with_ahead(opts, stats, AHEAD_ENTRIES, links)
    }

    pub(super) fn with_ahead(opts: &ScanOptions, stats: Arc<Stats>, ahead_entries: usize) -> Walk {
        Walk::new(opts, stats, ahead_entries, None)
    }

    /// Tree mode, with at most `links` first names of multiply-linked files kept.
    pub(super) fn tree_with_ahead(
        opts: &ScanOptions,
        stats: Arc<Stats>,
        ahead_entries: usize,
        links: usize,
    ) -> Tree {
        Tree(Walk::new(
            opts,
            stats,
            ahead_entries,
            Some(HardLinks::new(&opts.root, links)),
        ))
    }

    fn new(
        opts: &ScanOptions,
        stats: Arc<Stats>,
        ahead_entries: usize,
        links: Option<HardLinks>,
    ) -> Walk {
        let mut walk = Walk {
            shared: Arc::new(Shared {
                queue: Mutex::default(),
                work: Condvar::new(),
                done: Condvar::new(),
                opts: Opts {
                    root: opts.root.clone(),
                    excludes: opts.excludes.clone(),
                    one_file_system: opts.one_file_system,
                    follow: opts.symlinks == SymlinkPolicy::Follow,
                    root_dev: 0,
                    ahead_entries: ahead_entries.max(1),
                    threads: opts.walk_concurrency.max(1),
                    tree: links.is_some(),
                    xattrs: links.is_some() && opts.xattrs,
                },
                root: OnceLock::new(),
                held: Arc::new(AtomicUsize::new(0)),
                calls: Calls::default(),
            }),
            stack: Vec::new(),
            started: false,
            stats,
            max_key: opts.max_key_bytes,
            max_file_size: opts.max_file_size,
            links,
        };
        let (fd, m) = match open_root(&opts.root, &walk.shared.calls) {
            Ok(r) => r,
            Err(e) => {
                walk.stats.file_error(&opts.root, FileErrorKind::Walk, &e);
                walk.started = true;
                return walk;
            }
        };
        Arc::get_mut(&mut walk.shared)
            .expect("no worker yet")
            .opts
            .root_dev = m.dev;
        let ancestry = Arc::new(Ancestry {
            dev: m.dev,
            ino: m.ino,
            parent: None,
        });
        let root = Place {
            parent: None,
            index: 0,
            rel: PathBuf::new(),
            key: String::new(),
            escaped: false,
            admitted: false,
        };
        // The root is read on the pool like any directory: a flat tree's one big directory needs
        // the pool's parallel stats as much as any other.
        walk.shared.read_dir(root, fd, ancestry, (m, None));
        for _ in 0..opts.walk_concurrency.max(1) {
            let shared = walk.shared.clone();
            // Detached: a worker stuck in a hung mount must not hold up the end of the run.
            let spawned = std::thread::Builder::new()
                .name("nightcopy-walk".into())
                .spawn(move || shared.work_loop());
            if let Err(e) = spawned {
                tracing::warn!("cannot start a walk thread: {e}");
                break;
            }
        }
        walk
    }

    /// Entries read so far, whether passed or waiting (for the read-ahead test).
    #[cfg(test)]
    pub(super) fn entries_read(&self) -> usize {
        let q = self.shared.queue.lock().unwrap();
        q.ahead + q.passed
    }

    /// Entries of the listings still in memory (for the memory test).
    #[cfg(test)]
    pub(super) fn entries_held(&self) -> usize {
        self.shared.held.load(SeqCst)
    }

    /// Directories opened, stats and readlinks made so far (for the tests of what a mode costs).
    #[cfg(test)]
    pub(super) fn calls(&self) -> (usize, usize, usize) {
        let c = &self.shared.calls;
        (
            c.open.load(SeqCst),
            c.stat.load(SeqCst),
            c.readlink.load(SeqCst),
        )
    }

    fn path_of(&self, listing: &Listing, slot: &Slot) -> PathBuf {
        self.shared.opts.root.join(&listing.rel).join(&slot.name)
    }

    /// Waits until `found` is set. For a directory whose read has not started, asks for it first.
    fn wait<'a>(
        &self,
        found: &'a OnceLock<Found>,
        ask: Option<(&Arc<Listing>, usize)>,
    ) -> &'a Found {
        if let Some(f) = found.get() {
            return f;
        }
        let mut q = self.shared.queue.lock().unwrap();
        if let Some((listing, index)) = ask.filter(|(l, i)| !l.slots[*i].started.load(SeqCst)) {
            q.seq += 1;
            let task = Task {
                key: Vec::new(),
                seq: q.seq,
                work: Work::List {
                    parent: Some(listing.clone()),
                    index,
                    admitted: false,
                },
            };
            q.ready.push(Reverse(task));
            self.shared.work.notify_one();
        }
        loop {
            if let Some(f) = found.get() {
                return f;
            }
            q = self.shared.done.wait(q).unwrap();
        }
    }

    /// The consumer passed one entry: the read-ahead shrinks, and deferred reads may start.
    fn passed(&self) {
        let mut q = self.shared.queue.lock().unwrap();
        q.ahead = q.ahead.saturating_sub(1);
        q.passed += 1;
        self.shared.admit(&mut q);
    }

    fn entry(&self, listing: &Listing, slot: &Slot, path: PathBuf, m: Meta) -> Option<LocalEntry> {
        let stats = &self.stats;
        let key = listing.child_key(slot);
        if key.len() > self.max_key {
            stats.file_error(
                &path,
                FileErrorKind::BadName,
                &format_args!(
                    "its key would be {} bytes with the prefix, over S3's limit of {}",
                    key.len() + (keys::MAX_KEY_BYTES - self.max_key),
                    keys::MAX_KEY_BYTES
                ),
            );
            return None;
        }
        if m.size > self.max_file_size {
            stats.file_error(
                &path,
                FileErrorKind::TooLarge,
                &format_args!(
                    "{} bytes, over source.max-file-size ({}): not read",
                    m.size,
                    crate::config::Size(self.max_file_size)
                ),
            );
            return None;
        }
        let escaped = listing.escaped || slot.escaped;
        let raw_path = escaped.then(|| keys::encode_raw_path(&listing.rel.join(&slot.name)));
        Some(LocalEntry {
            key,
            path,
            raw_path,
            size: m.size,
            mtime_ns: m.mtime_ns,
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            nlink: m.nlink.into(),
            dev: m.dev,
            ino: m.ino,
            blocks: m.blocks,
            xattrs: None,
            followed: slot.followed,
        })
    }

    /// What a directory slot (or the root, `at` none) led to: in tree mode, the directory's item
    /// when it is one the walk keeps.
    fn descend(
        &mut self,
        found: &Found,
        path: &Path,
        at: Option<(&Listing, &Slot)>,
    ) -> Option<Item> {
        let tree = self.links.is_some() && at.is_some();
        let item = |m: &Meta, xattrs: Option<Box<Xattrs>>| {
            let (listing, slot) = at.expect("not the root");
            let key = listing.child_key(slot) + "/";
            let mut t = m.tree_entry(key, listing.rel.join(&slot.name));
            t.xattrs = xattrs;
            Item::Dir(t)
        };
        match found {
            Found::Dir(child) => {
                let child = child
                    .lock()
                    .unwrap()
                    .take()
                    .expect("a directory is entered once");
                let entered = tree.then(|| item(&child.meta, child.xattrs.clone()));
                self.stack.push((child, 0));
                return entered;
            }
            Found::Vanished => self.stats.vanished(path),
            Found::Error(e) => self.stats.file_error(path, FileErrorKind::Walk, e),
            Found::Loop => {
                self.stats
                    .file_error(path, FileErrorKind::Walk, &"symlink loop: not followed")
            }
            Found::OtherFilesystem(m) => {
                tracing::debug!(
                    path = %path.display(),
                    "{}: another filesystem (one-file-system): not entered",
                    keys::shown(path)
                );
                return tree.then(|| item(m, None));
            }
            Found::File(..) | Found::Node(_) => unreachable!("a directory slot"),
        }
        None
    }

    /// A symlink or special file in tree mode: its item, or what went wrong, counted.
    fn node(&self, listing: &Listing, slot: &Slot, path: &Path, symlink: bool) -> Option<Item> {
        match self.wait(&slot.found, None) {
            Found::Node(n) => {
                let mut t = n
                    .meta
                    .tree_entry(listing.child_key(slot), listing.rel.join(&slot.name));
                t.rdev = n.rdev;
                t.target = n.target.clone();
                Some(if symlink {
                    Item::Symlink(t)
                } else {
                    Item::Special(t)
                })
            }
            Found::Vanished => {
                self.stats.vanished(path);
                None
            }
            Found::Error(e) => {
                self.stats.file_error(path, FileErrorKind::Unreadable, e);
                None
            }
            _ => unreachable!("a symlink's or special's slot"),
        }
    }

    /// The next item in key order: only files (and no hard links) unless in tree mode.
    fn next_item(&mut self) -> Option<Item> {
        if !self.started {
            self.started = true;
            let shared = self.shared.clone();
            let found = self.wait(&shared.root, None);
            let root = shared.opts.root.clone();
            self.descend(found, &root, None);
        }
        let tree = self.links.is_some();
        loop {
            let (listing, index) = {
                let (listing, next) = self.stack.last_mut()?;
                if *next == listing.slots.len() {
                    self.stack.pop();
                    continue;
                }
                *next += 1;
                (listing.clone(), *next - 1)
            };
            self.passed();
            let slot = &listing.slots[index];
            let path = self.path_of(&listing, slot);
            match slot.kind {
                Kind::Excluded => self.stats.excluded(&path),
                Kind::Symlink if tree => {
                    if let Some(item) = self.node(&listing, slot, &path, true) {
                        return Some(item);
                    }
                }
                Kind::Special if tree => {
                    if let Some(item) = self.node(&listing, slot, &path, false) {
                        return Some(item);
                    }
                }
                Kind::Symlink => self.stats.skipped_symlink(&path),
                Kind::Special => self.stats.skipped_special(&path),
                Kind::Dangling => self.stats.vanished(&path),
                Kind::Broken => match slot.found.get() {
                    Some(Found::Error(e)) => self.stats.file_error(&path, FileErrorKind::Walk, e),
                    _ => unreachable!("a broken link keeps its error"),
                },
                Kind::Dir => {
                    let found = self.wait(&slot.found, Some((&listing, index)));
                    if let Some(item) = self.descend(found, &path, Some((&listing, slot))) {
                        return Some(item);
                    }
                }
                Kind::File => {
                    self.stats.scanned();
                    match self.wait(&slot.found, None) {
                        Found::File(m, x) => {
                            let (m, x) = (*m, x.clone());
                            if let Some(mut e) = self.entry(&listing, slot, path, m) {
                                e.xattrs = x;
                                return Some(match &mut self.links {
                                    Some(links) => links.item(e),
                                    None => Item::File(e),
                                });
                            }
                        }
                        Found::Vanished => self.stats.vanished(&path),
                        Found::Error(e) => {
                            self.stats.file_error(&path, FileErrorKind::Unreadable, e)
                        }
                        _ => unreachable!("a file slot"),
                    }
                }
                Kind::Unknown | Kind::Link => unreachable!("resolved before sorting"),
            }
        }
    }
}

impl Iterator for Walk {
    type Item = LocalEntry;

    fn next(&mut self) -> Option<LocalEntry> {
        match self.next_item()? {
            Item::File(e) => Some(e),
            _ => unreachable!("only files outside tree mode"),
        }
    }
}

impl Iterator for Tree {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        self.0.next_item()
    }
}

impl Tree {
    /// See `Walk::calls`.
    #[cfg(test)]
    pub(super) fn calls(&self) -> (usize, usize, usize) {
        self.0.calls()
    }

    /// `listxattr`s made (`source.xattrs`).
    #[cfg(test)]
    pub(super) fn xattr_calls(&self) -> usize {
        self.0.shared.calls.xattr.load(SeqCst)
    }

    /// First names of multiply-linked files kept, and whether the bound was reached.
    #[cfg(test)]
    pub(super) fn hard_links_kept(&self) -> (usize, bool) {
        let l = self.0.links.as_ref().expect("tree mode");
        (l.first.len(), l.full)
    }
}

impl Drop for Walk {
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock().unwrap();
        q.closed = true;
        q.ready.clear();
        q.deferred.clear();
        self.shared.work.notify_all();
    }
}

/// Where a directory sits: its slot in its parent's listing (none for the root), and its name
/// as a relative path and as a key.
struct Place {
    parent: Option<Arc<Listing>>,
    index: usize,
    rel: PathBuf,
    key: String,
    escaped: bool,
    /// Read because `admit` started it: `Queue::in_flight` counts it until it is published.
    admitted: bool,
}

impl Shared {
    fn work_loop(&self) {
        loop {
            let task = {
                let mut q = self.queue.lock().unwrap();
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(Reverse(t)) = q.ready.pop() {
                        break t;
                    }
                    q = self.work.wait(q).unwrap();
                }
            };
            match task.work {
                Work::Stat { listing, from, to } => {
                    if let Some(fd) = listing.fd() {
                        for slot in &listing.slots[from..to] {
                            let found = match slot.kind {
                                Kind::File => {
                                    let found = self.stat_file(&fd, &slot.name, false);
                                    self.with_xattrs(&fd, &slot.name, found)
                                }
                                Kind::Symlink => self.stat_node(&fd, slot, true),
                                Kind::Special => self.stat_node(&fd, slot, false),
                                _ => unreachable!("only files, symlinks and specials are stat'ed"),
                            };
                            let _ = slot.found.set(found);
                        }
                    }
                    listing.one_done();
                }
                Work::List {
                    parent,
                    index,
                    admitted,
                } => {
                    let parent = parent.expect("the root is read at the start");
                    if parent.slots[index].started.swap(true, SeqCst) {
                        if admitted {
                            let mut q = self.queue.lock().unwrap();
                            q.in_flight -= 1;
                            self.admit(&mut q);
                        }
                        continue;
                    }
                    self.open_child(parent, index, admitted);
                }
                Work::Resolve { unsorted, from, to } => {
                    for (i, &index) in unsorted.unresolved[from..to].iter().enumerate() {
                        let slot = &unsorted.slots[index];
                        let r = self.resolve(&unsorted.fd, slot);
                        let _ = unsorted.resolved[from + i].set(r);
                    }
                    if unsorted.left.fetch_sub(1, SeqCst) == 1 {
                        self.finish(&unsorted);
                    }
                }
            }
            let _q = self.queue.lock().unwrap();
            self.done.notify_all();
        }
    }

    /// Opens the directory of `parent.slots[index]` relative to its parent and reads it.
    fn open_child(&self, parent: Arc<Listing>, index: usize, admitted: bool) {
        let slot = &parent.slots[index];
        let fail = |found: Found| {
            let place = Place {
                parent: Some(parent.clone()),
                index,
                rel: PathBuf::new(),
                key: String::new(),
                escaped: false,
                admitted,
            };
            self.publish(&place, found);
        };
        let Some(parent_fd) = parent.fd() else {
            return fail(Found::Error("its parent directory was closed".into()));
        };
        let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        if !slot.followed {
            flags |= OFlag::O_NOFOLLOW;
        }
        self.calls.open.fetch_add(1, Relaxed);
        let opened = nix::fcntl::openat(
            parent_fd.as_fd(),
            slot.name.as_os_str(),
            flags,
            Mode::empty(),
        );
        drop(parent_fd);
        let fd = match opened {
            Ok(fd) => fd,
            // Gone, or something else than a directory now (a symlink swapped in): what the
            // listing saw is no longer there.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => return fail(Found::Vanished),
            Err(e) => return fail(Found::Error(std::io::Error::from(e).to_string())),
        };
        // What one-file-system and the loop check need, and in tree mode the directory's item.
        self.calls.stat.fetch_add(1, Relaxed);
        let m = match fstat(fd.as_fd()) {
            Ok(st) => Meta::of(&st),
            Err(e) => return fail(Found::Error(std::io::Error::from(e).to_string())),
        };
        if self.opts.one_file_system && m.dev != self.opts.root_dev {
            return fail(Found::OtherFilesystem(m));
        }
        if parent.ancestry.contains(m.dev, m.ino) {
            return fail(Found::Loop);
        }
        let ancestry = Arc::new(Ancestry {
            dev: m.dev,
            ino: m.ino,
            parent: Some(parent.ancestry.clone()),
        });
        let place = Place {
            rel: parent.rel.join(&slot.name),
            key: parent.child_key(slot),
            escaped: parent.escaped || slot.escaped,
            parent: Some(parent.clone()),
            index,
            admitted,
        };
        // Read on the handle the walk holds: no lookup of the name again.
        let xattrs = if self.opts.xattrs {
            self.calls.xattr.fetch_add(1, Relaxed);
            crate::xattrs::read_fd(&fd)
                .map_err(|e| {
                    tracing::debug!(
                        "{}: extended attributes not read: {e}",
                        keys::shown(&place.rel)
                    )
                })
                .ok()
                .flatten()
                .map(Box::new)
        } else {
            None
        };
        self.read_dir(place, fd, ancestry, (m, xattrs));
    }

    /// Reads the directory open at `fd` (whose `fstat` is `meta`) and, once every entry's type is
    /// known (stat'ed side by side where readdir did not say), sorts and publishes it.
    fn read_dir(
        &self,
        place: Place,
        fd: OwnedFd,
        ancestry: Arc<Ancestry>,
        (meta, xattrs): (Meta, Option<Box<Xattrs>>),
    ) {
        let slots = match read_entries(&self.opts, &fd) {
            Ok(s) => s,
            Err(e) => return self.publish(&place, Found::Error(e.to_string())),
        };
        let unresolved: Vec<usize> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.kind, Kind::Unknown | Kind::Link))
            .map(|(i, _)| i)
            .collect();
        let chunks = unresolved.len().div_ceil(STAT_CHUNK);
        let mut key = place.key.clone().into_bytes();
        key.push(b'/');
        let unsorted = Arc::new(Unsorted {
            place,
            fd,
            ancestry,
            meta,
            xattrs,
            slots,
            resolved: (0..unresolved.len()).map(|_| OnceLock::new()).collect(),
            unresolved,
            left: AtomicUsize::new(chunks),
        });
        if chunks == 0 {
            return self.finish(&unsorted);
        }
        let mut q = self.queue.lock().unwrap();
        for c in 0..chunks {
            let from = c * STAT_CHUNK;
            let to = (from + STAT_CHUNK).min(unsorted.unresolved.len());
            q.seq += 1;
            let seq = q.seq;
            q.ready.push(Reverse(Task {
                key: key.clone(),
                seq,
                work: Work::Resolve {
                    unsorted: unsorted.clone(),
                    from,
                    to,
                },
            }));
        }
        self.work.notify_all();
    }

    /// Sorts a directory whose entries are all known, and hands it to its parent slot.
    fn finish(&self, unsorted: &Unsorted) {
        let place = &unsorted.place;
        let mut resolved = unsorted
            .unresolved
            .iter()
            .zip(&unsorted.resolved)
            .map(|(&i, r)| (i, r.get().expect("every resolve is done")))
            .peekable();
        let mut slots = Vec::with_capacity(unsorted.slots.len());
        for (i, s) in unsorted.slots.iter().enumerate() {
            let (mut kind, mut followed, mut found) = (s.kind, s.followed, None);
            if let Some((_, r)) = resolved.next_if(|(j, _)| *j == i) {
                (kind, followed) = (r.kind, r.followed);
                found = r.found.as_ref().map(Found::copy_file);
            }
            let is_dir = kind == Kind::Dir;
            // A followed link that leads nowhere is reported as such even when its name is
            // excluded, as the serial walk did: it is known only after following it.
            let resolvable = !matches!(kind, Kind::Dangling | Kind::Broken);
            if resolvable
                && self
                    .opts
                    .excludes
                    .is_excluded(&place.rel.join(&s.name), is_dir)
            {
                (kind, followed, found) = (Kind::Excluded, false, None);
            }
            let slot = Slot {
                name: s.name.clone(),
                key: s.key.clone(),
                escaped: s.escaped,
                kind,
                followed,
                found: OnceLock::new(),
                started: AtomicBool::new(false),
            };
            if let Some(f) = found {
                let _ = slot.found.set(f);
            }
            slots.push(slot);
        }
        slots.sort_by(|a, b| {
            keys::sibling_order(&a.key, a.kind == Kind::Dir, &b.key, b.kind == Kind::Dir)
        });
        let pending = slots.iter().filter(|s| s.kind == Kind::Dir).count()
            + stat_runs(&slots, self.opts.tree)
                .map(|(from, to)| (to - from).div_ceil(STAT_CHUNK))
                .sum::<usize>();
        let fd = match (pending > 0).then(|| unsorted.fd.try_clone()).transpose() {
            Ok(fd) => fd.map(Arc::new),
            Err(e) => return self.publish(place, Found::Error(e.to_string())),
        };
        let listing = Arc::new(Listing {
            rel: place.rel.clone(),
            key: place.key.clone(),
            escaped: place.escaped,
            ancestry: unsorted.ancestry.clone(),
            meta: unsorted.meta,
            xattrs: unsorted.xattrs.clone(),
            fd: Mutex::new(fd),
            pending: AtomicUsize::new(pending),
            slots,
            held: self.held.clone(),
        });
        self.held.fetch_add(listing.slots.len(), SeqCst);
        self.schedule(&listing);
        self.publish(place, Found::Dir(Mutex::new(Some(listing))));
    }

    fn publish(&self, place: &Place, found: Found) {
        match &place.parent {
            Some(parent) => {
                let _ = parent.slots[place.index].found.set(found);
                parent.one_done();
            }
            None => {
                let _ = self.root.set(found);
            }
        }
        let mut q = self.queue.lock().unwrap();
        if place.admitted {
            q.in_flight -= 1;
            self.admit(&mut q);
        }
        self.done.notify_all();
    }

    /// Queues the work a fresh listing needs: its files' stats, and its subdirectories' reads
    /// (deferred while the read-ahead is full).
    fn schedule(&self, listing: &Arc<Listing>) {
        let mut q = self.queue.lock().unwrap();
        q.ahead += listing.slots.len();
        q.dirs_read += 1;
        q.entries_read += listing.slots.len();
        for (from, to) in stat_runs(&listing.slots, self.opts.tree) {
            for start in (from..to).step_by(STAT_CHUNK) {
                q.seq += 1;
                let seq = q.seq;
                q.ready.push(Reverse(Task {
                    key: listing.child_key(&listing.slots[start]).into_bytes(),
                    seq,
                    work: Work::Stat {
                        listing: listing.clone(),
                        from: start,
                        to: (start + STAT_CHUNK).min(to),
                    },
                }));
            }
        }
        for (i, slot) in listing.slots.iter().enumerate() {
            if slot.kind == Kind::Dir {
                q.seq += 1;
                let mut key = listing.child_key(slot).into_bytes();
                key.push(b'/');
                let task = Task {
                    key,
                    seq: q.seq,
                    work: Work::List {
                        parent: Some(listing.clone()),
                        index: i,
                        admitted: true,
                    },
                };
                q.deferred.push(Reverse(task));
            }
        }
        self.admit(&mut q);
        self.work.notify_all();
    }

    /// Starts deferred directory reads, smallest key first, while the read-ahead has room: the
    /// entries waiting for the consumer, plus each read in flight reckoned at the average size of
    /// the directories read so far.
    fn admit(&self, q: &mut Queue) {
        let mut admitted = false;
        loop {
            let average = (q.entries_read / q.dirs_read.max(1)).max(1);
            if q.ahead + q.in_flight * average >= self.opts.ahead_entries
                || q.in_flight >= self.opts.threads
            {
                break;
            }
            let Some(task) = q.deferred.pop() else { break };
            q.ready.push(task);
            q.in_flight += 1;
            admitted = true;
        }
        if admitted {
            self.work.notify_all();
        }
    }
}

/// The runs of consecutive files (and in tree mode symlinks and specials) still to stat, as index
/// ranges.
fn stat_runs(slots: &[Slot], tree: bool) -> impl Iterator<Item = (usize, usize)> + '_ {
    let needs = move |s: &Slot| {
        (s.kind == Kind::File || tree && matches!(s.kind, Kind::Symlink | Kind::Special))
            && s.found.get().is_none()
    };
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < slots.len() && !needs(&slots[i]) {
            i += 1;
        }
        if i == slots.len() {
            return None;
        }
        let from = i;
        while i < slots.len() && needs(&slots[i]) {
            i += 1;
        }
        Some((from, i))
    })
}

fn open_root(root: &Path, calls: &Calls) -> std::io::Result<(OwnedFd, Meta)> {
    use std::os::unix::fs::OpenOptionsExt;
    calls.open.fetch_add(1, Relaxed);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(root)?;
    let fd = OwnedFd::from(f);
    calls.stat.fetch_add(1, Relaxed);
    let m = Meta::of(&fstat(fd.as_fd())?);
    Ok((fd, m))
}

impl Shared {
    /// A symlink's or special file's own metadata (tree mode), by a plain `fstatat`: unlike a file's,
    /// it is recorded as it is, and no `fstat` of an opened file comes after to correct a cached
    /// one. A symlink is then read. What is no longer the kind readdir said (replaced since) is
    /// `Vanished`, as a directory swapped for something else is.
    fn stat_node(&self, dir: &OwnedFd, slot: &Slot, symlink: bool) -> Found {
        let calls = &self.calls;
        let flags = if slot.followed {
            AtFlags::empty()
        } else {
            AtFlags::AT_SYMLINK_NOFOLLOW
        };
        calls.stat.fetch_add(1, Relaxed);
        let st = match fstatat(dir.as_fd(), slot.name.as_os_str(), flags) {
            Ok(st) => st,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Found::Vanished,
            Err(e) => return Found::Error(std::io::Error::from(e).to_string()),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let expected = if symlink {
            kind == SFlag::S_IFLNK
        } else {
            [
                SFlag::S_IFIFO,
                SFlag::S_IFSOCK,
                SFlag::S_IFCHR,
                SFlag::S_IFBLK,
            ]
            .contains(&kind)
        };
        if !expected {
            return Found::Vanished;
        }
        let target = if symlink {
            calls.readlink.fetch_add(1, Relaxed);
            match nix::fcntl::readlinkat(dir.as_fd(), slot.name.as_os_str()) {
                Ok(t) => Some(t),
                // Gone, or no longer a symlink (EINVAL), since the stat.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EINVAL) => return Found::Vanished,
                Err(e) => return Found::Error(std::io::Error::from(e).to_string()),
            }
        } else {
            None
        };
        Found::Node(Box::new(Node {
            meta: Meta::of(&st),
            rdev: st.st_rdev,
            target,
        }))
    }

    /// A regular file's `found` with its extended attributes, when they are asked for (tree mode,
    /// `source.xattrs`): read through the directory's handle, the name not followed. A file whose
    /// attributes cannot be read is recorded without them (said at debug).
    fn with_xattrs(&self, dir: &OwnedFd, name: &OsStr, found: Found) -> Found {
        match found {
            Found::File(m, None) if self.opts.xattrs && m.is_file() => {
                self.calls.xattr.fetch_add(1, Relaxed);
                match crate::xattrs::read_at(dir, name) {
                    Ok(x) => Found::File(m, x.map(Box::new)),
                    Err(e) => {
                        tracing::debug!("{}: extended attributes not read: {e}", keys::shown(name));
                        Found::File(m, None)
                    }
                }
            }
            found => found,
        }
    }

    fn stat_file(&self, dir: &OwnedFd, name: &OsStr, follow: bool) -> Found {
        self.calls.stat.fetch_add(1, Relaxed);
        let res = match statx_cached(dir, name, follow, self.opts.tree) {
            Some(res) => res,
            None => {
                let flags = if follow {
                    AtFlags::empty()
                } else {
                    AtFlags::AT_SYMLINK_NOFOLLOW
                };
                fstatat(dir.as_fd(), name, flags).map(|st| Meta::of(&st))
            }
        };
        match res {
            Ok(m) => Found::File(m, None),
            Err(Errno::ENOENT) => Found::Vanished,
            Err(e) => Found::Error(std::io::Error::from(e).to_string()),
        }
    }

    /// Decides what an entry of unknown type is (or what a symlink to follow points to), from a
    /// stat; a file keeps the stat, so it is not stat'ed again.
    fn resolve(&self, dir: &OwnedFd, slot: &Slot) -> Resolved {
        let opts = &self.opts;
        let is = |m: &Meta, t: SFlag| m.mode & SFlag::S_IFMT.bits() == t.bits();
        let mut link = slot.kind == Kind::Link;
        let mut found = self.stat_file(dir, &slot.name, link);
        if let Found::File(m, _) = &found {
            if !link && is(m, SFlag::S_IFLNK) {
                if !opts.follow {
                    return Resolved {
                        kind: Kind::Symlink,
                        followed: false,
                        found: None,
                    };
                }
                link = true;
                found = self.stat_file(dir, &slot.name, true);
            }
        }
        let (kind, keep) = match &found {
            Found::File(m, _) if m.is_dir() => (Kind::Dir, false),
            Found::File(m, _) if m.is_file() => (Kind::File, true),
            Found::File(..) => (Kind::Special, false),
            Found::Vanished if link => (Kind::Dangling, false),
            Found::Error(_) if link => (Kind::Broken, true),
            // Gone, or unreadable: the file's slot says so when the consumer gets there.
            _ => (Kind::File, true),
        };
        if kind == Kind::File {
            found = self.with_xattrs(dir, &slot.name, found);
        }
        Resolved {
            kind,
            // A special reached through a link is stat'ed through it again in tree mode.
            followed: link && matches!(kind, Kind::Dir | Kind::File | Kind::Special),
            found: keep.then_some(found),
        }
    }
}

/// Set once statx has said it is not there (a kernel before 4.11, or a seccomp filter that
/// refuses it): every later stat goes straight to fstatat.
static NO_STATX: AtomicBool = AtomicBool::new(false);

/// `statx(dir, name, AT_STATX_DONT_SYNC)`: the attributes the lookup of `name` just brought in,
/// without asking the server for them again. Resolving the name is itself a round trip that
/// returns the attributes (a FUSE LOOKUP, an NFS LOOKUP's post-op attributes); a plain stat then
/// sends a GETATTR as well whenever the client's attribute cache has expired — always, on a
/// mount with attribute caching off — which was one round trip in three of the walk (3 → 2 FUSE
/// operations per file on the bench's slow mount). A client that did not look the name up again
/// answers from its attribute cache, at most its cache timeout old (NFS `acregmax`, 60 s by
/// default): for deciding what changed, that only moves the walk's view of that file by as much,
/// as a walk that takes hours is no snapshot anyway. What is uploaded and recorded never comes
/// from this stat, but from `fstat` of the opened file (upload.rs). `None`: use fstatat.
fn statx_cached(
    dir: &OwnedFd,
    name: &OsStr,
    follow: bool,
    tree: bool,
) -> Option<Result<Meta, Errno>> {
    use rustix::fs::{AtFlags as X, StatxFlags};
    if NO_STATX.load(SeqCst) {
        return None;
    }
    let mut flags = X::STATX_DONT_SYNC;
    if !follow {
        flags |= X::SYMLINK_NOFOLLOW;
    }
    let mut need = StatxFlags::TYPE
        | StatxFlags::MODE
        | StatxFlags::UID
        | StatxFlags::GID
        | StatxFlags::MTIME
        | StatxFlags::INO
        | StatxFlags::SIZE;
    // The number of names is asked for always (it costs nothing more), but needed only to find
    // hard links in tree mode: a files-only walk does not stat again for it.
    if tree {
        need |= StatxFlags::NLINK;
    }
    // The allocated blocks come with the same reply (a hint of holes, `LocalEntry::blocks`), and
    // are not required: a filesystem without them only loses the hint.
    match rustix::fs::statx(
        dir,
        name,
        flags,
        need | StatxFlags::NLINK | StatxFlags::BLOCKS,
    ) {
        // A filesystem that leaves out a field it was asked for gets the plain stat instead.
        Ok(st) if StatxFlags::from_bits_retain(st.stx_mask).contains(need) => Some(Ok(Meta {
            size: st.stx_size,
            mtime_ns: crate::fsutil::ns(st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec.into()),
            mode: st.stx_mode.into(),
            uid: st.stx_uid,
            gid: st.stx_gid,
            nlink: if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::NLINK) {
                st.stx_nlink
            } else {
                0
            },
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            blocks: if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::BLOCKS) {
                st.stx_blocks
            } else {
                u64::MAX
            },
        })),
        Ok(_) => None,
        Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::PERM => {
            NO_STATX.store(true, SeqCst);
            None
        }
        Err(e) => Some(Err(Errno::from_raw(e.raw_os_error()))),
    }
}

/// Reads a directory's entries, with the type readdir gives (unknown ones are resolved later).
fn read_entries(opts: &Opts, fd: &OwnedFd) -> std::io::Result<Vec<Slot>> {
    let mut dir = nix::dir::Dir::from_fd(fd.try_clone()?)?;
    let mut slots = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match entry.file_type() {
            Some(nix::dir::Type::Directory) => Kind::Dir,
            Some(nix::dir::Type::File) => Kind::File,
            Some(nix::dir::Type::Symlink) if opts.follow => Kind::Link,
            Some(nix::dir::Type::Symlink) => Kind::Symlink,
            Some(_) => Kind::Special,
            None => Kind::Unknown,
        };
        let name = OsStr::from_bytes(name).to_os_string();
        let component = keys::component(&name);
        slots.push(Slot {
            escaped: matches!(component, std::borrow::Cow::Owned(_)),
            key: component.into_owned(),
            name,
            kind,
            followed: false,
            found: OnceLock::new(),
            started: AtomicBool::new(false),
        });
    }
    Ok(slots)
}
