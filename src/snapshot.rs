//! A snapshot index: the tree one completed run saw, written once under
//! `<prefix>.nightcopy/snapshots/<id>.gz` and never overwritten, so that a restore can give back
//! a tree that existed — not the union of every key ever uploaded — from the bucket alone.
//!
//! The object is gzip: a first member holding one JSON header line (format, id, destination,
//! source, host, start and end, counts, the entry count and the SHA-256 of the body, and with
//! `auth-key-file` an HMAC of the header), then a second member holding the body, one JSON line
//! per path the walk kept, in the walk's (key) order. Two members, because the header's counts
//! and checksum are known only once the body is written: the body streams into its own member in
//! the state directory while the run goes on, and the object is that member behind the header's
//! — the body is never held in memory, and is compressed once. Any gzip reader (zcat) reads both.
//!
//! An entry is small on purpose (short field names; gzip takes care of the rest): its path as
//! percent-encoded raw bytes (paths need not be UTF-8), its kind, mode, owner, mtime in ns and
//! size; for a file its key, SHA-256 and object version (where the bucket is versioned), and
//! `stale` when this run could not back it up and the record is the last good one; the target of
//! a symlink (raw bytes, percent-encoded) or the earlier path a hard link shares its inode with;
//! a sparse file's data extents; extended attributes within `MAX_XATTR_BYTES`.
//!
//! Reading one back is bounded like the manifest's copy (anyone who can write the prefix can write
//! one, and restore runs as root): the compressed size, the inflated size, each line, and the
//! entry count the header claims; the body must match the header's SHA-256, and with a key, the
//! header its MAC.

use std::io::{self, BufRead, BufReader, Read, Write};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{AuthKey, Domain};
use crate::fsutil::{AtomicFile, Dir};
use crate::store::{ObjectStore, StoreError};
use futures::StreamExt;

/// The format this nightcopy writes and reads.
pub const FORMAT: u32 = 1;
/// Where snapshot indexes live, below the prefix (inside the reserved `.nightcopy/`).
pub const DIR: &str = ".nightcopy/snapshots/";
/// Extended attributes kept per entry, names and values together; an entry with more keeps
/// none and says so (`xattrs_dropped`). Linux allows 64 KiB per value; ACLs of a few dozen
/// entries and `user.*` tags fit in far less.
pub const MAX_XATTR_BYTES: usize = 16 * 1024;

/// What kind of thing a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Another name of an inode an earlier entry (`link`) has: restored with link(2).
    Hardlink,
    Fifo,
    Socket,
    /// Device nodes: recorded, and created by restore only when asked.
    Char,
    Block,
}

/// One path of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the source, percent-encoded raw bytes (`keys::encode_raw_path`).
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "t")]
    pub kind: Kind,
    #[serde(rename = "m")]
    pub mode: u32,
    #[serde(rename = "u")]
    pub uid: u32,
    #[serde(rename = "g")]
    pub gid: u32,
    #[serde(rename = "mt")]
    pub mtime_ns: i64,
    #[serde(rename = "s", default)]
    pub size: u64,
    /// A file's key below the prefix.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A file's SHA-256, hex.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The object version that holds these bytes, where the bucket is versioned.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// This run could not back the file up: key, SHA-256 and version are the last good ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    /// A symlink's target, or the earlier path a hard link shares its inode with (both
    /// percent-encoded raw bytes).
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// A device node's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    /// A sparse file's data extents (offset, length); absent for a file without holes.
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<(u64, u64)>>,
    /// Extended attributes: name (percent-encoded) and value (base64).
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub xattrs: Option<Vec<(String, String)>>,
    /// Its extended attributes were more than `MAX_XATTR_BYTES`, and none are kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub xattrs_dropped: bool,
}

/// Totals over the body, in the header (and in `nightcopy snapshots`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// FIFOs, sockets and device nodes.
    pub specials: u64,
    /// Of the files.
    pub bytes: u64,
    /// Files this run could not back up (`stale` entries, and files with no record at all,
    /// which are absent).
    pub errors: u64,
}

