//! The authentication key (`auth-key-file`): a secret the coordinator and its workers share, and
//! that one host's runs share over time, to tell nightcopy's own words from anyone else's where
//! others can write too — the work and results queues (anyone allowed `sqs:SendMessage`), and
//! nightcopy's own files in the bucket (anyone who can write the prefix).
//!
//! A sealed message is `nightcopy-mac-v1:<hex HMAC-SHA256>` on its first line and the body
//! after it. The MAC covers a domain ("work", "report", "manifest") before the body, so a message
//! of one kind cannot be replayed as another. The key never travels and is never printed.
//!
//! The key file is held to the rules of a secret: opened without following a link, a regular
//! file owned by root or by the user nightcopy runs as, with no access for group or others, and
//! at least 32 bytes (a trailing newline is not part of the key). Anything else is refused with
//! the fix, before anything is read or sent.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::keys::shown;

/// The header line of a sealed message.
const SEAL: &str = "nightcopy-mac-v1:";
/// A key shorter than this is refused: HMAC-SHA256's own block of strength.
pub const MIN_KEY_BYTES: usize = 32;
/// A key file larger than this is not a key.
const MAX_KEY_BYTES: u64 = 4096;

/// What a MAC is over, besides the body: a message of one kind cannot pass for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// A batch of planned uploads, coordinator → worker.
    Work,
    /// A worker's report on a batch, worker → coordinator.
    Report,
    /// The manifest's copy in the bucket.
    Manifest,
    /// A snapshot index's header in the bucket.
    Snapshot,
}

impl Domain {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Domain::Work => b"work\n",
            Domain::Report => b"report\n",
            Domain::Manifest => b"manifest\n",
            Domain::Snapshot => b"snapshot\n",
        }
    }
}

/// Why the key file cannot be used. Fatal: a fleet with a wrong key would refuse every message.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read auth-key-file {}: {} (is the path right, and readable by this user?)", shown(.0), .1)]
    Io(PathBuf, std::io::Error),
    #[error("auth-key-file {} is a symlink or not a regular file: point auth-key-file at the key itself", shown(.0))]
    NotAFile(PathBuf),
    #[error("auth-key-file {} is owned by uid {}: a key must belong to root or to the user nightcopy runs as (chown it)", shown(.0), .1)]
    Owner(PathBuf, u32),
    #[error("auth-key-file {} has mode {:04o}: a key must not be readable or writable by group or others (chmod 600 it)", shown(.0), .1)]
    Mode(PathBuf, u32),
    #[error("auth-key-file {} holds {} bytes: a key has {} to {} (e.g. `openssl rand -hex 32 > FILE`)", shown(.0), .1, MIN_KEY_BYTES, MAX_KEY_BYTES)]
    Size(PathBuf, u64),
}

/// Why a received message is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsealed {
    #[error("it carries no MAC, and auth-key-file is set: not authenticated, refused")]
    Unsigned,
    #[error("its MAC does not match (another key, or altered): refused")]
    BadMac,
    #[error("it is sealed with a key, and this host has no auth-key-file: refused (give every host of the fleet the same key)")]
    NoKey,
}

