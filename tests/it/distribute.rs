//! Distributed runs over SQS (moto on 127.0.0.1): a coordinator (`nightcopy run` with
//! `distribute:`) and worker processes (`nightcopy worker`), all the real binary, against the S3
//! server behind the counting proxy.

use std::fs;
use std::os::unix::process::ExitStatusExt;

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::cloudwatch::{cloudwatch, unique_namespace};
use crate::common::proxy::{FaultKind, FaultPlan, Op};
use crate::common::run::{pseudo_random, Case, Output};
use crate::common::s3::s3;
use crate::common::sqs::{queues, TestQueues};
use crate::common::wait::wait_for;
use crate::common::worker::Worker;

/// Workers stopped all at once when dropped (each then waits for its long poll to end).
struct Fleet(Vec<Worker>);

impl Fleet {
    fn start(c: &Case, n: usize) -> Fleet {
        Fleet((0..n).map(|i| Worker::start(c, None, i)).collect())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.0.iter().for_each(Worker::terminate);
    }
}

/// A case whose config has a `distribute:` section for fresh queues.
fn distributed(hint: &str, batch_files: usize, deadline: &str) -> (Case, TestQueues) {
    let mut c = Case::new(hint);
    let q = queues(hint);
    c.top_extra = format!(
        "guard:\n  min-interval: 0s\n{}",
        q.section(batch_files, deadline, "30s")
    );
    (c, q)
}

fn tree(c: &Case) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..40u8 {
        let rel = format!("d{}/f{i:02}.bin", i % 4);
        let body = pseudo_random(100 + usize::from(i) * 613, i);
        c.write(&rel, &body);
        files.push((rel, body));
    }
    // Multipart (the test config's threshold is 6 MiB).
    let big = pseudo_random(7 * 1024 * 1024, 99);
    c.write("big/large.bin", &big);
    files.push(("big/large.bin".into(), big));
    files
}

fn run_coordinator(c: &Case, limit: Duration) -> Output {
    let mut child = c
        .command(&["run"], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the coordinator did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Output::from(child.wait_with_output().unwrap())
}

/// Whether a PUT or a part of one of `c`'s files is being sent now (no answer yet; with no client
/// that went away before its answer, that means in flight).
fn an_upload_in_flight(c: &Case) -> bool {
    s3().requests(&c.dest)
        .iter()
        .any(|r| matches!(r.op, Op::PutObject | Op::UploadPart) && r.status.is_none())
}

fn manifest_keys(c: &Case) -> Vec<String> {
    let text = fs::read_to_string(c.state_dir().join("manifest")).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.starts_with("end "))
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect()
}

#[test]
fn a_coordinator_and_three_workers_copy_a_tree_byte_exact() {
    let (mut c, q) = distributed("dist-copy", 5, "5min");
    // Nine batches, at most two awaited at once: the coordinator collects reports as it sends.
    c.top_extra.push_str("  max-queued: 2\n");
    let files = tree(&c);
    let mut workers = Fleet::start(&c, 3);
    let out = run_coordinator(&c, Duration::from_secs(180));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.figure("files transferred"),
        files.len() as u64,
        "{}",
        out.stderr
    );
    assert_eq!(out.figure("transfer errors"), 0);
    for (rel, body) in &files {
        assert_eq!(&s3().get(&c.dest, &c.key(rel)).body, body, "{rel}");
    }
    // Every file recorded once, with its SHA-256: the next run finds nothing to do.
    let keys = manifest_keys(&c);
    assert_eq!(keys.len(), files.len());
    let again = run_coordinator(&c, Duration::from_secs(120));
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 0, "{}", again.stderr);
    assert_eq!(again.figure("checks"), files.len() as u64);
    for w in &mut workers.0 {
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "a worker ended:\n{}",
            w.log()
        );
    }
    // All at once: each waits for its long poll to end.
    workers.0.iter().for_each(Worker::terminate);
    for w in &mut workers.0 {
        assert_eq!(w.wait(), Some(0), "a stopped worker exits 0:\n{}", w.log());
    }
    assert_eq!(q.depth(&q.work), 0, "every batch was done and deleted");
    assert_eq!(
        q.depth(&q.results),
        0,
        "every report was counted and deleted"
    );
    c.assert_no_delete();
}

