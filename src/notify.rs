//! Talking to whoever watches the run while it happens: systemd (READY=1, STATUS= with live
//! progress, WATCHDOG=1 while work progresses, STOPPING=1) and a person at a terminal (a progress
//! line). Outside systemd the notify calls do nothing.
//!
//! The watchdog is fed only when the activity counter moved since the last tick, so a run that
//! hangs stops feeding it and `WatchdogSec=` ends it; a run that is merely slow keeps it fed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

use crate::report::Stats;

/// What a command's live progress is read from: the backup's figures, or a restore's.
pub trait Watched: Send + Sync + 'static {
    /// The one-line status for `systemctl status` and the terminal.
    fn status_line(&self, elapsed: Duration) -> String;
    /// A number that grows whenever any stage makes progress: what the watchdog is fed on.
    fn activity(&self) -> u64;
}

impl Watched for Stats {
    fn status_line(&self, elapsed: Duration) -> String {
        Stats::status_line(self, elapsed)
    }

    fn activity(&self) -> u64 {
        Stats::activity(self)
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(2);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Live progress until dropped.
pub struct Progress {
    task: JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// `bar`: draw a progress line on the terminal (a person running it by hand).
    pub fn start<W: Watched>(
        stats: Arc<W>,
        started: Instant,
        bar: Option<indicatif::ProgressBar>,
    ) -> Progress {
        let watchdog = sd_notify::watchdog_enabled();
        // Tick at least twice per watchdog period, as systemd recommends.
        let tick = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let task_bar = bar.clone();
        let task = tokio::spawn(async move {
            let mut last_activity = u64::MAX;
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let line = stats.status_line(started.elapsed());
                let activity = stats.activity();
                if watchdog.is_some() && activity != last_activity {
                    send(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
                } else {
                    status(&line);
                }
                last_activity = activity;
                if let Some(b) = &task_bar {
                    b.set_message(line);
                }
            }
        });
        Progress { task, bar }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
