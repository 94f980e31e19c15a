//! `nightcopy diff [OLDER [NEWER]]`: what happened to the tree between two snapshots — which
//! paths were added, removed, changed in content or only in their metadata — read from the
//! bucket alone.
//!
//! Both snapshots are downloaded and checked whole (`snapshot::fetch`), then read side by side
//! as streams and merge-joined in the walk's order (`compare`), so memory does not grow with the
//! tree. Without ids the last two snapshots are compared; with one, that one and the latest.
//!
//! One line per path on stdout, in key order: `CLASS<TAB>[DETAIL<TAB>…]PATH`, the class first, the
//! path last and escaped (`keys::shown`: a path is input from whoever wrote the snapshot, and a
//! name with a newline or a tab must not make a second line or field); or with `--json` one
//! object per line. The summary is the closing log line.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use crate::auth::KeyError;
use crate::config::Config;
use crate::keys::{self, shown, SubpathError};
use crate::report::Ending;
use crate::snapshot::{self, Expected, FetchError, Kind};
use crate::store::s3::S3Store;
use crate::store::sdk::{self, SetupError};
use crate::store::{ObjectStore, StoreError};

pub mod compare;

use compare::{Change, Class, Side, What};

#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// The older snapshot's id (default: the one before the latest).
    pub older: Option<String>,
    /// The newer snapshot's id (default: the latest).
    pub newer: Option<String>,
    /// Only this file or directory: relative to source.path, or absolute below it.
    pub path: Option<PathBuf>,
    /// One JSON object per line instead of text.
    pub json: bool,
}

/// Why a diff did not complete. One line each, saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// A bad `--path`: exit 64 like any command-line error.
    #[error(transparent)]
    Usage(#[from] SubpathError),
    /// An id that names no snapshot under the prefix: exit 64.
    #[error(
        "snapshot {id}: there is no such snapshot under {folder} ({there}); give the id of one \
         that is"
    )]
    NoSuchSnapshot {
        id: String,
        folder: String,
        there: String,
    },
    #[error("{0}")]
    TooFew(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A snapshot whose entries cannot be compared: nothing further is printed.
    #[error("snapshot {} is refused: {why}; nothing after this is compared", shown(.key))]
    Snapshot { key: String, why: String },
    #[error("cannot write the differences: {0}")]
    Output(io::Error),
}

impl DiffError {
    pub fn ending(&self) -> Ending {
        match self {
            DiffError::Usage(_) | DiffError::NoSuchSnapshot { .. } => Ending::Usage,
            _ => Ending::FAILED,
        }
    }
}

/// What a diff found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffFigures {
    pub older: String,
    pub newer: String,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    pub metadata: u64,
    /// Entries read from each snapshot.
    pub older_entries: u64,
    pub newer_entries: u64,
    /// Whoever read the output stopped reading (`| head`): not every difference was written.
    pub cut_short: bool,
}

impl DiffFigures {
    fn count(&mut self, class: Class) {
        match class {
            Class::Added => self.added += 1,
            Class::Removed => self.removed += 1,
            Class::Changed => self.changed += 1,
            Class::Metadata => self.metadata += 1,
        }
    }
}

/// `nightcopy diff` as the command runs it, and how it ended.
pub async fn run(config: &Config, opts: &DiffOptions) -> Ending {
    let result = async {
        let sub = subpath(config, opts)?;
        let sdk = sdk::load_checked(config).await?;
        let store = S3Store::for_config(&sdk, config);
        diff(config, opts, &sub, &store, Box::new(io::stdout())).await
    }
    .await;
    match result {
        Ok(f) => {
            let below = match &opts.path {
                Some(p) => format!(" below {}", shown(p)),
                None => String::new(),
            };
            let cut = match f.cut_short {
                true => "; the output was closed before the end",
                false => "",
            };
            crate::summary!(
                crate::exit::SUCCESS,
                added = f.added,
                removed = f.removed,
                changed = f.changed,
                metadata = f.metadata,
                "diff {} → {}{below}: {} added, {} removed, {} changed, {} metadata only \
                 ({} and {} paths compared){cut}",
                f.older,
                f.newer,
                f.added,
                f.removed,
                f.changed,
                f.metadata,
                f.older_entries,
                f.newer_entries
            );
            Ending::SUCCESS
        }
        Err(e) => {
            tracing::error!("diff FAILED: {e}");
            e.ending()
        }
    }
}

