//! Which objects a restore brings back and where each one goes — pure functions, so every rule is
//! tested directly: `--as-of` as a time and the version it picks per key, and the local path a key
//! restores to (never outside the target directory). `--path` as a key prefix is `keys::subpath_key`.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};

use crate::keys;
use crate::store::ObjectVersion;

/// A key that cannot be a path below the restore target: counted as a bad name, not restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {0:?} cannot be a path below the target (empty, `.` or `..` component, or a NUL byte): \
     not restored"
)]
pub struct BadKey(pub String);

/// The forms `--as-of` takes, for its errors.
const AS_OF_FORMS: &str = "use an RFC 3339 time with a zone (2026-11-20T23:00:00Z, \
                           2026-11-20T23:00:00+01:00), @UNIX-SECONDS, or a duration and `ago` \
                           (36h ago)";

/// A `--as-of` that is not a time: a usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsOfError {
    #[error("--as-of {0:?}: {1}; {forms}", forms = AS_OF_FORMS)]
    Unreadable(String, String),
    #[error("--as-of {0:?} is too far back")]
    TooFarBack(String),
    #[error("--as-of {0:?} is out of range")]
    OutOfRange(String),
    #[error("--as-of {0:?} is not a time: {forms}", forms = AS_OF_FORMS)]
    NotATime(String),
}

/// The path below the target directory that `key` restores to: the exact bytes of the original
/// name when the object carries `nightcopy-raw-path` (and it matches the key), the key otherwise.
/// Refuses anything that could land outside the target (`..`, absolute, empty components) — keys
/// in a bucket are not trusted input.
pub fn target_rel(key: &str, raw_path: Option<&str>) -> Result<PathBuf, BadKey> {
    let from_key = || checked(key.as_bytes(), key);
    let Some(raw) = raw_path else {
        return from_key();
    };
    let bytes = keys::decode_raw_path(raw);
    let path = checked(&bytes, key)?;
    // An object copied to another key keeps its metadata; then the raw path names another file
    // and the key is what the operator sees in the bucket.
    if keys::relative_key(&path).0 == key {
        Ok(path)
    } else {
        tracing::warn!(
            key,
            "{key}: its nightcopy-raw-path metadata names another path; restored under the key's name"
        );
        from_key()
    }
}

