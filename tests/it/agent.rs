//! The nightly run as operators see it: instance-role credentials through IMDSv2, one
//! PutMetricData read back from a real CloudWatch API, the run guard, the run record, the
//! systemd notify protocol, the heartbeat — each through the real binary.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::cloudwatch::{cloudwatch, unique_namespace};
use crate::common::imds::start_imds;
use crate::common::proxy::{FaultKind, FaultPlan, Op};
use crate::common::run::{unprivileged, Case, Output};
use crate::common::s3::s3;
use crate::common::wait::{clock_past_second, require_root, until, wait_for};

const SIX: [&str; 6] = [
    "LastSuccess",
    "FilesTransferred",
    "BytesTransferred",
    "Checks",
    "TransferErrors",
    "ElapsedSeconds",
];

/// Points the case's metrics at the local CloudWatch endpoint under a namespace of its own.
fn with_cloudwatch(c: &mut Case, test: &str) -> String {
    let ns = unique_namespace(test);
    c.metrics = format!(
        "metrics:\n  cloudwatch: true\n  namespace: {ns}\n  endpoint-url: {}\n  \
         instance-id: i-{test}\n  dimensions:\n    Environment: test\n",
        cloudwatch().endpoint
    );
    ns
}

fn point(ns: &str, metric: &str, instance: &str) -> Vec<f64> {
    cloudwatch().datapoints(
        ns,
        metric,
        &[("InstanceId", instance), ("Environment", "test")],
    )
}

#[test]
fn one_put_metric_data_with_six_figures_that_read_back() {
    let mut c = Case::new("cw-six");
    let ns = with_cloudwatch(&mut c, "six");
    c.write("a.txt", b"12345");
    c.write("b.txt", b"123");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let puts = cloudwatch().put_requests(&ns);
    assert_eq!(puts.len(), 1, "exactly one PutMetricData: {puts:?}");
    assert_eq!(puts[0].metric_data, 6);
    let inst = "i-six";
    assert_eq!(point(&ns, "LastSuccess", inst), [1.0]);
    assert_eq!(point(&ns, "FilesTransferred", inst), [2.0]);
    assert_eq!(point(&ns, "BytesTransferred", inst), [8.0]);
    assert_eq!(point(&ns, "Checks", inst), [0.0]);
    assert_eq!(point(&ns, "TransferErrors", inst), [0.0]);
    let elapsed = point(&ns, "ElapsedSeconds", inst);
    assert!(elapsed.len() == 1 && elapsed[0] > 0.0, "{elapsed:?}");
    let names: Vec<String> = cloudwatch().metrics(&ns).into_iter().map(|m| m.0).collect();
    for m in SIX {
        assert!(names.contains(&m.to_string()), "{m} missing from {names:?}");
    }
}

#[test]
fn a_failed_run_publishes_last_success_zero_and_copies_nothing() {
    let mut c = Case::new("not-mounted");
    let ns = with_cloudwatch(&mut c, "notmounted");
    c.write("a.txt", b"a");
    // The temp dir is not a mount point: an empty mount point must never look like a success.
    c.require_mountpoint = true;
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("is the filesystem mounted?"),
        "{}",
        out.stderr
    );
    assert_eq!(c.count(Op::PutObject), 0);
    assert_eq!(cloudwatch().put_requests(&ns).len(), 1);
    assert_eq!(point(&ns, "LastSuccess", "i-notmounted"), [0.0]);
    // The record says so too.
    let status = c.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["outcome"], "failed");
    assert_eq!(v["exit_code"], 1);
}

#[test]
fn tolerated_errors_still_count_as_success_everywhere() {
    let mut c = Case::new("tolerated");
    let ns = with_cloudwatch(&mut c, "tolerated");
    c.top_extra.push_str("success-max-errors: 1\n");
    c.write("ok.txt", b"ok");
    let locked = c.write("locked.txt", b"no");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let out = c.run_with(&["run"], unprivileged());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("tolerated by success-max-errors"),
        "{}",
        out.stderr
    );
    assert_eq!(point(&ns, "LastSuccess", "i-tolerated"), [1.0]);
    assert_eq!(point(&ns, "TransferErrors", "i-tolerated"), [1.0]);
}

