//! [`AppserviceQueue`]: the changes waiting for one appservice, coalesced per key, and the one
//! transaction in flight. Pure: no I/O, no clock.
//!
//! Changes arrive in commit order. A change to a key that is already waiting replaces the waiting
//! value (the latest value wins) and keeps its place in line; a change to a key that is in flight
//! waits behind it, so one key's values reach the appservice in commit order and a value never
//! overtakes a newer one. Each waiting entry remembers the oldest commit whose change it still
//! carries (`first_lsn`): the checkpoint may not pass that commit until the entry is delivered.

use std::collections::{HashMap, VecDeque};

use crate::model::{AccountDataChange, AccountDataKey, ChangeContent, Lsn};

/// One key's latest value, with the range of commits it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedChange {
    pub key: AccountDataKey,
    pub content: ChangeContent,
    /// The oldest commit whose change to this key is not yet delivered.
    pub first_lsn: Lsn,
    /// The commit of the value held.
    pub last_lsn: Lsn,
    /// The transaction of the value held (to wait for its visibility before reading it back).
    pub xid: u32,
}

/// The entries of one transaction, taken from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub entries: Vec<QueuedChange>,
}

impl Batch {
    /// The smallest `first_lsn` of the batch.
    pub fn first_lsn(&self) -> Lsn {
        self.entries.iter().map(|e| e.first_lsn).min().unwrap_or_default()
    }
    /// The largest `last_lsn` of the batch.
    pub fn last_lsn(&self) -> Lsn {
        self.entries.iter().map(|e| e.last_lsn).max().unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    first_lsn: Lsn,
    keys: Vec<(AccountDataKey, u32)>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct AppserviceQueue {
    waiting: HashMap<AccountDataKey, QueuedChange>,
    order: VecDeque<AccountDataKey>,
    in_flight: Option<InFlight>,
}

impl AppserviceQueue {
    pub fn new() -> AppserviceQueue {
        AppserviceQueue::default()
    }

    /// Add a change (changes must come in commit order).
    pub fn push(&mut self, change: AccountDataChange) {
        match self.waiting.get_mut(&change.key) {
            Some(entry) => {
                // A value read from the table when the transaction is built is at least as new
                // as any value queued after it: keep reading it.
                if !matches!(
                    (&entry.content, &change.content),
                    (ChangeContent::ReadCurrent(_), ChangeContent::Json(_))
                ) {
                    entry.content = change.content;
                }
                entry.last_lsn = change.commit_lsn;
                entry.xid = change.xid;
            }
            None => {
                self.order.push_back(change.key.clone());
                self.waiting.insert(
                    change.key.clone(),
                    QueuedChange {
                        key: change.key,
                        content: change.content,
                        first_lsn: change.commit_lsn,
                        last_lsn: change.commit_lsn,
                        xid: change.xid,
                    },
                );
            }
        }
    }

    /// Take the next transaction's entries (up to `max`, oldest first), unless one is already in
    /// flight or nothing waits.
    pub fn take_batch(&mut self, max: usize) -> Option<Batch> {
        if self.in_flight.is_some() || self.order.is_empty() {
            return None;
        }
        let n = max.max(1).min(self.order.len());
        let mut entries = Vec::with_capacity(n);
        for key in self.order.drain(..n) {
            if let Some(e) = self.waiting.remove(&key) {
                entries.push(e);
            }
        }
        let batch = Batch { entries };
        self.in_flight = Some(InFlight {
            first_lsn: batch.first_lsn(),
            keys: batch.entries.iter().map(|e| (e.key.clone(), e.xid)).collect(),
        });
        Some(batch)
    }

    /// The transaction in flight was delivered.
    pub fn complete_in_flight(&mut self) {
        self.in_flight = None;
    }

    /// The smallest commit LSN with a change not yet delivered (waiting or in flight).
    pub fn oldest_undelivered(&self) -> Option<Lsn> {
        // `order` is in order of first arrival and entries keep their first LSN, so the front
        // holds the smallest waiting one.
        let waiting = self
            .order
            .front()
            .and_then(|k| self.waiting.get(k))
            .map(|e| e.first_lsn);
        match (waiting, self.in_flight.as_ref().map(|f| f.first_lsn)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What a waiting key will be sent with (`None`: it is not waiting).
    pub fn waiting_content(&self, key: &AccountDataKey) -> Option<&ChangeContent> {
        self.waiting.get(key).map(|e| &e.content)
    }

    /// Keys waiting (not counting the transaction in flight).
    pub fn waiting_len(&self) -> usize {
        self.order.len()
    }

    /// Entries of the transaction in flight (0 when none).
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.as_ref().map(|f| f.keys.len()).unwrap_or(0)
    }

    /// Empty the queue, waiting entries and the transaction in flight alike, returning their keys
    /// and the oldest commit they stood for (for recording them as keys to resync).
    pub fn drain_keys(&mut self) -> (Vec<(AccountDataKey, u32)>, Option<Lsn>) {
        let oldest = self.oldest_undelivered();
        let mut keys: Vec<(AccountDataKey, u32)> = self.in_flight.take().map(|f| f.keys).unwrap_or_default();
        for k in self.order.drain(..) {
            let xid = self.waiting.get(&k).map(|e| e.xid).unwrap_or(0);
            keys.push((k, xid));
        }
        self.waiting.clear();
        (keys, oldest)
    }

    /// Nothing waiting and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.order.is_empty() && self.in_flight.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn change(user: &str, room: Option<&str>, ty: &str, content: &str, lsn: u64) -> AccountDataChange {
        AccountDataChange {
            key: AccountDataKey {
                user_id: user.into(),
                room_id: room.map(Arc::from),
                data_type: ty.into(),
            },
            content: ChangeContent::Json(content.into()),
            commit_lsn: Lsn(lsn),
            xid: 1,
        }
    }

    fn json(e: &QueuedChange) -> &str {
        match &e.content {
            ChangeContent::Json(j) => j,
            ChangeContent::ReadCurrent(_) => "read",
        }
    }

    #[test]
    fn waiting_changes_coalesce_latest_wins_and_keep_their_place() {
        let mut q = AppserviceQueue::new();
        q.push(change("@a:x", None, "t1", "1", 10));
        q.push(change("@b:x", None, "t1", "2", 20));
        q.push(change("@a:x", None, "t1", "3", 30));
        q.push(change("@a:x", Some("!r:x"), "t1", "4", 30));
        assert_eq!(q.waiting_len(), 3);
        let b = q.take_batch(100).unwrap();
        let got: Vec<(&str, &str, u64, u64)> = b
            .entries
            .iter()
            .map(|e| (&*e.key.user_id, json(e), e.first_lsn.0, e.last_lsn.0))
            .collect();
        assert_eq!(
            got,
            vec![("@a:x", "3", 10, 30), ("@b:x", "2", 20, 20), ("@a:x", "4", 30, 30)]
        );
        assert_eq!((b.first_lsn(), b.last_lsn()), (Lsn(10), Lsn(30)));
    }

    #[test]
    fn a_value_read_at_delivery_is_not_replaced_by_an_older_queued_one() {
        let mut q = AppserviceQueue::new();
        let mut c = change("@a:x", None, "t", "", 10);
        c.content = ChangeContent::ReadCurrent(crate::model::SourceTable::AccountData);
        q.push(c);
        q.push(change("@a:x", None, "t", "later", 20));
        let b = q.take_batch(10).unwrap();
        assert_eq!(json(&b.entries[0]), "read");
        assert_eq!(b.entries[0].last_lsn, Lsn(20));
    }

    #[test]
    fn one_transaction_in_flight_and_new_values_wait_behind_it() {
        let mut q = AppserviceQueue::new();
        q.push(change("@a:x", None, "t", "old", 10));
        let first = q.take_batch(100).unwrap();
        assert_eq!(first.entries.len(), 1);
        q.push(change("@a:x", None, "t", "new", 20));
        assert!(q.take_batch(100).is_none(), "only one transaction in flight");
        assert_eq!(q.oldest_undelivered(), Some(Lsn(10)));
        q.complete_in_flight();
        assert_eq!(q.oldest_undelivered(), Some(Lsn(20)));
        let second = q.take_batch(100).unwrap();
        assert_eq!(json(&second.entries[0]), "new");
        q.complete_in_flight();
        assert!(q.is_idle());
        assert_eq!(q.oldest_undelivered(), None);
    }

    #[test]
    fn batches_hold_at_most_max_entries_oldest_first() {
        let mut q = AppserviceQueue::new();
        for i in 0..250u64 {
            q.push(change(&format!("@u{i}:x"), None, "t", "{}", 100 + i));
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let b = q.take_batch(100)?;
            q.complete_in_flight();
            Some(b.entries.len())
        })
        .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn draining_returns_every_key_and_the_oldest_commit() {
        let mut q = AppserviceQueue::new();
        q.push(change("@a:x", None, "t", "1", 50));
        q.push(change("@b:x", None, "t", "1", 60));
        let _ = q.take_batch(1).unwrap();
        q.push(change("@a:x", None, "t", "2", 70));
        let (keys, oldest) = q.drain_keys();
        assert_eq!(oldest, Some(Lsn(50)));
        let users: Vec<&str> = keys.iter().map(|(k, _)| &*k.user_id).collect();
        assert_eq!(users, vec!["@a:x", "@b:x", "@a:x"]);
        assert!(q.is_idle());
        assert_eq!(q.oldest_undelivered(), None);
    }

    #[test]
    fn oldest_undelivered_is_the_minimum_of_waiting_and_in_flight() {
        let mut q = AppserviceQueue::new();
        assert_eq!(q.oldest_undelivered(), None);
        q.push(change("@a:x", None, "t", "1", 50));
        q.push(change("@b:x", None, "t", "1", 60));
        let _ = q.take_batch(1).unwrap();
        assert_eq!(q.oldest_undelivered(), Some(Lsn(50)));
        q.complete_in_flight();
        assert_eq!(q.oldest_undelivered(), Some(Lsn(60)));
        assert_eq!((q.waiting_len(), q.in_flight_len()), (1, 0));
    }
}
