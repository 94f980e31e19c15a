//! The manifest's copy in the bucket, so that it survives the host. After every run that completed
//! its manifest, the manifest is compressed and uploaded to `<prefix>.nightcopy/manifest.gz`
//! (overwritten: a versioned bucket keeps every night's). A host whose state directory has no
//! usable manifest — a new or rebuilt one — fetches that copy instead of falling back to "size and
//! upload time", so its first run uploads nothing that is unchanged and still catches a file whose
//! mtime went backwards; `restore` uses it for its SHA-256 checks.
//!
//! The copy is never trusted blindly. The compressed stream begins with one JSON line naming the
//! destination and the source it was made for, the entry count and the SHA-256 of the manifest
//! after it; then comes the manifest exactly as the state directory holds it, which carries its
//! own destination header and checksummed trailer. A copy for another destination or source, a
//! damaged one, one whose checksum does not match: each is refused with a warning saying why and
//! what the run does instead.
//!
//! Whoever can write the prefix can write the copy, and `restore` reads it as root: its download
//! and its decompression are bounded whatever it claims (`Limits`), and `accept` is the one place
//! that decides whether a copy is used.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{AuthKey, Domain};
use crate::config::Config;
use crate::fsutil::{self, blocking, AtomicFile};
use crate::keys::{shown, MANIFEST_KEY};
use crate::plan::Reason;
use crate::report::Stats;
use crate::scan::LocalEntry;
use crate::state::manifest::{self, Reader};
use crate::store::{Download, ObjectStore, StoreError};
use crate::upload::{Skip, Upload, Uploader};

const FORMAT: u32 = 1;
/// Files in the state directory while a copy is made or fetched; never left behind on success.
const UPLOAD_FILE: &str = "manifest.gz.upload";
const DOWNLOAD_FILE: &str = "manifest.gz.download";
const FETCHED_FILE: &str = "manifest.fetched";

/// Bounds on reading a copy back, in bytes. None depends on the config: a copy that passes them
/// may still be refused, one that exceeds them never needed to.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// The object as stored. Gzip never grows data by more than a few bytes per 64 KiB, and a
    /// manifest shrinks (its hex SHA-256s alone by half), so no copy we accept is larger than
    /// `decompressed`.
    compressed: u64,
    /// Preamble and manifest together, once inflated.
    decompressed: u64,
    /// One line of the manifest, newline included. An entry is a key (S3 allows 1,024 bytes,
    /// prefix included), two numbers, a hex SHA-256 and an object version (at most 1,024 bytes;
    /// S3's are 32): at most about 2,160 bytes; the header names the destination (endpoint,
    /// bucket, prefix). 8 KiB leaves room for all of that, and is what the reader holds of a
    /// line that has no end.
    line: usize,
}

/// 16 GiB inflated is about 15 million entries with the longest keys S3 allows, and over 100
/// million of the usual 100–150 bytes: more than any tree a nightly run copies, and no more disk
/// than the state directory's manifest of such a tree takes anyway. What a copy claims tightens
/// this further: it may hold no more lines than its preamble's entry count plus header and
/// trailer, so one claiming 1,000 entries is refused after 1,002 lines of at most `line` bytes.
const LIMITS: Limits = Limits {
    compressed: 16 << 30,
    decompressed: 16 << 30,
    line: 8 << 10,
};

/// The preamble is one JSON line naming the source percent-encoded (a path of 4,096 bytes is
/// 12 KiB so): a line far longer than that is not a preamble.
const PREAMBLE_LINE: usize = 64 << 10;

/// The first line of the compressed stream.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Preamble {
    nightcopy_manifest_copy: u32,
    /// `Config::destination_id`.
    destination: String,
    /// The source path, percent-encoded (paths need not be UTF-8).
    source: String,
    entries: u64,
    /// Hex SHA-256 of the manifest bytes that follow.
    sha256: String,
    /// When the run that wrote it started (Unix seconds).
    run_started: u64,
    /// With `auth-key-file`: the HMAC of the other fields (`sha256` covers the body), so that a
    /// host with the key takes only its own fleet's copies (`auth::Domain::Manifest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

