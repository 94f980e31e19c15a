//! Today's serial walk before the parallel one, on `walkdir`: the reference the parallel walk's
//! property tests compare against (same files, same order, same figures).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use walkdir::{DirEntry, WalkDir};

use super::{LocalEntry, ScanOptions};
use crate::config::SymlinkPolicy;
use crate::keys;
use crate::report::{FileErrorKind, Stats};

/// The serial walk.
pub fn scan(opts: ScanOptions, stats: Arc<Stats>) -> impl Iterator<Item = LocalEntry> {
    let root = opts.root.clone();
    let excludes = opts.excludes.clone();
    let prune_stats = stats.clone();
    let walker = WalkDir::new(&opts.root)
        .follow_links(opts.symlinks == SymlinkPolicy::Follow)
        .same_file_system(opts.one_file_system)
        .sort_by(|a, b| {
            let a_dir = a.file_type().is_dir();
            let b_dir = b.file_type().is_dir();
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
    let limits = (opts.max_key_bytes, opts.max_file_size);
    walker.filter_map(move |item| match item {
        Ok(e) => entry(&root, e, limits, opts.symlinks, &stats),
        Err(err) => {
            let path = err
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.clone());
            if err.loop_ancestor().is_some() {
                stats.file_error(&path, FileErrorKind::Walk, &"symlink loop: not followed");
            } else if err.io_error().map(std::io::Error::kind) == Some(std::io::ErrorKind::NotFound)
            {
                stats.vanished(&path);
            } else {
                stats.file_error(&path, FileErrorKind::Walk, &err);
            }
            None
        }
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
        path: e.into_path(),
        size: meta.len(),
        mtime_ns: crate::fsutil::ns(meta.mtime(), meta.mtime_nsec()),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    })
}
