//! Walks the source tree and yields its regular files in S3 key order, one at a time, so the planner
//! can merge them with the bucket listing and the manifest without holding the tree in memory.
//!
//! Excluded directories are pruned (never opened, so an unreadable excluded directory costs no
//! error); other filesystems are not entered with one-file-system; symlinks are skipped unless
//! configured to be followed; sockets, fifos and devices are skipped and counted.
//!
//! Two ways to walk, one walk:
//!
//! - [`scan`] yields only the regular files ([`LocalEntry`]), what the copy needs. It reads
//!   nothing it does not need: a file costs one stat, a directory an open and an `fstat` (for
//!   one-file-system and loops), and a symlink, FIFO, socket or device nothing at all — `d_type`
//!   says what it is, and it is counted as skipped.
//! - [`scan_tree`] yields every path the walk keeps, as an [`Item`], in the same key order, for a
//!   snapshot of the tree: files as above; each directory as the walk enters it, before its
//!   contents (its key is `name/`, which is where it sorts), from the `fstat` of the handle the
//!   walk opened it with — no call more than `scan`'s; a symlink's own metadata and target from
//!   `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)` and `readlinkat(dir, name)`, done on the walk's
//!   pool; a FIFO, socket or device node from one `fstatat` (its type, mode, owner and `rdev`).
//!   Those stats are plain ones, not the cached statx a file's is: what they say is recorded as
//!   it is, and no later `fstat` of an opened file corrects it. The root itself is not an item;
//!   excluded paths are absent, as are those that vanished or could not be read (each counted).
//!   Symlinks and specials recorded are not counted as skipped. With `symlinks: follow` a symlink
//!   is what it leads to (a file, a directory or a special), as in `scan`.
//!
//! Hard links, in the tree: a regular file with more than one name is an [`Item::File`] the first
//! time its device and inode come by in walk order, and an [`Item::Hardlink`] naming that first
//! path at each later name. The names kept for this are those of multiply-linked files only, and
//! a name is let go once its inode's other names have all come by (an inode with names outside
//! the tree, or excluded, stays to the end). They are bounded by [`HARD_LINK_NAMES`] (about 150
//! bytes each): past it, one warning, and files not already known are recorded as plain files
//! (restored as separate copies). A file reached through a followed symlink is always a plain
//! file: its inode is the target's.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod beneath;
#[cfg(test)]
mod reference;
mod walk;

use crate::config::{Config, ConfigError, Excludes, SymlinkPolicy};
use crate::keys;
use crate::report::Stats;
use crate::xattrs::Xattrs;

/// One regular file as seen by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEntry {
    /// The key below the destination prefix.
    pub key: String,
    pub path: PathBuf,
    /// Set when a component had to be escaped: the percent-encoded original relative path.
    pub raw_path: Option<String>,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device and inode the walk saw: what is opened later must be this very file.
    pub dev: u64,
    pub ino: u64,
    /// Its number of names (hard links). 0 where a files-only walk's statx did not give it (that
    /// walk needs no more).
    pub nlink: u64,
    /// Allocated 512-byte blocks, from the same stat (`u64::MAX` where it did not say): fewer
    /// than the size needs, and the file may have holes (`may_have_holes`).
    pub blocks: u64,
    /// Its extended attributes, read by a tree walk with `source.xattrs`.
    pub xattrs: Option<Box<Xattrs>>,
    /// Reached through a symlink the walk chose to follow (`source.symlinks: follow`): only then
    /// may opening it follow a symlink.
    pub followed: bool,
}

impl LocalEntry {
    /// The entry for a file stat'ed by other means than the walk (a worker's file, the manifest's
    /// copy): `key` below the prefix, never reached through a symlink.
    pub fn from_metadata(
        key: String,
        path: PathBuf,
        raw_path: Option<String>,
        m: &std::fs::Metadata,
    ) -> LocalEntry {
        use std::os::unix::fs::MetadataExt;
        LocalEntry {
            key,
            path,
            raw_path,
            size: m.len(),
            mtime_ns: crate::fsutil::ns(m.mtime(), m.mtime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
            blocks: m.blocks(),
            xattrs: None,
            followed: false,
        }
    }

    /// Whether its stat allows holes: fewer blocks allocated than its size takes. Not proof of
    /// one (a compressed or deduplicated file looks the same), only what makes a look worth it.
    pub fn may_have_holes(&self) -> bool {
        self.blocks.saturating_mul(512) < self.size
    }
}

/// One path of the tree, in key order ([`scan_tree`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A regular file (the first name of one with several).
    File(LocalEntry),
    /// A later name of a file that came by earlier: `first` is that earlier name, relative to the
    /// source. Still a file for the copy: its key gets its bytes like any other's.
    Hardlink {
        entry: LocalEntry,
        first: PathBuf,
    },
    Dir(TreeEntry),
    Symlink(TreeEntry),
    /// A FIFO, a socket or a device node: `mode` says which.
    Special(TreeEntry),
}