#[test]
fn a_worker_killed_in_the_middle_of_a_batch_loses_nothing() {
    let (c, _q) = distributed("dist-kill", 3, "5min");
    let files = tree(&c);
    // The first worker's uploads are held at the server, so the kill lands while one of them is
    // in flight: inside a batch.
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(1.0, &[FaultKind::Stall], 13)
                .only(&[Op::PutObject, Op::UploadPart])
                .stall_for(Duration::from_secs(120)),
        ),
    );
    let mut killed = Worker::start(&c, None, 0);
    let coordinator = std::thread::spawn({
        let c2 = c.command(&["run"], None);
        move || {
            let mut c2 = c2;
            Output::from(c2.output().unwrap())
        }
    });
    // It is the only one uploading: a PUT or part of a file without an answer yet is its own.
    wait_for(
        Duration::from_secs(60),
        "an upload of the first worker in flight",
        || an_upload_in_flight(&c),
    );
    assert!(
        killed.child.try_wait().unwrap().is_none(),
        "the worker ended before its kill:\n{}",
        killed.log()
    );
    killed.child.kill().unwrap(); // SIGKILL: no report, no delete, no give-back
    let status = killed.child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(nix::libc::SIGKILL),
        "the worker was to die of the kill, it ended {status}:\n{}",
        killed.log()
    );
    // Another worker takes over, the killed batch too once its visibility runs out.
    s3().set_faults(&c.dest, None);
    let _rescuer = Worker::start(&c, None, 1);
    let out = coordinator.join().unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    for (rel, body) in &files {
        assert_eq!(&s3().get(&c.dest, &c.key(rel)).body, body, "{rel}");
    }
    let keys = manifest_keys(&c);
    let mut unique = keys.clone();
    unique.dedup();
    assert_eq!(keys, unique, "nothing twice in the manifest");
    assert_eq!(keys.len(), files.len());
    assert_eq!(
        out.figure("files transferred"),
        files.len() as u64,
        "{}",
        out.stderr
    );
    c.assert_no_delete();
}

