//! The bucket as the config needs it, checked once before a run (or a worker) sends anything:
//! Object Lock enabled when `destination.object-lock` asks for it — fatal otherwise, since objects
//! must never be left unlocked silently — and versioning on, which is only a warning: without it
//! a changed file overwrites its only copy.

use super::{ErrorKind, ObjectStore, Versioning};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error(
        "bucket {0} does not have Object Lock enabled, so destination.object-lock cannot lock \
         what is written: create the bucket with Object Lock (packaging/aws/bucket.yaml; it needs \
         versioning), or enable it with aws s3api put-object-lock-configuration --bucket {0} \
         --object-lock-configuration ObjectLockEnabled=Enabled, or remove destination.object-lock"
    )]
    NoObjectLock(String),
    #[error(
        "cannot tell whether bucket {0} has Object Lock enabled ({1}); destination.object-lock \
         needs s3:GetBucketObjectLockConfiguration for the role (docs/object-lock.md)"
    )]
    ObjectLockUnknown(String, String),
}

/// The bucket as the config needs it: with Object Lock enabled when `destination.object-lock` is
/// set (fatal otherwise: objects must never be left unlocked silently), and versioned (a warning
/// otherwise, once). Two requests per run.
pub async fn check<S: ObjectStore>(store: &S, config: &Config) -> Result<(), BucketError> {
    let bucket = &config.destination.bucket.0;
    if config.destination.object_lock.is_some() {
        match store.object_lock_enabled().await {
            Ok(true) => {}
            Ok(false) => return Err(BucketError::NoObjectLock(bucket.clone())),
            Err(e) => {
                return Err(BucketError::ObjectLockUnknown(
                    bucket.clone(),
                    e.to_string(),
                ))
            }
        }
    }
    match store.versioning().await {
        Ok(Versioning::Enabled) => tracing::debug!("bucket {bucket} is versioned"),
        Ok(state) => tracing::warn!(
            "bucket {bucket} is {}: a changed file overwrites its only copy there, so a file \
             damaged or encrypted here replaces its good copy on the next run; turn versioning \
             on: aws s3api put-bucket-versioning --bucket {bucket} --versioning-configuration \
             Status=Enabled (docs/operations.md)",
            match state {
                Versioning::Suspended => "no longer versioned (versioning suspended)",
                _ => "not versioned",
            }
        ),
        Err(e) if e.kind == ErrorKind::AccessDenied => tracing::warn!(
            "cannot tell whether bucket {bucket} is versioned: the role lacks \
             s3:GetBucketVersioning (docs/operations.md)"
        ),
        Err(e) => tracing::info!("cannot tell whether bucket {bucket} is versioned: {e}"),
    }
    Ok(())
}
