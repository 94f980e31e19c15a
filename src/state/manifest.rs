//! The local record of what was backed up: per key the size, mtime (ns) and SHA-256 of the file as
//! it was uploaded. It is what lets a rerun skip unchanged files without a HEAD per object, and
//! catch a file whose content changed while its mtime moved backwards.
//!
//! Stored sorted by key in one text file and read as a stream, so memory does not grow with the
//! tree. A new manifest is written beside the old one as the run goes and renamed over it only
//! when the run completes; a trailer with the entry count and a SHA-256 of everything before it
//! lets a torn or edited file be detected and ignored (the run then falls back to the listing).
//!
//! Keys never contain control characters (see `keys`), so a line per entry is unambiguous. A
//! line is `key`, size, mtime, SHA-256 (hex, or `-`) and, where the bucket keeps versions, the
//! object version that holds those bytes, separated by tabs; a manifest written before versions
//! were recorded has four fields on every line and reads as it did.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::fsutil::{self, AtomicFile};

const MAGIC: &str = "nightcopy-manifest 1";
pub const FILE_NAME: &str = "manifest";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub key: String,
    pub size: u64,
    pub mtime_ns: i64,
    /// None when the entry was adopted from the listing without an upload (no manifest yet).
    pub sha256: Option<[u8; 32]>,
    /// The object version that holds these bytes, where the bucket keeps versions (from the
    /// upload's reply, carried forward while the file is unchanged); printable ASCII
    /// (`store::is_version_id`).
    pub version: Option<String>,
}

impl ManifestEntry {
    /// The entry as one line of the manifest (also how a distributed run spools it).
    pub fn to_line(&self) -> String {
        let sha = self.sha256.map_or_else(|| "-".to_owned(), hex::encode);
        let (tab, version) = match &self.version {
            Some(v) => ("\t", v.as_str()),
            None => ("", ""),
        };
        format!(
            "{}\t{}\t{}\t{sha}{tab}{version}\n",
            self.key, self.size, self.mtime_ns
        )
    }

    pub fn parse(line: &str) -> Option<ManifestEntry> {
        let mut f = line.split('\t');
        let key = f.next()?.to_owned();
        let size = f.next()?.parse().ok()?;
        let mtime_ns = f.next()?.parse().ok()?;
        let sha = f.next()?;
        let sha256 = if sha == "-" {
            None
        } else {
            Some(hex::decode(sha).ok()?.try_into().ok()?)
        };
        let version = match f.next() {
            None => None,
            Some(v) if crate::store::is_version_id(v) => Some(v.to_owned()),
            Some(_) => return None,
        };
        f.next().is_none().then_some(ManifestEntry {
            key,
            size,
            mtime_ns,
            sha256,
            version,
        })
    }
}

/// Why an existing manifest is not used. Never fatal: the run falls back to the listing.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("it was written for another destination ({0})")]
    OtherDestination(String),
    #[error("it is damaged: {0}")]
    Damaged(String),
    #[error("it cannot be read: {0}")]
    Io(#[from] io::Error),
}

/// Opens the manifest for `destination`, checking it whole first. `Ok(None)`: there is none yet.
/// While checking it, every `cut_every`-th key is kept (see [`Reader::take_cuts`]).
pub fn open(
    state_dir: &Path,
    destination: &str,
    cut_every: usize,
) -> Result<Option<Reader>, Rejected> {
    open_file(&state_dir.join(FILE_NAME), destination, cut_every)
}

/// [`open`] for a manifest at another path (a copy fetched from the bucket).
pub fn open_file(
    path: &Path,
    destination: &str,
    cut_every: usize,
) -> Result<Option<Reader>, Rejected> {
    // Opened once (never through a link), checked, then read from the start again: the file
    // read is the file checked.
    let mut file = match fsutil::open_read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let cuts = verify(
        BufReader::new(file.try_clone()?),
        destination,
        cut_every.max(1) as u64,
    )?;
    file.rewind()?;
    let mut lines = BufReader::new(file).lines();
    lines.next(); // header, verified above
    Ok(Some(Reader { lines, cuts }))
}

