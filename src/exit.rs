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
