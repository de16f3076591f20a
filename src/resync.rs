//! Resync: send an appservice the *current* account data of a set of keys. One mechanism serves
//! bounded retention (keys recorded while an appservice was down), `backfill`, the first opt-in
//! of an appservice, and recovery from a lost slot.
//!
//! Requesting a resync ([`enqueue_backfill`]) records the keys of every user the appservice is
//! interested in (read from Synapse's tables in pages, filtered with Synapse's own regex rule) in
//! the state store, then, in one transaction, marks the appservice as served and writes a
//! `resync` message into the replication stream. The running relay switches the appservice to
//! recording mode exactly where that message sits in commit order and drains the keys through the
//! normal delivery path, so a backfill is safe while `run` is live: nothing sent afterwards can
//! be older than what the backfill read.

use crate::config::AppserviceSettings;
use crate::routing::{AppserviceInterest, Router, RoutingError};
use crate::state_store::{RelayMessage, StateStore, StoreError};

/// Users read per query.
const USER_PAGE: i64 = 1000;

/// What a backfill request recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillSummary {
    pub users: u64,
    pub keys: u64,
}

/// Why a backfill could not be requested.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
}

/// A filter on user ids with Python `re.match` semantics (for `backfill --users`).
pub fn user_filter(pattern: &str) -> Result<Router, RoutingError> {
    Router::new(&[AppserviceInterest {
        id: "--users".into(),
        // A sender that no real user id can be.
        sender_user_id: "\u{0}".into(),
        user_regexes: vec![pattern.to_owned()],
        source: "--users".into(),
    }])
}

/// Record the keys of every user `appservice` is interested in (and `users` matches, if given),
/// then mark it served and request the resync in the stream. Safe to repeat.
pub async fn enqueue_backfill(
    client: &mut tokio_postgres::Client,
    store: &StateStore,
    appservice: &AppserviceSettings,
    users: Option<&Router>,
) -> Result<BackfillSummary, ResyncError> {
    let interest = Router::new(&[appservice.interest()])?;
    let mut summary = BackfillSummary::default();
    let mut after = String::new();
    loop {
        let page = store.users_page(&*client, &after, USER_PAGE).await?;
        let Some(last) = page.last().cloned() else { break };
        let chosen: Vec<String> = page
            .into_iter()
            .filter(|u| !interest.route(u).is_empty() && users.is_none_or(|f| !f.route(u).is_empty()))
            .collect();
        summary.users += chosen.len() as u64;
        summary.keys += store
            .enqueue_users(&*client, &appservice.id, &chosen, appservice.push_rules)
            .await?;
        after = last;
    }
    let tx = client.transaction().await.map_err(|e| StoreError {
        what: "starting the resync request",
        message: e.to_string(),
        sqlstate: e.code().map(|c| c.code().to_owned()),
        connection_lost: e.is_closed(),
    })?;
    store.mark_served(&tx, &appservice.id).await?;
    store
        .emit(&tx, &RelayMessage::Resync(appservice.id.clone()), true)
        .await?;
    tx.commit().await.map_err(|e| StoreError {
        what: "committing the resync request",
        message: e.to_string(),
        sqlstate: e.code().map(|c| c.code().to_owned()),
        connection_lost: e.is_closed(),
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_filter_has_re_match_semantics_and_no_sender() {
        let f = user_filter("@alice").unwrap();
        assert!(!f.route("@alice:x").is_empty());
        assert!(!f.route("@alicebot:x").is_empty(), "anchored at the start only");
        assert!(f.route("@bob:x").is_empty());
        assert!(f.route("").is_empty());
        assert!(user_filter("@(").is_err());
    }
}
