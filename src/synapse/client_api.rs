//! Synapse's client API, for what only Synapse can compute: a user's push rules. The relay never
//! rebuilds `m.push_rules` from tables (the server defaults live in Synapse's code); it asks
//! Synapse, as the user, with the appservice's `as_token` and `?user_id=` (appservices may act as
//! the users in their namespaces), exactly as the appservice itself could.

use crate::delivery::response_body::{BodyError, MAX_RESPONSE_BODY, read_bounded};
use crate::model::Secret;

/// A failed fetch. Never carries the token.
#[derive(Debug, thiserror::Error)]
#[error("fetching the push rules of {user_id} from Synapse's client API: {message}")]
pub struct ClientApiError {
    pub user_id: String,
    pub message: String,
    /// The HTTP status, when Synapse answered with an error.
    pub status: Option<u16>,
}

impl ClientApiError {
    /// Whether asking again will get the same answer: a 4xx other than 408 (timeout) and 429
    /// (rate limited), e.g. 403 for a user outside the appservice's namespaces or 404.
    pub fn is_lasting(&self) -> bool {
        self.status
            .is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429)
    }

    /// Whether no HTTP answer came (the client API is unreachable or timed out).
    pub fn is_unreachable(&self) -> bool {
        self.status.is_none()
    }
}

/// `GET {base}/_matrix/client/v3/pushrules/?user_id={user_id}`: the user's push rules as JSON text
/// (`{"global": {...}}`, the content of an `m.push_rules` event as /sync shows it).
pub async fn fetch_push_rules(
    http: &reqwest::Client,
    base: &str,
    as_token: &Secret,
    user_id: &str,
) -> Result<String, ClientApiError> {
    let err = |message: String| ClientApiError {
        user_id: user_id.to_owned(),
        message,
        status: None,
    };
    let mut url = reqwest::Url::parse(&format!("{}/_matrix/client/v3/pushrules/", base.trim_end_matches('/')))
        .map_err(|e| err(format!("invalid client API URL: {e}")))?;
    url.query_pairs_mut().append_pair("user_id", user_id);
    let resp = http
        .get(url)
        .header(reqwest::header::AUTHORIZATION, format!("Bearer {}", as_token.expose()))
        .send()
        .await
        .map_err(|e| err(e.without_url().to_string()))?;
    let status = resp.status();
    let body = match read_bounded(resp, MAX_RESPONSE_BODY).await {
        Ok(b) => b,
        Err(BodyError::Read(e)) => return Err(err(format!("reading the answer failed: {}", e.without_url()))),
        Err(e @ BodyError::TooLarge { .. }) => return Err(err(format!("HTTP status {status}, but {e}"))),
    };
    let body = String::from_utf8_lossy(&body);
    if !status.is_success() {
        let snippet: String = body.chars().take(200).collect();
        return Err(ClientApiError {
            status: Some(status.as_u16()),
            ..err(format!("HTTP status {status}: {snippet}"))
        });
    }
    match serde_json::from_str::<&serde_json::value::RawValue>(&body) {
        Ok(_) => Ok(body.into_owned()),
        Err(e) => Err(ClientApiError {
            // An answer, just not a usable one: not "unreachable", not lasting either.
            status: Some(status.as_u16()),
            ..err(format!("the answer is not JSON: {e}"))
        }),
    }
}
