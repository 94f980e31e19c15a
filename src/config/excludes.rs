//! The exclude list: the globs of `source.exclude` and `source.exclude-from`, compiled once into
//! sets the walk asks before it opens a directory, so an excluded directory is never read.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

/// The exclude list, compiled.
///
/// Syntax (documented in `config/exclude.example`): one glob per line, relative to the source root.
/// A pattern without '/' matches a name at any depth (`*.tmp`); a pattern with '/' matches the
/// whole relative path (`cache/**`, a leading '/' only anchors); `*` stays within one name and `**`
/// crosses directories; a trailing '/' matches directories only. A pattern ending in `/**` also
/// matches the directory itself, so the directory is pruned rather than walked and emptied.
///
/// Lists of hundreds of thousands of patterns exist (generated from a project list, say), and a
/// glob set compiles every pattern that is not a plain literal into one regular expression: 200,000
/// patterns like `proj123/*.log` took 19 s and 2.7 GB. So anchored patterns that start with plain
/// directory names are indexed by those names instead — `proj123/build/**` in a set of
/// directories excluded with everything below them, `proj123/*.log` as the glob `*.log` looked up
/// by its directory, each distinct glob compiled once — and only the rest goes to the glob sets.
/// The answers are the same (a property test compares them with the plain glob sets).
#[derive(Debug, Clone)]
pub struct Excludes {
    any: GlobSet,
    dirs_only: GlobSet,
    /// Directories excluded with everything below them (`a/b/**`), as path bytes.
    under: HashSet<Vec<u8>>,
    /// Per directory (path bytes), globs for the names in it (`a/b/*.log`): indices into
    /// `names`, and whether the pattern is for directories only.
    in_dir: HashMap<Vec<u8>, Vec<(usize, bool)>>,
    names: Vec<GlobMatcher>,
}

/// Characters that make a path component a glob rather than a plain name.
fn is_plain(component: &str) -> bool {
    !component.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

impl Excludes {
    /// `patterns` are (glob, where it came from) pairs; an error names the origin.
    pub fn new(patterns: &[(String, String)]) -> Result<Excludes, String> {
        let mut any = GlobSetBuilder::new();
        let mut dirs_only = GlobSetBuilder::new();
        let mut under = HashSet::new();
        let mut in_dir: HashMap<Vec<u8>, Vec<(usize, bool)>> = HashMap::new();
        let mut names = Vec::new();
        let mut name_index: HashMap<String, usize> = HashMap::new();
        for (pattern, origin) in patterns {
            let (full, dir_only, anchored) = normalize(pattern, origin)?;
            let glob = |g: &str| -> Result<Glob, String> {
                GlobBuilder::new(g)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| format!("{origin}: {pattern:?} is not a valid glob: {e}"))
            };
            // Validated whole even when indexed, so a bad pattern is an error either way.
            let whole = glob(&full)?;
            if anchored {
                let parts: Vec<&str> = full.split('/').collect();
                let plain = parts
                    .iter()
                    .take_while(|p| is_plain(p) && !p.is_empty())
                    .count();
                let (dirs, rest) = parts.split_at(plain);
                let prefix = dirs.join("/").into_bytes();
                match rest {
                    ["**"] if !dirs.is_empty() && !dir_only => {
                        under.insert(prefix);
                        continue;
                    }
                    [name] if !name.contains("**") && !name.is_empty() && !is_plain(name) => {
                        let index = match name_index.get(*name) {
                            Some(&i) => i,
                            None => {
                                names.push(glob(name)?.compile_matcher());
                                name_index.insert((*name).to_owned(), names.len() - 1);
                                names.len() - 1
                            }
                        };
                        in_dir.entry(prefix).or_default().push((index, dir_only));
                        continue;
                    }
                    _ => {}
                }
            }
            let target = if dir_only { &mut dirs_only } else { &mut any };
            target.add(whole);
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
            under,
            in_dir,
            names,
        })
    }

    pub fn is_excluded(&self, rel: &Path, is_dir: bool) -> bool {
        let bytes = rel.as_os_str().as_bytes();
        if !self.under.is_empty() {
            // Below an excluded directory, or the directory itself.
            if is_dir && self.under.contains(bytes) {
                return true;
            }
            let mut at = bytes.len();
            while let Some(slash) = bytes[..at].iter().rposition(|&b| b == b'/') {
                if self.under.contains(&bytes[..slash]) {
                    return true;
                }
                at = slash;
            }
        }
        if !self.in_dir.is_empty() {
            let (dir, name) = match bytes.iter().rposition(|&b| b == b'/') {
                Some(slash) => (&bytes[..slash], &bytes[slash + 1..]),
                None => (&[][..], bytes),
            };
            let name = Path::new(std::ffi::OsStr::from_bytes(name));
            let hit = self.in_dir.get(dir).is_some_and(|globs| {
                globs
                    .iter()
                    .any(|&(i, dir_only)| (is_dir || !dir_only) && self.names[i].is_match(name))
            });
            if hit {
                return true;
            }
        }
        self.any.is_match(rel) || (is_dir && self.dirs_only.is_match(rel))
    }
}

