//! The HTTP client that sends deliveries, and one attempt with it. It never follows a redirect (a `3xx` is a
//! failed attempt: a redirect could lead anywhere), never goes through a proxy (a proxy would resolve the
//! host where the address check cannot see it), and — unless private targets are allowed — resolves hosts
//! with [`GuardedResolver`], which refuses a host if any of its addresses is not public, so a name that
//! resolved to a public address at submission cannot be pointed at an internal one later. Hosts written as
//! IP addresses never reach a resolver; [`Deliverer::attempt`] checks those itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, USER_AGENT};
use reqwest::redirect::Policy;
use reqwest::{Client, Url};

use super::target;

/// Longest `last_error` kept, in characters.
const MAX_ERROR_CHARS: usize = 500;

/// A resolver that fails for hosts with any non-public address.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for address in &found {
                target::refuse(&host, address.ip())?;
            }
            Ok(Box::new(found.into_iter()) as Addrs)
        })
    }
}

/// Sends deliveries: a client built once per process (it keeps connections to receivers alive).
#[derive(Debug, Clone)]
pub struct Deliverer {
    client: Client,
    timeout: Duration,
    allow_private: bool,
}

/// Why an attempt failed, in words for the job view's `last_error` and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError(pub String);

impl Deliverer {
    /// A client whose attempts time out after `timeout`, checking addresses unless `allow_private`.
    pub fn new(timeout: Duration, allow_private: bool) -> Result<Self, reqwest::Error> {
        let mut builder = Client::builder()
            .redirect(Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .default_headers(HeaderMap::from_iter([(
                USER_AGENT,
                HeaderValue::from_static(concat!("denoised/", env!("CARGO_PKG_VERSION"), " (webhooks)")),
            )]));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        Ok(Self { client: builder.build()?, timeout, allow_private })
    }

    /// One attempt: `POST body` to `url` with the Standard Webhooks headers. `Ok` on a 2xx answer.
    pub async fn attempt(
        &self,
        url: &str,
        id: &str,
        timestamp: i64,
        signature: &str,
        body: Vec<u8>,
    ) -> Result<(), AttemptError> {
        let url = Url::parse(url).map_err(|e| AttemptError(format!("bad URL: {e}")))?;
        if !self.allow_private {
            if let Some(ip) = target::literal_ip(&url) {
                target::refuse(url.host_str().unwrap_or_default(), ip).map_err(|e| AttemptError(e.to_string()))?;
            }
        }
        let response = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| AttemptError(self.describe(&e)))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err(AttemptError(format!("the receiver answered {status}; redirects are not followed")))
        } else {
            Err(AttemptError(format!("the receiver answered {status}")))
        }
    }

    /// A transport error in words: what reqwest says and every cause under it (the resolver's refusal, the
    /// connection's error), cut to [`MAX_ERROR_CHARS`].
    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!("no answer within {} s", self.timeout.as_secs_f64());
        }
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        truncate(text)
    }
}

/// `text` cut to [`MAX_ERROR_CHARS`] characters.
pub fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_guarded_resolver_refuses_private_answers() {
        let refused = GuardedResolver.resolve("localhost".parse().unwrap()).await;
        let error = refused.err().expect("localhost resolves to loopback");
        assert!(error.to_string().contains("loopback"), "{error}");
    }

    #[tokio::test]
    async fn literal_private_targets_are_refused_before_connecting() {
        let deliverer = Deliverer::new(Duration::from_secs(1), false).unwrap();
        let error = deliverer.attempt("http://127.0.0.1:9/", "msg_1", 1, "v1,x", Vec::new()).await.unwrap_err();
        assert!(error.0.contains("loopback"), "{error:?}");
        let error = deliverer.attempt("http://localhost:9/", "msg_1", 1, "v1,x", Vec::new()).await.unwrap_err();
        assert!(error.0.contains("loopback"), "{error:?}");
    }

    /// A receiver on loopback answering `status` (with a `Location` for redirects) to every request.
    async fn answering(status: u16) -> String {
        let app = axum::Router::new().fallback(move || async move {
            let status = axum::http::StatusCode::from_u16(status).unwrap();
            (status, [(axum::http::header::LOCATION, "http://127.0.0.1:9/elsewhere")])
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn only_a_2xx_delivers_and_redirects_are_not_followed() {
        let deliverer = Deliverer::new(Duration::from_secs(2), true).unwrap();
        let send = |url: String| {
            let deliverer = deliverer.clone();
            async move { deliverer.attempt(&url, "msg_1", 1, "v1,x", b"{}".to_vec()).await }
        };
        assert_eq!(send(answering(204).await).await, Ok(()));
        for redirect in [301, 302, 307, 308] {
            let error = send(answering(redirect).await).await.unwrap_err();
            assert!(error.0.contains(&redirect.to_string()) && error.0.contains("not followed"), "{error:?}");
        }
        let error = send(answering(500).await).await.unwrap_err();
        assert!(error.0.contains("500"), "{error:?}");
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/hook", listener.local_addr().unwrap())
        };
        assert!(send(closed).await.is_err(), "a refused connection is a failed attempt");
    }

    #[test]
    fn long_errors_are_cut() {
        assert_eq!(truncate("short".into()), "short");
        let cut = truncate("é".repeat(600));
        assert_eq!(cut.chars().count(), MAX_ERROR_CHARS + 1);
    }
}
