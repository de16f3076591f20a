//! Delivery to real registrations keeps going: a `url` with a trailing `/`, appservices that cap
//! request bodies, and a worker that dies.

use std::time::Duration;

use synapse_account_data_relay::delivery::worker::TEST_PANIC_ON_TYPE_ENV;
use synapse_account_data_relay::testkit::free_port;
use synapse_account_data_relay::testkit::receiver::{PushRulesApi, ReceiverMode, RecordingAppservice};
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::on_both_servers;
use crate::support::scenario::*;
use crate::support::{RegistrationSpec, RelayFiles, Server, TestDb, diff, text, wait_for_log, wait_until_live};

/// GET `url`: status and body.
async fn get(url: &str) -> (u16, String) {
    synapse_account_data_relay::delivery::worker::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// An axum receiver registered as `http://127.0.0.1:PORT/` (as Synapse accepts it): the relay
/// must PUT `/_matrix/app/v1/transactions/…`, not `//_matrix/…` (which axum answers 404).
async fn trailing_slash_in_the_registration_url_is_ignored(server: &'static Server) {
    let db = TestDb::new(server).await;
    let a = RecordingAppservice::start("hs_token_a").await.unwrap();
    let url = format!("{}/", a.url());
    let files = RelayFiles::new(
        &db,
        &[RegistrationSpec {
            id: "a",
            url: Some(&url),
            hs_token: "hs_token_a",
            sender_localpart: "abot",
            user_regexes: &["@a_.*"],
            opt_in: true,
        }],
        "",
    );
    let out = files.command("setup", &[]);
    assert!(out.status.success(), "setup: {}", text(&out));
    let relay = files.spawn_run();
    assert!(
        wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(20)).await,
        "{}",
        relay.log_text()
    );
    w::set_global(
        &db.client,
        "@a_1:example.org",
        "m.direct",
        r#"{"@b:example.org":["!r:example.org"]}"#,
    )
    .await
    .unwrap();
    let got = a
        .wait_for(WAIT, |st| {
            st.contains_key(&("@a_1:example.org".into(), None, "m.direct".into()))
        })
        .await;
    assert!(got, "attempts: {}\n{}", a.attempts(), relay.log_text());
    drop(relay);
    db.drop_slot().await;
}

