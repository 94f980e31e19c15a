//! The work and results queues of a distributed run (Amazon SQS): what travels in them and the few
//! operations the coordinator, the workers and `nightcopy dlq` need.
//!
//! A work message is one *batch*: up to `distribute.batch-files` planned uploads, in key order,
//! numbered within the run. A results message is one worker's *report* on one batch: an outcome
//! per file, in the batch's order. Both carry the run's id, so that a batch or report of an earlier
//! run (left over by a coordinator that was stopped) is recognised and not counted. SQS delivers a
//! message at least once, so the coordinator takes the first report of a batch and drops the rest;
//! uploading the same file twice stores the same bytes twice, which is harmless.
//!
//! Deleting a message removes a message, never an object: the bucket stays additive-only.

use std::time::Duration;

use aws_sdk_sqs::types::{
    BatchResultErrorEntry, DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use serde::{Deserialize, Serialize};

use crate::auth::{self, AuthKey, Domain};
use crate::config::Distribute;
use crate::store::sdk::TransportGuard;

/// SQS's most per SendMessageBatch and per ReceiveMessage.
pub const MAX_PER_CALL: usize = 10;
/// The longest long poll SQS allows.
pub const LONG_POLL: Duration = Duration::from_secs(20);

/// One planned upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkFile {
    /// The key below the destination prefix.
    pub key: String,
    /// The path relative to `source.path`, percent-encoded (any bytes; `keys::encode_raw_path`).
    pub path: String,
    /// What the coordinator's walk saw.
    pub size: u64,
    pub mtime_ns: i64,
    /// Why it is uploaded (new, size-changed, …).
    pub reason: String,
    /// Set when the key had to be escaped: the object then carries the raw path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escaped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkBatch {
    pub run: String,
    pub batch: u64,
    /// The coordinator's destination (`Config::destination_id`): a worker configured for another
    /// bucket or prefix refuses the batch instead of writing it there.
    pub destination: String,
    pub files: Vec<WorkFile>,
}

/// What became of one file of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileOutcome {
    /// Stored; `size`, `mtime_ns` and `sha256` are of what the worker read.
    Uploaded,
    /// Gone from its name when the worker got to it.
    Vanished,
    /// Something else than a regular file at its name (a symlink, a FIFO).
    Replaced,
    /// Not backed up: `kind` and `detail` say why (it counts as a transfer error).
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    pub key: String,
    /// The work file's `path`, echoed, so the coordinator names the file as its walk saw it.
    pub path: String,
    pub outcome: FileOutcome,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mtime_ns: i64,
    /// Hex, for an uploaded file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Hex, for a file uploaded in parts: the composite checksum S3 keeps for the object (the
    /// SHA-256 of the parts' SHA-256s), which the coordinator holds the object to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composite: Option<String>,
    /// Why an error is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::report::FileErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub run: String,
    pub batch: u64,
    /// Which worker (its host name), for the journal.
    pub worker: String,
    pub files: Vec<FileReport>,
}

/// What a report must name exactly: a batch's files, as (key, path) pairs in the batch's order.
/// The coordinator keeps this digest per batch sent (32 bytes on disk) and takes a report only
/// when its files give the same one: a short, padded or reordered report is refused.
pub fn batch_digest<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (key, path) in files {
        // Lengths first: ("ab", "c") and ("a", "bc") are other batches.
        h.update((key.len() as u64).to_le_bytes());
        h.update(key);
        h.update((path.len() as u64).to_le_bytes());
        h.update(path);
    }
    h.finalize().into()
}

impl WorkBatch {
    pub fn digest(&self) -> [u8; 32] {
        batch_digest(self.files.iter().map(|f| (f.key.as_str(), f.path.as_str())))
    }
}

impl Report {
    pub fn digest(&self) -> [u8; 32] {
        batch_digest(self.files.iter().map(|f| (f.key.as_str(), f.path.as_str())))
    }
}

