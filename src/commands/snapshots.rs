//! `nightcopy snapshots`: the snapshots of the configured destination, oldest first, one line each
//! — its id, when its run started and ended (RFC 3339, UTC), files, bytes, errors and host — or,
//! with `--json`, one JSON object per line with the same fields (numbers as numbers).
//!
//! Only each snapshot's header is read (`snapshot::fetch_header`, a few KiB of the object), and
//! checked like any of nightcopy's own files in the bucket: one that is damaged, made for another
//! destination, or not sealed with `auth-key-file` is named on stderr with why, and left out. The
//! host name is what the snapshot says, received input: shown escaped.

use std::io::Write;

use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::error::{self, Fatal};
use crate::keys::shown;
use crate::report::Ending;
use crate::snapshot::{self, Expected, FetchError, Header};
use crate::store::s3::S3Store;
use crate::store::{sdk, ObjectStore};

/// Headers fetched side by side.
const AT_ONCE: usize = 8;

/// One line of `--json`.
#[derive(Debug, Serialize)]
struct Line<'a> {
    id: &'a str,
    started: String,
    ended: String,
    files: u64,
    bytes: u64,
    errors: u64,
    host: &'a str,
}

pub async fn run(config: &Config, json: bool) -> Ending {
    let result = async {
        let sdk = sdk::load_checked(config).await?;
        let store = S3Store::for_config(&sdk, config);
        list(config, &store, json, &mut std::io::stdout().lock()).await
    }
    .await;
    error::ending("snapshots", result)
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// The listing over any store, written to `out`.
pub async fn list<S: ObjectStore>(
    config: &Config,
    store: &S,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), Fatal> {
    let prefix = config.destination.prefix.as_str();
    let folder = format!(
        "s3://{}/{}",
        config.destination.bucket.0,
        shown(&format!("{prefix}{}", snapshot::DIR))
    );
    let ids = snapshot::list(store, prefix).await?;
    let key = config.auth_key()?;
    let destination = config.destination_id();
    let expected = Expected {
        destination: &destination,
        key: key.as_ref(),
    };
    let mut headers = futures::stream::iter(&ids)
        .map(|id| snapshot::fetch_header(store, prefix, id, &expected))
        .buffered(AT_ONCE);
    let (mut shown_count, mut refused) = (0u64, 0u64);
    while let Some(header) = headers.next().await {
        let h = match header {
            Ok(h) => h,
            Err(FetchError::Store(e)) => return Err(e.into()),
            // Gone since the listing, or not one to trust: named, and the rest still listed.
            Err(e) => {
                refused += 1;
                tracing::warn!("{e}; left out");
                continue;
            }
        };
        let written = match json {
            true => write_json(out, &h),
            false => write_line(out, &h),
        };
        // Whoever reads stopped reading (`| head`): nothing more to say.
        if written.is_err() {
            return Ok(());
        }
        shown_count += 1;
    }
    match (ids.len(), refused) {
        (0, _) => {
            tracing::info!("no snapshot under {folder}: each completed nightcopy run writes one")
        }
        (_, 0) => tracing::info!("{shown_count} snapshots under {folder}"),
        (_, n) => tracing::warn!(
            "{shown_count} snapshots under {folder}; {n} more left out (named above)"
        ),
    }
    Ok(())
}

fn write_line(out: &mut dyn Write, h: &Header) -> std::io::Result<()> {
    writeln!(
        out,
        "{}  {} to {}  {} files  {}  {} errors  {}",
        h.id,
        rfc3339(h.started),
        rfc3339(h.ended),
        h.counts.files,
        bytesize::ByteSize(h.counts.bytes).display().iec(),
        h.counts.errors,
        shown(&h.host)
    )
}

fn write_json(out: &mut dyn Write, h: &Header) -> std::io::Result<()> {
    let line = Line {
        id: &h.id,
        started: rfc3339(h.started),
        ended: rfc3339(h.ended),
        files: h.counts.files,
        bytes: h.counts.bytes,
        errors: h.counts.errors,
        host: &h.host,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::Dir;
    use crate::snapshot::{Counts, Entry, Kind, Writer};
    use crate::store::memory::{MemoryStore, Object};

    fn config(state: &std::path::Path, key_file: Option<&std::path::Path>) -> Config {
        let key = key_file
            .map(|p| format!("auth-key-file: {}\n", p.display()))
            .unwrap_or_default();
        Config::parse(
            &format!(
                "source:\n  path: /src\ndestination:\n  bucket: b-1\n  prefix: p/\n\
                 state-dir: {}\n{key}",
                state.display()
            ),
            std::path::Path::new("/etc/nightcopy/config.yaml"),
        )
        .unwrap()
    }

    /// Snapshot `id` of `files` one-byte files (and one absent), with `host`, stored under `p/`,
    /// sealed with `key`.
    fn store_snapshot(
        store: &MemoryStore,
        config: &Config,
        id: &str,
        files: u64,
        host: &str,
        key: Option<&crate::auth::AuthKey>,
    ) {
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        let mut w = Writer::create(&dir).unwrap();
        for i in 0..files {
            w.push(&Entry {
                path: format!("f{i}"),
                kind: Kind::File,
                mode: 0o100644,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
                size: 1,
                key: Some(format!("f{i}")),
                sha256: None,
                version: None,
                stale: false,
                link: None,
                rdev: None,
                extents: None,
                xattrs: None,
                xattrs_dropped: false,
            })
            .unwrap();
        }
        w.count_absent();
        let header = Header {
            nightcopy_snapshot: snapshot::FORMAT,
            id: id.into(),
            destination: config.destination_id(),
            source: "/src".into(),
            host: host.into(),
            started: 1_765_000_000,
            ended: 1_765_000_061,
            counts: Counts::default(),
            entries: 0,
            body_sha256: String::new(),
            mac: None,
        };
        w.finish(&dir, "s.gz", header, key).unwrap();
        let body = std::fs::read(t.path().join("s.gz")).unwrap();
        store.insert(&snapshot::object_key("p/", id), Object::new(body, None));
    }

    fn listed(config: &Config, store: &MemoryStore, json: bool) -> String {
        let mut out = Vec::new();
        futures::executor::block_on(list(config, store, json, &mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn snapshots_are_listed_oldest_first_and_a_foreign_one_is_left_out() {
        let t = tempfile::tempdir().unwrap();
        let config = config(t.path(), None);
        let store = MemoryStore::new(1);
        let (a, b) = ("20251206T054640Z-0a1b2c3d", "20251207T054640Z-00000000");
        store_snapshot(&store, &config, b, 2, "host\nb", None);
        store_snapshot(&store, &config, a, 3, "host-a", None);
        // Not a snapshot's name, and a snapshot copied under another id: neither is listed.
        store.insert(
            "p/.nightcopy/snapshots/notes.txt",
            Object::new(&b"x"[..], None),
        );
        let copied = store.object(&snapshot::object_key("p/", a)).unwrap();
        store.insert(
            &snapshot::object_key("p/", "20251208T054640Z-11111111"),
            copied,
        );
        let text = listed(&config, &store, false);
        assert_eq!(
            text,
            "20251206T054640Z-0a1b2c3d  2025-12-06T05:46:40Z to 2025-12-06T05:47:41Z  3 files  \
             3 B  1 errors  host-a\n\
             20251207T054640Z-00000000  2025-12-06T05:46:40Z to 2025-12-06T05:47:41Z  2 files  \
             2 B  1 errors  host\\nb\n"
        );
        let lines: Vec<serde_json::Value> = listed(&config, &store, true)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], a);
        assert_eq!(lines[0]["files"], 3);
        assert_eq!(lines[0]["bytes"], 3);
        assert_eq!(lines[0]["errors"], 1);
        assert_eq!(lines[0]["started"], "2025-12-06T05:46:40Z");
        assert_eq!(lines[1]["host"], "host\nb", "JSON escapes it itself");
    }

    #[test]
    fn with_a_key_only_snapshots_sealed_with_it_are_listed() {
        let t = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let key_file = t.path().join("key");
        std::fs::write(&key_file, "k".repeat(32)).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keyed = config(t.path(), Some(&key_file));
        let key = keyed.auth_key().unwrap().unwrap();
        let store = MemoryStore::default();
        store_snapshot(
            &store,
            &keyed,
            "20251206T054640Z-0a1b2c3d",
            1,
            "sealed",
            Some(&key),
        );
        store_snapshot(
            &store,
            &keyed,
            "20251207T054640Z-0a1b2c3d",
            1,
            "plain",
            None,
        );
        let with_key = listed(&keyed, &store, false);
        assert!(
            with_key.contains("sealed") && !with_key.contains("plain"),
            "{with_key}"
        );
        let without = listed(&config(t.path(), None), &store, false);
        assert_eq!(without.lines().count(), 2, "{without}");
    }
}
