//! `nightcopy check-config`: the config was loaded and validated before this runs (an invalid one
//! exits 78 there); this prints the effective config, defaults filled in and secrets hidden, so
//! an operator or Ansible's `validate:` sees exactly what a run will use. Offline by default:
//! `validate:` runs where the bucket may not be reachable yet. `--remote` also checks the bucket
//! with the credentials a run would use.

use crate::config::Config;
use crate::exit;
use crate::store::s3::S3Store;
use crate::store::{bucket, sdk, ObjectStore};

pub fn run(config: &Config) -> u8 {
    print!("{config}");
    exit::SUCCESS
}

/// The effective config, then the bucket: credentials, a listing of the prefix, Object Lock when
/// asked for, versioning. Exit 0 when a run could start, 1 with the reason otherwise.
pub async fn remote(config: &Config) -> u8 {
    print!("{config}");
    let place = format!(
        "s3://{}/{}",
        config.destination.bucket.0,
        config.destination.prefix.as_str()
    );
    let sdk = match sdk::load_checked(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("check-config --remote FAILED: {e}");
            return exit::FATAL;
        }
    };
    let store = S3Store::for_config(&sdk, config);
    if let Err(e) = store
        .list_page(config.destination.prefix.as_str(), None, None)
        .await
    {
        tracing::error!("check-config --remote FAILED: {e}");
        return exit::FATAL;
    }
    if let Err(e) = bucket::check(&store, config).await {
        tracing::error!("check-config --remote FAILED: {e}");
        return exit::FATAL;
    }
    tracing::info!("{place} can be listed with these credentials; the config is ready to run");
    exit::SUCCESS
}
