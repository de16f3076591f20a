//! Micro-benchmarks of the relay's pure hot paths, one criterion group each:
//!
//! - `pgoutput_decode`: [`pgoutput::decode`] of one message of each kind a Synapse account-data
//!   transaction is made of: a Begin, a Commit, the Relation of Synapse's `account_data` table
//!   (`user_id text, account_data_type text, stream_id bigint, content text, instance_name text`,
//!   replica identity = its unique index), and an Insert and an Update of a row of that table with
//!   ~200 bytes of JSON content. The bytes are encoded by hand below, following the pgoutput
//!   protocol version 1 message formats. Throughput: messages.
//! - `row_mapper`: [`RowMapper::map`] of that decoded Update (and Insert) into an
//!   `AccountDataChange`, after the mapper was fed the Relation: column lookup, UTF-8 checks, JSON
//!   validation of the content, `Arc` allocations. Also an Update whose content is an unchanged
//!   TOAST value (no JSON to validate). Throughput: rows.
//! - `routing`: [`Router::route_into`] of one user id against 1 appservice × 1 namespace, and
//!   against 100 appservices × 50 namespaces (5,000 regexes of the shapes bridges register:
//!   prefixes, `[0-9]+` puppets, exact user ids, patterns without a server name), for a user id
//!   that one namespace matches and for one that none does. `routing/new_5000` is the one-off
//!   cost of [`Router::new`] for those 5,000 namespaces (run at start and on reload).
//!   Throughput: user ids routed (namespaces compiled for `new_5000`).
//! - `queue`: [`AppserviceQueue::push`] of N changes over K distinct keys (latest value wins per
//!   key), then one [`AppserviceQueue::take_batch`]`(100)`, for (N, K) = (1000, 100), (1000, 1000)
//!   and (100, 100). The changes are built outside the timed part. Throughput: changes pushed.
//! - `transaction`: [`build_body`] of a batch of 100 entries (global and room account data of 25
//!   users, ~200-byte contents) with [`FieldNames::Unstable`] and [`FieldNames::Both`]
//!   (throughput: entries), and [`transaction_id`] of the resulting body (SHA-256 of the body;
//!   throughput: body bytes).
//!
//! Run them all with `cargo bench --bench micro`; a quick pass with
//! `cargo bench --bench micro -- --warm-up-time 1 --measurement-time 2`; one group by giving a
//! filter, e.g. `cargo bench --bench micro -- routing`.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use synapse_account_data_relay::delivery::queue::AppserviceQueue;
use synapse_account_data_relay::delivery::transaction::{FieldNames, ResolvedEntry, build_body, transaction_id};
use synapse_account_data_relay::model::{AccountDataChange, AccountDataKey, ChangeContent, Lsn};
use synapse_account_data_relay::replication::pgoutput::{self, PgOutputMessage};
use synapse_account_data_relay::routing::{AppserviceInterest, Router};
use synapse_account_data_relay::synapse::rows::{RowMapper, RowOutcome};

// ---- pgoutput protocol version 1 encoders (the crate's own are test-only) ----

/// The OID PostgreSQL gave `account_data` in the example (any value works).
const ACCOUNT_DATA_OID: u32 = 16_531;
/// `text` and `int8` type OIDs.
const TEXT_OID: u32 = 25;
const INT8_OID: u32 = 20;
/// An LSN and commit time of the size a long-running server has.
const COMMIT_LSN: u64 = 0x16_B374_D848;
const COMMIT_TIME_MICROS: i64 = 817_000_000_000_042;
const XID: u32 = 48_213_907;

/// A NUL-terminated string.
fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// `'B'`: final LSN, commit time, xid.
fn encode_begin() -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(b'B');
    out.put_u64(COMMIT_LSN);
    out.put_i64(COMMIT_TIME_MICROS);
    out.put_u32(XID);
    out.freeze()
}

