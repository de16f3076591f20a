//! The body and id of one `PUT /_matrix/app/v1/transactions/{txnId}`. Pure.
//!
//! Body:
//! ```json
//! {"events": [],
//!  "org.matrix.msc3682.account_data": {"@u:hs": {"events": [{"type": "T", "content": {...}}]}},
//!  "org.matrix.msc3682.room_account_data": {"@u:hs": {"!room:hs": {"events": [{"type": "m.tag", "content": {...}}]}}}}
//! ```
//! `events` is always present (the spec requires it; mautrix-python and matrix-bot-sdk reject a
//! body without it). Global account data goes under MSC3682's field, shaped like /sync's
//! top-level `account_data` per user; room account data and tags under a field of ours shaped like
//! /sync's `rooms.join.<room>.account_data`, so a consumer of the MSC cannot mistake them for
//! global data. Either field is omitted when empty. Content is written as the raw JSON text
//! Synapse stored, never re-serialised.
//!
//! The transaction id is `msc3682-<first LSN>-<last LSN>-<hash>`: never purely numeric (Synapse's
//! own ids are integers from one sequence, and appservices drop ids they have seen), URL-safe,
//! fixed for the body (the body is built once and retried unchanged), and different for a
//! different body (the hash is the first 64 bits of the body's SHA-256).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::model::{AccountDataKey, Lsn};

/// MSC3682's unstable field for global account data.
pub const ACCOUNT_DATA_FIELD: &str = "org.matrix.msc3682.account_data";
/// Our field for room account data and tags.
pub const ROOM_ACCOUNT_DATA_FIELD: &str = "org.matrix.msc3682.room_account_data";

/// One event of the body: a key and its content as raw JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEntry<'a> {
    pub key: &'a AccountDataKey,
    pub content: &'a str,
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_event(out: &mut Vec<u8>, data_type: &str, content: &str) {
    out.extend_from_slice(b"{\"type\":");
    push_json_string(out, data_type);
    out.extend_from_slice(b",\"content\":");
    out.extend_from_slice(content.as_bytes());
    out.push(b'}');
}

fn push_events<'a>(out: &mut Vec<u8>, events: &[&ResolvedEntry<'a>]) {
    out.extend_from_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_event(out, &e.key.data_type, e.content);
    }
    out.extend_from_slice(b"]}");
}

/// The stable field name, for when MSC3682 is merged.
pub const ACCOUNT_DATA_FIELD_STABLE: &str = "account_data";

/// Which field carries global account data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldNames {
    /// `org.matrix.msc3682.account_data` (the MSC's unstable prefix; the default).
    #[default]
    Unstable,
    /// `account_data`.
    Stable,
    /// Both, with the same content.
    Both,
}

impl FieldNames {
    fn global_fields(self) -> &'static [&'static str] {
        match self {
            FieldNames::Unstable => &[ACCOUNT_DATA_FIELD],
            FieldNames::Stable => &[ACCOUNT_DATA_FIELD_STABLE],
            FieldNames::Both => &[ACCOUNT_DATA_FIELD, ACCOUNT_DATA_FIELD_STABLE],
        }
    }
}

/// Build the JSON body for `entries` (whose contents must be valid JSON text).
pub fn build_body(entries: &[ResolvedEntry<'_>], fields: FieldNames) -> Vec<u8> {
    let mut global: BTreeMap<&str, Vec<&ResolvedEntry<'_>>> = BTreeMap::new();
    let mut rooms: BTreeMap<&str, BTreeMap<&str, Vec<&ResolvedEntry<'_>>>> = BTreeMap::new();
    let mut size = 64;
    for e in entries {
        size += e.content.len() + e.key.data_type.len() + e.key.user_id.len() + 64;
        match &e.key.room_id {
            None => global.entry(&e.key.user_id).or_default().push(e),
            Some(room) => rooms
                .entry(&e.key.user_id)
                .or_default()
                .entry(room)
                .or_default()
                .push(e),
        }
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(b"{\"events\":[]");
    for field in fields.global_fields().iter().filter(|_| !global.is_empty()) {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(field.as_bytes());
        out.extend_from_slice(b"\":{");
        for (i, (user, events)) in global.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_string(&mut out, user);
            out.push(b':');
            push_events(&mut out, events);
        }
        out.push(b'}');
    }
    if !rooms.is_empty() {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(ROOM_ACCOUNT_DATA_FIELD.as_bytes());
        out.extend_from_slice(b"\":{");
        for (i, (user, by_room)) in rooms.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_string(&mut out, user);
            out.extend_from_slice(b":{");
            for (j, (room, events)) in by_room.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                push_json_string(&mut out, room);
                out.push(b':');
                push_events(&mut out, events);
            }
            out.push(b'}');
        }
        out.push(b'}');
    }
    out.push(b'}');
    out
}

