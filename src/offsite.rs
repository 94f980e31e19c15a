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

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::fsutil::{blocking, AtomicFile};
use crate::keys::{shown, MANIFEST_KEY};
use crate::plan::Reason;
use crate::report::Stats;
use crate::scan::LocalEntry;
use crate::state::manifest::{self, Reader};
use crate::store::{ObjectStore, StoreError};
use crate::upload::{Skip, Upload, Uploader};

const FORMAT: u32 = 1;
/// Files in the state directory while a copy is made or fetched; never left behind on success.
const UPLOAD_FILE: &str = "manifest.gz.upload";
const DOWNLOAD_FILE: &str = "manifest.gz.download";
const FETCHED_FILE: &str = "manifest.fetched";

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

/// Compresses the state directory's manifest and uploads it. Returns the compressed size. The
/// upload goes through the uploader like any file (checksummed, multipart when large, under the
/// bandwidth limit), in the bucket's default class: it is read back whole on a rebuild, which a
/// Glacier class would delay by hours. Its figures are not the backup's.
pub async fn save<S: ObjectStore>(
    store: Arc<S>,
    config: &Config,
    run_started: u64,
    stop: crate::stop::Stop,
) -> Result<u64, String> {
    let state_dir = config.state_dir.0.clone();
    let destination = config.destination_id();
    let source = source_id(config);
    let path = state_dir.join(UPLOAD_FILE);
    let written = path.clone();
    let compressed = blocking(move || {
        compress(
            &state_dir.join(manifest::FILE_NAME),
            &written,
            destination,
            source,
            run_started,
        )
    })
    .await;
    let entry = match compressed {
        Ok(entry) => entry,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(format!("cannot compress the manifest: {e}"));
        }
    };
    let size = entry.size;
    let uploader = Uploader::new(
        store,
        Arc::new(Stats::default()),
        config.destination.prefix.as_str().to_owned(),
        &config.transfer,
        stop,
    );
    let done = uploader.upload(entry, Reason::New).await;
    let _ = std::fs::remove_file(&path);
    match done {
        Ok(Upload::Stored(..)) => Ok(size),
        Ok(Upload::Skipped(Skip::Error(_, why))) => Err(why),
        Ok(Upload::Skipped(Skip::Stopped)) => Err("a stop was requested first".into()),
        Ok(Upload::Skipped(Skip::Vanished)) => Err("the compressed copy vanished".into()),
        Ok(Upload::Skipped(Skip::Replaced(by))) => {
            Err(format!("the compressed copy was replaced by {by}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Writes preamble + manifest, gzipped, to `out` (0600), and describes it as a file to upload.
fn compress(
    manifest_path: &Path,
    out: &Path,
    destination: String,
    source: String,
    run_started: u64,
) -> io::Result<LocalEntry> {
    // One pass for the checksum and the count, one to copy: the manifest is read twice, never
    // held in memory.
    let (sha256, entries) = {
        let mut r = BufReader::new(File::open(manifest_path)?);
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
    let preamble = Preamble {
        nightcopy_manifest_copy: FORMAT,
        destination,
        source,
        entries,
        sha256,
        run_started,
    };
    let file = AtomicFile::create(out, 0o600)?;
    let mut gz = GzEncoder::new(io::BufWriter::new(file), flate2::Compression::default());
    serde_json::to_writer(&mut gz, &preamble).map_err(io::Error::other)?;
    gz.write_all(b"\n")?;
    io::copy(&mut File::open(manifest_path)?, &mut gz)?;
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
    match fetch(store, config, install).await {
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
) -> Result<Option<PathBuf>, Refused> {
    let Some(mut download) = store.get(&key(config), None).await? else {
        return Ok(None);
    };
    let state_dir = config.state_dir.0.clone();
    let gz_path = state_dir.join(DOWNLOAD_FILE);
    let mut gz = AtomicFile::create(&gz_path, 0o600)?;
    while let Some(chunk) = download.body.next().await {
        gz.write_all(&chunk?)?;
    }
    gz.commit()?;
    let destination = config.destination_id();
    let source = source_id(config);
    let target = state_dir.join(if install {
        manifest::FILE_NAME
    } else {
        FETCHED_FILE
    });
    let out = target.clone();
    let gz_read = gz_path.clone();
    let unpacked = blocking(move || Ok(unpack(&gz_read, &out, &destination, &source))).await;
    let _ = std::fs::remove_file(&gz_path);
    match unpacked {
        Ok(Ok(())) => Ok(Some(target)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Refused::Io(e)),
    }
}

/// Checks the preamble, then writes the manifest after it to `out` (atomically, 0600) if its
/// SHA-256 matches.
fn unpack(gz: &Path, out: &Path, destination: &str, source: &str) -> Result<(), Refused> {
    let mut r = BufReader::new(GzDecoder::new(File::open(gz)?));
    let mut first = Vec::new();
    // A line far longer than any preamble means this is not one: bounded, not read whole.
    (&mut r).take(64 * 1024).read_until(b'\n', &mut first)?;
    let preamble: Preamble = serde_json::from_slice(&first)
        .map_err(|e| Refused::Damaged(format!("no valid first line ({e})")))?;
    if preamble.nightcopy_manifest_copy != FORMAT {
        return Err(Refused::Damaged(format!(
            "format {} (this nightcopy reads {FORMAT})",
            preamble.nightcopy_manifest_copy
        )));
    }
    if preamble.destination != destination {
        return Err(Refused::OtherDestination(preamble.destination));
    }
    if preamble.source != source {
        return Err(Refused::OtherSource(
            percent_encoding::percent_decode_str(&preamble.source)
                .decode_utf8_lossy()
                .into_owned(),
        ));
    }
    let mut file = AtomicFile::create(out, 0o600)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        file.write_all(&buf[..n])?;
    }
    if hex::encode(h.finalize()) != preamble.sha256 {
        return Err(Refused::Damaged("its checksum does not match".into()));
    }
    file.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::manifest::{ManifestEntry, Writer};

    fn write_manifest(dir: &Path, destination: &str, n: u64) {
        let mut w = Writer::create(dir, destination).unwrap();
        for i in 0..n {
            w.push(&ManifestEntry {
                key: format!("k{i:05}"),
                size: i,
                mtime_ns: i as i64,
                sha256: Some([i as u8; 32]),
            })
            .unwrap();
        }
        w.commit().unwrap();
    }

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
        )
        .unwrap();
        assert_eq!(entry.key, MANIFEST_KEY);
        let original = std::fs::read(t.path().join(manifest::FILE_NAME)).unwrap();
        assert!(entry.size < original.len() as u64);

        let out = t.path().join("out");
        unpack(&gz, &out, "d", "%2Fsrc").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), original);

        let err = unpack(&gz, &t.path().join("x"), "other", "%2Fsrc").unwrap_err();
        assert!(matches!(err, Refused::OtherDestination(_)), "{err}");
        let err = unpack(&gz, &t.path().join("x"), "d", "%2Felsewhere").unwrap_err();
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
        };
        let gz = t.path().join("bad.gz");
        let mut e = GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        serde_json::to_writer(&mut e, &preamble).unwrap();
        e.write_all(b"\n").unwrap();
        e.write_all(&std::fs::read(t.path().join(manifest::FILE_NAME)).unwrap())
            .unwrap();
        e.finish().unwrap();
        let err = unpack(&gz, &t.path().join("out"), "d", "s").unwrap_err();
        assert!(err.to_string().contains("checksum does not match"), "{err}");
        assert!(!t.path().join("out").exists());

        std::fs::write(&gz, b"not gzip at all").unwrap();
        assert!(unpack(&gz, &t.path().join("out"), "d", "s").is_err());
    }
}
