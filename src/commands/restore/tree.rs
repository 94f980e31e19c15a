//! Restore of a snapshot: the tree one completed run saw, from the bucket alone — which snapshot
//! the options name, and every path of it that is not a file's bytes (directories, symlinks, hard
//! links, FIFOs and, when asked, device nodes). Files themselves go through the same download,
//! check and rename as every restore (`super`), each fetched by the version the snapshot names.
//!
//! Three passes over the snapshot (a checked local copy, read as a stream each time, so memory
//! stays flat): first directories, symlinks and special files are made and the files downloaded;
//! then hard links are linked to their first name, which is on disk by then (or, where it is not,
//! their own key is downloaded instead); last, each directory gets its mode, owner and mtime —
//! after its contents, since creating them changed its mtime.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::select::{self, show_time};
use super::target::{NodeMeta, PlaceError, Target};
// Nothing from the restore command itself (`super`): what it needs from there comes in as the
// `Counter` trait, `Choice` and a job type built `From<FileJob>`; its errors go out as `Refusal`.
use crate::config::Config;
use crate::keys::{self, shown};
use crate::report::FileErrorKind;
use crate::snapshot::{self, Entry, Expected, Fetched, Kind};
use crate::sparse;
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use crate::xattrs;

/// Which snapshot the command line names.
pub struct Choice<'a> {
    pub include_deleted: bool,
    pub as_of_ns: Option<i64>,
    pub snapshot: Option<&'a str>,
}

/// Why a snapshot restore cannot go on.
#[derive(Debug)]
pub enum Refusal {
    /// The snapshot cannot be used (damaged, foreign, not authenticated, a bad id).
    Snapshot(String),
    /// `auth-key-file` cannot be read.
    Key(String),
    Store(StoreError),
}

/// A file of the snapshot to download.
#[derive(Debug)]
pub struct FileJob {
    pub key: String,
    pub size: u64,
    pub version_id: Option<String>,
    pub snap: SnapFile,
}

/// A file as a snapshot records it: the reference its bytes are checked against, and the
/// metadata it gets (the snapshot's, not the object's).
#[derive(Debug)]
pub struct SnapFile {
    pub rel: PathBuf,
    pub meta: ObjectMeta,
    pub sha256: Option<[u8; 32]>,
    /// No version named (an unversioned bucket): the object may have changed since.
    pub unversioned: bool,
    /// A sparse file's holes, from its checked extents (empty: none to punch).
    pub holes: Vec<(u64, u64)>,
    /// Extended attributes to set, checked (`xattrs::decode`).
    pub xattrs: Vec<xattrs::Attr>,
}

/// The restore's figures, as the passes count into them.
pub trait Counter: Send + Sync {
    fn listed(&self);
    fn file_error(&self, what: &str, kind: FileErrorKind, detail: &dyn std::fmt::Display);
    fn existing(&self, target: &Path, key: &str, bytes: u64, dry_run: bool);
    fn node_made(&self);
    fn not_created(&self, path: &Path, what: &str);
    /// A dry run's directory that would be made.
    fn dir_planned(&self);
}

/// What a restore restores from.
pub enum Source {
    /// The tree of one snapshot.
    Snapshot(Box<Fetched>),
    /// Every object under the path (`--include-deleted`, or a bucket without a snapshot for the
    /// time asked): the restore as it was before snapshots, with `--as-of` per key.
    Listing,
}

