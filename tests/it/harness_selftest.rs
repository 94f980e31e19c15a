//! Checks the test harness itself, so that a failing nightcopy test points at nightcopy: the S3
//! server starts, rejects a wrong SHA-256, takes a multipart upload with per-part checksums, and
//! the proxy passes everything through while recording exactly the requests that were made.

use std::collections::BTreeMap;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::common::proxy::{Op, Request};
use crate::common::run::pseudo_random;
use crate::common::s3::s3;

const MIB: usize = 1024 * 1024;

fn sha256_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

#[test]
fn dest_gives_each_call_its_own_empty_bucket() {
    let a = s3().dest("selftest distinct");
    let b = s3().dest("selftest distinct");
    if a.prefix.is_empty() {
        assert_ne!(a.bucket, b.bucket);
        for name in [&a.bucket, &b.bucket] {
            assert!((3..=63).contains(&name.len()), "{name}");
            let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
            assert!(name.chars().all(valid), "{name}");
        }
    } else {
        // External endpoint: one shared bucket, a prefix per test.
        assert_ne!(a.prefix, b.prefix);
        assert!(a.prefix.ends_with('/') && b.prefix.ends_with('/'));
    }
    assert!(s3().list_keys(&a).is_empty());
    assert!(s3().list_keys(&b).is_empty());
}

