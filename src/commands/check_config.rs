//! `nightcopy check-config`: the config was loaded and validated before this runs (an invalid one
//! exits 78 there); this prints the effective config, defaults filled in and secrets hidden, so
//! an operator or Ansible's `validate:` sees exactly what a run will use. Offline by default:
//! `validate:` runs where the bucket may not be reachable yet. `--remote` also checks the bucket
//! with the credentials a run would use.

use crate::config::Config;
use crate::error::{self, Fatal};
use crate::report::Ending;
use crate::store::s3::S3Store;
use crate::store::{bucket, sdk, ObjectStore};

pub fn run(config: &Config) -> Ending {
    print!("{config}");
    Ending::SUCCESS
}

/// The effective config, then the bucket: credentials, a listing of the prefix, Object Lock when
/// asked for, versioning. Exit 0 when a run could start, 1 with the reason otherwise.
pub async fn remote(config: &Config) -> Ending {
    print!("{config}");
    let checked = check_bucket(config).await;
    if checked.is_ok() {
        tracing::info!(
            "s3://{}/{} can be listed with these credentials; the config is ready to run",
            config.destination.bucket.0,
            config.destination.prefix.as_str()
        );
    }
    error::ending("check-config --remote", checked)
}

async fn check_bucket(config: &Config) -> Result<(), Fatal> {
    let sdk = sdk::load_checked(config).await?;
    let store = S3Store::for_config(&sdk, config);
    store
        .list_page(config.destination.prefix.as_str(), None, None)
        .await?;
    bucket::check(&store, config).await?;
    Ok(())
}
