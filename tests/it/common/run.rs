//! Running the real `nightcopy` binary in a test: a source tree, a state directory and a config
//! file in one temp dir, pointed at the shared S3 server (and, when a test asks, the CloudWatch
//! endpoint), with a clean environment so nothing of the developer's AWS setup leaks in.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::proxy::Op;
use super::s3::{s3, Dest, S3Server};

pub struct Case {
    _tmp: tempfile::TempDir,
    /// The S3 server the case runs against (s3s-fs unless a test picks another).
    pub server: &'static S3Server,
    pub root: PathBuf,
    pub src: PathBuf,
    pub dest: Dest,
    /// `source.require-mountpoint`: off by default, temp dirs are not mount points.
    pub require_mountpoint: bool,
    /// Extra lines inside `source:` (indented two spaces).
    pub source_extra: String,
    /// The `metrics:` section; CloudWatch is off unless a test points it at the local endpoint.
    pub metrics: String,
    /// Extra lines inside `transfer:` (indented two spaces).
    pub transfer_extra: String,
    /// Extra lines inside `destination:` (indented two spaces).
    pub destination_extra: String,
    /// Extra top-level YAML.
    pub top_extra: String,
    /// Extra environment for the child.
    pub env: Vec<(String, String)>,
    /// Environment variables to remove from the child after the S3 harness's are set.
    pub env_remove: Vec<String>,
    /// `destination.region`; None leaves it to the SDK's chain.
    pub region: Option<String>,
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Output {
    fn from(out: std::process::Output) -> Output {
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Output {
    /// A figure from the backup's summary line, e.g. `figure("files transferred")`.
    pub fn figure(&self, name: &str) -> u64 {
        summary_figure(&self.stderr, |l| l.contains(" transfer errors"), name)
    }
}

/// The number just before ` {name}` on the last line of `stderr` that `is_summary` accepts (the
/// first such number on the line).
pub fn summary_figure(stderr: &str, is_summary: impl Fn(&str) -> bool, name: &str) -> u64 {
    let line = stderr
        .lines()
        .rev()
        .find(|l| is_summary(l))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    line.match_indices(&format!(" {name}"))
        .find_map(|(at, _)| {
            let digits: String = line[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no figure {name:?} in {line}"))
}

impl Case {
    pub fn new(hint: &str) -> Case {
        Case::on(s3(), s3().dest(hint))
    }

    /// A case against `server`, writing to `dest` (one of its destinations).
    pub fn on(server: &'static S3Server, dest: Dest) -> Case {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let src = root.join("src");
        fs::create_dir_all(&src).unwrap();
        Case {
            server,
            dest,
            _tmp: tmp,
            root,
            src,
            require_mountpoint: false,
            source_extra: String::new(),
            transfer_extra: String::new(),
            destination_extra: String::new(),
            metrics: "metrics:\n  cloudwatch: false\n".into(),
            top_extra: "guard:\n  min-interval: 0s\n".into(),
            env: Vec::new(),
            env_remove: Vec::new(),
            region: Some(server.region.clone()),
        }
    }

    pub fn write(&self, rel: &str, content: &[u8]) -> PathBuf {
        let p = self.src.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        p
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        let server = self.server;
        let text = format!(
            "source:\n  path: {src}\n  require-mountpoint: {mount}\n{extra}\
             destination:\n  bucket: {bucket}\n  prefix: \"{prefix}\"\n{region}  \
             endpoint-url: {endpoint}\n  force-path-style: true\n{destination}\
             transfer:\n  multipart-threshold: 6MiB\n  part-size: 5MiB\n{transfer}\
             state-dir: {state}\n{metrics}{top}",
            src = self.src.display(),
            mount = self.require_mountpoint,
            extra = self.source_extra,
            bucket = self.dest.bucket,
            prefix = self.dest.prefix,
            region = self
                .region
                .as_ref()
                .map(|r| format!("  region: {r}\n"))
                .unwrap_or_default(),
            endpoint = server.endpoint,
            destination = self.destination_extra,
            state = self.state_dir().display(),
            transfer = self.transfer_extra,
            metrics = self.metrics,
            top = self.top_extra,
        );
        // Written beside and renamed over: a process started a moment ago may be reading it.
        let p = self.root.join("config.yaml");
        let tmp = self
            .root
            .join(format!("config.yaml.{}", std::process::id()));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &p).unwrap();
        p
    }

    /// The command, ready to run: config written, environment set.
    pub fn command(&self, args: &[&str], wrapper: Option<&[&str]>) -> Command {
        let config = self.config_path();
        self.command_for(args, wrapper, &config)
    }

    /// [`Case::command`] with another config file (say, one edited for one worker).
    pub fn command_for(
        &self,
        args: &[&str],
        wrapper: Option<&[&str]>,
        config: &std::path::Path,
    ) -> Command {
        let bin = env!("CARGO_BIN_EXE_nightcopy");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args).arg("--config").arg(config);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in self.server.env() {
            cmd.env(k, v);
        }
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn run_with(&self, args: &[&str], wrapper: Option<&[&str]>) -> Output {
        self.command(args, wrapper).output().unwrap().into()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None)
    }

    /// `nightcopy restore --to ROOT/dir` of everything: the target and what the run said.
    pub fn restore_into(&self, dir: &str) -> (PathBuf, Output) {
        let to = self.root.join(dir);
        let out = self.run(&["restore", "--to", to.to_str().unwrap()]);
        (to, out)
    }

    pub fn key(&self, rel: &str) -> String {
        format!("{}{}", self.dest.prefix, rel)
    }

    pub fn ops(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.server.requests(&self.dest) {
            *m.entry(format!("{:?}", r.op)).or_default() += 1;
        }
        m
    }

    pub fn count(&self, op: Op) -> usize {
        self.server
            .requests(&self.dest)
            .iter()
            .filter(|r| r.op == op)
            .count()
    }

    pub fn assert_no_delete(&self) {
        let deletes: Vec<_> = self
            .server
            .requests_with_own(&self.dest)
            .into_iter()
            .filter(|r| matches!(r.op, Op::DeleteObject | Op::DeleteObjects))
            .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
            .collect();
        assert!(deletes.is_empty(), "a delete was sent: {deletes:?}");
    }
}

/// Root reads everything; to test an unreadable file the binary runs without the DAC capabilities.
pub fn unprivileged() -> Option<&'static [&'static str]> {
    if nix::unistd::geteuid().is_root() {
        Some(&[
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search",
        ])
    } else {
        None
    }
}

/// For a child's `pre_exec`: a mount namespace of its own whose mounts do not propagate back, so
/// a test can mount over paths the child sees without touching the host. Needs root. Only system
/// calls: safe between fork and exec.
pub fn private_mount_namespace() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// Mounts a tmpfs at `target` (in the caller's mount namespace).
pub fn mount_tmpfs(target: &std::ffi::CStr) -> nix::Result<()> {
    nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
}

/// Mounts a tmpfs at `target` with mount options, e.g. `c"size=64k,mode=0700"`.
pub fn mount_tmpfs_with(target: &std::ffi::CStr, options: &std::ffi::CStr) -> nix::Result<()> {
    nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(options),
    )
}

/// Names that have broken S3 clients: empty file, deep nesting, spaces, `+` and `%` (both mean
/// something in URLs), non-ASCII, and names that sort before `a/` in key order but after it as
/// paths. Each with a body of its own.
pub const AWKWARD_NAMES: &[(&str, &[u8])] = &[
    ("empty", b""),
    ("top.txt", b"top"),
    ("a/b/c/deep.txt", b"deep"),
    ("with space/and space.txt", b"spaces"),
    ("plus+sign/a+b.txt", b"plus"),
    ("percent%/100%.txt", b"percent"),
    ("ünïcödé/日本語.txt", "unicode".as_bytes()),
    ("a-b", b"sorts before a/"),
    ("a.txt", b"also before a/"),
];

pub fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
