//! The relay against a real Synapse, the actual writer of the tables it reads: the pinned
//! `matrix-synapse` (see `.ci/synapse-venv.sh`) runs on the test PostgreSQL with three
//! appservices (A and B opted in, with different user namespaces and a shared one; C not opted
//! in), and everything is written through Synapse's client API: global and room account data,
//! MSC3391 deletions (both the DELETE endpoints and `PUT {}`), tags added, changed and removed,
//! read markers (Synapse writes `m.fully_read` itself), ignored users, large values, push rules
//! (A and B have `push_rules = true`: the relay fetches `m.push_rules` from Synapse's client API).
//! Some data is written before `setup` (it reaches A and B through the first-opt-in backfill),
//! the rest while the relay runs, concurrently for all users.
//!
//! Each receiver must end with exactly what the client API reports for the users of its
//! appservice: every key /sync shows, and every key the test touched as GET answers it (a 404
//! for a deleted key is `{}` at the receiver; `m.tag` is the room's tags). The same state is
//! also read from the tables, and must agree. Synapse pushes its own transactions (room events,
//! integer txnIds) to the same receivers; only account data is compared. Nothing may arrive for
//! the appservice that did not opt in, or for the user of no appservice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use synapse_account_data_relay::testkit::receiver::{ReceivedKey, RecordingAppservice};

use crate::support::scenario::WAIT;
use crate::support::synapse::{AppserviceRegistration, Synapse, User, create_database, synapse_venv};
use crate::support::{RelayFiles, Server, TestDb, diff, histories, pg15, pg17, text};

const A_AS: &str = "as_token_a";
const B_AS: &str = "as_token_b";
const C_AS: &str = "as_token_c";
const A_SENDER: &str = "@abot:example.org";
const B_SENDER: &str = "@bbot:example.org";

/// A: `@a_*`, `@shared_*`, sender `@abot`; B: `@b_*`, `@shared_*`, sender `@bbot`.
fn interested_a(u: &str) -> bool {
    u.ends_with(":example.org") && (u.starts_with("@a_") || u.starts_with("@shared_") || u == "@abot:example.org")
}
fn interested_b(u: &str) -> bool {
    u.ends_with(":example.org") && (u.starts_with("@b_") || u.starts_with("@shared_") || u == "@bbot:example.org")
}

/// Client API writes that remember which keys they touched (so the final comparison asks the
/// client API for each of them, deleted ones included).
struct Writes<'a> {
    synapse: &'a Synapse,
    touched: Mutex<BTreeSet<ReceivedKey>>,
}

impl Writes<'_> {
    fn touch(&self, user: &User, room: Option<&str>, ty: &str) {
        self.touched
            .lock()
            .unwrap()
            .insert((user.user_id.clone(), room.map(str::to_owned), ty.to_owned()));
    }
    async fn global(&self, u: &User, ty: &str, content: Value) {
        self.synapse.put_global(u, ty, &content).await;
        self.touch(u, None, ty);
    }
    async fn delete_global(&self, u: &User, ty: &str) {
        self.synapse.delete_global(u, ty).await;
        self.touch(u, None, ty);
    }
    async fn room(&self, u: &User, room: &str, ty: &str, content: Value) {
        self.synapse.put_room(u, room, ty, &content).await;
        self.touch(u, Some(room), ty);
    }
    async fn delete_room(&self, u: &User, room: &str, ty: &str) {
        self.synapse.delete_room(u, room, ty).await;
        self.touch(u, Some(room), ty);
    }
    async fn tag(&self, u: &User, room: &str, tag: &str, content: Value) {
        self.synapse.put_tag(u, room, tag, &content).await;
        self.touch(u, Some(room), "m.tag");
    }
    async fn untag(&self, u: &User, room: &str, tag: &str) {
        self.synapse.delete_tag(u, room, tag).await;
        self.touch(u, Some(room), "m.tag");
    }
    async fn fully_read(&self, u: &User, room: &str) {
        let event = self.synapse.send_message(u, room, "hello").await;
        self.synapse.set_fully_read(u, room, &event).await;
        self.touch(u, Some(room), "m.fully_read");
    }
    async fn push_rule(&self, u: &User, n: usize) {
        let rule = json!({
            "actions": ["dont_notify"],
            "conditions": [{"kind": "event_match", "key": "content.body", "pattern": format!("quiet{n}")}],
        });
        self.synapse
            .set_push_rule(u, "override", "org.example.quiet", &rule)
            .await;
        self.synapse
            .set_push_rule_enabled(u, "underride", ".m.rule.message", n % 2 == 0)
            .await;
        self.touch(u, None, "m.push_rules");
    }
}