/// An appservice that answers 413 to bodies over 200 kB, and a relay with a 64 kB budget: a
/// batch of 30 values of 10 kB (300 kB together) is split into transactions within the budget,
/// and a 100 kB value, larger than the budget by itself, goes alone, logged (key and size, never
/// the content) and counted.
async fn transactions_stay_within_the_byte_budget(server: &'static Server) {
    const BUDGET: usize = 64 << 10;
    let port = free_port().unwrap();
    let s = prepare_with(
        server,
        &[("max_transaction_bytes", "64kB".into())],
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    s.a.set_mode(ReceiverMode::RejectOver(200_000));
    let relay = start_relay(&s).await;
    // One commit: the changes reach the worker together.
    let c = s.db.connect().await;
    c.batch_execute("BEGIN").await.unwrap();
    for i in 0..30 {
        let value = format!("{{\"n\":{i},\"v\":\"{}\"}}", "v".repeat(10_000));
        w::set_global(&c, "@a_1:example.org", &format!("org.example.t{i}"), &value)
            .await
            .unwrap();
    }
    let huge = format!("{{\"v\":\"HUGE{}\"}}", "h".repeat(100_000));
    w::set_global(&c, "@a_2:example.org", "org.example.huge", &huge)
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let want = s.db.final_state(interested_a).await;
    assert_eq!(want.len(), 31);
    assert!(
        s.a.wait_for(WAIT, |got| *got == want).await,
        "{}\nrejected as too large: {}\n{}",
        diff(&s.a.state(), &want),
        s.a.rejected_too_large(),
        relay.log_text()
    );
    let sizes = s.a.accepted_sizes();
    let over: Vec<usize> = sizes.iter().copied().filter(|n| *n > BUDGET).collect();
    assert_eq!(over.len(), 1, "only the huge value exceeds the budget: {sizes:?}");
    assert!(over[0] > 100_000);
    let huge_alone = s.a.transactions().iter().any(|t| {
        let events = synapse_account_data_relay::testkit::receiver::events_of(&t.body);
        events.len() == 1 && events[0].0.2 == "org.example.huge"
    });
    assert!(huge_alone, "the huge value is sent alone");
    assert!(sizes.len() > 300_000 / BUDGET, "split: {sizes:?}");
    assert_eq!(s.a.rejected_too_large(), 0, "no body over the budget but the huge one");
    let log = relay.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("larger than delivery.max_transaction_bytes"))
        .unwrap_or_else(|| panic!("the oversized entry is logged:\n{log}"));
    assert!(
        line.contains("appservice=a") && line.contains("@a_2:example.org") && line.contains("org.example.huge"),
        "{line}"
    );
    assert!(!log.contains("HUGE"), "content never logged");
    let (_, metrics) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "synapse_account_data_relay_appservice_oversized_entries_total{appservice=\"a\"} 1"),
        "{metrics}"
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// A worker that panics (told to by the test-only environment variable, in the middle of a live
/// batch) is started again: what it had in flight still arrives, later changes too, and the
/// restart shows in the log, `/metrics` and `/readyz`.
async fn a_worker_that_panics_is_restarted_and_reported(server: &'static Server) {
    let port = free_port().unwrap();
    let s = prepare_with(server, &[], &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    let relay = s
        .files
        .spawn_run_with(&[(TEST_PANIC_ON_TYPE_ENV, "org.example.panic")], &[]);
    assert!(
        wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(20)).await,
        "{}",
        relay.log_text()
    );
    w::set_global(&s.db.client, "@a_1:example.org", "org.example.panic", r#"{"n":1}"#)
        .await
        .unwrap();
    assert!(
        wait_for_log(&relay, "delivery worker died", Duration::from_secs(20)).await,
        "{}",
        relay.log_text()
    );
    let base = format!("http://127.0.0.1:{port}");
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("delivery worker of appservice a died"), "{body}");
    write_randomly(&s, 3, 30, 1).await;
    assert_final_states(&s, &relay).await;
    assert!(
        s.a.state()
            .contains_key(&("@a_1:example.org".into(), None, "org.example.panic".into())),
        "the change in flight when the worker died arrives"
    );
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "synapse_account_data_relay_appservice_worker_restarts_total{appservice=\"a\"} 1"),
        "{metrics}"
    );
    let log = relay.log_text();
    assert!(
        log.contains("org.example.panic") && log.contains("appservice=a"),
        "{log}"
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// A change to `user`'s push rules, as Synapse writes it.
async fn change_push_rules(c: &tokio_postgres::Client, user: &str) {
    c.execute(
        "INSERT INTO push_rules_stream (stream_id, event_stream_ordering, user_id, rule_id, op) \
         VALUES ((SELECT coalesce(max(stream_id), 0) + 1 FROM push_rules_stream), 0, $1, 'global/override/.m.rule.test', 'ENABLE')",
        &[&user],
    )
    .await
    .unwrap();
}

fn push_rules_key(user: &str) -> (String, Option<String>, String) {
    (user.into(), None, "m.push_rules".into())
}

/// `synapse.client_url` answers nothing (`push_rules = true`): A's other account data still
/// arrives, the failing fetch trips `retention.max_failing` like a failing delivery, and once the
/// client API answers the push rules arrive too.
async fn unreachable_client_api_blocks_no_other_account_data(server: &'static Server) {
    let port = free_port().unwrap();
    let s = prepare_with(
        server,
        &[],
        &format!(
            "[synapse]\nclient_url = \"http://127.0.0.1:{port}\"\n[appservices.a]\npush_rules = true\n\
             [retention]\nmax_failing = \"2s\"\n"
        ),
    )
    .await;
    let relay = start_relay(&s).await;
    // Live delivery is what the budget is about: wait until the first-opt-in backfill is over.
    wait_until_live(&relay, &["a"], WAIT).await;
    let c = s.db.connect().await;
    c.batch_execute("BEGIN").await.unwrap();
    change_push_rules(&c, "@a_1:example.org").await;
    w::set_global(&c, "@a_2:example.org", "m.direct", "{}").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    w::set_global(&s.db.client, "@a_2:example.org", "org.example.later", r#"{"n":2}"#)
        .await
        .unwrap();
    let got =
        s.a.wait_for(WAIT, |st| {
            st.contains_key(&("@a_2:example.org".into(), None, "m.direct".into()))
                && st.contains_key(&("@a_2:example.org".into(), None, "org.example.later".into()))
        })
        .await;
    assert!(got, "{}", relay.log_text());
    assert!(
        wait_for_log(&relay, "appservice over its retention budget", WAIT).await,
        "a failing push-rules fetch counts against retention.max_failing:\n{}",
        relay.log_text()
    );
    assert!(relay.log_text().contains("fetching push rules failed"));
    let api = PushRulesApi::start_on(([127, 0, 0, 1], port).into()).await.unwrap();
    let got =
        s.a.wait_for(WAIT, |st| st.contains_key(&push_rules_key("@a_1:example.org")))
            .await;
    assert!(got, "requests: {:?}\n{}", api.requests(), relay.log_text());
    assert_eq!(
        s.a.state()[&push_rules_key("@a_1:example.org")]["global"]["test_user"],
        "@a_1:example.org"
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// The client API answers 403 for one user and 200 for the others: that user is logged and
/// skipped, everything else arrives, and their next change of rules is fetched again.
async fn client_api_refusing_one_user_skips_only_that_user(server: &'static Server) {
    let api = PushRulesApi::start_on(([127, 0, 0, 1], 0).into()).await.unwrap();
    api.refuse("@a_1:example.org");
    let s = prepare_with(
        server,
        &[],
        &format!(
            "[synapse]\nclient_url = \"{}\"\n[appservices.a]\npush_rules = true\n",
            api.url()
        ),
    )
    .await;
    let relay = start_relay(&s).await;
    let c = s.db.connect().await;
    c.batch_execute("BEGIN").await.unwrap();
    change_push_rules(&c, "@a_1:example.org").await;
    change_push_rules(&c, "@a_2:example.org").await;
    w::set_global(&c, "@a_2:example.org", "m.direct", "{}").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let got =
        s.a.wait_for(WAIT, |st| {
            st.contains_key(&push_rules_key("@a_2:example.org"))
                && st.contains_key(&("@a_2:example.org".into(), None, "m.direct".into()))
        })
        .await;
    assert!(got, "requests: {:?}\n{}", api.requests(), relay.log_text());
    assert!(!s.a.state().contains_key(&push_rules_key("@a_1:example.org")));
    // The relay's output reaches the test a moment after it is written.
    wait_for_log(&relay, "refuses this user's push rules", WAIT).await;
    let log = relay.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refuses this user's push rules"))
        .unwrap_or_else(|| panic!("the refusal is logged:\n{log}"));
    assert!(line.contains("@a_1:example.org") && line.contains("403"), "{line}");
    // Skipped, not retried: one request for the refused user.
    w::set_global(&s.db.client, "@a_2:example.org", "org.example.after", "{}")
        .await
        .unwrap();
    assert!(
        s.a.wait_for(WAIT, |st| st.contains_key(&(
            "@a_2:example.org".into(),
            None,
            "org.example.after".into()
        )))
        .await
    );
    let asked = |u: &str| api.requests().iter().filter(|r| *r == u).count();
    assert_eq!(asked("@a_1:example.org"), 1, "{:?}", api.requests());
    // Their rules change again: fetched again.
    api.allow("@a_1:example.org");
    change_push_rules(&s.db.client, "@a_1:example.org").await;
    let got =
        s.a.wait_for(WAIT, |st| st.contains_key(&push_rules_key("@a_1:example.org")))
            .await;
    assert!(got, "requests: {:?}\n{}", api.requests(), relay.log_text());
    drop(relay);
    s.db.drop_slot().await;
}

on_both_servers!(
    unreachable_client_api_blocks_no_other_account_data,
    client_api_refusing_one_user_skips_only_that_user,
    trailing_slash_in_the_registration_url_is_ignored,
    transactions_stay_within_the_byte_budget,
    a_worker_that_panics_is_restarted_and_reported,
);
