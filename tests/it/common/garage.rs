//! A single-node Garage on 127.0.0.1, for the tests that need what s3s-fs and moto do not keep:
//! the SHA-256 of each part of an unfinished multipart upload, listed by ListParts (as AWS does).
//! Garage 2.5.0 is installed by `scripts/test-tools.sh`; a missing binary is a test failure
//! naming the install step, never a skip.
//!
//! Start-up: a config with fresh ports and secrets in a temp folder, `garage server`, then the
//! CLI assigns the node a layout and imports one key allowed to create buckets, so the harness
//! makes each test's bucket with CreateBucket like on the other servers.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{free_port, spawn_tied};
use super::s3::{new_random_hex, sweep_stale_dirs};

const GARAGE_VERSION: &str = "2.5.0";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const DIR_PREFIX: &str = "nightcopy-garage-";

pub struct Garage {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub log: PathBuf,
    binary: PathBuf,
    config: PathBuf,
    _child: std::process::Child,
}

fn binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os("NIGHTCOPY_GARAGE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(format!(
            ".cache/nightcopy-tools/garage-{GARAGE_VERSION}/bin/garage"
        )),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the S3 test server Garage {GARAGE_VERSION} is not installed at {}: run \
             `scripts/test-tools.sh` (or `make test`, which runs it), or point NIGHTCOPY_GARAGE \
             at the binary",
            path.display()
        ))
    }
}

impl Garage {
    pub fn start() -> Result<Garage, String> {
        let binary = binary()?;
        // Its data (hundreds of MiB after the resume tests) goes with the test process.
        sweep_stale_dirs(DIR_PREFIX);
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            new_random_hex(4)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (s3_port, rpc, admin) = (free_port(), free_port(), free_port());
        let config = dir.join("garage.toml");
        let text = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
             [s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\n",
            d = dir.display(),
            secret = new_random_hex(32),
            token = new_random_hex(16),
        );
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        let log = dir.join("garage.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out);
        let child = spawn_tied(cmd).map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let garage = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            // Garage's own formats: GK + 24 hex digits, and 64 hex digits.
            access_key: format!("GK{}", new_random_hex(12)),
            secret_key: new_random_hex(32),
            log,
            binary,
            config,
            _child: child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = format!("127.0.0.1:{s3_port}").parse().unwrap();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "Garage did not accept connections within {START_TIMEOUT:?}; its log:\n{}",
                    std::fs::read_to_string(&garage.log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let node = garage.cli(&["node", "id", "-q"])?;
        let node = node.split('@').next().unwrap_or_default().trim().to_owned();
        garage.cli(&["layout", "assign", "-z", "dc1", "-c", "10G", &node])?;
        garage.cli(&["layout", "apply", "--version", "1"])?;
        let (id, secret) = (garage.access_key.clone(), garage.secret_key.clone());
        garage.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "nightcopy-test",
            &id,
            &secret,
        ])?;
        garage.cli(&["key", "allow", "--create-bucket", &id])?;
        Ok(garage)
    }

    /// The CLI, retried while the node settles after its start (a layout takes a moment).
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = Command::new(&self.binary)
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if Instant::now() > deadline {
                // The arguments may hold the secret key: only the subcommand is named.
                return Err(format!(
                    "garage {} failed: {}",
                    args.first().unwrap_or(&""),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