#[test]
fn a_stopped_worker_gives_its_batch_back_at_once_without_spending_a_receive() {
    // One batch, and nothing else in the queue: the worker that has it also has a receive in
    // flight (two uploads at once, and a third file waiting for a slot). Giving the batch back
    // while that receive is still open would let it take the batch again — invisible for the
    // visibility timeout (30 s here), with its second receive spent, so that the next receive
    // moves it to the dead-letter queue.
    let (c, q) = distributed("dist-stop", 10, "3min");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.bin", pseudo_random(256 * 1024, 1)),
        ("b.bin", pseudo_random(256 * 1024, 2)),
        ("c.txt", b"waits for a slot".to_vec()),
    ];
    for (rel, body) in &files {
        c.write(rel, body);
    }
    let two = c.root.join("two.yaml");
    let text = fs::read_to_string(c.config_path()).unwrap();
    fs::write(
        &two,
        text.replace("transfer:\n", "transfer:\n  concurrency: 2\n"),
    )
    .unwrap();
    // Its uploads are held at the server for 5 s, then go through.
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(1.0, &[FaultKind::Stall], 11)
                .only(&[Op::PutObject])
                .stall_for(Duration::from_secs(5)),
        ),
    );
    let coordinator = std::thread::spawn({
        let mut cmd = c.command(&["run"], None);
        move || Output::from(cmd.output().unwrap())
    });
    assert!(
        q.wait_for_visible(&q.work, 1, Duration::from_secs(30)),
        "the batch is sent"
    );
    let mut stopped = Worker::start(&c, Some(&two), 0);
    // Taken, and in work: its first two files are being sent (the stop lets them finish), the
    // third waits for a slot. The receive the worker started on taking the batch was started
    // before any of its work, and it is open (one is started again as each ends).
    wait_for(
        Duration::from_secs(30),
        "both uploads of the batch in flight",
        || {
            s3().requests(&c.dest)
                .iter()
                .filter(|r| r.op == Op::PutObject && r.status.is_none())
                .count()
                == 2
        },
    );
    assert_eq!(q.visible(&q.work), 0, "the batch is taken");
    assert_eq!(stopped.stop(), Some(0), "{}", stopped.log());
    assert!(
        stopped
            .log()
            .contains("stopping: waiting for the receive in flight"),
        "the stop came while a receive was in flight:\n{}",
        stopped.log()
    );
    assert!(
        q.wait_for_visible(&q.work, 1, Duration::from_secs(10)),
        "the batch is back for another worker at once, not after its visibility timeout \
         ({} visible, {} in all)\n{}",
        q.visible(&q.work),
        q.depth(&q.work),
        stopped.log()
    );
    // And it stays there: a receive left open (moto looks again every second) would take it. A
    // fixed wait: what is tested is that nothing happens for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        q.visible(&q.work),
        1,
        "the batch was taken again after it went back\n{}",
        stopped.log()
    );
    s3().set_faults(&c.dest, None);
    let _rescuer = Worker::start(&c, None, 1);
    let out = coordinator.join().unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 3, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 0, "{}", out.stderr);
    for (rel, body) in &files {
        assert_eq!(&s3().get(&c.dest, &c.key(rel)).body, body, "{rel}");
    }
    assert_eq!(q.depth(&q.dlq), 0);
    c.assert_no_delete();
}

