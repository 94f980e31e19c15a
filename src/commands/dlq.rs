//! `nightcopy dlq`: what is in the dead-letter queue of a distributed run — batches that failed on
//! workers twice — one line per file on stdout; with `--redrive`, each batch is sent back to the
//! work queue and removed from the dead-letter queue (a message, never an object), for workers to
//! try again. A redriven batch of a run whose coordinator has finished is uploaded, but counted by
//! no run: the next nightly run plans those files again if they still need it.
//!
//! A message is whatever anyone allowed to send to the queue sent: every field of it that is text
//! is printed escaped (`keys::shown`), so that none can make a second line or move the cursor.

use std::collections::HashSet;
use std::time::Duration;

use crate::config::Config;
use crate::error::{self, Fatal};
use crate::keys::shown;
use crate::queue::{QueueError, Queues, MAX_PER_CALL};
use crate::report::Ending;
use crate::store::sdk;

/// Long enough to list the whole queue before the first message shows again.
const VISIBILITY: Duration = Duration::from_secs(120);

pub async fn run(config: &Config, redrive: bool) -> Ending {
    let result = async {
        let d = config
            .distribute
            .as_ref()
            .ok_or(Fatal::NotDistributed("dlq"))?;
        let sdk = sdk::load_checked(config).await?;
        let key = config.auth_key()?;
        let queues = Queues::new(&sdk, d, config.destination.allow_insecure_endpoint, key);
        Ok(walk(&queues, redrive).await?)
    }
    .await;
    let listed = result.map(|(batches, files)| {
        let what = if redrive {
            "sent back to the work queue"
        } else {
            "in the dead-letter queue"
        };
        tracing::info!("{batches} batches ({files} files) {what}");
    });
    error::ending("dlq", listed)
}

async fn walk(queues: &Queues, redrive: bool) -> Result<(u64, u64), QueueError> {
    let (mut batches, mut files) = (0, 0);
    let mut seen = HashSet::new();
    loop {
        let received = queues
            .receive(
                &queues.dead_letters,
                MAX_PER_CALL,
                Duration::from_secs(1),
                VISIBILITY,
            )
            .await?;
        let mut fresh = false;
        for m in received {
            if !seen.insert(m.body.clone()) {
                // Seen already this time round: only looked at, so visible again at once.
                if !redrive {
                    queues
                        .extend(&queues.dead_letters, &m.receipt, Duration::ZERO)
                        .await?;
                }
                continue;
            }
            fresh = true;
            match queues.decode_batch(&m.body) {
                Ok(batch) => {
                    batches += 1;
                    for f in &batch.files {
                        files += 1;
                        println!(
                            "batch\t{}\t{}\t{}\t{}\t{}",
                            shown(&batch.run),
                            batch.batch,
                            m.receives,
                            shown(&f.key),
                            shown(&f.path)
                        );
                    }
                }
                Err(_) => println!(
                    "not-a-batch\t{}",
                    shown(&m.body.chars().take(80).collect::<String>())
                ),
            }
            if redrive {
                queues.send(&queues.work, vec![m.body.clone()]).await?;
                queues.delete(&queues.dead_letters, &m.receipt).await?;
            } else {
                // Only looked at: visible again at once.
                queues
                    .extend(&queues.dead_letters, &m.receipt, Duration::ZERO)
                    .await?;
            }
        }
        if !fresh {
            return Ok((batches, files));
        }
    }
}
