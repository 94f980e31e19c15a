//! The real object store: aws-sdk-s3 against AWS or an S3-compatible endpoint.
//!
//! Decisions recorded here:
//! - Every upload carries `x-amz-checksum-sha256` (per part for multipart) computed by us from the
//!   bytes we read; S3 rejects the request if what it received differs. Because that checksum
//!   already protects the body, payload signing is turned off: otherwise the SDK would hash every
//!   body a second time just to sign it.
//! - The SDK's own default checksums are limited to operations that require them, for the same
//!   reason (it would add a CRC32 pass over every body).
//! - Error codes that mean "nothing else can work either" (credentials, access, bucket, region,
//!   clock) are classed fatal, with a message that says what to do.
//! - Downloads ask for the stored checksum (checksum mode) and keep the SDK's response check: a
//!   full-object SHA-256 is then verified twice (by the SDK and by restore, which needs the hash
//!   for the manifest anyway) — the price of not depending on either alone. A composite `…-N`
//!   the SDK skips; restore recomputes it (`restore::check`).
//! - The SDK retries failed attempts itself and says nothing of it below its own debug level;
//!   `RetryLog` logs each failed attempt and each retry at debug (`-v`).
//! - An error's text from the server (its code and message) and a key are shown escaped
//!   (`keys::shown`): they are someone else's bytes, and a newline in them must not make a second
//!   journal line.
//! - A listing asks for its next page with the marker the server gave; a server that gives back
//!   the marker it was asked with (or, for parts, one that does not grow) would be asked for the
//!   same page forever, so that reply is an error instead (`advances`).

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_s3::config::{
    ConfigBag, Intercept, RequestChecksumCalculation, ResponseChecksumValidation, RuntimeComponents,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    ArchiveStatus, BucketVersioningStatus, ChecksumAlgorithm, ChecksumMode,
    CompletedMultipartUpload, GlacierJobParameters, ObjectLockEnabled, ObjectLockMode,
    RestoreRequest, ServerSideEncryption, StorageClass, Tier,
};
use aws_sdk_s3::Client;
use base64::Engine as _;
use bytes::Bytes;
use std::os::fd::AsRawFd;

use super::{
    Archive, ArchiveTier, BodyStream, CompletedPart, Download, ErrorKind, HeadInfo, ListPage,
    ListedPart, ObjectMeta, ObjectStore, ObjectVersion, PartLayout, PutRequest, RemoteObject,
    StoreError, ThawRequest, ThawTier, VersionMarker, VersionPage, Versioning,
};
use crate::config::Destination;
use crate::keys::shown;

/// Attempts per request (the first and five retries): with 5% of requests failing, the chance
/// that one request fails them all is 0.05^6 ≈ 1.6e-8.
pub const MAX_ATTEMPTS: u32 = 6;

/// Makes the SDK's retries visible at debug level (`-v`): each failed attempt with its reason (a
/// 503 SlowDown, a 500, a cut connection, an attempt that timed out), and each retry with its
/// request and attempt number, which the SDK puts in the `amz-sdk-request` header.
#[derive(Debug)]
struct RetryLog;

impl Intercept for RetryLog {
    fn name(&self) -> &'static str {
        "RetryLog"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let r = context.request();
        let attempt = r
            .headers()
            .get("amz-sdk-request")
            .and_then(|v| v.split(';').next()?.trim().strip_prefix("attempt="));
        if let Some(n) = attempt.filter(|n| *n != "1") {
            let path = r.uri().split('?').next().unwrap_or_default();
            tracing::debug!(
                "S3 retry: {} {path}, attempt {n} of {MAX_ATTEMPTS}",
                r.method()
            );
        }
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(Err(e)) = context.output_or_error() {
            let status = context
                .response()
                .map_or_else(String::new, |r| format!("HTTP {}: ", r.status().as_u16()));
            let mut why = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            tracing::debug!(
                "S3 attempt failed ({status}{}); retried while attempts remain",
                shown(&why)
            );
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// "s3://bucket at endpoint", for messages.
    place: String,
    sse: Option<ServerSideEncryption>,
    sse_kms_key_id: Option<String>,
    /// Object Lock mode and retention, for a retain-until date on every object written.
    lock: Option<(ObjectLockMode, std::time::Duration)>,
}

impl S3Store {
    /// The store for a whole config: destination plus the transfer section's timeouts.
    pub fn for_config(sdk: &aws_config::SdkConfig, config: &crate::config::Config) -> S3Store {
        Self::with_timeout(sdk, &config.destination, config.transfer.request_timeout.0)
    }