/// `bytes` as a path of plain components below the target, or `BadKey` naming `key`.
pub fn checked(bytes: &[u8], key: &str) -> Result<PathBuf, BadKey> {
    let mut out = PathBuf::new();
    for part in bytes.split(|&b| b == b'/') {
        if part.is_empty() || part == b"." || part == b".." || part.contains(&0) {
            return Err(BadKey(key.to_owned()));
        }
        out.push(OsString::from_vec(part.to_vec()));
    }
    debug_assert!(out.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(out)
}

/// Parses `--as-of`: an RFC 3339 time with `Z` or an offset (`2026-11-20T23:00:00Z`,
/// `2026-11-20 23:00:00+01:00`), `@` and Unix seconds, or a duration and `ago` (`36h ago`).
/// Returns nanoseconds since the epoch.
pub fn parse_as_of(arg: &str, now: SystemTime) -> Result<i64, AsOfError> {
    let arg = arg.trim();
    let unreadable = |e: &dyn std::fmt::Display| AsOfError::Unreadable(arg.into(), e.to_string());
    if let Some(ago) = arg.strip_suffix("ago") {
        let d = humantime::parse_duration(ago.trim()).map_err(|e| unreadable(&e))?;
        let t = now
            .checked_sub(d)
            .ok_or_else(|| AsOfError::TooFarBack(arg.into()))?;
        return Ok(ns_of(t));
    }
    if let Some(secs) = arg.strip_prefix('@') {
        let secs: i64 = secs.parse().map_err(|e| unreadable(&e))?;
        return secs
            .checked_mul(1_000_000_000)
            .ok_or_else(|| AsOfError::OutOfRange(arg.into()));
    }
    // RFC 3339 allows a space for the `T`; the SDK's parser does not.
    let mut text = arg.to_owned();
    if text.get(10..11) == Some(" ") {
        text.replace_range(10..11, "T");
    }
    let t = DateTime::from_str(&text, DateTimeFormat::DateTimeWithOffset)
        .map_err(|_| AsOfError::NotATime(arg.into()))?;
    Ok(t.as_nanos().clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

/// Shows a time in nanoseconds as RFC 3339 UTC, for messages.
pub fn show_time(ns: i64) -> String {
    let t = if ns >= 0 {
        UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - std::time::Duration::from_nanos(ns.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What `--as-of` makes of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// This version was the current one at that time.
    Version(ObjectVersion),
    /// The key did not exist then: it was created later, or a delete marker was current.
    Absent(String),
}

/// Picks, per key, the version that was current at `as_of`, from a listing in key order with
/// each key's entries newest first (ListObjectVersions' order). It holds one key at a time, so a
/// key whose versions run over several pages is handled like any other.
#[derive(Debug)]
pub struct AsOfPicker {
    as_of_ns: i64,
    current: Option<String>,
    decided: bool,
}

impl AsOfPicker {
    pub fn new(as_of_ns: i64) -> AsOfPicker {
        AsOfPicker {
            as_of_ns,
            current: None,
            decided: false,
        }
    }

    /// Feeds one listing entry; returns what is now known (at most two picks: the end of the
    /// previous key, and this one).
    pub fn offer(&mut self, v: ObjectVersion) -> Vec<Pick> {
        let mut out = Vec::new();
        if self.current.as_deref() != Some(v.key.as_str()) {
            out.extend(self.finish());
            self.current = Some(v.key.clone());
            self.decided = false;
        }
        if self.decided || v.last_modified_ns > self.as_of_ns {
            return out;
        }
        self.decided = true;
        out.push(if v.delete_marker {
            Pick::Absent(v.key)
        } else {
            Pick::Version(v)
        });
        out
    }

    /// Ends the listing: a last key with only newer versions did not exist then.
    pub fn finish(&mut self) -> Option<Pick> {
        let key = self.current.take()?;
        (!std::mem::replace(&mut self.decided, false)).then_some(Pick::Absent(key))
    }
}

/// The file name a temp file gets in its target directory: short (a long original name plus a
/// suffix could exceed NAME_MAX), hidden, and recognisable for cleaning up after a crash.
pub fn temp_name(n: u64) -> OsString {
    OsString::from(format!(
        ".nightcopy-restore-{}-{n}.part",
        std::process::id()
    ))
}

/// Whether a directory entry is a leftover temp file of an interrupted restore.
pub fn is_temp_name(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b".nightcopy-restore-") && b.ends_with(b".part")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn target_paths_never_leave_the_target() {
        assert_eq!(
            target_rel("a/b c/d", None).unwrap(),
            PathBuf::from("a/b c/d")
        );
        for bad in ["../x", "a/../../x", "/abs", "a//b", "a/./b", "a/", ".."] {
            assert!(target_rel(bad, None).is_err(), "{bad}");
        }
        // raw path metadata: decoded to the exact bytes
        let raw = keys::encode_raw_path(&PathBuf::from(OsString::from_vec(
            b"d/caf\xe9 \x01.txt".to_vec(),
        )));
        let got = target_rel("d/caf%E9 %01.txt", Some(&raw)).unwrap();
        assert_eq!(got.as_os_str().as_bytes(), b"d/caf\xe9 \x01.txt");
        // raw path metadata that escapes the target, or that belongs to another key
        assert!(target_rel("x", Some("..%2Fx")).is_err());
        assert!(target_rel("..", Some("ok")).is_err());
        assert_eq!(
            target_rel("moved/caf%E9", Some("caf%E9")).unwrap(),
            PathBuf::from("moved/caf%E9")
        );
    }

    #[test]
    fn as_of_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = |secs: i64| secs * 1_000_000_000;
        let cases: &[(&str, i64)] = &[
            ("2026-11-20T23:00:00Z", s(1_795_215_600)),
            ("2026-11-20 23:00:00Z", s(1_795_215_600)),
            ("2026-11-21T00:00:00+01:00", s(1_795_215_600)),
            ("2026-11-20T23:00:00.5Z", s(1_795_215_600) + 500_000_000),
            ("@1795215600", s(1_795_215_600)),
            ("36h ago", s(1_800_000_000 - 36 * 3600)),
            ("1day 2h ago", s(1_800_000_000 - 26 * 3600)),
        ];
        for (arg, want) in cases {
            assert_eq!(parse_as_of(arg, now), Ok(*want), "{arg}");
        }
        for bad in [
            "2026-11-20T23:00:00",
            "yesterday",
            "2026-11-20",
            "@x",
            "ago",
        ] {
            let e = parse_as_of(bad, now).unwrap_err().to_string();
            assert!(e.contains("--as-of") && e.contains("@UNIX-SECONDS"), "{e}");
        }
        assert_eq!(show_time(s(1_795_215_600)), "2026-11-20T23:00:00Z");
    }

    fn v(key: &str, t: i64, delete_marker: bool) -> ObjectVersion {
        ObjectVersion {
            key: key.into(),
            version_id: format!("{key}@{t}"),
            size: 1,
            last_modified_ns: t,
            delete_marker,
        }
    }

    fn pick_all(as_of: i64, listing: Vec<ObjectVersion>) -> Vec<String> {
        let mut p = AsOfPicker::new(as_of);
        let mut out: Vec<Pick> = listing.into_iter().flat_map(|x| p.offer(x)).collect();
        out.extend(p.finish());
        out.into_iter()
            .map(|p| match p {
                Pick::Version(v) => v.version_id,
                Pick::Absent(k) => format!("absent {k}"),
            })
            .collect()
    }

    #[test]
    fn as_of_picks_the_version_current_then() {
        let listing = vec![
            v("a", 30, false),
            v("a", 20, false),
            v("a", 10, false),
            v("b", 30, true), // deleted after the time: the older version counts
            v("b", 5, false),
            v("c", 15, true), // deleted before the time
            v("c", 5, false),
            v("d", 40, false), // created after
            v("e", 20, false), // exactly at the time
        ];
        assert_eq!(
            pick_all(20, listing),
            ["a@20", "b@5", "absent c", "absent d", "e@20"]
        );
        assert_eq!(pick_all(0, vec![v("a", 1, false)]), ["absent a"]);
        assert!(pick_all(0, vec![]).is_empty());
    }

    #[test]
    fn temp_names_are_recognised() {
        assert!(is_temp_name(&temp_name(7)));
        assert!(!is_temp_name(std::ffi::OsStr::new("notes.part")));
    }
}