/// The snapshot the options name, fetched and checked whole; or the listing, and why (said in
/// the journal).
pub async fn choose<S: ObjectStore>(
    store: &S,
    config: &Config,
    opts: &Choice<'_>,
) -> Result<Source, Refusal> {
    if opts.include_deleted {
        tracing::info!(
            "--include-deleted: restoring every object under the path{}, files deleted before \
             included (not a tree that existed)",
            if opts.as_of_ns.is_some() {
                ", each as it was at the --as-of time"
            } else {
                ""
            }
        );
        return Ok(Source::Listing);
    }
    let prefix = config.destination.prefix.as_str();
    let auth = config.auth_key().map_err(|e| Refusal::Key(e.to_string()))?;
    let destination = config.destination_id();
    let expected = Expected {
        destination: &destination,
        key: auth.as_ref(),
    };
    let id = match opts.snapshot {
        Some(id) if !snapshot::is_id(id) => {
            return Err(Refusal::Snapshot(format!(
                "--snapshot {}: not a snapshot id (YYYYMMDDTHHMMSSZ-xxxxxxxx, as `nightcopy \
                 snapshots` lists them)",
                shown(id)
            )))
        }
        Some(id) => id.to_owned(),
        None => {
            let ids = snapshot::list(store, prefix)
                .await
                .map_err(|e| Refusal::Store(e.into_fatal()))?;
            let chosen = match opts.as_of_ns {
                None => ids.last().cloned(),
                Some(t) => as_of(store, prefix, &ids, t, &expected).await?,
            };
            match chosen {
                Some(id) => id,
                None => {
                    match opts.as_of_ns {
                        None => tracing::warn!(
                            "no snapshot under the prefix (its backups were made before \
                             nightcopy wrote snapshots): restoring every object under the path, \
                             which includes files deleted since"
                        ),
                        Some(t) => tracing::warn!(
                            "no snapshot had completed by {}{}: restoring each object as it was \
                             then (its version at that time), which includes files deleted \
                             before",
                            show_time(t),
                            match ids.first() {
                                Some(first) => format!(" (the oldest is {first})"),
                                None => String::new(),
                            }
                        ),
                    }
                    return Ok(Source::Listing);
                }
            }
        }
    };
    let fetched = snapshot::fetch(store, prefix, &id, &expected)
        .await
        .map_err(|e| match e {
            snapshot::FetchError::Store(e) => Refusal::Store(e.into_fatal()),
            other => Refusal::Snapshot(other.to_string()),
        })?;
    let h = &fetched.header;
    tracing::info!(
        snapshot = h.id,
        "restoring snapshot {} (the run of {} on {}, {} to {}): {} files ({}), {} directories, \
         {} symlinks, {} hard links",
        h.id,
        shown(std::ffi::OsStr::from_bytes(&keys::decode_raw_path(
            &h.source
        ))),
        shown(&h.host),
        show_time(h.started as i64 * 1_000_000_000),
        show_time(h.ended as i64 * 1_000_000_000),
        h.counts.files,
        bytesize::ByteSize(h.counts.bytes).display().iec(),
        h.counts.dirs,
        h.counts.symlinks,
        h.counts.hardlinks,
    );
    Ok(Source::Snapshot(Box::new(fetched)))
}

/// The newest snapshot whose run had ended by `t` (ns). Ids sort as runs do and name when each
/// snapshot was made (at its run's end), so only those made by `t` are read, newest first, and
/// only their headers.
async fn as_of<S: ObjectStore>(
    store: &S,
    prefix: &str,
    ids: &[String],
    t: i64,
    expected: &Expected<'_>,
) -> Result<Option<String>, Refusal> {
    let secs = t.div_euclid(1_000_000_000);
    for id in ids.iter().rev() {
        if made_of(id).is_some_and(|s| s > secs) {
            continue;
        }
        let h = snapshot::fetch_header(store, prefix, id, expected)
            .await
            .map_err(|e| match e {
                snapshot::FetchError::Store(e) => Refusal::Store(e.into_fatal()),
                other => Refusal::Snapshot(format!(
                    "{other}; name another with --snapshot, or use --include-deleted"
                )),
            })?;
        if (h.ended as i64) <= secs {
            return Ok(Some(id.clone()));
        }
    }
    Ok(None)
}

/// When a snapshot was made, from its id (UTC seconds).
fn made_of(id: &str) -> Option<i64> {
    let t = format!(
        "{}-{}-{}T{}:{}:{}Z",
        id.get(0..4)?,
        id.get(4..6)?,
        id.get(6..8)?,
        id.get(9..11)?,
        id.get(11..13)?,
        id.get(13..15)?
    );
    let at = humantime::parse_rfc3339(&t).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}

