//! Checking a webhook URL before the server promises to call it: its form (`http`/`https`, a host, no
//! credentials, at most [`MAX_URL_CHARS`]) and where its host leads (resolved with a short timeout; every
//! address must be public, see [`super::address`], unless private targets are allowed). Delivery repeats
//! the address check on every connection (`super::client`), since DNS may answer differently later.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::Url;

use super::address;

/// Longest webhook URL accepted, in characters.
pub const MAX_URL_CHARS: usize = 2048;

/// How long resolving a webhook's host at submission may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a URL cannot be a webhook target. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Longer than [`MAX_URL_CHARS`].
    #[error("the webhook URL is {0} characters long; at most 2048 are allowed")]
    TooLong(usize),
    /// Not a URL at all.
    #[error("the webhook URL is not a valid URL: {0}")]
    Malformed(String),
    /// Neither `http` nor `https`.
    #[error("the webhook URL must use http or https, not `{0}`")]
    Scheme(String),
    /// No host to send to.
    #[error("the webhook URL has no host")]
    NoHost,
    /// `user:password@` in the URL: credentials do not belong in a URL that job views show.
    #[error("the webhook URL must not carry credentials (`user:password@`); check the signature instead")]
    Credentials,
    /// The host does not resolve (in time).
    #[error("the webhook host `{host}` does not resolve: {why}")]
    Unresolvable {
        /// The host.
        host: String,
        /// What the resolver said.
        why: String,
    },
    /// The host is, or resolves to, an address that is not public.
    #[error(
        "the webhook host `{host}` leads to {address}, {why}; webhooks go only to public addresses \
         (an operator can allow private ones with `[webhooks] allow_private_targets = true`)"
    )]
    Refused {
        /// The host.
        host: String,
        /// The refused address.
        address: IpAddr,
        /// What kind of address it is.
        why: &'static str,
    },
}

/// Checks the form of `text` as a webhook URL, without any I/O.
pub fn parse(text: &str) -> Result<Url, TargetError> {
    let chars = text.chars().count();
    if chars > MAX_URL_CHARS {
        return Err(TargetError::TooLong(chars));
    }
    let url = Url::parse(text).map_err(|e| TargetError::Malformed(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme(url.scheme().to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(TargetError::NoHost);
    }
    Ok(url)
}

/// The address of `url`'s host when it is written as an IP address (`http://10.0.0.1/`,
/// `http://[::1]/`; WHATWG parsing also turns `http://2130706433/` into 127.0.0.1); `None` for names.
pub fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// The error for `address` if it may not be a target.
pub fn refuse(host: &str, address: IpAddr) -> Result<(), TargetError> {
    match address::refusal(address) {
        Some(why) => Err(TargetError::Refused { host: host.to_string(), address, why }),
        None => Ok(()),
    }
}

/// Checks `text` fully at submission: its form, then its host (resolved within [`RESOLVE_TIMEOUT`]), whose
/// every address must be public unless `allow_private` is set. Returns the parsed URL.
pub async fn check(text: &str, allow_private: bool) -> Result<Url, TargetError> {
    let url = parse(text)?;
    let host = url.host_str().unwrap_or_default().to_string();
    let addresses = match literal_ip(&url) {
        Some(ip) => vec![ip],
        None => resolve(&host, url.port_or_known_default().unwrap_or(80)).await?,
    };
    if !allow_private {
        for address in addresses {
            refuse(&host, address)?;
        }
    }
    Ok(url)
}

/// Every address `host` resolves to, within [`RESOLVE_TIMEOUT`].
async fn resolve(host: &str, port: u16) -> Result<Vec<IpAddr>, TargetError> {
    let unresolvable = |why: String| TargetError::Unresolvable { host: host.to_string(), why };
    // `lookup_host` wants a host it can pair with the port; brackets are already gone from `host_str` names.
    let lookup = tokio::net::lookup_host((host, port));
    let found = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Err(_) => return Err(unresolvable(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs()))),
        Ok(Err(e)) => return Err(unresolvable(e.to_string())),
        Ok(Ok(found)) => found.map(|a| a.ip()).collect::<Vec<_>>(),
    };
    if found.is_empty() {
        return Err(unresolvable("no addresses".into()));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_is_checked_before_anything_is_resolved() {
        assert!(parse("https://hooks.example.com/denoised?x=1").is_ok());
        assert!(parse("http://hooks.example.com:8080/").is_ok());
        assert!(matches!(parse("ftp://hooks.example.com/"), Err(TargetError::Scheme(s)) if s == "ftp"));
        assert!(matches!(parse("file:///etc/passwd"), Err(TargetError::Scheme(_))));
        assert_eq!(parse("https://user:pw@hooks.example.com/"), Err(TargetError::Credentials));
        assert_eq!(parse("https://user@hooks.example.com/"), Err(TargetError::Credentials));
        assert!(matches!(parse("not a url"), Err(TargetError::Malformed(_))));
        assert!(matches!(parse("https://"), Err(TargetError::Malformed(_)) | Err(TargetError::NoHost)));
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert!(matches!(parse(&long), Err(TargetError::TooLong(_))));
        let longest = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_CHARS - 26));
        assert_eq!(longest.len(), MAX_URL_CHARS);
        assert!(parse(&longest).is_ok());
    }

    #[test]
    fn ip_literals_in_any_spelling_are_seen() {
        let ip = |text: &str| literal_ip(&parse(text).unwrap());
        assert_eq!(ip("http://127.0.0.1:9/"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip("http://2130706433/"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip("http://0x7f.1/"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip("http://[::ffff:a9fe:a9fe]/"), Some("::ffff:169.254.169.254".parse().unwrap()));
        assert_eq!(ip("http://hooks.example.com/"), None);
    }

    #[tokio::test]
    async fn refused_addresses_and_unresolvable_hosts_fail_the_check() {
        assert!(matches!(check("http://127.0.0.1:9/hook", false).await, Err(TargetError::Refused { .. })));
        assert!(matches!(check("http://169.254.169.254/latest", false).await, Err(TargetError::Refused { .. })));
        assert!(matches!(check("http://[::1]/", false).await, Err(TargetError::Refused { .. })));
        assert!(matches!(check("http://localhost:9/", false).await, Err(TargetError::Refused { .. })));
        assert!(check("http://127.0.0.1:9/hook", true).await.is_ok());
        assert!(check("http://localhost:9/hook", true).await.is_ok());
        let missing = check("http://no-such-host.invalid/", true).await;
        assert!(matches!(missing, Err(TargetError::Unresolvable { .. })), "{missing:?}");
    }
}
