//! Resync: send an appservice the *current* account data of its users: `backfill`, the first
//! opt-in of an appservice, and recovery from a lost slot. (Keys recorded while an appservice
//! was down are resent through `pending_keys`, see [`crate::resync::store`].)
//!
//! Requesting a backfill ([`request_backfill`]) writes, in one transaction, one row into the
//! relay's table `backfills` (the appservice, an optional `--users` regex, and a cursor at the
//! start), marks the appservice as served, and writes a `resync` message into the replication
//! stream. The running relay switches the appservice to recording mode exactly where that
//! message sits in commit order, and its worker then streams the current values straight from
//! Synapse's tables, table by table in the order of each table's unique index (a keyset cursor:
//! every page reads the rows it sends and no others, [`read_backfill_page`]), filters them with
//! Synapse's own regex rule, and delivers them. The cursor row is updated after each page, so a
//! restart resumes where it stopped; the row is deleted at the end. Per key, nothing is written
//! into the relay's schema.
//!
//! Why this is safe while `run` is live: every value sent was current when its page was read,
//! pages are read and delivered in order, and every change committed after the request is
//! recorded (the appservice is in recording mode from the message on) and resent, with its
//! current value, only after the backfill: nothing sent afterwards is older than what the
//! backfill read, and the switch back to live happens only after the last page.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::config::AppserviceSettings;
use crate::model::{AccountDataKey, PUSH_RULES_EVENT_TYPE, TAG_EVENT_TYPE};
use crate::resync::store::{RelayMessage, StateStore, StoreError};
use crate::routing::{AppserviceInterest, Router, RoutingError};
use crate::synapse::current::checked_content;
use crate::synapse::rows::assemble_tags;

/// How long one statement of a backfill request may run (`SET LOCAL statement_timeout`), and
/// how long the whole request may take before the client gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a backfill could not be requested.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
}

use crate::resync::store::store_error as sql_error;

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

/// Request a backfill of every user `appservice` is interested in (and `users`, a regex with
/// Python `re.match` semantics, matches, if given): one row in `backfills`, the appservice marked
/// served, and the `resync` message, in one transaction. Returns the request's id. Safe to repeat
/// (each request is served, in order).
pub async fn request_backfill(
    client: &mut tokio_postgres::Client,
    store: &StateStore,
    appservice: &AppserviceSettings,
    users: Option<&str>,
) -> Result<i64, ResyncError> {
    if let Some(u) = users {
        user_filter(u)?;
    }
    let s = store.schema_sql();
    let request = async {
        let tx = client
            .transaction()
            .await
            .map_err(sql_error("starting the backfill request"))?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = '{}s'",
            REQUEST_TIMEOUT.as_secs()
        ))
        .await
        .map_err(sql_error("setting the backfill request's statement timeout"))?;
        let id: i64 = tx
            .query_one(
                &format!("INSERT INTO {s}.backfills (appservice_id, users_regex) VALUES ($1, $2) RETURNING id"),
                &[&appservice.id, &users],
            )
            .await
            .map_err(sql_error("writing the backfill request"))?
            .get(0);
        store.mark_served(&tx, &appservice.id).await?;
        store
            .emit(&tx, &RelayMessage::Resync(appservice.id.clone()), true)
            .await?;
        tx.commit()
            .await
            .map_err(sql_error("committing the backfill request"))?;
        Ok::<i64, StoreError>(id)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StoreError {
            what: "requesting a backfill",
            message: format!("no answer within {REQUEST_TIMEOUT:?}"),
            sqlstate: None,
            connection_lost: true,
        }
        .into()),
    }
}

/// Which of Synapse's tables a backfill is reading (stored as a number in the cursor row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackfillPhase {
    /// `account_data`, by `(user_id, account_data_type)`.
    Global = 0,
    /// `room_account_data`, by `(user_id, room_id, account_data_type)`.
    Rooms = 1,
    /// `room_tags_revisions`, by `(user_id, room_id)`, with each room's tags from `room_tags`.
    Tags = 2,
    /// The distinct users of the three tables, for their push rules (client API).
    PushRules = 3,
}

impl BackfillPhase {
    fn from_number(n: i16) -> Option<BackfillPhase> {
        [
            BackfillPhase::Global,
            BackfillPhase::Rooms,
            BackfillPhase::Tags,
            BackfillPhase::PushRules,
        ]
        .into_iter()
        .find(|p| *p as i16 == n)
    }

