//! Walks the source tree and yields its regular files in S3 key order, one at a time, so the planner
//! can merge them with the bucket listing and the manifest without holding the tree in memory.
//!
//! Excluded directories are pruned (never opened, so an unreadable excluded directory costs no
//! error); other filesystems are not entered with one-file-system; symlinks are skipped unless
//! configured to be followed; sockets, fifos and devices are skipped and counted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use walkdir::{DirEntry, WalkDir};

use crate::config::SymlinkPolicy;
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

/// The exclude list, compiled.
///
/// Syntax (documented in `config/exclude.example`): one glob per line, relative to the source root.
/// A pattern without '/' matches a name at any depth (`*.tmp`); a pattern with '/' matches the
/// whole relative path (`cache/**`, a leading '/' only anchors); `*` stays within one name and `**`
/// crosses directories; a trailing '/' matches directories only. A pattern ending in `/**` also
/// matches the directory itself, so the directory is pruned rather than walked and emptied.
#[derive(Debug, Clone)]
pub struct Excludes {
    any: GlobSet,
    dirs_only: GlobSet,
}

impl Excludes {
    /// `patterns` are (glob, where it came from) pairs; an error names the origin.
    pub fn new(patterns: &[(String, String)]) -> Result<Excludes, String> {
        let mut any = GlobSetBuilder::new();
        let mut dirs_only = GlobSetBuilder::new();
        for (pattern, origin) in patterns {
            let mut p = pattern.trim().to_owned();
            let dir_only = p.ends_with('/') && p.len() > 1;
            if dir_only {
                p.pop();
            }
            let anchored = p.contains('/');
            let p = p.trim_start_matches('/');
            if p.is_empty() {
                return Err(format!("{origin}: {pattern:?} is empty after its slashes"));
            }
            let full = if anchored {
                p.to_owned()
            } else {
                format!("**/{p}")
            };
            let glob = |g: &str| -> Result<Glob, String> {
                GlobBuilder::new(g)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| format!("{origin}: {pattern:?} is not a valid glob: {e}"))
            };
            let target = if dir_only { &mut dirs_only } else { &mut any };
            target.add(glob(&full)?);
            if let Some(dir) = full.strip_suffix("/**") {
                if !dir.is_empty() {
                    dirs_only.add(glob(dir)?);
                }
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| format!("exclude list: {e}"));
        Ok(Excludes {
            any: build(any)?,
            dirs_only: build(dirs_only)?,
        })
    }

    pub fn empty() -> Excludes {
        Excludes::new(&[]).expect("an empty set compiles")
    }

    pub fn is_excluded(&self, rel: &Path, is_dir: bool) -> bool {
        self.any.is_match(rel) || (is_dir && self.dirs_only.is_match(rel))
    }
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
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn ex(patterns: &[&str]) -> Excludes {
        let p: Vec<_> = patterns
            .iter()
            .map(|p| (p.to_string(), "test".to_string()))
            .collect();
        Excludes::new(&p).unwrap()
    }

    #[test]
    fn exclude_syntax() {
        let cases: &[(&[&str], &str, bool, bool)] = &[
            (&["*.tmp"], "a.tmp", false, true),
            (&["*.tmp"], "d/e/a.tmp", false, true),
            (&["*.tmp"], "a.tmpx", false, false),
            (&["cache/**"], "cache/x/y", false, true),
            (&["cache/**"], "cache", true, true),
            (&["cache/**"], "d/cache/x", false, false),
            (&["/top.txt"], "top.txt", false, true),
            (&["/top.txt"], "d/top.txt", false, false),
            (&["**/.snapshot/**"], "a/b/.snapshot", true, true),
            (&["**/.snapshot/**"], ".snapshot", true, true),
            (&["build/"], "build", true, true),
            (&["build/"], "build", false, false),
            (&["d/*.log"], "d/x.log", false, true),
            (&["d/*.log"], "d/e/x.log", false, false),
            (&["nothing"], "something", false, false),
        ];
        for (pats, path, is_dir, want) in cases {
            assert_eq!(
                ex(pats).is_excluded(Path::new(path), *is_dir),
                *want,
                "{pats:?} on {path} (dir: {is_dir})"
            );
        }
    }

    proptest::proptest! {
        // Any pattern text compiles or is refused with its origin named; never a panic. A
        // compiled set answers for any path.
        #[test]
        fn exclude_parser_never_panics(pattern in "\\PC{0,60}", path in "[a-z./ ]{0,30}") {
            match Excludes::new(&[(pattern, "fuzz line 1".into())]) {
                Ok(set) => {
                    let _ = set.is_excluded(Path::new(&path), true);
                    let _ = set.is_excluded(Path::new(&path), false);
                }
                Err(e) => proptest::prop_assert!(e.contains("fuzz line 1"), "{}", e),
            }
        }
    }

    #[test]
    fn invalid_glob_names_its_origin() {
        let err = Excludes::new(&[("a[".into(), "exclude.txt line 3".into())]).unwrap_err();
        assert!(err.contains("exclude.txt line 3"), "{err}");
    }

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
            excludes: ex(&["skip/**"]),
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
