//! Today's serial walk before the parallel one, on `walkdir`: the reference the parallel walk's
//! property tests compare against (same files, same order, same figures) — and in tree mode the
//! same items, by path: `lstat` for a directory, symlink or special (or `stat` where a symlink is
//! followed), `readlink` for a symlink's target.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use walkdir::{DirEntry, WalkDir};

use super::{HardLinks, Item, LocalEntry, ScanOptions, TreeEntry};
use crate::config::SymlinkPolicy;
use crate::keys;
use crate::report::{FileErrorKind, Stats};

/// The serial walk.
pub fn scan(opts: ScanOptions, stats: Arc<Stats>) -> impl Iterator<Item = LocalEntry> {
    walk(opts, stats, None).map(|item| match item {
        Item::File(e) => e,
        _ => unreachable!("only files outside tree mode"),
    })
}

/// The serial walk in tree mode, keeping at most `links` first names of multiply-linked files.
pub fn scan_tree(opts: ScanOptions, stats: Arc<Stats>, links: usize) -> impl Iterator<Item = Item> {
    let links = HardLinks::new(&opts.root, links);
    walk(opts, stats, Some(links))
}

fn walk(
    opts: ScanOptions,
    stats: Arc<Stats>,
    mut links: Option<HardLinks>,
) -> impl Iterator<Item = Item> {
    let root = opts.root.clone();
    let excludes = opts.excludes.clone();
    let prune_stats = stats.clone();
    let follow = opts.symlinks == SymlinkPolicy::Follow;
    // walkdir sorts a directory's entries before it follows their links: a link it will follow
    // to a directory must sort as one (`name/`) all the same, or keys come out of order ("a/x"
    // before "a-b" for a link "a").
    let is_dir = move |e: &DirEntry| {
        e.file_type().is_dir()
            || follow
                && e.file_type().is_symlink()
                && std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir())
    };
    let walker = WalkDir::new(&opts.root)
        .follow_links(follow)
        .same_file_system(opts.one_file_system)
        .sort_by(move |a, b| {
            let a_dir = is_dir(a);
            let b_dir = is_dir(b);
            keys::sibling_order(
                &keys::component(a.file_name()),
                a_dir,
                &keys::component(b.file_name()),
                b_dir,
            )
        })
        .into_iter()
        .filter_entry(move |e| {
            if e.depth() == 0 {
                return true;
            }
            let rel = e.path().strip_prefix(&root).unwrap_or(e.path());
            if excludes.is_excluded(rel, e.file_type().is_dir()) {
                prune_stats.excluded(e.path());
                return false;
            }
            true
        });
    let root = opts.root;
    let loop_excludes = opts.excludes;
    let limits = (opts.max_key_bytes, opts.max_file_size);
    let mut walker = walker.peekable();
    std::iter::from_fn(move || loop {
        let item = walker.next()?;
        let tree = links.is_some();
        let item = match item {
            // The parallel walk keeps a directory it opened and read: walkdir yields one it could
            // not read, and the error after it.
            Ok(e) if tree && e.depth() > 0 && e.file_type().is_dir() => {
                let unread =
                    matches!(walker.peek(), Some(Err(err)) if err.path() == Some(e.path()));
                if unread {
                    continue;
                }
                tree_entry(&root, &e, &stats).map(Item::Dir)
            }
            Ok(e)
                if tree && (e.file_type().is_symlink() && opts.symlinks == SymlinkPolicy::Skip) =>
            {
                tree_entry(&root, &e, &stats).map(Item::Symlink)
            }
            Ok(e)
                if tree
                    && !e.file_type().is_symlink()
                    && !e.file_type().is_file()
                    && !e.file_type().is_dir() =>
            {
                tree_entry(&root, &e, &stats).map(Item::Special)
            }
            Ok(e) => entry(&root, e, limits, opts.symlinks, &stats).map(|e| match &mut links {
                Some(links) => links.item(e),
                None => Item::File(e),
            }),
            Err(err) => {
                let path = err
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.clone());
                let rel = path.strip_prefix(&root).unwrap_or(&path);
                if err.loop_ancestor().is_some() && loop_excludes.is_excluded(rel, true) {
                    // walkdir finds the loop before `filter_entry` sees the name; the parallel
                    // walk, like any excluded directory, never looks.
                    stats.excluded(&path);
                } else if err.loop_ancestor().is_some() {
                    stats.file_error(&path, FileErrorKind::Walk, &"symlink loop: not followed");
                } else if err.io_error().map(std::io::Error::kind)
                    == Some(std::io::ErrorKind::NotFound)
                {
                    stats.vanished(&path);
                } else {
                    stats.file_error(&path, FileErrorKind::Walk, &err);
                }
                None
            }
        };
        if item.is_some() {
            return item;
        }
    })
}