impl Counts {
    fn add(&mut self, e: &Entry) {
        match e.kind {
            Kind::File => {
                self.files += 1;
                self.bytes += e.size;
            }
            Kind::Dir => self.dirs += 1,
            Kind::Symlink => self.symlinks += 1,
            Kind::Hardlink => self.hardlinks += 1,
            Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block => self.specials += 1,
        }
        if e.stale {
            self.errors += 1;
        }
    }
}

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub nightcopy_snapshot: u32,
    pub id: String,
    /// `Config::destination_id`.
    pub destination: String,
    /// The source path, percent-encoded.
    pub source: String,
    pub host: String,
    /// Unix seconds.
    pub started: u64,
    pub ended: u64,
    pub counts: Counts,
    pub entries: u64,
    /// Hex SHA-256 of the body's bytes (its lines, inflated).
    pub body_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Header {
    /// The bytes the MAC covers: the header without its MAC, as serialised.
    fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Header {
            mac: None,
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).expect("a header serializes")
    }

    pub fn seal(&mut self, key: Option<&AuthKey>) {
        self.mac = None;
        self.mac = key.map(|k| k.sign(Domain::Snapshot, &self.signed_bytes()));
    }
}

/// A snapshot's id: when it was made — at the end of its run — as a UTC second, then that
/// second's millisecond in the first three hex digits and five random ones. Runs of one
/// destination never overlap (the state directory's lock), so ids sort as runs do, also two in
/// one second; the random digits keep two hosts writing one prefix from sharing a key.
pub fn new_id(at: std::time::SystemTime) -> io::Result<String> {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(since.as_secs()),
    )
    .to_string()
    .replace(['-', ':'], "");
    let mut random = [0u8; 4];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let random = u32::from_be_bytes(random) & 0xf_ffff;
    Ok(format!("{when}-{:03x}{random:05x}", since.subsec_millis()))
}

/// Whether `id` is one `new_id` makes (what a listing of the snapshot folder is held to).
pub fn is_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 25
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
        && b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// The body as the run goes: one gzip member in the state directory, hashed and counted.
pub struct Writer {
    gz: GzEncoder<io::BufWriter<AtomicFile>>,
    hash: Sha256,
    counts: Counts,
    entries: u64,
    line: Vec<u8>,
}

/// The body's temporary name in the state directory.
const BODY_FILE: &str = "snapshot.body.gz";

impl Writer {
    pub fn create(state: &Dir) -> io::Result<Writer> {
        let file = AtomicFile::create_in(state, BODY_FILE, 0o600)?;
        Ok(Writer {
            gz: GzEncoder::new(
                io::BufWriter::with_capacity(256 * 1024, file),
                flate2::Compression::default(),
            ),
            hash: Sha256::new(),
            counts: Counts::default(),
            entries: 0,
            line: Vec::with_capacity(512),
        })
    }

    pub fn push(&mut self, e: &Entry) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, e).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.hash.update(&self.line);
        self.gz.write_all(&self.line)?;
        self.counts.add(e);
        self.entries += 1;
        Ok(())
    }

    /// Writes the whole object to `out` in `state` (header member, then the body member) and
    /// returns its header. `header` is filled in with the counts and the checksum, and sealed.
    pub fn finish(
        self,
        state: &Dir,
        out: &str,
        mut header: Header,
        key: Option<&AuthKey>,
    ) -> io::Result<Header> {
        let body = self
            .gz
            .finish()?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        body.commit()?;
        header.counts = self.counts;
        header.entries = self.entries;
        header.body_sha256 = hex::encode(self.hash.finalize());
        header.seal(key);
        let file = AtomicFile::create_in(state, out, 0o600)?;
        let mut w = io::BufWriter::with_capacity(256 * 1024, file);
        let mut first = GzEncoder::new(&mut w, flate2::Compression::default());
        serde_json::to_writer(&mut first, &header).map_err(io::Error::other)?;
        first.write_all(b"\n")?;
        first.finish()?;
        io::copy(&mut state.open_read(BODY_FILE)?, &mut w)?;
        let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.commit()?;
        let _ = state.remove(BODY_FILE);
        Ok(header)
    }
}