/// `'C'`: flags, commit LSN, end LSN, commit time.
fn encode_commit() -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(b'C');
    out.put_u8(0);
    out.put_u64(COMMIT_LSN);
    out.put_u64(COMMIT_LSN + 0x30);
    out.put_i64(COMMIT_TIME_MICROS);
    out.freeze()
}

/// `'R'` for `public.account_data`, replica identity = the unique index on
/// `(user_id, account_data_type)`: those two columns carry the key flag.
fn encode_account_data_relation() -> Bytes {
    let columns: [(u8, &str, u32); 5] = [
        (1, "user_id", TEXT_OID),
        (1, "account_data_type", TEXT_OID),
        (0, "stream_id", INT8_OID),
        (0, "content", TEXT_OID),
        (0, "instance_name", TEXT_OID),
    ];
    let mut out = BytesMut::new();
    out.put_u8(b'R');
    out.put_u32(ACCOUNT_DATA_OID);
    put_cstr(&mut out, "public");
    put_cstr(&mut out, "account_data");
    out.put_u8(b'i');
    out.put_u16(columns.len() as u16);
    for (flags, name, type_oid) in columns {
        out.put_u8(flags);
        put_cstr(&mut out, name);
        out.put_u32(type_oid);
        out.put_i32(-1);
    }
    out.freeze()
}

/// One column of a TupleData: `'n'` for `None`, `'t'` + length + text otherwise.
fn put_text_column(out: &mut BytesMut, value: Option<&str>) {
    match value {
        None => out.put_u8(b'n'),
        Some(v) => {
            out.put_u8(b't');
            out.put_i32(v.len() as i32);
            out.put_slice(v.as_bytes());
        }
    }
}

/// The `account_data` row of the benchmarks; `content == None` is an unchanged TOAST value.
fn put_account_data_tuple(out: &mut BytesMut, content: Option<&str>) {
    out.put_u16(5);
    put_text_column(out, Some("@alice:example.org"));
    put_text_column(out, Some("m.direct"));
    put_text_column(out, Some("4711"));
    match content {
        Some(c) => put_text_column(out, Some(c)),
        None => out.put_u8(b'u'),
    }
    // Synapse leaves instance_name NULL on a single-process homeserver.
    put_text_column(out, None);
}

/// `'I'`: relation OID, `'N'`, the new row.
fn encode_insert(content: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(b'I');
    out.put_u32(ACCOUNT_DATA_OID);
    out.put_u8(b'N');
    put_account_data_tuple(&mut out, Some(content));
    out.freeze()
}

/// `'U'` without an old row (the key did not change): relation OID, `'N'`, the new row.
fn encode_update(content: Option<&str>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(b'U');
    out.put_u32(ACCOUNT_DATA_OID);
    out.put_u8(b'N');
    put_account_data_tuple(&mut out, content);
    out.freeze()
}

/// ~200 bytes of compact JSON, as Synapse stores an `m.direct`.
fn direct_content() -> String {
    let content = concat!(
        r#"{"@bob:example.org":["!GtIfdsfQtQIgbQSxwJ:example.org","!qPewotXpIctQySmUfg:example.org"],"#,
        r#""@carol:matrix.org":["!kBTDHSTSiBRmEDrUnD:example.org"],"#,
        r#""@telegram_123456789:example.org":["!xAbCdEfGhIjKlMnOpQ:example.org"]}"#
    );
    assert!(
        (180..=240).contains(&content.len()),
        "content is {} bytes",
        content.len()
    );
    content.to_owned()
}

fn decoded(bytes: &Bytes) -> PgOutputMessage {
    pgoutput::decode(bytes.clone()).expect("the benchmark's messages are valid pgoutput")
}