/// [`open`], for a command that can go on without a manifest: a rejected one is a warning naming
/// the state directory, why, and what the command does instead (`fallback`).
pub fn open_or_warn(
    state_dir: &Path,
    destination: &str,
    cut_every: usize,
    fallback: &str,
) -> Option<Reader> {
    match open(state_dir, destination, cut_every) {
        Ok(m) => m,
        Err(why) => {
            tracing::warn!(
                "the manifest in {} is not used: {why}; {fallback}",
                state_dir.display()
            );
            None
        }
    }
}

/// The most cuts kept: past this, every other one is dropped and the spacing doubles, so a
/// manifest of any size yields a bounded list.
const MAX_CUTS: usize = 2048;

/// Every `spacing`-th key, at most `max` of them: when full, every other one is dropped and the
/// spacing doubles.
struct Cuts {
    spacing: u64,
    max: usize,
    keys: Vec<String>,
}

impl Cuts {
    fn new(spacing: u64, max: usize) -> Cuts {
        Cuts {
            spacing,
            max,
            keys: Vec::new(),
        }
    }

    /// `key` is the `count`-th entry (from 1).
    fn offer(&mut self, count: u64, key: &str) {
        if count.is_multiple_of(self.spacing) {
            self.keys.push(key.to_owned());
            if self.keys.len() == self.max {
                self.keys = std::mem::take(&mut self.keys)
                    .into_iter()
                    .skip(1)
                    .step_by(2)
                    .collect();
                self.spacing *= 2;
            }
        }
    }
}

/// One pass over the whole file: header, order, syntax and trailer. Cheap next to a walk of the same
/// tree, and it means the merge never acts on half a manifest. Returns keys about `cut_every`
/// apart, where the listing may be cut into ranges fetched side by side.
fn verify(mut r: impl BufRead, destination: &str, cut_every: u64) -> Result<Vec<String>, Rejected> {
    let damaged = |m: &str| Rejected::Damaged(m.to_owned());
    let mut hash = Sha256::new();
    let mut line = String::new();
    r.read_line(&mut line)?;
    let Some(dest) = line
        .strip_suffix('\n')
        .and_then(|l| l.strip_prefix(MAGIC))
        .and_then(|l| l.strip_prefix(' '))
    else {
        return Err(damaged("no header"));
    };
    if dest != destination {
        return Err(Rejected::OtherDestination(dest.to_owned()));
    }
    hash.update(line.as_bytes());
    let mut count = 0u64;
    let mut last: Option<String> = None;
    let mut cuts = Cuts::new(cut_every, MAX_CUTS);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(damaged("no trailer (the write was cut short)"));
        }
        if let Some(trailer) = line.strip_prefix("end ") {
            let want = format!("{count} {}\n", hex::encode(hash.finalize()));
            if trailer != want {
                return Err(damaged("the trailer does not match the entries"));
            }
            if r.read_line(&mut line)? != 0 {
                return Err(damaged("data after the trailer"));
            }
            return Ok(cuts.keys);
        }
        let entry = line
            .strip_suffix('\n')
            .and_then(ManifestEntry::parse)
            .ok_or_else(|| damaged(&format!("entry {} is malformed", count + 1)))?;
        if last.as_ref().is_some_and(|l| *l >= entry.key) {
            return Err(damaged(&format!("entry {} is out of order", count + 1)));
        }
        hash.update(line.as_bytes());
        count += 1;
        cuts.offer(count, &entry.key);
        last = Some(entry.key);
    }
}

/// Entries of a verified manifest, in key order.
pub struct Reader {
    lines: io::Lines<BufReader<File>>,
    cuts: Vec<String>,
}

impl Reader {
    /// Keys about `cut_every` entries apart, in order: where the bucket listing can be cut into
    /// ranges.
    pub fn take_cuts(&mut self) -> Vec<String> {
        std::mem::take(&mut self.cuts)
    }
}

impl Iterator for Reader {
    type Item = ManifestEntry;

    fn next(&mut self) -> Option<ManifestEntry> {
        let line = self.lines.next()?.ok()?;
        // The file was verified just before; a line that no longer parses (the trailer, or a file
        // replaced underneath us) ends the stream.
        ManifestEntry::parse(&line)
    }
}

