//! Walks the source tree and yields its regular files in S3 key order, one at a time, so the planner
//! can merge them with the bucket listing and the manifest without holding the tree in memory.
//!
//! Excluded directories are pruned (never opened, so an unreadable excluded directory costs no
//! error); other filesystems are not entered with one-file-system; symlinks are skipped unless
//! configured to be followed; sockets, fifos and devices are skipped and counted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use walkdir::{DirEntry, WalkDir};

use crate::config::{Config, Excludes, SymlinkPolicy};
use crate::keys;
use crate::report::{FileErrorKind, Stats};

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
}

#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub root: PathBuf,
    pub excludes: Excludes,
    pub one_file_system: bool,
    pub symlinks: SymlinkPolicy,
    /// Bytes available for the key after the destination prefix.
    pub max_key_bytes: usize,
}

impl ScanOptions {
    /// The walk `config` describes: its source, excludes and policies, and the key length left
    /// after its prefix.
    pub fn for_config(config: &Config) -> Result<ScanOptions, String> {
        Ok(ScanOptions {
            root: config.source.path.0.clone(),
            excludes: config.excludes()?,
            one_file_system: config.source.one_file_system,
            symlinks: config.source.symlinks,
            max_key_bytes: keys::MAX_KEY_BYTES - config.destination.prefix.as_str().len(),
        })
    }
}

/// The walk as an iterator of files in key order. Problems are reported to `stats` as they happen.
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
    let max_key = opts.max_key_bytes;
    walker.filter_map(move |item| match item {
        Ok(e) => entry(&root, e, max_key, opts.symlinks, &stats),
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
    max_key: usize,
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
    Some(LocalEntry {
        key,
        raw_path: escaped.then(|| keys::encode_raw_path(rel)),
        path: e.into_path(),
        size: meta.len(),
        mtime_ns: crate::fsutil::ns(meta.mtime(), meta.mtime_nsec()),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    })
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
            excludes: Excludes::new(&[("skip/**".into(), "test".into())]).unwrap(),
            one_file_system: true,
            symlinks: SymlinkPolicy::Skip,
            max_key_bytes: 1024,
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