    /// The phase after this one that an appservice with these settings takes, if any.
    pub fn next(self, room_account_data: bool, push_rules: bool) -> Option<BackfillPhase> {
        let wanted = |p: &BackfillPhase| match p {
            BackfillPhase::Global => true,
            BackfillPhase::Rooms | BackfillPhase::Tags => room_account_data,
            BackfillPhase::PushRules => push_rules,
        };
        [BackfillPhase::Rooms, BackfillPhase::Tags, BackfillPhase::PushRules]
            .into_iter()
            .filter(|p| *p > self)
            .find(wanted)
    }
}

/// Where a backfill stands: everything up to and including this key of `phase`'s table is sent
/// (empty strings: nothing of it yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillCursor {
    pub phase: BackfillPhase,
    pub user: String,
    pub room: String,
    pub data_type: String,
}

impl BackfillCursor {
    pub fn start_of(phase: BackfillPhase) -> BackfillCursor {
        BackfillCursor {
            phase,
            user: String::new(),
            room: String::new(),
            data_type: String::new(),
        }
    }
}

/// One backfill request, as stored.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub id: i64,
    pub users_regex: Option<String>,
    pub cursor: BackfillCursor,
    /// Entries sent so far (for the log).
    pub keys_sent: i64,
}

/// The oldest backfill request of `appservice`, if any.
pub async fn next_backfill(
    c: &impl GenericClient,
    store: &StateStore,
    appservice: &str,
) -> Result<Option<BackfillRequest>, StoreError> {
    let s = store.schema_sql();
    let row = c
        .query_opt(
            &format!(
                "SELECT id, users_regex, phase, after_user, after_room, after_type, keys_sent FROM {s}.backfills \
                 WHERE appservice_id = $1 ORDER BY id LIMIT 1"
            ),
            &[&appservice],
        )
        .await
        .map_err(sql_error("reading backfill requests"))?;
    Ok(row.map(|r| BackfillRequest {
        id: r.get(0),
        users_regex: r.get(1),
        cursor: BackfillCursor {
            // An unknown phase (a newer relay wrote it): start again.
            phase: BackfillPhase::from_number(r.get(2)).unwrap_or(BackfillPhase::Global),
            user: r.get(3),
            room: r.get(4),
            data_type: r.get(5),
        },
        keys_sent: r.get(6),
    }))
}

/// Remember how far backfill `id` got.
pub async fn save_backfill_cursor(
    c: &impl GenericClient,
    store: &StateStore,
    id: i64,
    cursor: &BackfillCursor,
    keys_sent: i64,
) -> Result<(), StoreError> {
    let s = store.schema_sql();
    c.execute(
        &format!(
            "UPDATE {s}.backfills SET phase = $2, after_user = $3, after_room = $4, after_type = $5, keys_sent = $6 \
             WHERE id = $1"
        ),
        &[
            &id,
            &(cursor.phase as i16),
            &cursor.user,
            &cursor.room,
            &cursor.data_type,
            &keys_sent,
        ],
    )
    .await
    .map_err(sql_error("saving a backfill's position"))?;
    Ok(())
}

/// Backfill `id` is complete (or cannot be served).
pub async fn finish_backfill(c: &impl GenericClient, store: &StateStore, id: i64) -> Result<(), StoreError> {
    let s = store.schema_sql();
    c.execute(&format!("DELETE FROM {s}.backfills WHERE id = $1"), &[&id])
        .await
        .map_err(sql_error("deleting a completed backfill"))?;
    Ok(())
}

/// A page of `account_data` after a key, in the order of its unique index.
pub const GLOBAL_PAGE_SQL: &str = "SELECT user_id, account_data_type, content FROM account_data \
     WHERE (user_id, account_data_type) > ($1, $2) ORDER BY user_id, account_data_type LIMIT $3";

/// A page of `room_account_data` after a key, in the order of its unique index.
pub const ROOMS_PAGE_SQL: &str = "SELECT user_id, room_id, account_data_type, content FROM room_account_data \
     WHERE (user_id, room_id, account_data_type) > ($1, $2, $3) ORDER BY user_id, room_id, account_data_type LIMIT $4";

/// A page of rooms with tag revisions after a (user, room), in the order of the unique index of
/// `room_tags_revisions`, each with its tags (none: the room's tags were all removed), looked up
/// per room in `room_tags`' unique index (`OFFSET 0` keeps the lateral subquery a per-room
/// lookup: flattened into a join, a small `room_tags` could be hashed whole instead).
pub const TAGS_PAGE_SQL: &str = "SELECT r.user_id, r.room_id, t.tag, t.content FROM \
     (SELECT user_id, room_id FROM room_tags_revisions WHERE (user_id, room_id) > ($1, $2) \
      ORDER BY user_id, room_id LIMIT $3) AS r \
     LEFT JOIN LATERAL (SELECT tag, content FROM room_tags \
       WHERE room_tags.user_id = r.user_id AND room_tags.room_id = r.room_id OFFSET 0) AS t ON true \
     ORDER BY r.user_id, r.room_id, t.tag";

