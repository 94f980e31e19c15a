//! The core copy engine end to end: the real binary against a real S3 API server (s3s-fs by
//! default; `NIGHTCOPY_TEST_S3_ENDPOINT` points the suite elsewhere), every request counted by a
//! proxy in front of it.

use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::proxy::Op;
use crate::common::run::{pseudo_random, unprivileged, Case, AWKWARD_NAMES};
use crate::common::s3::s3;
use crate::common::wait::{not_run, require_root};
use base64::Engine as _;
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

#[test]
fn fresh_copy_of_a_mixed_tree_then_a_rerun_sends_no_put() {
    let c = Case::new("mixed");
    let files = AWKWARD_NAMES;
    for (rel, body) in files {
        c.write(rel, body);
    }
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), files.len() as u64);
    assert_eq!(out.figure("transfer errors"), 0);

    let mut want: Vec<String> = files.iter().map(|(r, _)| c.key(r)).collect();
    want.sort();
    assert_eq!(s3().list_keys(&c.dest), want);
    for (rel, body) in files {
        let o = s3().get(&c.dest, &c.key(rel));
        assert_eq!(o.body, *body, "{rel}");
    }

    let puts_before = c.count(Op::PutObject);
    let again = c.run(&["run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.figure("files transferred"), 0);
    assert_eq!(again.figure("checks"), files.len() as u64);
    assert!(again.stderr.contains("(0 B)"), "{}", again.stderr);
    assert_eq!(
        c.count(Op::PutObject),
        puts_before,
        "the rerun sent a PUT: {:?}",
        c.ops()
    );
    assert_eq!(
        c.count(Op::HeadObject),
        0,
        "change detection must not HEAD objects"
    );
    c.assert_no_delete();
}

#[test]
fn a_rerun_lists_the_bucket_in_ranges_cut_at_manifest_keys_one_request_per_page() {
    // 9,000 keys: the manifest's cuts every 4,000 keys make three ranges of 4, 4 and 1 pages.
    let c = Case::new("ranges");
    let n = 9_000;
    for i in 0..n {
        c.write(&format!("d{:02}/f{i:05}", i % 30), b"x");
    }
    let first = c.run(&["run"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.figure("files transferred"), n);
    // A change in the last range and one in the first must both be seen.
    c.write("d00/f00000", b"changed");
    c.write("d29/f08999", b"changed too");

    let seen = s3().requests(&c.dest).len();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 2);
    assert_eq!(out.figure("checks"), n - 2);
    let rerun: Vec<_> = s3().requests(&c.dest).into_iter().skip(seen).collect();
    let lists: Vec<_> = rerun.iter().filter(|r| r.op == Op::ListObjectsV2).collect();
    // The first range also holds the manifest's copy, .nightcopy/manifest.gz, which sorts
    // before these keys: 4,001 keys are 5 pages there.
    assert_eq!(lists.len(), 10, "one request per page of 1,000 keys");
    let mut starts: Vec<_> = lists
        .iter()
        .filter_map(|r| r.query_param("start-after"))
        .collect();
    starts.sort();
    // The two cuts: the 4,000th and 8,000th keys of the manifest, in key order.
    let mut keys: Vec<String> = (0..n)
        .map(|i| c.key(&format!("d{:02}/f{i:05}", i % 30)))
        .collect();
    keys.sort();
    assert_eq!(starts, [keys[3_999].clone(), keys[7_999].clone()]);
    assert_eq!(
        rerun.iter().filter(|r| r.op == Op::PutObject).count(),
        2,
        "{:?}",
        c.ops()
    );
    c.assert_no_delete();
}

#[test]
fn a_changed_file_with_the_same_size_and_an_older_mtime_is_uploaded_again() {
    let c = Case::new("mtime-back");
    let p = c.write("doc.txt", b"version 1");
    assert_eq!(c.run(&["run"]).code, 0);
    fs::write(&p, b"version 2").unwrap();
    // Restored from a tarball: the mtime goes back a year.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(365 * 86400);
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 1);
    assert_eq!(s3().get(&c.dest, &c.key("doc.txt")).body, b"version 2");
}

