//! SQS for the distributed-run tests: moto's SQS (the same moto that serves CloudWatch), and per
//! test a work queue with its dead-letter queue (a batch received twice moves there) and a
//! results queue, under names no other test uses.

use std::time::Duration;

use aws_sdk_sqs as sqs;

use super::cloudwatch::{cloudwatch, sdk_config_for};
use super::wait::until;

/// How often a wait asks moto for a queue's figures.
const POLL: Duration = Duration::from_millis(200);

pub struct TestQueues {
    pub work: String,
    pub results: String,
    pub dlq: String,
    /// moto's endpoint, for `distribute.endpoint-url`.
    pub endpoint: String,
}

fn client() -> sqs::Client {
    sqs::Client::new(&sdk_config_for(&cloudwatch().moto_endpoint))
}

/// Creates the three queues of a distributed run for one test.
pub fn queues(test: &str) -> TestQueues {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = format!("{test}-{}-{n}", std::process::id());
    super::cloudwatch::block_on(async {
        let c = client();
        let create = |name: String, attrs: Vec<(sqs::types::QueueAttributeName, String)>| {
            let c = c.clone();
            async move {
                let mut req = c.create_queue().queue_name(name);
                for (k, v) in attrs {
                    req = req.attributes(k, v);
                }
                req.send()
                    .await
                    .expect("CreateQueue on moto")
                    .queue_url
                    .expect("a queue url")
            }
        };
        let dlq = create(format!("{base}-dlq"), vec![]).await;
        let dlq_arn = c
            .get_queue_attributes()
            .queue_url(&dlq)
            .attribute_names(sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("GetQueueAttributes")
            .attributes
            .and_then(|a| a.get(&sqs::types::QueueAttributeName::QueueArn).cloned())
            .expect("the DLQ's ARN");
        let redrive = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"2"}}"#);
        let work = create(
            format!("{base}-work"),
            vec![(sqs::types::QueueAttributeName::RedrivePolicy, redrive)],
        )
        .await;
        let results = create(format!("{base}-results"), vec![]).await;
        TestQueues {
            work,
            results,
            dlq,
            endpoint: cloudwatch().moto_endpoint.clone(),
        }
    })
}

impl TestQueues {
    /// The `distribute:` section for these queues.
    pub fn section(&self, batch_files: usize, deadline: &str, visibility: &str) -> String {
        format!(
            "distribute:\n  queue-url: {}\n  results-queue-url: {}\n  dead-letter-queue-url: {}\n  \
             batch-files: {batch_files}\n  deadline: {deadline}\n  visibility-timeout: {visibility}\n  \
             endpoint-url: {}\n",
            self.work, self.results, self.dlq, self.endpoint
        )
    }

    /// Messages in a queue, visible or in flight (SQS's approximate counts).
    pub fn depth(&self, queue: &str) -> u64 {
        super::cloudwatch::block_on(async {
            let out = client()
                .get_queue_attributes()
                .queue_url(queue)
                .attribute_names(sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(
                    sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                )
                .send()
                .await
                .expect("GetQueueAttributes");
            let attrs = out.attributes.unwrap_or_default();
            [
                sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
                sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            ]
            .iter()
            .filter_map(|k| attrs.get(k)?.parse::<u64>().ok())
            .sum()
        })
    }

    /// Messages a receive could take now (not in flight).
    pub fn visible(&self, queue: &str) -> u64 {
        super::cloudwatch::block_on(async {
            let name = sqs::types::QueueAttributeName::ApproximateNumberOfMessages;
            let out = client()
                .get_queue_attributes()
                .queue_url(queue)
                .attribute_names(name.clone())
                .send()
                .await
                .expect("GetQueueAttributes");
            out.attributes
                .unwrap_or_default()
                .get(&name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
    }

    /// Waits until `queue` holds `n` messages (bounded).
    pub fn wait_for_depth(&self, queue: &str, n: u64, limit: Duration) -> bool {
        until(limit, POLL, || self.depth(queue) == n)
    }

    /// Waits until `queue` has `n` messages visible (bounded).
    pub fn wait_for_visible(&self, queue: &str, n: u64, limit: Duration) -> bool {
        until(limit, POLL, || self.visible(queue) == n)
    }
}

impl TestQueues {
    /// Sends `body` to `queue` as anyone allowed to send there could.
    pub fn send(&self, queue: &str, body: &str) {
        super::cloudwatch::block_on(async {
            client()
                .send_message()
                .queue_url(queue)
                .message_body(body)
                .send()
                .await
                .expect("SendMessage");
        })
    }

    /// Takes (receives and deletes) up to `n` messages from `queue`, waiting at most `limit` for
    /// them all; returns their bodies.
    pub fn take(&self, queue: &str, n: usize, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut bodies = Vec::new();
        super::cloudwatch::block_on(async {
            let c = client();
            while bodies.len() < n && std::time::Instant::now() < deadline {
                let out = c
                    .receive_message()
                    .queue_url(queue)
                    .max_number_of_messages((n - bodies.len()).min(10) as i32)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .expect("ReceiveMessage");
                for m in out.messages.unwrap_or_default() {
                    c.delete_message()
                        .queue_url(queue)
                        .receipt_handle(m.receipt_handle.unwrap_or_default())
                        .send()
                        .await
                        .expect("DeleteMessage");
                    bodies.push(m.body.unwrap_or_default());
                }
            }
        });
        bodies
    }
}
