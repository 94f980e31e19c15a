//! SIGKILL at arbitrary moments of a run (what an OOM kill or a power cut looks like to the state
//! directory): after any number of them, the next run completes the copy; no object holds content
//! different from its file; no file the manifest records as done is missing; the manifest is never
//! trusted when damaged.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use crate::common::run::{pseudo_random, Case};
use crate::common::s3::s3;

#[test]
fn sigkill_at_random_moments_never_loses_or_corrupts_anything() {
    let mut c = Case::new("sigkill");
    let mut files = BTreeMap::new();
    for i in 0..60u8 {
        let body = pseudo_random(2_000 + usize::from(i) * 997, i);
        let rel = format!("d{}/f{i:02}.bin", i % 5);
        c.write(&rel, &body);
        files.insert(rel, body);
    }
    let big = pseudo_random(21 * 1024 * 1024 + 17, 77); // multipart, five parts
    c.write("m/big.bin", &big);
    files.insert("m/big.bin".into(), big);
    // Slow enough that every kill lands mid-run: in the walk, between uploads, inside a multipart.
    // A run sends at most 1 MiB a second plus a second's burst, so the eight rounds below (12.1 s
    // of runs in all) send at most about 20 MiB of the tree's 23: each round still has work left when
    // its kill comes. Each round checks that it did.
    c.transfer_extra = "  bandwidth-limit: 1MiB\n  concurrency: 4\n".into();

    // Kill times spread over the first seconds of each run, from a fixed seed (replayable).
    let mut x: u64 = 0x5eed;
    for round in 0..8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let after = Duration::from_millis(50 + x % 2500);
        let mut child = c
            .command(&["run"], None)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A fixed wait: the moment of the kill is what varies from round to round.
        let started = Instant::now();
        while started.elapsed() < after {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "round {round}: the run ended ({status}) after {:?}, before its kill at \
                     {after:?}: nothing was killed",
                    started.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the run ended just before its kill at {after:?}"
        );
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(nix::libc::SIGKILL),
            "round {round}: the run was to die of the kill at {after:?}, it ended {status}"
        );

        // After every kill: whatever the bucket holds is exactly its file, and whatever the
        // manifest (if it is whole) records as uploaded with a SHA-256 is in the bucket.
        let keys = s3().list_keys(&c.dest);
        for key in &keys {
            let rel = key.strip_prefix(&c.dest.prefix).unwrap();
            assert_eq!(
                s3().get(&c.dest, key).body,
                files[rel],
                "round {round}: object {key} differs from its file"
            );
        }
        if let Ok(text) = fs::read_to_string(c.state_dir().join("manifest")) {
            if text.contains("\nend ") {
                for line in text.lines().skip(1).filter(|l| !l.starts_with("end ")) {
                    let mut f = line.split('\t');
                    let key = c.key(f.next().unwrap());
                    let sha = f.nth(2).unwrap();
                    if sha != "-" {
                        assert!(
                            keys.contains(&key),
                            "round {round}: {key} recorded but missing"
                        );
                    }
                }
            }
        }
    }

    // Unkilled, the run completes the copy.
    c.transfer_extra.clear();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let want: Vec<String> = files.keys().map(|k| c.key(k)).collect();
    assert_eq!(s3().list_keys(&c.dest), want);
    for (rel, body) in &files {
        assert_eq!(&s3().get(&c.dest, &c.key(rel)).body, body, "{rel}");
    }
    let again = c.run(&["run"]);
    assert_eq!(again.figure("files transferred"), 0, "{}", again.stderr);
    c.assert_no_delete();
}