/// `--path` as a key ("" for the whole tree).
pub fn subpath(config: &Config, opts: &DiffOptions) -> Result<String, SubpathError> {
    match &opts.path {
        Some(p) => keys::subpath_key(p, &config.source.path.0),
        None => Ok(String::new()),
    }
}

/// The two snapshots to compare, from the ids under the prefix (oldest first) and the ones
/// asked for: the last two; or `older` and the latest; or both as given.
pub fn pick(
    ids: &[String],
    older: Option<&str>,
    newer: Option<&str>,
    folder: &str,
) -> Result<(String, String), DiffError> {
    let there = |id: &str| -> Result<String, DiffError> {
        match ids.iter().any(|i| i == id) {
            true => Ok(id.to_owned()),
            false => Err(DiffError::NoSuchSnapshot {
                id: shown(id).to_string(),
                folder: folder.to_owned(),
                there: match (ids.first(), ids.last()) {
                    (Some(first), Some(last)) => {
                        format!("{} there, from {first} to {last}", ids.len())
                    }
                    _ => "there are none".into(),
                },
            }),
        }
    };
    match (older, newer) {
        (Some(o), Some(n)) => Ok((there(o)?, there(n)?)),
        (Some(o), None) => {
            let o = there(o)?;
            Ok((o, ids.last().expect("it is there").clone()))
        }
        (None, _) => match ids {
            [.., o, n] => Ok((o.clone(), n.clone())),
            [only] => Err(DiffError::TooFew(format!(
                "only one snapshot under {folder} ({only}): diff compares two; the next \
                 completed nightcopy run writes another"
            ))),
            [] => Err(DiffError::TooFew(format!(
                "no snapshot under {folder}: diff compares two, and each completed nightcopy \
                 run writes one; run a backup (nightcopy run) first"
            ))),
        },
    }
}

/// The comparison over any store, written to `out`.
pub async fn diff<S: ObjectStore>(
    config: &Config,
    opts: &DiffOptions,
    sub: &str,
    store: &S,
    out: Box<dyn Write + Send>,
) -> Result<DiffFigures, DiffError> {
    let prefix = config.destination.prefix.as_str();
    let folder = format!(
        "s3://{}/{}",
        config.destination.bucket.0,
        shown(&format!("{prefix}{}", snapshot::DIR))
    );
    let ids = snapshot::list(store, prefix).await?;
    let (older, newer) = pick(&ids, opts.older.as_deref(), opts.newer.as_deref(), &folder)?;
    let key = config.auth_key()?;
    let destination = config.destination_id();
    let expected = Expected {
        destination: &destination,
        key: key.as_ref(),
    };
    let (a, b) = futures::try_join!(
        snapshot::fetch(store, prefix, &older, &expected),
        snapshot::fetch(store, prefix, &newer, &expected),
    )?;
    let keys = [
        snapshot::object_key(prefix, &older),
        snapshot::object_key(prefix, &newer),
    ];
    let sub = sub.to_owned();
    let json = opts.json;
    let mut figures = DiffFigures {
        older,
        newer,
        ..DiffFigures::default()
    };
    tokio::task::spawn_blocking(move || {
        let refused = |side: Side, why: String| DiffError::Snapshot {
            key: keys[(side == Side::Newer) as usize].clone(),
            why,
        };
        let mut ra = a
            .entries()
            .map_err(|e| refused(Side::Older, e.to_string()))?;
        let mut rb = b
            .entries()
            .map_err(|e| refused(Side::Newer, e.to_string()))?;
        let older = std::iter::from_fn(move || ra.next_entry().transpose());
        let newer = std::iter::from_fn(move || rb.next_entry().transpose());
        let mut changes = compare::Diff::new(older, newer, &sub);
        let mut out = io::BufWriter::with_capacity(64 * 1024, out);
        let mut line = String::new();
        let mut end = Ok(());
        for change in changes.by_ref() {
            let change = change.map_err(|e| match e {
                compare::Error::Read { side, error } => refused(side, error.to_string()),
                compare::Error::Refused { side, entry, why } => {
                    refused(side, format!("entry {entry}: {why}"))
                }
            })?;
            line.clear();
            match json {
                true => json_line(&change, &mut line),
                false => text_line(&change, &mut line),
            }
            line.push('\n');
            if let Err(e) = out.write_all(line.as_bytes()) {
                end = Err(e);
                break;
            }
            figures.count(change.class);
        }
        (figures.older_entries, figures.newer_entries) = changes.read();
        let end = end.and_then(|()| out.flush());
        match end {
            Ok(()) => Ok(figures),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                figures.cut_short = true;
                Ok(figures)
            }
            Err(e) => Err(DiffError::Output(e)),
        }
    })
    .await
    .unwrap_or_else(|e| Err(DiffError::Output(io::Error::other(e.to_string()))))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Hardlink => "hardlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::Char => "char",
        Kind::Block => "block",
    }
}