impl Item {
    /// Where it sorts: a file's key, a directory's with a `/` after it.
    pub fn key(&self) -> &str {
        match self {
            Item::File(e) | Item::Hardlink { entry: e, .. } => &e.key,
            Item::Dir(t) | Item::Symlink(t) | Item::Special(t) => &t.key,
        }
    }
}

/// A directory, symlink or special file of the tree: its own metadata (`lstat`'s, or `fstat`'s of
/// the directory's handle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Its key below the destination prefix; a directory's ends in `/`.
    pub key: String,
    /// Relative to the source root, its bytes as they are (`keys::encode_raw_path` to record).
    pub rel: PathBuf,
    /// Type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// A device node's number (0 for anything else).
    pub rdev: u64,
    /// A symlink's target, its bytes as they are.
    pub target: Option<OsString>,
    /// A directory's extended attributes (`source.xattrs`).
    pub xattrs: Option<Box<Xattrs>>,
}

/// Multiply-linked files whose other names may still come, kept at most (see the module's docs).
pub const HARD_LINK_NAMES: usize = 1_000_000;

/// The first names of multiply-linked files seen so far, by device and inode: what tells a file's
/// later names (hard links) from its first, in walk order.
struct HardLinks {
    root: PathBuf,
    /// The first name, and how many names are still to come.
    first: HashMap<(u64, u64), (Box<Path>, u64)>,
    bound: usize,
    /// The bound was reached (said once).
    full: bool,
}

impl HardLinks {
    fn new(root: &Path, bound: usize) -> HardLinks {
        HardLinks {
            root: root.to_owned(),
            first: HashMap::new(),
            bound,
            full: false,
        }
    }

    /// The item of a file the walk kept, in walk order.
    fn item(&mut self, entry: LocalEntry) -> Item {
        if entry.nlink < 2 || entry.followed {
            return Item::File(entry);
        }
        let id = (entry.dev, entry.ino);
        if let Some((first, left)) = self.first.get_mut(&id) {
            *left = left.saturating_sub(1);
            let first = if *left == 0 {
                self.first
                    .remove(&id)
                    .expect("just found")
                    .0
                    .into_path_buf()
            } else {
                first.to_path_buf()
            };
            return Item::Hardlink { entry, first };
        }
        if self.first.len() >= self.bound {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    "{} files with more than one name wait for their other names: further ones \
                     are recorded as separate files, not hard links, to bound memory",
                    self.first.len()
                );
            }
            return Item::File(entry);
        }
        let rel = entry.path.strip_prefix(&self.root).unwrap_or(&entry.path);
        self.first
            .insert(id, (rel.to_path_buf().into_boxed_path(), entry.nlink - 1));
        Item::File(entry)
    }
}

/// Why a scanned file could not be opened as what the walk saw.
#[derive(Debug)]
pub enum OpenError {
    /// Gone from its name.
    Vanished,
    /// Something else is at its name now: a symlink, a FIFO, a device, another file.
    Replaced(String),
    Io(std::io::Error),
}

/// Opens a scanned file for reading, and only as what the walk saw: without following a symlink
/// (unless the walk followed one to it), without blocking on a FIFO or taking a terminal, and
/// then `fstat`ed — it must be a regular file with the walk's device and inode. The stat returned
/// is of the open file: size, times, mode and owner are taken from it, never from the path.
///
/// This is what stops a user who swaps their file for a symlink to a root-only file (or for a
/// FIFO) between the walk and the read: nightcopy reads with the right to read everything, and
/// would otherwise upload the other file's bytes under their name, or hang on the FIFO.
pub fn open_entry(entry: &LocalEntry) -> Result<(std::fs::File, std::fs::Metadata), OpenError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let mut flags = nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC;
    if !entry.followed {
        flags |= nix::libc::O_NOFOLLOW;
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(&entry.path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OpenError::Vanished),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(OpenError::Replaced("a symlink".into()))
        }
        Err(e) => return Err(OpenError::Io(e)),
    };
    let meta = file.metadata().map_err(OpenError::Io)?;
    let ft = meta.file_type();
    let what = if ft.is_file() {
        None
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("a device")
    } else {
        Some("not a regular file")
    };
    if let Some(what) = what {
        return Err(OpenError::Replaced(what.into()));
    }
    if (meta.dev(), meta.ino()) != (entry.dev, entry.ino) {
        return Err(OpenError::Replaced(format!(
            "another file (inode {} on device {:#x}, the walk saw inode {} on {:#x})",
            meta.ino(),
            meta.dev(),
            entry.ino,
            entry.dev
        )));
    }
    Ok((file, meta))
}

