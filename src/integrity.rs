//! Integrity of backed-up bytes: what they are checked against, and the hashing that checks them
//! as they stream by — shared by restore (downloads) and verify (downloads and local re-reads).
//!
//! Three references can exist for one object, and each is used only when it really describes the
//! bytes at hand:
//! - the **manifest's SHA-256**, recorded from the bytes nightcopy read at upload: used when the
//!   manifest entry describes this very object (same size, and the object's `nightcopy-mtime-ns`
//!   equals the entry's mtime — an object uploaded after the manifest was written, by a run that
//!   then failed, has another mtime and is not judged against a stale hash);
//! - the object's **full-object `x-amz-checksum-sha256`** (single PUT): S3 verified it against the
//!   body at upload, so it is the SHA-256 of the object's bytes;
//! - a multipart object's **composite checksum** `base64(SHA-256(SHA-256(part 1) ‖ …))-N`:
//!   recomputed here from the bytes when the part boundaries are known (every part but the last of
//!   the first part's size, as nightcopy uploads them). If the parts were cut otherwise, it cannot
//!   be recomputed and is not used.
//!
//! A file none of them covers is *unverified*: counted and named, never called corrupt.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::state::manifest::ManifestEntry;
use crate::store::{HeadInfo, ObjectMeta, PartLayout};

/// The checksum an object carries, as S3 reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    None,
    /// The SHA-256 of the whole object (a single PUT).
    Full([u8; 32]),
    /// A multipart object's checksum of its part checksums, and the part count.
    Composite {
        digest: [u8; 32],
        parts: u32,
    },
}

impl Stored {
    /// Parses S3's `x-amz-checksum-sha256` value: base64, with `-N` for a composite.
    pub fn parse(value: Option<&str>) -> Stored {
        let Some(value) = value else {
            return Stored::None;
        };
        let decode = |b: &str| -> Option<[u8; 32]> {
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .ok()?
                .try_into()
                .ok()
        };
        match value.rsplit_once('-') {
            Some((b, n)) => match (decode(b), n.parse()) {
                (Some(digest), Ok(parts)) if parts > 0 => Stored::Composite { digest, parts },
                _ => Stored::None,
            },
            None => decode(value).map_or(Stored::None, Stored::Full),
        }
    }

    pub fn is_composite(&self) -> bool {
        matches!(self, Stored::Composite { .. })
    }
}

/// Everything one object's bytes can be judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference {
    pub manifest: Option<[u8; 32]>,
    pub stored: Stored,
    /// The object's ETag as an MD5 — used only when nothing else covers the object (one
    /// uploaded by another tool, rclone say, that sent no SHA-256): see [`Reference::new`].
    pub md5: Option<[u8; 16]>,
}

impl Reference {
    /// The references for an object; its ETag's MD5 is kept only when no SHA-256 covers it.
    pub fn new(manifest: Option<[u8; 32]>, stored: Stored, etag_md5: Option<[u8; 16]>) -> Self {
        let md5 = etag_md5.filter(|_| manifest.is_none() && stored == Stored::None);
        Reference {
            manifest,
            stored,
            md5,
        }
    }
}

/// The manifest's SHA-256 for an object, when the entry describes that object (see the module
/// comment). `meta` is the object's metadata; without nightcopy's metadata only the size can
/// bind, which is not enough to trust a hash against it.
pub fn manifest_sha(
    entry: Option<&ManifestEntry>,
    size: u64,
    meta: Option<&ObjectMeta>,
) -> Option<[u8; 32]> {
    let entry = entry?;
    let meta = meta?;
    (entry.size == size && entry.mtime_ns == meta.mtime_ns)
        .then_some(entry.sha256)
        .flatten()
}

/// How an object differs from what a worker reported storing (a distributed run's coordinator
/// records a worker's upload only once the object itself agrees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAsReported {
    #[error("the bucket has no object at its key")]
    Missing,
    #[error("the object holds {object} bytes, and the report says {reported}")]
    Size { object: u64, reported: u64 },
    #[error("the object's nightcopy-mtime-ns is {object:?}, and the report says {reported}")]
    Mtime { object: Option<i64>, reported: i64 },
    #[error("the object's SHA-256 checksum is not the one reported")]
    Checksum,
    #[error("the object was stored in parts and the report gives no composite checksum")]
    NoComposite,
}

