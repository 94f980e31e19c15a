//! Checks that must pass before anything is read or sent: the source is there and mounted, the
//! state directory is usable, and the host has CA certificates to check S3's TLS certificate with.
//! Each failure is fatal and says what to do. (The bucket's own checks are `store::bucket`'s.)

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

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

/// Creates the state directory 0700 if needed; refuses one that other users can write, since the
/// manifest there decides what is skipped.
pub fn prepare_state_dir(path: &Path) -> Result<(), GuardError> {
    let shown = path.display().to_string();
    let err = |e| GuardError::StateDir(shown.clone(), e);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)?;
    let mode = fs::metadata(path).map_err(err)?.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(err(io::Error::other(format!(
            "is writable by others (mode {:o}): chmod go-w it",
            mode & 0o777
        ))));
    }
    Ok(())
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
    }
}