#[test]
fn a_poison_batch_ends_in_the_dead_letter_queue_and_is_a_named_transfer_error() {
    let (c, q) = distributed("dist-poison", 1, "3min");
    c.write("a.txt", b"fine");
    c.write("poison.bin", b"every worker fails on me");
    c.write("z.txt", b"fine too");
    // Access denied for that key only: a fatal error on a worker, which gives the batch back
    // and exits; systemd would restart it, which the loop below does.
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(
                1.0,
                &[FaultKind::Refuse {
                    status: 403,
                    code: "AccessDenied",
                }],
                3,
            )
            .only(&[Op::PutObject])
            .for_key("poison.bin"),
        ),
    );
    let coordinator = std::thread::spawn({
        let mut cmd = c.command(&["run"], None);
        move || Output::from(cmd.output().unwrap())
    });
    let mut exits = Vec::new();
    let mut logs = String::new();
    let started = Instant::now();
    let mut n = 0;
    while !coordinator.is_finished() && started.elapsed() < Duration::from_secs(150) {
        let mut w = Worker::start(&c, None, n);
        n += 1;
        while w.child.try_wait().unwrap().is_none() && !coordinator.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(status) = w.child.try_wait().unwrap() {
            exits.push(status.code());
        }
        logs.push_str(&format!("--- worker {n}\n{}", w.log()));
    }
    assert!(
        coordinator.is_finished(),
        "the coordinator did not finish within 150 s\n{logs}"
    );
    let out = coordinator.join().unwrap();
    s3().set_faults(&c.dest, None);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 1, "{}\n{logs}", out.stderr);
    assert_eq!(out.figure("files transferred"), 2);
    assert!(
        out.stderr.contains("poison.bin: lost: its batch")
            && out.stderr.contains("dead-letter queue"),
        "{}",
        out.stderr
    );
    assert!(
        exits.iter().all(|c| *c == Some(1)),
        "workers exit 1 on it: {exits:?}\n{logs}"
    );
    assert!(exits.len() >= 2, "{exits:?}\n{logs}");
    // `nightcopy dlq` shows it, and --redrive gives it back to the work queue.
    let shown = c.run(&["dlq"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", shown.stdout);
    assert!(
        lines[0].starts_with("batch\t") && lines[0].contains("poison.bin"),
        "{}",
        lines[0]
    );
    let redriven = c.run(&["dlq", "--redrive"]);
    assert_eq!(redriven.code, 0, "{}", redriven.stderr);
    assert!(
        q.wait_for_depth(&q.dlq, 0, Duration::from_secs(10)),
        "dead-letter queue: {} messages\n{}{}",
        q.depth(&q.dlq),
        redriven.stdout,
        redriven.stderr
    );
    assert!(
        q.wait_for_depth(&q.work, 1, Duration::from_secs(10)),
        "work: {}",
        q.depth(&q.work)
    );
    c.assert_no_delete();
}

#[test]
fn a_distributed_run_publishes_the_same_six_metrics_as_a_single_host_run() {
    let single_ns = unique_namespace("single");
    let dist_ns = unique_namespace("distributed");
    // A dimension value of its own per run: moto's GetMetricData ignores the namespace when
    // dimensions are given.
    let metrics = |ns: &str, id: &str| {
        format!(
            "metrics:\n  cloudwatch: true\n  namespace: \"{ns}\"\n  instance-id: {id}\n  \
             endpoint-url: {}\n",
            cloudwatch().endpoint
        )
    };
    let (single_id, dist_id) = (
        format!("i-single-{}", std::process::id()),
        format!("i-dist-{}", std::process::id()),
    );
    let mut single = Case::new("same-single");
    single.metrics = metrics(&single_ns, &single_id);
    let (mut dist, _q) = distributed("same-dist", 4, "5min");
    dist.metrics = metrics(&dist_ns, &dist_id);
    for case in [&single, &dist] {
        tree(case);
        case.write("unchanged-later.txt", b"x");
    }
    assert_eq!(single.run(&["run"]).code, 0);
    let _workers = Fleet::start(&dist, 2);
    let out = run_coordinator(&dist, Duration::from_secs(180));
    assert_eq!(out.code, 0, "{}", out.stderr);
    // And a second run each, with one file changed: Checks and a small transfer.
    for case in [&single, &dist] {
        case.write("d0/f00.bin", b"changed");
    }
    assert_eq!(single.run(&["run"]).code, 0);
    assert_eq!(run_coordinator(&dist, Duration::from_secs(120)).code, 0);
    for metric in [
        "LastSuccess",
        "FilesTransferred",
        "BytesTransferred",
        "Checks",
        "TransferErrors",
    ] {
        let a = cloudwatch().datapoints(&single_ns, metric, &[("InstanceId", &single_id)]);
        let b = cloudwatch().datapoints(&dist_ns, metric, &[("InstanceId", &dist_id)]);
        assert_eq!(
            a.iter().sum::<f64>(),
            b.iter().sum::<f64>(),
            "{metric}: {a:?} vs {b:?}"
        );
        assert!(!a.is_empty(), "{metric} published");
    }
    let elapsed = cloudwatch().datapoints(&dist_ns, "ElapsedSeconds", &[("InstanceId", &dist_id)]);
    assert!(!elapsed.is_empty());
}

#[test]
fn without_workers_the_deadline_ends_the_run_with_every_file_named_and_last_success_zero() {
    let (mut c, q) = distributed("dist-deadline", 2, "5s");
    let prom = c.root.join("nightcopy.prom");
    c.metrics = format!(
        "metrics:\n  cloudwatch: false\n  textfile: {}\n",
        prom.display()
    );
    for i in 0..3 {
        c.write(&format!("f{i}.txt"), b"waiting");
    }
    let out = run_coordinator(&c, Duration::from_secs(90));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 3, "{}", out.stderr);
    for i in 0..3 {
        assert!(
            out.stderr
                .contains(&format!("f{i}.txt: not accounted for by the deadline (5s)")),
            "{}",
            out.stderr
        );
    }
    let text = fs::read_to_string(&prom).unwrap();
    assert!(text.contains("nightcopy_last_run_success 0\n"), "{text}");
    // Nothing was uploaded, and the batches still wait for a worker.
    assert!(s3().list_keys(&c.dest).is_empty());
    assert_eq!(q.depth(&q.work), 2);
    c.assert_no_delete();
}