    /// Retries and timeouts are where a stalled or failing endpoint is absorbed: each attempt is
    /// bounded by `request_timeout` (a stalled request is abandoned and retried, the run never
    /// hangs on one), and up to `MAX_ATTEMPTS` attempts are made with exponential back-off and
    /// jitter — throttling answers (503 SlowDown) are backed off, not hammered.
    fn with_timeout(
        sdk: &aws_config::SdkConfig,
        dest: &Destination,
        request_timeout: std::time::Duration,
    ) -> S3Store {
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_max_backoff(std::time::Duration::from_secs(8));
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .operation_attempt_timeout(request_timeout)
            .build();
        let mut b = aws_sdk_s3::config::Builder::from(sdk)
            .interceptor(RetryLog)
            .interceptor(super::sdk::TransportGuard {
                allow_insecure: dest.allow_insecure_endpoint,
            })
            .retry_config(retry)
            .timeout_config(timeouts)
            .force_path_style(dest.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenSupported);
        if let Some(url) = &dest.endpoint_url {
            b = b.endpoint_url(&url.0);
        }
        let place = match &dest.endpoint_url {
            Some(u) => format!("s3://{} at {}", dest.bucket.0, u.0),
            None => format!(
                "s3://{} in {}",
                dest.bucket.0,
                sdk.region().map_or("the default region", |r| r.as_ref())
            ),
        };
        S3Store {
            client: Client::from_conf(b.build()),
            bucket: dest.bucket.0.clone(),
            place,
            lock: dest
                .object_lock
                .map(|l| (ObjectLockMode::from(l.mode.as_str()), l.retain.0)),
            sse: dest.sse.map(|s| ServerSideEncryption::from(s.as_str())),
            sse_kms_key_id: dest.sse_kms_key_id.clone(),
        }
    }

    /// Mode and retain-until date for an object written now.
    fn retention(&self) -> (Option<ObjectLockMode>, Option<DateTime>) {
        match &self.lock {
            Some((mode, retain)) => {
                let until = std::time::SystemTime::now() + *retain;
                (Some(mode.clone()), Some(DateTime::from(until)))
            }
            None => (None, None),
        }
    }

    /// An object's body as a stream of chunks, its errors per object, named.
    fn body_stream(&self, key: &str, body: ByteStream) -> BodyStream {
        let what = format!("{} in {}", shown(key), self.place);
        let body = futures::stream::unfold(Some(body), move |body| {
            let what = what.clone();
            async move {
                let mut body = body?;
                match body.next().await? {
                    Ok(chunk) => Some((Ok(chunk), Some(body))),
                    Err(e) => {
                        let detail = super::sdk::explain(&e);
                        // The SDK's response checksum check fails the body's last read. Matched on
                        // the text: the error type lives in a crate nightcopy does not depend on.
                        let kind = if detail.contains("checksum mismatch") {
                            ErrorKind::ChecksumMismatch
                        } else {
                            ErrorKind::Other
                        };
                        let err =
                            StoreError::new(kind, format!("downloading {what} failed: {detail}"));
                        Some((Err(err), None))
                    }
                }
            }
        });
        Box::pin(body)
    }

