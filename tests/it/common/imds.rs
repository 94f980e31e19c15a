//! A strict IMDSv2 stand-in per test, so the EC2 instance-role path of aws-config's default
//! credential chain (token PUT, then token-authenticated GETs) runs for real on 127.0.0.1.
//!
//! The server is `tests/servers/imds.py` (stdlib Python). It logs every request with whether a
//! valid token came with it, so tests can assert the token flow, and it never logs credentials.
//! Each [`Imds`] is its own process, killed on drop, so tests may run in parallel.

// Each test binary compiles the whole of `common` and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::process::{python, server_script, spawn_with_port_line, Output};

/// Variables that would let the default chain find credentials (or a region, or an IMDS
/// setting) somewhere other than the stand-in. A child process running the chain should have
/// them removed; [`Imds::configure`] does that.
pub const CHAIN_ENV_REMOVE: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
    "AWS_EC2_METADATA_V1_DISABLED",
];

pub struct Imds {
    /// `http://127.0.0.1:PORT`, the value for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub endpoint: String,
    log: PathBuf,
    child: Child,
    output: Output,
    _dir: tempfile::TempDir,
}

/// One request as the stand-in logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsRequest {
    pub method: String,
    pub path: String,
    /// `valid`, `missing`, `invalid` or `expired` for a GET; `-` for the token PUT itself.
    pub token: String,
    pub status: u16,
}

/// Starts a stand-in serving `role` with the given (fake) credentials; `token` is the session
/// token it hands out. Panics with install instructions when Python is missing.
pub fn start_imds(
    role: &str,
    access_key: &str,
    secret: &str,
    token: &str,
    instance_id: &str,
    region: &str,
) -> Imds {
    let python = python();
    // Stdlib only, so any python3 will do when the cache venv is absent.
    let python = if python.is_file() {
        python
    } else {
        PathBuf::from("python3")
    };
    let dir = tempfile::Builder::new()
        .prefix("nightcopy-imds-")
        .tempdir()
        .expect("cannot create a temp dir for the IMDS log");
    let log = dir.path().join("requests.log");
    let mut cmd = Command::new(&python);
    cmd.arg(server_script("imds.py"))
        .args(["--listen", "127.0.0.1:0", "--log"])
        .arg(&log)
        .args(["--role", role])
        // Through the environment, not argv, so `ps` and a printed Command do not show them.
        .env("IMDS_ACCESS_KEY_ID", access_key)
        .env("IMDS_SECRET_ACCESS_KEY", secret)
        .env("IMDS_SESSION_TOKEN", token)
        .args(["--instance-id", instance_id])
        .args(["--region", region]);
    let output = Output::default();
    let (child, port) = spawn_with_port_line(cmd, &output, "imds").unwrap_or_else(|e| {
        panic!(
            "cannot start the IMDS stand-in with {}: {e}\n{}\nrun scripts/test-tools.sh or set \
             NIGHTCOPY_PYTHON to a Python 3.11",
            python.display(),
            output.tail()
        )
    });
    Imds {
        endpoint: format!("http://127.0.0.1:{port}"),
        log,
        child,
        output,
        _dir: dir,
    }
}

impl Imds {
    /// The requests served so far, in order.
    pub fn requests(&self) -> Vec<ImdsRequest> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => panic!("cannot read the IMDS log {}: {e}", self.log.display()),
        };
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 4, "bad IMDS log line {line:?}");
                ImdsRequest {
                    method: f[0].to_owned(),
                    path: f[1].to_owned(),
                    token: f[2].to_owned(),
                    status: f[3].parse().expect("IMDS log status"),
                }
            })
            .collect()
    }

    /// Path of the raw request log (tab-separated: METHOD, PATH, TOKEN, STATUS).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The variables to set for the default chain to use this stand-in, with credential and
    /// config files neutralised. For an in-process `Env`, or a child process's environment.
    pub fn chain_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.endpoint.clone()),
            ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_owned()),
        ]
    }

    /// Prepares a child process (e.g. the nightcopy binary) to take its credentials and region
    /// from this stand-in only: [`CHAIN_ENV_REMOVE`] removed, [`Self::chain_env`] set.
    pub fn configure(&self, cmd: &mut Command) {
        for var in CHAIN_ENV_REMOVE {
            cmd.env_remove(var);
        }
        cmd.envs(self.chain_env());
    }

    /// What the server wrote to stdout/stderr (tracebacks), for failure messages.
    pub fn server_output(&self) -> String {
        self.output.tail()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