fn shown_bytes(b: &[u8]) -> String {
    shown(OsStr::from_bytes(b)).to_string()
}

/// A time in nanoseconds since the epoch, as RFC 3339 UTC.
fn time(ns: i64) -> String {
    let d = Duration::from_nanos(ns.unsigned_abs());
    let t = match ns >= 0 {
        true => UNIX_EPOCH.checked_add(d),
        false => UNIX_EPOCH.checked_sub(d),
    };
    match t {
        Some(t) => humantime::format_rfc3339_nanos(t).to_string(),
        None => format!("{ns}ns"),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), T::to_string)
}

/// A difference as text: its name, and old → new where that fits on a line.
fn what_text(w: &What) -> String {
    match w {
        What::Kind(a, b) => format!("kind {}→{}", kind_name(*a), kind_name(*b)),
        What::Size(a, b) => format!("size {a}→{b}"),
        What::Sha256(..) => "sha256".into(),
        What::Target(a, b) => format!("target {}→{}", shown_bytes(a), shown_bytes(b)),
        What::Link(a, b) => format!("link {}→{}", shown_bytes(a), shown_bytes(b)),
        What::Rdev(a, b) => format!("rdev {}→{}", opt(a), opt(b)),
        What::Mode(a, b) => format!("mode {a:o}→{b:o}"),
        What::Owner(a, b) => format!("owner {}:{}→{}:{}", a.0, a.1, b.0, b.1),
        What::Mtime(a, b) => format!("mtime {}→{}", time(*a), time(*b)),
        What::Xattrs => "xattrs".into(),
    }
}

/// `CLASS<TAB>DETAIL…<TAB>PATH`: the kind for a path added or removed, what differs for one
/// changed; the path escaped, last.
pub fn text_line(c: &Change, out: &mut String) {
    out.push_str(c.class.as_str());
    out.push('\t');
    match c.class {
        Class::Added | Class::Removed => {
            out.push_str(kind_name(c.kind));
            out.push('\t');
        }
        Class::Changed | Class::Metadata => {
            for w in &c.what {
                out.push_str(&what_text(w));
                out.push('\t');
            }
        }
    }
    out.push_str(&shown_bytes(&c.path));
}