#[test]
fn put_multipart_list_get_pass_through_the_proxy_and_are_recorded() {
    let s3 = s3();
    let dest = s3.dest("selftest roundtrip");
    let client = s3.client();

    let small = b"hello, nightcopy\n".to_vec();
    let parts = [
        pseudo_random(5 * MIB, 1),
        pseudo_random(5 * MIB, 2),
        pseudo_random(MIB + 17, 3),
    ];
    let whole: Vec<u8> = parts.concat();
    let dir = tempfile::tempdir().expect("temp dir");
    let streamed_path = dir.path().join("streamed.bin");
    let streamed = pseudo_random(3 * MIB, 4);
    std::fs::write(&streamed_path, &streamed).expect("write the temp file");

    s3.block_on(async {
        // Precomputed SHA-256: accepted, and the server reports the same value back.
        let put = client
            .put_object()
            .bucket(&dest.bucket)
            .key(dest.key("small.txt"))
            .metadata("mtime", "1700000000")
            .checksum_sha256(sha256_base64(&small))
            .body(ByteStream::from(small.clone()))
            .send()
            .await
            .expect("put with the right SHA-256");
        assert_eq!(put.checksum_sha256(), Some(sha256_base64(&small).as_str()));

        // A wrong SHA-256 must be refused: this is what makes the server worth testing against.
        let wrong = client
            .put_object()
            .bucket(&dest.bucket)
            .key(dest.key("wrong.txt"))
            .checksum_sha256(sha256_base64(b"something else"))
            .body(ByteStream::from(small.clone()))
            .send()
            .await
            .expect_err("a put with a wrong SHA-256 must be rejected");
        let status = wrong.raw_response().map(|r| r.status().as_u16());
        assert_eq!(status, Some(400), "{wrong:?}");
        // Trap: s3s-fs 0.14.1 writes the object before it compares the digest, so the refused
        // object exists there anyway (real S3 and Garage store nothing). Listings below leave it
        // out rather than depend on either behaviour.

        // A file body without a precomputed checksum: the SDK sends it aws-chunked, with
        // signed chunks and a CRC32 trailer. With `Expect: 100-continue` added, this covers the
        // framings the proxy must pass through untouched.
        let streamed_body = ByteStream::from_path(&streamed_path)
            .await
            .expect("read the temp file");
        client
            .put_object()
            .bucket(&dest.bucket)
            .key(dest.key("streamed.bin"))
            .body(streamed_body)
            .customize()
            .mutate_request(|req| {
                req.headers_mut().insert("expect", "100-continue");
            })
            .send()
            .await
            .expect("aws-chunked put with Expect: 100-continue");

        let upload = client
            .create_multipart_upload()
            .bucket(&dest.bucket)
            .key(dest.key("big.bin"))
            .metadata("mtime", "1700000001")
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .expect("create multipart upload");
        let upload_id = upload.upload_id().expect("upload id");
        let mut completed = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let number = i32::try_from(i + 1).unwrap();
            let checksum = sha256_base64(part);
            let uploaded = client
                .upload_part()
                .bucket(&dest.bucket)
                .key(dest.key("big.bin"))
                .upload_id(upload_id)
                .part_number(number)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(Bytes::from(part.clone())))
                .send()
                .await
                .unwrap_or_else(|e| panic!("upload part {number}: {e:?}"));
            completed.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(uploaded.e_tag().map(str::to_owned))
                    .checksum_sha256(checksum)
                    .build(),
            );
        }
        client
            .complete_multipart_upload()
            .bucket(&dest.bucket)
            .key(dest.key("big.bin"))
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .expect("complete multipart upload");

        let listed = client
            .list_objects_v2()
            .bucket(&dest.bucket)
            .prefix(&dest.prefix)
            .send()
            .await
            .expect("list");
        let keys: Vec<&str> = listed
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .filter(|k| *k != dest.key("wrong.txt"))
            .collect();
        assert_eq!(
            keys,
            [
                dest.key("big.bin"),
                dest.key("small.txt"),
                dest.key("streamed.bin")
            ]
        );

        let head = client
            .head_object()
            .bucket(&dest.bucket)
            .key(dest.key("big.bin"))
            .send()
            .await
            .expect("head");
        assert_eq!(head.content_length(), Some(whole.len() as i64));
    });

    // The harness's own readers bypass the proxy, so they must not change the counts below.
    let mut keys = s3.list_keys(&dest);
    keys.retain(|k| *k != dest.key("wrong.txt"));
    assert_eq!(
        keys,
        [
            dest.key("big.bin"),
            dest.key("small.txt"),
            dest.key("streamed.bin")
        ]
    );
    let got = s3.get(&dest, &dest.key("small.txt"));
    assert_eq!(got.body, small);
    assert_eq!(got.content_length, small.len() as u64);
    assert_eq!(
        got.metadata.get("mtime").map(String::as_str),
        Some("1700000000")
    );
    assert_eq!(got.checksum_sha256, Some(sha256_base64(&small)));

    assert!(
        s3.get(&dest, &dest.key("streamed.bin")).body == streamed,
        "streamed body differs"
    );
    let big = s3.get(&dest, &dest.key("big.bin"));
    assert!(big.body == whole, "multipart body differs");
    assert_eq!(
        big.metadata.get("mtime").map(String::as_str),
        Some("1700000001")
    );
    // A multipart object's SHA-256 is the composite one (over the parts' digests, "-3" suffix).
    // Trap: s3s-fs 0.14.1 neither checks part checksums nor keeps one for the object, so there
    // it is absent; real S3 and Garage report it.
    if let Some(checksum) = &big.checksum_sha256 {
        assert!(checksum.ends_with("-3"), "{checksum}");
    }

    let requests = s3.requests(&dest);
    let expected = BTreeMap::from([
        (Op::PutObject, 3),
        (Op::CreateMultipartUpload, 1),
        (Op::UploadPart, 3),
        (Op::CompleteMultipartUpload, 1),
        (Op::ListObjectsV2, 1),
        (Op::HeadObject, 1),
    ]);
    assert_eq!(s3.counts(&dest), expected, "{requests:#?}");
    assert!(!requests
        .iter()
        .any(|r| matches!(r.op, Op::DeleteObject | Op::DeleteObjects)));
    let refused: Vec<_> = requests.iter().filter(|r| r.status != Some(200)).collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0].key, dest.key("wrong.txt"));
    assert_eq!(refused[0].status, Some(400));
    // If the SDK stops using these framings, the passthrough check above proves less: say so.
    let streamed_put = requests
        .iter()
        .find(|r| r.key == dest.key("streamed.bin"))
        .expect("the streamed put was recorded");
    assert_eq!(
        streamed_put.header("content-encoding"),
        Some("aws-chunked"),
        "the SDK no longer sends a file body aws-chunked: exercise that framing another way"
    );
    assert_eq!(streamed_put.header("expect"), Some("100-continue"));
    let part_numbers: Vec<_> = requests
        .iter()
        .filter(|r| r.op == Op::UploadPart)
        .filter_map(|r| r.query_param("partNumber"))
        .collect();
    assert_eq!(part_numbers, ["1", "2", "3"]);
}

