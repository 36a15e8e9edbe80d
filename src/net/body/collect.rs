//! Reading a whole request body into one buffer, sized from `Content-Length` when the client sends one,
//! so that an upload is held once (no list of chunks copied into a second buffer at the end).

use axum::body::Body;
use http_body::Body as _;
use http_body_util::BodyExt;

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// It is (or says it is) longer than the limit.
    #[error("the body is larger than the limit")]
    TooLarge,
    /// The connection failed or the body was cut off.
    #[error("failed to read the request body: {0}")]
    Read(String),
}

/// Reads `body` whole, refusing at once a declared length over `limit` and stopping at the first byte
/// past it.
pub async fn to_vec(mut body: Body, limit: usize) -> Result<Vec<u8>, CollectError> {
    let declared = body.size_hint().exact().and_then(|n| usize::try_from(n).ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(CollectError::TooLarge);
    }
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Read(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len().saturating_add(data.len()) > limit {
                return Err(CollectError::TooLarge);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_are_read_whole_under_the_limit() {
        assert_eq!(to_vec(Body::from("hello"), 5).await.unwrap(), b"hello");
        assert!(matches!(to_vec(Body::from("hello!"), 5).await, Err(CollectError::TooLarge)));
        let chunks = futures::stream::iter(["ab", "cd", "ef"].map(Ok::<_, std::io::Error>));
        assert!(matches!(to_vec(Body::from_stream(chunks), 5).await, Err(CollectError::TooLarge)));
    }
}