#[test]
fn unpublished_metrics_are_said_and_change_the_exit_code() {
    let mut c = Case::new("cw-down");
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.metrics = format!(
        "metrics:\n  cloudwatch: true\n  instance-id: i-down\n  endpoint-url: http://127.0.0.1:{port}\n"
    );
    c.write("a.txt", b"a");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("metrics were NOT published"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("completed successfully"),
        "{}",
        out.stderr
    );
    // The backup itself happened.
    assert_eq!(s3().list_keys(&c.dest), [c.key("a.txt")]);
}

#[test]
fn textfile_carries_the_same_figures_and_keeps_the_last_success_across_failures() {
    let mut c = Case::new("textfile");
    let prom = c.root.join("nightcopy.prom");
    c.metrics = format!(
        "metrics:\n  cloudwatch: false\n  textfile: {}\n",
        prom.display()
    );
    c.write("a.txt", b"abc");
    assert_eq!(c.run(&["run"]).code, 0);
    let text = fs::read_to_string(&prom).unwrap();
    for line in [
        "nightcopy_last_run_success 1\n",
        "nightcopy_last_run_files_transferred 1\n",
        "nightcopy_last_run_bytes_transferred 3\n",
        "nightcopy_last_run_transfer_errors 0\n",
        "nightcopy_last_run_exit_code 0\n",
        "# TYPE nightcopy_last_success_timestamp_seconds gauge\n",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    };
    let succeeded = value(&text, "nightcopy_last_success_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - succeeded).abs() < 120.0, "{succeeded} vs {now}");

    // A failed night: the last run says so, the last success stays where it was. The textfile
    // keeps whole seconds: the failed run ends in a later one.
    clock_past_second(succeeded as u64);
    c.require_mountpoint = true;
    assert_eq!(c.run(&["run"]).code, 1);
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(value(&text, "nightcopy_last_run_success"), 0.0);
    assert_eq!(value(&text, "nightcopy_last_run_exit_code"), 1.0);
    assert_eq!(
        value(&text, "nightcopy_last_success_timestamp_seconds"),
        succeeded
    );
    assert!(value(&text, "nightcopy_last_run_timestamp_seconds") > succeeded);
}

#[test]
fn instance_role_credentials_come_from_imdsv2_and_never_show() {
    let mut c = Case::new("imds");
    let env: std::collections::HashMap<_, _> = s3().env().into_iter().collect();
    let (key, secret) = (&env["AWS_ACCESS_KEY_ID"], &env["AWS_SECRET_ACCESS_KEY"]);
    let token = "FwoGZXIvYXdzEJr-session-token-for-tests";
    let imds = start_imds(
        "nightcopy-role",
        key,
        secret,
        token,
        "i-0123456789abcdef0",
        "us-east-1",
    );
    let ns = with_cloudwatch(&mut c, "imds");
    // The InstanceId dimension must come from IMDS: no override.
    c.metrics = c.metrics.replace("  instance-id: i-imds\n", "");
    c.region = None; // from IMDS as well
    c.env_remove = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_EC2_METADATA_DISABLED",
    ]
    .map(String::from)
    .to_vec();
    c.write("a.txt", b"role");
    let mut cmd = c.command(&["-vv", "run"], None);
    imds.configure(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stderr}\nIMDS: {}",
        imds.server_output()
    );

    // The S3 server saw requests signed with the role's key and its session token.
    let reqs = s3().requests(&c.dest);
    assert!(!reqs.is_empty());
    let token_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    };
    for r in &reqs {
        assert_eq!(
            r.access_key_id.as_deref(),
            Some(key.as_str()),
            "{} {}",
            r.method,
            r.path
        );
        assert_eq!(r.session_token_sha256.as_deref(), Some(token_sha.as_str()));
    }
    // Token first, then the role; every GET carried a valid token.
    let log = imds.requests();
    let put = log
        .iter()
        .position(|r| r.method == "PUT" && r.path.ends_with("/api/token"));
    let creds = log
        .iter()
        .position(|r| r.path.contains("security-credentials/nightcopy-role"));
    assert!(put.is_some() && creds.is_some() && put < creds, "{log:?}");
    assert!(
        log.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.token == "valid"),
        "{log:?}"
    );
    // Region and InstanceId came from IMDS too.
    assert_eq!(
        cloudwatch().datapoints(
            &ns,
            "LastSuccess",
            &[
                ("InstanceId", "i-0123456789abcdef0"),
                ("Environment", "test")
            ]
        ),
        [1.0]
    );

    // No credential in anything nightcopy printed or wrote, even at -vv.
    let mut everything = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr;
    for entry in walkdir::WalkDir::new(c.state_dir()) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            everything += &String::from_utf8_lossy(&fs::read(entry.path()).unwrap());
        }
    }
    everything += &c.run(&["check-config"]).stdout;
    everything += &c.run(&["status", "--json"]).stdout;
    for secret_value in [secret.as_str(), token] {
        assert!(!everything.contains(secret_value), "a credential leaked");
    }
    // Nor a request signature (the Authorization header's, or a presigned URL's).
    for signed in ["Signature=", "X-Amz-Signature", "AWS4-HMAC-SHA256"] {
        assert!(!everything.contains(signed), "a signature leaked: {signed}");
    }
}