impl Preamble {
    /// The bytes the MAC covers: the preamble without its MAC, as it is serialised.
    fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Preamble {
            mac: None,
            destination: self.destination.clone(),
            source: self.source.clone(),
            sha256: self.sha256.clone(),
            ..*self
        };
        serde_json::to_vec(&unsigned).expect("a preamble serializes")
    }
}

fn source_id(config: &Config) -> String {
    percent_encoding::percent_encode(
        config.source.path.0.as_os_str().as_bytes(),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .to_string()
}

/// The full key of the copy.
pub fn key(config: &Config) -> String {
    format!("{}{MANIFEST_KEY}", config.destination.prefix.as_str())
}

/// Why the manifest's copy was not saved. Never fatal: the backup itself is whole, and the run
/// counts this as one transfer error (`commands::run`).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error("cannot compress the manifest: {0}")]
    Compress(io::Error),
    /// The upload failed as a file's would (its kind and the journal line are the uploader's).
    #[error("{0}")]
    Upload(String),
    #[error("a stop was requested first")]
    Stopped,
    #[error("the compressed copy vanished")]
    Vanished,
    #[error("the compressed copy was replaced by {0}")]
    Replaced(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Compresses the state directory's manifest and uploads it. Returns the compressed size. The
/// upload goes through the uploader like any file (checksummed, multipart when large, under the
/// bandwidth limit), in the bucket's default class: it is read back whole on a rebuild, which a
/// Glacier class would delay by hours. Its figures are not the backup's.
pub async fn save<S: ObjectStore>(
    store: Arc<S>,
    config: &Config,
    run_started: u64,
    stop: crate::stop::Stop,
) -> Result<u64, SaveError> {
    let state_dir = config.state_dir.0.clone();
    let destination = config.destination_id();
    let source = source_id(config);
    let key = config.auth_key()?;
    let path = state_dir.join(UPLOAD_FILE);
    let written = path.clone();
    let compressed = blocking(move || {
        compress(
            &state_dir.join(manifest::FILE_NAME),
            &written,
            destination,
            source,
            run_started,
            key.as_ref(),
        )
    })
    .await;
    let entry = match compressed {
        Ok(entry) => entry,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(SaveError::Compress(e));
        }
    };
    let size = entry.size;
    let uploader = Uploader::new(
        store,
        Arc::new(Stats::default()),
        config.destination.prefix.as_str().to_owned(),
        &crate::upload::own_objects(&config.transfer),
        stop,
    );
    let done = uploader.upload(entry, Reason::New).await;
    let _ = std::fs::remove_file(&path);
    match done? {
        Upload::Stored(..) => Ok(size),
        Upload::Skipped(Skip::Error(_, why)) => Err(SaveError::Upload(why)),
        Upload::Skipped(Skip::Stopped) => Err(SaveError::Stopped),
        Upload::Skipped(Skip::Vanished) => Err(SaveError::Vanished),
        Upload::Skipped(Skip::Replaced(by)) => Err(SaveError::Replaced(by)),
    }
}

/// Writes preamble + manifest, gzipped, to `out` (0600), and describes it as a file to upload.
fn compress(
    manifest_path: &Path,
    out: &Path,
    destination: String,
    source: String,
    run_started: u64,
    key: Option<&AuthKey>,
) -> io::Result<LocalEntry> {
    // One pass for the checksum and the count, one to copy: the manifest is read twice, never
    // held in memory.
    let (sha256, entries) = {
        let mut r = BufReader::new(fsutil::open_read(manifest_path)?);
        let mut h = Sha256::new();
        let mut lines = 0u64;
        let mut buf = Vec::with_capacity(4096);
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            h.update(&buf);
            lines += 1;
        }
        // Header and trailer are not entries.
        (hex::encode(h.finalize()), lines.saturating_sub(2))
    };
    let mut preamble = Preamble {
        nightcopy_manifest_copy: FORMAT,
        destination,
        source,
        entries,
        sha256,
        run_started,
        mac: None,
    };
    preamble.mac = key.map(|k| k.sign(Domain::Manifest, &preamble.signed_bytes()));
    let file = AtomicFile::create(out, 0o600)?;
    let mut gz = GzEncoder::new(io::BufWriter::new(file), flate2::Compression::default());
    serde_json::to_writer(&mut gz, &preamble).map_err(io::Error::other)?;
    gz.write_all(b"\n")?;
    io::copy(&mut fsutil::open_read(manifest_path)?, &mut gz)?;
    let file = gz
        .finish()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.commit()?;
    let m = std::fs::metadata(out)?;
    Ok(LocalEntry::from_metadata(
        MANIFEST_KEY.to_owned(),
        out.to_owned(),
        None,
        &m,
    ))
}

