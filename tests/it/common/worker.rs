//! A `nightcopy worker` process for the distributed-run tests: started with its own log file,
//! stopped with SIGTERM (and SIGKILL after 30 s) when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::run::Case;

/// A worker process; stopped with SIGTERM when dropped.
pub struct Worker {
    pub child: Child,
    log: PathBuf,
}

impl Worker {
    pub fn start(c: &Case, config: Option<&Path>, n: usize) -> Worker {
        let log = c.root.join(format!("worker-{n}.log"));
        let mut cmd = match config {
            Some(cfg) => c.command_for(&["worker"], None, cfg),
            None => c.command(&["worker"], None),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Worker { child, log }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit code (SIGKILL after 30 s).
    pub fn stop(&mut self) -> Option<i32> {
        self.terminate();
        self.wait()
    }

    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// The exit code after a SIGTERM: a stopped worker first waits for its receive in flight
    /// (up to the 20 s long poll); SIGKILL after 30 s.
    pub fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}
