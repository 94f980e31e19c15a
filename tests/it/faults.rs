//! The bad night between nightcopy and S3: a proxy in front of the real server answers a share of
//! requests with 503 SlowDown, 500 InternalError, a response cut mid-body, or a stall. Nothing may
//! be lost, nothing may hang, and a dead endpoint must end the run in bounded time with a message
//! that names it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::proxy::{FaultKind, FaultPlan, Op};
use crate::common::run::{pseudo_random, Case};
use crate::common::s3::s3;
use sha2::{Digest, Sha256};

#[test]
fn five_percent_faults_still_copy_everything_correctly() {
    let mut c = Case::new("faults-5pc");
    let mut files = BTreeMap::new();
    for i in 0..120 {
        let body = pseudo_random(100 + i * 37, i as u8);
        c.write(&format!("d{}/f{i:03}.bin", i % 7), &body);
        files.insert(format!("d{}/f{i:03}.bin", i % 7), body);
    }
    let big = pseudo_random(16 * 1024 * 1024 + 3, 42);
    c.write("big.bin", &big);
    files.insert("big.bin".into(), big);
    c.transfer_extra = "  request-timeout: 3s\n".into();
    s3().set_faults(
        &c.dest,
        Some(
            FaultPlan::new(
                0.05,
                &[
                    FaultKind::SlowDown,
                    FaultKind::Internal,
                    FaultKind::Reset,
                    FaultKind::Stall,
                ],
                7,
            )
            .stall_for(Duration::from_secs(10)),
        ),
    );
    let out = c.run(&["-vv", "run"]);
    s3().set_faults(&c.dest, None);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let faulted = s3()
        .requests(&c.dest)
        .iter()
        .filter(|r| r.fault.is_some())
        .count();
    assert!(
        faulted >= 3,
        "the plan must actually have faulted requests ({faulted})"
    );
    // Retries are in the log at debug level: each failed attempt with its reason, each retry
    // with its request.
    let log =
        |what: &str| -> Vec<&str> { out.stderr.lines().filter(|l| l.contains(what)).collect() };
    let (failed, retried) = (log("S3 attempt failed"), log("S3 retry: "));
    assert!(
        failed.len() >= 3 && retried.len() >= 3,
        "{faulted} faulted requests; logged {failed:#?} {retried:#?}"
    );
    assert!(
        failed.iter().any(|l| l.contains("HTTP 5")
            || l.contains("connector error")
            || l.contains("timeout")),
        "{failed:#?}"
    );
    assert!(
        retried
            .iter()
            .any(|l| l.contains(&format!("/{}/", c.dest.bucket)) && l.contains("attempt 2 of 6")),
        "{retried:#?}"
    );
    for (rel, body) in &files {
        let o = s3().get(&c.dest, &c.key(rel));
        assert_eq!(Sha256::digest(&o.body), Sha256::digest(body), "{rel}");
    }
    // Everything was recorded as done: the rerun moves nothing.
    let again = c.run(&["run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 0, "{}", again.stderr);
    c.assert_no_delete();
}

#[test]
fn slowdown_is_backed_off_not_hammered() {
    let c = Case::new("slowdown");
    c.write("one.txt", b"1");
    // Every PutObject attempt is throttled: the attempts for the one key must spread out.
    s3().set_faults(
        &c.dest,
        Some(FaultPlan::new(1.0, &[FaultKind::SlowDown], 1).only(&[Op::PutObject])),
    );
    let out = c.run(&["run"]);
    s3().set_faults(&c.dest, None);
    assert_eq!(
        out.code, 2,
        "the file fails after its retries: {}",
        out.stderr
    );
    assert!(out.stderr.contains("SlowDown"), "{}", out.stderr);
    let puts: Vec<Instant> = s3()
        .requests(&c.dest)
        .iter()
        .filter(|r| r.op == Op::PutObject)
        .map(|r| r.at)
        .collect();
    assert_eq!(
        puts.len(),
        6,
        "6 attempts, then the file is counted as an error"
    );
    let spread = puts[puts.len() - 1] - puts[0];
    assert!(
        spread >= Duration::from_secs(2),
        "6 throttled attempts within {spread:?}: hammering"
    );
}

#[test]
fn a_stalled_request_times_out_and_is_retried() {
    let mut c = Case::new("stall");
    c.write("a.txt", b"stalled once");
    c.transfer_extra = "  request-timeout: 2s\n".into();
    // The first PutObject stalls for a minute; the run must not wait for it.
    let mut plan = FaultPlan::new(1.0, &[FaultKind::Stall], 3)
        .only(&[Op::PutObject])
        .stall_for(Duration::from_secs(60));
    plan.share = 1.0;
    s3().set_faults(&c.dest, Some(plan));
    let started = Instant::now();
    let child = c
        .command(&["run"], None)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Lift the fault once the first attempt is stalled, so the retry goes through.
    while c.count(Op::PutObject) == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "no PUT seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    s3().set_faults(&c.dest, None);
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "took {elapsed:?}: the stall was waited out"
    );
    assert!(
        c.count(Op::PutObject) >= 2,
        "the stalled attempt was retried"
    );
    assert_eq!(s3().get(&c.dest, &c.key("a.txt")).body, b"stalled once");
}

#[test]
fn a_dead_endpoint_ends_the_run_in_bounded_time_naming_it() {
    let mut c = Case::new("dead");
    c.write("a.txt", b"a");
    c.transfer_extra = "  request-timeout: 2s\n".into();
    s3().set_faults(
        &c.dest,
        Some(FaultPlan::new(1.0, &[FaultKind::Internal], 9)),
    );
    let started = Instant::now();
    let out = c.run(&["run"]);
    let elapsed = started.elapsed();
    s3().set_faults(&c.dest, None);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert!(
        out.stderr.contains(&s3().endpoint),
        "the message names the endpoint: {}",
        out.stderr
    );
    assert!(out.stderr.contains("InternalError"), "{}", out.stderr);
    assert_eq!(c.count(Op::PutObject), 0);
}

/// Answers the local servers never give: a bucket policy that denies the listing or the upload,
/// a bucket in another region, a clock off by more than 15 minutes. Each ends the run at once
/// (every file would fail the same way) with the fix in the message, exit 1, and the previous
/// manifest kept.
#[test]
fn refusals_that_every_file_would_meet_are_fatal_and_say_what_to_fix() {
    let deny = |code| FaultKind::Refuse { status: 403, code };
    let cases = [
        (
            deny("AccessDenied"),
            Op::ListObjectsV2,
            "access denied: the instance role needs s3:ListBucket",
        ),
        (
            deny("AccessDenied"),
            Op::PutObject,
            "s3:PutObject on the prefix",
        ),
        (
            FaultKind::Refuse {
                status: 400,
                code: "AuthorizationHeaderMalformed",
            },
            Op::ListObjectsV2,
            "set destination.region to the bucket's region",
        ),
        (
            deny("RequestTimeTooSkewed"),
            Op::ListObjectsV2,
            "fix time sync",
        ),
        (deny("RequestTimeTooSkewed"), Op::PutObject, "fix time sync"),
    ];
    for (i, (kind, op, says)) in cases.into_iter().enumerate() {
        let c = Case::new(&format!("refused-{i}"));
        c.write("kept.txt", b"backed up before");
        assert_eq!(c.run(&["run"]).code, 0);
        let manifest = std::fs::read(c.state_dir().join("manifest")).unwrap();
        for n in 0..5 {
            c.write(&format!("new{n}.txt"), b"new");
        }
        s3().set_faults(&c.dest, Some(FaultPlan::new(1.0, &[kind], 1).only(&[op])));
        let out = c.run(&["run"]);
        s3().set_faults(&c.dest, None);
        assert_eq!(out.code, 1, "{kind:?} on {op:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(says),
            "{kind:?} on {op:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("backup FAILED"), "{}", out.stderr);
        // Not retried like a transient error, not counted file by file: the run stopped.
        let refused = s3()
            .requests(&c.dest)
            .iter()
            .filter(|r| r.fault.is_some())
            .count();
        assert!(
            refused <= 16,
            "{refused} refused requests for {kind:?} on {op:?}"
        );
        assert_eq!(out.figure("transfer errors"), 0, "{}", out.stderr);
        assert_eq!(
            std::fs::read(c.state_dir().join("manifest")).unwrap(),
            manifest,
            "the previous manifest is kept"
        );
        assert_eq!(s3().list_keys(&c.dest), [c.key("kept.txt")]);
    }
}
