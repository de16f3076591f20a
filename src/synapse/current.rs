//! Reading the current value of account-data keys from Synapse's tables (I/O): for `m.tag`
//! (all of a room's tags, from `room_tags`) and for UPDATEs whose content pgoutput did not repeat
//! (unchanged TOAST). One query per table per transaction to an appservice, never one per key.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{AccountDataKey, SourceTable};
use crate::synapse::rows::assemble_tags;

/// A failed read, with the SQLSTATE when the server sent one.
#[derive(Debug, thiserror::Error)]
#[error("reading current {table} content: {message}{}", sqlstate.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
pub struct ReadError {
    pub table: &'static str,
    pub message: String,
    pub sqlstate: Option<String>,
    /// The connection is gone; the caller should reconnect.
    pub connection_lost: bool,
}

fn read_error(table: &'static str, e: &tokio_postgres::Error) -> ReadError {
    ReadError {
        table,
        message: e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
        sqlstate: e.code().map(|c| c.code().to_owned()),
        connection_lost: e.is_closed() || e.as_db_error().is_none(),
    }
}

/// `raw` if it is one valid JSON value (as the live path checks in `synapse::rows`), else `None`
/// and an error naming the key, never the content. The content goes into the transaction body
/// as it is: a row that is not JSON would make every attempt fail (the appservice refuses the
/// body) or, like `1}, {"type": "…"`, add entries of its own.
pub fn checked_content(table: &'static str, key: &AccountDataKey, raw: &str) -> Option<Arc<str>> {
    match serde_json::from_str::<&serde_json::value::RawValue>(raw) {
        Ok(_) => Some(Arc::from(raw)),
        Err(e) => {
            tracing::error!(
                table,
                user_id = %key.user_id,
                room_id = key.room_id.as_deref().unwrap_or(""),
                data_type = %key.data_type,
                error = %e,
                "{table} row skipped: its content is not valid JSON"
            );
            None
        }
    }
}

/// The current content of `keys` read from `table`. Keys whose row no longer exists are absent
/// from the answer, and so are rows whose content is not valid JSON (logged with their key),
/// except for `RoomTags`, where a room without tags has content `{"tags":{}}`.
pub async fn read_current(
    client: &impl tokio_postgres::GenericClient,
    table: SourceTable,
    keys: &[&AccountDataKey],
) -> Result<HashMap<AccountDataKey, Arc<str>>, ReadError> {
    let mut out = HashMap::with_capacity(keys.len());
    if keys.is_empty() {
        return Ok(out);
    }
    let users: Vec<&str> = keys.iter().map(|k| &*k.user_id).collect();
    let rooms: Vec<&str> = keys.iter().map(|k| k.room_id.as_deref().unwrap_or("")).collect();
    let types: Vec<&str> = keys.iter().map(|k| &*k.data_type).collect();
    match table {
        // Not in the tables: fetched from Synapse's client API (`synapse::client_api`).
        SourceTable::PushRules => {}
        SourceTable::AccountData => {
            let rows = client
                .query(
                    "SELECT a.user_id, a.account_data_type, a.content FROM account_data a \
                     JOIN unnest($1::text[], $2::text[]) AS k(user_id, account_data_type) \
                       ON a.user_id = k.user_id AND a.account_data_type = k.account_data_type",
                    &[&users, &types],
                )
                .await
                .map_err(|e| read_error("account_data", &e))?;
            for r in rows {
                let key = AccountDataKey {
                    user_id: r.get::<_, &str>(0).into(),
                    room_id: None,
                    data_type: r.get::<_, &str>(1).into(),
                };
                if let Some(content) = checked_content("account_data", &key, r.get(2)) {
                    out.insert(key, content);
                }
            }
        }
        SourceTable::RoomAccountData => {
            let rows = client
                .query(
                    "SELECT a.user_id, a.room_id, a.account_data_type, a.content FROM room_account_data a \
                     JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, room_id, account_data_type) \
                       ON a.user_id = k.user_id AND a.room_id = k.room_id AND a.account_data_type = k.account_data_type",
                    &[&users, &rooms, &types],
                )
                .await
                .map_err(|e| read_error("room_account_data", &e))?;
            for r in rows {
                let key = AccountDataKey {
                    user_id: r.get::<_, &str>(0).into(),
                    room_id: Some(r.get::<_, &str>(1).into()),
                    data_type: r.get::<_, &str>(2).into(),
                };
                if let Some(content) = checked_content("room_account_data", &key, r.get(3)) {
                    out.insert(key, content);
                }
            }
        }
        SourceTable::RoomTags => {
            let rows = client
                .query(
                    "SELECT t.user_id, t.room_id, t.tag, t.content FROM room_tags t \
                     JOIN (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS k(user_id, room_id) \
                       ON t.user_id = k.user_id AND t.room_id = k.room_id \
                     ORDER BY t.user_id, t.room_id, t.tag",
                    &[&users, &rooms],
                )
                .await
                .map_err(|e| read_error("room_tags", &e))?;
            let mut by_room: HashMap<(&str, &str), Vec<(&str, &str)>> = HashMap::new();
            for r in &rows {
                by_room
                    .entry((r.get(0), r.get(1)))
                    .or_default()
                    .push((r.get(2), r.get(3)));
            }
            for key in keys {
                let tags = by_room
                    .remove(&(&*key.user_id, key.room_id.as_deref().unwrap_or("")))
                    .unwrap_or_default();
                let (content, invalid) = assemble_tags(tags);
                for tag in invalid {
                    tracing::error!(
                        user_id = %key.user_id,
                        room_id = key.room_id.as_deref().unwrap_or(""),
                        tag = %tag,
                        "room_tags row skipped: its content is not valid JSON"
                    );
                }
                out.insert((*key).clone(), Arc::from(content));
            }
        }
    }
    Ok(out)
}

/// Wait until the transactions `xids` (32-bit ids from pgoutput's Begin) are visible to new
/// snapshots of this server. A logical decoding client can receive a transaction a moment
/// *before* it becomes visible to other sessions (the commit record is flushed, and so decoded,
/// before the transaction leaves the running set); a value read back from the tables in that
/// moment would be the previous one. Checked with `pg_visible_in_snapshot`, the 32-bit ids
/// widened with the epoch of the current snapshot's xmax.
pub async fn wait_until_visible(client: &impl tokio_postgres::GenericClient, xids: &[u32]) -> Result<(), ReadError> {
    let mut ids: Vec<i64> = xids.iter().filter(|x| **x >= 3).map(|x| i64::from(*x)).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(bool_and(pg_visible_in_snapshot( \
                   ((((x.xmax >> 32) - CASE WHEN v.xid > (x.xmax & 4294967295) THEN 1 ELSE 0 END) << 32) | v.xid)::text::xid8, \
                   x.s)), true) \
                 FROM (SELECT s, pg_snapshot_xmax(s)::text::bigint AS xmax FROM pg_current_snapshot() AS s) AS x, \
                      unnest($1::bigint[]) AS v(xid)",
                &[&ids],
            )
            .await
            .map_err(|e| read_error("(visibility check)", &e))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            return Err(ReadError {
                table: "(visibility check)",
                message: format!("transactions {ids:?} were decoded but are still not visible after 30 s"),
                sqlstate: None,
                connection_lost: false,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}