/// The helpers are sync, but nightcopy's own tests may be async: `dest`, `list_keys` and a
/// client made here must work from inside another runtime too.
#[tokio::test]
async fn helpers_work_inside_an_async_test() {
    let dest = s3().dest("selftest async");
    s3().client()
        .put_object()
        .bucket(&dest.bucket)
        .key(dest.key("a"))
        .body(ByteStream::from_static(b"a"))
        .send()
        .await
        .expect("put from a test's own runtime");
    assert_eq!(s3().list_keys(&dest), [dest.key("a")]);
    assert_eq!(s3().counts(&dest), BTreeMap::from([(Op::PutObject, 1)]));
}

#[test]
fn proxy_classifies_requests_by_method_and_query() {
    // (method, target, has x-amz-copy-source, expected)
    #[rustfmt::skip]
    let cases: &[(&str, &str, bool, Op)] = &[
        ("GET",    "/b?list-type=2&prefix=p%2F",                false, Op::ListObjectsV2),
        ("GET",    "/b",                                        false, Op::Other), // ListObjects v1
        ("GET",    "/b?location",                               false, Op::Other),
        ("PUT",    "/b",                                        false, Op::CreateBucket),
        ("HEAD",   "/b",                                        false, Op::HeadBucket),
        ("POST",   "/b?delete",                                 false, Op::DeleteObjects),
        ("POST",   "/b?delete&x-id=DeleteObjects",              false, Op::DeleteObjects),
        ("DELETE", "/b",                                        false, Op::Other), // DeleteBucket
        ("GET",    "/",                                         false, Op::Other), // ListBuckets
        ("PUT",    "/b/k?x-id=PutObject",                       false, Op::PutObject),
        ("PUT",    "/b/k",                                      true,  Op::Other), // CopyObject
        ("PUT",    "/b/k?tagging",                              false, Op::Other),
        ("POST",   "/b/k?uploads&x-id=CreateMultipartUpload",   false, Op::CreateMultipartUpload),
        ("PUT",    "/b/k?partNumber=2&uploadId=u&x-id=UploadPart",false, Op::UploadPart),
        ("PUT",    "/b/k?partNumber=2&uploadId=u",              true,  Op::Other), // UploadPartCopy
        ("POST",   "/b/k?uploadId=u",                           false, Op::CompleteMultipartUpload),
        ("POST",   "/b/k?restore&x-id=RestoreObject",           false, Op::RestoreObject),
        ("POST",   "/b/k?restore&versionId=v",                  false, Op::RestoreObject),
        ("DELETE", "/b/k?uploadId=u",                           false, Op::AbortMultipartUpload),
        ("GET",    "/b/k?uploadId=u",                           false, Op::ListParts),
        ("HEAD",   "/b/k",                                      false, Op::HeadObject),
        ("GET",    "/b/k?x-id=GetObject&partNumber=1",          false, Op::GetObject),
        ("GET",    "/b/k?response-content-type=text%2Fplain",   false, Op::GetObject),
        ("GET",    "/b/k?tagging",                              false, Op::Other),
        ("DELETE", "/b/k?x-id=DeleteObject",                    false, Op::DeleteObject),
        ("DELETE", "/b/k?versionId=v",                          false, Op::DeleteObject),
        // Generous on purpose: an unknown parameter does not hide a delete.
        ("DELETE", "/b/k?unheard-of",                           false, Op::DeleteObject),
        ("DELETE", "/b/k?tagging",                              false, Op::Other),
    ];
    for &(method, target, copy, op) in cases {
        let headers = copy.then_some(("X-Amz-Copy-Source", "/b/other"));
        let request = Request::from_parts(method, target, headers);
        assert_eq!(request.op, op, "{method} {target} copy={copy}");
        assert_eq!(request.bucket, if target == "/" { "" } else { "b" });
    }

    let request = Request::from_parts(
        "PUT",
        "/my-bucket/dir/a%20b%2Bc%01?x-id=PutObject",
        [
            ("Authorization", "AWS4-HMAC-SHA256 Credential=…"),
            ("Host", "h"),
        ],
    );
    assert_eq!(request.bucket, "my-bucket");
    assert_eq!(request.key, "dir/a b+c\u{1}");
    assert_eq!(request.query_param("x-id").as_deref(), Some("PutObject"));
    // Never keep what could reveal credentials.
    assert_eq!(request.headers, [("host".to_owned(), "h".to_owned())]);
}
