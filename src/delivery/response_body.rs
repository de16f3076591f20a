//! Reading an HTTP answer (an appservice's, Synapse's client API's) with a bound, so a hostile
//! or broken server cannot make the relay buffer gigabytes within the request timeout: the body
//! is read chunk by chunk and the read stops as soon as it would pass the bound. An answer that
//! is larger is a failed attempt for the caller (logged and counted like any other failure).

use bytes::{Bytes, BytesMut};

/// The most the relay reads of one answer: 1 MiB. An appservice answers a transaction with `{}`
/// (or a short JSON error), and a user's push rules are a few KiB (tens with many room-specific
/// rules): 1 MiB is ample to tell JSON from not-JSON.
pub const MAX_RESPONSE_BODY: usize = 1 << 20;

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is (or announces to be) larger than the bound; the rest was not read.
    #[error("the answer's body is larger than {limit} bytes, the most the relay reads")]
    TooLarge { limit: usize },
    /// The connection failed while reading (carries reqwest's error; strip its URL to print).
    #[error("reading the answer's body failed")]
    Read(#[source] reqwest::Error),
}

/// The body of `resp`, at most `limit` bytes (else [`BodyError::TooLarge`]). Holds at most
/// `limit` bytes plus one chunk at any time; dropping the response on error closes the
/// connection, so the server's remaining bytes are never read.
pub async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    let announced = resp.content_length();
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let capacity = announced.map_or(0, |n| n as usize).min(limit);
    let mut body = BytesMut::with_capacity(capacity);
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::receiver::{ReceiverMode, RecordingAppservice};

    async fn put_to(receiver: &RecordingAppservice) -> reqwest::Response {
        crate::delivery::worker::install_crypto_provider();
        reqwest::Client::new()
            .put(format!("{}/_matrix/app/v1/transactions/t1", receiver.url()))
            .header("authorization", "Bearer tok")
            .body(r#"{"events":[]}"#)
            .send()
            .await
            .unwrap()
    }

    /// A receiver that streams an endless body: the read stops after the bound, having read at
    /// most the bound plus one chunk of it.
    #[tokio::test]
    async fn endless_body_stops_at_the_bound() {
        let receiver = RecordingAppservice::start("tok").await.unwrap();
        receiver.set_mode(ReceiverMode::PaddedBody(u64::MAX));
        let resp = put_to(&receiver).await;
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            read_bounded(resp, MAX_RESPONSE_BODY),
        )
        .await
        .expect("the read must stop at the bound, not wait for the end of an endless body");
        assert!(
            matches!(
                got,
                Err(BodyError::TooLarge {
                    limit: MAX_RESPONSE_BODY
                })
            ),
            "{got:?}"
        );
    }

    /// Small answers, with or without a Content-Length, are read whole; one byte over is refused.
    #[tokio::test]
    async fn small_bodies_are_read_and_the_bound_is_exact() {
        let receiver = RecordingAppservice::start("tok").await.unwrap();
        let body = read_bounded(put_to(&receiver).await, MAX_RESPONSE_BODY).await.unwrap();
        assert_eq!(&body[..], b"{}");
        // Streamed (no Content-Length): 1000 spaces and `{}`.
        receiver.set_mode(ReceiverMode::PaddedBody(1000));
        let body = read_bounded(put_to(&receiver).await, 1002).await.unwrap();
        assert_eq!(body.len(), 1002);
        assert!(body.ends_with(b"{}"));
        let got = read_bounded(put_to(&receiver).await, 1001).await;
        assert!(matches!(got, Err(BodyError::TooLarge { limit: 1001 })), "{got:?}");
        // Announced: refused before reading.
        receiver.set_mode(ReceiverMode::Accept);
        let got = read_bounded(put_to(&receiver).await, 1).await;
        assert!(matches!(got, Err(BodyError::TooLarge { limit: 1 })), "{got:?}");
    }
}
