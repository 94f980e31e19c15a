//! The trust boundaries of a distributed run: a work message and a worker's report are input
//! from anyone allowed to send to the queues. Forged messages go straight to moto's SQS; the
//! worker and the coordinator are the real binary, the bucket the S3 server behind the counting
//! proxy.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nightcopy::queue::{FileOutcome, FileReport, Report, WorkBatch, WorkFile};

use crate::common::run::{Case, Output};
use crate::common::sqs::{queues, TestQueues};
use crate::common::wait::until;
use crate::common::worker::Worker;

fn distributed(hint: &str, deadline: &str) -> (Case, TestQueues) {
    let mut c = Case::new(hint);
    let q = queues(hint);
    c.top_extra = format!(
        "guard:\n  min-interval: 0s\n{}",
        q.section(1, deadline, "30s")
    );
    (c, q)
}

fn destination_id(c: &Case) -> String {
    let text = fs::read_to_string(c.config_path()).unwrap();
    nightcopy::config::Config::parse(&text, Path::new("config.yaml"))
        .unwrap()
        .destination_id()
}

fn work_file(path: &str, key: &str) -> WorkFile {
    WorkFile {
        key: key.to_owned(),
        path: path.to_owned(),
        size: 1,
        mtime_ns: 0,
        reason: "new".to_owned(),
        escaped: false,
    }
}

/// Runs one worker until the results queue holds `reports` reports (or 60 s), stops it, and
/// returns the reports and the worker's log.
fn work(c: &Case, q: &TestQueues, reports: usize) -> (Vec<Report>, String) {
    let mut worker = Worker::start(c, None, 0);
    let came = q.wait_for_depth(&q.results, reports as u64, Duration::from_secs(60));
    worker.stop();
    let log = worker.log();
    assert!(
        came,
        "the worker did not report {reports} batches within 60 s:\n{log}"
    );
    let bodies = q.take(&q.results, reports, Duration::from_secs(10));
    let reports = bodies
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    (reports, log)
}

#[test]
fn a_worker_uploads_only_files_beneath_the_source_under_their_own_keys() {
    let (c, q) = distributed("beneath", "60s");
    let outside = c.root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"root only").unwrap();
    c.write("ok.txt", b"fine");
    c.write("other.txt", b"another file");
    c.write(".nightcopy/manifest.gz", b"planted");
    c.write("cache/f", b"excluded");
    // A directory the coordinator's walk saw, swapped for a symlink to outside since.
    c.write("d/secret", b"was here");
    fs::remove_dir_all(c.src.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, c.src.join("d")).unwrap();
    let mut c = c;
    c.source_extra = "  exclude: [\"cache/**\"]\n".into();

    let abs = outside.join("secret");
    let forged = [
        work_file(abs.to_str().unwrap(), "abs"),
        work_file("../outside/secret", "../outside/secret"),
        work_file("d/secret", "d/secret"),
        work_file(".nightcopy/manifest.gz", ".nightcopy/manifest.gz"),
        work_file("ok.txt", "other.txt"),
        work_file("cache/f", "cache/f"),
        work_file("ok.txt", "ok.txt"),
    ];
    let destination = destination_id(&c);
    for (i, f) in forged.iter().enumerate() {
        let batch = WorkBatch {
            run: "forged".into(),
            batch: i as u64,
            destination: destination.clone(),
            files: vec![f.clone()],
        };
        q.send(&q.work, &serde_json::to_string(&batch).unwrap());
    }
    let (reports, log) = work(&c, &q, forged.len());

    // Only the one honest file is in the bucket; nothing else was written anywhere.
    let keys = c.server.list_all_keys(&c.dest);
    assert_eq!(keys, [c.key("ok.txt")], "worker log:\n{log}");
    assert_eq!(c.server.get(&c.dest, &c.key("ok.txt")).body, b"fine");
    c.assert_no_delete();
    for r in &reports {
        let f = &r.files[0];
        if f.key == "ok.txt" {
            assert_eq!(f.outcome, FileOutcome::Uploaded, "{f:?}");
        } else {
            assert_eq!(f.outcome, FileOutcome::Error, "{f:?}\n{log}");
            assert!(f.detail.as_deref().is_some_and(|d| !d.is_empty()), "{f:?}");
        }
    }
    // Each refusal is named in the worker's journal, one line each.
    for why in [
        "not a plain path below the source",
        "is a symlink or not a directory",
        "reserved .nightcopy/",
        "the message names \"other.txt\"",
        "excluded by the config",
    ] {
        assert!(log.contains(why), "no {why:?} in the worker's log:\n{log}");
    }
}