/// Written before `setup`: reaches A and B through the first-opt-in backfill.
async fn before_setup(w: &Writes<'_>, u: &User, room: &str) {
    w.global(u, "org.example.before", json!({"who": u.user_id, "n": 0}))
        .await;
    w.global(u, "org.example.deleted_before", json!({"x": 1})).await;
    w.delete_global(u, "org.example.deleted_before").await;
    w.room(u, room, "org.example.before", json!({"r": 0})).await;
    w.tag(u, room, "u.before", json!({"order": 0.25})).await;
}

/// Written while the relay runs (all users at once).
async fn while_running(w: &Writes<'_>, u: &User, shared_room: &str, own_room: &str, n: usize) {
    w.global(u, "m.direct", json!({"@someone:example.org": [shared_room]}))
        .await;
    for i in 0..3 {
        w.global(
            u,
            "org.example.settings",
            json!({"n": i, "name": "caf\u{e9} \u{2615} \u{1F600}", "nested": {"list": [1, 2.5, null, true]}}),
        )
        .await;
    }
    w.global(
        u,
        "m.ignored_user_list",
        json!({"ignored_users": {"@spammer:example.org": {}}}),
    )
    .await;
    // Stored TOASTed, then replaced.
    w.global(u, "org.example.big", json!({"blob": "x".repeat(30_000 + n)}))
        .await;
    w.global(u, "org.example.big", json!({"blob": "y".repeat(25_000 + n)}))
        .await;
    // MSC3391 deletions: the DELETE endpoint, and PUT {} (the same with msc3391_enabled).
    w.global(u, "org.example.gone", json!({"soon": "gone"})).await;
    w.delete_global(u, "org.example.gone").await;
    w.global(u, "org.example.gone_by_put", json!({"soon": "gone"})).await;
    w.global(u, "org.example.gone_by_put", json!({})).await;
    // Deleted, then set again.
    w.delete_global(u, "org.example.before").await;
    w.global(u, "org.example.before", json!({"back": true})).await;
    // Deleting what was never set changes nothing (Synapse updates no row).
    w.synapse.delete_global(u, "org.example.never_set").await;

    w.room(u, shared_room, "org.example.room", json!({"v": 1})).await;
    w.room(u, shared_room, "org.example.room", json!({"v": 2, "n": n}))
        .await;
    w.room(u, own_room, "org.example.room_gone", json!({"v": 1})).await;
    w.delete_room(u, own_room, "org.example.room_gone").await;
    w.fully_read(u, shared_room).await;

    w.tag(u, shared_room, "u.work", json!({"order": 0.5})).await;
    w.tag(u, shared_room, "m.favourite", json!({"order": 0.1})).await;
    w.tag(u, shared_room, "u.work", json!({"order": 0.75})).await;
    w.untag(u, shared_room, "m.favourite").await;
    w.untag(u, shared_room, "u.before").await;
    w.tag(u, own_room, "u.tmp", json!({})).await;
    w.untag(u, own_room, "u.tmp").await;

    w.push_rule(u, n).await;
}