/// Why a received message is not acted on: it is counted and named, never trusted.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error(transparent)]
    Unsealed(#[from] auth::Unsealed),
    #[error("not a nightcopy {0}: {1}")]
    NotOurs(&'static str, String),
}

/// A message taken from a queue.
pub struct Received {
    pub body: String,
    pub receipt: String,
    /// How many times SQS has handed it out.
    pub receives: u32,
}

/// A queue operation that failed: the whole call, or some of the messages of a batch call. Either
/// ends the command that needed it (`error::Fatal::Queue`); a worker's batch then goes back to the
/// queue, or comes back after its visibility timeout.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// SQS (or the connection to it) refused the call. `why` is the service's words, escaped.
    #[error(
        "{what} {queue} failed: {why} (check distribute.* in the config, the queue's existence \
         and the instance role's sqs: permissions, docs/scale-out.md)"
    )]
    Call {
        what: &'static str,
        queue: String,
        why: String,
    },
    /// A batch call that SQS answered, refusing some of its entries.
    #[error("{what} {queue} failed for {failed} of the messages: {message} ({code})")]
    Entries {
        what: &'static str,
        queue: String,
        failed: usize,
        message: String,
        code: String,
    },
}

fn error(what: &'static str, queue: &str, e: impl std::error::Error) -> QueueError {
    // The service's code and message, not the SDK's debug dump; escaped, as they are the
    // server's words and a newline in them must not make a second journal line.
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    QueueError::Call {
        what,
        queue: queue.to_owned(),
        why: crate::keys::shown(&why).to_string(),
    }
}

/// The queues of `distribute:`, through one SQS client, and the key that seals what is sent and
/// is required of what is received (`auth-key-file`; none: messages travel as they are).
#[derive(Clone)]
pub struct Queues {
    client: Client,
    key: Option<AuthKey>,
    pub work: String,
    pub results: String,
    pub dead_letters: String,
}

impl Queues {
    pub fn new(
        sdk: &aws_config::SdkConfig,
        d: &Distribute,
        allow_insecure: bool,
        key: Option<AuthKey>,
    ) -> Queues {
        let mut b =
            aws_sdk_sqs::config::Builder::from(sdk).interceptor(TransportGuard { allow_insecure });
        if let Some(url) = &d.endpoint_url {
            b = b.endpoint_url(&url.0);
        }
        Queues {
            client: Client::from_conf(b.build()),
            key,
            work: d.queue_url.0.clone(),
            results: d.results_queue_url.0.clone(),
            dead_letters: d.dead_letter_queue_url.0.clone(),
        }
    }

    /// `value` as it is sent: JSON, sealed in `domain` when there is a key.
    fn encode(&self, domain: Domain, value: &impl Serialize) -> String {
        let body = serde_json::to_string(value).expect("a message serializes");
        auth::seal(self.key.as_ref(), domain, body)
    }