/// The bytes `entry` can add to a body built by [`build_body`] with `fields`: an upper bound
/// (it counts the user's and the room's object as if the entry were alone in them), so a chunk
/// whose costs add up to at most a budget builds a body of at most that budget.
pub fn entry_cost(entry: &ResolvedEntry<'_>, fields: FieldNames) -> usize {
    // `"user":{"events":[` / `"user":{"room":{"events":[`, `{"type":…,"content":…}`, `]}}`, commas.
    const FRAMING: usize = 64;
    let quoted = |s: &str| 2 * s.len() + 2; // JSON escaping at most doubles ASCII (\u00XX is counted below)
    let escaped = |s: &str| s.chars().filter(|c| c.is_control()).count() * 4;
    let names = quoted(&entry.key.user_id)
        + escaped(&entry.key.user_id)
        + quoted(&entry.key.data_type)
        + escaped(&entry.key.data_type)
        + entry
            .key
            .room_id
            .as_deref()
            .map(|r| quoted(r) + escaped(r))
            .unwrap_or(0);
    let one = names + entry.content.len() + FRAMING;
    match (&entry.key.room_id, fields) {
        // Global data goes under both fields.
        (None, FieldNames::Both) => 2 * one,
        _ => one,
    }
}

/// The bytes of a body with no entries, plus its two field names: what [`build_body`] adds
/// around the entries.
pub const BODY_OVERHEAD: usize = 128;

/// Split `entries` (in order) into consecutive chunks whose bodies stay within `max_bytes`,
/// each chunk as long as that allows. An entry that alone exceeds the budget gets a chunk of its
/// own (it has to be sent somehow); [`Chunk::oversized`] says so.
pub fn split_by_size(entries: &[ResolvedEntry<'_>], fields: FieldNames, max_bytes: usize) -> Vec<Chunk> {
    let budget = max_bytes.saturating_sub(BODY_OVERHEAD);
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, e) in entries.iter().enumerate() {
        let cost = entry_cost(e, fields);
        if i > start && used + cost > budget {
            chunks.push(Chunk {
                range: start..i,
                oversized: false,
            });
            start = i;
            used = 0;
        }
        used += cost;
        if used > budget {
            // Alone and still too large.
            chunks.push(Chunk {
                range: start..i + 1,
                oversized: true,
            });
            start = i + 1;
            used = 0;
        }
    }
    if start < entries.len() {
        chunks.push(Chunk {
            range: start..entries.len(),
            oversized: false,
        });
    }
    chunks
}

/// Consecutive entries for one transaction (see [`split_by_size`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub range: std::ops::Range<usize>,
    /// A single entry larger than the budget, sent alone.
    pub oversized: bool,
}