    fn error<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = err.code().map(str::to_owned);
        let what = if key.is_empty() {
            self.place.clone()
        } else {
            format!("{} in {}", shown(key), self.place)
        };
        let context = DisplayErrorContext(&err).to_string();
        let kind = match (&err, code.as_deref()) {
            _ if context.contains(super::sdk::INSECURE_REFUSAL) => ErrorKind::InsecureEndpoint,
            (SdkError::ConstructionFailure(_), _) => ErrorKind::NoCredentials,
            (SdkError::DispatchFailure(_), _) if is_tls(&context) => ErrorKind::Tls,
            (SdkError::DispatchFailure(_), _) => ErrorKind::Unreachable,
            (_, Some(c)) => ErrorKind::of_code(c),
            (_, None) => ErrorKind::Other,
        };
        let advice = kind.advice();
        // A service error is its code, message and status; the SDK's full context (with the raw
        // response) only helps for connection-level errors.
        let detail = match (&err, code.as_deref()) {
            (SdkError::ServiceError(se), Some(code)) => format!(
                "{}{}, HTTP {}",
                shown(code),
                err.message()
                    .map(|m| format!(": {}", shown(m)))
                    .unwrap_or_default(),
                se.raw().status().as_u16()
            ),
            _ => shown(&super::sdk::explain(&err)).to_string(),
        };
        let message = if advice.is_empty() {
            format!("{op} {what} failed: {detail}")
        } else {
            format!("{op} {what} failed: {advice} ({detail})")
        };
        StoreError::new(kind, message)
    }
}

impl S3Store {
    /// A listing whose server gave back the marker it was asked with, or one that does not
    /// advance: asked again, it would answer the same page forever.
    fn repeated(&self, op: &str, key: &str, marker: &str) -> StoreError {
        StoreError::per_object(format!(
            "{op} {} in {} failed: the server's next {marker} does not advance past the one it \
             was asked with, so the listing stopped there instead of asking for the same page \
             forever",
            shown(key),
            self.place
        ))
    }
}

/// Whether a listing's next marker moves on from the one the page was asked with (`None`: the
/// first page). Markers are opaque, so this is only "not the same"; a loop over several pages
/// the listing's own order catches (`list.rs`).
fn advances<T: PartialEq>(given: Option<&T>, next: &T) -> bool {
    given != Some(next)
}

/// [`advances`] for ListParts, whose marker is a part number: it has to grow. A marker that is
/// not a number (no S3 sends one) only has to change.
fn part_marker_advances(given: Option<&str>, next: &str) -> bool {
    match (given.map_or(Ok(0), str::parse::<u64>), next.parse::<u64>()) {
        (Ok(given), Ok(next)) => next > given,
        _ => given != Some(next),
    }
}

/// KMS and customer keys make the ETag something else than the MD5 of the bytes.
fn encrypted_with_a_key(sse: Option<&ServerSideEncryption>, customer_key: bool) -> bool {
    customer_key
        || matches!(
            sse,
            Some(ServerSideEncryption::AwsKms | ServerSideEncryption::AwsKmsDsse)
        )
}

/// Whether a connection failed on the peer's certificate (rustls's words).
fn is_tls(context: &str) -> bool {
    let c = context.to_ascii_lowercase();
    c.contains("certificate") || c.contains("invalidcertificate") || c.contains("tls handshake")
}

fn time_ns(t: Option<&aws_sdk_s3::primitives::DateTime>) -> i64 {
    t.map_or(0, |t| {
        t.as_nanos().clamp(i64::MIN as i128, i64::MAX as i128) as i64
    })
}

fn class(c: Option<crate::config::StorageClass>) -> Option<StorageClass> {
    c.map(|c| StorageClass::from(c.as_str()))
}

fn b64(sha: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha)
}

