//! Holes of sparse files: read from a source file at the end of a run (for the snapshot), and
//! made again in a restored one.
//!
//! A snapshot entry records a sparse file's data extents (offset, length), never its holes:
//! whatever is not data reads as zeros. They are read with `lseek(SEEK_DATA/SEEK_HOLE)` on the
//! open file — a call per extent, paid only for files whose stat says fewer blocks are
//! allocated than their size needs (`scan::LocalEntry::may_have_holes`), so the walk itself
//! pays nothing. A filesystem without SEEK_DATA answers with the whole file as data (Linux's
//! generic implementation) or EINVAL/EOPNOTSUPP: no extents either way.
//!
//! On restore the bytes are written whole, hashed and checked, and only then are the holes
//! punched (`fallocate(PUNCH_HOLE|KEEP_SIZE)`) — and only those ranges that the written bytes
//! show to be zeros ([`ZeroCheck`]). The extents come from the bucket, which anyone who can
//! write the prefix can write: checked first ([`check`]), and even extents that pass cannot make
//! a restored file read differently from the bytes that were checked, only less sparse.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Extents recorded per file at most: past this, none (the file comes back whole, not sparse).
/// It keeps an entry within the snapshot reader's line limit (`snapshot::LIMITS`): a file is at
/// most 5 TiB (S3's largest object), so an offset and a length have at most 13 digits each, 30
/// bytes an extent in JSON, 60 KiB for 2,048 — leaving the rest of the 128 KiB line to the path,
/// the key and the extended attributes (a unit test checks the worst case).
pub const MAX_EXTENTS: usize = 2_048;

/// What the data extents of a file are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Data extents, sorted, with at least one hole between, before or after them.
    Sparse(Vec<(u64, u64)>),
    /// No hole: the file is data from start to end (or the filesystem says it is).
    Dense,
    /// The filesystem does not say (SEEK_DATA unsupported).
    Unknown,
    /// More than `MAX_EXTENTS`.
    TooMany,
}

/// The data extents of the open `file` of `size` bytes.
pub fn data_extents(file: &File, size: u64) -> io::Result<Layout> {
    use rustix::fs::{seek, SeekFrom};
    use rustix::io::Errno;
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data at or after `at`: the rest is a hole (also past a shrunk end).
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(Layout::Unknown),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(Errno::NXIO) => size,
            Err(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(Layout::Unknown),
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            // Data where a hole was just found: the file changes under us.
            return Ok(Layout::Unknown);
        }
        if extents.len() == MAX_EXTENTS {
            return Ok(Layout::TooMany);
        }
        extents.push((data, hole - data));
        at = hole;
    }
    Ok(match extents.as_slice() {
        [(0, len)] if *len == size => Layout::Dense,
        _ if size == 0 => Layout::Dense,
        _ => Layout::Sparse(extents),
    })
}

/// Why recorded extents are not used.
pub fn check(extents: &[(u64, u64)], size: u64) -> Result<(), String> {
    if extents.len() > MAX_EXTENTS {
        return Err(format!(
            "{} extents, more than {MAX_EXTENTS}",
            extents.len()
        ));
    }
    let mut end = 0u64;
    for (i, &(offset, len)) in extents.iter().enumerate() {
        if len == 0 {
            return Err(format!("extent {i} is empty"));
        }
        if offset < end {
            return Err(format!("extent {i} overlaps or precedes the one before"));
        }
        end = match offset.checked_add(len) {
            Some(e) if e <= size => e,
            _ => return Err(format!("extent {i} ends past the file's {size} bytes")),
        };
    }
    Ok(())
}

/// The holes between checked `extents` of a file of `size` bytes.
pub fn holes(extents: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut holes = Vec::with_capacity(extents.len() + 1);
    let mut at = 0;
    for &(offset, len) in extents {
        if offset > at {
            holes.push((at, offset - at));
        }
        at = offset + len;
    }
    if size > at {
        holes.push((at, size - at));
    }
    holes
}

/// Which of the holes the written bytes left all zeros, told as the bytes go by in order.
#[derive(Debug)]
pub struct ZeroCheck {
    holes: Vec<(u64, u64)>,
    zero: Vec<bool>,
    /// The first hole that may still meet the next bytes.
    next: usize,
    at: u64,
}