#[test]
fn a_second_concurrent_run_exits_75_naming_the_holder() {
    let mut c = Case::new("lock");
    // Slow enough (a bandwidth limit) that the second run starts while the first holds the lock.
    c.transfer_extra = "  bandwidth-limit: 128KiB\n".into();
    c.write("slow.bin", &vec![7u8; 400 * 1024]);
    let cfg = c.config_path();
    let bin = env!("CARGO_BIN_EXE_nightcopy");
    let spawn = || {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["run", "--config"]).arg(&cfg).env_clear();
        for (k, v) in s3().env() {
            cmd.env(k, v);
        }
        cmd.stderr(std::process::Stdio::piped());
        cmd
    };
    let mut first = spawn().spawn().unwrap();
    // Wait until the first run holds the lock (it writes its PID there).
    let lock = c.state_dir().join("lock");
    wait_for(
        Duration::from_secs(30),
        "the first run to hold the lock",
        || fs::read_to_string(&lock).is_ok_and(|p| p.trim() == first.id().to_string()),
    );
    let second = spawn().output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(75), "{err}");
    assert!(err.contains(&format!("PID {}", first.id())), "{err}");
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn min_interval_skips_a_catch_up_run_without_metrics_and_force_overrides() {
    let mut c = Case::new("interval");
    let ns = with_cloudwatch(&mut c, "interval");
    c.top_extra = "guard:\n  min-interval: 20h\n".into();
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    let skipped = c.run(&["run"]);
    assert_eq!(skipped.code, 75, "{}", skipped.stderr);
    assert!(
        skipped.stderr.contains("last successful run started"),
        "{}",
        skipped.stderr
    );
    assert_eq!(
        cloudwatch().put_requests(&ns).len(),
        1,
        "a skipped run publishes nothing"
    );
    let forced = c.run(&["run", "--force"]);
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert_eq!(cloudwatch().put_requests(&ns).len(), 2);
}