/// Bounds on reading a snapshot back.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Inflated bytes in all.
    pub inflated: u64,
    /// One line: a key of at most 1,024 bytes, a path that may be longer (percent-encoded, up to
    /// three bytes a byte), a link target, and up to `MAX_XATTR_BYTES` of attributes (base64).
    pub line: usize,
}

pub const LIMITS: Limits = Limits {
    inflated: 64 << 30,
    line: 128 * 1024,
};

/// Why a snapshot is not used.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("it is damaged: {0}")]
    Damaged(String),
    #[error("it is larger than nightcopy reads: {0}")]
    TooLarge(String),
    #[error("it was made for another destination ({0})")]
    OtherDestination(String),
    #[error("it is not authenticated with auth-key-file: {0}")]
    Unauthenticated(&'static str),
    #[error("it cannot be read: {0}")]
    Io(#[from] io::Error),
}

/// What a snapshot must be, to be used.
pub struct Expected<'a> {
    pub destination: &'a str,
    pub key: Option<&'a AuthKey>,
}

/// A snapshot being read: its header, then its entries one at a time.
pub struct Reader<R: Read> {
    r: BufReader<MultiGzDecoder<R>>,
    pub header: Header,
    limits: Limits,
    line: Vec<u8>,
    hash: Sha256,
    inflated: u64,
    read: u64,
}

/// One line into `buf`, at most `most` bytes of it; `Ok(false)` at the end.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, most: usize) -> Result<bool, Refused> {
    buf.clear();
    if (&mut *r).take(most as u64).read_until(b'\n', buf)? == 0 {
        return Ok(false);
    }
    if !buf.ends_with(b"\n") && buf.len() >= most {
        return Err(Refused::TooLarge(format!(
            "a line is longer than {most} bytes"
        )));
    }
    Ok(true)
}

/// The header line, checked: format, destination, MAC.
fn check_header(line: &[u8], expected: &Expected) -> Result<Header, Refused> {
    let header: Header = serde_json::from_slice(line)
        .map_err(|e| Refused::Damaged(format!("no valid header ({e})")))?;
    if header.nightcopy_snapshot != FORMAT {
        return Err(Refused::Damaged(format!(
            "format {} (this nightcopy reads {FORMAT})",
            header.nightcopy_snapshot
        )));
    }
    if header.destination != expected.destination {
        return Err(Refused::OtherDestination(header.destination.clone()));
    }
    crate::auth::check_mac(
        expected.key,
        Domain::Snapshot,
        &header.signed_bytes(),
        header.mac.as_deref(),
    )
    .map_err(Refused::Unauthenticated)?;
    Ok(header)
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header (format, destination, MAC).
    pub fn open(input: R, expected: &Expected, limits: Limits) -> Result<Reader<R>, Refused> {
        let mut r = BufReader::with_capacity(256 * 1024, MultiGzDecoder::new(input));
        let mut line = Vec::new();
        if !read_line(&mut r, &mut line, 64 * 1024)? {
            return Err(Refused::Damaged("it is empty".into()));
        }
        let header = check_header(&line, expected)?;
        Ok(Reader {
            r,
            inflated: line.len() as u64,
            header,
            limits,
            line,
            hash: Sha256::new(),
            read: 0,
        })
    }

    /// The next entry; `Ok(None)` at the end, once the body has matched its checksum and count.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Refused> {
        if !read_line(&mut self.r, &mut self.line, self.limits.line)? {
            if self.read != self.header.entries {
                return Err(Refused::Damaged(format!(
                    "{} entries, and its header says {}",
                    self.read, self.header.entries
                )));
            }
            let sha = hex::encode(std::mem::take(&mut self.hash).finalize());
            if sha != self.header.body_sha256 {
                return Err(Refused::Damaged("its checksum does not match".into()));
            }
            return Ok(None);
        }
        self.inflated += self.line.len() as u64;
        self.read += 1;
        if self.inflated > self.limits.inflated {
            return Err(Refused::TooLarge(format!(
                "more than {} inflated",
                bytesize::ByteSize(self.limits.inflated).display().iec()
            )));
        }
        if self.read > self.header.entries {
            return Err(Refused::Damaged(format!(
                "more entries than the {} its header says",
                self.header.entries
            )));
        }
        self.hash.update(&self.line);
        serde_json::from_slice(&self.line)
            .map(Some)
            .map_err(|e| Refused::Damaged(format!("entry {} is not valid ({e})", self.read)))
    }
}

