//! The errors that end a command (`Fatal`), shared by every command so that "what ends a run" is
//! decided in one place.
//!
//! The rules: only the config, the credentials, the bucket, the source mount and the state
//! directory are fatal — a problem with one file never is (it is counted in TransferErrors and the
//! run goes on). Every message is one line that names what failed and says what to do next, and
//! never contains a credential.

use crate::guard::GuardError;
use crate::state::LockError;
use crate::stop;
use crate::store::bucket::BucketError;
use crate::store::sdk::SetupError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(
        "cannot write the manifest in the state directory {0}: {1}: free space on its filesystem or \
         make it writable (is the disk full or read-only?); nothing is lost: the last complete \
         manifest is kept, and what this run uploaded stays in the bucket, where the next run \
         finds it"
    )]
    Manifest(String, std::io::Error),
    /// The files a distributed run keeps in the state directory while it lasts (the plan, the
    /// reports and their index) could not be written or read back.
    #[error(
        "cannot use the distributed run's files in the state directory {0}: {1}: free space on \
         its filesystem or make it writable (is the disk full or read-only?); nothing is lost: \
         the last complete manifest is kept, and what the workers uploaded stays in the bucket, \
         where the next run finds it"
    )]
    Spool(String, std::io::Error),
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    /// A queue of a distributed run could not be used (docs/scale-out.md).
    #[error("{0}")]
    Queue(String),
    #[error("stopped by {} before the copy completed; what was uploaded is kept and the next run goes on from there",
            stop::signal_name(*.0))]
    Stopped(i32),
}

impl Fatal {
    /// The manifest in `state_dir` could not be written.
    pub fn manifest(state_dir: &std::path::Path, e: std::io::Error) -> Fatal {
        Fatal::Manifest(state_dir.display().to_string(), e)
    }
}
