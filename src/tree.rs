//! The night's snapshot (`snapshot`), made from the two things no single stage has: what the
//! walk saw of every path — directories, symlinks, hard links and special files as well as the
//! files the plan handles — and what the run committed for each file, its SHA-256 and object
//! version, known only once the manifest is complete.
//!
//! So the walk is spooled as it goes ([`Spool`]: one line per path, in key order, gzip, in the
//! state directory), and once the run has committed its manifest the two are joined by key
//! ([`save`]), streaming both — memory does not grow with the tree — into a `snapshot::Writer`,
//! and the result is uploaded once under `<prefix>.nightcopy/snapshots/<id>.gz`. The snapshot is
//! derived from the manifest the run committed, so the two cannot disagree.
//!
//! What a file's entry says ([`Join`]):
//!
//! - its record has the size and mtime the walk saw: its SHA-256 and version are the record's;
//! - its record has another size or mtime — this run's upload of it failed and the previous
//!   record was kept: the entry takes the record's size, mtime, SHA-256 and version (the bytes
//!   the bucket holds) and is `stale`. (A file that changed between the walk and its upload, and
//!   was uploaded as it then was, looks the same to the join and is marked so too: the entry
//!   still names the bytes the bucket holds, but counts as an error.)
//! - it has no record — it failed and was never backed up: it is absent, and counted in the
//!   header's `errors`;
//! - its record has no SHA-256 (adopted from the listing without an upload, on a host that had
//!   no manifest): the entry has none either, and restore checks the object against its own
//!   checksums.
//!
//! A file whose walk's stat said it may have holes (fewer blocks allocated than its size needs)
//! is opened once more at the join, beneath the source as a worker opens a file
//! (`scan::beneath`, then `scan::open_entry`), and its data extents are read
//! (`sparse::data_extents`); they are recorded when there is a hole and the file still has the
//! size and mtime of the bytes its record names. Every other file costs the join nothing.
//!
//! Hard links: a later name whose first name is absent takes its place, as a file (with its own
//! record), and the names after it link to it; the names of such dropped files are kept until
//! the end of the join (only those of files with several names). Directories, symlinks and
//! special files are entries as the walk saw them (their size is not recorded). Excluded paths
//! are absent, as is anything the walk could not read.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::fsutil::{self, blocking, AtomicFile, Dir};
use crate::keys::{self, shown};
use crate::plan::Reason;
use crate::report::Stats;
use crate::scan::beneath::Beneath;
use crate::scan::{Item, LocalEntry, ScanOptions, TreeEntry};
use crate::snapshot::{self, Entry, Header, Kind};
use crate::sparse::{self, Layout};
use crate::state::manifest::{self, Cursor, ManifestEntry};
use crate::stop::Stop;
use crate::store::{ObjectStore, StoreError};
use crate::upload::{Skip, Upload, Uploader};
use crate::xattrs::Xattrs;

/// The walk's spool in the state directory, while the run lasts.
const SPOOL_FILE: &str = "snapshot.tree.gz";
/// The snapshot object as written, until it is uploaded.
const OUT_FILE: &str = "snapshot.gz";

/// One line of the spool: an entry as the walk saw it (no SHA-256 or version yet), and whether it
/// is a file with other names (a hard link may name it as its first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Walked {
    #[serde(rename = "e")]
    pub entry: Entry,
    #[serde(rename = "n", default, skip_serializing_if = "std::ops::Not::not")]
    pub linked: bool,
    /// A file whose stat allows holes (`LocalEntry::may_have_holes`): its extents are read at
    /// the join.
    #[serde(rename = "sp", default, skip_serializing_if = "std::ops::Not::not")]
    pub sparse: bool,
}

/// Where the spool's lines go: the file, or (in tests) nowhere that works.
enum Out {
    File(AtomicFile),
    #[cfg(test)]
    Failing,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::File(f) => f.write(buf),
            #[cfg(test)]
            Out::Failing => Err(io::Error::other("no space left (test)")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::File(f) => f.flush(),
            #[cfg(test)]
            Out::Failing => Ok(()),
        }
    }
}

/// The walk, spooled as it goes by. A spool that cannot be written is given up with one warning
/// — the walk and the backup go on, and this run makes no snapshot.
pub struct Spool {
    state_dir: PathBuf,
    root: PathBuf,
    out: Option<GzEncoder<io::BufWriter<Out>>>,
    line: Vec<u8>,
    /// The walk gave its last item.
    ended: bool,
}

/// A whole walk, spooled: what [`save`] joins with the committed manifest (only
/// [`Spool::finish`] makes one).
#[derive(Debug)]
pub struct Tree(());

