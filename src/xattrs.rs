//! Extended attributes and POSIX ACLs (`source.xattrs`, off by default): read by the walk for
//! files and directories, recorded in the night's snapshot, set again by restore.
//!
//! Which attributes: `user.*`, and the POSIX ACLs `system.posix_acl_access` and
//! `system.posix_acl_default` — nothing else. Never `security.*` (SELinux labels and file
//! capabilities: a label belongs to the host's policy, and a capability restored by root would
//! make a program privileged on the word of whoever can write the bucket), never `trusted.*`
//! (root-only, and meaningful only to the programs that set them), nor other `system.*` names
//! (filesystem-specific). Restore holds names from the snapshot to the same list: anything else
//! is skipped with a warning.
//!
//! Cost: one `listxattr` per path, and one `getxattr` per attribute kept — a round trip each on a
//! network mount, which is why it is opt-in. Symlinks are not read (Linux keeps no `user.*` on
//! them). Bounded: more than `snapshot::MAX_XATTR_BYTES` of names and values for one path, and
//! none are kept (`dropped`).

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use base64::Engine;
use rustix::io::Errno;

use crate::keys;
use crate::snapshot::MAX_XATTR_BYTES;

/// The attributes of one path, as a snapshot records them: names percent-encoded, values base64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Xattrs {
    pub pairs: Vec<(String, String)>,
    /// There were more than `MAX_XATTR_BYTES`: none are kept.
    pub dropped: bool,
}

/// An attribute to set: its name and value.
pub type Attr = (CString, Vec<u8>);

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// Whether an attribute of this name is read and restored.
pub fn allowed(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && name.len() > 5) || name == ACL_ACCESS || name == ACL_DEFAULT
}

/// Where the attribute calls go: a path (not followed) or an open file.
enum At<'a, F: AsFd> {
    Path(&'a CStr),
    Fd(F),
}

impl<F: AsFd> At<'_, F> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            At::Path(p) => rustix::fs::llistxattr(*p, buf),
            At::Fd(f) => rustix::fs::flistxattr(f, buf),
        }
    }

    fn get(&self, name: &CStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            At::Path(p) => rustix::fs::lgetxattr(*p, name, buf),
            At::Fd(f) => rustix::fs::fgetxattr(f, name, buf),
        }
    }
}

/// The attributes of `name` in the directory open at `dir`, without following a symlink there and
/// without resolving the whole path again: through `/proc/self/fd/<dir>/<name>` (Linux has no
/// `*xattrat` before 6.13). `None` where the filesystem keeps none.
pub fn read_at(dir: &impl std::os::fd::AsRawFd, name: &OsStr) -> io::Result<Option<Xattrs>> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.as_bytes());
    let path = CString::new(path).map_err(io::Error::other)?;
    read(At::<std::fs::File>::Path(&path), MAX_XATTR_BYTES)
}

/// The attributes of the open file or directory `f`.
pub fn read_fd(f: impl AsFd) -> io::Result<Option<Xattrs>> {
    read(At::Fd(f), MAX_XATTR_BYTES)
}