/// The entry's key (where it sorts, and what `--path` is matched against) and its path below the
/// target, checked: a path of plain components only. `None` after counting a bad one.
fn place_of(e: &Entry, stats: Option<&dyn Counter>) -> Option<(String, PathBuf)> {
    let raw = keys::decode_raw_path(&e.path);
    let shown_raw = String::from_utf8_lossy(&raw).into_owned();
    let rel = match select::checked(&raw, &shown_raw) {
        Ok(rel) => rel,
        Err(why) => {
            if let Some(stats) = stats {
                stats.file_error(&shown_raw, FileErrorKind::BadName, &why);
            }
            return None;
        }
    };
    let key = match (&e.key, e.kind) {
        (Some(k), Kind::File | Kind::Hardlink) => k.clone(),
        (_, Kind::Dir) => format!("{}/", keys::relative_key(&rel).0),
        _ => keys::relative_key(&rel).0,
    };
    Some((key, rel))
}

fn hex32(s: Option<&str>) -> Option<[u8; 32]> {
    hex::decode(s?).ok()?.try_into().ok()
}

/// A file entry as a download job.
fn job(e: &Entry, key: String, rel: PathBuf) -> FileJob {
    FileJob {
        key,
        size: e.size,
        version_id: e.version.clone(),
        snap: SnapFile {
            meta: ObjectMeta {
                mtime_ns: e.mtime_ns,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                raw_path: None,
            },
            sha256: hex32(e.sha256.as_deref()),
            unversioned: e.version.is_none(),
            holes: holes_of(e, &rel),
            xattrs: e
                .xattrs
                .as_deref()
                .map(|x| xattrs::decode(x, &rel))
                .unwrap_or_default(),
            rel,
        },
    }
}

/// The holes of a file entry's recorded extents, when they pass `sparse::check`: whoever can
/// write the prefix can write them. Extents that do not are ignored with a warning (the file
/// comes back whole, without holes).
fn holes_of(e: &Entry, rel: &Path) -> Vec<(u64, u64)> {
    let Some(extents) = &e.extents else {
        return Vec::new();
    };
    match sparse::check(extents, e.size) {
        Ok(()) => sparse::holes(extents, e.size),
        Err(why) => {
            tracing::warn!(
                "{}: the snapshot's extents of it are not used ({why}): it comes back without                  holes",
                shown(rel)
            );
            Vec::new()
        }
    }
}

/// What the passes need besides the snapshot.
pub struct Pass {
    pub stats: Arc<dyn Counter>,
    /// `None` only in a dry run whose `--to` does not exist yet.
    pub target: Option<Arc<Target>>,
    pub to: PathBuf,
    pub sub: String,
    pub dry_run: bool,
    pub overwrite: bool,
    pub as_root: bool,
    pub devices: bool,
    pub next_tmp: Arc<std::sync::atomic::AtomicU64>,
}

impl Pass {
    fn tmp(&self) -> OsString {
        select::temp_name(self.next_tmp.fetch_add(1, Relaxed))
    }

    fn node_meta(&self, e: &Entry) -> NodeMeta {
        NodeMeta {
            uid: e.uid,
            gid: e.gid,
            mtime_ns: e.mtime_ns,
            chown: self.as_root,
        }
    }

    /// Every entry of the snapshot under `--path`, read on this (blocking) thread. A path that
    /// cannot be one below the target is counted by the first pass only.
    fn each(
        &self,
        fetched: &Fetched,
        first: bool,
        mut f: impl FnMut(&Entry, String, PathBuf) -> bool,
    ) -> Result<(), Refusal> {
        let mut r = fetched
            .entries()
            .map_err(|e| Refusal::Snapshot(e.to_string()))?;
        while let Some(e) = r
            .next_entry()
            .map_err(|e| Refusal::Snapshot(e.to_string()))?
        {
            let Some((key, rel)) = place_of(&e, first.then_some(&*self.stats)) else {
                continue;
            };
            if !keys::in_subpath(&key, &self.sub) {
                continue;
            }
            if !f(&e, key, rel) {
                break;
            }
        }
        Ok(())
    }

    /// First pass: directories, symlinks and special files made here; files sent as jobs.
    pub fn first<J: From<FileJob>>(
        &self,
        fetched: &Fetched,
        jobs: &mpsc::Sender<Result<J, StoreError>>,
    ) -> Result<(), Refusal> {
        self.each(fetched, true, |e, key, rel| {
            match e.kind {
                Kind::File => {
                    self.stats.listed();
                    return jobs.blocking_send(Ok(job(e, key, rel).into())).is_ok();
                }
                Kind::Hardlink => {}
                Kind::Dir => self.dir(&rel),
                Kind::Symlink | Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {
                    self.node(e, &rel)
                }
            }
            true
        })
    }