#[test]
fn past_the_deadline_nothing_more_is_sent_and_the_rest_of_the_plan_is_kept_or_named() {
    let (mut c, q) = distributed("dist-full", 1, "5s");
    c.top_extra.push_str("  max-queued: 2\n");
    c.write("z.txt", b"unchanged");
    {
        let _worker = Worker::start(&c, None, 0);
        let first = run_coordinator(&c, Duration::from_secs(90));
        assert_eq!(first.code, 0, "{}", first.stderr);
    }
    // Twelve batches of one file, no worker: two are sent, the deadline passes while the
    // coordinator waits for room, and z.txt (after them in key order) is planned after that.
    for i in 0..12 {
        c.write(&format!("f{i:02}.txt"), b"waiting");
    }
    let out = run_coordinator(&c, Duration::from_secs(90));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 12, "{}", out.stderr);
    assert_eq!(out.figure("checks"), 1, "{}", out.stderr);
    for i in 0..12 {
        let why = if i < 2 {
            "not accounted for by the deadline (5s)"
        } else {
            "not sent by the deadline (5s)"
        };
        assert!(
            out.stderr.contains(&format!("f{i:02}.txt: {why}")),
            "f{i:02}.txt: {why}\n{}",
            out.stderr
        );
    }
    assert_eq!(
        q.depth(&q.work),
        2,
        "no more than max-queued batches were sent"
    );
    assert_eq!(manifest_keys(&c), vec![c.key("z.txt")]);
    c.assert_no_delete();
}

#[test]
fn a_worker_keeps_its_concurrency_busy_across_batches() {
    // Batches of two files and six uploads at once: the worker takes more batches while the
    // first are in work, so six PUTs overlap (one batch at a time would allow two).
    let (mut c, _q) = distributed("dist-slots", 2, "5min");
    c.transfer_extra = "  concurrency: 6\n".into();
    for i in 0..12u8 {
        c.write(&format!("f{i:02}.txt"), &pseudo_random(100, i));
    }
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(1.0, &[FaultKind::Stall], 7)
                .only(&[Op::PutObject])
                .stall_for(Duration::from_secs(1)),
        ),
    );
    let worker = Worker::start(&c, None, 0);
    let out = run_coordinator(&c, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{}\n{}", out.stderr, worker.log());
    assert_eq!(out.figure("files transferred"), 12, "{}", out.stderr);
    assert_eq!(s3().peak_in_flight(&c.dest, Op::PutObject), 6);
    c.assert_no_delete();
}

/// A message in the dead-letter queue is whatever anyone allowed to send there sent: `dlq` prints
/// each of its text fields escaped, so a newline in one cannot make a second line.
#[test]
fn dlq_prints_a_message_s_fields_escaped() {
    let (c, q) = distributed("dlq-escaped", 10, "60s");
    let batch = serde_json::json!({
        "run": "r1\nINFO 0 batches in the dead-letter queue",
        "batch": 7,
        "destination": "d",
        "files": [{
            "key": "a\u{1b}[2Jb",
            "path": "p\rq",
            "size": 1,
            "mtime_ns": 0,
            "reason": "new",
        }],
    });
    q.send(&q.dlq, &batch.to_string());
    let out = c.run(&["dlq"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "batch\tr1\\nINFO 0 batches in the dead-letter queue\t7\t1\ta\\x1b[2Jb\tp\\rq\n"
    );
}
