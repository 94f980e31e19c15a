//! A stop request (SIGTERM from `systemctl stop` or shutdown, SIGINT from a terminal), shared by
//! every stage of a command: in a backup no new upload starts, multipart uploads in flight are
//! kept for the next run to continue (`state::uploads`), what completed is kept in the manifest,
//! and the run ends as a failure that says it was stopped; a restore cancels its downloads and
//! keeps the files it finished.

use tokio::sync::watch;

/// Cheap to clone; every clone sees the same request.
#[derive(Clone, Debug)]
pub struct Stop {
    rx: watch::Receiver<Option<i32>>,
    // Keeps the channel open for `Stop::never`.
    _tx: Option<std::sync::Arc<watch::Sender<Option<i32>>>>,
}

impl Stop {
    /// A stop that is never requested (tests, dry runs driven by hand).
    pub fn never() -> Stop {
        let (tx, rx) = watch::channel(None);
        Stop {
            rx,
            _tx: Some(std::sync::Arc::new(tx)),
        }
    }

    /// Stops on the first SIGTERM or SIGINT; the signal number is kept for the exit code.
    /// `consequence` says, in the warning logged then, what the command does about it.
    pub fn on_signals(consequence: &'static str) -> std::io::Result<Stop> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let sig = tokio::select! {
                _ = term.recv() => nix::libc::SIGTERM,
                _ = int.recv() => nix::libc::SIGINT,
            };
            tracing::warn!("received {}: stopping — {consequence}", signal_name(sig));
            let _ = tx.send(Some(sig));
            // Stay subscribed: a second signal must not fall back to the default (kill) while
            // the run is winding down within the unit's stop timeout.
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
        });
        Ok(Stop { rx, _tx: None })
    }

    /// The signal, once a stop was requested.
    pub fn requested(&self) -> Option<i32> {
        *self.rx.borrow()
    }

    /// Resolves when a stop is requested (never, for `Stop::never`).
    pub async fn wait(mut self) {
        let _ = self.rx.wait_for(Option::is_some).await;
        if self.requested().is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves with the signal once a stop is requested (never, for `Stop::never`).
    pub async fn signalled(self) -> i32 {
        let requested = self.clone();
        self.wait().await;
        requested.requested().unwrap_or_default()
    }

    /// The conventional exit code of a process ended by `sig`: 128 + the signal number.
    pub fn exit_code(sig: i32) -> u8 {
        (128 + sig).clamp(0, 255) as u8
    }
}

/// The name of a stop signal, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        nix::libc::SIGINT => "SIGINT",
        nix::libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
