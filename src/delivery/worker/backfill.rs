//! The worker's side of a backfill (see [`crate::resync::backfill`]): look up the appservice's backfill
//! requests, and serve the oldest: stream the current values from Synapse's tables page by page
//! in index order, deliver them, move the durable cursor. The next page is read while the
//! current one is delivered (pages hold different keys, and are delivered in the order they
//! were read, so no key goes back to an older value).

use std::sync::Arc;
use std::time::Instant;

use super::{AppserviceHandle, Delivery, DeliveryContext, deliver, fetch_push_rules_retrying, lock, with_db_retry};
use crate::model::{AccountDataKey, Lsn};
use crate::resync::backfill::{
    BackfillCursor, BackfillPage, BackfillRequest, finish_backfill, next_backfill, read_backfill_page,
    save_backfill_cursor, user_filter,
};
use crate::resync::store::StoreError;
use crate::routing::Router;
use crate::synapse::current::wait_until_visible;

/// Rows read from Synapse's tables per query.
const PAGE_ROWS: i64 = 1000;

/// Serve this appservice's backfill requests, if any wait. `None`: there is none (the caller
/// drains recorded keys); `Some(go_on)`: a request was served (false: shutdown).
pub(super) async fn serve(handle: &Arc<AppserviceHandle>, ctx: &DeliveryContext) -> Option<bool> {
    let (upto, xids) = handle.with_state(|s| s.backfill_lookup())?;
    let id = handle.settings.id.clone();
    let Some(request) = with_db_retry(ctx, &id, "reading backfill requests", |c| {
        let (xids, store, id) = (&xids, &ctx.store, &id);
        async move {
            // The request's row is committed, but may not be visible yet when its message is decoded.
            wait_until_visible(&*c, xids).await.map_err(|e| StoreError {
                what: "waiting for a backfill request to become visible",
                message: e.to_string(),
                sqlstate: e.sqlstate.clone(),
                connection_lost: e.connection_lost,
            })?;
            next_backfill(&*c, store, id).await
        }
    })
    .await
    else {
        return Some(false);
    };
    match request {
        None => {
            handle.with_state(|s| s.backfills_looked_up(upto));
            None
        }
        Some(request) => Some(run(handle, ctx, request).await),
    }
}

/// Serve one request to its end. Returns false on shutdown.
async fn run(handle: &Arc<AppserviceHandle>, ctx: &DeliveryContext, request: BackfillRequest) -> bool {
    let id = handle.settings.id.clone();
    let settings = &handle.settings;
    let filters = Router::new(&[settings.interest()]).and_then(|interest| {
        let users = request.users_regex.as_deref().map(user_filter).transpose()?;
        Ok((interest, users))
    });
    let (interest, users) = match filters {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(appservice = %id, backfill = request.id, error = %e, "backfill request cannot be served; dropped");
            return with_db_retry(ctx, &id, "dropping a backfill request", |c| {
                let store = &ctx.store;
                async move { finish_backfill(&*c, store, request.id).await }
            })
            .await
            .is_some();
        }
    };
    let wanted = |u: &str| !interest.route(u).is_empty() && users.as_ref().is_none_or(|f| !f.route(u).is_empty());
    let (rooms, push) = (settings.room_account_data, settings.push_rules);
    let read = |cursor: BackfillCursor| {
        let wanted = &wanted;
        let id = &id;
        async move {
            with_db_retry(ctx, id, "reading account data to backfill", |c| {
                let cursor = &cursor;
                async move { read_backfill_page(&*c, cursor, PAGE_ROWS, rooms, push, wanted).await }
            })
            .await
        }
    };
    let started = Instant::now();
    let mut sent = request.keys_sent;
    let (mut rows_read, mut transactions) = (0usize, 0u64);
    tracing::info!(appservice = %id, backfill = request.id, users = request.users_regex.as_deref().unwrap_or("(all)"), from = ?request.cursor.phase, "backfill: sending the current account data of the appservice's users");
    let Some(mut page) = read(request.cursor.clone()).await else {
        return false;
    };
    loop {
        rows_read += page.rows_read;
        let next = page.next.clone();
        let (delivered, next_page) = tokio::join!(deliver_page(handle, ctx, &page), async {
            match &next {
                Some(cursor) => read(cursor.clone()).await.map(Some),
                None => Some(None),
            }
        });
        let Some((entries, txns)) = delivered else {
            return false;
        };
        sent += entries as i64;
        transactions += txns;
        // Where a restart resumes: after this page (or nowhere: it is complete).
        let saved = with_db_retry(ctx, &id, "saving a backfill's position", |c| {
            let (store, next) = (&ctx.store, &next);
            async move {
                match next {
                    Some(cursor) => save_backfill_cursor(&*c, store, request.id, cursor, sent).await,
                    None => finish_backfill(&*c, store, request.id).await,
                }
            }
        })
        .await;
        if saved.is_none() {
            return false;
        }
        match next_page {
            None => return false,
            Some(None) => break,
            Some(Some(p)) => page = p,
        }
    }
    lock(&handle.stats).resync_pages += transactions;
    tracing::info!(
        appservice = %id,
        backfill = request.id,
        keys = sent,
        rows_read,
        transactions,
        took = ?started.elapsed(),
        "backfill complete"
    );
    true
}

/// Deliver a page in transactions of at most `max_entries_per_transaction`. Returns the entries
/// and transactions sent, or `None` on shutdown.
async fn deliver_page(
    handle: &Arc<AppserviceHandle>,
    ctx: &DeliveryContext,
    page: &BackfillPage,
) -> Option<(usize, u64)> {
    let max = ctx.settings.max_entries_per_transaction.max(1);
    let mut push_rules = Vec::new();
    if !page.push_rule_keys.is_empty() {
        let keys: Vec<&AccountDataKey> = page.push_rule_keys.iter().collect();
        push_rules = fetch_push_rules_retrying(handle, ctx, &keys, page.entries.is_empty()).await?;
    }
    let (mut entries, mut transactions) = (0, 0);
    for chunk in page.entries.chunks(max).chain(push_rules.chunks(max)) {
        if deliver(handle, ctx, chunk, Lsn::ZERO, Lsn::ZERO, false).await == Delivery::Shutdown {
            return None;
        }
        entries += chunk.len();
        transactions += 1;
    }
    Some((entries, transactions))
}