/// The loaded key.
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    /// Loads and checks the key file (see the module's rules).
    pub fn load(path: &Path) -> Result<AuthKey, KeyError> {
        let io = |e| KeyError::Io(path.to_owned(), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => KeyError::NotAFile(path.to_owned()),
                _ => io(e),
            })?;
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(KeyError::NotAFile(path.to_owned()));
        }
        if !owner_ok(meta.uid(), nix::unistd::geteuid().as_raw()) {
            return Err(KeyError::Owner(path.to_owned(), meta.uid()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(KeyError::Mode(path.to_owned(), meta.mode() & 0o7777));
        }
        if meta.len() > MAX_KEY_BYTES {
            return Err(KeyError::Size(path.to_owned(), meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_KEY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.len() < MIN_KEY_BYTES || bytes.len() as u64 > MAX_KEY_BYTES {
            return Err(KeyError::Size(path.to_owned(), bytes.len() as u64));
        }
        Ok(AuthKey(bytes))
    }

    /// A key from bytes (tests, and keys made in memory).
    pub fn from_bytes(bytes: &[u8]) -> AuthKey {
        AuthKey(bytes.to_vec())
    }

    fn mac(&self, domain: Domain) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(domain.as_bytes());
        mac
    }

    /// The MAC of `body` in `domain`, hex.
    pub fn sign(&self, domain: Domain, body: &[u8]) -> String {
        let mut mac = self.mac(domain);
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `mac_hex` is `body`'s MAC in `domain` (compared in constant time).
    pub fn verify(&self, domain: Domain, body: &[u8], mac_hex: &str) -> bool {
        let Ok(tag) = hex::decode(mac_hex) else {
            return false;
        };
        let mut mac = self.mac(domain);
        mac.update(body);
        mac.verify_slice(&tag).is_ok()
    }
}

/// Whether one of nightcopy's own files in the bucket may be taken: without a key, on its own word
/// (as before keys existed); with one, only if its `mac` is the key's over `signed`.
pub fn check_mac(
    key: Option<&AuthKey>,
    domain: Domain,
    signed: &[u8],
    mac: Option<&str>,
) -> Result<(), &'static str> {
    match (key, mac) {
        (None, _) => Ok(()),
        (Some(_), None) => Err("it carries no MAC"),
        (Some(k), Some(mac)) if k.verify(domain, signed, mac) => Ok(()),
        (Some(_), Some(_)) => Err("its MAC does not match (another key, or altered)"),
    }
}

/// A secret may belong to root or to the user reading it, no one else.
fn owner_ok(owner: u32, reader: u32) -> bool {
    owner == 0 || owner == reader
}

/// `body` as it is sent: sealed when there is a key, as it is otherwise.
pub fn seal(key: Option<&AuthKey>, domain: Domain, body: String) -> String {
    match key {
        Some(k) => format!("{SEAL}{}\n{body}", k.sign(domain, body.as_bytes())),
        None => body,
    }
}

/// The body of a received `message`, once its MAC holds (with a key), or as it is (without one,
/// unless it is sealed: a fleet whose hosts disagree about the key is said so at once).
pub fn unseal<'m>(
    key: Option<&AuthKey>,
    domain: Domain,
    message: &'m str,
) -> Result<&'m str, Unsealed> {
    let sealed = message
        .strip_prefix(SEAL)
        .and_then(|rest| rest.split_once('\n'));
    match (key, sealed) {
        (Some(k), Some((mac, body))) if k.verify(domain, body.as_bytes(), mac) => Ok(body),
        (Some(_), Some(_)) => Err(Unsealed::BadMac),
        (Some(_), None) => Err(Unsealed::Unsigned),
        (None, Some(_)) => Err(Unsealed::NoKey),
        (None, None) => Ok(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key(b: u8) -> AuthKey {
        AuthKey::from_bytes(&[b; 32])
    }

    #[test]
    fn a_sealed_message_opens_only_with_its_key_and_domain() {
        let k = key(1);
        let m = seal(Some(&k), Domain::Work, "{\"batch\":1}".into());
        assert_eq!(unseal(Some(&k), Domain::Work, &m), Ok("{\"batch\":1}"));
        assert_eq!(unseal(Some(&k), Domain::Report, &m), Err(Unsealed::BadMac));
        assert_eq!(
            unseal(Some(&key(2)), Domain::Work, &m),
            Err(Unsealed::BadMac)
        );
        assert_eq!(unseal(None, Domain::Work, &m), Err(Unsealed::NoKey));
        let altered = m.replace("\"batch\":1", "\"batch\":2");
        assert_eq!(
            unseal(Some(&k), Domain::Work, &altered),
            Err(Unsealed::BadMac)
        );
        assert_eq!(
            unseal(Some(&k), Domain::Work, "{\"batch\":1}"),
            Err(Unsealed::Unsigned)
        );
        assert_eq!(unseal(None, Domain::Work, "{}"), Ok("{}"));
        assert_eq!(seal(None, Domain::Work, "{}".into()), "{}");
    }

    #[test]
    fn a_key_file_is_held_to_the_rules_of_a_secret() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = AuthKey::load(&p).unwrap();
        assert_eq!(k.0.len(), 64, "the trailing newline is not part of the key");
        assert_eq!(format!("{k:?}"), "AuthKey(..)");

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(AuthKey::load(&p), Err(KeyError::Mode(_, 0o640))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();

        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(AuthKey::load(&link), Err(KeyError::NotAFile(_))));

        let short = d.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(AuthKey::load(&short), Err(KeyError::Size(_, 9))));
    }

    #[test]
    fn a_key_belongs_to_root_or_its_reader() {
        assert!(owner_ok(0, 0));
        assert!(owner_ok(0, 998));
        assert!(owner_ok(998, 998));
        assert!(!owner_ok(1000, 998));
        assert!(!owner_ok(1000, 0));
    }
}