impl Spool {
    /// The spool of a walk of `root`, in `state_dir`.
    pub fn start(state_dir: &Path, root: &Path) -> Spool {
        let out = Dir::open(state_dir)
            .and_then(|dir| AtomicFile::create_in(&dir, SPOOL_FILE, 0o600))
            .map_err(|e| give_up(state_dir, &e))
            .ok();
        Spool::with(state_dir, root, out.map(Out::File))
    }

    fn with(state_dir: &Path, root: &Path, out: Option<Out>) -> Spool {
        Spool {
            state_dir: state_dir.to_owned(),
            root: root.to_owned(),
            out: out.map(|o| {
                GzEncoder::new(
                    io::BufWriter::with_capacity(256 * 1024, o),
                    flate2::Compression::fast(),
                )
            }),
            line: Vec::with_capacity(512),
            ended: false,
        }
    }

    /// The files of `items` (hard links included: each name's key gets its bytes), for the
    /// planner, every item spooled on the way.
    pub fn files<'a>(
        &'a mut self,
        items: impl Iterator<Item = Item> + 'a,
    ) -> impl Iterator<Item = LocalEntry> + 'a {
        let mut items = items;
        std::iter::from_fn(move || loop {
            let Some(item) = items.next() else {
                self.ended = true;
                return None;
            };
            self.push(&item);
            match item {
                Item::File(e) | Item::Hardlink { entry: e, .. } => return Some(e),
                Item::Dir(_) | Item::Symlink(_) | Item::Special(_) => {}
            }
        })
    }

    fn push(&mut self, item: &Item) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        self.line.clear();
        let walked = walked(&self.root, item);
        let written = serde_json::to_writer(&mut self.line, &walked)
            .map_err(io::Error::other)
            .and_then(|()| {
                self.line.push(b'\n');
                out.write_all(&self.line)
            });
        if let Err(e) = written {
            give_up(&self.state_dir, &e);
            // Dropped unfinished: the temp file goes.
            self.out = None;
        }
    }

    /// After the walk: the spooled tree, when the walk went to its end and every path of it was
    /// written.
    pub fn finish(self) -> Option<Tree> {
        if !self.ended {
            return None;
        }
        let out = self.out?;
        let done = out
            .finish()
            .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
            .and_then(|out| match out {
                Out::File(f) => f.commit(),
                #[cfg(test)]
                Out::Failing => Err(io::Error::other("no space left (test)")),
            });
        match done {
            Ok(()) => Some(Tree(())),
            Err(e) => {
                give_up(&self.state_dir, &e);
                None
            }
        }
    }
}

/// The one warning of a spool given up.
fn give_up(state_dir: &Path, e: &io::Error) {
    tracing::warn!(
        "the walk cannot be spooled in {} for the night's snapshot ({e}): the backup goes on, \
         and this run saves no snapshot",
        state_dir.display()
    );
}

/// The spool line of one item of the walk.
fn walked(root: &Path, item: &Item) -> Walked {
    let rel = |p: &Path| keys::encode_raw_path(p.strip_prefix(root).unwrap_or(p));
    let of_file = |e: &LocalEntry, kind: Kind, link: Option<String>| Entry {
        path: rel(&e.path),
        kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime_ns: e.mtime_ns,
        size: e.size,
        key: Some(e.key.clone()),
        sha256: None,
        version: None,
        stale: false,
        link,
        rdev: None,
        extents: None,
        xattrs: recorded(e.xattrs.as_deref(), &e.path),
        xattrs_dropped: e.xattrs.as_ref().is_some_and(|x| x.dropped),
    };
    let of_tree = |t: &TreeEntry, kind: Kind| Entry {
        path: keys::encode_raw_path(&t.rel),
        kind,
        mode: t.mode,
        uid: t.uid,
        gid: t.gid,
        mtime_ns: t.mtime_ns,
        size: 0,
        key: None,
        sha256: None,
        version: None,
        stale: false,
        link: t
            .target
            .as_ref()
            .map(|target| keys::encode_raw_path(Path::new(target))),
        rdev: matches!(kind, Kind::Char | Kind::Block).then_some(t.rdev),
        extents: None,
        xattrs: recorded(t.xattrs.as_deref(), &t.rel),
        xattrs_dropped: t.xattrs.as_ref().is_some_and(|x| x.dropped),
    };
    let (entry, linked, sparse) = match item {
        Item::File(e) => (
            of_file(e, Kind::File, None),
            e.nlink > 1 && !e.followed,
            e.may_have_holes(),
        ),
        Item::Hardlink { entry, first } => {
            let first = keys::encode_raw_path(first);
            (
                of_file(entry, Kind::Hardlink, Some(first)),
                false,
                entry.may_have_holes(),
            )
        }
        Item::Dir(t) => (of_tree(t, Kind::Dir), false, false),
        Item::Symlink(t) => (of_tree(t, Kind::Symlink), false, false),
        Item::Special(t) => (of_tree(t, special_kind(t.mode)), false, false),
    };
    Walked {
        entry,
        linked,
        sparse,
    }
}