/// The first `$2` distinct users with account data after `$1`. Each table is read in its
/// index's order and stops after `$2` users (a `LIMIT` in each branch), so the union and its
/// sort hold at most `3 × $2` rows: a `UNION … ORDER BY … LIMIT` over the whole tables cannot
/// use the indexes in order before PostgreSQL 17 and reads every remaining row of all three.
pub const USERS_PAGE_SQL: &str = "SELECT DISTINCT user_id FROM ( \
       (SELECT DISTINCT user_id FROM account_data WHERE user_id > $1 ORDER BY user_id LIMIT $2) \
       UNION ALL (SELECT DISTINCT user_id FROM room_account_data WHERE user_id > $1 ORDER BY user_id LIMIT $2) \
       UNION ALL (SELECT DISTINCT user_id FROM room_tags_revisions WHERE user_id > $1 ORDER BY user_id LIMIT $2)) AS u \
     ORDER BY user_id LIMIT $2";

/// One page of a backfill: the entries to send (already filtered), the users whose push rules
/// to fetch, and where the next page starts (`None`: the backfill is complete).
#[derive(Debug, Default)]
pub struct BackfillPage {
    pub entries: Vec<(AccountDataKey, Arc<str>)>,
    pub push_rule_keys: Vec<AccountDataKey>,
    /// Rows (or users) read from Synapse's tables.
    pub rows_read: usize,
    pub next: Option<BackfillCursor>,
}

/// Where the backfill goes after a page of `read` rows of `cursor`'s phase ending at `last`.
fn advance(
    cursor: &BackfillCursor,
    read: usize,
    limit: i64,
    last: Option<BackfillCursor>,
    room_account_data: bool,
    push_rules: bool,
) -> Option<BackfillCursor> {
    match last {
        Some(last) if read as i64 >= limit => Some(last),
        _ => cursor
            .phase
            .next(room_account_data, push_rules)
            .map(BackfillCursor::start_of),
    }
}

