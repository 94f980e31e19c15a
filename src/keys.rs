//! How a path under the source becomes an S3 key, and back.
//!
//! A name that is valid UTF-8 without control characters is used as it is, so keys look like the
//! tree. Any other name is *escaped*: every byte that is not part of a valid, printable UTF-8
//! sequence becomes `%XX`, and `%` itself becomes `%25` — in that name only. The object then carries
//! the whole original path in metadata (`nightcopy-raw-path`, fully percent-encoded), which is what
//! restore uses to put the exact bytes back. Control characters are escaped too because S3's XML
//! listing cannot carry most of them.
//!
//! An escaped name could equal a real name in the same directory ("caf%E9" the file vs "caf\xe9"
//! escaped): the scan yields both with the same key and the planner reports the second as an error,
//! so nothing is overwritten silently.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use percent_encoding::{percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The top-level name under the prefix that holds nightcopy's own objects: never a file's key
/// (the walk leaves a source's top-level `.nightcopy` out), and left out of every listing of files.
pub const RESERVED_DIR: &str = ".nightcopy";
/// Where each run's manifest is kept in the bucket, below the prefix (docs/design.md, "The
/// manifest's copy").
pub const MANIFEST_KEY: &str = ".nightcopy/manifest.gz";

/// Whether a key below the prefix is one of nightcopy's own objects rather than a file's.
pub fn is_reserved(relative_key: &str) -> bool {
    relative_key
        .strip_prefix(RESERVED_DIR)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// S3's limit on a key, prefix included.
pub const MAX_KEY_BYTES: usize = 1024;

/// The key form of one path component.
pub fn component(name: &OsStr) -> Cow<'_, str> {
    let bytes = name.as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => Cow::Borrowed(s),
        _ => Cow::Owned(escape(bytes)),
    }
}

fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' || c.is_control() {
                let mut buf = [0; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The relative key of a path below the source root, and whether any component was escaped.
pub fn relative_key(rel: &Path) -> (String, bool) {
    let mut key = String::with_capacity(rel.as_os_str().len());
    let mut escaped = false;
    for (i, c) in rel.iter().enumerate() {
        if i > 0 {
            key.push('/');
        }
        let part = component(c);
        escaped |= matches!(part, Cow::Owned(_));
        key.push_str(&part);
    }
    (key, escaped)
}

/// A `--path` that names nothing below the source: a usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubpathError {
    #[error(
        "--path {arg}: an absolute path must be below source.path ({root}); or give it relative \
         to source.path"
    )]
    OutsideSource { arg: String, root: String },
    #[error("--path {0}: `..` is not allowed; give the path below source.path")]
    Parent(String),
}

/// The `--path` argument as the key of a file or directory below the source root ("" = all).
/// It may be relative to the source root or absolute below it; names are escaped like the
/// backup escapes them, so a non-UTF-8 name given as raw bytes finds its object.
pub fn subpath_key(arg: &Path, source_root: &Path) -> Result<String, SubpathError> {
    let rel = if arg.is_absolute() {
        arg.strip_prefix(source_root)
            .map_err(|_| SubpathError::OutsideSource {
                arg: arg.display().to_string(),
                root: source_root.display().to_string(),
            })?
    } else {
        arg
    };
    let mut clean = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            _ => return Err(SubpathError::Parent(arg.display().to_string())),
        }
    }
    Ok(relative_key(&clean).0)
}

/// Whether `key` is the file `sub` or lies below the directory `sub`.
pub fn in_subpath(key: &str, sub: &str) -> bool {
    sub.is_empty()
        || key
            .strip_prefix(sub)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Everything but unreserved characters and '/': the form of `nightcopy-raw-path`, which must be
/// plain ASCII to travel as an HTTP header.
const RAW_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub fn encode_raw_path(rel: &Path) -> String {
    percent_encode(rel.as_os_str().as_bytes(), RAW_PATH).to_string()
}

pub fn decode_raw_path(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(s).collect()
}

/// A name, path or key as it may appear in a line a person reads (the journal's MESSAGE, a
/// terminal, stdout): every byte that could end the line, move the cursor, change the terminal or
/// reorder the text is shown as an escape instead — control characters as `\n`, `\t`, `\x1b`…,
/// bytes that are not UTF-8 as `\xNN`, bidirectional overrides as `\u{202e}`, and `\` itself as
/// `\\`, so the escaped form is unambiguous. Names and keys are input from whoever made them: a
/// file called "x\nINFO backup succeeded" must not print a second, forged line.
pub struct Shown<'a>(&'a [u8]);

