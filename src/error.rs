//! The errors that end a command (`Fatal`), shared by every command so that "what ends a run" is
//! decided in one place.
//!
//! The rules: only the config, the credentials, the bucket, the source mount and the state
//! directory are fatal — a problem with one file never is (it is counted in TransferErrors and the
//! run goes on). Every message is one line that names what failed and says what to do next, and
//! never contains a credential.

use crate::guard::GuardError;
use crate::report::Ending;
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
    /// `worker` and `dlq` have nothing to work on without `distribute:`.
    #[error(
        "nightcopy {0} needs a distribute: section in the config (queue-url, results-queue-url, \
         dead-letter-queue-url): docs/scale-out.md"
    )]
    NotDistributed(&'static str),
    /// A worker resolves every message's path beneath the source, from a handle on it.
    #[error("cannot open source {0}: {1} (is the filesystem mounted?)")]
    Source(String, std::io::Error),
    /// `status` with no run recorded in the state directory.
    #[error("no run recorded in {0} yet")]
    NoRecord(String),
    #[error("stopped by {} before the copy completed; what was uploaded is kept and the next run goes on from there",
            stop::signal_name(*.0))]
    Stopped(i32),
}

impl Fatal {
    /// How a command that this ended ends: a stop with its signal, a config that cannot be used
    /// with exit 78, anything else as a failure (exit 1).
    pub fn ending(&self) -> Ending {
        match self {
            Fatal::Stopped(sig) => Ending::Stopped(*sig),
            Fatal::Config(_) | Fatal::NotDistributed(_) => Ending::Config,
            _ => Ending::FAILED,
        }
    }

    /// The manifest in `state_dir` could not be written.
    pub fn manifest(state_dir: &std::path::Path, e: std::io::Error) -> Fatal {
        Fatal::Manifest(state_dir.display().to_string(), e)
    }
}

/// The ending of a command without a summary line of its own: success, or the fatal error's,
/// logged first as "`command` FAILED: …".
pub fn ending(command: &str, result: Result<(), Fatal>) -> Ending {
    match result {
        Ok(()) => Ending::SUCCESS,
        Err(e) => {
            tracing::error!("{command} FAILED: {e}");
            e.ending()
        }
    }
}
