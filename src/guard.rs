//! Checks that must pass before anything is read or sent: the source is there and mounted, the
//! state directory is usable, and the host has CA certificates to check S3's TLS certificate with.
//! Each failure is fatal and says what to do. (The bucket's own checks are `store::bucket`'s.)

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("source {0} does not exist: is the filesystem mounted, and is source.path right?")]
    SourceMissing(String),
    #[error("source {0} is not a directory: source.path must name the top of the tree to back up")]
    SourceNotDir(String),
    #[error("source {0} cannot be read: {1}")]
    SourceUnreadable(String, io::Error),
    #[error(
        "source {0} is not a mount point (source.require-mountpoint is on): is the filesystem mounted? \
         An empty mount point must not be backed up as if the tree were gone"
    )]
    NotMounted(String),
    #[error("state directory {0}: {1} (it must be writable by the user nightcopy runs as)")]
    StateDir(String, io::Error),
    #[error(
        "state directory {dir} belongs to {owner}, not to {}, and nightcopy uses no directory \
         others can plant links in: run nightcopy as {}, or if only {} uses it chown -R {} {dir}, \
         or set state-dir to a directory {} owns (a restore as root: docs/restore.md)",
        trusted(.user), .owner.name, .user.name, .user.name, .user.name
    )]
    StateDirOwner {
        dir: String,
        owner: Account,
        user: Account,
    },
    #[error("state directory {dir} is writable by others (mode {mode:o}): chmod go-w {dir}")]
    StateDirShared { dir: String, mode: u32 },
    #[error(
        "no trusted CA certificates on this host{0}, so no TLS certificate (S3, CloudWatch, STS) \
         can be checked: install the CA certificates (Debian/Ubuntu: apt-get install \
         ca-certificates; Amazon Linux/RHEL: dnf install ca-certificates), or point SSL_CERT_FILE \
         at a PEM bundle"
    )]
    NoTrustStore(String),
}

pub fn check_source(path: &Path, require_mountpoint: bool) -> Result<(), GuardError> {
    let shown = path.display().to_string();
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(GuardError::SourceMissing(shown))
        }
        Err(e) => return Err(GuardError::SourceUnreadable(shown, e)),
    };
    if !meta.is_dir() {
        return Err(GuardError::SourceNotDir(shown));
    }
    fs::read_dir(path).map_err(|e| GuardError::SourceUnreadable(shown.clone(), e))?;
    if require_mountpoint
        && !is_mount_point(path).map_err(|e| GuardError::SourceUnreadable(shown.clone(), e))?
    {
        return Err(GuardError::NotMounted(shown));
    }
    Ok(())
}

/// A path is a mount point when /proc/self/mountinfo lists it. (Comparing st_dev with the parent
/// misses bind mounts of the same filesystem.)
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let canonical = fs::canonicalize(path)?;
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let found = mount_points(&info).any(|m| Path::new(&m) == canonical);
    Ok(found)
}