/// What the client API reports for `user`: every account-data key an initial /sync shows, and
/// every key in `touched` as GET answers it (404 is a deletion, `{}`). The two must agree.
async fn client_view(synapse: &Synapse, user: &User, touched: &BTreeSet<ReceivedKey>) -> BTreeMap<ReceivedKey, Value> {
    let mut view = BTreeMap::new();
    let uid = &user.user_id;
    // Synapse answers /sync for an appservice's sender with 500 (NotImplementedError: "We no
    // longer support AS users using /sync directly"): for senders, the touched keys are all.
    let sync = if [A_SENDER, B_SENDER].contains(&uid.as_str()) {
        Value::Null
    } else {
        synapse.sync(user).await
    };
    for e in sync["account_data"]["events"].as_array().into_iter().flatten() {
        let ty = e["type"].as_str().unwrap();
        // m.push_rules is in every /sync (Synapse's defaults at least). The relay sends it when
        // a user's push rules change and in backfills; every user here changes them, and
        // `touched` brings it in below, as GET answers it.
        if ty != "m.push_rules" {
            view.insert((uid.clone(), None, ty.to_owned()), e["content"].clone());
        }
    }
    for (room, r) in sync["rooms"]["join"].as_object().into_iter().flatten() {
        for e in r["account_data"]["events"].as_array().into_iter().flatten() {
            let ty = e["type"].as_str().unwrap();
            view.insert((uid.clone(), Some(room.clone()), ty.to_owned()), e["content"].clone());
        }
    }
    for key in touched.iter().filter(|k| &k.0 == uid) {
        let value = match (&key.1, key.2.as_str()) {
            (Some(room), "m.tag") => synapse.get_tags(user, room).await,
            (Some(room), ty) => synapse.get_room(user, room, ty).await.unwrap_or(json!({})),
            (None, ty) => synapse.get_global(user, ty).await.unwrap_or(json!({})),
        };
        if let Some(shown) = view.get(key) {
            assert_eq!(shown, &value, "/sync and GET disagree on {key:?}");
        }
        view.insert(key.clone(), value);
    }
    view
}

/// Columns, constraints and indexes of the tables the relay reads (and `account_data_sequence`).
async fn table_definitions(db: &TestDb) -> Vec<String> {
    let tables = [
        "account_data",
        "room_account_data",
        "room_tags",
        "room_tags_revisions",
        "push_rules_stream",
    ];
    let mut out = Vec::new();
    for r in db
        .client
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable \
             FROM information_schema.columns WHERE table_schema = 'public' AND table_name = ANY($1) \
             UNION ALL SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
             FROM pg_constraint WHERE conrelid::regclass::text = ANY($1) \
             UNION ALL SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY($1) \
             UNION ALL SELECT relname || ' ' || relkind::text FROM pg_class WHERE relname = 'account_data_sequence' \
             ORDER BY 1",
            &[&&tables[..]],
        )
        .await
        .unwrap()
    {
        out.push(r.get(0));
    }
    out
}

fn is_synapse_txn(txn_id: &str) -> bool {
    txn_id.parse::<u64>().is_ok()
}