#[test]
fn excludes_inline_and_from_a_file_prune_directories() {
    let mut c = Case::new("excludes");
    c.write("keep/a.txt", b"a");
    c.write("keep/b.tmp", b"tmp");
    c.write("cache/x/y.bin", b"cached");
    c.write("deep/er/.snapshot/old", b"snap");
    c.write("logs/app.log", b"log");
    // An excluded directory nobody may read: pruning means it is never opened.
    let locked = c.src.join("private");
    fs::create_dir(&locked).unwrap();
    fs::write(locked.join("secret"), b"s").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let list = c.root.join("exclude.txt");
    fs::write(&list, "# comment\n\n*.tmp\n/logs/**\n").unwrap();
    c.source_extra = format!(
        "  exclude: [\"cache/**\", \"**/.snapshot/**\", \"private/**\"]\n  exclude-from: {}\n",
        list.display()
    );
    let out = c.run_with(&["run"], unprivileged());
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(s3().list_keys(&c.dest), [c.key("keep/a.txt")]);
    assert_eq!(out.figure("transfer errors"), 0);
    // cache, .snapshot, private (pruned dirs), b.tmp, logs (pruned)
    assert_eq!(out.figure("excluded"), 5, "{}", out.stderr);
}

#[test]
fn a_local_delete_never_removes_the_object() {
    let c = Case::new("local-delete");
    let p = c.write("precious.txt", b"keep me");
    c.write("other.txt", b"other");
    assert_eq!(c.run(&["run"]).code, 0);
    fs::remove_file(&p).unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("only in the bucket"), 1);
    assert_eq!(s3().get(&c.dest, &c.key("precious.txt")).body, b"keep me");
    c.assert_no_delete();
}

#[test]
fn an_unreadable_file_is_counted_and_everything_else_is_copied() {
    let c = Case::new("unreadable");
    c.write("a.txt", b"a");
    let bad = c.write("b-locked.txt", b"secret");
    c.write("c.txt", b"c");
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o000)).unwrap();
    let out = c.run_with(&["run"], unprivileged());
    assert_eq!(out.code, 2, "per-file errors exit 2:\n{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 1);
    assert_eq!(out.figure("files transferred"), 2);
    assert!(
        out.stderr.contains(&bad.display().to_string()),
        "the journal must name the path:\n{}",
        out.stderr
    );
    assert_eq!(s3().list_keys(&c.dest), [c.key("a.txt"), c.key("c.txt")]);
}