/// The transaction id for a body covering commits `first..=last`.
///
/// `epoch` is chosen when the relay starts streaming: a body that happens to repeat after a
/// restart gets a new id, because the appservice may have received other values for the same
/// keys in between, and a receiver that drops repeated ids would otherwise drop it.
pub fn transaction_id(epoch: u64, first: Lsn, last: Lsn, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(epoch.to_be_bytes());
    hasher.update(body);
    let digest = hasher.finalize();
    let mut id = format!("msc3682-{:X}-{:X}-", first.0, last.0);
    for b in &digest[..8] {
        let _ = write!(id, "{b:02x}");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(user: &str, room: Option<&str>, ty: &str) -> AccountDataKey {
        AccountDataKey {
            user_id: user.into(),
            room_id: room.map(Arc::from),
            data_type: ty.into(),
        }
    }

    #[test]
    fn body_has_events_and_both_fields_shaped_like_sync() {
        let k1 = key("@a:x", None, "m.direct");
        let k2 = key("@a:x", None, "org.example \"quoted\"");
        let k3 = key("@b:x", Some("!r:x"), "m.tag");
        let k4 = key("@a:x", Some("!r:x"), "m.fully_read");
        let entries = [
            ResolvedEntry {
                key: &k1,
                content: r#"{"@c:x":["!d:x"]}"#,
            },
            ResolvedEntry {
                key: &k2,
                content: "{}",
            },
            ResolvedEntry {
                key: &k3,
                content: r#"{"tags":{"u.work":{"order":0.5}}}"#,
            },
            ResolvedEntry {
                key: &k4,
                content: r#"{"event_id":"$e"}"#,
            },
        ];
        let body = build_body(&entries, FieldNames::Unstable);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "events": [],
                "org.matrix.msc3682.account_data": {
                    "@a:x": {"events": [
                        {"type": "m.direct", "content": {"@c:x": ["!d:x"]}},
                        {"type": "org.example \"quoted\"", "content": {}}
                    ]}
                },
                "org.matrix.msc3682.room_account_data": {
                    "@a:x": {"!r:x": {"events": [{"type": "m.fully_read", "content": {"event_id": "$e"}}]}},
                    "@b:x": {"!r:x": {"events": [{"type": "m.tag", "content": {"tags": {"u.work": {"order": 0.5}}}}]}}
                }
            })
        );
    }

    #[test]
    fn content_is_passed_through_byte_for_byte() {
        let k = key("@a:x", None, "t");
        // Synapse stores compact JSON with non-ASCII escaped; keep it exactly, even odd spacing.
        let content = r#"{"b": 1.0000,"a":"\u00e9"}"#;
        let body = build_body(&[ResolvedEntry { key: &k, content }], FieldNames::Unstable);
        assert!(String::from_utf8(body).unwrap().contains(content));
    }

    #[test]
    fn empty_fields_are_omitted() {
        let k = key("@a:x", Some("!r:x"), "t");
        let v: serde_json::Value = serde_json::from_slice(&build_body(
            &[ResolvedEntry { key: &k, content: "{}" }],
            FieldNames::Unstable,
        ))
        .unwrap();
        assert!(v.get(ACCOUNT_DATA_FIELD).is_none());
        assert!(v.get(ROOM_ACCOUNT_DATA_FIELD).is_some());
        assert_eq!(build_body(&[], FieldNames::Unstable), br#"{"events":[]}"#);
    }

    #[test]
    fn field_names_can_be_stable_or_both() {
        let k = key("@a:x", None, "t");
        let r = key("@a:x", Some("!r:x"), "t");
        let entries = [
            ResolvedEntry {
                key: &k,
                content: "{\"v\":1}",
            },
            ResolvedEntry { key: &r, content: "{}" },
        ];
        let v: serde_json::Value = serde_json::from_slice(&build_body(&entries, FieldNames::Stable)).unwrap();
        assert!(v.get(ACCOUNT_DATA_FIELD).is_none());
        assert_eq!(v["account_data"]["@a:x"]["events"][0]["content"]["v"], 1);
        assert!(v.get(ROOM_ACCOUNT_DATA_FIELD).is_some());
        let v: serde_json::Value = serde_json::from_slice(&build_body(&entries, FieldNames::Both)).unwrap();
        assert_eq!(v["account_data"], v[ACCOUNT_DATA_FIELD]);
        assert_eq!(v["account_data"]["@a:x"]["events"][0]["type"], "t");
    }

    #[test]
    fn batches_are_split_to_stay_within_the_byte_budget_and_large_entries_go_alone() {
        let keys: Vec<AccountDataKey> = (0..6)
            .map(|i| {
                key(
                    &format!("@u{i}:x"),
                    (i % 2 == 1).then_some("!r:x"),
                    "org.example.t\u{1}",
                )
            })
            .collect();
        let small = format!("{{\"v\":\"{}\"}}", "s".repeat(300));
        let large = format!("{{\"v\":\"{}\"}}", "L".repeat(5000));
        let contents = [&small, &small, &large, &small, &small, &small];
        let entries: Vec<ResolvedEntry<'_>> = keys
            .iter()
            .zip(contents)
            .map(|(key, c)| ResolvedEntry { key, content: c })
            .collect();
        for fields in [FieldNames::Unstable, FieldNames::Both] {
            let max = 1500;
            let chunks = split_by_size(&entries, fields, max);
            // Every entry exactly once, in order.
            let covered: Vec<usize> = chunks.iter().flat_map(|c| c.range.clone()).collect();
            assert_eq!(covered, (0..entries.len()).collect::<Vec<_>>(), "{fields:?}");
            for c in &chunks {
                let body = build_body(&entries[c.range.clone()], fields);
                if c.oversized {
                    assert_eq!(c.range.len(), 1);
                    assert!(body.len() > max);
                } else {
                    assert!(body.len() <= max, "{fields:?} {c:?}: {} bytes", body.len());
                }
            }
            assert_eq!(
                chunks
                    .iter()
                    .filter(|c| c.oversized)
                    .map(|c| c.range.clone())
                    .collect::<Vec<_>>(),
                vec![2..3],
                "{fields:?}"
            );
            assert!(chunks.iter().any(|c| c.range.len() > 1), "small entries share a body");
        }
        // A budget nothing reaches: one chunk.
        assert_eq!(
            split_by_size(&entries, FieldNames::Unstable, 1 << 20),
            vec![Chunk {
                range: 0..6,
                oversized: false
            }]
        );
        assert!(split_by_size(&[], FieldNames::Unstable, 10).is_empty());
    }

    #[test]
    fn transaction_ids_are_never_numeric_url_safe_and_follow_the_body() {
        let a = transaction_id(1, Lsn(0x16_B374_D848), Lsn(0x16_B374_D900), b"{\"events\":[]}");
        assert!(a.starts_with("msc3682-16B374D848-16B374D900-"), "{a}");
        assert!(a.parse::<u64>().is_err());
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{a}");
        assert_eq!(
            a,
            transaction_id(1, Lsn(0x16_B374_D848), Lsn(0x16_B374_D900), b"{\"events\":[]}"),
            "same body, same id"
        );
        assert_ne!(
            a,
            transaction_id(1, Lsn(0x16_B374_D848), Lsn(0x16_B374_D900), b"{\"events\":[1]}"),
            "other body, other id"
        );
        assert_ne!(a, transaction_id(1, Lsn(0), Lsn(0x16_B374_D900), b"{\"events\":[]}"));
        assert_ne!(
            a,
            transaction_id(2, Lsn(0x16_B374_D848), Lsn(0x16_B374_D900), b"{\"events\":[]}"),
            "another run, another id"
        );
    }
}