/// A directory's, symlink's or special's item, from its metadata (and a symlink's `readlink`).
fn tree_entry(root: &Path, e: &DirEntry, stats: &Stats) -> Option<TreeEntry> {
    let unreadable = |err: &dyn std::fmt::Display| {
        stats.file_error(e.path(), FileErrorKind::Unreadable, err);
        None
    };
    let meta = match e.metadata() {
        Ok(m) => m,
        Err(err)
            if err.io_error().map(std::io::Error::kind) == Some(std::io::ErrorKind::NotFound) =>
        {
            stats.vanished(e.path());
            return None;
        }
        Err(err) => return unreadable(&err),
    };
    let target = if e.file_type().is_symlink() {
        match std::fs::read_link(e.path()) {
            Ok(t) => Some(t.into_os_string()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                stats.vanished(e.path());
                return None;
            }
            Err(err) => return unreadable(&err),
        }
    } else {
        None
    };
    let rel = e.path().strip_prefix(root).unwrap_or(e.path());
    let (mut key, _) = keys::relative_key(rel);
    if e.file_type().is_dir() {
        key.push('/');
    }
    Some(TreeEntry {
        key,
        rel: rel.to_owned(),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: crate::fsutil::ns(meta.mtime(), meta.mtime_nsec()),
        size: meta.len(),
        rdev: meta.rdev(),
        target,
        xattrs: None,
    })
}

fn entry(
    root: &Path,
    e: DirEntry,
    (max_key, max_file_size): (usize, u64),
    symlinks: SymlinkPolicy,
    stats: &Stats,
) -> Option<LocalEntry> {
    let ft = e.file_type();
    if ft.is_dir() {
        return None;
    }
    if ft.is_symlink() {
        // With follow, walkdir reports the target's type; a symlink here is skip mode or dangling.
        if symlinks == SymlinkPolicy::Skip {
            stats.skipped_symlink(e.path());
        } else {
            stats.vanished(e.path());
        }
        return None;
    }
    if !ft.is_file() {
        stats.skipped_special(e.path());
        return None;
    }
    stats.scanned();
    let meta = match e.metadata() {
        Ok(m) => m,
        Err(err)
            if err.io_error().map(std::io::Error::kind) == Some(std::io::ErrorKind::NotFound) =>
        {
            stats.vanished(e.path());
            return None;
        }
        Err(err) => {
            stats.file_error(e.path(), FileErrorKind::Unreadable, &err);
            return None;
        }
    };
    let rel = e.path().strip_prefix(root).unwrap_or(e.path());
    let (key, escaped) = keys::relative_key(rel);
    if key.len() > max_key {
        stats.file_error(
            e.path(),
            FileErrorKind::BadName,
            &format_args!(
                "its key would be {} bytes with the prefix, over S3's limit of {}",
                key.len() + (keys::MAX_KEY_BYTES - max_key),
                keys::MAX_KEY_BYTES
            ),
        );
        return None;
    }
    if meta.len() > max_file_size {
        stats.file_error(
            e.path(),
            FileErrorKind::TooLarge,
            &format_args!(
                "{} bytes, over source.max-file-size ({}): not read",
                meta.len(),
                crate::config::Size(max_file_size)
            ),
        );
        return None;
    }
    let followed = e.path_is_symlink();
    Some(LocalEntry {
        key,
        raw_path: escaped.then(|| keys::encode_raw_path(rel)),
        followed,
        dev: meta.dev(),
        ino: meta.ino(),
        nlink: meta.nlink(),
        blocks: meta.blocks(),
        xattrs: None,
        path: e.into_path(),
        size: meta.len(),
        mtime_ns: crate::fsutil::ns(meta.mtime(), meta.mtime_nsec()),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    })
}