/// Read the page of `limit` rows after `cursor`, keeping the users `wanted` says yes to.
pub async fn read_backfill_page(
    c: &impl GenericClient,
    cursor: &BackfillCursor,
    limit: i64,
    room_account_data: bool,
    push_rules: bool,
    mut wanted: impl FnMut(&str) -> bool,
) -> Result<BackfillPage, StoreError> {
    let mut page = BackfillPage::default();
    // Rows come in user order: route each user once.
    let mut last_user: Option<(Arc<str>, bool)> = None;
    let mut user = |u: &str| -> (Arc<str>, bool) {
        match &last_user {
            Some((l, w)) if &**l == u => (l.clone(), *w),
            _ => {
                let entry = (Arc::<str>::from(u), wanted(u));
                last_user = Some(entry.clone());
                entry
            }
        }
    };
    let last = match cursor.phase {
        BackfillPhase::Global => {
            let rows = c
                .query(GLOBAL_PAGE_SQL, &[&cursor.user, &cursor.data_type, &limit])
                .await
                .map_err(sql_error("reading account_data to backfill"))?;
            page.rows_read = rows.len();
            for r in &rows {
                let (u, yes) = user(r.get(0));
                if yes {
                    let key = AccountDataKey {
                        user_id: u,
                        room_id: None,
                        data_type: r.get::<_, &str>(1).into(),
                    };
                    // Checked as the stream's values are: a row that is not JSON is skipped
                    // (logged with its key), so it can neither stall the appservice nor add
                    // entries to the body.
                    if let Some(content) = checked_content("account_data", &key, r.get(2)) {
                        page.entries.push((key, content));
                    }
                }
            }
            rows.last().map(|r| BackfillCursor {
                phase: cursor.phase,
                user: r.get(0),
                room: String::new(),
                data_type: r.get(1),
            })
        }
        BackfillPhase::Rooms => {
            let rows = c
                .query(ROOMS_PAGE_SQL, &[&cursor.user, &cursor.room, &cursor.data_type, &limit])
                .await
                .map_err(sql_error("reading room_account_data to backfill"))?;
            page.rows_read = rows.len();
            for r in &rows {
                let (u, yes) = user(r.get(0));
                if yes {
                    let key = AccountDataKey {
                        user_id: u,
                        room_id: Some(r.get::<_, &str>(1).into()),
                        data_type: r.get::<_, &str>(2).into(),
                    };
                    if let Some(content) = checked_content("room_account_data", &key, r.get(3)) {
                        page.entries.push((key, content));
                    }
                }
            }
            rows.last().map(|r| BackfillCursor {
                phase: cursor.phase,
                user: r.get(0),
                room: r.get(1),
                data_type: r.get(2),
            })
        }
        BackfillPhase::Tags => {
            let rows = c
                .query(TAGS_PAGE_SQL, &[&cursor.user, &cursor.room, &limit])
                .await
                .map_err(sql_error("reading room tags to backfill"))?;
            let mut rooms = 0;
            let mut i = 0;
            while i < rows.len() {
                let (room_user, room): (&str, &str) = (rows[i].get(0), rows[i].get(1));
                let mut tags: Vec<(&str, &str)> = Vec::new();
                while i < rows.len() && rows[i].get::<_, &str>(0) == room_user && rows[i].get::<_, &str>(1) == room {
                    if let (Some(tag), Some(content)) =
                        (rows[i].get::<_, Option<&str>>(2), rows[i].get::<_, Option<&str>>(3))
                    {
                        tags.push((tag, content));
                    }
                    i += 1;
                }
                rooms += 1;
                let (u, yes) = user(room_user);
                if yes {
                    let (content, invalid) = assemble_tags(tags);
                    for tag in invalid {
                        tracing::error!(user_id = %u, room_id = room, tag = %tag, "room_tags row skipped: its content is not valid JSON");
                    }
                    let key = AccountDataKey {
                        user_id: u,
                        room_id: Some(room.into()),
                        data_type: TAG_EVENT_TYPE.into(),
                    };
                    page.entries.push((key, content.into()));
                }
            }
            page.rows_read = rooms;
            rows.last().map(|r| BackfillCursor {
                phase: cursor.phase,
                user: r.get(0),
                room: r.get(1),
                data_type: String::new(),
            })
        }
        BackfillPhase::PushRules => {
            let users = users_page(c, &cursor.user, limit).await?;
            page.rows_read = users.len();
            for u in &users {
                let (u, yes) = user(u);
                if yes {
                    page.push_rule_keys.push(AccountDataKey {
                        user_id: u,
                        room_id: None,
                        data_type: PUSH_RULES_EVENT_TYPE.into(),
                    });
                }
            }
            users.last().map(|u| BackfillCursor {
                phase: cursor.phase,
                user: u.clone(),
                room: String::new(),
                data_type: String::new(),
            })
        }
    };
    page.next = advance(cursor, page.rows_read, limit, last, room_account_data, push_rules);
    Ok(page)
}

/// One page of the distinct users that have account data, after `after`, in order
/// ([`USERS_PAGE_SQL`]).
pub async fn users_page(c: &impl GenericClient, after: &str, limit: i64) -> Result<Vec<String>, StoreError> {
    let rows = c
        .query(USERS_PAGE_SQL, &[&after, &limit])
        .await
        .map_err(sql_error("listing users with account data"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
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

    #[test]
    fn phases_follow_the_appservice_settings() {
        use BackfillPhase::*;
        assert_eq!(Global.next(true, true), Some(Rooms));
        assert_eq!(Rooms.next(true, true), Some(Tags));
        assert_eq!(Tags.next(true, true), Some(PushRules));
        assert_eq!(PushRules.next(true, true), None);
        assert_eq!(
            Global.next(false, true),
            Some(PushRules),
            "no room data: no rooms, no tags"
        );
        assert_eq!(Global.next(false, false), None);
        assert_eq!(Tags.next(true, false), None);
        for p in [Global, Rooms, Tags, PushRules] {
            assert_eq!(BackfillPhase::from_number(p as i16), Some(p));
        }
        assert_eq!(BackfillPhase::from_number(9), None);
    }

    #[test]
    fn a_full_page_continues_after_its_last_row_a_short_one_moves_on() {
        let at = |phase, user: &str| BackfillCursor {
            phase,
            user: user.into(),
            room: String::new(),
            data_type: "t".into(),
        };
        let c = BackfillCursor::start_of(BackfillPhase::Global);
        let last = Some(at(BackfillPhase::Global, "@z:x"));
        assert_eq!(advance(&c, 10, 10, last.clone(), true, false), last);
        assert_eq!(
            advance(&c, 9, 10, last.clone(), true, false),
            Some(BackfillCursor::start_of(BackfillPhase::Rooms))
        );
        assert_eq!(advance(&c, 0, 10, None, false, false), None, "done");
        let tags = at(BackfillPhase::Tags, "@a:x");
        assert_eq!(advance(&tags, 3, 10, Some(tags.clone()), true, false), None);
    }
}