fn bench_pgoutput_decode(c: &mut Criterion) {
    let content = direct_content();
    let messages = [
        ("begin", encode_begin()),
        ("commit", encode_commit()),
        ("relation_account_data", encode_account_data_relation()),
        ("insert_account_data_200b", encode_insert(&content)),
        ("update_account_data_200b", encode_update(Some(&content))),
    ];
    // Check once that every message decodes to the kind it claims to be.
    for (name, bytes) in &messages {
        let kind = decoded(bytes).kind().to_lowercase();
        assert!(name.starts_with(&kind), "{name} decoded as {kind}");
    }
    let mut g = c.benchmark_group("pgoutput_decode");
    g.throughput(Throughput::Elements(1));
    for (name, bytes) in &messages {
        // `decode` takes its input by value: cloning `Bytes` is a reference-count increment.
        g.bench_function(*name, |b| b.iter(|| pgoutput::decode(black_box(bytes.clone()))));
    }
    g.finish();
}

fn bench_row_mapper(c: &mut Criterion) {
    let content = direct_content();
    let relation = decoded(&encode_account_data_relation());
    let rows = [
        ("update_account_data_200b", decoded(&encode_update(Some(&content)))),
        ("insert_account_data_200b", decoded(&encode_insert(&content))),
        ("update_account_data_unchanged_toast", decoded(&encode_update(None))),
    ];
    let mut mapper = RowMapper::new();
    mapper
        .map(&relation, Lsn(COMMIT_LSN), XID)
        .expect("the account_data Relation is accepted");
    for (name, row) in &rows {
        let outcome = mapper.map(row, Lsn(COMMIT_LSN), XID);
        assert!(matches!(outcome, Ok(RowOutcome::Change(_))), "{name}: {outcome:?}");
    }
    let mut g = c.benchmark_group("row_mapper");
    g.throughput(Throughput::Elements(1));
    for (name, row) in &rows {
        g.bench_function(*name, |b| {
            b.iter(|| mapper.map(black_box(row), black_box(Lsn(COMMIT_LSN)), black_box(XID)))
        });
    }
    g.finish();
}

// ---- routing ----

/// Namespace `j` of appservice `i`, in one of the shapes bridges register.
fn namespace(i: usize, j: usize) -> String {
    match j % 5 {
        // mautrix-telegram style puppets: a prefix, any localpart.
        0 => format!("@telegram{i}_{j}_.*:example\\.org"),
        // mautrix-discord style puppets: numeric ids.
        1 => format!("@_discord{i}_{j}_[0-9]+:example\\.org"),
        // An exact user id (a bot or a relay user), unescaped dot as many registrations have it.
        2 => format!("@relaybot{i}_{j}:example.org"),
        // A prefix without a server name.
        3 => format!("@irc{i}_{j}_.*"),
        // An exact user id with `$`.
        _ => format!("@whatsapp{i}_{j}_bot:example\\.org$"),
    }
}

fn appservices(count: usize, namespaces_each: usize) -> Vec<AppserviceInterest> {
    (0..count)
        .map(|i| AppserviceInterest {
            id: format!("bridge{i}"),
            sender_user_id: format!("@bridge{i}bot:example.org"),
            user_regexes: (0..namespaces_each).map(|j| namespace(i, j)).collect(),
            source: PathBuf::from(format!("/etc/matrix-synapse/appservices/bridge{i}.yaml")),
        })
        .collect()
}