/// What an entry records of the extended attributes the walk read (`source.xattrs`).
fn recorded(x: Option<&Xattrs>, path: &Path) -> Option<Vec<(String, String)>> {
    let x = x?;
    if x.dropped {
        tracing::warn!(
            "{}: its extended attributes are more than {} bytes: none are recorded",
            shown(path),
            snapshot::MAX_XATTR_BYTES
        );
    }
    (!x.pairs.is_empty()).then(|| x.pairs.clone())
}

fn special_kind(mode: u32) -> Kind {
    match mode & nix::libc::S_IFMT {
        nix::libc::S_IFCHR => Kind::Char,
        nix::libc::S_IFBLK => Kind::Block,
        nix::libc::S_IFSOCK => Kind::Socket,
        _ => Kind::Fifo,
    }
}

/// What reads a file entry's data extents at the join (`None`: none recorded).
pub type Extents<'a> = Box<dyn FnMut(&Entry) -> Option<Vec<(u64, u64)>> + 'a>;

/// The walk (in key order) joined with the committed manifest (in key order) by key: see the
/// module's docs for what each entry says. `None` for a file with no record, which was never
/// backed up and is absent.
pub struct Join<'a, W, M: Iterator<Item = ManifestEntry>> {
    walked: W,
    records: Cursor<M>,
    /// First names of multiply-linked files that are absent, and the later name that took the
    /// place of each (`None` until one did).
    dropped: HashMap<String, Option<String>>,
    extents: Extents<'a>,
}

impl<'a, W, M> Join<'a, W, M>
where
    W: Iterator<Item = io::Result<Walked>>,
    M: Iterator<Item = ManifestEntry>,
{
    pub fn new(walked: W, manifest: M) -> Self {
        Join {
            walked,
            records: Cursor::new(manifest),
            dropped: HashMap::new(),
            extents: Box::new(|_| None),
        }
    }

    /// The join with `extents` asked for the files that may have holes.
    pub fn with_extents(self, extents: Extents<'a>) -> Self {
        Join { extents, ..self }
    }

    fn join(&mut self, w: Walked) -> Option<Entry> {
        let Walked {
            mut entry,
            linked,
            sparse,
        } = w;
        let Some(key) = entry.key.clone() else {
            return Some(entry);
        };
        // A later name of a file whose first name is absent: it stands in for that name.
        let mut stands_in_for = None;
        if entry.kind == Kind::Hardlink {
            let first = entry.link.clone().unwrap_or_default();
            match self.dropped.get(&first) {
                Some(Some(instead)) => entry.link = Some(instead.clone()),
                Some(None) => {
                    entry.kind = Kind::File;
                    entry.link = None;
                    stands_in_for = Some(first);
                }
                None => {}
            }
        }
        let Some(record) = self.records.record(&key) else {
            if linked {
                self.dropped.insert(entry.path, None);
            }
            return None;
        };
        if (record.size, record.mtime_ns) != (entry.size, entry.mtime_ns) {
            entry.size = record.size;
            entry.mtime_ns = record.mtime_ns;
            entry.stale = true;
        }
        entry.sha256 = record.sha256.map(hex::encode);
        entry.version = record.version;
        // A stale entry names older bytes than the file has: its extents would not be theirs.
        if sparse && !entry.stale && entry.kind == Kind::File {
            entry.extents = (self.extents)(&entry);
        }
        if let Some(first) = stands_in_for {
            self.dropped.insert(first, Some(entry.path.clone()));
        }
        Some(entry)
    }
}

impl<W, M> Iterator for Join<'_, W, M>
where
    W: Iterator<Item = io::Result<Walked>>,
    M: Iterator<Item = ManifestEntry>,
{
    type Item = io::Result<Option<Entry>>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.walked.next()?.map(|w| self.join(w)))
    }
}