/// The pattern as a glob over the whole relative path, whether it is for directories only, and
/// whether it was anchored (had a '/').
fn normalize(pattern: &str, origin: &str) -> Result<(String, bool, bool), String> {
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
    Ok((full, dir_only, anchored))
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

    /// The plain glob sets, as every pattern was matched before the index: the reference.
    fn plain(patterns: &[&str]) -> impl Fn(&Path, bool) -> bool {
        let mut any = GlobSetBuilder::new();
        let mut dirs_only = GlobSetBuilder::new();
        for p in patterns {
            let (full, dir_only, _) = normalize(p, "test").unwrap();
            let g = |g: &str| {
                GlobBuilder::new(g)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .unwrap()
            };
            if dir_only {
                dirs_only.add(g(&full));
            } else {
                any.add(g(&full));
            }
            if let Some(dir) = full.strip_suffix("/**") {
                if !dir.is_empty() {
                    dirs_only.add(g(dir));
                }
            }
        }
        let (any, dirs_only) = (any.build().unwrap(), dirs_only.build().unwrap());
        move |rel, is_dir| any.is_match(rel) || (is_dir && dirs_only.is_match(rel))
    }

    proptest::proptest! {
        /// The index answers exactly as the plain glob sets do, for any mix of patterns.
        #[test]
        fn the_index_agrees_with_the_plain_glob_sets(
            patterns in proptest::collection::vec(
                "/?([ab]|\\*|\\*\\*|x\\*)(/([ab]|\\*|\\*\\*|\\*\\.t|c\\?)){0,3}/?", 1..6),
            path in "[ab.]{1,2}(/[abct.x]{1,3}){0,3}",
            is_dir in proptest::bool::ANY,
        ) {
            let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
            let Ok(set) = Excludes::new(&patterns.iter().map(|p| (p.clone(), "t".into())).collect::<Vec<_>>()) else {
                return Ok(());
            };
            let reference = plain(&refs);
            let rel = Path::new(&path);
            proptest::prop_assert_eq!(set.is_excluded(rel, is_dir), reference(rel, is_dir), "{:?} on {}", refs, path);
        }
    }

    #[test]
    fn indexed_patterns_match_as_globs_do() {
        let set = ex(&["proj1/build/**", "proj2/*.log", "/top/*.tmp", "deep/a/b/**"]);
        for (path, is_dir, want) in [
            ("proj1/build", true, true),
            ("proj1/build", false, false),
            ("proj1/build/x/y.o", false, true),
            ("proj1/buildx/y", false, false),
            ("proj2/a.log", false, true),
            ("proj2/sub/a.log", false, false),
            ("top/x.tmp", false, true),
            ("x/top/x.tmp", false, false),
            ("deep/a/b/c", true, true),
            ("deep/a", true, false),
        ] {
            assert_eq!(
                set.is_excluded(Path::new(path), is_dir),
                want,
                "{path} {is_dir}"
            );
        }
        assert!(
            set.any.is_empty() && set.names.len() == 2,
            "all four were indexed"
        );
    }

    #[test]
    fn invalid_glob_names_its_origin() {
        let err = Excludes::new(&[("a[".into(), "exclude.txt line 3".into())]).unwrap_err();
        assert!(err.contains("exclude.txt line 3"), "{err}");
    }
}
