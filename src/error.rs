//! The errors that end a command (`Fatal`), shared by every command so that what ends one, and
//! with which exit code, is decided in one place.
//!
//! The rules:
//! - **Per file, never fatal**: a file that cannot be read, named, uploaded, checked or restored,
//!   a store error whose kind does not end the run (`store::ErrorKind::ends_the_run`: a digest or
//!   checksum mismatch, throttling on every attempt, a reply that makes no sense), a worker's
//!   report on one file, the manifest's copy in the bucket (`offsite::SaveError`). Each is one
//!   journal line naming the path or key and its `ERROR_KIND`, counted (TransferErrors for a
//!   backup), and the command goes on; the count decides exit 2 (or 4 for `verify`'s problems).
//!   Metrics that could not be published (`metrics::PublishError`) are no failure either: exit 3
//!   after a success.
//! - **Fatal**, only what every file would meet: the config (`Config`, `NotDistributed`: exit
//!   78); the credentials and the SDK (`Setup`, `Key`); the bucket (`Bucket`, and `Store` for an
//!   error whose kind ends the run or a listing that failed half way); the source (`Guard`,
//!   `Source`); the state directory (`Guard`, `Lock`, `Manifest`, `Spool`, `NoRecord`); the queues
//!   of a distributed run (`Queue`); all exit 1. A stop (`Stopped`) exits 128 + the signal.
//!   [`Fatal::ending`] is that mapping, and `report::Ending` the exit code it gives.
//! - A command's own errors keep the same split: `restore`'s `RestoreError` adds a bad `--path`
//!   (exit 64, like the command-line errors clap finds, `--as-of` among them).
//!
//! Every message is one line that names what failed and says what to do next, and never contains
//! a credential.

use crate::config::ConfigError;
use crate::guard::GuardError;
use crate::queue::QueueError;
use crate::report::Ending;
use crate::state::LockError;
use crate::stop;
use crate::store::bucket::BucketError;
use crate::store::sdk::SetupError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    #[error(transparent)]
    Queue(#[from] QueueError),
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