/// Why the night's snapshot was not saved. Never fatal: the backup itself is whole, and the run
/// counts this as one transfer error (`commands::run`).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error("the manifest this run committed cannot be read: {0}")]
    Manifest(String),
    #[error("cannot make it in the state directory: {0}")]
    Write(io::Error),
    #[error("s3://{0}/{key} already exists, and a snapshot is never overwritten", key = shown(.1))]
    Exists(String, String),
    /// The upload failed as a file's would (its kind and the journal line are the uploader's).
    #[error("{0}")]
    Upload(String),
    #[error("a stop was requested first")]
    Stopped,
    #[error("the file to upload vanished")]
    Vanished,
    #[error("the file to upload was replaced by {0}")]
    Replaced(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A snapshot in the bucket.
#[derive(Debug)]
pub struct Saved {
    pub header: Header,
    /// The full key.
    pub key: String,
    /// The object's size.
    pub size: u64,
}

/// Joins the spooled `tree` with the manifest the run committed, writes the snapshot and uploads
/// it, never over an existing object (the id is new, and a listing of the key checks that it is
/// free: a HEAD would need s3:GetObject, which the backup's role has only for the manifest's
/// copy; s3:ListBucket it has for the whole prefix). The
/// upload goes through the uploader like any file (checksummed, multipart when large, under the
/// bandwidth limit), in the bucket's default class: a restore reads it first. The spool and the
/// written snapshot are removed from the state directory either way.
pub async fn save<S: ObjectStore>(
    store: Arc<S>,
    config: &Config,
    _whole: Tree,
    run_started: u64,
    stop: Stop,
) -> Result<Saved, SaveError> {
    let state = Dir::open(&config.state_dir.0).map_err(SaveError::Write)?;
    let written = write(config, run_started).await;
    let _ = state.remove(SPOOL_FILE);
    let uploaded = match written {
        Ok(header) => upload(store, config, &header, stop)
            .await
            .map(|(key, size)| Saved { header, key, size }),
        Err(e) => Err(e),
    };
    let _ = state.remove(OUT_FILE);
    uploaded
}

/// The snapshot written to `OUT_FILE` from the spool and the committed manifest.
async fn write(config: &Config, run_started: u64) -> Result<Header, SaveError> {
    let state_dir = config.state_dir.0.clone();
    let destination = config.destination_id();
    let header = Header {
        nightcopy_snapshot: snapshot::FORMAT,
        id: snapshot::new_id(std::time::SystemTime::now()).map_err(SaveError::Write)?,
        destination: destination.clone(),
        source: keys::encode_raw_path(&config.source.path.0),
        host: crate::queue::host_name(),
        started: run_started,
        ended: fsutil::unix_now(),
        counts: snapshot::Counts::default(),
        entries: 0,
        body_sha256: String::new(),
        mac: None,
    };
    let key = config.auth_key()?;
    let scan = ScanOptions::for_config(config);
    blocking(move || {
        let records = match manifest::open(&state_dir, &destination, usize::MAX) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Err("there is none".to_owned())),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let state = Dir::open(&state_dir)?;
        let spool = BufReader::with_capacity(
            256 * 1024,
            MultiGzDecoder::new(state.open_read(SPOOL_FILE)?),
        );
        let walked = spool
            .lines()
            .map(|l| l.and_then(|l| serde_json::from_str::<Walked>(&l).map_err(io::Error::other)));
        let mut w = snapshot::Writer::create(&state)?;
        let mut sparse = Sparse::open(&scan);
        for joined in Join::new(walked, records).with_extents(Box::new(|e| sparse.read(e))) {
            match joined? {
                Some(e) => w.push(&e)?,
                None => w.count_absent(),
            }
        }
        sparse.said();
        // Read to its end (the open file stays readable): one file less on the disk while the
        // object is written.
        let _ = state.remove(SPOOL_FILE);
        w.finish(&state, OUT_FILE, header, key.as_ref()).map(Ok)
    })
    .await
    .map_err(SaveError::Write)?
    .map_err(SaveError::Manifest)
}

/// The extents of the files that may have holes, read at the join, and what that cost.
/// Files that looked sparse after which, if fewer than one in a hundred had a hole, the join stops
/// looking: a filesystem that reports no allocated blocks (some FUSE and network ones), or
/// compresses, would otherwise cost an open and a lookup per file of the tree.
const GIVE_UP_AFTER: u64 = 1_000;

struct Sparse {
    /// The walk's options, until the source is opened (by the first file that may have holes:
    /// a run without one opens nothing more).
    scan: Option<ScanOptions>,
    beneath: Option<Beneath>,
    looked: u64,
    recorded: u64,
    took: std::time::Duration,
}

impl Sparse {
    fn open(scan: &Result<ScanOptions, crate::config::ConfigError>) -> Sparse {
        let scan = match scan {
            Ok(opts) => Some(opts.clone()),
            Err(e) => {
                tracing::debug!("no extents of sparse files this run: {e}");
                None
            }
        };
        Sparse {
            scan,
            beneath: None,
            looked: 0,
            recorded: 0,
            took: std::time::Duration::ZERO,
        }
    }