/// How far an object could be held to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Size, mtime and S3's stored SHA-256 checksum (whole, or composite for parts).
    Checksum,
    /// Size and mtime: the server returned no checksum for the object.
    SizeAndMtime,
}

/// Whether `head` is the object a report describes: `size`, `mtime_ns`, and its SHA-256 (`sha256`
/// for a single PUT, `composite` for a multipart object), hex as the report carries them.
pub fn hold_to_report(
    head: Option<&HeadInfo>,
    size: u64,
    mtime_ns: i64,
    sha256: Option<&str>,
    composite: Option<&str>,
) -> Result<Held, NotAsReported> {
    let head = head.ok_or(NotAsReported::Missing)?;
    if head.size != size {
        return Err(NotAsReported::Size {
            object: head.size,
            reported: size,
        });
    }
    let object_mtime = head
        .meta
        .get(crate::store::META_MTIME)
        .and_then(|v| v.parse().ok());
    if object_mtime != Some(mtime_ns) {
        return Err(NotAsReported::Mtime {
            object: object_mtime,
            reported: mtime_ns,
        });
    }
    let hex32 = |h: Option<&str>| -> Option<[u8; 32]> { hex::decode(h?).ok()?.try_into().ok() };
    match Stored::parse(head.checksum_sha256.as_deref()) {
        Stored::None => Ok(Held::SizeAndMtime),
        Stored::Full(digest) if hex32(sha256) == Some(digest) => Ok(Held::Checksum),
        Stored::Full(_) => Err(NotAsReported::Checksum),
        Stored::Composite { digest, .. } => match hex32(composite) {
            None => Err(NotAsReported::NoComposite),
            Some(c) if c == digest => Ok(Held::Checksum),
            Some(_) => Err(NotAsReported::Checksum),
        },
    }
}

/// The composite checksum S3 computes for a multipart object from its parts' SHA-256s, in order.
pub fn composite_of<'a>(parts: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut outer = Sha256::new();
    for p in parts {
        outer.update(p);
    }
    outer.finalize().into()
}

/// Hashes bytes as they go by: the whole SHA-256 always, and the composite when a part layout is
/// given that describes an object of this size.
pub struct StreamHasher {
    whole: Sha256,
    composite: Option<CompositeHasher>,
    md5: Option<md5::Md5>,
    bytes: u64,
}

struct CompositeHasher {
    part_size: u64,
    filled: u64,
    part: Sha256,
    outer: Sha256,
    parts: u32,
}

/// What the hashing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    pub whole: [u8; 32],
    /// The composite digest and the number of parts it covers.
    pub composite: Option<([u8; 32], u32)>,
    /// Only when asked for (`StreamHasher::with_md5`).
    pub md5: Option<[u8; 16]>,
    pub bytes: u64,
}

impl StreamHasher {
    /// `layout` is only used when it can describe an object of `size` bytes cut in equal parts.
    pub fn new(size: u64, layout: Option<PartLayout>) -> StreamHasher {
        let composite = layout
            .filter(|l| {
                l.first_part_size > 0 && size.div_ceil(l.first_part_size) == u64::from(l.parts)
            })
            .map(|l| CompositeHasher {
                part_size: l.first_part_size,
                filled: 0,
                part: Sha256::new(),
                outer: Sha256::new(),
                parts: 0,
            });
        StreamHasher {
            whole: Sha256::new(),
            composite,
            md5: None,
            bytes: 0,
        }
    }