/// Why a copy was not used.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("it was made for another destination ({0})")]
    OtherDestination(String),
    #[error("it was made for another source ({0})")]
    OtherSource(String),
    #[error("it is damaged: {0}")]
    Damaged(String),
    #[error("it is not authenticated with auth-key-file: {0}")]
    Unauthenticated(String),
    #[error("it is larger than nightcopy reads: {0}")]
    TooLarge(String),
    #[error("it cannot be read: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The manifest to plan with: the state directory's, or else the bucket's copy. `install`: the
/// copy becomes the state directory's manifest (a run); otherwise it is read from a file that is
/// removed as soon as it is open (a dry run, a restore: they change no state). `fallback` says
/// what the command does without one.
pub async fn manifest<S: ObjectStore>(
    store: &S,
    config: &Config,
    cut_every: usize,
    install: bool,
    fallback: &str,
) -> Option<Reader> {
    let state_dir = &config.state_dir.0;
    let destination = config.destination_id();
    match manifest::open(state_dir, &destination, cut_every) {
        Ok(Some(m)) => return Some(m),
        Ok(None) => {}
        Err(why) => tracing::warn!(
            "the manifest in {} is not used: {why}; trying the copy in the bucket",
            state_dir.display()
        ),
    }
    let shown_key = format!(
        "s3://{}/{}",
        config.destination.bucket.0,
        shown(&key(config))
    );
    match fetch(store, config, install, LIMITS).await {
        Ok(None) => {
            tracing::info!("no manifest here and none in the bucket at {shown_key}: {fallback}");
            None
        }
        Ok(Some(target)) => {
            let opened = manifest::open_file(&target, &destination, cut_every);
            if !install {
                let _ = std::fs::remove_file(&target);
            }
            match opened {
                Ok(Some(m)) => {
                    tracing::info!(
                        "no manifest here: using the copy in the bucket, {shown_key}, checked for \
                         this destination and source"
                    );
                    Some(m)
                }
                Ok(None) => None,
                Err(why) => {
                    let _ = std::fs::remove_file(&target);
                    tracing::warn!("the manifest copy {shown_key} is not used: {why}; {fallback}");
                    None
                }
            }
        }
        Err(why) => {
            tracing::warn!("the manifest copy {shown_key} is not used: {why}; {fallback}");
            None
        }
    }
}

/// Downloads and checks the copy; the path of the manifest it held.
async fn fetch<S: ObjectStore>(
    store: &S,
    config: &Config,
    install: bool,
    limits: Limits,
) -> Result<Option<PathBuf>, Refused> {
    let Some(mut download) = store.get(&key(config), None).await? else {
        return Ok(None);
    };
    too_large(download.size, limits.compressed, "compressed")?;
    let state_dir = config.state_dir.0.clone();
    let gz_path = state_dir.join(DOWNLOAD_FILE);
    let mut gz = AtomicFile::create(&gz_path, 0o600)?;
    receive(&mut download, &mut gz, limits.compressed).await?;
    gz.commit()?;
    let expected = Expected {
        destination: config.destination_id(),
        source: source_id(config),
        key: config
            .auth_key()
            .map_err(|e| Refused::Unauthenticated(e.to_string()))?,
    };
    let target = state_dir.join(if install {
        manifest::FILE_NAME
    } else {
        FETCHED_FILE
    });
    let out = target.clone();
    let gz_read = gz_path.clone();
    let unpacked = blocking(move || Ok(unpack(&gz_read, &out, &expected, limits))).await;
    let _ = std::fs::remove_file(&gz_path);
    match unpacked {
        Ok(Ok(())) => Ok(Some(target)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Refused::Io(e)),
    }
}