    /// The data extents of the file `e`, when it has a hole and is still the file whose bytes
    /// its record names (same size and mtime).
    fn read(&mut self, e: &Entry) -> Option<Vec<(u64, u64)>> {
        let started = std::time::Instant::now();
        if let Some(opts) = self.scan.take() {
            self.beneath = Beneath::open(opts)
                .map_err(|e| {
                    tracing::debug!("no extents of sparse files this run: the source: {e}");
                })
                .ok();
        }
        if self.looked >= GIVE_UP_AFTER && self.recorded * 100 < self.looked {
            if self.beneath.take().is_some() {
                tracing::debug!(
                    "{} of {} files whose blocks said they may have holes had one: no more \
                     extents are looked for this run (the source's filesystem does not report \
                     allocated blocks, or compresses)",
                    self.recorded,
                    self.looked
                );
            }
            return None;
        }
        let beneath = self.beneath.as_ref()?;
        self.looked += 1;
        let extents = extents_of(beneath, e);
        self.took += started.elapsed();
        self.recorded += u64::from(extents.is_some());
        extents
    }

    fn said(&self) {
        if self.looked > 0 {
            tracing::debug!(
                "extents of {} files that may have holes read in {:.3}s: {} recorded as sparse",
                self.looked,
                self.took.as_secs_f64(),
                self.recorded
            );
        }
    }
}

fn extents_of(beneath: &Beneath, e: &Entry) -> Option<Vec<(u64, u64)>> {
    let raw = keys::decode_raw_path(&e.path);
    let rel = Path::new(std::ffi::OsStr::from_bytes(&raw));
    let shown_path = || keys::shown(rel).to_string();
    let escaped = keys::relative_key(rel).1;
    let local = beneath
        .resolve(&raw, e.key.as_deref()?, escaped)
        .map_err(|why| tracing::debug!("{}: no extents: {why}", shown_path()))
        .ok()?;
    let (file, m) = crate::scan::open_entry(&local)
        .map_err(|why| tracing::debug!("{}: no extents: {why:?}", shown_path()))
        .ok()?;
    if (m.len(), fsutil::ns(m.mtime(), m.mtime_nsec())) != (e.size, e.mtime_ns) {
        tracing::debug!("{}: no extents: changed since its upload", shown_path());
        return None;
    }
    match sparse::data_extents(&file, m.len()) {
        Ok(Layout::Sparse(extents)) => Some(extents),
        Ok(Layout::TooMany) => {
            tracing::debug!(
                "{}: more than {} data extents: none recorded, it comes back without holes",
                shown_path(),
                sparse::MAX_EXTENTS
            );
            None
        }
        Ok(Layout::Dense | Layout::Unknown) => None,
        Err(why) => {
            tracing::debug!("{}: no extents: {why}", shown_path());
            None
        }
    }
}

