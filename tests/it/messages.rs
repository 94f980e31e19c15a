//! What an operator reads when something is wrong: one line that says what failed, why (S3's or
//! the SDK's code and message) and what to do — never the SDK's `Debug` dump of a response,
//! which is what the journal showed first before. One case per cause.

use crate::common::proxy::{FaultKind, FaultPlan, Op};
use crate::common::run::{Case, Output};
use crate::common::s3::s3;

/// Whether `text` holds a Rust `Debug` rendering of a structure or an enum: `Name { field: …`,
/// `Name(Name…`, `Some(`, or the SDK's raw response pieces.
pub(crate) fn debug_structure(text: &str) -> Option<&str> {
    for line in text.lines() {
        for (i, _) in line.match_indices(" { ") {
            let before = &line[..i];
            let after = &line[i + 3..];
            let ident = before.chars().last().is_some_and(|c| c.is_alphanumeric());
            let field = after.split_once(':').is_some_and(|(f, _)| {
                !f.is_empty() && f.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            if ident && field {
                return Some(line);
            }
        }
        for marker in [
            "Some(",
            "SdkBody",
            "DispatchFailure(",
            "ServiceError(",
            "ConnectorError",
            "Response {",
        ] {
            if line.contains(marker) {
                return Some(line);
            }
        }
    }
    None
}

fn assert_one_readable_line(out: &Output, says: &str) {
    let fatal: Vec<&str> = out.stderr.lines().filter(|l| l.contains(says)).collect();
    assert!(!fatal.is_empty(), "{says:?} not in:\n{}", out.stderr);
    // A fatal error ends in the summary's figures on the same line: nothing broke it in two.
    if fatal[0].contains("FAILED") {
        assert!(
            fatal[0].contains(" transfer errors"),
            "not one line:\n{}",
            out.stderr
        );
    }
    if let Some(line) = debug_structure(&out.stderr) {
        panic!(
            "a debug structure reached stderr:\n{line}\n\nall of it:\n{}",
            out.stderr
        );
    }
}

#[test]
fn the_reader_of_debug_structures_finds_them() {
    assert!(
        debug_structure("x (DispatchFailure(DispatchFailure { source: ConnectorError { kind")
            .is_some()
    );
    assert!(debug_structure("raw: Response { status: 403, headers: {} }").is_some());
    assert!(debug_structure("listing s3://b at http://127.0.0.1:1 failed: cannot reach the endpoint: check destination.endpoint-url / region and the network (dispatch failure: io error: tcp connect error: Connection refused (os error 111))").is_none());
}

#[test]
fn no_credentials_is_one_line_with_the_fix() {
    let mut c = Case::new("msg-nocreds");
    c.write("f.txt", b"x");
    c.env_remove = vec!["AWS_ACCESS_KEY_ID".into(), "AWS_SECRET_ACCESS_KEY".into()];
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_one_readable_line(&out, "no AWS credentials: on EC2 attach an instance role");
}

#[test]
fn refusals_by_s3_are_one_line_each_with_the_fix() {
    let refuse = |status, code| FaultKind::Refuse { status, code };
    let cases = [
        (
            refuse(403, "InvalidAccessKeyId"),
            "the credentials were rejected",
        ),
        (refuse(400, "ExpiredToken"), "the credentials were rejected"),
        (
            refuse(400, "AuthorizationHeaderMalformed"),
            "set destination.region to the bucket's region",
        ),
        (
            refuse(403, "AccessDenied"),
            "access denied: the instance role needs s3:ListBucket",
        ),
        (
            refuse(403, "RequestTimeTooSkewed"),
            "clock is more than 15 minutes off",
        ),
    ];
    for (i, (kind, says)) in cases.into_iter().enumerate() {
        let c = Case::new(&format!("msg-refused-{i}"));
        c.write("f.txt", b"x");
        s3().set_faults(
            &c.dest,
            Some(FaultPlan::new(1.0, &[kind], 1).only(&[Op::ListObjectsV2])),
        );
        let out = c.run(&["run"]);
        s3().set_faults(&c.dest, None);
        assert_eq!(out.code, 1, "{kind:?}: {}", out.stderr);
        assert_one_readable_line(&out, says);
    }
}

#[test]
fn a_missing_bucket_and_a_dead_endpoint_are_one_line_each() {
    let mut c = Case::new("msg-nobucket");
    c.write("f.txt", b"x");
    c.dest.bucket = "no-such-bucket-for-nightcopy".into();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_one_readable_line(
        &out,
        "the bucket does not exist: create it or correct destination.bucket",
    );

    let c = Case::new("msg-dead");
    c.write("f.txt", b"x");
    let config = c.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    let dead = text
        .replace(&s3().endpoint, "http://127.0.0.1:9")
        .replace("transfer:\n", "transfer:\n  request-timeout: 2s\n");
    std::fs::write(c.root.join("dead.yaml"), dead).unwrap();
    let out = Output::from(
        c.command_for(&["run"], None, &c.root.join("dead.yaml"))
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_one_readable_line(
        &out,
        "cannot reach the endpoint: check destination.endpoint-url",
    );
}

#[test]
fn throttling_on_every_attempt_is_one_line_naming_the_file_and_the_fix() {
    let c = Case::new("msg-throttled");
    c.write("slow.txt", b"x");
    s3().set_faults(
        &c.dest,
        Some(FaultPlan::new(1.0, &[FaultKind::SlowDown], 1).only(&[Op::PutObject])),
    );
    let out = c.run(&["run"]);
    s3().set_faults(&c.dest, None);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_one_readable_line(
        &out,
        "S3 asked to slow down on every attempt: lower transfer.concurrency",
    );
    assert!(out.stderr.contains("slow.txt"), "{}", out.stderr);
}