/// At most `budget` bytes of names and values.
fn read<F: AsFd>(at: At<'_, F>, budget: usize) -> io::Result<Option<Xattrs>> {
    // Names: at most 64 KiB (XATTR_LIST_MAX); most paths have none, and the first call says so.
    let mut names = vec![0u8; 1024];
    let len = loop {
        match at.list(&mut names) {
            Ok(len) => break len,
            Err(Errno::RANGE) if names.len() < 64 * 1024 => names.resize(64 * 1024, 0),
            Err(Errno::NOTSUP | Errno::NOSYS) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    names.truncate(len);
    let mut out = Xattrs::default();
    let mut used = 0usize;
    let mut value = vec![0u8; budget];
    for name in names.split(|&b| b == 0).filter(|n| allowed(n)) {
        let left = budget.saturating_sub(used + name.len());
        // (An empty buffer would ask for the size instead.)
        if left == 0 {
            return Ok(Some(Xattrs {
                pairs: Vec::new(),
                dropped: true,
            }));
        }
        let cname = CString::new(name).map_err(io::Error::other)?;
        match at.get(&cname, &mut value[..left]) {
            Ok(n) => {
                used += name.len() + n;
                out.pairs.push((
                    keys::encode_raw_path(Path::new(OsStr::from_bytes(name))),
                    base64::engine::general_purpose::STANDARD.encode(&value[..n]),
                ));
            }
            // Gone since the list.
            Err(Errno::NODATA) => {}
            // It does not fit in what is left.
            Err(Errno::RANGE) => {
                return Ok(Some(Xattrs {
                    pairs: Vec::new(),
                    dropped: true,
                }))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((!out.pairs.is_empty()).then_some(out))
}

/// Recorded attributes as names and values to set, each checked: a name outside the read list
/// or a value that is not base64 is skipped with a warning naming `path`.
pub fn decode(pairs: &[(String, String)], path: &Path) -> Vec<Attr> {
    let mut out = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        let raw = keys::decode_raw_path(name);
        if !allowed(&raw) || raw.contains(&0) {
            tracing::warn!(
                "{}: the snapshot's extended attribute {} is not one nightcopy restores \
                 (user.*, POSIX ACLs): skipped",
                keys::shown(path),
                keys::shown(OsStr::from_bytes(&raw))
            );
            continue;
        }
        match base64::engine::general_purpose::STANDARD.decode(value) {
            Ok(v) => out.push((CString::new(raw).expect("no NUL"), v)),
            Err(e) => tracing::warn!(
                "{}: the snapshot's extended attribute {} has no valid value ({e}): skipped",
                keys::shown(path),
                keys::shown(OsStr::from_bytes(&raw))
            ),
        }
    }
    out
}

/// Said once per process: the restore's filesystem keeps no extended attributes.
static CANNOT_SET: AtomicBool = AtomicBool::new(false);

/// Sets `attrs` on the open file or directory `f` (at `path`, for messages). A filesystem that
/// keeps none is said once at debug, never an error; another refusal is a warning naming the
/// path and the attribute. Whether an access ACL was set (its mode bits then want setting again).
pub fn set(f: impl AsFd, attrs: &[Attr], path: &Path) -> bool {
    let mut acl = false;
    for (name, value) in attrs {
        match rustix::fs::fsetxattr(&f, name.as_c_str(), value, rustix::fs::XattrFlags::empty()) {
            Ok(()) => acl |= name.as_bytes() == ACL_ACCESS,
            Err(Errno::NOTSUP | Errno::NOSYS) => {
                if !CANNOT_SET.swap(true, Relaxed) {
                    tracing::debug!(
                        "the restore's filesystem keeps no extended attributes ({}): they are \
                         not restored",
                        keys::shown(OsStr::from_bytes(name.as_bytes()))
                    );
                }
                break;
            }
            Err(e) => tracing::warn!(
                "{}: extended attribute {} not restored: {}",
                keys::shown(path),
                keys::shown(OsStr::from_bytes(name.as_bytes())),
                io::Error::from(e)
            ),
        }
    }
    acl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_attributes_and_posix_acls_are_kept() {
        for (name, ok) in [
            ("user.color", true),
            ("user.", false),
            ("system.posix_acl_access", true),
            ("system.posix_acl_default", true),
            ("system.nfs4_acl", false),
            ("security.selinux", false),
            ("security.capability", false),
            ("trusted.overlay.opaque", false),
            ("users.x", false),
        ] {
            assert_eq!(allowed(name.as_bytes()), ok, "{name}");
        }
    }

    #[test]
    fn attributes_are_read_set_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let file = std::fs::File::open(&a).unwrap();
        rustix::fs::fsetxattr(
            &file,
            "user.color",
            b"blue",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("the test directory keeps user.* attributes");
        let d = std::fs::File::open(dir.path()).unwrap();
        let got = read_at(&d, OsStr::new("a")).unwrap().unwrap();
        assert_eq!(
            got.pairs,
            [("user.color".to_owned(), "Ymx1ZQ==".to_owned())]
        );
        assert_eq!(read_fd(&file).unwrap(), Some(got.clone()));
        // Set again on another file.
        let b = dir.path().join("b");
        std::fs::write(&b, b"y").unwrap();
        let fb = std::fs::File::open(&b).unwrap();
        let attrs = decode(&got.pairs, &b);
        assert!(!set(&fb, &attrs, &b));
        assert_eq!(read_fd(&fb).unwrap(), Some(got));
        // None at all, and more than the bound.
        std::fs::write(dir.path().join("c"), b"z").unwrap();
        assert_eq!(read_at(&d, OsStr::new("c")).unwrap(), None);
        // (ext4 keeps at most a block of attributes per inode: the bound is tried smaller.)
        rustix::fs::fsetxattr(&fb, "user.two", b"1234", rustix::fs::XattrFlags::empty()).unwrap();
        let fits = read(At::Fd(&fb), 10 + 4 + 8 + 4).unwrap().unwrap();
        assert!(!fits.dropped && fits.pairs.len() == 2);
        let dropped = read(At::Fd(&fb), 10 + 4 + 8 + 3).unwrap().unwrap();
        assert!(dropped.dropped && dropped.pairs.is_empty());
        // A symlink there is not followed (and Linux keeps no user.* on one).
        std::os::unix::fs::symlink("a", dir.path().join("l")).unwrap();
        assert_eq!(read_at(&d, OsStr::new("l")).unwrap(), None);
    }

    #[test]
    fn recorded_names_outside_the_list_are_not_set() {
        let pairs = vec![
            ("security.capability".to_owned(), "AQ==".to_owned()),
            ("user.ok".to_owned(), "AQ==".to_owned()),
            ("user.bad%00nul".to_owned(), "AQ==".to_owned()),
            ("user.notbase64".to_owned(), "!!".to_owned()),
        ];
        let got = decode(&pairs, Path::new("f"));
        assert_eq!(got, [(CString::new("user.ok").unwrap(), vec![1u8])]);
    }
}