    /// Also the MD5, when a reference needs it (an ETag is all that covers the object).
    pub fn with_md5(mut self, wanted: bool) -> StreamHasher {
        use md5::Digest as _;
        self.md5 = wanted.then(md5::Md5::new);
        self
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        if let Some(m) = self.md5.as_mut() {
            md5::Digest::update(m, data);
        }
        self.bytes += data.len() as u64;
        let Some(c) = self.composite.as_mut() else {
            return;
        };
        while !data.is_empty() {
            let room = (c.part_size - c.filled).min(data.len() as u64) as usize;
            c.part.update(&data[..room]);
            c.filled += room as u64;
            data = &data[room..];
            if c.filled == c.part_size {
                c.outer.update(c.part.finalize_reset());
                c.parts += 1;
                c.filled = 0;
            }
        }
    }

    pub fn finish(self) -> Digests {
        let composite = self.composite.map(|mut c| {
            if c.filled > 0 {
                c.outer.update(c.part.finalize());
                c.parts += 1;
            }
            (c.outer.finalize().into(), c.parts)
        });
        Digests {
            whole: self.whole.finalize().into(),
            composite,
            md5: self.md5.map(|m| md5::Digest::finalize(m).into()),
            bytes: self.bytes,
        }
    }
}

/// The outcome of checking bytes against their references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Equal to every reference there was; names them ("manifest", "object checksum", …).
    Verified(Vec<&'static str>),
    /// No reference covered these bytes.
    Unverified,
    /// Different from `against`: the bytes are not what was backed up.
    Mismatch {
        against: &'static str,
        expected: String,
        actual: String,
    },
}

pub const MANIFEST: &str = "the SHA-256 in the manifest";
pub const OBJECT_CHECKSUM: &str = "the object's SHA-256 checksum";
pub const COMPOSITE_CHECKSUM: &str = "the object's composite (multipart) SHA-256 checksum";
pub const ETAG_MD5: &str = "the object's ETag (the MD5 of a single-part upload)";

/// Why nothing covers an object's bytes, for the line that says it was restored unverified.
/// `layout_known`: the part layout of a composite checksum was found.
pub fn why_unverified(reference: &Reference, layout_known: bool) -> &'static str {
    match reference.stored {
        Stored::None => {
            "the object carries no SHA-256 checksum and no manifest entry describes it \
             (uploaded by another tool, or before checksums)"
        }
        Stored::Composite { .. } if !layout_known => {
            "a multipart object whose part boundaries are unknown, without a manifest entry \
             to check it against"
        }
        Stored::Composite { .. } => {
            "a multipart object whose parts were not all of one size, without a manifest entry \
             to check it against"
        }
        Stored::Full(_) => "its checksum could not be compared",
    }
}