/// [`Shown`] for anything that is bytes of a name: a `Path`, an `OsStr`, a `str` (a key).
pub fn shown<S: AsRef<OsStr> + ?Sized>(name: &S) -> Shown<'_> {
    Shown(name.as_ref().as_bytes())
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    c if (c as u32) < 0x80 && c.is_control() => write!(f, "\\x{:02x}", c as u32)?,
                    c if c.is_control() || is_bidi_control(c) => {
                        write!(f, "\\u{{{:x}}}", c as u32)?
                    }
                    c => f.write_char(c)?,
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Characters that change the direction of the text around them: they can make a name read as
/// another one on a terminal.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Siblings are walked in this order so that the whole walk comes out in S3 key order (byte order of
/// full keys). A directory sorts as its name plus '/', because every key below it has that prefix:
/// "a-b" (0x2D) comes before the directory "a" whose keys start "a/" (0x2F), although a plain
/// name sort puts "a" first.
pub fn sibling_order(a: &str, a_dir: bool, b: &str, b_dir: bool) -> std::cmp::Ordering {
    let sa: &[u8] = if a_dir { b"/" } else { b"" };
    let sb: &[u8] = if b_dir { b"/" } else { b"" };
    a.as_bytes()
        .iter()
        .chain(sa)
        .cmp(b.as_bytes().iter().chain(sb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn plain_names_are_kept() {
        for n in [
            "a.txt",
            "with space",
            "plus+sign",
            "100%",
            "ünïcödé",
            "日本語",
            "emoji 🎉",
        ] {
            assert_eq!(component(OsStr::new(n)), n);
        }
    }

    #[test]
    fn awkward_names_are_escaped_reversibly() {
        let cases: &[(&[u8], &str)] = &[
            (b"caf\xe9", "caf%E9"),
            (b"a\nb", "a%0Ab"),
            (b"tab\there", "tab%09here"),
            (b"50%\xff", "50%25%FF"),
            (b"\x7f", "%7F"),
        ];
        for (raw, want) in cases {
            let os = OsString::from_vec(raw.to_vec());
            assert_eq!(component(&os), *want);
            // reversible: the escaped form decodes back to the bytes
            let back: Vec<u8> = percent_encoding::percent_decode_str(want).collect();
            assert_eq!(&back, raw);
        }
    }

    #[test]
    fn raw_path_round_trips_any_bytes() {
        let raw: Vec<u8> = (1u8..=255).filter(|&b| b != b'/').collect();
        let p = std::path::PathBuf::from(OsString::from_vec(raw.clone()));
        let enc = encode_raw_path(&p);
        assert!(enc.is_ascii());
        assert_eq!(decode_raw_path(&enc), raw);
    }

    #[test]
    fn relative_keys() {
        assert_eq!(
            relative_key(Path::new("a/b c/d")),
            ("a/b c/d".into(), false)
        );
        let p = std::path::PathBuf::from(OsString::from_vec(b"d/x\xffy".to_vec()));
        assert_eq!(relative_key(&p), ("d/x%FFy".into(), true));
    }

    #[test]
    fn subpaths() {
        let root = Path::new("/mnt/fs");
        let ok: &[(&str, &str)] = &[
            ("home/alice", "home/alice"),
            ("home/alice/", "home/alice"),
            ("./home//alice", "home/alice"),
            ("/mnt/fs/home/alice", "home/alice"),
            ("/mnt/fs", ""),
            (".", ""),
            ("a b/100%", "a b/100%"),
        ];
        for (arg, want) in ok {
            assert_eq!(
                subpath_key(Path::new(arg), root).as_deref(),
                Ok(*want),
                "{arg}"
            );
        }
        let raw = PathBuf::from(OsString::from_vec(b"d/caf\xe9".to_vec()));
        assert_eq!(subpath_key(&raw, root).unwrap(), "d/caf%E9");
        for bad in ["../etc", "home/../..", "/etc/passwd", "/mnt/fsx/a"] {
            assert!(subpath_key(Path::new(bad), root).is_err(), "{bad}");
        }
    }

    #[test]
    fn subpath_matching_respects_name_boundaries() {
        assert!(in_subpath("home/alice/a.txt", "home/alice"));
        assert!(in_subpath("home/alice", "home/alice"));
        assert!(!in_subpath("home/alice2/a.txt", "home/alice"));
        assert!(!in_subpath("home/alicea", "home/alice"));
        assert!(in_subpath("anything", ""));
    }

    proptest::proptest! {
        // Any byte string (a name holds anything but '/' and NUL) escapes to a key component
        // without control characters or '/', and decodes back exactly when it was escaped.
        #[test]
        fn escaping_is_reversible_for_any_name(raw in proptest::collection::vec(1u8..=255, 1..64)) {
            let raw: Vec<u8> = raw.into_iter().filter(|&b| b != b'/').collect();
            proptest::prop_assume!(!raw.is_empty());
            let os = OsString::from_vec(raw.clone());
            let key = component(&os);
            proptest::prop_assert!(!key.chars().any(char::is_control), "{key:?}");
            proptest::prop_assert!(!key.contains('/'));
            if let Cow::Owned(escaped) = &key {
                let back: Vec<u8> = percent_encoding::percent_decode_str(escaped).collect();
                proptest::prop_assert_eq!(back, raw.clone());
            } else {
                proptest::prop_assert_eq!(key.as_bytes(), &raw[..]);
            }
            let p = std::path::PathBuf::from(os);
            proptest::prop_assert_eq!(decode_raw_path(&encode_raw_path(&p)), raw);
        }
    }

    #[test]
    fn shown_names_cannot_break_or_restyle_a_line() {
        let cases: &[(&[u8], &str)] = &[
            (b"plain name.txt", "plain name.txt"),
            ("Élan vital".as_bytes(), "Élan vital"),
            (b"x\nINFO backup succeeded", "x\\nINFO backup succeeded"),
            (b"\x1b]0;owned\x07title", "\\x1b]0;owned\\x07title"),
            (b"cr\rtab\t", "cr\\rtab\\t"),
            (b"caf\xe9", "caf\\xe9"),
            (b"back\\slash", "back\\\\slash"),
            ("rtl\u{202e}txt.exe".as_bytes(), "rtl\\u{202e}txt.exe"),
            ("c1\u{9b}31m".as_bytes(), "c1\\u{9b}31m"),
            (b"del\x7f", "del\\x7f"),
        ];
        for (raw, want) in cases {
            let os = OsString::from_vec(raw.to_vec());
            assert_eq!(shown(&os).to_string(), *want, "{raw:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, the shown form is one line of printable text.
        #[test]
        fn shown_is_always_one_printable_line(raw in proptest::collection::vec(0u8..=255, 0..64)) {
            let os = OsString::from_vec(raw);
            let text = shown(&os).to_string();
            proptest::prop_assert!(!text.chars().any(|c| c.is_control() || is_bidi_control(c)), "{text:?}");
        }
    }

    #[test]
    fn directories_sort_as_name_slash() {
        use std::cmp::Ordering::*;
        assert_eq!(sibling_order("a-b", false, "a", true), Less);
        assert_eq!(sibling_order("a", false, "a-b", false), Less);
        assert_eq!(sibling_order("a.txt", false, "a", true), Less);
        assert_eq!(sibling_order("a0", false, "a", true), Greater);
    }
}
