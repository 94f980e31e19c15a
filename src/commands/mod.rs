//! The commands, side by side: each is one entry point that takes a loaded config and returns how
//! it ended (`report::Ending`, from its outcome or its fatal error); `main` turns that into the
//! exit code. They share the machinery below them (config, guard, scan, list, merge, plan, upload,
//! integrity, report, metrics, queue, auth, state, store) and never call each other.

pub mod check_config;
pub mod diff;
pub mod dlq;
pub mod restore;
pub mod run;
pub mod snapshots;
pub mod status;
pub mod verify;
pub mod worker;