#[test]
fn status_shows_the_last_run() {
    let c = Case::new("status");
    c.write("a.txt", b"a");
    let none = c.run(&["status"]);
    assert_eq!(none.code, 1);
    assert!(none.stderr.contains("no run recorded"), "{}", none.stderr);
    assert_eq!(c.run(&["run"]).code, 0);
    let human = c.run(&["status"]);
    assert_eq!(human.code, 0);
    assert!(
        human.stdout.contains("outcome:      success (exit code 0)"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("last success:"), "{}", human.stdout);
    let v: serde_json::Value = serde_json::from_str(&c.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(v["figures"]["files_transferred"], 1);
    assert_eq!(v["outcome"], "success");
    assert!(v["seconds_since_last_success"].as_u64().unwrap() < 60);
}

/// Runs the case with `NOTIFY_SOCKET` pointing at a datagram socket in its temp dir (plus
/// `extra_env`) and returns its output with every datagram it sent, in order.
fn run_hearing_systemd(
    c: &Case,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> (std::process::Output, Vec<String>) {
    let (out, heard) = run_hearing_systemd_timed(c, args, extra_env);
    (out, heard.into_iter().map(|(_, m)| m).collect())
}

/// The same, with the time each datagram arrived. Reads while the run goes: a datagram socket
/// queues only a few messages, and systemd reads them as they come.
fn run_hearing_systemd_timed(
    c: &Case,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> (std::process::Output, Vec<(Instant, String)>) {
    let sock_path = c.root.join("notify.sock");
    let _ = fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd = c.command(args, None);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let messages = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (messages, done) = (messages.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => messages.lock().unwrap().push((
                        Instant::now(),
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                    )),
                    Err(_) if done.load(std::sync::atomic::Ordering::SeqCst) => break,
                    Err(_) => {}
                }
            }
        })
    };
    let out = cmd.output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    reader.join().unwrap();
    let m = messages.lock().unwrap().clone();
    (out, m)
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let mut c = Case::new("notify");
    c.write("slow.bin", &vec![1u8; 600 * 1024]);
    // Slow the run down (bandwidth limit) so progress ticks happen while it works.
    c.transfer_extra = "  bandwidth-limit: 200KiB\n".into();
    let (out, m) = run_hearing_systemd(&c, &["run"], &[("WATCHDOG_USEC", "400000")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_ready = m
        .iter()
        .position(|s| s.contains("READY=1"))
        .expect("READY=1");
    let stopping = m
        .iter()
        .position(|s| s.contains("STOPPING=1"))
        .expect("STOPPING=1");
    assert!(first_ready < stopping);
    assert!(m.iter().any(|s| s.contains("WATCHDOG=1")), "{m:?}");
    assert!(
        m.iter()
            .any(|s| s.contains("STATUS=") && s.contains("scanned")),
        "live progress in STATUS=: {m:?}"
    );
    assert!(
        m[stopping].contains("backup succeeded"),
        "{:?}",
        m[stopping]
    );
    assert_eq!(m.iter().filter(|s| s.contains("READY=1")).count(), 1);
}

/// Regression: a skipped run (exit 75) sent STOPPING=1 without READY=1, and systemd fails a
/// Type=notify unit whose process exits before READY=1 (Result=protocol) whatever
/// SuccessExitStatus= says — so every catch-up skip after a reboot, and every run that met a
/// running one, showed as a failed unit.
#[test]
fn skipped_run_without_ready_failed_the_notify_unit() {
    let mut c = Case::new("skip-notify");
    let ns = with_cloudwatch(&mut c, "skipnotify");
    c.top_extra = "guard:\n  min-interval: 20h\n".into();
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);

    let assert_ready_then_stopping = |out: &std::process::Output, m: &[String], why: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        let ready = m.iter().position(|s| s.contains("READY=1"));
        let stopping = m.iter().position(|s| s.contains("STOPPING=1"));
        assert!(
            matches!((ready, stopping), (Some(r), Some(s)) if r < s),
            "READY=1 must come before STOPPING=1: {m:?}"
        );
        assert_eq!(
            m.iter().filter(|s| s.contains("READY=1")).count(),
            1,
            "{m:?}"
        );
        assert!(
            m[stopping.unwrap()].contains(why),
            "STATUS= says why: {m:?}"
        );
    };

    // The minimum interval has not elapsed since that success.
    let (out, m) = run_hearing_systemd(&c, &["run"], &[]);
    assert_ready_then_stopping(&out, &m, "last successful run started");

    // Another run holds the lock (held here, as a running nightcopy would; --force does not
    // override the lock).
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.state_dir().join("lock"))
        .unwrap();
    let mut held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    held.set_len(0).unwrap();
    writeln!(held, "{}", std::process::id()).unwrap();
    let (out, m) = run_hearing_systemd(&c, &["run", "--force"], &[]);
    assert_ready_then_stopping(&out, &m, "holds the lock");
    drop(held);
    assert_eq!(c.count(Op::PutObject), 1, "skipped runs upload nothing");
    assert_eq!(
        cloudwatch().put_requests(&ns).len(),
        1,
        "skipped runs publish nothing"
    );
}

