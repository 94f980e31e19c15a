//! Attacks by someone with an ordinary account, or with write access to the bucket prefix, on a
//! program that reads every file and restores as root. Each test is one finding of the audit
//! (docs/failure-modes.md, "Hostile input") and failed on the code before its fix.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::process::{python, server_script, spawn_with_port_line, Output as ServerOutput};
use crate::common::proxy::{FaultKind, FaultPlan, Op};
use crate::common::run::{Case, Output};
use crate::common::s3::s3;
use crate::common::wait::require_root;

/// Runs `cmd` for at most `limit`; `None` when it had to be killed (it hung).
fn run_bounded(mut cmd: Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return Some(Output::from(out));
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Swaps two names of one directory with `renameat2(RENAME_EXCHANGE)` in a loop, as fast as it
/// can, until dropped: what a user does to make the walk see one file and the read another.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(pairs: Vec<(PathBuf, PathBuf)>) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for (a, b) in &pairs {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        a,
                        nix::fcntl::AT_FDCWD,
                        b,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
            }
            swaps
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Finding 1: with `TARGET/link -> elsewhere` planted before a restore, an object
/// `link/profile.d/x.sh` was written to `elsewhere/profile.d/x.sh`, as root; with `--overwrite`
/// it replaced a root-owned file there.
#[test]
fn restore_never_writes_through_a_symlink_below_the_target() {
    let c = Case::new("restore-symlink");
    c.write("link/profile.d/x.sh", b"echo owned\n");
    c.write("link/secret", b"attacker's version\n");
    c.write("home/alice/notes.txt", b"notes\n");
    assert_eq!(c.run(&["run"]).code, 0);

    let outside = c.root.join("elsewhere");
    fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("secret");
    fs::write(&victim, b"root's own\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let to = c.root.join("target");
    fs::create_dir_all(&to).unwrap();
    symlink(&outside, to.join("link")).unwrap();

    for args in [
        &["restore", "--to"][..],
        &["restore", "--overwrite", "--to"][..],
    ] {
        let mut args = args.to_vec();
        let to_arg = to.to_str().unwrap().to_owned();
        args.push(&to_arg);
        let out = c.run(&args);
        assert_eq!(
            out.code, 2,
            "{args:?}: file errors, not success\n{}",
            out.stderr
        );
        let names: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["secret"],
            "{args:?}: something was written outside the target"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"root's own\n", "{args:?}");
        assert!(
            out.stderr.contains(&format!(
                "{} is a symlink or not a directory",
                to.join("link").display()
            )),
            "{args:?}: the symlink is named\n{}",
            out.stderr
        );
        // The rest of the restore went on.
        assert_eq!(
            fs::read(to.join("home/alice/notes.txt")).unwrap(),
            b"notes\n"
        );
    }
    // Directories come back with the modes the snapshot recorded.
    assert_eq!(
        fs::metadata(to.join("home/alice")).unwrap().mode() & 0o777,
        fs::metadata(c.src.join("home/alice")).unwrap().mode() & 0o777
    );
    c.assert_no_delete();
}

/// Finding 2: a user who swaps their file for a symlink to a root-only file between the walk and
/// the read got that file's content uploaded under their own key (32 of 43 attempts).
#[test]
fn a_file_swapped_for_a_symlink_is_never_read_through_it() {
    let c = Case::new("swap-symlink");
    let secret = c.root.join("root-only");
    fs::write(&secret, b"THE ROOT-ONLY SECRET").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let mut pairs = Vec::new();
    for i in 0..40 {
        let file = c.write(&format!("u/f{i:02}"), format!("my own file {i}").as_bytes());
        let link = c.src.join(format!("u/l{i:02}"));
        symlink(&secret, &link).unwrap();
        pairs.push((file, link));
    }
    let swapper = Swapper::start(pairs);
    let mut replaced = 0;
    for _ in 0..5 {
        let out = c.run(&["run", "--force"]);
        assert!(out.code == 0, "{}", out.stderr);
        replaced += out.figure("vanished");
        for key in s3().list_keys(&c.dest) {
            let body = s3().get(&c.dest, &key).body;
            assert!(
                !body.windows(20).any(|w| w == b"THE ROOT-ONLY SECRET"),
                "{key} holds the root-only file's bytes"
            );
        }
    }
    let swaps = swapper.finish();
    assert!(swaps > 1000, "the race ran ({swaps} swaps)");
    assert!(
        replaced > 0,
        "some reads met a swapped name and were refused"
    );
}