    fn dir(&self, rel: &Path) {
        if self.dry_run {
            self.stats.dir_planned();
            return;
        }
        // Made (and counted) by the target, and kept open for the files that follow it.
        let target = self.target.as_ref().expect("only a dry run has no target");
        if let Err(e) = target.dir(rel, true) {
            self.local_error(rel, &e);
        }
    }

    fn local_error(&self, rel: &Path, e: &dyn std::fmt::Display) {
        self.stats.file_error(
            &self.to.join(rel).display().to_string(),
            FileErrorKind::Write,
            e,
        );
    }

    /// A symlink, FIFO, socket or device node.
    fn node(&self, e: &Entry, rel: &Path) {
        use nix::sys::stat::SFlag;
        let shown_path = self.to.join(rel);
        let kind = match e.kind {
            Kind::Symlink => None,
            Kind::Fifo => Some(SFlag::S_IFIFO),
            Kind::Char | Kind::Block if !(self.devices && self.as_root) => {
                self.stats.not_created(
                    &shown_path,
                    "a device node (restored only with --devices, as root)",
                );
                return;
            }
            Kind::Char => Some(SFlag::S_IFCHR),
            Kind::Block => Some(SFlag::S_IFBLK),
            Kind::Socket => {
                self.stats.not_created(
                    &shown_path,
                    "a socket (the program that listens on it makes it again)",
                );
                return;
            }
            Kind::File | Kind::Dir | Kind::Hardlink => unreachable!("not a node"),
        };
        if self.dry_run {
            println!("{}\t{}", kind_name(e.kind), shown(&shown_path));
            self.stats.node_made();
            return;
        }
        let target = self.target.as_ref().expect("only a dry run has no target");
        let dir = match target.parent_of(rel, true) {
            Ok(d) => d.expect("created"),
            Err(err) => return self.local_error(rel, &err),
        };
        let name = name_of(rel);
        let meta = self.node_meta(e);
        let made = match kind {
            None => {
                let Some(link) = &e.link else {
                    return self.local_error(rel, &"a symlink without a target in the snapshot");
                };
                let to = OsString::from_vec(keys::decode_raw_path(link));
                dir.symlink(&self.tmp(), name, &to, &meta, self.overwrite)
            }
            Some(kind) => {
                let perm = e.mode & 0o777;
                let rdev = e.rdev.unwrap_or(0);
                dir.node(&self.tmp(), name, (kind, perm, rdev), &meta, self.overwrite)
            }
        };
        match made {
            Ok(()) => self.stats.node_made(),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                self.stats.existing(&shown_path, &e.path, 0, false)
            }
            Err(err) => self.local_error(rel, &err),
        }
    }

    /// Second pass: hard links to their first name; a link whose first name is not there (not
    /// restored, outside `--path`) becomes a download of its own key, sent to `jobs`.
    pub fn links<J: From<FileJob>>(
        &self,
        fetched: &Fetched,
        jobs: &mpsc::Sender<Result<J, StoreError>>,
    ) -> Result<(), Refusal> {
        self.each(fetched, false, |e, key, rel| {
            if e.kind != Kind::Hardlink {
                return true;
            }
            match self.link(e, &rel) {
                Ok(true) => true,
                Ok(false) => {
                    self.stats.listed();
                    jobs.blocking_send(Ok(job(e, key, rel).into())).is_ok()
                }
                Err(err) => {
                    self.local_error(&rel, &err);
                    true
                }
            }
        })
    }

    /// `Ok(false)`: the first name is not there to link to.
    fn link(&self, e: &Entry, rel: &Path) -> Result<bool, PlaceError> {
        let Some(first) = e.link.as_deref() else {
            return Ok(false);
        };
        let first_raw = keys::decode_raw_path(first);
        let Ok(first_rel) = select::checked(&first_raw, first) else {
            return Ok(false);
        };
        let shown_path = self.to.join(rel);
        if self.dry_run {
            println!(
                "link\t{}\t{}",
                shown(&self.to.join(&first_rel)),
                shown(&shown_path)
            );
            self.stats.node_made();
            return Ok(true);
        }
        let target = self.target.as_ref().expect("only a dry run has no target");
        let Some(from) = target.parent_of(&first_rel, false)? else {
            return Ok(false);
        };
        let here = target.parent_of(rel, true)?.expect("created");
        match here.link_from(&from, name_of(&first_rel), name_of(rel)) {
            Ok(()) => {
                self.stats.node_made();
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                self.stats.existing(&shown_path, &e.path, e.size, false);
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            // Another filesystem below the target, or one without hard links: a copy instead.
            Err(err) => {
                tracing::debug!(
                    "{}: cannot link to {} ({err}): downloaded instead",
                    shown(&shown_path),
                    shown(&first_rel)
                );
                Ok(false)
            }
        }
    }

    /// Last pass: each directory's mode, owner and mtime, now that its contents are made.
    pub fn dir_meta(&self, fetched: &Fetched) -> Result<(), Refusal> {
        if self.dry_run {
            return Ok(());
        }
        let target = self.target.as_ref().expect("only a dry run has no target");
        self.each(fetched, false, |e, _key, rel| {
            if e.kind != Kind::Dir {
                return true;
            }
            let set = target
                .parent_of(&rel, false)
                .and_then(|d| match d {
                    Some(d) => d.open_dir(name_of(&rel)).map(Some),
                    None => Ok(None),
                })
                .and_then(|f| match f {
                    Some(f) => set_dir_meta(&f, e, self.as_root, &self.to.join(&rel))
                        .map_err(|err| PlaceError::Io(self.to.join(&rel), err)),
                    None => Ok(()),
                });
            match set {
                // Said by the first pass, which could not make it.
                Err(PlaceError::NotADirectory(_)) | Ok(()) => {}
                Err(err) => self.local_error(&rel, &err),
            }
            true
        })
    }
}