/// A file's report as a forger who read the work queue would write it: uploaded, with the size
/// and mtime the batch names and a SHA-256 of their choosing.
fn forged_upload(f: &WorkFile) -> FileReport {
    FileReport {
        key: f.key.clone(),
        path: f.path.clone(),
        outcome: FileOutcome::Uploaded,
        size: f.size,
        mtime_ns: f.mtime_ns,
        sha256: Some(hex::encode([0x42u8; 32])),
        composite: None,
        kind: None,
        detail: None,
    }
}

fn run_coordinator(c: &Case) -> std::process::Child {
    c.command(&["run"], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn manifest_of(c: &Case) -> String {
    fs::read_to_string(c.state_dir().join("manifest")).unwrap_or_default()
}

#[test]
fn forged_short_and_newline_reports_are_never_recorded_as_backed_up() {
    let (mut c, q) = distributed("forged", "25s");
    // "d.bin" is backed up once by a single-host run, then changed in place with its size kept:
    // a forged "uploaded" must not make the manifest say the new version is stored.
    let d = c.write("d.bin", b"version 1");
    // An hour old, so that version 2, written below, has a later mtime by any clock's grain.
    fs::File::options()
        .write(true)
        .open(&d)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let distributed_section =
        std::mem::replace(&mut c.top_extra, "guard:\n  min-interval: 0s\n".to_owned());
    assert_eq!(c.run(&["run"]).code, 0);
    c.top_extra = distributed_section;
    c.write("d.bin", b"version 2");
    for name in ["a.bin", "b.bin", "c.bin"] {
        c.write(name, name.as_bytes());
    }
    let before = manifest_of(&c);

    let child = run_coordinator(&c);
    // The forger takes the four batches off the work queue, as a worker would.
    let bodies = q.take(&q.work, 4, Duration::from_secs(30));
    assert_eq!(bodies.len(), 4, "the coordinator did not send four batches");
    for body in bodies {
        let batch: WorkBatch = serde_json::from_str(&body).unwrap();
        let f = &batch.files[0];
        let files = match f.key.as_str() {
            // Forged: nothing was uploaded.
            "a.bin" | "d.bin" => vec![forged_upload(f)],
            // Short: the batch's one file left out.
            "b.bin" => Vec::new(),
            // An error whose detail would forge a journal line.
            "c.bin" => vec![FileReport {
                outcome: FileOutcome::Error,
                sha256: None,
                detail: Some("boom\nERROR forged line".into()),
                ..forged_upload(f)
            }],
            other => panic!("unexpected batch for {other}"),
        };
        let report = Report {
            run: batch.run.clone(),
            batch: batch.batch,
            worker: "forger\nINFO forged worker".into(),
            files,
        };
        q.send(&q.results, &serde_json::to_string(&report).unwrap());
    }
    let out = Output::from(child.wait_with_output().unwrap());

    // Every file is a counted error, the run says so, and the manifest records none of them.
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 4, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 0, "{}", out.stderr);
    let manifest = manifest_of(&c);
    for key in ["a.bin", "b.bin", "c.bin"] {
        assert!(
            !manifest.lines().any(|l| l.starts_with(&format!("{key}\t"))),
            "{key} recorded:\n{manifest}"
        );
    }
    let d_before: Vec<&str> = before
        .lines()
        .filter(|l| l.starts_with("d.bin\t"))
        .collect();
    let d_after: Vec<&str> = manifest
        .lines()
        .filter(|l| l.starts_with("d.bin\t"))
        .collect();
    assert_eq!(d_after, d_before, "d.bin's record changed:\n{}", out.stderr);
    assert!(
        out.stderr.contains("does not bear it out"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("does not name exactly the files"),
        "{}",
        out.stderr
    );
    // Received text is one escaped line, never a line of its own.
    assert!(
        out.stderr.contains("boom\\nERROR forged line"),
        "{}",
        out.stderr
    );
    for line in out.stderr.lines() {
        assert!(
            !line.contains("ERROR forged line") || line.contains("boom\\n"),
            "a forged line: {line}"
        );
        assert!(
            !line.trim_start().starts_with("INFO forged worker"),
            "{line}"
        );
    }
    c.assert_no_delete();
}

/// A key file as the role installs it: 64 hex characters and a newline, mode 600.
fn key_file(c: &Case, name: &str, byte: u8) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = c.root.join(name);
    fs::write(&p, format!("{}\n", hex::encode([byte; 32]))).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Polls the file at `log` until it holds `n` lines containing `what` (bounded).
fn wait_for_lines(log: &Path, what: &str, n: usize, limit: Duration) -> bool {
    until(limit, Duration::from_millis(100), || {
        let text = fs::read_to_string(log).unwrap_or_default();
        text.lines().filter(|l| l.contains(what)).count() >= n
    })
}

#[test]
fn with_a_key_unsigned_or_wrongly_signed_messages_are_never_acted_on() {
    use nightcopy::auth::{seal, AuthKey, Domain};
    let (mut c, q) = distributed("sealed", "60s");
    let key = key_file(&c, "auth.key", 7);
    c.top_extra
        .push_str(&format!("auth-key-file: {}\n", key.display()));
    c.write("ok.txt", b"fine");
    c.write("two.txt", b"second");

    // 1. Forged work: an honest-looking batch, unsigned and signed with another key.
    let batch = WorkBatch {
        run: "forged".into(),
        batch: 0,
        destination: destination_id(&c),
        files: vec![work_file("ok.txt", "ok.txt")],
    };
    let json = serde_json::to_string(&batch).unwrap();
    let other = AuthKey::from_bytes(hex::encode([8u8; 32]).as_bytes());
    q.send(&q.work, &json);
    q.send(&q.work, &seal(Some(&other), Domain::Work, json.clone()));
    let mut worker = Worker::start(&c, None, 0);
    let refused = wait_for_lines(worker.log_path(), "is refused", 2, Duration::from_secs(60));
    worker.stop();
    let text = worker.log();
    assert!(
        refused,
        "the worker did not refuse both forged batches:\n{text}"
    );
    assert!(text.contains("carries no MAC"), "{text}");
    assert!(text.contains("MAC does not match"), "{text}");
    assert!(c.server.list_all_keys(&c.dest).is_empty(), "{text}");
    assert!(text.contains("2 messages refused"), "{text}");
    // Out of the way of the real run below (they would go to the dead-letter queue).
    let _ = q.take(&q.work, 2, Duration::from_secs(40));

    // 2. A real run with the key; a forger takes its first batch, answers it with an unsigned
    // report that claims the upload, and puts the sealed batch back for a worker.
    let coordinator = run_coordinator(&c);
    let taken = q.take(&q.work, 1, Duration::from_secs(30));
    assert_eq!(taken.len(), 1, "no batch was sent");
    assert!(taken[0].starts_with("nightcopy-mac-v1:"), "{}", taken[0]);
    let body = taken[0].split_once('\n').unwrap().1;
    let sent: WorkBatch = serde_json::from_str(body).unwrap();
    let forged = Report {
        run: sent.run.clone(),
        batch: sent.batch,
        worker: "forger".into(),
        files: sent.files.iter().map(forged_upload).collect(),
    };
    q.send(&q.results, &serde_json::to_string(&forged).unwrap());
    q.send(&q.work, &taken[0]);
    let mut worker = Worker::start(&c, None, 1);
    let out = Output::from(coordinator.wait_with_output().unwrap());
    worker.stop();
    assert_eq!(out.code, 0, "{}\n{}", out.stderr, worker.log());
    assert_eq!(out.figure("files transferred"), 2, "{}", out.stderr);
    assert!(out.stderr.contains("carries no MAC"), "{}", out.stderr);
    assert!(out.stderr.contains("1 reports refused"), "{}", out.stderr);
    for (name, body) in [("ok.txt", &b"fine"[..]), ("two.txt", b"second")] {
        assert_eq!(c.server.get(&c.dest, &c.key(name)).body, body);
    }
    let manifest = manifest_of(&c);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"fine"));
    assert!(
        manifest
            .lines()
            .any(|l| l.starts_with("ok.txt\t") && l.ends_with(&sha)),
        "the manifest does not hold the real upload:\n{manifest}"
    );
}
