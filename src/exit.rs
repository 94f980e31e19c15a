//! Exit codes: the contract with systemd, scripts and the Ansible role (docs/exit-codes.md).

/// The run completed and every file was handled (or `check-config` found the file valid).
pub const SUCCESS: u8 = 0;
/// A fatal error: nothing or not everything was backed up; the message says what to do.
pub const FATAL: u8 = 1;
/// The run completed, but some files could not be backed up; each is named in the journal.
pub const FILE_ERRORS: u8 = 2;
/// The command line was wrong (sysexits EX_USAGE).
pub const USAGE: u8 = 64;
/// The config file is invalid (sysexits EX_CONFIG).
pub const CONFIG: u8 = 78;
/// The backup succeeded, but its metrics could not be published (CloudWatch or the textfile);
/// the log says so. Without this the LastSuccess alarm would fire on a good backup unexplained.
pub const METRICS_NOT_PUBLISHED: u8 = 3;
/// The run was skipped: another run holds the lock, or the last success is more recent than
/// guard.min-interval (sysexits EX_TEMPFAIL). Not a failure: the unit has SuccessExitStatus=75.
pub const SKIPPED: u8 = 75;
/// `verify` completed and found files the bucket does not hold as they are: missing, a different
/// size, a different SHA-256, or a corrupt object. Each is one line on stdout.
pub const VERIFY_PROBLEMS: u8 = 4;
/// `restore --thaw` restored everything it could read and asked S3 to thaw the archived rest (or
/// found their thaws still running): run the same command again later. Not a failure: nothing
/// went wrong, the data is on its way. A file error takes precedence (exit 2).
pub const THAWING: u8 = 5;

/// How an exit code reads to an operator: the level of the summary line that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// It did what was asked.
    Fine,
    /// It completed, with something to look at (file errors, problems, metrics, a skip).
    Look,
    /// It ended early or could not start.
    Failed,
}

pub fn severity(code: u8) -> Severity {
    match code {
        SUCCESS => Severity::Fine,
        FILE_ERRORS | METRICS_NOT_PUBLISHED | VERIFY_PROBLEMS | SKIPPED | THAWING => Severity::Look,
        _ => Severity::Failed,
    }
}