fn name_of(rel: &Path) -> &std::ffi::OsStr {
    rel.file_name().expect("a checked path has a name")
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Hardlink => "link",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::Char => "char-device",
        Kind::Block => "block-device",
    }
}

/// Extended attributes (ACLs among them, before the mode they touch), owner (as root), mode,
/// mtime, on the open directory. A directory's set-group-ID bit is kept: on a directory it only
/// makes new files inherit its group.
fn set_dir_meta(f: &std::fs::File, e: &Entry, as_root: bool, at: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(x) = &e.xattrs {
        xattrs::set(f, &xattrs::decode(x, at), at);
    }
    if as_root {
        nix::unistd::fchown(
            f,
            Some(nix::unistd::Uid::from_raw(e.uid)),
            Some(nix::unistd::Gid::from_raw(e.gid)),
        )?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(e.mode & 0o3777))?;
    f.set_times(std::fs::FileTimes::new().set_modified(crate::fsutil::system_time(e.mtime_ns)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_id_gives_its_start() {
        assert_eq!(made_of("20261206T020000Z-0a1b2c3d"), Some(1_796_522_400));
        assert_eq!(made_of("x"), None);
    }

    #[test]
    fn a_files_holes_come_from_its_extents_only_when_they_pass_the_checks() {
        let entry = |extents: Option<Vec<(u64, u64)>>| Entry {
            path: "img".into(),
            kind: Kind::File,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 100,
            key: Some("img".into()),
            sha256: None,
            version: None,
            stale: false,
            link: None,
            rdev: None,
            extents,
            xattrs: None,
            xattrs_dropped: false,
        };
        let rel = Path::new("img");
        assert_eq!(
            holes_of(&entry(Some(vec![(10, 10), (50, 10)])), rel),
            [(0, 10), (20, 30), (60, 40)]
        );
        assert_eq!(holes_of(&entry(None), rel), []);
        // Past the end, overlapping, unsorted: ignored (with a warning), the file comes whole.
        for bad in [
            vec![(90, 20)],
            vec![(0, 10), (5, 10)],
            vec![(50, 1), (10, 1)],
        ] {
            assert_eq!(holes_of(&entry(Some(bad.clone())), rel), [], "{bad:?}");
        }
    }
}