#[test]
fn a_multipart_file_round_trips_content_and_checksums() {
    let c = Case::new("multipart");
    let big = pseudo_random(13 * 1024 * 1024 + 17, 7); // 3 parts of 5 MiB, the last short
    c.write("big.bin", &big);
    let medium = pseudo_random(3 * 1024 * 1024 + 5, 9); // streamed single PUT
    c.write("medium.bin", &medium);
    let small = pseudo_random(1000, 11); // single PUT from memory
    c.write("small.bin", &small);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(c.count(Op::CreateMultipartUpload), 1, "{:?}", c.ops());
    assert_eq!(c.count(Op::UploadPart), 3);
    assert_eq!(c.count(Op::CompleteMultipartUpload), 1);
    let o = s3().get(&c.dest, &c.key("big.bin"));
    assert_eq!(sha(&o.body), sha(&big));
    // Every part carried the SHA-256 of exactly its bytes (S3 verifies it on receipt); a server
    // that stores the composite checksum reports it with the part count.
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(sha(b));
    let mut parts: Vec<_> = s3()
        .requests(&c.dest)
        .into_iter()
        .filter(|r| r.op == Op::UploadPart)
        .map(|r| {
            (
                r.query_param("partNumber").unwrap(),
                r.header("x-amz-checksum-sha256").map(str::to_owned),
            )
        })
        .collect();
    parts.sort();
    let want: Vec<_> = big
        .chunks(5 * 1024 * 1024)
        .enumerate()
        .map(|(i, chunk)| ((i + 1).to_string(), Some(b64(chunk))))
        .collect();
    assert_eq!(parts, want);
    if let Some(sum) = &o.checksum_sha256 {
        assert!(sum.ends_with("-3"), "{sum}");
    }
    let m = s3().get(&c.dest, &c.key("medium.bin"));
    assert_eq!(sha(&m.body), sha(&medium));
    // Single PUTs, streamed or from memory, carry the SHA-256 of the whole file, for S3 to check.
    let mut puts: Vec<_> = s3()
        .requests(&c.dest)
        .into_iter()
        .filter(|r| r.op == Op::PutObject)
        .map(|r| {
            (
                r.key.clone(),
                r.header("x-amz-checksum-sha256").map(str::to_owned),
            )
        })
        .collect();
    puts.sort();
    assert_eq!(
        puts,
        [
            (c.key("medium.bin"), Some(b64(&medium))),
            (c.key("small.bin"), Some(b64(&small)))
        ]
    );
    // The manifest records the whole-file SHA-256 of what was read.
    let manifest = fs::read_to_string(c.root.join("state/manifest")).unwrap();
    assert!(manifest.contains(&hex::encode(sha(&big))), "{manifest}");
    assert!(manifest.contains(&hex::encode(sha(&medium))), "{manifest}");
}

#[test]
fn metadata_round_trips_and_awkward_names_are_escaped_reversibly() {
    use std::os::unix::fs::MetadataExt;
    let c = Case::new("metadata");
    let p = c.write("script.sh", b"#!/bin/sh\n");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o750)).unwrap();
    let raw = c
        .src
        .join(std::ffi::OsString::from_vec(b"caf\xe9 \x01.txt".to_vec()));
    fs::write(&raw, b"latin-1").unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let meta = fs::metadata(&p).unwrap();
    let o = s3().get(&c.dest, &c.key("script.sh"));
    let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    assert_eq!(
        o.metadata.get("nightcopy-mtime-ns"),
        Some(&mtime_ns.to_string())
    );
    assert_eq!(
        o.metadata.get("nightcopy-mode").map(String::as_str),
        Some("750")
    );
    assert_eq!(
        o.metadata.get("nightcopy-uid"),
        Some(&meta.uid().to_string())
    );
    assert_eq!(
        o.metadata.get("nightcopy-gid"),
        Some(&meta.gid().to_string())
    );

    let escaped = c.key("caf%E9 %01.txt");
    let o = s3().get(&c.dest, &escaped);
    assert_eq!(o.body, b"latin-1");
    let raw_path = o
        .metadata
        .get("nightcopy-raw-path")
        .expect("raw path metadata");
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(raw_path).collect();
    assert_eq!(decoded, b"caf\xe9 \x01.txt");
}

