//! The AWS SDK's configuration, loaded once per command through the default chain (environment,
//! profile, or the EC2 instance role over IMDSv2), and the proof that credentials and a region can
//! be had before anything is read. Every command that talks to AWS starts here.

use aws_credential_types::provider::ProvideCredentials;

use crate::config::Config;
use crate::guard::{self, GuardError};

/// Why the SDK cannot be used. Each says what to do; none contains a credential.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    TrustStore(#[from] GuardError),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Region(String),
}

/// Loads the SDK configuration; the region from the config, else the environment or IMDS. Fails
/// first, with what to install, on a host without CA certificates (`guard::check_trust_store`):
/// the SDK cannot make any request there, and building its client is where it would panic.
pub async fn load(config: &Config) -> Result<aws_config::SdkConfig, SetupError> {
    guard::check_trust_store()?;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &config.destination.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    Ok(loader.load().await)
}

/// Proves credentials and a region can be had.
pub async fn check_credentials(sdk: &aws_config::SdkConfig) -> Result<(), SetupError> {
    if sdk.region().is_none() {
        return Err(SetupError::Region(
            "no AWS region: set destination.region in the config (or AWS_REGION)".into(),
        ));
    }
    let provider = sdk.credentials_provider().ok_or_else(|| {
        SetupError::Credentials("no AWS credentials provider is configured".into())
    })?;
    provider.provide_credentials().await.map_err(|e| {
        SetupError::Credentials(format!(
            "no AWS credentials: on EC2 attach an instance role to the instance (and allow IMDSv2 \
             from this host); elsewhere set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE ({})",
            explain(&e)
        ))
    })?;
    Ok(())
}

/// Both of the above: what verify, restore and the worker do before their first request.
pub async fn load_checked(config: &Config) -> Result<aws_config::SdkConfig, SetupError> {
    let sdk = load(config).await?;
    check_credentials(&sdk).await?;
    Ok(sdk)
}

/// Refuses, before it is signed, any request that would go over plain http to a host that is not
/// loopback (unless `destination.allow-insecure-endpoint`). The config and the environment are
/// checked when the config is loaded; this also covers what neither shows — an `endpoint_url` in
/// an AWS profile — at the one place every request passes. Added to every AWS client nightcopy
/// builds.
#[derive(Debug)]
pub struct TransportGuard {
    pub allow_insecure: bool,
}

/// The text the refusal carries, so that the store can recognise it in the SDK's error.
pub const INSECURE_REFUSAL: &str = "nightcopy refuses to send a signed request over plain http";

impl aws_sdk_s3::config::Intercept for TransportGuard {
    fn name(&self) -> &'static str {
        "TransportGuard"
    }

    fn read_before_signing(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.allow_insecure {
            return Ok(());
        }
        let uri = context.request().uri();
        let Ok(url) = url::Url::parse(uri) else {
            return Err(format!("{INSECURE_REFUSAL}: cannot read the request's address").into());
        };
        if url.scheme() == "https" || url.host().is_some_and(|h| crate::config::is_loopback(&h)) {
            return Ok(());
        }
        Err(format!(
            "{INSECURE_REFUSAL} to {} (an endpoint from the environment or an AWS profile): \
             use https://, or set destination.allow-insecure-endpoint: true if this network is \
             trusted",
            url.host_str().unwrap_or("an unknown host")
        )
        .into())
    }
}

/// An error of the SDK as a person reads it: the messages of its chain of causes, their
/// `Display` and never their `Debug` (which dumps whole responses), without repeats. The SDK's
/// full context goes to the log at trace level (`-vv`) for whoever needs the raw detail.
pub fn explain<E: std::error::Error + 'static>(e: &E) -> String {
    tracing::trace!(
        "error in full: {}",
        aws_sdk_s3::error::DisplayErrorContext(e)
    );
    let mut parts: Vec<String> = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        // One line: a message that lists things on lines of their own (the credential chain
        // does) has them separated by "; ".
        let text = c
            .to_string()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
            .replace(":; ", ": ");
        // Some messages repeat their cause's text, and some wrappers say only "service error".
        let said = parts.iter().any(|p| p.contains(text.as_str()));
        if !text.is_empty() && !said {
            parts.push(text);
        }
        cause = c.source();
    }
    parts.join(": ")
}