    /// A received message as a `what`, once its MAC holds (with a key).
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        domain: Domain,
        what: &'static str,
        message: &str,
    ) -> Result<T, MessageError> {
        let body = auth::unseal(self.key.as_ref(), domain, message)?;
        serde_json::from_str(body).map_err(|e| MessageError::NotOurs(what, e.to_string()))
    }

    /// A batch as it is sent to the work queue.
    pub fn encode_batch(&self, batch: &WorkBatch) -> String {
        self.encode(Domain::Work, batch)
    }

    pub fn decode_batch(&self, message: &str) -> Result<WorkBatch, MessageError> {
        self.decode(Domain::Work, "batch", message)
    }

    /// A report as it is sent to the results queue.
    pub fn encode_report(&self, report: &Report) -> String {
        self.encode(Domain::Report, report)
    }

    pub fn decode_report(&self, message: &str) -> Result<Report, MessageError> {
        self.decode(Domain::Report, "report", message)
    }

    /// Proves a queue exists and may be used (GetQueueAttributes), before any work is taken.
    pub async fn check(&self, queue: &str) -> Result<(), QueueError> {
        self.client
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| error("checking", queue, e))?;
        Ok(())
    }

    /// Sends up to ten bodies in one call; every one must be accepted.
    pub async fn send(&self, queue: &str, bodies: Vec<String>) -> Result<(), QueueError> {
        if bodies.is_empty() {
            return Ok(());
        }
        let entries: Vec<SendMessageBatchRequestEntry> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .build()
                    .expect("id and body are set")
            })
            .collect();
        let out = self
            .client
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| error("sending to", queue, e))?;
        all_done(&out.failed, "sending to", queue)
    }

    /// Waits up to `wait` for up to `max` messages; each is invisible to others for `visibility`.
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(max.clamp(1, MAX_PER_CALL) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .visibility_timeout(visibility.as_secs().min(12 * 3600) as i32)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await
            .map_err(|e| error("receiving from", queue, e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let receives = m
                    .attributes
                    .as_ref()
                    .and_then(|a| {
                        a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Some(Received {
                    body: m.body?,
                    receipt: m.receipt_handle?,
                    receives,
                })
            })
            .collect())
    }

    /// Removes a message whose work is done (a message, never an object).
    pub async fn delete(&self, queue: &str, receipt: &str) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(queue)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| error("deleting a message of", queue, e))?;
        Ok(())
    }

    /// Removes up to ten messages whose work is done in one request (DeleteMessageBatch), as
    /// the coordinator does with the reports of one receive: one request instead of one per
    /// report. A message that could not be deleted is an error, as with [`Queues::delete`].
    pub async fn delete_all(&self, queue: &str, receipts: Vec<String>) -> Result<(), QueueError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let entries: Vec<DeleteMessageBatchRequestEntry> = receipts
            .into_iter()
            .enumerate()
            .map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let out = self
            .client
            .delete_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| error("deleting messages of", queue, e))?;
        all_done(&out.failed, "deleting messages of", queue)
    }

    /// Keeps a message invisible for `visibility` from now (0: hand it out again at once).
    pub async fn extend(
        &self,
        queue: &str,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(queue)
            .receipt_handle(receipt)
            .visibility_timeout(visibility.as_secs().min(12 * 3600) as i32)
            .send()
            .await
            .map_err(|e| error("changing a message's visibility in", queue, e))?;
        Ok(())
    }
}

/// A batch request's verdict: an error naming how many of its entries failed, and why the first.
fn all_done(
    failed: &[BatchResultErrorEntry],
    what: &'static str,
    queue: &str,
) -> Result<(), QueueError> {
    match failed.first() {
        None => Ok(()),
        Some(f) => Err(QueueError::Entries {
            what,
            queue: queue.to_owned(),
            failed: failed.len(),
            message: f.message.as_deref().unwrap_or("no message").to_owned(),
            code: f.code.clone(),
        }),
    }
}

/// A fresh id for a run: its start time and process, enough to tell runs of one queue apart.
pub fn run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", now.as_millis(), std::process::id())
}

/// The name of this host, for reports.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_of_long_keys_fits_in_one_message() {
        let long = "k".repeat(1024);
        let batch = WorkBatch {
            run: run_id(),
            batch: u64::MAX,
            destination: "https://s3.example|bucket|prefix/".into(),
            files: (0..100)
                .map(|_| WorkFile {
                    key: long.clone(),
                    path: "%FF".repeat(341),
                    size: u64::MAX,
                    mtime_ns: i64::MIN,
                    reason: "missing-remotely".into(),
                    escaped: true,
                })
                .collect(),
        };
        let body = serde_json::to_string(&batch).unwrap();
        assert!(body.len() < 256 * 1024, "{} bytes", body.len());
        assert_eq!(serde_json::from_str::<WorkBatch>(&body).unwrap(), batch);
    }
}