#[test]
fn dry_run_lists_the_plan_and_sends_no_put() {
    let c = Case::new("dry-run");
    c.write("one.txt", b"1");
    c.write("two/three.txt", b"3");
    let out = c.run(&["run", "--dry-run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("upload\tnew\t1\t"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&c.key("two/three.txt")),
        "{}",
        out.stdout
    );
    assert_eq!(c.count(Op::PutObject), 0, "{:?}", c.ops());
    assert!(s3().list_keys(&c.dest).is_empty());
    assert!(
        !c.root.join("state/manifest").exists(),
        "a dry run changes no state"
    );
}

#[test]
fn special_files_and_symlinks_are_not_uploaded_but_recorded_in_the_snapshot() {
    let c = Case::new("special");
    c.write("real.txt", b"real");
    nix::unistd::mkfifo(
        &c.src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("real.txt", c.src.join("link")).unwrap();
    // A dry run walks the files only: the others are counted as skipped.
    let dry = c.run(&["run", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(dry.figure("special files skipped"), 1);
    assert_eq!(dry.figure("symlinks skipped"), 1);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("special files skipped"), 0);
    assert_eq!(out.figure("symlinks skipped"), 0);
    assert_eq!(s3().list_keys(&c.dest), [c.key("real.txt")]);
    let (header, _) = crate::snapshots::snapshots(&c).remove(0);
    assert_eq!((header.counts.specials, header.counts.symlinks), (1, 1));
}

#[test]
fn a_missing_bucket_is_fatal_and_says_what_to_do() {
    let mut c = Case::new("nobucket");
    c.write("a.txt", b"a");
    c.dest.bucket = format!("{}-missing", c.dest.bucket);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    assert!(out.stderr.contains("destination.bucket"), "{}", out.stderr);
}

#[test]
fn a_missing_source_is_fatal_and_an_invalid_config_exits_78() {
    let c = Case::new("nosource");
    fs::remove_dir(&c.src).unwrap();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);

    let bad = c.root.join("bad.yaml");
    fs::write(
        &bad,
        "source:\n  path: /x\n  colour: blue\ndestination:\n  bucket: b-1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nightcopy"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("colour") && err.contains("line 3"), "{err}");
}

#[test]
fn no_run_ever_sends_a_delete() {
    // A busy life: first copy, changes, deletes, renames, a multipart file, reruns.
    let c = Case::new("append-only");
    for i in 0..20 {
        c.write(&format!("d{}/f{i}.txt", i % 3), format!("{i}").as_bytes());
    }
    c.write("big.bin", &pseudo_random(7 * 1024 * 1024, 3));
    assert_eq!(c.run(&["run"]).code, 0);
    fs::remove_dir_all(c.src.join("d1")).unwrap();
    fs::rename(c.src.join("d2"), c.src.join("d2-renamed")).unwrap();
    c.write("d0/f0.txt", b"changed");
    assert_eq!(c.run(&["run"]).code, 0);
    fs::remove_file(c.src.join("big.bin")).unwrap();
    assert_eq!(c.run(&["run"]).code, 0);
    assert_eq!(c.run(&["run", "--dry-run"]).code, 0);
    let ops = c.ops();
    assert!(ops.get("PutObject").copied().unwrap_or(0) > 0, "{ops:?}");
    c.assert_no_delete();
    // Everything ever uploaded is still there: 20 small + big.bin + the 6 renamed copies.
    assert_eq!(s3().list_keys(&c.dest).len(), 20 + 1 + 6);
}

#[test]
fn missing_or_rejected_credentials_are_fatal_and_say_what_to_do() {
    let mut c = Case::new("creds");
    c.write("a.txt", b"a");
    // No keys anywhere, metadata service off: the default chain finds nothing.
    c.env_remove = vec!["AWS_ACCESS_KEY_ID".into(), "AWS_SECRET_ACCESS_KEY".into()];
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("no AWS credentials"), "{}", out.stderr);
    assert!(out.stderr.contains("instance role"), "{}", out.stderr);

    c.env_remove.clear();
    c.env = vec![("AWS_SECRET_ACCESS_KEY".into(), "not-the-secret".into())];
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("credentials were rejected"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("not-the-secret"),
        "a credential was printed"
    );
    assert!(s3().list_keys(&c.dest).is_empty());
}

#[test]
fn one_file_system_does_not_enter_another_mount() {
    use std::os::unix::process::CommandExt;
    if !require_root(
        "copy::one_file_system_does_not_enter_another_mount",
        "it mounts a tmpfs inside the source in a private mount namespace",
    ) {
        return;
    }
    for (one_fs, want) in [
        (true, vec!["top.txt"]),
        (false, vec!["other/inside.txt", "top.txt"]),
    ] {
        let mut c = Case::new(if one_fs { "onefs-on" } else { "onefs-off" });
        c.write("top.txt", b"top");
        let other = c.src.join("other");
        fs::create_dir(&other).unwrap();
        c.source_extra = format!("  one-file-system: {one_fs}\n");
        let mut cmd = c.command(&["run"], None);
        let target = std::ffi::CString::new(other.as_os_str().as_encoded_bytes()).unwrap();
        let file = std::ffi::CString::new(other.join("inside.txt").as_os_str().as_encoded_bytes())
            .unwrap();
        // SAFETY: only system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                crate::common::run::private_mount_namespace()?;
                crate::common::run::mount_tmpfs(target.as_c_str())?;
                let fd = nix::fcntl::open(
                    file.as_c_str(),
                    nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
                    nix::sys::stat::Mode::from_bits_truncate(0o644),
                )?;
                nix::unistd::write(&fd, b"on another filesystem")?;
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: Vec<String> = want.iter().map(|k| c.key(k)).collect();
        assert_eq!(s3().list_keys(&c.dest), want, "one-file-system: {one_fs}");
    }
}

#[test]
fn symlinks_are_followed_when_configured() {
    let mut c = Case::new("follow");
    c.write("real/a.txt", b"target");
    std::os::unix::fs::symlink("real/a.txt", c.src.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("real", c.src.join("linkdir")).unwrap();
    std::os::unix::fs::symlink("nowhere", c.src.join("dangling")).unwrap();
    c.source_extra = "  symlinks: follow\n".into();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        s3().list_keys(&c.dest),
        [
            c.key("link.txt"),
            c.key("linkdir/a.txt"),
            c.key("real/a.txt")
        ]
    );
    assert_eq!(s3().get(&c.dest, &c.key("link.txt")).body, b"target");
}

#[test]
fn a_key_over_1024_bytes_is_a_counted_error_naming_the_path() {
    let c = Case::new("longkey");
    let seg = "d".repeat(250);
    let rel = format!("{seg}/{seg}/{seg}/{seg}/long.txt"); // 1,013 bytes, over 1,024 with any prefix
    let long = c.write(&rel, b"x");
    // (s3s-fs names its metadata file after the base64 of the key: keep this one short.)
    let rel_ok = "ok.txt".to_owned();
    c.write(&rel_ok, b"ok");
    let mut prefixed = c;
    prefixed.dest.prefix = format!("{}{}/", prefixed.dest.prefix, "p".repeat(20));
    let out = prefixed.run(&["run"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.figure("transfer errors"), 1);
    assert!(
        out.stderr.contains(&long.display().to_string()),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("1024"), "{}", out.stderr);
    assert_eq!(s3().list_keys(&prefixed.dest), [prefixed.key(&rel_ok)]);
}

#[test]
fn without_a_manifest_an_existing_backup_is_trusted_by_size_and_upload_time() {
    // A new host (or a lost state directory) against a bucket that already holds the tree.
    let c = Case::new("no-manifest");
    c.write("a.txt", b"aaa");
    c.write("b/c.txt", b"ccc");
    assert_eq!(c.run(&["run"]).code, 0);
    fs::remove_dir_all(c.state_dir()).unwrap();
    let puts = c.count(Op::PutObject);
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.figure("files transferred"), 0);
    assert_eq!(out.figure("checks"), 2);
    assert_eq!(c.count(Op::PutObject), puts);
    // ...and the manifest is written again, with the entries adopted from the listing.
    let manifest = fs::read_to_string(c.state_dir().join("manifest")).unwrap();
    assert!(manifest.contains("a.txt\t3\t"), "{manifest}");
}

/// Runs with extra `destination:` keys (the Case writes the rest of the config).
fn run_with_destination(c: &Case, extra: &str) -> crate::common::run::Output {
    let cfg = c.config_path();
    let yaml = fs::read_to_string(&cfg).unwrap();
    let text = yaml.replace(
        "force-path-style: true\n",
        &format!("force-path-style: true\n{extra}"),
    );
    assert_ne!(text, yaml);
    fs::write(&cfg, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nightcopy"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env_clear()
        .envs(s3().env())
        .output()
        .unwrap();
    crate::common::run::Output::from(out)
}

#[test]
fn storage_class_and_encryption_are_sent_on_every_upload() {
    let c = Case::new("sse");
    c.write("small.txt", b"small");
    c.write("big.bin", &pseudo_random(7 * 1024 * 1024, 5));
    let out = run_with_destination(&c, "  storage-class: STANDARD\n  sse: AES256\n");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let uploads: Vec<_> = s3()
        .requests(&c.dest)
        .into_iter()
        .filter(|r| matches!(r.op, Op::PutObject | Op::CreateMultipartUpload))
        .collect();
    assert_eq!(uploads.len(), 2);
    for r in uploads {
        assert_eq!(
            r.header("x-amz-storage-class"),
            Some("STANDARD"),
            "{:?}",
            r.op
        );
        assert_eq!(
            r.header("x-amz-server-side-encryption"),
            Some("AES256"),
            "{:?}",
            r.op
        );
    }
}

#[test]
fn a_storage_class_the_endpoint_refuses_is_fatal_not_one_error_per_file() {
    // s3s-fs accepts only STANDARD: the situation of a config that asks for a class the service
    // does not offer. Every file would fail the same way, so the run stops and says why.
    let c = Case::new("bad-class");
    for i in 0..5 {
        c.write(&format!("f{i}.txt"), b"x");
    }
    // Without the small-files rule: by default files this small would go to STANDARD.
    let out = run_with_destination(
        &c,
        "  storage-class: STANDARD_IA\n  small-files:\n    below: 0\n",
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("destination.storage-class"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("extensions"),
        "no raw SDK dump: {}",
        out.stderr
    );
}

#[test]
fn the_command_line_keeps_its_contract() {
    let bin = env!("CARGO_BIN_EXE_nightcopy");
    let run = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let out = Command::new(bin)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, stdout, _) = run(&["--version"], &[]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout, format!("nightcopy {}\n", env!("CARGO_PKG_VERSION")));

    // --help documents every exit code (docs/exit-codes.md has the long form).
    let (code, help, _) = run(&["--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(help.contains("docs/exit-codes.md"), "{help}");
    for code in ["0 ", "1 ", "2 ", "3 ", "4 ", "64 ", "75 ", "78 "] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(code)),
            "exit code {code} missing from --help:\n{help}"
        );
    }

    // Usage errors exit 64.
    for args in [&["frobnicate"][..], &["run", "--no-such-flag"], &[]] {
        let (code, _, stderr) = run(args, &[]);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
    }

    // The config path: --config, else NIGHTCOPY_CONFIG, else /etc/nightcopy/config.yaml.
    // check-config prints the effective config with the defaults filled in.
    let c = Case::new("cli");
    let cfg = c.config_path();
    let (code, effective, stderr) = run(&["check-config"], &[("NIGHTCOPY_CONFIG", &cfg)]);
    assert_eq!(code, Some(0), "{stderr}");
    for line in [
        format!("  path: {}\n", c.src.display()),
        "  one-file-system: true\n".into(),
        "  symlinks: skip\n".into(),
        "  concurrency: 16\n".into(),
        "  min-interval: 0s\n".into(),
        "success-max-errors: 0\n".into(),
    ] {
        assert!(effective.contains(&line), "{line:?} not in\n{effective}");
    }
    // Only where nightcopy is not installed: there the default file exists.
    if std::path::Path::new("/etc/nightcopy/config.yaml").exists() {
        not_run(
            "copy::the_command_line_keeps_its_contract, without a config file",
            "nightcopy is installed",
            "/etc/nightcopy/config.yaml exists on this host",
        );
    } else {
        let (code, _, stderr) = run(&["check-config"], &[]);
        assert_eq!(code, Some(78), "{stderr}");
        assert!(
            stderr.contains("/etc/nightcopy/config.yaml") && stderr.contains("NIGHTCOPY_CONFIG"),
            "{stderr}"
        );
    }
}