impl ObjectStore for S3Store {
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError> {
        let start_after = match (&continuation, start_after) {
            (None, Some(after)) => Some(format!("{prefix}{after}")),
            _ => None,
        };
        let continuation_given = continuation.clone();
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_start_after(start_after)
            .set_continuation_token(continuation)
            .send()
            .await
            .map_err(|e| self.error("listing", prefix, e))?;
        let objects = out
            .contents
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| {
                let key = o.key?.strip_prefix(prefix)?.to_owned();
                Some(RemoteObject {
                    key,
                    size: o.size.unwrap_or(0).max(0) as u64,
                    last_modified_ns: o.last_modified.map_or(0, |t| {
                        t.as_nanos().clamp(i64::MIN as i128, i64::MAX as i128) as i64
                    }),
                    storage_class: o
                        .storage_class
                        .and_then(|c| super::storage_class_named(c.as_str())),
                })
            })
            .collect();
        let next = out
            .next_continuation_token
            .filter(|_| out.is_truncated == Some(true));
        if let Some(token) = &next {
            if !advances(continuation_given.as_ref(), token) {
                return Err(self.repeated("listing", prefix, "continuation token"));
            }
        }
        Ok(ListPage { objects, next })
    }

    async fn put(&self, req: PutRequest) -> Result<Option<String>, StoreError> {
        let mut keep_open = None;
        let (body, len) = match req.body {
            super::Body::Bytes(b) => {
                let len = b.len() as u64;
                (ByteStream::from(b), len)
            }
            super::Body::File { file, len } => {
                // The SDK can only retry a body it can read again from the start, which it does
                // by opening a path; /proc/self/fd/N opens the very file nightcopy opened and
                // checked, whatever its name points to by now. `file` stays open meanwhile.
                let path = format!("/proc/self/fd/{}", file.as_raw_fd());
                keep_open = Some(file);
                let stream = ByteStream::read_from()
                    .path(&path)
                    .length(Length::Exact(len))
                    .build()
                    .await
                    .map_err(|e| {
                        StoreError::per_object(format!("cannot read the open file again: {e}"))
                    })?;
                (stream, len)
            }
        };
        let (lock_mode, retain_until) = self.retention();
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&req.key)
            .body(body)
            .content_length(len as i64)
            // The algorithm is named too (x-amz-sdk-checksum-algorithm): S3 requires it, or a
            // Content-MD5, for a PUT with Object Lock retention. The SDK sends the value given
            // and computes nothing itself.
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(b64(&req.sha256))
            .set_metadata(Some(req.meta.to_map()))
            .set_storage_class(class(req.storage_class))
            .set_object_lock_mode(lock_mode)
            .set_object_lock_retain_until_date(retain_until)
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.error("upload of", &req.key, e))?;
        drop(keep_open);
        Ok(super::version_id(out.version_id))
    }

    async fn create_multipart(
        &self,
        key: &str,
        meta: &ObjectMeta,
        storage_class: Option<crate::config::StorageClass>,
    ) -> Result<String, StoreError> {
        // The retain-until date counts from the start of the upload: a part upload that takes
        // hours only shortens the retention by that much, it never leaves the object unlocked.
        let (lock_mode, retain_until) = self.retention();
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .set_metadata(Some(meta.to_map()))
            .set_storage_class(class(storage_class))
            .set_object_lock_mode(lock_mode)
            .set_object_lock_retain_until_date(retain_until)
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .send()
            .await
            .map_err(|e| self.error("starting multipart upload of", key, e))?;
        out.upload_id.ok_or_else(|| {
            StoreError::per_object(format!(
                "starting multipart upload of {}: no upload id in the reply",
                shown(key)
            ))
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
        sha256: [u8; 32],
    ) -> Result<CompletedPart, StoreError> {
        let len = data.len() as i64;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(data))
            .content_length(len)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(b64(&sha256))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.error(&format!("upload of part {number} of"), key, e))?;
        Ok(CompletedPart {
            number,
            etag: out.e_tag.unwrap_or_default(),
            sha256,
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<Option<String>, StoreError> {
        let parts = parts
            .into_iter()
            .map(|p| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(p.etag)
                    .checksum_sha256(b64(&p.sha256))
                    .build()
            })
            .collect();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.error("completing multipart upload of", key, e))?;
        Ok(super::version_id(out.version_id))
    }

    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, StoreError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let asked = marker.take();
            let out = match self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(asked.clone())
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let e = self.error("listing the parts of the upload of", key, e);
                    return match e.kind {
                        ErrorKind::NoSuchUpload => Ok(None),
                        _ => Err(e),
                    };
                }
            };
            for p in out.parts.unwrap_or_default() {
                let sha256 = p
                    .checksum_sha256
                    .as_deref()
                    .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
                    .and_then(|d| <[u8; 32]>::try_from(d).ok());
                parts.push(ListedPart {
                    number: p.part_number.unwrap_or(0),
                    size: p.size.unwrap_or(0).max(0) as u64,
                    etag: p.e_tag.unwrap_or_default(),
                    sha256,
                });
            }
            // "Truncated" without a marker ends the listing; S3's 10,000 parts also bound it.
            let next = out.next_part_number_marker.filter(|m| !m.is_empty());
            match next {
                Some(m) if out.is_truncated == Some(true) && parts.len() <= 10_000 => {
                    if !part_marker_advances(asked.as_deref(), &m) {
                        return Err(self.repeated(
                            "listing the parts of the upload of",
                            key,
                            "part number marker",
                        ));
                    }
                    marker = Some(m)
                }
                _ => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        parts.dedup_by_key(|p| p.number);
        Ok(Some(parts))
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.error("aborting multipart upload of", key, e) {
                e if e.kind == ErrorKind::NoSuchUpload => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn versioning(&self) -> Result<Versioning, StoreError> {
        let out = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| self.error("reading the versioning of", "", e))?;
        Ok(match out.status {
            Some(BucketVersioningStatus::Enabled) => Versioning::Enabled,
            Some(BucketVersioningStatus::Suspended) => Versioning::Suspended,
            _ => Versioning::Off,
        })
    }

    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_configuration
                .and_then(|c| c.object_lock_enabled)
                == Some(ObjectLockEnabled::Enabled)),
            Err(e) if e.code() == Some("ObjectLockConfigurationNotFoundError") => Ok(false),
            Err(e) => Err(self.error("reading the Object Lock configuration of", "", e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<HeadInfo>, StoreError> {
        self.head_version(key, None).await
    }

    async fn head_version(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<HeadInfo>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_owned))
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(o) => Ok(Some(HeadInfo {
                size: o.content_length.unwrap_or(0).max(0) as u64,
                etag_md5: super::etag_md5(
                    o.e_tag.as_deref(),
                    encrypted_with_a_key(
                        o.server_side_encryption.as_ref(),
                        o.sse_customer_algorithm.is_some(),
                    ),
                ),
                meta: o.metadata.unwrap_or_default(),
                checksum_sha256: o.checksum_sha256,
                version_id: super::version_id(o.version_id),
                archive: Archive {
                    class: o
                        .storage_class
                        .and_then(|c| super::storage_class_named(c.as_str())),
                    tier: match o.archive_status {
                        Some(ArchiveStatus::ArchiveAccess) => Some(ArchiveTier::ArchiveAccess),
                        Some(ArchiveStatus::DeepArchiveAccess) => {
                            Some(ArchiveTier::DeepArchiveAccess)
                        }
                        _ => None,
                    },
                    thaw: o.restore.as_deref().map(super::parse_restore_header),
                },
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(self.error("reading metadata of", key, e)),
        }
    }

    async fn get(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<Download>, StoreError> {
        // Checksum mode makes S3 return the stored checksum; the SDK then also checks a
        // full-object one against the body as it streams (a composite `…-N` it cannot check).
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_owned))
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || e.code() == Some("NoSuchVersion") =>
            {
                return Ok(None)
            }
            Err(e) => return Err(self.error("downloading", key, e)),
        };
        let body = self.body_stream(key, out.body);
        Ok(Some(Download {
            size: out.content_length.unwrap_or(0).max(0) as u64,
            etag_md5: super::etag_md5(
                out.e_tag.as_deref(),
                encrypted_with_a_key(
                    out.server_side_encryption.as_ref(),
                    out.sse_customer_algorithm.is_some(),
                ),
            ),
            meta: out.metadata.unwrap_or_default(),
            checksum_sha256: out.checksum_sha256,
            etag: out.e_tag,
            body,
        }))
    }

    async fn get_range(
        &self,
        key: &str,
        version_id: Option<&str>,
        if_match: Option<&str>,
        range: std::ops::Range<u64>,
    ) -> Result<BodyStream, StoreError> {
        let (start, len) = (range.start, range.end.saturating_sub(range.start));
        if len == 0 {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let last = range.end - 1;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_owned))
            .set_if_match(if_match.map(str::to_owned))
            .range(format!("bytes={start}-{last}"))
            .send()
            .await
            .map_err(|e| self.error("downloading", key, e))?;
        // A server that ignores Range answers with the whole object: those are not the bytes
        // asked for, whatever they are.
        let expected = format!("bytes {start}-{last}/");
        let answered = out.content_range.as_deref().unwrap_or("");
        // And they are of the object asked for: a server that ignores If-Match (or a version)
        // says so in the ETag (or version) of what it sent.
        let other_object = if_match.is_some_and(|e| out.e_tag.as_deref() != Some(e))
            || version_id.is_some_and(|v| out.version_id.as_deref().is_some_and(|got| got != v));
        if other_object {
            return Err(StoreError::per_object(format!(
                "downloading bytes {start}-{last} of {} in {}: the object changed since its \
                 download began (ETag {})",
                shown(key),
                self.place,
                shown(out.e_tag.as_deref().unwrap_or("none"))
            )));
        }
        if !answered.starts_with(&expected) || out.content_length != Some(len as i64) {
            return Err(StoreError::per_object(format!(
                "downloading bytes {start}-{last} of {} in {}: the answer was not that range \
                 (Content-Range {}, {} bytes)",
                shown(key),
                self.place,
                shown(answered),
                out.content_length.unwrap_or(-1)
            )));
        }
        Ok(self.body_stream(key, out.body))
    }

    async fn list_versions_page(
        &self,
        prefix: &str,
        marker: Option<VersionMarker>,
    ) -> Result<VersionPage, StoreError> {
        let given = marker.clone();
        let (key_marker, version_marker) =
            marker.map_or((None, None), |m| (Some(m.key), Some(m.version_id)));
        let out = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_key_marker(key_marker)
            .set_version_id_marker(version_marker.filter(|v| !v.is_empty()))
            .send()
            .await
            .map_err(|e| self.error("listing versions of", prefix, e))?;
        let relative = |key: Option<String>| Some(key?.strip_prefix(prefix)?.to_owned());
        let mut versions: Vec<ObjectVersion> = Vec::new();
        for v in out.versions.unwrap_or_default() {
            let Some(key) = relative(v.key) else { continue };
            versions.push(ObjectVersion {
                key,
                version_id: v.version_id.unwrap_or_else(|| "null".to_owned()),
                size: v.size.unwrap_or(0).max(0) as u64,
                last_modified_ns: time_ns(v.last_modified.as_ref()),
                delete_marker: false,
            });
        }
        for d in out.delete_markers.unwrap_or_default() {
            let Some(key) = relative(d.key) else { continue };
            versions.push(ObjectVersion {
                key,
                version_id: d.version_id.unwrap_or_else(|| "null".to_owned()),
                size: 0,
                last_modified_ns: time_ns(d.last_modified.as_ref()),
                delete_marker: true,
            });
        }
        // S3 interleaves versions and delete markers in one order (key, then newest first); the
        // SDK hands them over as two lists, so the order is rebuilt here. The sort is stable:
        // entries with the same time keep S3's order within each list.
        versions.sort_by(|a, b| {
            a.key
                .cmp(&b.key)
                .then(b.last_modified_ns.cmp(&a.last_modified_ns))
        });
        let next = match (
            out.is_truncated,
            out.next_key_marker,
            out.next_version_id_marker,
        ) {
            (Some(true), Some(key), Some(version_id)) => Some(VersionMarker { key, version_id }),
            (Some(true), Some(key), None) => Some(VersionMarker {
                key,
                version_id: String::new(),
            }),
            _ => None,
        };
        if let Some(m) = &next {
            // Keys come in order: a key marker that goes back is no progress either.
            let back = given.as_ref().is_some_and(|g| m.key < g.key);
            if back || !advances(given.as_ref(), m) {
                return Err(self.repeated("listing versions of", prefix, "key and version marker"));
            }
        }
        Ok(VersionPage { versions, next })
    }

    async fn part_layout(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<PartLayout>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_owned))
            .part_number(1)
            .send()
            .await
        {
            Ok(o) => Ok(match (o.parts_count, o.content_length) {
                (Some(parts), Some(size)) if parts > 0 && size > 0 => Some(PartLayout {
                    parts: parts as u32,
                    first_part_size: size as u64,
                }),
                _ => None,
            }),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(self.error("reading the part layout of", key, e)),
        }
    }

    async fn restore_object(
        &self,
        key: &str,
        version_id: Option<&str>,
        days: Option<u32>,
        tier: ThawTier,
    ) -> Result<ThawRequest, StoreError> {
        let tier = match tier {
            ThawTier::Bulk => Tier::Bulk,
            ThawTier::Standard => Tier::Standard,
            ThawTier::Expedited => Tier::Expedited,
        };
        let job = GlacierJobParameters::builder()
            .tier(tier)
            .build()
            .map_err(|e| StoreError::per_object(format!("thaw request for {}: {e}", shown(key))))?;
        let request = RestoreRequest::builder()
            .set_days(days.map(|d| d.min(i32::MAX as u32) as i32))
            .glacier_job_parameters(job)
            .build();
        match self
            .client
            .restore_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_owned))
            .restore_request(request)
            .send()
            .await
        {
            Ok(_) => Ok(ThawRequest::Sent),
            // Another process asked first: the thaw it started is the one to wait for.
            Err(e) if e.code() == Some("RestoreAlreadyInProgress") => {
                Ok(ThawRequest::AlreadyRunning)
            }
            Err(e) => Err(self.error("requesting the thaw of", key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::ErrorMetadata;
    use aws_sdk_s3::operation::list_parts::ListPartsError;
    use aws_sdk_s3::primitives::SdkBody;

    fn store() -> S3Store {
        let config = crate::config::Config::parse(
            "source:\n  path: /src\ndestination:\n  bucket: b-1\n  region: us-east-1\n",
            std::path::Path::new("/etc/nightcopy/config.yaml"),
        )
        .unwrap();
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        S3Store::for_config(&sdk, &config)
    }

    /// A server's error text is someone else's: with a newline in it, the error is still one
    /// line, every control character escaped, and so is the key.
    #[test]
    fn a_server_s_error_text_makes_one_escaped_line() {
        let s = store();
        let meta = ErrorMetadata::builder()
            .code("Odd\nCode")
            .message("no\nINFO backup succeeded\r\x1b[2J")
            .build();
        let raw = HttpResponse::new(500u16.try_into().unwrap(), SdkBody::empty());
        let err = SdkError::service_error(ListPartsError::generic(meta), raw);
        let e = s.error("listing the parts of the upload of", "d/a\nb", err);
        assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
        assert_eq!(
            e.message,
            format!(
                "listing the parts of the upload of d/a\\nb in {} failed: \
                 Odd\\nCode: no\\nINFO backup succeeded\\r\\x1b[2J, HTTP 500",
                s.place
            )
        );
        // Not a service error: the SDK's text, which may quote the server, is escaped too.
        let err: SdkError<ListPartsError, HttpResponse> =
            SdkError::construction_failure("bad\x1b]0;title\x07 request");
        let e = s.error("listing", "", err);
        assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
        assert!(
            e.message.contains("bad\\x1b]0;title\\x07 request"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_listing_marker_has_to_move_on() {
        // (marker asked with, next marker, advances)
        let cases = [
            (None, "a", true),
            (Some("a"), "b", true),
            (Some("a"), "a", false),
        ];
        for (given, next, want) in cases {
            let given = given.map(str::to_owned);
            assert_eq!(
                advances(given.as_ref(), &next.to_owned()),
                want,
                "{given:?} {next}"
            );
        }
        let cases = [
            (None, "2", true),
            (None, "0", false),
            (Some("2"), "4", true),
            (Some("4"), "4", false),
            (Some("10"), "9", false),
            (Some("x"), "y", true),
            (Some("x"), "x", false),
        ];
        for (given, next, want) in cases {
            assert_eq!(part_marker_advances(given, next), want, "{given:?} {next}");
        }
    }
}