#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub root: PathBuf,
    pub excludes: Arc<Excludes>,
    pub one_file_system: bool,
    pub symlinks: SymlinkPolicy,
    /// Bytes available for the key after the destination prefix.
    pub max_key_bytes: usize,
    /// `source.max-file-size`: larger files are errors, never read.
    pub max_file_size: u64,
    /// Threads that read directories and stat files side by side (`source.walk-concurrency`).
    pub walk_concurrency: usize,
    /// In tree mode, read the extended attributes of files and directories (`source.xattrs`).
    pub xattrs: bool,
}

impl ScanOptions {
    /// The walk `config` describes: its source, excludes and policies, and the key length left
    /// after its prefix.
    pub fn for_config(config: &Config) -> Result<ScanOptions, ConfigError> {
        Ok(ScanOptions {
            root: config.source.path.0.clone(),
            excludes: config.excludes()?,
            one_file_system: config.source.one_file_system,
            symlinks: config.source.symlinks,
            max_key_bytes: keys::MAX_KEY_BYTES - config.destination.prefix.as_str().len(),
            max_file_size: config.source.max_file_size.0,
            walk_concurrency: config.source.walk_concurrency.0,
            xattrs: config.source.xattrs,
        })
    }
}

/// The walk as an iterator of files in key order (`walk`: parallel, on `walk-concurrency`
/// threads). Problems are reported to `stats` as they happen.
pub fn scan(opts: ScanOptions, stats: Arc<Stats>) -> impl Iterator<Item = LocalEntry> {
    walk::Walk::start(&opts, stats)
}

/// The same walk yielding every path it keeps — directories, symlinks, hard links and special
/// files too — in key order, at the cost the module's docs give.
pub fn scan_tree(opts: ScanOptions, stats: Arc<Stats>) -> impl Iterator<Item = Item> {
    walk::Walk::start_tree(&opts, stats, HARD_LINK_NAMES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn walk_comes_out_in_key_order_and_prunes() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for f in [
            "a-b", "a/x", "a/y/z", "a.txt", "a0", "b c/d", "skip/me", "k+%",
        ] {
            let p = r.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, f).unwrap();
        }
        std::os::unix::fs::symlink("a.txt", r.join("link")).unwrap();
        let stats = Arc::new(Stats::default());
        let opts = ScanOptions {
            root: r.to_owned(),
            excludes: Arc::new(Excludes::new(&[("skip/**".into(), "test".into())]).unwrap()),
            one_file_system: true,
            symlinks: SymlinkPolicy::Skip,
            max_key_bytes: 1024,
            max_file_size: u64::MAX,
            walk_concurrency: 4,
            xattrs: false,
        };
        let keys: Vec<String> = scan(opts, stats.clone()).map(|e| e.key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "walk order must be key order");
        assert_eq!(keys, ["a-b", "a.txt", "a/x", "a/y/z", "a0", "b c/d", "k+%"]);
        let f = stats.snapshot(Default::default());
        assert_eq!((f.excluded, f.skipped_symlinks, f.scanned), (1, 1, 7));
    }
}

#[cfg(test)]
mod walk_tests {
    //! The parallel walk against the serial reference (`reference.rs`, today's walk before it):
    //! the same files in the same order with the same stats, and the same figures, whatever the
    //! tree, the thread count and the read-ahead — and in tree mode the same items.
    use super::*;
    use std::ffi::OsString;
    use std::fs;
    use std::os::unix::ffi::OsStringExt;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use nix::sys::stat::SFlag;
    use std::os::unix::fs::MetadataExt;

    use crate::report::Figures;