/// Writes the next manifest beside the current one; `commit` replaces it atomically. Dropped
/// without `commit` (a fatal error, a full disk), the unfinished file is removed.
pub struct Writer {
    out: BufWriter<AtomicFile>,
    hash: Sha256,
    count: u64,
    last: Option<String>,
}

impl Writer {
    pub fn create(state_dir: &Path, destination: &str) -> io::Result<Writer> {
        // 0600: the manifest lists every file name of the tree.
        let file = AtomicFile::create(&state_dir.join(FILE_NAME), 0o600)?;
        let mut w = Writer {
            out: BufWriter::with_capacity(256 * 1024, file),
            hash: Sha256::new(),
            count: 0,
            last: None,
        };
        w.write(&format!("{MAGIC} {destination}\n"))?;
        Ok(w)
    }

    fn write(&mut self, s: &str) -> io::Result<()> {
        self.hash.update(s.as_bytes());
        self.out.write_all(s.as_bytes())
    }

    /// Entries must come in strictly increasing key order.
    pub fn push(&mut self, e: &ManifestEntry) -> io::Result<()> {
        if self.last.as_ref().is_some_and(|l| *l >= e.key) {
            return Err(io::Error::other(format!(
                "manifest entries out of order at {:?}",
                e.key
            )));
        }
        self.write(&e.to_line())?;
        self.last = Some(e.key.clone());
        self.count += 1;
        Ok(())
    }

    /// Commits after a stop: what completed is written; for every key after it, the old record
    /// in `state_dir` still describes what the bucket holds, so it is carried over and the
    /// progress is kept.
    pub fn commit_with_the_rest(mut self, state_dir: &Path, destination: &str) -> io::Result<()> {
        if let Ok(Some(old)) = open(state_dir, destination, usize::MAX) {
            let last = self.last.clone();
            for entry in old.filter(|e| last.as_ref().is_none_or(|l| e.key > *l)) {
                self.push(&entry)?;
            }
        }
        self.commit().map(|_| ())
    }

    pub fn commit(mut self) -> io::Result<u64> {
        let trailer = format!(
            "end {} {}\n",
            self.count,
            hex::encode(self.hash.clone().finalize())
        );
        self.out.write_all(trailer.as_bytes())?;
        self.out
            .into_inner()
            .map_err(|e| e.into_error())?
            .commit()?;
        Ok(self.count)
    }
}

/// The entries of a manifest, asked for key by key in increasing order: what the merges use to
/// find each key's record in one pass.
pub struct Cursor<M: Iterator<Item = ManifestEntry>> {
    entries: std::iter::Peekable<M>,
}

impl<M: Iterator<Item = ManifestEntry>> Cursor<M> {
    pub fn new(entries: M) -> Self {
        Cursor {
            entries: entries.peekable(),
        }
    }

