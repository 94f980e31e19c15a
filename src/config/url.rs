//! Endpoint URLs (S3-compatible servers, CloudWatch, the heartbeat), parsed by a real URL parser:
//! a string check that only looks at what follows `http://` is fooled by userinfo —
//! `http://127.0.0.1:80@other-host/` connects to other-host — so the host is what the URL
//! parser says it is, and userinfo is refused outright (credentials never go in a URL here).

use serde::{de, Deserialize, Deserializer, Serialize};
use url::{Host, Url};

/// An http(s) endpoint; omitted on AWS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EndpointUrl(pub String);

impl EndpointUrl {
    pub fn new(s: &str) -> Result<EndpointUrl, String> {
        let url = Url::parse(s).map_err(|e| format!("{:?} is not a URL: {e}", redact(s)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{:?} is not an http:// or https:// URL", redact(s)));
        }
        let authority = s.split_once("://").map_or("", |(_, rest)| {
            rest.split(['/', '?', '#']).next().unwrap_or("")
        });
        if !url.username().is_empty() || url.password().is_some() || authority.contains('@') {
            return Err(format!(
                "{:?} has a user name or password before its host ('…@'): not allowed — it hides \
                 which host is really meant, and credentials come from the AWS chain, never a URL",
                redact(s)
            ));
        }
        if url
            .host()
            .is_none_or(|h| matches!(h, Host::Domain(d) if d.is_empty()))
        {
            return Err(format!("{:?} has no host", redact(s)));
        }
        Ok(EndpointUrl(s.trim_end_matches('/').to_owned()))
    }

    /// https, or http to 127.0.0.0/8, ::1 or localhost.
    pub fn is_encrypted_or_loopback(&self) -> bool {
        match Url::parse(&self.0) {
            Ok(url) if url.scheme() == "https" => true,
            Ok(url) => url.host().is_some_and(|h| is_loopback(&h)),
            Err(_) => false,
        }
    }

    /// Scheme, host and port only: a heartbeat URL's path is its secret.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

/// Whether a URL host is a loopback address (or `localhost`, which resolves to one).
pub fn is_loopback<S: AsRef<str>>(host: &Host<S>) -> bool {
    match host {
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
        Host::Domain(d) => d.as_ref().eq_ignore_ascii_case("localhost"),
    }
}

fn redact(s: &str) -> String {
    match Url::parse(s) {
        Ok(url) => {
            let host = url.host_str().unwrap_or_default();
            match url.port() {
                Some(p) => format!("{}://{host}:{p}/…", url.scheme()),
                None => format!("{}://{host}/…", url.scheme()),
            }
        }
        Err(_) => "the URL".into(),
    }
}

impl<'de> Deserialize<'de> for EndpointUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        EndpointUrl::new(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_one_the_connection_goes_to() {
        for (url, accepted, encrypted_or_loopback) in [
            ("https://s3.example.com", true, true),
            ("http://127.0.0.1:9000", true, true),
            ("http://127.8.9.10", true, true),
            ("http://localhost:9000/", true, true),
            ("http://[::1]:9000", true, true),
            ("http://10.0.0.5:9000", true, false),
            ("http://s3.internal", true, false),
            ("http://127.0.0.1.evil.example", true, false),
            // userinfo: the host is what follows '@'
            ("http://[::1]@other-host.invalid:9000", false, false),
            ("http://127.0.0.1:80@other-host.invalid", false, false),
            ("https://user:secret@s3.example.com", false, false),
            ("http://@127.0.0.1", false, false),
            ("ftp://127.0.0.1", false, false),
            ("http://", false, false),
            ("127.0.0.1:9000", false, false),
        ] {
            match EndpointUrl::new(url) {
                Ok(u) => {
                    assert!(accepted, "{url} must be refused");
                    assert_eq!(u.is_encrypted_or_loopback(), encrypted_or_loopback, "{url}");
                }
                Err(e) => {
                    assert!(!accepted, "{url}: {e}");
                    assert!(!e.contains("secret"), "{e}");
                }
            }
        }
    }

    #[test]
    fn redaction_keeps_only_scheme_host_and_port() {
        let u = EndpointUrl::new("https://hc.example:8443/ping/5e3a-secret").unwrap();
        assert_eq!(u.redacted(), "https://hc.example:8443/…");
    }
}