// Reading snapshots from the bucket.

/// A snapshot's key below the prefix.
pub fn object_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{DIR}{id}.gz")
}

/// The header member is one line of at most 64 KiB: this much of the object always holds it.
const HEADER_BYTES: usize = 256 * 1024;

/// Why a snapshot could not be had. One line, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("snapshot {}: no such object under the prefix", crate::keys::shown(.0))]
    Missing(String),
    #[error("snapshot {} is refused: {why}", crate::keys::shown(.key))]
    Refused { key: String, why: Refused },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The ids of the snapshots under `prefix`, oldest first. Anything else in the folder — a name
/// `new_id` does not make — is not a snapshot and is left out (said at debug level).
pub async fn list<S: ObjectStore>(store: &S, prefix: &str) -> Result<Vec<String>, StoreError> {
    let folder = format!("{prefix}{DIR}");
    let mut ids = Vec::new();
    let mut token = None;
    loop {
        let page = store.list_page(&folder, None, token.take()).await?;
        for o in page.objects {
            match o.key.strip_suffix(".gz").filter(|id| is_id(id)) {
                Some(id) => ids.push(id.to_owned()),
                None => tracing::debug!(
                    "{}{} is not a snapshot: left out",
                    crate::keys::shown(&folder),
                    crate::keys::shown(&o.key)
                ),
            }
        }
        // The store refuses a continuation token it handed out before.
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Starts the download of snapshot `id`: its key and the download.
async fn get<S: ObjectStore>(
    store: &S,
    prefix: &str,
    id: &str,
) -> Result<(String, crate::store::Download), FetchError> {
    let key = object_key(prefix, id);
    match store.get(&key, None).await? {
        Some(download) => Ok((key, download)),
        None => Err(FetchError::Missing(key)),
    }
}

/// Only the header of snapshot `id` (its first member), checked — what `nightcopy snapshots` and
/// the choice of a snapshot by time need. Reads at most `HEADER_BYTES` of the object.
pub async fn fetch_header<S: ObjectStore>(
    store: &S,
    prefix: &str,
    id: &str,
    expected: &Expected<'_>,
) -> Result<Header, FetchError> {
    let (key, download) = get(store, prefix, id).await?;
    let refused = |why| FetchError::Refused {
        key: key.clone(),
        why,
    };
    let mut head = Vec::with_capacity(HEADER_BYTES.min(download.size as usize));
    let mut body = download.body;
    while head.len() < HEADER_BYTES {
        match body.next().await {
            Some(chunk) => {
                let chunk = chunk?;
                let room = HEADER_BYTES - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            None => break,
        }
    }
    drop(body);
    // The first member alone: the body's members are not read.
    let mut r = BufReader::new(flate2::read::GzDecoder::new(&head[..]));
    let mut line = Vec::new();
    if !read_line(&mut r, &mut line, 64 * 1024).map_err(refused)? {
        return Err(refused(Refused::Damaged("it is empty".into())));
    }
    let header = check_header(&line, expected).map_err(refused)?;
    same_id(&header, id).map_err(refused)?;
    Ok(header)
}

/// A snapshot whose id is not the one its key names is an old one copied under a new name (to
/// make a restore pick it): refused.
fn same_id(header: &Header, id: &str) -> Result<(), Refused> {
    match header.id == id {
        true => Ok(()),
        false => Err(Refused::Damaged(format!(
            "its header names snapshot {}, not the one its key names",
            crate::keys::shown(&header.id)
        ))),
    }
}

/// A whole snapshot, downloaded into an unnamed temporary file and checked end to end (every
/// entry, the count and the checksum) before anything uses it: a restore never acts on an entry
/// of a snapshot that turns out damaged further on.
pub struct Fetched {
    pub header: Header,
    file: std::fs::File,
    expected_destination: String,
}

impl Fetched {
    /// Its entries, from the first (one reader at a time: they share the file's offset).
    pub fn entries(&self) -> Result<Reader<std::fs::File>, Refused> {
        use std::io::Seek;
        let mut file = self.file.try_clone()?;
        file.rewind()?;
        // Checked once already; the MAC was part of that check, so no key is needed again.
        let expected = Expected {
            destination: &self.expected_destination,
            key: None,
        };
        Reader::open(file, &expected, LIMITS)
    }
}

/// Downloads snapshot `id` and checks it whole (see [`Fetched`]). The download is bounded by
/// `LIMITS.inflated`: gzip never makes data much larger, so no snapshot nightcopy reads is larger
/// compressed.
pub async fn fetch<S: ObjectStore>(
    store: &S,
    prefix: &str,
    id: &str,
    expected: &Expected<'_>,
) -> Result<Fetched, FetchError> {
    let (key, download) = get(store, prefix, id).await?;
    let refused = |why| FetchError::Refused {
        key: key.clone(),
        why,
    };
    if download.size > LIMITS.inflated {
        return Err(refused(Refused::TooLarge(format!(
            "{} stored",
            bytesize::ByteSize(download.size).display().iec()
        ))));
    }
    let mut file = crate::fsutil::anonymous_file().map_err(|e| refused(e.into()))?;
    let mut body = download.body;
    let mut got = 0u64;
    let mut w = io::BufWriter::with_capacity(256 * 1024, &mut file);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        got += chunk.len() as u64;
        if got > download.size {
            return Err(refused(Refused::Damaged(
                "its download is longer than its size".into(),
            )));
        }
        w.write_all(&chunk).map_err(|e| refused(e.into()))?;
    }
    w.flush().map_err(|e| refused(e.into()))?;
    drop(w);
    if got != download.size {
        return Err(FetchError::Store(StoreError::per_object(format!(
            "the download of {} ended after {got} of {} bytes",
            crate::keys::shown(&key),
            download.size
        ))));
    }
    let destination = expected.destination.to_owned();
    let key_for_check = expected.key.cloned();
    let id_owned = id.to_owned();
    let checked = tokio::task::spawn_blocking(move || -> Result<Fetched, Refused> {
        use std::io::Seek;
        file.rewind()?;
        let expected = Expected {
            destination: &destination,
            key: key_for_check.as_ref(),
        };
        let mut r = Reader::open(file.try_clone()?, &expected, LIMITS)?;
        same_id(&r.header, &id_owned)?;
        while r.next_entry()?.is_some() {}
        Ok(Fetched {
            header: r.header,
            file,
            expected_destination: destination,
        })
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(format!("checking it failed: {e}")).into()));
    checked.map_err(refused)
}

// Writing a run's snapshot.

impl Writer {
    /// A file this run could not back up and that has no earlier record: absent from the body,
    /// and counted in `Counts::errors`.
    pub fn count_absent(&mut self) {
        self.counts.errors += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            nightcopy_snapshot: FORMAT,
            id: "20261206T020000Z-0a1b2c3d".into(),
            destination: "d".into(),
            source: "%2Fsrc".into(),
            host: "h".into(),
            started: 1,
            ended: 2,
            counts: Counts::default(),
            entries: 0,
            body_sha256: String::new(),
            mac: None,
        }
    }

    fn file(path: &str, size: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o100644,
            uid: 1000,
            gid: 1000,
            mtime_ns: 1_700_000_000_123_456_789,
            size,
            key: Some(path.into()),
            sha256: Some("ab".repeat(32)),
            version: None,
            stale: false,
            link: None,
            rdev: None,
            extents: None,
            xattrs: None,
            xattrs_dropped: false,
        }
    }

    fn write(dir: &Dir, entries: &[Entry], key: Option<&AuthKey>) -> (Header, Vec<u8>) {
        let mut w = Writer::create(dir).unwrap();
        for e in entries {
            w.push(e).unwrap();
        }
        let h = w.finish(dir, "snap.gz", header(), key).unwrap();
        (h, std::fs::read(dir.path().join("snap.gz")).unwrap())
    }

    fn read_all(bytes: &[u8], expected: &Expected) -> Result<(Header, Vec<Entry>), Refused> {
        let mut r = Reader::open(bytes, expected, LIMITS)?;
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            out.push(e);
        }
        Ok((r.header, out))
    }

    const PLAIN: Expected = Expected {
        destination: "d",
        key: None,
    };

    #[test]
    fn an_id_sorts_as_its_run_started_and_is_recognised() {
        let at = |ms: u64| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let a = new_id(at(1_765_000_000_000)).unwrap();
        let b = new_id(at(1_765_000_000_001)).unwrap();
        let c = new_id(at(1_765_000_001_000)).unwrap();
        assert!(b < c, "{b} {c}");
        assert!(a < b, "{a} {b}");
        assert!(is_id(&a), "{a}");
        assert_eq!(&a[..16], "20251206T054640Z");
        for bad in [
            "",
            "20251206T054640Z",
            "20251206T054640Z-0a1b2c3g",
            "../x",
            "2025120xT054640Z-0a1b2c3d",
        ] {
            assert!(!is_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_counts_what_it_holds() {
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        let mut d = file("a", 0);
        d.kind = Kind::Dir;
        d.key = None;
        d.sha256 = None;
        let mut stale = file("a/old", 9);
        stale.stale = true;
        let mut link = file("a/l", 3);
        link.kind = Kind::Symlink;
        link.link = Some("%2Fetc%2Fpasswd".into());
        let entries = vec![d, file("a/f", 5), stale, link];
        let (h, bytes) = write(&dir, &entries, None);
        assert_eq!(h.entries, 4);
        assert_eq!(
            h.counts,
            Counts {
                files: 2,
                dirs: 1,
                symlinks: 1,
                bytes: 14,
                errors: 1,
                ..Counts::default()
            }
        );
        let (back, read) = read_all(&bytes, &PLAIN).unwrap();
        assert_eq!(back, h);
        assert_eq!(read, entries);
        assert!(
            !t.path().join(BODY_FILE).exists(),
            "the body's spool is gone"
        );
        // Any gzip reader sees one stream: the header line, then the body.
        let mut text = String::new();
        MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 5);
    }

    #[test]
    fn a_damaged_or_foreign_snapshot_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        let entries: Vec<Entry> = (0..50).map(|i| file(&format!("f{i:02}"), i)).collect();
        let (_, bytes) = write(&dir, &entries, None);
        let other = Expected {
            destination: "elsewhere",
            key: None,
        };
        assert!(matches!(
            read_all(&bytes, &other),
            Err(Refused::OtherDestination(_))
        ));
        // The body altered after the header was made: the count or the checksum says so.
        let mut text = String::new();
        MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        let altered = text.replacen("\"s\":7", "\"s\":8", 1);
        assert_ne!(altered, text);
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(altered.as_bytes()).unwrap();
        let err = read_all(&gz.finish().unwrap(), &PLAIN).unwrap_err();
        assert!(err.to_string().contains("checksum does not match"), "{err}");
        let short: String = text.lines().take(10).map(|l| format!("{l}\n")).collect();
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(short.as_bytes()).unwrap();
        let err = read_all(&gz.finish().unwrap(), &PLAIN).unwrap_err();
        assert!(err.to_string().contains("9 entries"), "{err}");
    }

    #[test]
    fn with_a_key_only_a_snapshot_sealed_with_it_is_read() {
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        let ours = AuthKey::from_bytes(&[1; 32]);
        let theirs = AuthKey::from_bytes(&[2; 32]);
        let (_, sealed) = write(&dir, &[file("a", 1)], Some(&ours));
        let (_, plain) = write(&dir, &[file("a", 1)], None);
        let with = |k| Expected {
            destination: "d",
            key: Some(k),
        };
        assert!(read_all(&sealed, &with(&ours)).is_ok());
        assert!(matches!(
            read_all(&sealed, &with(&theirs)),
            Err(Refused::Unauthenticated(_))
        ));
        assert!(matches!(
            read_all(&plain, &with(&ours)),
            Err(Refused::Unauthenticated(_))
        ));
        assert!(read_all(&sealed, &PLAIN).is_ok());
    }

    #[test]
    fn an_endless_line_is_refused_within_its_bound() {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut h = header();
        h.entries = 1;
        serde_json::to_writer(&mut gz, &h).unwrap();
        gz.write_all(b"\n").unwrap();
        gz.write_all(&vec![b'x'; LIMITS.line * 3]).unwrap();
        let err = read_all(&gz.finish().unwrap(), &PLAIN).unwrap_err();
        assert!(matches!(err, Refused::TooLarge(_)), "{err}");
    }

    #[tokio::test]
    async fn snapshots_are_listed_fetched_and_checked_from_the_bucket() {
        use crate::store::memory::{MemoryStore, Object};
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        let store = MemoryStore::new(2);
        let ids = ["20261201T020000Z-00000001", "20261202T020000Z-00000002"];
        for (n, id) in ids.iter().enumerate() {
            let mut w = Writer::create(&dir).unwrap();
            for i in 0..=n {
                w.push(&file(&format!("f{i}"), i as u64)).unwrap();
            }
            let h = Header {
                id: (*id).into(),
                ..header()
            };
            w.finish(&dir, "out.gz", h, None).unwrap();
            let bytes = std::fs::read(t.path().join("out.gz")).unwrap();
            store.insert(&object_key("p/", id), Object::new(bytes, None));
        }
        // Not snapshots: left out of the list.
        store.insert("p/.nightcopy/snapshots/notes.txt", Object::new("x", None));
        store.insert("p/.nightcopy/snapshots/../x.gz", Object::new("x", None));
        assert_eq!(list(&store, "p/").await.unwrap(), ids);

        let h = fetch_header(&store, "p/", ids[1], &PLAIN).await.unwrap();
        assert_eq!((h.id.as_str(), h.entries), (ids[1], 2));
        let f = fetch(&store, "p/", ids[1], &PLAIN).await.unwrap();
        for _ in 0..2 {
            let mut r = f.entries().unwrap();
            let mut n = 0;
            while r.next_entry().unwrap().is_some() {
                n += 1;
            }
            assert_eq!(n, 2);
        }

        // An old snapshot copied under a newer name is not taken for the newer one.
        let old = store.object(&object_key("p/", ids[0])).unwrap();
        let newer = "20261203T020000Z-00000003";
        store.insert(&object_key("p/", newer), old);
        for err in [
            fetch_header(&store, "p/", newer, &PLAIN).await.unwrap_err(),
            fetch(&store, "p/", newer, &PLAIN).await.err().unwrap(),
        ] {
            assert!(
                err.to_string().contains("not the one its key names"),
                "{err}"
            );
        }
        // Damaged after its header: only the whole fetch can tell, and it refuses before use.
        let mut text = String::new();
        let good = store.object(&object_key("p/", ids[1])).unwrap();
        MultiGzDecoder::new(&good.body[..])
            .read_to_string(&mut text)
            .unwrap();
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.replacen("\"s\":1", "\"s\":2", 1).as_bytes())
            .unwrap();
        store.insert(
            &object_key("p/", ids[1]),
            Object::new(gz.finish().unwrap(), None),
        );
        assert!(fetch_header(&store, "p/", ids[1], &PLAIN).await.is_ok());
        let err = fetch(&store, "p/", ids[1], &PLAIN).await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "snapshot p/.nightcopy/snapshots/20261202T020000Z-00000002.gz is refused: it is \
             damaged: its checksum does not match"
        );
        assert!(matches!(
            fetch(&store, "p/", "20261204T020000Z-00000004", &PLAIN).await,
            Err(FetchError::Missing(_))
        ));
    }

    proptest! {
        #[test]
        fn any_entries_round_trip(
            paths in proptest::collection::btree_set("[a-z/%0-9]{1,20}", 0..40),
            mode in 0u32..0o177777,
        ) {
            let t = tempfile::tempdir().unwrap();
            let dir = Dir::open(t.path()).unwrap();
            let entries: Vec<Entry> = paths
                .iter()
                .enumerate()
                .map(|(i, p)| Entry { mode, ..file(p, i as u64) })
                .collect();
            let (h, bytes) = write(&dir, &entries, None);
            let (back, read) = read_all(&bytes, &PLAIN).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(read, entries);
        }
    }
}
