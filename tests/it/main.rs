//! The integration tests: the real `nightcopy` binary against real servers on 127.0.0.1 (an S3 API
//! server behind a counting proxy, CloudWatch, an IMDSv2 stand-in), one module per area. One test
//! binary, so the AWS SDK is linked once for the whole suite.

mod common;

mod agent;
mod bucket;
mod cli;
mod copy;
mod diff;
mod distribute;
mod faults;
mod harness_selftest;
mod hostile;
mod journal;
mod kill;
mod layout;
mod messages;
mod mount;
mod moving;
mod nights;
mod offsite;
mod rclone;
mod restore;
mod restore_snapshot;
mod resume;
mod servers_selftest;
mod snapshots;
mod statedir;
mod thaw;
mod trust;
mod verify;