/// A one-thread HTTP server that records request paths: the dead-man's switch.
fn heartbeat_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ping/abc-123", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let path = line.split(' ').nth(1).unwrap_or("").to_owned();
            s.lock().unwrap().push(path);
            let mut w = stream;
            let _ =
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK");
        }
    });
    (url, seen)
}

#[test]
fn the_heartbeat_is_pinged_on_success_and_its_fail_form_on_failure() {
    let mut c = Case::new("heartbeat");
    let (url, seen) = heartbeat_server();
    c.top_extra.push_str(&format!("heartbeat-url: {url}\n"));
    c.write("a.txt", b"a");
    assert_eq!(c.run(&["run"]).code, 0);
    c.require_mountpoint = true;
    assert_eq!(c.run(&["run"]).code, 1);
    assert_eq!(
        *seen.lock().unwrap(),
        ["/ping/abc-123", "/ping/abc-123/fail"]
    );

    // A dead-man's switch that cannot be reached is logged, never fatal, and never shows its
    // secret path.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.require_mountpoint = false;
    c.top_extra = c.top_extra.replace(
        &url,
        &format!("http://127.0.0.1:{port}/ping/secret-token-42"),
    );
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("heartbeat to"), "{}", out.stderr);
    assert!(!out.stderr.contains("secret-token-42"), "{}", out.stderr);
}

