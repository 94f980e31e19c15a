//! Multipart uploads that a run leaves unfinished are continued by the next run, on Garage (which,
//! like AWS, lists the SHA-256 of each part it holds): a stop (SIGTERM) and a kill (SIGKILL)
//! half-way through a large file, then a run that completes it. The proxy counts what each run
//! sent; no part S3 already held is sent again, and the object is the file.

use std::collections::BTreeSet;
use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::common::proxy::{Op, Request};
use crate::common::run::{pseudo_random, Case};
use crate::common::s3::garage;

const MIB: usize = 1024 * 1024;
/// The harness's part size (tests/it/common/run.rs).
const PART: usize = 5 * MIB;

/// Part uploads S3 accepted, by part number, and the bytes of each.
fn accepted_parts(requests: &[Request]) -> Vec<(u32, u64)> {
    requests
        .iter()
        .filter(|r| r.op == Op::UploadPart && r.status == Some(200))
        .map(|r| {
            let n = r.query_param("partNumber").unwrap().parse().unwrap();
            let len = r.header("content-length").unwrap().parse().unwrap();
            (n, len)
        })
        .collect()
}

/// Bytes of every part upload that was attempted, accepted or cut off.
fn attempted_bytes(requests: &[Request]) -> u64 {
    requests
        .iter()
        .filter(|r| r.op == Op::UploadPart)
        .map(|r| r.header("content-length").unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Starts a run, sends it `sig` once S3 accepted `parts` more parts than `seen` requests held,
/// and waits for it.
fn interrupt_after_parts(
    c: &Case,
    seen: usize,
    parts: usize,
    sig: nix::sys::signal::Signal,
) -> std::process::Output {
    let mut child = c
        .command(&["run"], None)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let now: Vec<_> = c.server.requests(&c.dest).into_iter().skip(seen).collect();
        if accepted_parts(&now).len() >= parts {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fewer than {parts} parts in 60 s: {:?}", c.ops());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
    child.wait_with_output().unwrap()
}

/// The composite checksum S3 reports for an object uploaded in `PART`-sized parts.
fn composite(body: &[u8]) -> String {
    let mut outer = Sha256::new();
    let chunks = body.chunks(PART);
    let n = chunks.len();
    for chunk in chunks {
        outer.update(Sha256::digest(chunk));
    }
    format!(
        "{}-{n}",
        base64::engine::general_purpose::STANDARD.encode(outer.finalize())
    )
}

#[test]
fn an_interrupted_multipart_upload_sends_only_its_missing_parts_after_sigterm_and_sigkill() {
    let server = garage();
    let mut c = Case::on(server, server.dest("resume"));
    let size = 200 * MIB;
    let body = pseudo_random(size, 14);
    c.write("big.bin", &body);
    // 40 parts of 5 MiB at 40 MiB/s: five seconds for the whole file.
    c.transfer_extra = "  bandwidth-limit: 40MiB\n  concurrency: 4\n".into();

    // 1. SIGTERM once 12 parts are in: a stop keeps the upload and its record.
    let out = interrupt_after_parts(&c, 0, 12, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = c.server.requests(&c.dest);
    assert_eq!(
        fs::read_dir(c.state_dir().join("uploads")).unwrap().count(),
        1
    );

    // 2. SIGKILL once 8 more are in: nothing runs at all on the way out.
    interrupt_after_parts(&c, first.len(), 8, nix::sys::signal::Signal::SIGKILL);
    let upto_second = c.server.requests(&c.dest);
    let second: Vec<_> = upto_second[first.len()..].to_vec();

    // 3. Unhindered, the run completes the upload.
    c.transfer_extra = "  concurrency: 4\n".into();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("continued the interrupted upload of big.bin"),
        "{}",
        out.stderr
    );
    let all = c.server.requests(&c.dest);
    let third: Vec<_> = all[upto_second.len()..].to_vec();

    // One upload from start to end, never aborted; each later run asked S3 what it held.
    let count = |op: Op| all.iter().filter(|r| r.op == op).count();
    assert_eq!(count(Op::CreateMultipartUpload), 1, "{:?}", c.ops());
    assert_eq!(count(Op::AbortMultipartUpload), 0);
    assert_eq!(count(Op::ListParts), 2);
    assert_eq!(count(Op::CompleteMultipartUpload), 1);

    // No part S3 had accepted was sent again.
    let (p1, p2, p3) = (
        accepted_parts(&first),
        accepted_parts(&second),
        accepted_parts(&third),
    );
    let numbers = |p: &[(u32, u64)]| p.iter().map(|(n, _)| *n).collect::<BTreeSet<_>>();
    let held_before_2 = numbers(&p1);
    assert!(numbers(&p2).is_disjoint(&held_before_2), "{p1:?}\n{p2:?}");
    let held_before_3: BTreeSet<_> = held_before_2.union(&numbers(&p2)).copied().collect();
    assert!(numbers(&p3).is_disjoint(&held_before_3), "{p3:?}");
    let bytes = |p: &[(u32, u64)]| p.iter().map(|(_, b)| *b).sum::<u64>();
    let (b1, b2, b3) = (bytes(&p1), bytes(&p2), bytes(&p3));
    // The last run sent what the first two had not got in, and nothing more.
    assert!(b1 + b2 + b3 <= size as u64, "{b1} + {b2} + {b3}");
    assert!(b3 <= size as u64 - b1 - b2);
    let attempted = attempted_bytes(&all);
    eprintln!(
        "resume figures: run 1 (SIGTERM) {} parts = {} MiB accepted, run 2 (SIGKILL) {} parts = \
         {} MiB, run 3 {} parts = {} MiB; attempted in all {} MiB for a {} MiB file ({} MiB cut \
         off in flight and sent again)",
        p1.len(),
        b1 / MIB as u64,
        p2.len(),
        b2 / MIB as u64,
        p3.len(),
        b3 / MIB as u64,
        attempted / MIB as u64,
        size / MIB,
        (attempted - size as u64) / MIB as u64
    );

    // The object is the file, with the checksum of its parts; the manifest records the file's
    // SHA-256; no record of the upload is left.
    let object = server.get(&c.dest, &c.key("big.bin"));
    assert!(object.body == body, "the object differs from the file");
    assert_eq!(
        object.checksum_sha256.as_deref(),
        Some(composite(&body).as_str())
    );
    let manifest = fs::read_to_string(c.state_dir().join("manifest")).unwrap();
    assert!(
        manifest.contains(&format!("big.bin\t{size}\t")),
        "{manifest}"
    );
    assert!(manifest.contains(&hex::encode(Sha256::digest(&body))));
    assert_eq!(
        fs::read_dir(c.state_dir().join("uploads")).unwrap().count(),
        0
    );
    c.assert_no_delete();
}

#[test]
fn the_upload_of_a_file_that_changed_since_is_aborted_and_the_new_content_sent() {
    let server = garage();
    let mut c = Case::on(server, server.dest("resume-changed"));
    let path = c.write("big.bin", &pseudo_random(40 * MIB, 3));
    c.transfer_extra = "  bandwidth-limit: 20MiB\n  concurrency: 2\n".into();
    let out = interrupt_after_parts(&c, 0, 2, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(out.status.code(), Some(143));
    let kept = c.server.requests(&c.dest).len();

    // Rewritten between the runs: the parts held are of the old content.
    let new = pseudo_random(40 * MIB, 4);
    fs::write(&path, &new).unwrap();
    c.transfer_extra.clear();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("changed since its upload was started"),
        "{}",
        out.stderr
    );
    let after: Vec<_> = c.server.requests(&c.dest).into_iter().skip(kept).collect();
    let count = |op: Op| after.iter().filter(|r| r.op == op).count();
    assert_eq!(count(Op::AbortMultipartUpload), 1);
    assert_eq!(count(Op::CreateMultipartUpload), 1);
    assert_eq!(count(Op::ListParts), 0);
    assert_eq!(accepted_parts(&after).len(), 8);
    assert!(server.get(&c.dest, &c.key("big.bin")).body == new);
    c.assert_no_delete();
}