/// Uploads `OUT_FILE` as snapshot `header.id`, unless its key is taken (one ListObjectsV2 with
/// the key as prefix): the full key and size.
async fn upload<S: ObjectStore>(
    store: Arc<S>,
    config: &Config,
    header: &Header,
    stop: Stop,
) -> Result<(String, u64), SaveError> {
    let prefix = config.destination.prefix.as_str();
    let key = snapshot::object_key(prefix, &header.id);
    let listed = store.list_page(&key, None, None).await?;
    if listed.objects.iter().any(|o| o.key.is_empty()) {
        return Err(SaveError::Exists(config.destination.bucket.0.clone(), key));
    }
    let path = config.state_dir.0.join(OUT_FILE);
    let m = std::fs::symlink_metadata(&path).map_err(SaveError::Write)?;
    let relative = key[prefix.len()..].to_owned();
    let entry = LocalEntry::from_metadata(relative, path, None, &m);
    let size = entry.size;
    let uploader = Uploader::new(
        store,
        Arc::new(Stats::default()),
        prefix.to_owned(),
        &crate::upload::own_objects(&config.transfer),
        stop,
    );
    match uploader.upload(entry, Reason::New).await? {
        Upload::Stored(..) => Ok((key, size)),
        Upload::Skipped(Skip::Error(_, why)) => Err(SaveError::Upload(why)),
        Upload::Skipped(Skip::Stopped) => Err(SaveError::Stopped),
        Upload::Skipped(Skip::Vanished) => Err(SaveError::Vanished),
        Upload::Skipped(Skip::Replaced(by)) => Err(SaveError::Replaced(by)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{MemoryStore, Object};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    fn entry(path: &str, kind: Kind, size: u64, mtime_ns: i64) -> Entry {
        let file = matches!(kind, Kind::File | Kind::Hardlink);
        Entry {
            path: path.into(),
            kind,
            mode: 0o100644,
            uid: 1,
            gid: 2,
            mtime_ns,
            size,
            key: file.then(|| path.to_owned()),
            sha256: None,
            version: None,
            stale: false,
            link: None,
            rdev: None,
            extents: None,
            xattrs: None,
            xattrs_dropped: false,
        }
    }

    fn walked(e: Entry) -> Walked {
        Walked {
            entry: e,
            linked: false,
            sparse: false,
        }
    }

    fn file(path: &str, size: u64, mtime_ns: i64) -> Walked {
        walked(entry(path, Kind::File, size, mtime_ns))
    }

    fn hardlink(path: &str, first: &str) -> Walked {
        let mut e = entry(path, Kind::Hardlink, 5, 50);
        e.link = Some(first.into());
        walked(e)
    }

    fn rec(key: &str, size: u64, mtime_ns: i64, sha: Option<u8>, v: Option<&str>) -> ManifestEntry {
        ManifestEntry {
            key: key.into(),
            size,
            mtime_ns,
            sha256: sha.map(|b| [b; 32]),
            version: v.map(str::to_owned),
        }
    }

    fn join(walk: Vec<Walked>, records: Vec<ManifestEntry>) -> Vec<Option<Entry>> {
        Join::new(walk.into_iter().map(Ok), records.into_iter())
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn extents_are_asked_for_only_for_files_that_may_have_holes_and_are_not_stale() {
        let sparse = |path: &str, mtime_ns: i64| Walked {
            sparse: true,
            ..file(path, 5, mtime_ns)
        };
        let walk = vec![file("a", 5, 50), sparse("b", 50), sparse("c", 50)];
        let records = vec![
            rec("a", 5, 50, Some(1), None),
            rec("b", 5, 50, Some(2), None),
            // The upload of c failed: its record is older bytes.
            rec("c", 5, 40, Some(3), None),
        ];
        let mut asked = Vec::new();
        let joined: Vec<Entry> = Join::new(walk.into_iter().map(Ok), records.into_iter())
            .with_extents(Box::new(|e| {
                asked.push(e.path.clone());
                Some(vec![(0, 1)])
            }))
            .map(|j| j.unwrap().unwrap())
            .collect();
        assert_eq!(asked, ["b"]);
        let extents: Vec<_> = joined.iter().map(|e| e.extents.clone()).collect();
        assert_eq!(extents, [None, Some(vec![(0, 1)]), None]);
    }

    #[test]
    fn the_join_reads_a_sparse_files_extents_beneath_the_source() {
        use std::io::{Seek, Write};
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        let mut f = std::fs::File::create(root.path().join("d/img")).unwrap();
        f.write_all(&[1; 4096]).unwrap();
        f.seek(io::SeekFrom::Start(16 << 20)).unwrap();
        f.write_all(&[2; 4096]).unwrap();
        drop(f);
        let m = std::fs::metadata(root.path().join("d/img")).unwrap();
        let local = LocalEntry::from_metadata("d/img".into(), root.path().join("d/img"), None, &m);
        assert!(local.may_have_holes(), "the test directory keeps no holes");
        let mut e = entry("d/img", Kind::File, m.len(), local.mtime_ns);
        let opts = ScanOptions {
            root: root.path().to_owned(),
            excludes: Arc::new(crate::config::Excludes::new(&[]).unwrap()),
            one_file_system: true,
            symlinks: crate::config::SymlinkPolicy::Skip,
            max_key_bytes: 1024,
            max_file_size: u64::MAX,
            walk_concurrency: 1,
            xattrs: false,
        };
        let mut sparse = Sparse::open(&Ok(opts));
        assert_eq!(sparse.read(&e), Some(vec![(0, 4096), (16 << 20, 4096)]));
        // Another mtime than its record's: not the bytes the record names.
        e.mtime_ns += 1;
        assert_eq!(sparse.read(&e), None);
        // Reached through a symlink on the way: not followed.
        std::os::unix::fs::symlink("d", root.path().join("l")).unwrap();
        let through = entry("l/img", Kind::File, m.len(), local.mtime_ns);
        assert_eq!(sparse.read(&through), None);
        assert_eq!((sparse.looked, sparse.recorded), (3, 1));
        // Past the give-up point with too few holes found: nothing more is opened.
        e.mtime_ns -= 1;
        sparse.looked = GIVE_UP_AFTER;
        assert_eq!(sparse.read(&e), None);
        sparse.looked = 0;
        assert_eq!(sparse.read(&e), None, "given up for the rest of the run");
    }

    #[test]
    fn a_file_takes_its_record_or_is_stale_or_absent() {
        let dir = walked(entry("a", Kind::Dir, 0, 9));
        let mut link = entry("a/l", Kind::Symlink, 0, 9);
        link.link = Some("%2Fetc".into());
        let walk = vec![
            dir.clone(),
            file("a/adopted", 3, 30),
            file("a/changed", 4, 41),
            file("a/new", 1, 10),
            file("a/same", 2, 20),
            walked(link.clone()),
        ];
        let records = vec![
            rec("a/adopted", 3, 30, None, None),
            rec("a/changed", 7, 40, Some(7), Some("v-old")),
            rec("a/deleted", 1, 1, Some(1), None),
            rec("a/same", 2, 20, Some(2), Some("v2")),
        ];
        let got = join(walk, records);
        let mut adopted = entry("a/adopted", Kind::File, 3, 30);
        adopted.sha256 = None;
        let mut stale = entry("a/changed", Kind::File, 7, 40);
        stale.sha256 = Some(hex::encode([7; 32]));
        stale.version = Some("v-old".into());
        stale.stale = true;
        let mut same = entry("a/same", Kind::File, 2, 20);
        same.sha256 = Some(hex::encode([2; 32]));
        same.version = Some("v2".into());
        assert_eq!(
            got,
            [
                Some(dir.entry),
                Some(adopted),
                Some(stale),
                None,
                Some(same),
                Some(link),
            ]
        );
    }

    #[test]
    fn a_hard_link_stands_in_for_its_absent_first_name() {
        let mut first = file("h1", 5, 50);
        first.linked = true;
        let walk = vec![
            first,
            hardlink("h2", "h1"),
            hardlink("h3", "h1"),
            file("k", 5, 50),
            hardlink("k2", "k"),
        ];
        let records = vec![
            rec("h2", 5, 50, Some(2), None),
            rec("h3", 5, 50, Some(3), None),
            rec("k", 5, 50, Some(4), None),
            rec("k2", 5, 50, Some(4), None),
        ];
        let got = join(walk, records);
        let kinds: Vec<_> = got
            .iter()
            .map(|j| match j {
                Some(e) => format!("{} {:?} {:?}", e.path, e.kind, e.link),
                None => "absent".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "absent",
                "h2 File None",
                "h3 Hardlink Some(\"h2\")",
                "k File None",
                "k2 Hardlink Some(\"k\")",
            ]
        );
        // A later name with no record of its own is absent too; the next one stands in.
        let mut first = file("h1", 5, 50);
        first.linked = true;
        let got = join(
            vec![first, hardlink("h2", "h1"), hardlink("h3", "h1")],
            vec![rec("h3", 5, 50, Some(3), None)],
        );
        assert_eq!(got[..2], [None, None]);
        assert!(matches!(&got[2], Some(e) if e.kind == Kind::File && e.link.is_none()));
    }

    fn local(root: &Path, rel: &str, nlink: u64) -> LocalEntry {
        LocalEntry {
            key: rel.into(),
            path: root.join(rel),
            raw_path: None,
            size: 3,
            mtime_ns: 7,
            mode: 0o100600,
            uid: 5,
            gid: 6,
            dev: 1,
            ino: 2,
            nlink,
            blocks: u64::MAX,
            xattrs: None,
            followed: false,
        }
    }

    fn tree_entry(rel: &[u8], mode: u32) -> TreeEntry {
        TreeEntry {
            key: String::from_utf8_lossy(rel).into_owned(),
            rel: PathBuf::from(OsStr::from_bytes(rel)),
            mode,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
            size: 4096,
            rdev: 0x0103,
            target: None,
            xattrs: None,
        }
    }

    #[test]
    fn every_kind_of_item_is_spooled_as_the_walk_saw_it() {
        let root = Path::new("/src");
        let mut link = tree_entry(b"l", 0o120777);
        link.target = Some(OsStr::from_bytes(b"/x\xff y").to_owned());
        let cases = [
            (Item::File(local(root, "f", 1)), Kind::File, None, false),
            (Item::File(local(root, "g", 2)), Kind::File, None, true),
            (
                Item::Hardlink {
                    entry: local(root, "h", 2),
                    first: "g".into(),
                },
                Kind::Hardlink,
                Some("g"),
                false,
            ),
            (
                Item::Dir(tree_entry(b"d\n", 0o40755)),
                Kind::Dir,
                None,
                false,
            ),
            (Item::Symlink(link), Kind::Symlink, Some("/x%FF%20y"), false),
            (
                Item::Special(tree_entry(b"p", 0o10644)),
                Kind::Fifo,
                None,
                false,
            ),
            (
                Item::Special(tree_entry(b"s", 0o140755)),
                Kind::Socket,
                None,
                false,
            ),
            (
                Item::Special(tree_entry(b"c", 0o20600)),
                Kind::Char,
                None,
                false,
            ),
            (
                Item::Special(tree_entry(b"b", 0o60600)),
                Kind::Block,
                None,
                false,
            ),
        ];
        for (item, kind, link, linked) in cases {
            let w = super::walked(root, &item);
            let e = &w.entry;
            assert_eq!(e.kind, kind, "{item:?}");
            assert_eq!(e.link.as_deref(), link, "{item:?}");
            assert_eq!(w.linked, linked, "{item:?}");
            let file = matches!(kind, Kind::File | Kind::Hardlink);
            assert_eq!(e.key.is_some(), file, "{item:?}");
            assert_eq!(e.size, if file { 3 } else { 0 }, "{item:?}");
            let device = matches!(kind, Kind::Char | Kind::Block);
            assert_eq!(e.rdev, device.then_some(0x0103), "{item:?}");
            assert!(!e.path.starts_with('/'), "relative: {item:?}");
        }
        let dir = super::walked(root, &Item::Dir(tree_entry(b"d\n", 0o40755)));
        assert_eq!(dir.entry.path, "d%0A");
        assert_eq!(dir.entry.mode, 0o40755);
    }

    #[test]
    fn a_spool_that_cannot_be_written_gives_up_and_the_walk_goes_on() {
        let root = Path::new("/src");
        let items = || {
            vec![
                Item::Dir(tree_entry(b"d", 0o40755)),
                Item::File(local(root, "d/f", 1)),
                Item::Special(tree_entry(b"d/p", 0o10644)),
                Item::File(local(root, "d/g", 1)),
            ]
        };
        let mut spool = Spool::with(Path::new("/state"), root, Some(Out::Failing));
        let files: Vec<_> = spool.files(items().into_iter()).map(|e| e.key).collect();
        assert_eq!(files, ["d/f", "d/g"]);
        // Buffered: the error comes out at the latest when the spool is finished.
        assert!(spool.finish().is_none(), "no snapshot");

        // A walk cut short (a stop, a fatal error) is no tree either, and leaves no file.
        let t = tempfile::tempdir().unwrap();
        let mut spool = Spool::start(t.path(), root);
        let first: Vec<_> = spool.files(items().into_iter()).take(1).collect();
        assert_eq!(first.len(), 1);
        assert!(spool.finish().is_none());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_run_s_tree_and_manifest_become_one_snapshot_in_the_bucket_never_overwritten() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path();
        let config = Config::parse(
            &format!(
                "source:\n  path: /src\ndestination:\n  bucket: b-1\n  prefix: p/\n\
                 state-dir: {}\n",
                state.display()
            ),
            Path::new("/etc/nightcopy/config.yaml"),
        )
        .unwrap();
        let root = Path::new("/src");
        let mut spool = Spool::start(state, root);
        let items = vec![
            Item::Dir(tree_entry(b"d", 0o40755)),
            Item::File(local(root, "d/f", 1)),
            Item::File(local(root, "d/lost", 1)),
            Item::Special(tree_entry(b"d/p", 0o10644)),
        ];
        let files: Vec<_> = spool.files(items.into_iter()).collect();
        assert_eq!(files.len(), 2);
        let whole = spool.finish().expect("the walk ended");
        let mut m = manifest::Writer::create(state, &config.destination_id()).unwrap();
        m.push(&rec("d/f", 3, 7, Some(9), Some("v9"))).unwrap();
        m.commit().unwrap();

        let store = Arc::new(MemoryStore::default());
        let saved = block_on(save(
            store.clone(),
            &config,
            whole,
            1_765_000_000,
            Stop::never(),
        ))
        .unwrap();
        assert_eq!(saved.key, snapshot::object_key("p/", &saved.header.id));
        // Named when it was made (now), so that ids sort as runs do.
        assert!(snapshot::is_id(&saved.header.id), "{}", saved.header.id);
        assert_eq!(saved.header.started, 1_765_000_000);
        let object = store.object(&saved.key).expect("uploaded");
        assert_eq!(object.body.len() as u64, saved.size);
        let expected = snapshot::Expected {
            destination: &config.destination_id(),
            key: None,
        };
        let mut r = snapshot::Reader::open(&object.body[..], &expected, snapshot::LIMITS).unwrap();
        let mut got = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            got.push((e.path, e.kind, e.sha256, e.version));
        }
        assert_eq!(
            got,
            [
                ("d".into(), Kind::Dir, None, None),
                (
                    "d/f".into(),
                    Kind::File,
                    Some(hex::encode([9; 32])),
                    Some("v9".into())
                ),
                ("d/p".into(), Kind::Fifo, None, None),
            ]
        );
        let h = &r.header;
        assert_eq!(
            (h.counts.files, h.counts.dirs, h.counts.specials),
            (1, 1, 1)
        );
        assert_eq!(h.counts.errors, 1, "the file never backed up");
        assert_eq!(h.source, "/src");
        assert!(h.ended >= h.started);
        let left: Vec<_> = std::fs::read_dir(state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [OsStr::new(manifest::FILE_NAME)],
            "spool and object removed"
        );

        // The key of a new snapshot is taken already: refused, nothing written over it.
        let taken = snapshot::object_key("p/", &saved.header.id);
        store.insert(&taken, Object::new(&b"other"[..], None));
        std::fs::write(state.join(OUT_FILE), b"x").unwrap();
        let err =
            block_on(upload(store.clone(), &config, &saved.header, Stop::never())).unwrap_err();
        assert!(matches!(err, SaveError::Exists(..)), "{err}");
        assert_eq!(&store.object(&taken).unwrap().body[..], b"other");
    }
}