pub fn judge(reference: &Reference, digests: &Digests) -> Verdict {
    let mut against = Vec::new();
    let hex = hex::encode;
    if let Some(want) = reference.manifest {
        if want != digests.whole {
            return Verdict::Mismatch {
                against: MANIFEST,
                expected: hex(want),
                actual: hex(digests.whole),
            };
        }
        against.push(MANIFEST);
    }
    match reference.stored {
        Stored::Full(want) if want != digests.whole => {
            return Verdict::Mismatch {
                against: OBJECT_CHECKSUM,
                expected: hex(want),
                actual: hex(digests.whole),
            }
        }
        Stored::Full(_) => against.push(OBJECT_CHECKSUM),
        Stored::Composite { digest, parts } => match digests.composite {
            // A different part count means the layout guess did not fit: no judgement.
            Some((got, n)) if n == parts => {
                if got != digest {
                    return Verdict::Mismatch {
                        against: COMPOSITE_CHECKSUM,
                        expected: format!("{}-{parts}", hex(digest)),
                        actual: format!("{}-{n}", hex(got)),
                    };
                }
                against.push(COMPOSITE_CHECKSUM);
            }
            _ => {}
        },
        Stored::None => {}
    }
    if let (Some(want), Some(got)) = (reference.md5, digests.md5) {
        if want != got {
            return Verdict::Mismatch {
                against: ETAG_MD5,
                expected: hex::encode(want),
                actual: hex::encode(got),
            };
        }
        against.push(ETAG_MD5);
    }
    if against.is_empty() {
        Verdict::Unverified
    } else {
        Verdict::Verified(against)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(size: u64, mtime: &str, checksum: Option<[u8; 32]>, parts: Option<u32>) -> HeadInfo {
        let b64 = |d: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(d);
        HeadInfo {
            size,
            meta: [(crate::store::META_MTIME.to_owned(), mtime.to_owned())].into(),
            checksum_sha256: checksum.map(|d| match parts {
                Some(n) => format!("{}-{n}", b64(d)),
                None => b64(d),
            }),
            etag_md5: None,
            version_id: None,
            archive: Default::default(),
        }
    }

    #[test]
    fn an_object_is_held_to_what_the_worker_reported() {
        let sha = [7u8; 32];
        let hex = hex::encode(sha);
        let other = hex::encode([8u8; 32]);
        let full = head(5, "42", Some(sha), None);
        let check = |h: Option<&HeadInfo>, size, mtime, sha: Option<&str>, comp: Option<&str>| {
            hold_to_report(h, size, mtime, sha, comp)
        };
        assert_eq!(
            check(Some(&full), 5, 42, Some(&hex), None),
            Ok(Held::Checksum)
        );
        assert_eq!(
            check(None, 5, 42, Some(&hex), None),
            Err(NotAsReported::Missing)
        );
        assert_eq!(
            check(Some(&full), 6, 42, Some(&hex), None),
            Err(NotAsReported::Size {
                object: 5,
                reported: 6
            })
        );
        assert_eq!(
            check(Some(&full), 5, 43, Some(&hex), None),
            Err(NotAsReported::Mtime {
                object: Some(42),
                reported: 43
            })
        );
        assert_eq!(
            check(Some(&full), 5, 42, Some(&other), None),
            Err(NotAsReported::Checksum)
        );
        assert_eq!(
            check(Some(&full), 5, 42, None, None),
            Err(NotAsReported::Checksum)
        );
        let parts = head(5, "42", Some(sha), Some(2));
        assert_eq!(
            check(Some(&parts), 5, 42, Some(&other), Some(&hex)),
            Ok(Held::Checksum)
        );
        assert_eq!(
            check(Some(&parts), 5, 42, Some(&hex), None),
            Err(NotAsReported::NoComposite)
        );
        assert_eq!(
            check(Some(&parts), 5, 42, Some(&hex), Some(&other)),
            Err(NotAsReported::Checksum)
        );
        let bare = head(5, "42", None, None);
        assert_eq!(
            check(Some(&bare), 5, 42, Some(&hex), None),
            Ok(Held::SizeAndMtime)
        );
    }

    #[test]
    fn the_composite_is_the_hash_of_the_part_hashes() {
        let data = vec![3u8; 1000];
        let parts: Vec<[u8; 32]> = data.chunks(300).map(|c| Sha256::digest(c).into()).collect();
        assert_eq!(composite_of(&parts), composite(&data, 300));
    }

    #[test]
    fn an_unverified_single_part_object_is_never_called_multipart() {
        let reference = Reference::new(None, Stored::None, None);
        let why = why_unverified(&reference, false);
        assert!(
            why.contains("no SHA-256") && !why.contains("multipart"),
            "{why}"
        );
    }

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn stored_checksums_parse() {
        let d = sha(b"x");
        let cases: Vec<(Option<String>, Stored)> = vec![
            (None, Stored::None),
            (Some(b64(&d)), Stored::Full(d)),
            (
                Some(format!("{}-3", b64(&d))),
                Stored::Composite {
                    digest: d,
                    parts: 3,
                },
            ),
            (Some("not base64!".into()), Stored::None),
            (Some(format!("{}-x", b64(&d))), Stored::None),
            (Some(format!("{}-0", b64(&d))), Stored::None),
            (Some(b64(b"short")), Stored::None),
        ];
        for (value, want) in cases {
            assert_eq!(Stored::parse(value.as_deref()), want, "{value:?}");
        }
    }

    /// The composite S3 computes: SHA-256 over the concatenated part SHA-256s.
    fn composite(data: &[u8], part: usize) -> [u8; 32] {
        let mut outer = Sha256::new();
        for chunk in data.chunks(part) {
            outer.update(sha(chunk));
        }
        outer.finalize().into()
    }

    #[test]
    fn composite_is_recomputed_whatever_the_chunking() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let layout = PartLayout {
            parts: 4,
            first_part_size: 300,
        };
        for chunk in [1, 7, 299, 300, 301, 1000] {
            let mut h = StreamHasher::new(1000, Some(layout));
            for c in data.chunks(chunk) {
                h.update(c);
            }
            let d = h.finish();
            assert_eq!(d.whole, sha(&data));
            assert_eq!(
                d.composite,
                Some((composite(&data, 300), 4)),
                "chunk {chunk}"
            );
            assert_eq!(d.bytes, 1000);
        }
        // Exact multiple of the part size: no empty last part.
        let mut h = StreamHasher::new(
            900,
            Some(PartLayout {
                parts: 3,
                first_part_size: 300,
            }),
        );
        h.update(&data[..900]);
        assert_eq!(
            h.finish().composite,
            Some((composite(&data[..900], 300), 3))
        );
    }

    #[test]
    fn a_layout_that_does_not_fit_the_size_is_not_used() {
        let h = StreamHasher::new(
            1000,
            Some(PartLayout {
                parts: 2,
                first_part_size: 300,
            }),
        );
        assert_eq!(h.finish().composite, None);
    }

    #[test]
    fn verdicts() {
        let good = sha(b"good");
        let bad = sha(b"bad");
        let digests = Digests {
            whole: good,
            md5: None,
            composite: Some((good, 2)),
            bytes: 4,
        };
        let r = |manifest, stored| Reference {
            manifest,
            stored,
            md5: None,
        };
        let cases: Vec<(Reference, &str)> = vec![
            (r(None, Stored::None), "unverified"),
            (r(Some(good), Stored::None), "verified 1"),
            (r(Some(good), Stored::Full(good)), "verified 2"),
            (r(Some(bad), Stored::Full(good)), "mismatch manifest"),
            (r(None, Stored::Full(bad)), "mismatch object"),
            (
                r(
                    None,
                    Stored::Composite {
                        digest: good,
                        parts: 2,
                    },
                ),
                "verified 1",
            ),
            (
                r(
                    None,
                    Stored::Composite {
                        digest: bad,
                        parts: 2,
                    },
                ),
                "mismatch composite",
            ),
            // A part count that differs from what was hashed: cannot judge.
            (
                r(
                    None,
                    Stored::Composite {
                        digest: bad,
                        parts: 3,
                    },
                ),
                "unverified",
            ),
        ];
        for (reference, want) in cases {
            let got = match judge(&reference, &digests) {
                Verdict::Unverified => "unverified".to_owned(),
                Verdict::Verified(v) => format!("verified {}", v.len()),
                Verdict::Mismatch { against, .. } if against == MANIFEST => {
                    "mismatch manifest".into()
                }
                Verdict::Mismatch { against, .. } if against == OBJECT_CHECKSUM => {
                    "mismatch object".into()
                }
                Verdict::Mismatch { .. } => "mismatch composite".into(),
            };
            assert_eq!(got, want, "{reference:?}");
        }
    }

    #[test]
    fn the_manifest_binds_only_to_the_object_it_describes() {
        let entry = ManifestEntry {
            key: "k".into(),
            size: 4,
            mtime_ns: 77,
            sha256: Some([9; 32]),
            version: None,
        };
        let meta = |mtime_ns| ObjectMeta {
            mtime_ns,
            ..Default::default()
        };
        assert_eq!(
            manifest_sha(Some(&entry), 4, Some(&meta(77))),
            Some([9; 32])
        );
        assert_eq!(manifest_sha(Some(&entry), 5, Some(&meta(77))), None);
        assert_eq!(manifest_sha(Some(&entry), 4, Some(&meta(78))), None);
        assert_eq!(manifest_sha(Some(&entry), 4, None), None);
        assert_eq!(manifest_sha(None, 4, Some(&meta(77))), None);
        let adopted = ManifestEntry {
            sha256: None,
            ..entry
        };
        assert_eq!(manifest_sha(Some(&adopted), 4, Some(&meta(77))), None);
    }
}