    /// The record of `key`. Records of keys before it are passed over: their files are gone (the
    /// objects stay in the bucket).
    pub fn record(&mut self, key: &str) -> Option<ManifestEntry> {
        while self.entries.next_if(|m| m.key.as_str() < key).is_some() {}
        self.entries.next_if(|m| m.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const STEP: usize = 4_000;

    fn e(key: &str, sha: bool) -> ManifestEntry {
        ManifestEntry {
            key: key.into(),
            size: 42,
            mtime_ns: -5,
            sha256: sha.then_some([7; 32]),
            version: None,
        }
    }

    #[test]
    fn a_line_has_four_fields_or_five_with_a_version() {
        let old = "a b\t42\t-5\t".to_owned() + &"07".repeat(32);
        let parsed = ManifestEntry::parse(&old).expect("a line without a version");
        assert_eq!(parsed, e("a b", true));
        assert_eq!(
            parsed.to_line(),
            format!("{old}\n"),
            "written as it was read"
        );

        let adopted = ManifestEntry::parse("k\t1\t2\t-").unwrap();
        assert_eq!((adopted.sha256, adopted.version), (None, None));

        let v = "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo";
        let with = ManifestEntry::parse(&format!("{old}\t{v}")).expect("five fields");
        assert_eq!(with.version.as_deref(), Some(v));
        assert_eq!(with.to_line(), format!("{old}\t{v}\n"));
        assert_eq!(ManifestEntry::parse(with.to_line().trim_end()), Some(with));

        let longest = "v".repeat(1024);
        assert!(ManifestEntry::parse(&format!("{old}\t{longest}")).is_some());
        for bad in [
            String::new(),
            "v".repeat(1025),
            "\u{1b}[2J".into(),
            "caf\u{e9}".into(),
            "v\u{7f}".into(),
            "v\tw".into(),
        ] {
            assert_eq!(
                ManifestEntry::parse(&format!("{old}\t{bad}")),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(ManifestEntry::parse("k\t1\t2"), None, "three fields");
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert!(open(d.path(), "x", STEP).unwrap().is_none());
        let mut w = Writer::create(d.path(), "dest|b|p/").unwrap();
        let mut versioned = e("z%FF", true);
        versioned.version = Some("v1".into());
        let entries = [e("a b", true), e("a/b", false), versioned];
        for x in &entries {
            w.push(x).unwrap();
        }
        assert_eq!(w.commit().unwrap(), 3);
        let got: Vec<_> = open(d.path(), "dest|b|p/", STEP)
            .unwrap()
            .unwrap()
            .collect();
        assert_eq!(got, entries);
        assert!(matches!(
            open(d.path(), "other", STEP),
            Err(Rejected::OtherDestination(_))
        ));
    }

    #[test]
    fn cuts_are_spaced_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let write = |n: usize| {
            let mut w = Writer::create(d.path(), "x").unwrap();
            for i in 0..n {
                w.push(&e(&format!("k{i:09}"), true)).unwrap();
            }
            w.commit().unwrap();
            open(d.path(), "x", STEP).unwrap().unwrap().take_cuts()
        };
        let step = STEP;
        assert!(write(step - 1).is_empty());
        let cuts = write(3 * step + 5);
        let want: Vec<String> = (1..=3).map(|i| format!("k{:09}", i * step - 1)).collect();
        assert_eq!(cuts, want);

        // Past its maximum the spacing doubles: the list stays bounded and evenly spaced.
        for n in [0u64, 3, 4, 8, 9, 17, 100, 1000] {
            let mut cuts = Cuts::new(2, 4);
            for count in 1..=n {
                cuts.offer(count, &count.to_string());
            }
            assert!(cuts.keys.len() < 4, "{n}: {:?}", cuts.keys);
            let want: Vec<String> = (1..=n)
                .filter(|c| c.is_multiple_of(cuts.spacing))
                .map(|c| c.to_string())
                .collect();
            assert_eq!(cuts.keys, want, "{n}");
        }
    }

    #[test]
    fn an_abandoned_write_leaves_no_unfinished_file() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::create(d.path(), "x").unwrap();
        w.push(&e("a", true)).unwrap();
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        drop(w);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
        assert!(open(d.path(), "x", STEP).unwrap().is_none());

        let mut w = Writer::create(d.path(), "x").unwrap();
        w.push(&e("a", true)).unwrap();
        w.commit().unwrap();
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn out_of_order_push_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::create(d.path(), "x").unwrap();
        w.push(&e("b", true)).unwrap();
        assert!(w.push(&e("a", true)).is_err());
        assert!(w.push(&e("b", true)).is_err());
    }

    #[test]
    fn damage_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::create(d.path(), "x").unwrap();
        w.push(&e("a", true)).unwrap();
        w.push(&e("b", true)).unwrap();
        w.commit().unwrap();
        let path = d.path().join(FILE_NAME);
        let good = fs::read_to_string(&path).unwrap();
        let damaged = [
            good[..good.len() / 2].to_owned(), // torn write
            good.replace("\t42\t", "\t43\t"),  // edited entry
            good.replacen("a\t", "c\t", 1),    // reordered
            format!("{good}extra\n"),          // appended
            String::new(),                     // empty
        ];
        for text in damaged {
            fs::write(&path, &text).unwrap();
            assert!(
                matches!(open(d.path(), "x", STEP), Err(Rejected::Damaged(_))),
                "{text:?}"
            );
        }
    }
}
