//! nightcopy: an additive-only nightly backup of a mounted filesystem to S3.
//!
//! The commands stand side by side on top (`commands`: run, verify, restore, status,
//! check-config); everything below is machinery they share, listed here in the order a nightly
//! run's data flows through it:
//! `config` → `guard` → `scan` ∥ `list` → `merge` → `plan` → `upload` → `report` →
//! `metrics`/`notify`, with `state` (lock, run record, manifest, unfinished uploads), `offsite`
//! (the manifest's copy in the bucket) and `store` (S3 behind a trait without delete) beside
//! them. The scan and the bucket listing run side by side; the merge joins
//! them with the last manifest in key order, so memory stays flat however many files there are.
//! Machinery never imports a command.

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