/// One JSON object: `change`, `path` (escaped), `raw_path` (percent-encoded bytes), `kind`, and
/// for a path on both sides `changes`, each `{"what", "old", "new"}`.
pub fn json_line(c: &Change, out: &mut String) {
    let changes: Vec<serde_json::Value> = c
        .what
        .iter()
        .map(|w| {
            let (old, new) = match w {
                What::Kind(a, b) => (json!(kind_name(*a)), json!(kind_name(*b))),
                What::Size(a, b) => (json!(a), json!(b)),
                What::Sha256(a, b) => (
                    json!(a.as_deref().map(|s| shown(s).to_string())),
                    json!(b.as_deref().map(|s| shown(s).to_string())),
                ),
                What::Target(a, b) | What::Link(a, b) => {
                    (json!(shown_bytes(a)), json!(shown_bytes(b)))
                }
                What::Rdev(a, b) => (json!(a), json!(b)),
                What::Mode(a, b) => (json!(format!("{a:o}")), json!(format!("{b:o}"))),
                What::Owner(a, b) => (
                    json!({"uid": a.0, "gid": a.1}),
                    json!({"uid": b.0, "gid": b.1}),
                ),
                What::Mtime(a, b) => (json!(a), json!(b)),
                What::Xattrs => return json!({"what": w.name()}),
            };
            json!({"what": w.name(), "old": old, "new": new})
        })
        .collect();
    let mut v = json!({
        "change": c.class.as_str(),
        "path": shown_bytes(&c.path),
        "raw_path": keys::encode_raw_path(Path::new(OsStr::from_bytes(&c.path))),
        "kind": kind_name(c.kind),
    });
    if !changes.is_empty() {
        v["changes"] = changes.into();
    }
    out.push_str(&v.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::Dir;
    use crate::snapshot::{Counts, Entry, Header, Writer};
    use crate::store::memory::{MemoryStore, Object};
    use std::sync::{Arc, Mutex};

    fn ids(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("2026120{i}T020000Z-0000000{i}"))
            .collect()
    }

    #[test]
    fn the_last_two_or_the_one_given_and_the_latest_are_compared() {
        let three = ids(3);
        let pick = |older, newer| pick(&three, older, newer, "s3://b/p/.nightcopy/snapshots/");
        assert_eq!(
            pick(None, None).unwrap(),
            (three[1].clone(), three[2].clone())
        );
        assert_eq!(
            pick(Some(&three[0]), None).unwrap(),
            (three[0].clone(), three[2].clone())
        );
        assert_eq!(
            pick(Some(&three[2]), Some(&three[0])).unwrap(),
            (three[2].clone(), three[0].clone())
        );
        let err = pick(Some("20261109T020000Z-00000009"), None).unwrap_err();
        assert_eq!(err.ending(), Ending::Usage);
        assert_eq!(
            err.to_string(),
            "snapshot 20261109T020000Z-00000009: there is no such snapshot under \
             s3://b/p/.nightcopy/snapshots/ (3 there, from 20261201T020000Z-00000001 to \
             20261203T020000Z-00000003); give the id of one that is"
        );
        for n in [0, 1] {
            let err = super::pick(&ids(n), None, None, "F").unwrap_err();
            assert_eq!(err.ending(), Ending::FAILED);
            assert!(matches!(err, DiffError::TooFew(_)), "{err}");
            assert!(err.to_string().contains("nightcopy run"), "{err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    fn change(class: Class, kind: Kind, path: &[u8], what: Vec<What>) -> Change {
        Change {
            class,
            kind,
            path: path.to_vec(),
            what,
        }
    }

    #[test]
    fn a_line_is_tab_separated_with_the_path_escaped_and_last() {
        let cases = [
            (
                change(Class::Added, Kind::Dir, b"new dir", vec![]),
                "added\tdir\tnew dir",
            ),
            (
                change(Class::Removed, Kind::File, b"x\nINFO forged\tfield", vec![]),
                "removed\tfile\tx\\nINFO forged\\tfield",
            ),
            (
                change(
                    Class::Metadata,
                    Kind::File,
                    b"caf\xe9",
                    vec![What::Mode(0o644, 0o600), What::Owner((1, 2), (0, 0))],
                ),
                "metadata\tmode 644→600\towner 1:2→0:0\tcaf\\xe9",
            ),
            (
                change(
                    Class::Changed,
                    Kind::Symlink,
                    b"l",
                    vec![
                        What::Target(b"a\tb".to_vec(), b"c".to_vec()),
                        What::Mtime(0, 1_500_000_000),
                    ],
                ),
                "changed\ttarget a\\tb→c\tmtime 1970-01-01T00:00:00.000000000Z→1970-01-01T00:00:01.500000000Z\tl",
            ),
            (
                change(
                    Class::Changed,
                    Kind::Dir,
                    b"d",
                    vec![What::Kind(Kind::File, Kind::Dir)],
                ),
                "changed\tkind file→dir\td",
            ),
        ];
        for (c, want) in cases {
            let mut line = String::new();
            text_line(&c, &mut line);
            assert_eq!(line, want);
        }
    }

    #[test]
    fn a_json_line_names_the_change_the_path_and_what_differs() {
        let c = change(
            Class::Changed,
            Kind::File,
            b"a\nb",
            vec![
                What::Size(1, 2),
                What::Sha256(Some("aa".into()), Some("bb".into())),
                What::Mode(0o644, 0o4755),
                What::Xattrs,
            ],
        );
        let mut line = String::new();
        json_line(&c, &mut line);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({
                "change": "changed",
                "path": "a\\nb",
                "raw_path": "a%0Ab",
                "kind": "file",
                "changes": [
                    {"what": "size", "old": 1, "new": 2},
                    {"what": "sha256", "old": "aa", "new": "bb"},
                    {"what": "mode", "old": "644", "new": "4755"},
                    {"what": "xattrs"},
                ],
            })
        );
        let mut line = String::new();
        json_line(&change(Class::Added, Kind::Fifo, b"p", vec![]), &mut line);
        assert_eq!(
            line,
            r#"{"change":"added","kind":"fifo","path":"p","raw_path":"p"}"#
        );
    }

    // The whole command over an in-memory bucket.

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn entry(path: &str, kind: Kind, size: u64) -> Entry {
        let file = kind == Kind::File;
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size,
            key: file.then(|| path.into()),
            sha256: file.then(|| format!("{size:064}")),
            version: None,
            stale: false,
            link: None,
            rdev: None,
            extents: None,
            xattrs: None,
            xattrs_dropped: false,
        }
    }

    struct Bucket {
        store: MemoryStore,
        config: Config,
        _state: tempfile::TempDir,
    }

    impl Bucket {
        fn new() -> Bucket {
            let state = tempfile::tempdir().unwrap();
            let config = Config::parse(
                &format!(
                    "source:\n  path: /src\ndestination:\n  bucket: b-1\n  prefix: p/\n\
                     state-dir: {}\n",
                    state.path().display()
                ),
                Path::new("/etc/nightcopy/config.yaml"),
            )
            .unwrap();
            Bucket {
                store: MemoryStore::new(2),
                config,
                _state: state,
            }
        }

        fn put(&self, id: &str, entries: &[Entry]) {
            let dir = Dir::open(self._state.path()).unwrap();
            let mut w = Writer::create(&dir).unwrap();
            for e in entries {
                w.push(e).unwrap();
            }
            let header = Header {
                nightcopy_snapshot: snapshot::FORMAT,
                id: id.into(),
                destination: self.config.destination_id(),
                source: "%2Fsrc".into(),
                host: "h".into(),
                started: 1,
                ended: 2,
                counts: Counts::default(),
                entries: 0,
                body_sha256: String::new(),
                mac: None,
            };
            w.finish(&dir, "out.gz", header, None).unwrap();
            let bytes = std::fs::read(self._state.path().join("out.gz")).unwrap();
            self.store
                .insert(&snapshot::object_key("p/", id), Object::new(bytes, None));
        }

        async fn diff(&self, opts: &DiffOptions) -> (Result<DiffFigures, DiffError>, String) {
            let out = Out::default();
            let sub = subpath(&self.config, opts).unwrap();
            let r = diff(&self.config, opts, &sub, &self.store, Box::new(out.clone())).await;
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            (r, text)
        }
    }

    #[tokio::test]
    async fn two_snapshots_in_the_bucket_are_compared_and_a_disordered_one_refused() {
        let b = Bucket::new();
        let ids = ids(3);
        b.put(&ids[0], &[entry("a", Kind::File, 1)]);
        let (r, _) = b.diff(&DiffOptions::default()).await;
        assert!(matches!(r, Err(DiffError::TooFew(_))), "{r:?}");

        b.put(
            &ids[1],
            &[
                entry("a", Kind::File, 2),
                entry("d", Kind::Dir, 0),
                entry("d/x", Kind::File, 1),
            ],
        );
        let (r, text) = b.diff(&DiffOptions::default()).await;
        let f = r.unwrap();
        assert_eq!(
            text,
            "changed\tsize 1→2\tsha256\ta\nadded\tdir\td\nadded\tfile\td/x\n"
        );
        assert_eq!(
            (
                f.added,
                f.removed,
                f.changed,
                f.metadata,
                f.older_entries,
                f.newer_entries
            ),
            (2, 0, 1, 0, 1, 3)
        );
        assert_eq!(
            (f.older.as_str(), f.newer.as_str()),
            (&ids[0][..], &ids[1][..])
        );

        let narrow = DiffOptions {
            path: Some("/src/d".into()),
            json: true,
            ..DiffOptions::default()
        };
        let (r, text) = b.diff(&narrow).await;
        r.unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (&lines[0]["path"], &lines[1]["path"]),
            (&json!("d"), &json!("d/x"))
        );

        // Out of the walk's order ("d/x" before "d/"): refused, naming the entry; nothing about
        // what comes after it is printed.
        b.put(
            &ids[2],
            &[
                entry("0", Kind::File, 1),
                entry("d/x", Kind::File, 1),
                entry("d", Kind::Dir, 0),
            ],
        );
        let (r, text) = b.diff(&DiffOptions::default()).await;
        let err = r.unwrap_err();
        assert_eq!(err.ending(), Ending::FAILED);
        assert_eq!(
            err.to_string(),
            format!(
                "snapshot p/.nightcopy/snapshots/{}.gz is refused: entry 3: \"d\" comes after \
                 \"d/x\", out of the walk's order; nothing after this is compared",
                ids[2]
            )
        );
        assert!(!text.contains('d'), "{text}");

        let older = DiffOptions {
            older: Some(ids[0].clone()),
            newer: Some(ids[1].clone()),
            ..DiffOptions::default()
        };
        assert!(b.diff(&older).await.0.is_ok());
    }

    /// Takes one write, then is a closed pipe (`nightcopy diff | head -1`).
    struct Closed(bool);

    impl Write for Closed {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match std::mem::replace(&mut self.0, true) {
                false => Ok(buf.len()),
                true => Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_ends_the_diff_quietly() {
        let b = Bucket::new();
        let ids = ids(2);
        b.put(&ids[0], &[]);
        // More than the output's buffer holds, so the closed pipe is met before the end.
        let many: Vec<Entry> = (0..5000)
            .map(|i| {
                entry(
                    &format!("f{i:05}-a-longer-name-for-a-longer-line"),
                    Kind::File,
                    1,
                )
            })
            .collect();
        b.put(&ids[1], &many);
        let opts = DiffOptions::default();
        let r = diff(&b.config, &opts, "", &b.store, Box::new(Closed(false))).await;
        let f = r.unwrap();
        assert!(f.cut_short);
        assert!(f.added < 5000, "{f:?}");
    }
}
