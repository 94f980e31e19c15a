//! nightcopy: an additive-only nightly backup of a mounted filesystem to S3.
//!
//! The commands stand side by side on top (`commands`: run, verify, restore, snapshots, status,
//! check-config, and for a distributed run worker and dlq); everything below is machinery they
//! share, listed here in the order a nightly run's data flows through it:
//! `config` → `guard` → `scan` ∥ `list` → `merge` → `plan` → `upload` → `report` →
//! `metrics`/`notify`. The scan and the bucket listing run side by side; the merge joins them with
//! the last manifest in key order, so memory stays flat however many files there are.
//!
//! Beside the flow: `state` (lock, run record, manifest, unfinished uploads), `offsite` (the
//! manifest's copy in the bucket), `snapshot` (the index of the tree a run saw) and `tree` (the
//! walk spooled and joined with the committed manifest into the night's snapshot), `sparse` (a
//! sparse file's extents read for it, and its holes punched again on restore), `xattrs` (extended
//! attributes and ACLs, read and set again), `store` (S3 behind a trait without delete),
//! `integrity` (what restored and verified bytes are checked against); for a distributed run
//! `queue` (the work and results queues and what travels in them), `auth` (the key that seals
//! queue messages and the manifest's copy) and `scan::beneath` (a message's path resolved beneath
//! the source as the walk would have reached it); and the
//! small pieces every part uses: `error` (what ends a command), `exit` (the exit codes), `keys`
//! (path ↔ key), `fsutil` (files in the state directory through its handle), `stop`
//! (SIGTERM/SIGINT). Machinery never imports a command.

pub mod commands;

pub mod config;
pub mod guard;
pub mod scan;
pub mod list;
pub mod merge;
pub mod plan;
pub mod upload;
pub mod offsite;
pub mod snapshot;
pub mod sparse;
pub mod tree;
pub mod xattrs;
pub mod queue;
pub mod integrity;
pub mod report;
pub mod metrics;
pub mod notify;

pub mod auth;
pub mod error;
pub mod exit;
pub mod fsutil;
pub mod keys;
pub mod state;
pub mod stop;
pub mod store;