/// `Err(TooLarge)` when `size` is over `most`; `what` names the measure.
fn too_large(size: u64, most: u64, what: &str) -> Result<(), Refused> {
    if size > most {
        return Err(Refused::TooLarge(format!(
            "more than {} {what}",
            bytesize::ByteSize(most).display().iec()
        )));
    }
    Ok(())
}

/// Writes the body of `download` to `out`, counting: the size the server announced can be absent
/// (a chunked reply) or wrong, so the bytes received are held to `most` too.
async fn receive(download: &mut Download, out: &mut impl Write, most: u64) -> Result<(), Refused> {
    too_large(download.size, most, "compressed")?;
    let mut received = 0u64;
    while let Some(chunk) = download.body.next().await {
        let chunk = chunk?;
        received += chunk.len() as u64;
        too_large(received, most, "compressed")?;
        out.write_all(&chunk)?;
    }
    Ok(())
}

/// What a copy must be made for.
struct Expected {
    /// `Config::destination_id`.
    destination: String,
    /// `source_id`.
    source: String,
    /// `auth-key-file`: with one, only a copy sealed with it is taken.
    key: Option<AuthKey>,
}

/// What reading a whole copy found, beside its preamble.
struct Contents {
    /// Of the manifest bytes after the preamble.
    sha256: [u8; 32],
}

/// Whether a downloaded copy is used: the one place that decides. Called with the preamble alone
/// as soon as it is read (a copy for another destination or source is refused before the rest is
/// inflated), then with what the whole stream held; the copy is used only if both pass. The
/// limits are not here: they bound the reading itself (`unpack`). A further check of the copy
/// (an authentication tag, say) belongs here, fed by `Contents`.
fn accept(
    expected: &Expected,
    preamble: &Preamble,
    read: Option<&Contents>,
) -> Result<(), Refused> {
    if preamble.nightcopy_manifest_copy != FORMAT {
        return Err(Refused::Damaged(format!(
            "format {} (this nightcopy reads {FORMAT})",
            preamble.nightcopy_manifest_copy
        )));
    }
    if preamble.destination != expected.destination {
        return Err(Refused::OtherDestination(preamble.destination.clone()));
    }
    if preamble.source != expected.source {
        return Err(Refused::OtherSource(
            percent_encoding::percent_decode_str(&preamble.source)
                .decode_utf8_lossy()
                .into_owned(),
        ));
    }
    // Without a key a copy is taken on its own word, as before keys existed; with one, only a
    // copy this fleet sealed.
    crate::auth::check_mac(
        expected.key.as_ref(),
        Domain::Manifest,
        &preamble.signed_bytes(),
        preamble.mac.as_deref(),
    )
    .map_err(|why| Refused::Unauthenticated(why.into()))?;
    if let Some(read) = read {
        if hex::encode(read.sha256) != preamble.sha256 {
            return Err(Refused::Damaged("its checksum does not match".into()));
        }
    }
    Ok(())
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line, in the buffer with its newline (or without, the last one of the stream).
    Whole,
    /// The line is longer than allowed: the buffer holds its first `most` bytes, and the rest
    /// was not read.
    TooLong,
    End,
}

/// Reads one line into `buf` (cleared first), holding at most `most` bytes of it whatever the
/// stream holds: `BufRead::read_line` would hold a line of any length in memory.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, most: usize) -> io::Result<Line> {
    buf.clear();
    if (&mut *r).take(most as u64).read_until(b'\n', buf)? == 0 {
        return Ok(Line::End);
    }
    Ok(if buf.ends_with(b"\n") || buf.len() < most {
        Line::Whole
    } else {
        Line::TooLong
    })
}