#[test]
fn sigterm_keeps_the_multipart_upload_for_the_next_run_publishes_failure_and_exits_143() {
    let mut c = Case::new("sigterm");
    let ns = with_cloudwatch(&mut c, "sigterm");
    // Small files first in key order, then a multipart file slowed down by the bandwidth limit.
    for i in 0..5 {
        c.write(&format!("a{i}.txt"), format!("{i}").as_bytes());
    }
    c.write(
        "z-big.bin",
        &crate::common::run::pseudo_random(12 * 1024 * 1024, 1),
    );
    c.transfer_extra = "  bandwidth-limit: 2MiB\n".into();
    let child = c
        .command(&["run"], None)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the multipart upload is under way.
    let started = std::time::Instant::now();
    while c.count(Op::UploadPart) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no part upload began: {:?}",
            c.ops()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let signalled = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "stop took {:?}",
        signalled.elapsed()
    );
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    // The upload is kept, and recorded for the next run to continue.
    assert_eq!(c.count(Op::AbortMultipartUpload), 0, "{:?}", c.ops());
    assert_eq!(c.count(Op::CompleteMultipartUpload), 0);
    let records = fs::read_dir(c.state_dir().join("uploads")).unwrap().count();
    assert_eq!(records, 1);
    assert_eq!(point(&ns, "LastSuccess", "i-sigterm"), [0.0]);
    // Progress kept: the next run (at full speed) uploads only the big file, into the same
    // multipart upload. (s3s-fs lists parts without a checksum or ETag, so every part is sent
    // again here; tests/it/resume.rs shows the parts kept on a server that lists them.)
    c.transfer_extra.clear();
    let puts = c.count(Op::PutObject);
    let again = c.run(&["run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 1, "{}", again.stderr);
    assert_eq!(c.count(Op::PutObject), puts);
    assert_eq!(c.count(Op::CreateMultipartUpload), 1, "{:?}", c.ops());
    assert_eq!(c.count(Op::ListParts), 1, "{:?}", c.ops());
    assert_eq!(c.count(Op::CompleteMultipartUpload), 1);
    assert_eq!(
        fs::read_dir(c.state_dir().join("uploads")).unwrap().count(),
        0
    );
    assert_eq!(
        s3().get(&c.dest, &c.key("z-big.bin")).body,
        crate::common::run::pseudo_random(12 * 1024 * 1024, 1)
    );
    c.assert_no_delete();
}

/// What a run, `verify` and `restore` must say on a host without CA certificates: exit 1 and what
/// to install, never a panic, and nothing sent. `run` runs the binary as the test arranges.
fn assert_no_ca_certificates_is_fatal_and_says_what_to_install(
    c: &Case,
    ns: &str,
    run: impl Fn(&[&str]) -> Output,
) {
    let out = run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    for says in [
        "backup FAILED: no trusted CA certificates on this host",
        "apt-get install ca-certificates",
        "SSL_CERT_FILE",
    ] {
        assert!(out.stderr.contains(says), "{says:?} not in\n{}", out.stderr);
    }
    // The SDK's client is never built, so nothing at all reaches S3 or CloudWatch; the journal
    // says the metrics did not go out (the LastSuccess alarm fires on the missing data).
    assert!(c.ops().is_empty(), "{:?}", c.ops());
    assert!(cloudwatch().put_requests(ns).is_empty());
    assert!(
        out.stderr.contains("metrics were NOT published"),
        "{}",
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(v["outcome"], "failed");
    assert_eq!(v["exit_code"], 1);
    assert_eq!(v["metrics_published"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("install ca-certificates"),
        "{v}"
    );

    let to = c.root.join("restored");
    fs::create_dir_all(&to).unwrap();
    for args in [
        vec!["verify"],
        vec!["restore", "--to", to.to_str().unwrap()],
    ] {
        let out = run(&args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(
            !out.stderr.contains("panicked")
                && out.stderr.contains("no trusted CA certificates")
                && out.stderr.contains("install ca-certificates"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert!(c.ops().is_empty(), "{:?}", c.ops());
}

/// Regression: on a host without a CA trust store nightcopy panicked at start-up (exit 101,
/// inside the AWS SDK's HTTPS client) instead of a fatal error saying what to install. Here the
/// trust store is pointed at an empty file and an empty directory.
#[test]
fn no_ca_trust_store_panicked_at_start_up() {
    let mut c = Case::new("no-ca-env");
    let ns = with_cloudwatch(&mut c, "nocaenv");
    c.write("a.txt", b"a");
    let (file, dir) = (c.root.join("empty.pem"), c.root.join("empty-certs"));
    fs::write(&file, b"").unwrap();
    fs::create_dir(&dir).unwrap();
    c.env = vec![
        ("SSL_CERT_FILE".into(), file.display().to_string()),
        ("SSL_CERT_DIR".into(), dir.display().to_string()),
    ];
    assert_no_ca_certificates_is_fatal_and_says_what_to_install(&c, &ns, |args| c.run(args));
}

/// The same as an operator meets it: the distribution's trust store (/etc/ssl/certs) is empty, as
/// on a host without the ca-certificates package, and no SSL_CERT_* variable is set.
#[test]
fn no_ca_certificates_package_is_fatal_and_says_what_to_install() {
    if !require_root(
        "agent::no_ca_certificates_package_is_fatal_and_says_what_to_install",
        "it hides /etc/ssl/certs in a private mount namespace",
    ) {
        return;
    }
    let mut c = Case::new("no-ca-pkg");
    let ns = with_cloudwatch(&mut c, "nocapkg");
    c.write("a.txt", b"a");
    let without_certs = |args: &[&str]| {
        let mut cmd = c.command(args, None);
        // SAFETY: only system calls run between fork and exec, no allocation or locking.
        unsafe {
            cmd.pre_exec(|| {
                crate::common::run::private_mount_namespace()?;
                crate::common::run::mount_tmpfs(c"/etc/ssl/certs")?;
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    assert_no_ca_certificates_is_fatal_and_says_what_to_install(&c, &ns, without_certs);
}

/// The manifest lists every file name: the state directory and what is in it are the running
/// user's alone, and a state directory others can write is refused.
#[test]
fn the_state_directory_and_its_files_are_private() {
    use std::os::unix::fs::MetadataExt;
    let c = Case::new("private-state");
    c.write("a.txt", b"a");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let me = nix::unistd::geteuid().as_raw();
    let dir = fs::metadata(c.state_dir()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o700);
    assert_eq!(dir.uid(), me);
    let mut names = Vec::new();
    for entry in fs::read_dir(c.state_dir()).unwrap() {
        let entry = entry.unwrap();
        let m = entry.metadata().unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        // Directories (uploads/, the records of unfinished multipart uploads) are 0700.
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.mode() & 0o777, want, "{name}");
        assert_eq!(m.uid(), me, "{name}");
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["last-run.json", "lock", "manifest", "uploads"]);

    fs::set_permissions(c.state_dir(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("chmod go-w"), "{}", out.stderr);
    assert_eq!(c.count(Op::PutObject), 1);
}

/// The watchdog is fed on progress, not on time: while a request hangs, STATUS= ticks go on but
/// WATCHDOG=1 stops, so `WatchdogSec=` ends a run that hangs for longer than that.
#[test]
fn a_run_that_makes_no_progress_stops_feeding_the_watchdog() {
    let mut c = Case::new("watchdog-stall");
    c.write("a.txt", b"stalled once");
    c.transfer_extra = "  request-timeout: 4s\n".into();
    // The first PutObject hangs until its 4 s attempt timeout; the retry goes through.
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(1.0, &[FaultKind::Stall], 5)
                .only(&[Op::PutObject])
                .stall_for(Duration::from_secs(60)),
        ),
    );
    let (out, heard) = std::thread::scope(|s| {
        s.spawn(|| {
            let came = until(Duration::from_secs(20), Duration::from_millis(20), || {
                c.count(Op::PutObject) > 0
            });
            s3().set_faults(&c.dest, None);
            assert!(came, "no PutObject within 20 s: {:?}", c.ops());
        });
        run_hearing_systemd_timed(&c, &["run"], &[("WATCHDOG_USEC", "400000")])
    });
    s3().set_faults(&c.dest, None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stalled_at = s3()
        .requests(&c.dest)
        .iter()
        .find(|r| r.op == Op::PutObject)
        .map(|r| r.at)
        .expect("a PutObject");
    assert!(
        heard.iter().any(|(_, m)| m.contains("WATCHDOG=1")),
        "the watchdog was fed while the run progressed: {heard:?}"
    );
    let (from, to) = (
        stalled_at + Duration::from_secs(1),
        stalled_at + Duration::from_millis(3500),
    );
    let during: Vec<&String> = heard
        .iter()
        .filter(|(t, _)| *t > from && *t < to)
        .map(|(_, m)| m)
        .collect();
    assert!(
        during.len() >= 4,
        "STATUS= ticks went on during the hang: {during:?}"
    );
    assert!(
        during.iter().all(|m| !m.contains("WATCHDOG=1")),
        "the watchdog was fed while nothing moved: {during:?}"
    );
}

/// A state directory nightcopy cannot write ends the run before anything is read or sent, with
/// what to check; the lock file is the first write, the manifest the next.
#[test]
fn a_read_only_state_directory_is_fatal_and_says_what_to_check() {
    let c = Case::new("ro-state");
    c.write("a.txt", b"a");
    fs::create_dir(c.state_dir()).unwrap();
    fs::set_permissions(c.state_dir(), fs::Permissions::from_mode(0o500)).unwrap();
    let out = c.run_with(&["run"], unprivileged());
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot open the lock file")
            && out
                .stderr
                .contains("must be writable by the user nightcopy runs as"),
        "{}",
        out.stderr
    );
    assert!(c.ops().is_empty(), "{:?}", c.ops());

    // After a first run the lock file exists and opens; the new manifest is the first write.
    fs::set_permissions(c.state_dir(), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(c.run(&["run"]).code, 0);
    c.write("b.txt", b"b");
    fs::set_permissions(c.state_dir(), fs::Permissions::from_mode(0o500)).unwrap();
    let out = c.run_with(&["run"], unprivileged());
    fs::set_permissions(c.state_dir(), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot write the manifest")
            && out.stderr.contains("is the disk full or read-only?"),
        "{}",
        out.stderr
    );
    assert_eq!(
        c.count(Op::PutObject),
        1,
        "nothing uploaded that would not be recorded"
    );
}

/// A small tmpfs at the case's state directory, in a mount namespace of its own that a `sleep`
/// child holds for the test's length: nightcopy runs enter that namespace, the test reaches the
/// files through `/proc/PID/root`. Nothing is mounted on the host. Needs root.
struct SmallStateFs {
    holder: std::process::Child,
    ns: fs::File,
}

impl SmallStateFs {
    fn mount(c: &Case, options: &'static std::ffi::CStr) -> SmallStateFs {
        fs::create_dir(c.state_dir()).unwrap();
        let target = std::ffi::CString::new(c.state_dir().as_os_str().as_encoded_bytes()).unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        // SAFETY: only system calls run between fork and exec, no allocation or locking.
        unsafe {
            cmd.pre_exec(move || {
                crate::common::run::private_mount_namespace()?;
                crate::common::run::mount_tmpfs_with(target.as_c_str(), options)?;
                Ok(())
            });
        }
        // spawn returns once the child has exec'd, so after the mount.
        let holder = cmd.spawn().unwrap();
        let ns = fs::File::open(format!("/proc/{}/ns/mnt", holder.id())).unwrap();
        SmallStateFs { holder, ns }
    }

    /// The state directory as the test sees it.
    fn dir(&self, c: &Case) -> std::path::PathBuf {
        let state = c.state_dir();
        std::path::Path::new(&format!("/proc/{}/root", self.holder.id()))
            .join(state.strip_prefix("/").unwrap())
    }

    fn run(&self, c: &Case, args: &[&str]) -> Output {
        let mut cmd = c.command(args, None);
        let ns = self.ns.try_clone().unwrap();
        // SAFETY: one system call between fork and exec.
        unsafe {
            cmd.pre_exec(move || Ok(nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)?));
        }
        let out = cmd.output().unwrap();
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for SmallStateFs {
    fn drop(&mut self) {
        // The namespace, and the tmpfs with it, go once its holder is gone and `ns` is closed.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The state directory's filesystem is full when the new manifest is written, at the end of a
/// run that has uploaded files: the run fails (exit 1) with one message that names the directory,
/// says what to do and that nothing is lost — and nothing is: the previous manifest is kept byte
/// for byte, the objects stay, and once there is space the next run finds them in the listing
/// and uploads nothing again.
#[test]
fn a_full_state_directory_is_fatal_says_what_to_do_and_loses_nothing() {
    if !require_root(
        "agent::a_full_state_directory_is_fatal_says_what_to_do_and_loses_nothing",
        "it mounts a small tmpfs in a private mount namespace",
    ) {
        return;
    }
    let c = Case::new("full-state");
    c.write("a.txt", b"a");
    let small = SmallStateFs::mount(&c, c"size=64k,mode=0700");
    let state = small.dir(&c);
    let first = small.run(&c, &["run"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let manifest = fs::read(state.join("manifest")).unwrap();

    let mut filler = fs::File::create(state.join("filler")).unwrap();
    loop {
        match filler.write(&[0; 4096]) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // An open file would keep its space after the unlink below.
    drop(filler);
    // An hour old, so the objects uploaded below are newer than the files by any clock's grain.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for name in ["b.txt", "c.txt"] {
        let p = c.write(name, name.as_bytes());
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }

    let out = small.run(&c, &["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let said: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("cannot write the manifest"))
        .collect();
    assert_eq!(said.len(), 1, "{}", out.stderr);
    let dir = c.state_dir().display().to_string();
    for says in [
        dir.as_str(),
        "No space left on device",
        "free space",
        "nothing is lost",
    ] {
        assert!(said[0].contains(says), "{says:?} not in {}", said[0]);
    }
    assert_eq!(fs::read(state.join("manifest")).unwrap(), manifest);
    let keys = [c.key("a.txt"), c.key("b.txt"), c.key("c.txt")];
    assert_eq!(s3().list_keys(&c.dest), keys);

    fs::remove_file(state.join("filler")).unwrap();
    let puts = c.count(Op::PutObject);
    let again = small.run(&c, &["run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 0, "{}", again.stderr);
    assert_eq!(c.count(Op::PutObject), puts);
    let manifest = fs::read_to_string(state.join("manifest")).unwrap();
    assert!(manifest.contains("b.txt") && manifest.contains("c.txt"));
    c.assert_no_delete();
}