/// Field 5 of each mountinfo line, with the kernel's octal escapes (\040 for space) undone.
fn mount_points(info: &str) -> impl Iterator<Item = String> + '_ {
    info.lines().filter_map(|l| l.split(' ').nth(4)).map(|raw| {
        let mut out = Vec::with_capacity(raw.len());
        let b = raw.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                out.push(u8::from_str_radix(&raw[i + 1..i + 4], 8).unwrap_or(b'?'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// Creates the state directory 0700 if needed, then checks it as [`check_state_dir`] does. For
/// the commands that write there (`run`, `worker`).
pub fn prepare_state_dir(path: &Path) -> Result<(), GuardError> {
    let shown = path.display().to_string();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| GuardError::StateDir(shown.clone(), e))?;
    check_state_dir(path)
}

/// Whether the state directory may be used: one that does not exist yet holds nothing to
/// distrust (`status` then says no run is recorded). Every command that reads or writes it
/// passes here first.
pub fn check_state_dir(path: &Path) -> Result<(), GuardError> {
    let shown = path.display().to_string();
    let dir = match fsutil::Dir::open(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(GuardError::StateDir(shown, e)),
    };
    check_private(&dir)
}

/// The rule for a directory nightcopy keeps its state in (the state directory, `uploads/` in
/// it): owned by root or by the user nightcopy runs as, and writable by nobody else.
///
/// The owner: nightcopy runs as root or with CAP_DAC_READ_SEARCH, and the files there decide
/// what is skipped and where root writes. A directory another user owns is one that user can
/// put links and files in at any time, and can chmod open again, so it is refused whatever its
/// mode — in particular the packaged `/var/lib/nightcopy` (the `nightcopy` user's) for a command
/// run as root. Root's own directory is accepted for any user: only root can change it.
///
/// The mode: a directory group or others can write is refused too, with or without the sticky
/// bit. The sticky bit only stops others removing or renaming what nightcopy made; they could
/// still create the names nightcopy has not made yet (the manifest, the lock, the record), and
/// a manifest planted there decides what the next run skips.
pub fn check_private(dir: &fsutil::Dir) -> Result<(), GuardError> {
    let shown = dir.path().display().to_string();
    let st = dir
        .stat()
        .map_err(|e| GuardError::StateDir(shown.clone(), e))?;
    let euid = nix::unistd::geteuid();
    if st.st_uid != 0 && st.st_uid != euid.as_raw() {
        return Err(GuardError::StateDirOwner {
            dir: shown,
            owner: Account::of(st.st_uid),
            user: Account::of(euid.as_raw()),
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(GuardError::StateDirShared { dir: shown, mode });
    }
    Ok(())
}

/// A user as a message names it: `name (uid N)`, and `name` alone where a command takes it
/// (the uid for a uid with no name).
#[derive(Debug)]
pub struct Account {
    pub uid: u32,
    pub name: String,
}

impl Account {
    fn of(uid: u32) -> Account {
        let name = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => u.name,
            _ => uid.to_string(),
        };
        Account { uid, name }
    }
}

/// Who may own a state directory, for a command run as `user`.
fn trusted(user: &Account) -> String {
    match user.uid {
        0 => "root, which nightcopy runs as".into(),
        _ => format!("root or {user}, which nightcopy runs as"),
    }
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name == self.uid.to_string() {
            write!(f, "uid {}", self.uid)
        } else {
            write!(f, "{} (uid {})", self.name, self.uid)
        }
    }
}

/// The AWS SDK's HTTPS client trusts the platform's CA certificates, which it loads with
/// rustls-native-certs (SSL_CERT_FILE / SSL_CERT_DIR when set, else the distribution's bundle).
/// It has no error path for finding none: debug builds panic on an assertion when the first client
/// is built (inside the default credential chain), release builds go on and every HTTPS request
/// then fails as "cannot reach the endpoint". So the same loader is asked first, here. It reads
/// a few hundred kilobytes once per run.
pub fn check_trust_store() -> Result<(), GuardError> {
    let found = rustls_native_certs::load_native_certs();
    if !found.certs.is_empty() {
        return Ok(());
    }
    let why = found
        .errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Err(GuardError::NoTrustStore(if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 0:40 / /mnt/with\\040space rw - nfs srv:/x rw\n";
        let got: Vec<_> = mount_points(info).collect();
        assert_eq!(got, ["/", "/mnt/with space"]);
    }

    #[test]
    fn root_is_a_mount_point_and_a_temp_dir_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let t = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(t.path()).unwrap());
        let err = check_source(t.path(), true).unwrap_err();
        assert!(
            err.to_string().contains("is the filesystem mounted?"),
            "{err}"
        );
        check_source(t.path(), false).unwrap();
    }

    #[test]
    fn missing_source_says_what_to_check() {
        let err = check_source(Path::new("/nonexistent/nightcopy"), false).unwrap_err();
        assert!(matches!(err, GuardError::SourceMissing(_)));
    }

    #[test]
    fn state_dir_is_private() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state");
        prepare_state_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_state_dir(&d).is_err());
        // The sticky bit does not make it private (see check_private).
        fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = check_state_dir(&d).unwrap_err();
        assert!(err.to_string().contains("chmod go-w"), "{err}");
    }

    /// Regression: a state directory another user owns (the packaged one, for `sudo nightcopy
    /// restore`) was used as root. Needs root, to give the directory away: as another user the
    /// chown fails, and so does the test.
    #[test]
    fn a_state_dir_owned_by_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state");
        prepare_state_dir(&d).unwrap();
        check_state_dir(&d).unwrap();
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(12345)), None)
            .expect("tests run as root: the state directory is given to uid 12345");
        let err = prepare_state_dir(&d).unwrap_err();
        assert!(matches!(err, GuardError::StateDirOwner { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("belongs to uid 12345"), "{msg}");
        assert!(msg.contains("chown"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(check_state_dir(&d).is_err());
        // Nothing there to distrust yet.
        check_state_dir(&t.path().join("missing")).unwrap();
    }
}
