//! A FUSE mount of a test's source tree through scripts/slowfs.py (the benchmark's slow mount),
//! here without delay: what the tests want from it is the count of operations the kernel sent,
//! which is what each round trip costs on a network or FUSE client with its caches off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::process::{python, spawn_with_first_line, Output};

pub struct SlowFs {
    child: Child,
    pub mountpoint: PathBuf,
    stats: PathBuf,
    output: Output,
}

impl SlowFs {
    /// Mounts `source` at `mountpoint` (created). Fails the test, naming what is missing, when
    /// FUSE or mfusepy is not there: a test that needs the mount never silently passes without it.
    pub fn mount(source: &Path, mountpoint: &Path) -> SlowFs {
        SlowFs::mount_with(source, mountpoint, &[])
    }

    /// The same, writable (`--rw`): what a restore into a network or FUSE filesystem writes
    /// through, counted.
    pub fn mount_rw(source: &Path, mountpoint: &Path) -> SlowFs {
        SlowFs::mount_with(source, mountpoint, &["--rw"])
    }

    fn mount_with(source: &Path, mountpoint: &Path, extra: &[&str]) -> SlowFs {
        std::fs::create_dir_all(mountpoint).unwrap();
        let stats = mountpoint.with_extension("stats.json");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slowfs.py");
        let mut cmd = Command::new(python());
        cmd.arg(script)
            .arg(source)
            .arg(mountpoint)
            .args(["--delay-ms", "0", "--stats"])
            .arg(&stats)
            .args(extra);
        let output = Output::default();
        let (child, first) = spawn_with_first_line(cmd, &output, "slowfs", "`ready`")
            .unwrap_or_else(|e| {
                panic!(
                    "cannot mount slowfs (needs /dev/fuse, root, libfuse3 and mfusepy, \
                     which scripts/test-tools.sh installs): {e}\n{}",
                    output.tail()
                )
            });
        assert_eq!(first.trim(), "ready", "slowfs: {}", output.tail());
        SlowFs {
            child,
            mountpoint: mountpoint.to_owned(),
            stats,
            output,
        }
    }

    fn generation(&self) -> u64 {
        self.read()["generation"].as_u64().unwrap_or(0)
    }

    fn read(&self) -> serde_json::Value {
        std::fs::read(&self.stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Sends `signal` and waits for the stats file that answers it.
    fn ask(&self, signal: nix::sys::signal::Signal) -> serde_json::Value {
        let before = self.generation();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let doc = self.read();
            if doc["generation"].as_u64().unwrap_or(0) > before {
                return doc;
            }
            assert!(
                Instant::now() < deadline,
                "slowfs did not answer {signal}: {}",
                self.output.tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets every counter to zero.
    pub fn reset(&self) {
        self.ask(nix::sys::signal::Signal::SIGUSR2);
    }

    /// The operations the kernel sent since the last reset, by name.
    pub fn ops(&self) -> BTreeMap<String, u64> {
        let doc = self.ask(nix::sys::signal::Signal::SIGUSR1);
        doc["ops"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        // umount ends the daemon with status 0; a lazy unmount if something still holds it.
        let ok = Command::new("umount")
            .arg(&self.mountpoint)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