async fn relay_against_real_synapse(server: &'static Server) {
    let started = std::time::Instant::now();
    let venv = synapse_venv();
    let db: TestDb = create_database(server).await;
    let a = RecordingAppservice::start("hs_token_a").await.unwrap();
    let b = RecordingAppservice::start("hs_token_b").await.unwrap();
    let c = RecordingAppservice::start("hs_token_c").await.unwrap();
    // relay.toml (slot and publication named after the database; A and B also get push rules);
    // homeserver.yaml is replaced by Synapse's own below, which the relay then reads (the
    // database, the registrations, and the client listener it fetches push rules from).
    let files = RelayFiles::new(
        &db,
        &[],
        "[appservices.a]\npush_rules = true\n[appservices.b]\npush_rules = true\n",
    );
    // A's url ends in `/`, as registrations often do: Synapse strips it, and so must the relay.
    let (ua, ub, uc) = (format!("{}/", a.url()), b.url(), c.url());
    let registrations = [
        AppserviceRegistration {
            id: "a",
            url: &ua,
            as_token: A_AS,
            hs_token: "hs_token_a",
            sender_localpart: "abot",
            users: &[("@a_.*:example\\.org", true), ("@shared_.*:example\\.org", false)],
            opt_in: true,
        },
        AppserviceRegistration {
            id: "b",
            url: &ub,
            as_token: B_AS,
            hs_token: "hs_token_b",
            sender_localpart: "bbot",
            users: &[("@b_.*:example\\.org", true), ("@shared_.*:example\\.org", false)],
            opt_in: true,
        },
        AppserviceRegistration {
            id: "c",
            url: &uc,
            as_token: C_AS,
            hs_token: "hs_token_c",
            sender_localpart: "cbot",
            users: &[("@c_.*:example\\.org", true)],
            opt_in: false,
        },
    ];
    let paths: Vec<_> = registrations.iter().map(|r| r.write(files.path())).collect();
    let synapse = Synapse::start(&venv, files.path(), server, &db.name, &paths).await;
    eprintln!("[{}] Synapse up after {:?}", server.label, started.elapsed());
    // The other tests write into our copy of Synapse's tables: it must be what Synapse makes.
    let fixture = TestDb::new(server).await;
    let definitions = table_definitions(&db).await;
    assert_eq!(definitions.len(), 42, "{definitions:#?}");
    assert_eq!(
        definitions,
        table_definitions(&fixture).await,
        "tests/fixtures/synapse_schema.sql differs from the tables Synapse created (left: Synapse)"
    );

    // Users: of A, of B, of both, of C (not opted in), of no appservice, and A's sender.
    let a1 = synapse.register_appservice_user(A_AS, "a_1").await;
    let a2 = synapse.register_appservice_user(A_AS, "a_2").await;
    let b1 = synapse.register_appservice_user(B_AS, "b_1").await;
    let b2 = synapse.register_appservice_user(B_AS, "b_2").await;
    let shared = synapse.register_appservice_user(A_AS, "shared_1").await;
    let c1 = synapse.register_appservice_user(C_AS, "c_1").await;
    let nobody = synapse.register_local_user("nobody", "a password of nobody's").await;
    let abot = User::as_appservice(A_SENDER, A_AS);
    let users = [&a1, &a2, &b1, &b2, &shared, &c1, &nobody, &abot];

    let shared_room = synapse
        .create_room(&a1, &json!({"preset": "public_chat", "name": "shared"}))
        .await;
    let mut own_rooms = Vec::new();
    for u in users {
        if u.user_id != a1.user_id {
            synapse.join(u, &shared_room).await;
        }
        own_rooms.push(synapse.create_room(u, &json!({"preset": "private_chat"})).await);
    }

    let w = Writes {
        synapse: &synapse,
        touched: Mutex::new(BTreeSet::new()),
    };
    join_all(users.iter().map(|u| before_setup(&w, u, &shared_room))).await;

    // Synapse made its schema on first start: now the relay's setup, on the same database.
    let out = files.command("setup", &[]);
    assert!(out.status.success(), "setup: {}", text(&out));
    let mut relay = start_relay_reading(&files).await;
    eprintln!("[{}] relay streaming after {:?}", server.label, started.elapsed());

    join_all(
        users
            .iter()
            .zip(&own_rooms)
            .enumerate()
            .map(|(n, (u, own))| while_running(&w, u, &shared_room, own, n)),
    )
    .await;
    eprintln!("[{}] writes done after {:?}", server.label, started.elapsed());

    let touched = w.touched.lock().unwrap().clone();
    let mut want_a = BTreeMap::new();
    let mut want_b = BTreeMap::new();
    for u in users {
        let view = client_view(&synapse, u, &touched).await;
        if interested_a(&u.user_id) {
            want_a.extend(view.clone());
        }
        if interested_b(&u.user_id) {
            want_b.extend(view);
        }
    }
    // What Synapse reports, for one user, pinned (so the comparison below cannot pass vacuously).
    let key = |u: &User, room: Option<&String>, ty: &str| (u.user_id.clone(), room.cloned(), ty.to_owned());
    let expect = [
        (key(&a1, None, "org.example.gone"), json!({})),
        (key(&a1, None, "org.example.gone_by_put"), json!({})),
        (key(&a1, None, "org.example.deleted_before"), json!({})),
        (key(&a1, None, "org.example.before"), json!({"back": true})),
        (
            key(&a1, Some(&shared_room), "m.tag"),
            json!({"tags": {"u.work": {"order": 0.75}}}),
        ),
        (key(&a1, Some(&own_rooms[0]), "m.tag"), json!({"tags": {}})),
        (key(&a1, Some(&own_rooms[0]), "org.example.room_gone"), json!({})),
    ];
    for (k, v) in expect {
        assert_eq!(want_a.get(&k), Some(&v), "Synapse reports for {k:?}");
    }
    assert!(want_a[&key(&a1, Some(&shared_room), "m.fully_read")]["event_id"].is_string());
    // Push rules: a2 (n = 1) added its override rule and disabled `.m.rule.message`.
    let rules = &want_a[&key(&a2, None, "m.push_rules")]["global"];
    let rule = |kind: &str, id: &str| {
        rules[kind]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["rule_id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} rule {id} in {rules}"))
    };
    assert_eq!(
        rule("override", "org.example.quiet")["conditions"][0]["pattern"],
        "quiet1"
    );
    assert_eq!(rule("underride", ".m.rule.message")["enabled"], false);
    assert!(want_a.keys().any(|k| k.0 == shared.user_id) && want_b.keys().any(|k| k.0 == shared.user_id));
    assert!(want_a.keys().any(|k| k.0 == A_SENDER));

    // The tables say the same as the client API (the relay's model of Synapse's writes);
    // m.push_rules is not in them.
    for (name, want, interested) in [
        ("A", &want_a, interested_a as fn(&str) -> bool),
        ("B", &want_b, interested_b),
    ] {
        let tables = db.final_state(interested).await;
        let mut want = want.clone();
        want.retain(|k, _| k.2 != "m.push_rules");
        assert!(
            tables == want,
            "for {name}'s users, Synapse's tables (got) and its client API (want) disagree:\n{}",
            diff(&tables, &want)
        );
    }

    for (name, receiver, want) in [("A", &a, &want_a), ("B", &b, &want_b)] {
        let ok = receiver.wait_for(WAIT, |got| got == want).await;
        assert!(
            ok,
            "appservice {name} differs from what Synapse's client API reports (got, want):\n{}{}\nrelay log:\n{}\n{}",
            diff(&receiver.state(), want),
            histories(receiver, want),
            tail(&relay.log_text(), 80),
            synapse.log_tail(40)
        );
    }
    let count = |r: &RecordingAppservice, ours: bool| {
        r.transactions()
            .iter()
            .filter(|t| t.txn_id.starts_with("msc3682-") == ours)
            .count()
    };
    eprintln!(
        "[{}] receivers match after {:?}: A {} keys in {} relay transactions, B {} keys in {}",
        server.label,
        started.elapsed(),
        want_a.len(),
        count(&a, true),
        want_b.len(),
        count(&b, true)
    );

    // Synapse pushed its own transactions (room events) to the same receivers, C included; the
    // relay's ids are never numeric, so the two cannot clash.
    for (name, receiver) in [("A", &a), ("B", &b), ("C", &c)] {
        let deadline = std::time::Instant::now() + WAIT;
        while !receiver.transactions().iter().any(|t| is_synapse_txn(&t.txn_id)) {
            assert!(
                std::time::Instant::now() < deadline,
                "Synapse never pushed a transaction to {name}:\n{}",
                synapse.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in receiver.transactions() {
            assert!(
                is_synapse_txn(&t.txn_id) || t.txn_id.starts_with("msc3682-"),
                "unexpected txnId {} at {name}",
                t.txn_id
            );
        }
        assert_eq!(receiver.bad_auth(), 0, "{name} got a request without its hs_token");
    }
    eprintln!(
        "[{}] Synapse's own transactions: A {}, B {}, C {}",
        server.label,
        count(&a, false),
        count(&b, false),
        count(&c, false)
    );
    // Nothing for the appservice that did not opt in, nor for the user of no appservice.
    assert!(
        c.state().is_empty() && !c.transactions().iter().any(|t| t.txn_id.starts_with("msc3682-")),
        "the appservice that did not opt in received account data: {:?}",
        c.state().keys().collect::<Vec<_>>()
    );
    for receiver in [&a, &b] {
        assert!(
            !receiver
                .state()
                .keys()
                .any(|k| k.0 == nobody.user_id || k.0 == c1.user_id),
            "account data of a user of no opted-in appservice was sent"
        );
    }

    assert_eq!(relay.terminate(), Some(0), "SIGTERM exits 0:\n{}", relay.log_text());
    drop(synapse);
    db.drop_slot().await;
    eprintln!("[{}] done after {:?}", server.label, started.elapsed());
}

/// `run` on `files`, once it streams.
async fn start_relay_reading(files: &RelayFiles) -> crate::support::RelayProcess {
    let relay = files.spawn_run();
    assert!(
        crate::support::wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(30)).await,
        "relay did not start streaming:\n{}",
        relay.log_text()
    );
    relay
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

mod pg15_local {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_against_real_synapse() {
        super::relay_against_real_synapse(super::pg15()).await
    }
}

mod pg17_container {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_against_real_synapse() {
        super::relay_against_real_synapse(super::pg17()).await
    }
}