impl ZeroCheck {
    pub fn new(holes: Vec<(u64, u64)>) -> ZeroCheck {
        let zero = vec![true; holes.len()];
        ZeroCheck {
            holes,
            zero,
            next: 0,
            at: 0,
        }
    }

    /// The next bytes of the file.
    pub fn update(&mut self, bytes: &[u8]) {
        let (start, end) = (self.at, self.at + bytes.len() as u64);
        self.at = end;
        while let Some(&(offset, len)) = self.holes.get(self.next) {
            if offset >= end {
                break;
            }
            let (from, to) = (offset.max(start), (offset + len).min(end));
            if from < to {
                let part = &bytes[(from - start) as usize..(to - start) as usize];
                if self.zero[self.next] && part.iter().any(|&b| b != 0) {
                    self.zero[self.next] = false;
                }
            }
            if offset + len > end {
                break;
            }
            self.next += 1;
        }
    }

    /// The holes whose every byte came by and was zero.
    pub fn zero_holes(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.holes
            .iter()
            .zip(&self.zero)
            .filter(|&(&(offset, len), &zero)| zero && offset + len <= self.at)
            .map(|(&h, _)| h)
    }
}

/// Said once per process: the target's filesystem cannot punch holes.
static CANNOT_PUNCH: AtomicBool = AtomicBool::new(false);

