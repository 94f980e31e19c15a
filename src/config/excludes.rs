//! The exclude list: the globs of `source.exclude` and `source.exclude-from`, compiled once into
//! sets the walk asks before it opens a directory, so an excluded directory is never read.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

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

    pub fn is_excluded(&self, rel: &Path, is_dir: bool) -> bool {
        self.any.is_match(rel) || (is_dir && self.dirs_only.is_match(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