/// Finding 4: a file swapped for a FIFO made `open` wait for a writer forever, in the backup
/// and in `verify --full`; SIGTERM could not end it.
#[test]
fn a_file_swapped_for_a_fifo_does_not_hang_the_run_or_verify() {
    let c = Case::new("swap-fifo");
    let mut pairs = Vec::new();
    for i in 0..20 {
        let file = c.write(&format!("p/f{i:02}"), format!("content {i}").as_bytes());
        let fifo = c.src.join(format!("p/q{i:02}"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        pairs.push((file, fifo));
    }
    let swapper = Swapper::start(pairs);
    for round in 0..4 {
        for args in [&["run", "--force"][..], &["verify", "--full"][..]] {
            let out = run_bounded(c.command(args, None), Duration::from_secs(60))
                .unwrap_or_else(|| panic!("round {round}: {args:?} hung on a FIFO"));
            assert!(
                matches!(out.code, 0 | 2 | 4),
                "round {round}: {args:?} exit {}\n{}",
                out.code,
                out.stderr
            );
        }
    }
    drop(swapper);
}

/// Finding 3: objects whose metadata says mode 104755 / 106777 and uid 0 were restored
/// `-rwsr-xr-x root:root` and `-rwsrwsrwx`. Metadata is covered by no checksum.
#[test]
fn restore_strips_set_id_bits_unless_asked() {
    let c = Case::new("setid");
    let client = s3().direct_client();
    for (name, mode) in [("suid", "104755"), ("sgid", "106777")] {
        let body = format!("#!/bin/sh\necho {name}\n");
        s3().block_on(
            client
                .put_object()
                .bucket(&c.dest.bucket)
                .key(c.key(name))
                .body(body.into_bytes().into())
                .metadata("nightcopy-mtime-ns", "1700000000000000000")
                .metadata("nightcopy-mode", mode)
                .metadata("nightcopy-uid", "0")
                .metadata("nightcopy-gid", "0")
                .send(),
        )
        .unwrap();
    }
    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        fs::metadata(to.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::metadata(to.join("sgid")).unwrap().mode() & 0o7777,
        0o777
    );

    let kept = c.root.join("kept");
    let out = c.run(&["restore", "--keep-setid", "--to", kept.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        fs::metadata(kept.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(kept.join("sgid")).unwrap().mode() & 0o7777,
        0o6777
    );
}

/// A config with `endpoint` as destination.endpoint-url (and `extra` appended), for the URL
/// checks; returns its path.
fn config_with(c: &Case, endpoint: &str, extra: &str) -> PathBuf {
    let text = format!(
        "source:\n  path: {}\n  require-mountpoint: false\ndestination:\n  bucket: {}\n  \
         region: us-east-1\n{endpoint}  force-path-style: true\nstate-dir: {}\nmetrics:\n  \
         cloudwatch: false\nguard:\n  min-interval: 0s\n{extra}",
        c.src.display(),
        c.dest.bucket,
        c.state_dir().display()
    );
    let p = c.root.join("url-config.yaml");
    fs::write(&p, text).unwrap();
    p
}

fn run_config(config: &Path, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nightcopy"));
    cmd.args(["run", "--config"]).arg(config);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in s3().env() {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Output::from(out)
}

/// Finding 5: `http://[::1]@other-host:9000` and `http://127.0.0.1:80@other-host` passed as
/// loopback (the request, signed, with its session token, went to other-host in clear text); the
/// heartbeat URL was not checked; endpoints from the environment bypassed the check.
#[test]
fn every_endpoint_form_that_leaves_loopback_in_clear_text_is_refused_before_anything_is_sent() {
    let c = Case::new("url-forms");
    c.write("f.txt", b"data");
    let port = s3().endpoint.rsplit(':').next().unwrap().to_owned();
    let userinfo_v6 = format!("  endpoint-url: http://[::1]@other-host.invalid:{port}\n");
    let userinfo_v4 = format!("  endpoint-url: http://127.0.0.1:{port}@other-host.invalid\n");
    let good = format!("  endpoint-url: {}\n", s3().endpoint);
    /// (endpoint line, extra config, environment, what the refusal names)
    type UrlCase<'a> = (String, String, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<UrlCase> = vec![
        (userinfo_v6, String::new(), vec![], "user name or password"),
        (userinfo_v4, String::new(), vec![], "user name or password"),
        (
            good.clone(),
            "heartbeat-url: http://hc.invalid/ping/token\n".into(),
            vec![],
            "heartbeat-url",
        ),
        (
            good.clone(),
            String::new(),
            vec![("AWS_ENDPOINT_URL_S3", "http://s3.invalid:9000".into())],
            "AWS_ENDPOINT_URL_S3 (environment)",
        ),
        (
            good.clone(),
            String::new(),
            vec![(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{port}@s3.invalid"),
            )],
            "AWS_ENDPOINT_URL (environment)",
        ),
    ];
    for (endpoint, extra, env, want) in cases {
        let config = config_with(&c, &endpoint, &extra);
        let out = run_config(&config, &env);
        assert_eq!(out.code, 78, "{endpoint}{extra}{env:?}\n{}", out.stderr);
        assert!(out.stderr.contains(want), "{want}\n{}", out.stderr);
        assert!(!out.stderr.contains("token"), "{}", out.stderr);
    }
    assert!(s3().requests(&c.dest).is_empty(), "nothing may be sent");
}

/// Finding 5, the profile route: an `endpoint_url` in an AWS profile is seen by no config check.
/// Here it names a host that is not loopback by its name but reaches the test server (a private
/// /etc/hosts maps it to 127.0.0.1): the request must be refused before it is signed, and the
/// server must see nothing.
#[test]
fn a_profile_endpoint_over_plain_http_to_another_host_is_refused_before_signing() {
    if !require_root(
        "hostile::a_profile_endpoint_over_plain_http_to_another_host_is_refused_before_signing",
        "it gives the binary a private /etc/hosts in a private mount namespace",
    ) {
        return;
    }
    let c = Case::new("url-profile");
    c.write("f.txt", b"data");
    let port = s3().endpoint.rsplit(':').next().unwrap().to_owned();
    let hosts = c.root.join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 other-host.test\n").unwrap();
    let profile = c.root.join("aws-config");
    fs::write(
        &profile,
        format!("[default]\nendpoint_url = http://other-host.test:{port}\n"),
    )
    .unwrap();
    let config = config_with(&c, "", "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nightcopy"));
    cmd.args(["run", "--config"]).arg(&config);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in s3().env() {
        cmd.env(k, v);
    }
    cmd.env("AWS_CONFIG_FILE", &profile);
    let hosts_c = std::ffi::CString::new(hosts.to_str().unwrap()).unwrap();
    // SAFETY: only system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            crate::common::run::private_mount_namespace()?;
            nix::mount::mount(
                Some(hosts_c.as_c_str()),
                c"/etc/hosts",
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refuses to send a signed request over plain http to other-host.test"),
        "{stderr}"
    );
    assert!(
        s3().requests(&c.dest).is_empty(),
        "nothing may reach the server"
    );
}

/// Finding 6: the part size grows for huge files, so one 1 TiB sparse file (any user can make
/// one, using no disk) held 16 parts of 105 MiB, above the unit's MemoryMax, every night.
#[test]
fn a_huge_sparse_file_keeps_memory_within_the_part_budget() {
    let c = Case::new("sparse");
    let f = fs::File::create(c.src.join("huge.img")).unwrap();
    f.set_len(1 << 40).unwrap();
    // Parts never complete: whatever nightcopy reads ahead stays in its memory.
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(1.0, &[FaultKind::Stall], 1)
                .only(&[Op::UploadPart])
                .stall_for(Duration::from_secs(120)),
        ),
    );
    let mut child = c
        .command(&["run"], None)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The bound: 16 × 5 MiB of parts, or one part of a file whose parts had to grow, plus the
    // program itself. Before the fix every request slot held a 105 MiB part: 1.7 GB.
    let bound_kib = 400 * 1024;
    let mut peak_kib = 0u64;
    let started = Instant::now();
    // Reading and hashing a 105 MiB part takes seconds in a debug build: watch long enough for
    // several parts to have been read if nothing held them back.
    while started.elapsed() < Duration::from_secs(30) && peak_kib < bound_kib {
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(hwm) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                peak_kib = hwm
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()
                    .unwrap_or(peak_kib);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let parts_in_flight = s3()
        .counts(&c.dest)
        .get(&Op::UploadPart)
        .copied()
        .unwrap_or(0);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    // A stop does not wait for a part stuck in flight, nor for memory a stuck part holds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = None;
    while status.is_none() && Instant::now() < deadline {
        status = child.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    s3().set_faults(&c.dest, None);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(143),
        "SIGTERM ended the run"
    );
    // The test config: concurrency 16 × part-size 5 MiB = 80 MiB of parts; a 1 TiB file's parts
    // are 105 MiB, so one at a time. Before: 16 × 105 MiB.
    assert!(peak_kib > 0, "no VmHWM read");
    assert!(
        peak_kib < bound_kib,
        "peak RSS {} MiB while parts were held ({parts_in_flight} parts in flight)",
        peak_kib / 1024
    );
    // Every part stalls, so the parts sent are the parts held: one, as its 105 MiB exceed the
    // 80 MiB budget on their own.
    assert_eq!(parts_in_flight, 1, "parts held at once");
}

/// Finding 7: a file name with a newline and escape codes printed a forged `INFO backup
/// succeeded` line and rewrote the terminal title.
#[test]
fn a_name_with_a_newline_and_escape_codes_is_one_escaped_line() {
    let c = Case::new("log-injection");
    let name = OsString::from_vec(b"x\nINFO backup succeeded \x1b]0;owned\x07 \xff".to_vec());
    fs::write(c.src.join(&name), b"data").unwrap();
    let out = c.run(&["-v", "run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !out.stderr.contains('\x1b'),
        "an escape code reached stderr"
    );
    assert!(
        !out.stderr
            .lines()
            .any(|l| l.starts_with("INFO backup succeeded")),
        "a forged line:\n{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("x\\nINFO backup succeeded \\x1b]0;owned\\x07 \\xff"),
        "the name is shown escaped:\n{}",
        out.stderr
    );
    // The dry run's list on stdout is one line per file too.
    fs::write(c.src.join(&name), b"changed").unwrap();
    let out = c.run(&["run", "--dry-run"]);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
}

/// Finding 8: "no SHA-256 covers it: a multipart object…" was printed for single-part objects.
/// Such an object is now checked by its ETag (the MD5 of a single-part upload), and nothing calls
/// it multipart; the wording for one that nothing covers is checked in `integrity`'s unit tests.
#[test]
fn a_single_part_object_without_sha256_is_checked_by_its_etag_not_called_multipart() {
    let c = Case::new("unverified-single");
    s3().block_on(
        s3().direct_client()
            .put_object()
            .bucket(&c.dest.bucket)
            .key(c.key("plain.txt"))
            .body(b"from another tool".to_vec().into())
            .send(),
    )
    .unwrap();
    let (to, out) = c.restore_into("restored");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("1 files restored")
            && out.stderr.contains("0 not verifiable by SHA-256")
            && !out.stderr.contains("multipart"),
        "{}",
        out.stderr
    );
    assert_eq!(
        fs::read(to.join("plain.txt")).unwrap(),
        b"from another tool"
    );
}

/// Writes a CA and a server certificate for `name` signed by it into `dir`; returns (ca, cert,
/// key) paths.
fn make_certificates(dir: &Path, tag: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = dir.join(format!("{tag}-ca.key"));
    let ca = dir.join(format!("{tag}-ca.pem"));
    let key = dir.join(format!("{tag}.key"));
    let csr = dir.join(format!("{tag}.csr"));
    let cert = dir.join(format!("{tag}.pem"));
    let ext = dir.join(format!("{tag}.ext"));
    fs::write(&ext, format!("subjectAltName=DNS:{name}\n")).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("openssl is needed for the TLS tests (apt-get install openssl): {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &PathBuf| p.to_str().unwrap().to_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=nightcopy test CA {tag}"),
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (ca, cert, key)
}

/// HTTPS, as every real endpoint speaks it: through a TLS-terminating front with a test CA that
/// the run is told to trust the way an operator would (`SSL_CERT_FILE`), the copy works; a
/// certificate for another name, or from a CA the host does not trust, is a fatal one-line error
/// that says so.
#[test]
fn https_with_a_trusted_ca_works_and_a_wrong_name_or_ca_is_refused_in_one_line() {
    let c = Case::new("tls");
    c.write("a/b.txt", b"over tls");
    let dir = c.root.join("tls");
    fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = make_certificates(&dir, "good", "localhost");
    let (_, wrong_cert, wrong_key) = make_certificates(&dir, "wrong", "other.test");
    let (other_ca, _, _) = make_certificates(&dir, "other", "localhost");
    let upstream = s3().endpoint.trim_start_matches("http://").to_owned();
    let output = ServerOutput::default();
    let front = |cert: &Path, key: &Path| {
        let mut cmd = Command::new(python());
        cmd.arg(server_script("tls_proxy.py"))
            .args(["--listen", "127.0.0.1:0", "--upstream", &upstream])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
        spawn_with_port_line(cmd, &output, "tls")
            .unwrap_or_else(|e| panic!("cannot start the TLS front: {e}\n{}", output.tail()))
    };
    let (mut good, good_port) = front(&cert, &key);
    let (mut wrong, wrong_port) = front(&wrong_cert, &wrong_key);

    let run = |port: u16, trust: &Path| {
        let endpoint = format!("  endpoint-url: https://localhost:{port}\n");
        let config = config_with(&c, &endpoint, "");
        run_config(
            &config,
            &[("SSL_CERT_FILE", trust.to_str().unwrap().to_owned())],
        )
    };
    let ok = run(good_port, &ca);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(s3().get(&c.dest, &c.key("a/b.txt")).body, b"over tls");

    c.write("a/c.txt", b"second");
    for (port, trust, want) in [
        (wrong_port, &ca, "certificate"),
        (good_port, &other_ca, "certificate"),
    ] {
        let out = run(port, trust);
        assert_eq!(out.code, 1, "{}", out.stderr);
        let fatal: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("FAILED"))
            .collect();
        assert_eq!(fatal.len(), 1, "{}", out.stderr);
        assert!(fatal[0].to_lowercase().contains(want), "{}", fatal[0]);
        assert!(
            fatal[0].contains("TLS certificate was refused"),
            "the line says what to check: {}",
            fatal[0]
        );
        if let Some(line) = crate::messages::debug_structure(&out.stderr) {
            panic!("a debug structure reached stderr: {line}");
        }
    }
    for child in [&mut good, &mut wrong] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
