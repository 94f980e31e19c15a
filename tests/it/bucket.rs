//! What the bucket keeps of each object, checked on moto (which implements storage classes,
//! versioning and Object Lock): the storage class by size, Object Lock retention on every object
//! written (and a bucket without Object Lock refused before anything is sent), and a warning for
//! an unversioned bucket.

use std::time::{Duration, SystemTime};

use crate::common::proxy::Op;
use crate::common::run::{pseudo_random, Case};
use crate::common::s3::{garage, moto_s3, Dest, S3Server};

/// The storage class moto reports for each key in a listing ("STANDARD" when none was sent); a
/// snapshot's key as `.nightcopy/snapshots/ID.gz`.
fn classes(server: &S3Server, dest: &Dest) -> Vec<(String, String)> {
    let client = server.direct_client();
    let listed = server
        .block_on(client.list_objects_v2().bucket(&dest.bucket).send())
        .unwrap();
    let mut out: Vec<_> = listed
        .contents()
        .iter()
        .map(|o| {
            let key = o.key().unwrap();
            (
                match key.starts_with(nightcopy::snapshot::DIR) {
                    true => format!("{}ID.gz", nightcopy::snapshot::DIR),
                    false => key.to_owned(),
                },
                o.storage_class()
                    .map_or("STANDARD", |c| c.as_str())
                    .to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn small_files_go_to_standard_and_the_rest_to_the_configured_class() {
    let server = moto_s3();
    let mut c = Case::on(server, server.versioned_dest("classes"));
    c.write("tiny.txt", b"a few bytes");
    c.write("edge-below.bin", &pseudo_random(188 * 1024, 1));
    c.write("edge-at.bin", &pseudo_random(189 * 1024, 2));
    c.write("big.bin", &pseudo_random(7 * 1024 * 1024, 3)); // multipart
                                                            // DEEP_ARCHIVE's default rule: below 189 KiB, STANDARD is cheaper (docs/storage-classes.md).
    c.destination_extra = "  storage-class: DEEP_ARCHIVE\n".into();

    let dry = c.run(&["run", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stderr.contains(
            "by storage class: STANDARD 2 files (188.0 KiB), DEEP_ARCHIVE 2 files (7.2 MiB)"
        ),
        "{}",
        dry.stderr
    );

    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("by storage class: STANDARD 2 files (188.0 KiB), DEEP_ARCHIVE 2 files"),
        "{}",
        out.stderr
    );
    assert_eq!(
        classes(server, &c.dest),
        [
            (".nightcopy/manifest.gz".to_owned(), "STANDARD".to_owned()),
            (
                ".nightcopy/snapshots/ID.gz".to_owned(),
                "STANDARD".to_owned()
            ),
            ("big.bin".to_owned(), "DEEP_ARCHIVE".to_owned()),
            ("edge-at.bin".to_owned(), "DEEP_ARCHIVE".to_owned()),
            ("edge-below.bin".to_owned(), "STANDARD".to_owned()),
            ("tiny.txt".to_owned(), "STANDARD".to_owned()),
        ]
    );
    // Per request: the class header on the PUTs and the multipart start, STANDARD sent as such.
    for r in server.requests(&c.dest) {
        if matches!(r.op, Op::PutObject | Op::CreateMultipartUpload) {
            let want = if r.key == "big.bin" || r.key == "edge-at.bin" {
                "DEEP_ARCHIVE"
            } else {
                "STANDARD"
            };
            assert_eq!(r.header("x-amz-storage-class"), Some(want), "{}", r.key);
        }
    }

    // The rule can be set, or turned off.
    let mut off = Case::on(server, server.versioned_dest("classes-off"));
    off.write("tiny.txt", b"a few bytes");
    off.destination_extra = "  storage-class: STANDARD_IA\n  small-files:\n    below: 0\n".into();
    assert_eq!(off.run(&["run"]).code, 0);
    let tiny = classes(server, &off.dest)
        .into_iter()
        .find(|(k, _)| k == "tiny.txt");
    assert_eq!(tiny.unwrap().1, "STANDARD_IA");
}

#[test]
fn every_object_written_is_locked_until_its_retention_ends_and_a_delete_is_refused() {
    let server = moto_s3();
    let mut c = Case::on(server, server.locked_dest("locked"));
    c.write("doc.txt", b"keep me");
    c.write("big.bin", &pseudo_random(7 * 1024 * 1024, 4));
    c.destination_extra = "  object-lock:\n    mode: GOVERNANCE\n    retain: 30d\n".into();
    let before = SystemTime::now();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let client = server.direct_client();
    let month = Duration::from_secs(30 * 86_400);
    // Every upload asked for the retention: the PUTs and the start of the multipart upload.
    // (moto keeps a multipart upload's retention only on the request, not on the object its
    // completion makes; S3 keeps it on the object.)
    let starts: Vec<_> = server
        .requests_with_own(&c.dest)
        .into_iter()
        .filter(|r| matches!(r.op, Op::PutObject | Op::CreateMultipartUpload))
        .collect();
    // The two files, the manifest's copy and the night's snapshot.
    assert_eq!(starts.len(), 4, "{starts:?}");
    for r in &starts {
        assert_eq!(
            r.header("x-amz-object-lock-mode"),
            Some("GOVERNANCE"),
            "{}",
            r.key
        );
        assert!(
            r.header("x-amz-object-lock-retain-until-date").is_some(),
            "{}",
            r.key
        );
    }
    let snapshot = starts
        .iter()
        .find(|r| r.key.starts_with(nightcopy::snapshot::DIR))
        .expect("the night's snapshot was written");
    // What the objects hold, by HEAD (not GetObjectRetention: moto 5.2.5 answers that with the
    // object itself).
    for key in ["doc.txt", ".nightcopy/manifest.gz", snapshot.key.as_str()] {
        let head = server
            .block_on(client.head_object().bucket(&c.dest.bucket).key(key).send())
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!(
            head.object_lock_mode().map(|m| m.as_str()),
            Some("GOVERNANCE"),
            "{key}"
        );
        let until = head.object_lock_retain_until_date().expect("a date");
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(until.secs() as u64);
        let lo = before + month - Duration::from_secs(60);
        let hi = SystemTime::now() + month + Duration::from_secs(60);
        assert!(until > lo && until < hi, "{key}: {until:?}");
    }
    // Another client with the same rights cannot delete the locked version.
    let versions = server
        .block_on(
            client
                .list_object_versions()
                .bucket(&c.dest.bucket)
                .prefix("doc.txt")
                .send(),
        )
        .unwrap();
    let version = versions.versions()[0].version_id().unwrap().to_owned();
    let refused = server.block_on(
        client
            .delete_object()
            .bucket(&c.dest.bucket)
            .key("doc.txt")
            .version_id(&version)
            .send(),
    );
    let err = refused.expect_err("a locked version was deleted");
    use aws_sdk_s3::error::ProvideErrorMetadata;
    assert_eq!(err.code(), Some("AccessDenied"), "{err:?}");
    assert_eq!(server.get(&c.dest, "doc.txt").body, b"keep me");
    c.assert_no_delete();
}

#[test]
fn object_lock_on_a_bucket_without_it_is_fatal_before_anything_is_sent() {
    let server = moto_s3();
    let mut c = Case::on(server, server.versioned_dest("unlockable"));
    c.write("doc.txt", b"must not land unlocked");
    c.destination_extra = "  object-lock:\n    mode: COMPLIANCE\n    retain: 7d\n".into();
    let out = c.run(&["run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("does not have Object Lock enabled, so destination.object-lock cannot lock")
            && out.stderr.contains("remove destination.object-lock"),
        "{}",
        out.stderr
    );
    assert_eq!(c.count(Op::PutObject), 0, "{:?}", c.ops());
    assert!(server.list_keys(&c.dest).is_empty());
    // check-config --remote says the same, and exits 1.
    let check = c.run(&["check-config", "--remote"]);
    assert_eq!(check.code, 1, "{}", check.stderr);
    assert!(check.stderr.contains("does not have Object Lock enabled"));
}

#[test]
fn an_unversioned_bucket_is_named_as_a_risk_once_per_run_with_the_fix() {
    // Garage keeps no versions, and says so; moto cannot be used here: its GetBucketVersioning
    // reply has a root element the SDK refuses (then a run only says, at info, that it cannot
    // tell).
    let server = garage();
    let c = Case::on(server, server.dest("unversioned"));
    c.write("a.txt", b"a");
    let out = c.run(&["run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let warnings: Vec<_> = out
        .stderr
        .lines()
        .filter(|l| l.contains("is not versioned"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("put-bucket-versioning --bucket")
            && warnings[0].contains("Status=Enabled"),
        "{}",
        warnings[0]
    );
    let check = c.run(&["check-config", "--remote"]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(
        check.stderr.contains("is not versioned"),
        "{}",
        check.stderr
    );
    assert!(check
        .stderr
        .contains("can be listed with these credentials"));
}