/// Checks the preamble, then writes the manifest after it to `out` (atomically, 0600) if `accept`
/// takes the copy, reading it line by line within `limits`.
fn unpack(gz: &Path, out: &Path, expected: &Expected, limits: Limits) -> Result<(), Refused> {
    let mut r = BufReader::new(GzDecoder::new(fsutil::open_read(gz)?));
    let mut line = Vec::new();
    let preamble: Preamble = match read_line(&mut r, &mut line, PREAMBLE_LINE)? {
        Line::Whole => serde_json::from_slice(&line)
            .map_err(|e| Refused::Damaged(format!("no valid first line ({e})")))?,
        Line::TooLong => {
            return Err(Refused::Damaged(format!(
                "no valid first line (longer than {})",
                bytesize::ByteSize(PREAMBLE_LINE as u64).display().iec()
            )))
        }
        Line::End => return Err(Refused::Damaged("it is empty".into())),
    };
    accept(expected, &preamble, None)?;
    // Header and trailer besides the entries.
    let most_lines = preamble.entries.saturating_add(2);
    let mut inflated = line.len() as u64;
    let mut lines = 0u64;
    let mut file = AtomicFile::create(out, 0o600)?;
    let mut w = io::BufWriter::with_capacity(256 * 1024, &mut file);
    let mut h = Sha256::new();
    loop {
        match read_line(&mut r, &mut line, limits.line)? {
            Line::End => break,
            Line::Whole => {}
            Line::TooLong => {
                return Err(Refused::TooLarge(format!(
                    "line {} is longer than {}",
                    lines + 2,
                    bytesize::ByteSize(limits.line as u64).display().iec()
                )))
            }
        }
        lines += 1;
        if lines > most_lines {
            return Err(Refused::Damaged(format!(
                "it holds more lines than the {} entries it claims",
                preamble.entries
            )));
        }
        inflated += line.len() as u64;
        too_large(inflated, limits.decompressed, "inflated")?;
        h.update(&line);
        w.write_all(&line)?;
    }
    w.flush()?;
    drop(w);
    let read = Contents {
        sha256: h.finalize().into(),
    };
    accept(expected, &preamble, Some(&read))?;
    file.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::manifest::{ManifestEntry, Writer};
    use std::fs::File;

    fn write_manifest(dir: &Path, destination: &str, n: u64) {
        let mut w = Writer::create(dir, destination).unwrap();
        for i in 0..n {
            w.push(&ManifestEntry {
                key: format!("k{i:05}"),
                size: i,
                mtime_ns: i as i64,
                sha256: Some([i as u8; 32]),
                version: None,
            })
            .unwrap();
        }
        w.commit().unwrap();
    }

    fn expected(destination: &str, source: &str) -> Expected {
        Expected {
            destination: destination.into(),
            source: source.into(),
            key: None,
        }
    }

    /// A gzip file holding `preamble`'s line and then `body`, with the preamble's checksum
    /// right, so that only the limits can refuse it.
    fn copy_of(gz: &Path, entries: u64, body: &[u8]) {
        let preamble = Preamble {
            nightcopy_manifest_copy: FORMAT,
            destination: "d".into(),
            source: "s".into(),
            entries,
            sha256: hex::encode(Sha256::digest(body)),
            run_started: 0,
            mac: None,
        };
        let mut e = GzEncoder::new(File::create(gz).unwrap(), flate2::Compression::fast());
        serde_json::to_writer(&mut e, &preamble).unwrap();
        e.write_all(b"\n").unwrap();
        e.write_all(body).unwrap();
        e.finish().unwrap();
    }

    const SMALL: Limits = Limits {
        compressed: 1 << 20,
        decompressed: 64 << 10,
        line: 100,
    };

    #[test]
    fn a_copy_unpacks_to_the_same_manifest_only_for_its_destination_and_source() {
        let t = tempfile::tempdir().unwrap();
        write_manifest(t.path(), "d", 500);
        let gz = t.path().join("copy.gz");
        let entry = compress(
            &t.path().join(manifest::FILE_NAME),
            &gz,
            "d".into(),
            "%2Fsrc".into(),
            7,
            None,
        )
        .unwrap();
        assert_eq!(entry.key, MANIFEST_KEY);
        let original = std::fs::read(t.path().join(manifest::FILE_NAME)).unwrap();
        assert!(entry.size < original.len() as u64);

        let out = t.path().join("out");
        unpack(&gz, &out, &expected("d", "%2Fsrc"), LIMITS).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), original);

        let err = unpack(
            &gz,
            &t.path().join("x"),
            &expected("other", "%2Fsrc"),
            LIMITS,
        )
        .unwrap_err();
        assert!(matches!(err, Refused::OtherDestination(_)), "{err}");
        let err = unpack(
            &gz,
            &t.path().join("x"),
            &expected("d", "%2Felsewhere"),
            LIMITS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("another source (/src)"), "{err}");
        assert!(!t.path().join("x").exists());
    }

    #[test]
    fn a_copy_whose_manifest_was_altered_is_refused() {
        let t = tempfile::tempdir().unwrap();
        write_manifest(t.path(), "d", 10);
        let preamble = Preamble {
            nightcopy_manifest_copy: FORMAT,
            destination: "d".into(),
            source: "s".into(),
            entries: 10,
            sha256: hex::encode(Sha256::digest(b"something else")),
            run_started: 0,
            mac: None,
        };
        let gz = t.path().join("bad.gz");
        let mut e = GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        serde_json::to_writer(&mut e, &preamble).unwrap();
        e.write_all(b"\n").unwrap();
        e.write_all(&std::fs::read(t.path().join(manifest::FILE_NAME)).unwrap())
            .unwrap();
        e.finish().unwrap();
        let err = unpack(&gz, &t.path().join("out"), &expected("d", "s"), LIMITS).unwrap_err();
        assert!(err.to_string().contains("checksum does not match"), "{err}");
        assert!(!t.path().join("out").exists());

        std::fs::write(&gz, b"not gzip at all").unwrap();
        assert!(unpack(&gz, &t.path().join("out"), &expected("d", "s"), LIMITS).is_err());
    }

    #[test]
    fn a_line_is_read_whole_only_within_its_bound() {
        /// A stream, a bound, and the lines read from it.
        type Case<'a> = (&'a [u8], usize, &'a [(Line, &'a [u8])]);
        let cases: &[Case] = &[
            (
                b"ab\ncd\n",
                3,
                &[(Line::Whole, b"ab\n"), (Line::Whole, b"cd\n")],
            ),
            (b"abc\n", 3, &[(Line::TooLong, b"abc")]),
            (b"abcdef", 3, &[(Line::TooLong, b"abc")]),
            (b"ab", 3, &[(Line::Whole, b"ab")]),
            (b"\n\n", 1, &[(Line::Whole, b"\n"), (Line::Whole, b"\n")]),
            (b"", 3, &[]),
        ];
        for (stream, most, want) in cases {
            let mut r = BufReader::with_capacity(2, *stream);
            let mut buf = Vec::new();
            for (line, bytes) in *want {
                assert_eq!(
                    read_line(&mut r, &mut buf, *most).unwrap(),
                    *line,
                    "{stream:?}"
                );
                assert_eq!(buf, *bytes, "{stream:?}");
            }
            if !want.iter().any(|(l, _)| *l == Line::TooLong) {
                assert_eq!(read_line(&mut r, &mut buf, *most).unwrap(), Line::End);
            }
        }
    }

    /// A bomb: a copy whose one line never ends is refused once the bound is read, not held.
    #[test]
    fn a_copy_with_a_line_past_the_bound_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let gz = t.path().join("copy.gz");
        copy_of(&gz, 1, &vec![b'a'; 1 << 20]);
        let out = t.path().join("out");
        let err = unpack(&gz, &out, &expected("d", "s"), SMALL).unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than nightcopy reads: line 2 is longer than 100 B"),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn a_copy_that_inflates_past_the_bound_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let gz = t.path().join("copy.gz");
        let line = b"k\t1\t1\t-\n";
        // Claiming as many entries as it holds, the bound on the whole is what refuses it.
        let n = (1 << 20) / line.len();
        copy_of(&gz, n as u64, &line.repeat(n));
        let out = t.path().join("out");
        let err = unpack(&gz, &out, &expected("d", "s"), SMALL).unwrap_err();
        assert!(
            err.to_string().contains("more than 64.0 KiB inflated"),
            "{err}"
        );
        assert!(!out.exists());
        // Claiming fewer, it is refused at the first line too many.
        copy_of(&gz, 10, &line.repeat(n));
        let err = unpack(&gz, &out, &expected("d", "s"), LIMITS).unwrap_err();
        assert!(
            err.to_string()
                .contains("damaged: it holds more lines than the 10 entries it claims"),
            "{err}"
        );
        assert!(!out.exists());
        // Within every bound, the same body is taken.
        copy_of(&gz, n as u64, &line.repeat(n));
        unpack(&gz, &out, &expected("d", "s"), LIMITS).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), line.repeat(n));
    }

    /// A download of `chunks`, announcing `size`; counts the chunks taken from it.
    fn download(size: u64, chunks: usize, taken: Arc<std::sync::atomic::AtomicUsize>) -> Download {
        let body = futures::stream::iter(0..chunks).map(move |_| {
            taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(bytes::Bytes::from(vec![0u8; 1000]))
        });
        Download {
            size,
            etag_md5: None,
            etag: None,
            meta: Default::default(),
            checksum_sha256: None,
            body: Box::pin(body),
        }
    }

    #[test]
    fn a_download_past_the_bound_stops_before_or_as_it_goes_over() {
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = || taken.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        // Announced too large: not a byte is read.
        let mut d = download(1_000_000, 1000, taken.clone());
        let err = futures::executor::block_on(receive(&mut d, &mut out, 10_000)).unwrap_err();
        assert!(
            err.to_string().contains("more than 9.8 KiB compressed"),
            "{err}"
        );
        assert_eq!((count(), out.len()), (0, 0));
        // Announced as nothing (a chunked reply), longer than that: read up to the bound.
        let mut d = download(0, 1000, taken.clone());
        let err = futures::executor::block_on(receive(&mut d, &mut out, 10_000)).unwrap_err();
        assert!(matches!(err, Refused::TooLarge(_)), "{err}");
        assert_eq!((count(), out.len()), (11, 10_000));
        // Within it, whole.
        let mut out = Vec::new();
        let mut d = download(0, 10, taken.clone());
        futures::executor::block_on(receive(&mut d, &mut out, 10_000)).unwrap();
        assert_eq!(out.len(), 10_000);
    }

    #[test]
    fn fetch_refuses_a_copy_larger_than_the_bound_before_downloading_it() {
        let t = tempfile::tempdir().unwrap();
        let config = Config::parse(
            &format!(
                "source:\n  path: /src\ndestination:\n  bucket: b-1\n  prefix: p/\n\
                 state-dir: {}\n",
                t.path().display()
            ),
            Path::new("/etc/nightcopy/config.yaml"),
        )
        .unwrap();
        let store = crate::store::memory::MemoryStore::new(100);
        store.insert(
            &key(&config),
            crate::store::memory::Object::new(vec![0u8; 5000], None),
        );
        let limits = Limits {
            compressed: 4999,
            ..LIMITS
        };
        let err = futures::executor::block_on(fetch(&store, &config, true, limits)).unwrap_err();
        assert!(matches!(err, Refused::TooLarge(_)), "{err}");
        let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn with_a_key_only_a_copy_sealed_with_it_is_taken() {
        let t = tempfile::tempdir().unwrap();
        write_manifest(t.path(), "d", 20);
        let manifest = t.path().join(manifest::FILE_NAME);
        let ours = AuthKey::from_bytes(&[1; 32]);
        let theirs = AuthKey::from_bytes(&[2; 32]);
        let sealed = t.path().join("sealed.gz");
        let plain = t.path().join("plain.gz");
        compress(&manifest, &sealed, "d".into(), "s".into(), 7, Some(&ours)).unwrap();
        compress(&manifest, &plain, "d".into(), "s".into(), 7, None).unwrap();
        let with = |key: &AuthKey| Expected {
            key: Some(key.clone()),
            ..expected("d", "s")
        };
        let out = t.path().join("out");
        unpack(&sealed, &out, &with(&ours), LIMITS).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&manifest).unwrap()
        );
        for (gz, key) in [(&sealed, &theirs), (&plain, &ours)] {
            let err = unpack(gz, &t.path().join("x"), &with(key), LIMITS).unwrap_err();
            assert!(matches!(err, Refused::Unauthenticated(_)), "{err}");
        }
        // Without a key, a copy is taken on its own word, sealed or not.
        unpack(&sealed, &out, &expected("d", "s"), LIMITS).unwrap();
        unpack(&plain, &out, &expected("d", "s"), LIMITS).unwrap();
    }
}