/// Punches `holes` into `file`, keeping its size. A filesystem that cannot (or any other
/// refusal) leaves the file as written — its bytes are right, only not sparse — and is said once
/// at debug, never counted as an error. The number of holes punched.
pub fn punch(file: &File, holes: impl Iterator<Item = (u64, u64)>) -> usize {
    use rustix::fs::{fallocate, FallocateFlags};
    let mut punched = 0;
    for (offset, len) in holes {
        match fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => punched += 1,
            Err(e) => {
                if !CANNOT_PUNCH.swap(true, Relaxed) {
                    tracing::debug!(
                        "the restore's filesystem does not punch holes ({e}): sparse files come \
                         back at full size, their bytes unchanged"
                    );
                }
                break;
            }
        }
    }
    punched
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A file of 1 MiB of data, `hole` bytes of hole, 1 MiB of data (and a trailing hole of
    /// `tail` bytes, made by `set_len`).
    fn sparse_file(hole: u64, tail: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data = vec![7u8; MIB as usize];
        f.write_all(&data).unwrap();
        f.seek(SeekFrom::Current(hole as i64)).unwrap();
        f.write_all(&data).unwrap();
        f.as_file().set_len(2 * MIB + hole + tail).unwrap();
        f.as_file().sync_all().unwrap();
        f
    }

    /// Whether the test's filesystem keeps holes at all (one that does not fails the tests
    /// that need it, loudly: they must not pass by reading a dense file).
    fn keeps_holes(f: &File) -> bool {
        let m = f.metadata().unwrap();
        m.blocks() * 512 < m.size()
    }

    #[test]
    fn the_data_extents_of_a_file_with_holes_are_read() {
        let f = sparse_file(64 * MIB, 8 * MIB);
        assert!(
            keeps_holes(f.as_file()),
            "the test directory keeps no holes"
        );
        let size = f.as_file().metadata().unwrap().len();
        assert_eq!(
            data_extents(f.as_file(), size).unwrap(),
            Layout::Sparse(vec![(0, MIB), (65 * MIB, MIB)])
        );
        // A file with no hole, and an empty one.
        let dense = sparse_file(0, 0);
        assert_eq!(
            data_extents(dense.as_file(), 2 * MIB).unwrap(),
            Layout::Dense
        );
        assert_eq!(data_extents(dense.as_file(), 0).unwrap(), Layout::Dense);
        // All hole.
        let empty = tempfile::NamedTempFile::new().unwrap();
        empty.as_file().set_len(5 * MIB).unwrap();
        assert_eq!(
            data_extents(empty.as_file(), 5 * MIB).unwrap(),
            Layout::Sparse(vec![])
        );
    }

    #[test]
    fn more_extents_than_the_bound_record_none() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for i in 0..=MAX_EXTENTS as u64 {
            f.seek(SeekFrom::Start(i * 2 * MIB)).unwrap();
            f.write_all(b"x").unwrap();
        }
        let size = f.as_file().metadata().unwrap().len();
        assert!(
            keeps_holes(f.as_file()),
            "the test directory keeps no holes"
        );
        assert_eq!(data_extents(f.as_file(), size).unwrap(), Layout::TooMany);
    }

    #[test]
    fn an_entry_with_the_most_extents_fits_a_snapshot_line() {
        use base64::Engine;
        // The longest numbers a file of S3's largest object size has, the longest key (every
        // byte escaped in JSON) and path (every byte percent-encoded), and attributes up to
        // the bound.
        let big = 5u64 << 40;
        let entry = crate::snapshot::Entry {
            path: "%01".repeat(1024),
            kind: crate::snapshot::Kind::File,
            mode: 0o100644,
            uid: u32::MAX,
            gid: u32::MAX,
            mtime_ns: i64::MIN,
            size: big,
            key: Some("\"".repeat(1024)),
            sha256: Some("f".repeat(64)),
            version: Some("v".repeat(1024)),
            stale: true,
            link: None,
            rdev: None,
            extents: Some(vec![(big - 1, big - 1); MAX_EXTENTS]),
            xattrs: Some(vec![(
                "user.a".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(vec![0u8; crate::snapshot::MAX_XATTR_BYTES]),
            )]),
            xattrs_dropped: false,
        };
        let line = serde_json::to_vec(&entry).unwrap();
        assert!(
            line.len() < crate::snapshot::LIMITS.line,
            "{} bytes",
            line.len()
        );
    }

    #[test]
    fn recorded_extents_are_checked() {
        type Case<'a> = (&'a [(u64, u64)], u64, bool);
        let cases: &[Case] = &[
            (&[], 10, true),
            (&[(0, 5)], 10, true),
            (&[(0, 5), (5, 5)], 10, true),
            (&[(2, 3), (7, 1)], 10, true),
            (&[(0, 0)], 10, false),
            (&[(5, 2), (0, 2)], 10, false),
            (&[(0, 5), (4, 2)], 10, false),
            (&[(8, 3)], 10, false),
            (&[(u64::MAX, 2)], u64::MAX, false),
        ];
        for (extents, size, ok) in cases {
            assert_eq!(check(extents, *size).is_ok(), *ok, "{extents:?} of {size}");
        }
        let many = vec![(0, 1); MAX_EXTENTS + 1];
        assert!(check(&many, u64::MAX).is_err());
        assert_eq!(holes(&[(2, 3), (7, 1)], 10), [(0, 2), (5, 2), (8, 2)]);
        assert_eq!(holes(&[(0, 10)], 10), []);
        assert_eq!(holes(&[], 10), [(0, 10)]);
    }

    #[test]
    fn only_holes_that_were_written_as_zeros_are_punched() {
        let mut c = ZeroCheck::new(vec![(2, 3), (6, 4), (12, 2)]);
        // In chunks that cut across the holes: bytes 7 and 12.. are not zero.
        for chunk in [&[1u8, 1, 0][..], &[0, 0, 1, 0], &[1, 0, 0, 1], &[0, 5, 0]] {
            c.update(chunk);
        }
        assert_eq!(c.zero_holes().collect::<Vec<_>>(), [(2, 3)]);
        // A hole the bytes did not reach is not punched either.
        let mut short = ZeroCheck::new(vec![(0, 4)]);
        short.update(&[0, 0]);
        assert_eq!(short.zero_holes().count(), 0);
    }

    #[test]
    fn holes_are_punched_and_the_bytes_stay() {
        let f = sparse_file(0, 0);
        let mut written = Vec::new();
        std::io::Read::read_to_end(&mut f.reopen().unwrap(), &mut written).unwrap();
        // Zeros written over the second MiB's first half, then punched.
        let mut file = f.reopen().unwrap();
        file.seek(SeekFrom::Start(MIB)).unwrap();
        file.write_all(&vec![0u8; (MIB / 2) as usize]).unwrap();
        written[MIB as usize..(MIB + MIB / 2) as usize].fill(0);
        let before = file.metadata().unwrap().blocks();
        assert_eq!(punch(&file, [(MIB, MIB / 2)].into_iter()), 1);
        let after = file.metadata().unwrap();
        assert_eq!(after.len(), 2 * MIB);
        assert!(
            after.blocks() * 512 <= before * 512 - MIB / 2,
            "{before} blocks before, {} after",
            after.blocks()
        );
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut f.reopen().unwrap(), &mut read).unwrap();
        assert!(read == written, "the bytes changed");
    }
}