    /// A name from an alphabet of traps: bytes below '/', a name that is a prefix of another, a
    /// newline, a byte that is not UTF-8, a '%'.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"a".to_vec()),
            Just(b"a-b".to_vec()),
            Just(b"a.b".to_vec()),
            Just(b"a0".to_vec()),
            Just(b"b".to_vec()),
            Just(b"x\ny".to_vec()),
            Just(b"caf\xe9".to_vec()),
            Just(b"50%".to_vec()),
            Just("é".as_bytes().to_vec()),
        ]
    }

    #[derive(Debug, Clone)]
    enum Node {
        File(usize),
        Dir,
        /// To `a`, beside it: a file, a directory or nothing.
        Symlink,
        /// To `<root>/a`.
        AbsoluteSymlink,
        /// To an absolute path that is not there.
        DanglingSymlink,
        /// Another name of the n-th file made so far (modulo their number).
        Hardlink(usize),
        Fifo,
        Socket,
    }

    fn tree() -> impl Strategy<Value = Vec<(Vec<Vec<u8>>, Node)>> {
        let node = prop_oneof![
            4 => (0usize..300).prop_map(Node::File),
            2 => Just(Node::Dir),
            1 => Just(Node::Symlink),
            1 => Just(Node::AbsoluteSymlink),
            1 => Just(Node::DanglingSymlink),
            2 => (0usize..8).prop_map(Node::Hardlink),
            1 => Just(Node::Fifo),
            1 => Just(Node::Socket),
        ];
        proptest::collection::vec((proptest::collection::vec(name(), 1..5), node), 0..40)
    }

    fn build(root: &Path, nodes: &[(Vec<Vec<u8>>, Node)]) {
        let mut files = Vec::new();
        for (parts, node) in nodes {
            let mut p = root.to_path_buf();
            for part in parts {
                p.push(OsString::from_vec(part.clone()));
            }
            // A component that is already a file cannot hold more: skip such a node.
            if p.parent().is_some_and(|d| fs::create_dir_all(d).is_err())
                || fs::symlink_metadata(&p).is_ok()
            {
                continue;
            }
            match node {
                Node::File(n) => {
                    fs::write(&p, vec![7u8; *n]).unwrap();
                    files.push(p);
                }
                Node::Dir => fs::create_dir_all(&p).unwrap(),
                Node::Symlink => std::os::unix::fs::symlink("a", &p).unwrap(),
                Node::AbsoluteSymlink => std::os::unix::fs::symlink(root.join("a"), &p).unwrap(),
                Node::DanglingSymlink => {
                    std::os::unix::fs::symlink("/nonexistent/nightcopy-test", &p).unwrap()
                }
                Node::Hardlink(n) if !files.is_empty() => {
                    fs::hard_link(&files[n % files.len()], &p).unwrap()
                }
                Node::Hardlink(_) => {}
                Node::Fifo => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap(),
                Node::Socket => drop(std::os::unix::net::UnixListener::bind(&p).unwrap()),
            }
        }
    }

    fn options(
        root: &Path,
        excludes: &[&str],
        symlinks: SymlinkPolicy,
        threads: usize,
    ) -> ScanOptions {
        ScanOptions {
            root: root.to_owned(),
            excludes: Arc::new(
                Excludes::new(
                    &excludes
                        .iter()
                        .map(|p| (p.to_string(), "test".to_string()))
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
            ),
            one_file_system: true,
            symlinks,
            max_key_bytes: 1024,
            max_file_size: u64::MAX,
            walk_concurrency: threads,
            xattrs: false,
        }
    }

    fn figures(stats: &Stats) -> Figures {
        let mut f = stats.snapshot(Default::default());
        f.elapsed_seconds = 0.0;
        f
    }

    fn both(
        opts: &ScanOptions,
        ahead: usize,
    ) -> ((Vec<LocalEntry>, Figures), (Vec<LocalEntry>, Figures)) {
        let s1 = Arc::new(Stats::default());
        let serial: Vec<_> = reference::scan(opts.clone(), s1.clone()).collect();
        let s2 = Arc::new(Stats::default());
        let parallel: Vec<_> = walk::Walk::with_ahead(opts, s2.clone(), ahead).collect();
        ((serial, figures(&s1)), (parallel, figures(&s2)))
    }

    /// `both` in tree mode, keeping at most `links` first names of multiply-linked files.
    fn both_trees(
        opts: &ScanOptions,
        ahead: usize,
        links: usize,
    ) -> ((Vec<Item>, Figures), (Vec<Item>, Figures)) {
        let s1 = Arc::new(Stats::default());
        let serial: Vec<_> = reference::scan_tree(opts.clone(), s1.clone(), links).collect();
        let s2 = Arc::new(Stats::default());
        let parallel: Vec<_> =
            walk::Walk::tree_with_ahead(opts, s2.clone(), ahead, links).collect();
        ((serial, figures(&s1)), (parallel, figures(&s2)))
    }

    /// The files of a tree walk, as a files-only walk yields them.
    fn files_of(items: &[Item]) -> Vec<LocalEntry> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::File(e) | Item::Hardlink { entry: e, .. } => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn the_parallel_walk_is_the_serial_walk(
            nodes in tree(),
            threads in 1usize..9,
            ahead in prop_oneof![Just(1usize), Just(3), Just(20_000)],
            follow in proptest::bool::ANY,
            exclude in prop_oneof![Just(vec![]), Just(vec!["a-b"]), Just(vec!["b/**"]), Just(vec!["*.b", "/a/a/**"])],
        ) {
            let t = tempfile::tempdir().unwrap();
            build(t.path(), &nodes);
            let symlinks = if follow { SymlinkPolicy::Follow } else { SymlinkPolicy::Skip };
            let opts = options(t.path(), &exclude, symlinks, threads);
            let ((serial, sf), (parallel, pf)) = both(&opts, ahead);
            prop_assert_eq!(&parallel, &serial);
            prop_assert_eq!(pf, sf);
            let mut keys: Vec<_> = parallel.iter().map(|e| e.key.clone()).collect();
            let walked = keys.clone();
            keys.sort();
            prop_assert_eq!(walked, keys, "key order");

            let ((serial_tree, stf), (tree, tf)) = both_trees(&opts, ahead, HARD_LINK_NAMES);
            prop_assert_eq!(&tree, &serial_tree);
            prop_assert_eq!(tf, stf);
            // The files are the files-only walk's, whatever else the tree holds.
            prop_assert_eq!(files_of(&tree), parallel);
            let keys: Vec<_> = tree.iter().map(|i| i.key().to_owned()).collect();
            prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "key order: {:?}", keys);
        }
    }

    fn tree_entry(item: &Item) -> &TreeEntry {
        match item {
            Item::Dir(t) | Item::Symlink(t) | Item::Special(t) => t,
            _ => panic!("not a tree entry: {item:?}"),
        }
    }

    /// Every kind of path in one small tree: each comes out once, in key order, as what it is,
    /// with its own metadata; the reference walk says the same.
    #[test]
    fn a_tree_has_every_kind_of_path() {
        use std::os::unix::fs::FileTypeExt;
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["a", "b", "empty", "skip"] {
            fs::create_dir(r.join(d)).unwrap();
        }
        fs::write(r.join("a/x"), b"shared").unwrap();
        fs::hard_link(r.join("a/x"), r.join("b/y")).unwrap();
        // A third name the walk never sees: the second still comes out as a hard link.
        fs::hard_link(r.join("a/x"), r.join("skip/z")).unwrap();
        fs::write(r.join("b/z"), b"alone").unwrap();
        std::os::unix::fs::symlink("nowhere", r.join("dangling")).unwrap();
        std::os::unix::fs::symlink(r.join("a/x"), r.join("absolute")).unwrap();
        nix::unistd::mkfifo(
            &r.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        drop(std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap());
        for threads in [1, 4] {
            let opts = options(r, &["skip/**"], SymlinkPolicy::Skip, threads);
            let ((serial, sf), (items, f)) = both_trees(&opts, 20_000, HARD_LINK_NAMES);
            assert_eq!(items, serial);
            assert_eq!(f, sf);
            let keys: Vec<_> = items.iter().map(Item::key).collect();
            assert_eq!(
                keys,
                [
                    "a/", "a/x", "absolute", "b/", "b/y", "b/z", "dangling", "empty/", "fifo",
                    "sock"
                ]
            );
            assert!(matches!(&items[1], Item::File(e) if e.nlink == 3));
            match &items[4] {
                Item::Hardlink { entry, first } => {
                    assert_eq!(entry.path, r.join("b/y"));
                    assert_eq!(first, Path::new("a/x"));
                }
                other => panic!("b/y is not a hard link: {other:?}"),
            }
            assert!(matches!(&items[5], Item::File(e) if e.nlink == 1));
            for (i, target) in [(2, r.join("a/x")), (6, "nowhere".into())] {
                assert!(matches!(items[i], Item::Symlink(_)), "{:?}", items[i]);
                let t = tree_entry(&items[i]);
                assert_eq!(t.target.as_deref(), Some(target.as_os_str()));
                let m = fs::symlink_metadata(r.join(&t.rel)).unwrap();
                assert!(m.file_type().is_symlink());
                assert_eq!(t.size, target.as_os_str().len() as u64);
            }
            for i in [0, 3, 7] {
                assert!(matches!(items[i], Item::Dir(_)), "{:?}", items[i]);
                let t = tree_entry(&items[i]);
                let m = fs::symlink_metadata(r.join(&t.rel)).unwrap();
                assert_eq!(
                    (t.mode, t.uid, t.gid, t.mtime_ns),
                    (
                        m.mode(),
                        m.uid(),
                        m.gid(),
                        crate::fsutil::ns(m.mtime(), m.mtime_nsec())
                    )
                );
            }
            let (fifo, sock) = (tree_entry(&items[8]), tree_entry(&items[9]));
            assert!(matches!(items[8], Item::Special(_)) && matches!(items[9], Item::Special(_)));
            let m = fs::symlink_metadata(r.join("fifo")).unwrap();
            assert!(m.file_type().is_fifo());
            assert_eq!((fifo.mode, fifo.rdev), (m.mode(), 0));
            assert_eq!(fifo.mode & 0o7777, 0o640);
            assert_eq!(sock.mode & nix::libc::S_IFMT, nix::libc::S_IFSOCK);
            // Nothing is skipped in a tree: the symlinks and specials are in it.
            assert_eq!(
                (f.skipped_symlinks, f.skipped_special, f.excluded, f.scanned),
                (0, 0, 1, 3)
            );
        }
        // A files-only walk of the same tree: the same files, the rest skipped as before.
        let opts = options(r, &["skip/**"], SymlinkPolicy::Skip, 4);
        let ((serial, sf), (files, f)) = both(&opts, 20_000);
        assert_eq!(files, serial);
        assert_eq!(f, sf);
        let keys: Vec<_> = files.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a/x", "b/y", "b/z"]);
        assert_eq!(
            (f.skipped_symlinks, f.skipped_special, f.excluded, f.scanned),
            (2, 2, 1, 3)
        );
    }

    /// A device node is recorded with its number. Making one takes CAP_MKNOD: without it the
    /// test fails rather than passing on nothing.
    #[test]
    fn a_device_node_keeps_its_number() {
        let t = tempfile::tempdir().unwrap();
        let dev = nix::sys::stat::makedev(1, 3);
        nix::sys::stat::mknod(
            &t.path().join("null"),
            SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            dev,
        )
        .expect("mknod of a character device (needs CAP_MKNOD)");
        let opts = options(t.path(), &[], SymlinkPolicy::Skip, 2);
        let ((serial, _), (items, _)) = both_trees(&opts, 20_000, HARD_LINK_NAMES);
        assert_eq!(items, serial);
        match &items[..] {
            [Item::Special(t)] => {
                assert_eq!(t.mode & nix::libc::S_IFMT, nix::libc::S_IFCHR);
                assert_eq!(t.rdev, dev);
            }
            other => panic!("{other:?}"),
        }
    }

    /// What each mode costs, in the calls the walk makes: a files-only walk opens and `fstat`s
    /// each directory and stats each file, and no more — a symlink, FIFO or socket costs it
    /// nothing; tree mode adds one stat per symlink and special and one readlink per symlink,
    /// and nothing per directory or file.
    #[test]
    fn tree_mode_costs_a_stat_per_symlink_and_special_and_files_only_costs_nothing_more() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["d", "d/e", "f"] {
            fs::create_dir(r.join(d)).unwrap();
        }
        for f in ["x", "d/x", "d/e/x", "f/x", "f/y"] {
            fs::write(r.join(f), b"1").unwrap();
        }
        fs::hard_link(r.join("x"), r.join("d/e/y")).unwrap();
        for (i, l) in ["l1", "d/l2", "f/l3"].iter().enumerate() {
            std::os::unix::fs::symlink(format!("target{i}"), r.join(l)).unwrap();
        }
        nix::unistd::mkfifo(&r.join("d/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        drop(std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap());
        let (dirs, files, symlinks, specials) = (3, 6, 3, 2);
        let opts = options(r, &[], SymlinkPolicy::Skip, 4);

        let mut walk = walk::Walk::with_ahead(&opts, Arc::new(Stats::default()), 20_000);
        assert_eq!(walk.by_ref().count(), files);
        // The root is opened and fstat'ed too.
        assert_eq!(walk.calls(), (1 + dirs, 1 + dirs + files, 0));

        let mut tree = walk::Walk::tree_with_ahead(&opts, Arc::new(Stats::default()), 20_000, 10);
        assert_eq!(tree.by_ref().count(), dirs + files + symlinks + specials);
        assert_eq!(
            tree.calls(),
            (1 + dirs, 1 + dirs + files + symlinks + specials, symlinks)
        );
    }

    /// `source.xattrs` costs one `listxattr` per file and directory in tree mode (on the
    /// directory's own handle, or through the parent's for a file), none for symlinks and
    /// specials, and nothing in a files-only walk; what it reads comes with the items.
    #[test]
    fn xattrs_cost_a_listxattr_per_file_and_directory_in_tree_mode_only() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir(r.join("d")).unwrap();
        for f in ["x", "d/y"] {
            fs::write(r.join(f), b"1").unwrap();
        }
        std::os::unix::fs::symlink("x", r.join("l")).unwrap();
        nix::unistd::mkfifo(&r.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        for (p, v) in [("x", &b"blue"[..]), ("d", b"red")] {
            rustix::fs::setxattr(r.join(p), "user.color", v, rustix::fs::XattrFlags::empty())
                .expect("the test directory keeps user.* attributes");
        }
        let mut opts = options(r, &[], SymlinkPolicy::Skip, 2);
        opts.xattrs = true;
        let mut tree = walk::Walk::tree_with_ahead(&opts, Arc::new(Stats::default()), 20_000, 10);
        let items: Vec<Item> = tree.by_ref().collect();
        assert_eq!(tree.xattr_calls(), 1 + 2, "a directory and two files");
        let color = |x: &Option<Box<Xattrs>>| x.as_ref().map(|x| x.pairs[0].1.clone());
        for item in &items {
            match item {
                Item::Dir(t) => assert_eq!(color(&t.xattrs).as_deref(), Some("cmVk")),
                Item::File(e) if e.key == "x" => {
                    assert_eq!(color(&e.xattrs).as_deref(), Some("Ymx1ZQ=="))
                }
                Item::File(e) => assert_eq!(e.xattrs, None),
                Item::Symlink(t) | Item::Special(t) => assert_eq!(t.xattrs, None),
                Item::Hardlink { .. } => unreachable!(),
            }
        }
        assert_eq!(items.len(), 5);
        let mut walk = walk::Walk::with_ahead(&opts, Arc::new(Stats::default()), 20_000);
        assert!(walk.by_ref().all(|e| e.xattrs.is_none()));
        opts.xattrs = false;
        let mut tree = walk::Walk::tree_with_ahead(&opts, Arc::new(Stats::default()), 20_000, 10);
        assert_eq!(tree.by_ref().count(), 5);
        assert_eq!(tree.xattr_calls(), 0);
    }

    /// The first names kept to find hard links never pass their bound: past it, a new
    /// multiply-linked file is a plain file (and so are its later names), while those already
    /// known still find theirs; a name is let go once its inode's names have all come by.
    #[test]
    fn the_hard_link_names_kept_are_bounded() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["1", "2"] {
            fs::create_dir(r.join(d)).unwrap();
        }
        for i in 0..5 {
            fs::write(r.join(format!("1/f{i}")), b"x").unwrap();
            fs::hard_link(r.join(format!("1/f{i}")), r.join(format!("2/g{i}"))).unwrap();
        }
        let opts = options(r, &[], SymlinkPolicy::Skip, 3);
        let ((serial, _), (items, _)) = both_trees(&opts, 20_000, 2);
        assert_eq!(items, serial);
        let kinds: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::File(e) => format!("file {}", e.key),
                Item::Hardlink { entry, first } => {
                    format!("{} -> {}", entry.key, first.display())
                }
                Item::Dir(t) => format!("dir {}", t.key),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "dir 1/",
                "file 1/f0",
                "file 1/f1",
                "file 1/f2",
                "file 1/f3",
                "file 1/f4",
                "dir 2/",
                "2/g0 -> 1/f0",
                "2/g1 -> 1/f1",
                "file 2/g2",
                "file 2/g3",
                "file 2/g4"
            ]
        );
        let mut walk = walk::Walk::tree_with_ahead(&opts, Arc::new(Stats::default()), 20_000, 2);
        let mut most = 0;
        while walk.next().is_some() {
            most = most.max(walk.hard_links_kept().0);
        }
        assert_eq!(most, 2);
        // 1/f0 and 1/f1 were let go once their second names came by, which made room for 2/g2
        // and 2/g3 (whose other names came first, as plain files).
        assert_eq!(walk.hard_links_kept(), (2, true));
    }

    #[test]
    fn a_deep_tree_and_a_wide_directory() {
        let t = tempfile::tempdir().unwrap();
        let mut deep = t.path().to_path_buf();
        for i in 0..60 {
            deep.push(format!("d{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("leaf"), b"x").unwrap();
        let wide = t.path().join("wide");
        fs::create_dir(&wide).unwrap();
        for i in 0..3000 {
            fs::write(wide.join(format!("f{i}")), b"y").unwrap();
        }
        let opts = options(t.path(), &[], SymlinkPolicy::Skip, 8);
        let ((serial, sf), (parallel, pf)) = both(&opts, 100);
        assert_eq!(parallel.len(), 3001);
        assert_eq!(parallel, serial);
        assert_eq!(pf, sf);
    }

    /// Drops the DAC capabilities of the calling thread (and of threads it starts), so that a
    /// test run as root meets permissions like an ordinary user.
    fn without_dac_capabilities() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with the version-3 header and two data words, as documented.
        unsafe {
            assert_eq!(
                nix::libc::syscall(nix::libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            for d in &mut data[..1] {
                // CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2)
                d.effective &= !((1 << 1) | (1 << 2));
            }
            assert_eq!(
                nix::libc::syscall(nix::libc::SYS_capset, &header, data.as_ptr()),
                0
            );
        }
    }

    /// A directory removed, and another made unreadable, after the walk started but before it got
    /// there: counted as vanished, and as a walk error; the rest of the tree still comes out.
    #[test]
    fn directories_removed_or_made_unreadable_mid_walk_are_counted() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["a", "m", "y", "z"] {
            fs::create_dir(r.join(d)).unwrap();
            for i in 0..5 {
                fs::write(r.join(d).join(format!("f{i}")), b"data").unwrap();
            }
        }
        // Its own thread: the dropped capabilities stay with it and the walk threads it starts.
        let root = r.to_path_buf();
        let got = std::thread::spawn(move || {
            without_dac_capabilities();
            let stats = Arc::new(Stats::default());
            let opts = options(&root, &[], SymlinkPolicy::Skip, 4);
            // A read-ahead of one entry: a directory is read only when the walk gets to it.
            let mut walk = walk::Walk::with_ahead(&opts, stats.clone(), 1);
            let mut keys = Vec::new();
            for _ in 0..5 {
                keys.push(walk.next().unwrap().key);
            }
            assert!(keys.iter().all(|k| k.starts_with("a/")), "{keys:?}");
            fs::remove_dir_all(root.join("m")).unwrap();
            fs::set_permissions(
                root.join("y"),
                std::os::unix::fs::PermissionsExt::from_mode(0o000),
            )
            .unwrap();
            keys.extend(walk.map(|e| e.key));
            fs::set_permissions(
                root.join("y"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
            (keys, figures(&stats))
        })
        .join()
        .unwrap();
        let (keys, f) = got;
        assert_eq!(keys.len(), 10, "{keys:?}");
        assert!(keys[5..].iter().all(|k| k.starts_with("z/")), "{keys:?}");
        assert_eq!(
            (f.vanished, f.transfer_errors, f.scanned),
            (1, 1, 10),
            "{f:?}"
        );
    }

    /// `dirs` directories of `files` one-byte files each, named so that they sort as numbered:
    /// `d00/f000` … for 30 × 100.
    fn dirs_of_files(dirs: usize, files: usize) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let (dw, fw) = (dirs.to_string().len(), files.to_string().len());
        for d in 0..dirs {
            let dir = t.path().join(format!("d{d:0dw$}"));
            fs::create_dir(&dir).unwrap();
            for i in 0..files {
                fs::write(dir.join(format!("f{i:0fw$}")), b"z").unwrap();
            }
        }
        t
    }

    /// The read-ahead is bounded in entries: with a consumer that does not take anything, the
    /// pool reads no further directory once the bound is reached.
    #[test]
    fn read_ahead_stops_at_its_bound_in_entries() {
        let t = dirs_of_files(30, 100);
        let opts = options(t.path(), &[], SymlinkPolicy::Skip, 8);
        let stats = Arc::new(Stats::default());
        let mut walk = walk::Walk::with_ahead(&opts, stats, 250);
        let first = walk.next().unwrap();
        assert_eq!(first.key, "d00/f000");
        // The pool reads ahead until 250 entries wait...
        let deadline = Instant::now() + Duration::from_secs(30);
        while walk.entries_read() < 250 {
            assert!(
                Instant::now() < deadline,
                "the pool did not read ahead to its bound: {} entries",
                walk.entries_read()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // ...and then stops. That nothing more comes can only be watched for a while: the count
        // must hold still for half a second (a pool without the bound reads the rest of the
        // tree, 3,030 entries in all, long before).
        let (mut ahead, mut since) = (walk.entries_read(), Instant::now());
        while since.elapsed() < Duration::from_millis(500) {
            assert!(
                Instant::now() < deadline,
                "the read-ahead did not settle: {ahead} entries"
            );
            std::thread::sleep(Duration::from_millis(20));
            let now = walk.entries_read();
            if now != ahead {
                (ahead, since) = (now, Instant::now());
            }
        }
        // Reads stop being admitted at 250 entries; the reads in flight then (at most one per
        // thread, reckoned at the average size seen so far) still land: 250 + 8 × 100.
        assert!(ahead <= 250 + 8 * 100, "{ahead} entries read ahead");
        assert!(ahead < 3030, "the whole tree was read ahead");
        let rest: Vec<_> = walk.collect();
        assert_eq!(rest.len(), 2999);
    }

    /// Memory does not grow with the tree: a directory's listing is let go once the walk has
    /// passed it, so what is held stays near the read-ahead bound plus the directories on the
    /// consumer's path, however many directories the tree has.
    #[test]
    fn listings_passed_are_let_go() {
        let t = dirs_of_files(300, 20);
        let opts = options(t.path(), &[], SymlinkPolicy::Skip, 4);
        let stats = Arc::new(Stats::default());
        let mut walk = walk::Walk::with_ahead(&opts, stats, 200);
        let (mut files, mut most) = (0, 0);
        while walk.next().is_some() {
            files += 1;
            most = most.max(walk.entries_held());
        }
        assert_eq!(files, 6000);
        // The read-ahead (200), the reads in flight when it filled (4 × 20), the root's 300
        // entries and the directory being passed (20). Keeping what was passed: 6,300.
        assert!(most <= 200 + 4 * 20 + 300 + 20, "{most} entries held");
    }
}