fn bench_routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));

    let single = Router::new(&appservices(1, 1)).expect("the namespace compiles");
    let many_list = appservices(100, 50);
    let many = Router::new(&many_list).expect("the 5,000 namespaces compile");
    let matching = "@_discord42_16_123456789012345678:example.org";
    let single_matching = "@telegram0_0_alice:example.org";
    let non_matching = "@alice:example.org";
    let mut out = Vec::new();
    for (router, user, expected) in [
        (&single, single_matching, vec![0]),
        (&single, non_matching, vec![]),
        (&many, matching, vec![42]),
        (&many, non_matching, vec![]),
    ] {
        router.route_into(user, &mut out);
        assert_eq!(out, expected, "{user}");
    }

    for (name, router, user) in [
        ("1x1_match", &single, single_matching),
        ("1x1_no_match", &single, non_matching),
        ("100x50_match", &many, matching),
        ("100x50_no_match", &many, non_matching),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                router.route_into(black_box(user), &mut out);
                out.len()
            })
        });
    }

    // Building the 5,000-namespace router takes far longer than one routing: few samples, and
    // the throughput counts namespaces compiled.
    g.sample_size(10);
    g.throughput(Throughput::Elements(
        many_list.iter().map(|a| a.user_regexes.len() as u64).sum(),
    ));
    g.bench_function("new_5000", |b| b.iter(|| Router::new(black_box(&many_list))));
    g.finish();
}

// ---- coalescing ----

/// Key `k`: a mix of global account data and room account data, spread over users.
fn key(k: usize) -> AccountDataKey {
    const GLOBAL_TYPES: [&str; 3] = ["m.direct", "im.vector.setting.breadcrumbs", "m.push_rules"];
    let user = format!("@user{}:example.org", k / 4);
    match k % 4 {
        3 => AccountDataKey {
            user_id: user.into(),
            room_id: Some(format!("!room{k}:example.org").into()),
            data_type: "m.fully_read".into(),
        },
        t => AccountDataKey {
            user_id: user.into(),
            room_id: None,
            data_type: GLOBAL_TYPES[t].into(),
        },
    }
}

/// `n` changes in commit order, cycling over `keys` keys.
fn changes(n: usize, keys: usize) -> Vec<AccountDataChange> {
    let keys: Vec<AccountDataKey> = (0..keys).map(key).collect();
    let content: Arc<str> = direct_content().into();
    (0..n)
        .map(|i| AccountDataChange {
            key: keys[i % keys.len()].clone(),
            content: ChangeContent::Json(content.clone()),
            commit_lsn: Lsn(COMMIT_LSN + 0x100 * i as u64),
            xid: XID + i as u32,
        })
        .collect()
}

fn bench_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    for (n, k) in [(1000, 100), (1000, 1000), (100, 100)] {
        let input = changes(n, k);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("push_{n}_over_{k}_keys_take_batch_100"), |b| {
            b.iter_batched(
                || input.clone(),
                |changes| {
                    let mut q = AppserviceQueue::new();
                    for change in changes {
                        q.push(change);
                    }
                    let batch = q.take_batch(100);
                    // Returned, so that dropping them is not timed.
                    (q, batch)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

// ---- transaction bodies ----

fn bench_transaction(c: &mut Criterion) {
    let content = direct_content();
    // 100 entries: 25 users × (3 global types + 1 room), as a full batch of the queue holds.
    let keys: Vec<AccountDataKey> = (0..100).map(key).collect();
    let entries: Vec<ResolvedEntry<'_>> = keys
        .iter()
        .map(|key| ResolvedEntry { key, content: &content })
        .collect();
    let body = build_body(&entries, FieldNames::Unstable);
    serde_json::from_slice::<serde_json::Value>(&body).expect("the body is JSON");

    let mut g = c.benchmark_group("transaction");
    g.throughput(Throughput::Elements(entries.len() as u64));
    for (name, fields) in [
        ("build_body_100_unstable", FieldNames::Unstable),
        ("build_body_100_both", FieldNames::Both),
    ] {
        g.bench_function(name, |b| b.iter(|| build_body(black_box(&entries), fields)));
    }
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function(format!("transaction_id_{}b_body", body.len()), |b| {
        b.iter(|| {
            transaction_id(
                black_box(1_722_000_000),
                black_box(Lsn(COMMIT_LSN)),
                black_box(Lsn(COMMIT_LSN + 0x6300)),
                black_box(&body),
            )
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_pgoutput_decode,
    bench_row_mapper,
    bench_routing,
    bench_queue,
    bench_transaction
);
criterion_main!(benches);
