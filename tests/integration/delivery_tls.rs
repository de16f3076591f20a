//! `https` appservice URLs are verified: the recording appservice sits behind a TLS-terminating
//! proxy with a certificate from a test CA. With `[delivery] ca_file` naming that CA, everything
//! arrives; without it, the system roots do not know the CA, so nothing does, and the relay says
//! why and keeps retrying.

use std::time::{Duration, Instant};

use synapse_account_data_relay::testkit::receiver::RecordingAppservice;
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::on_both_servers;
use crate::support::certs::{Digest, TestCerts};
use crate::support::tls_proxy::TlsProxy;
use crate::support::{RegistrationSpec, RelayFiles, RelayProcess, Server, TestDb, diff, text, wait_for_log};

const WAIT: Duration = Duration::from_secs(60);
const HS_TOKEN: &str = "hs_token_tls_7f3a9c";

fn interested(u: &str) -> bool {
    u.starts_with("@tls_")
}

struct Setup {
    db: TestDb,
    receiver: RecordingAppservice,
    proxy: TlsProxy,
    files: RelayFiles,
    _certs: TestCerts,
}

/// The receiver behind the proxy, registered as `https://localhost:<proxy port>`; with
/// `trust_test_ca`, relay.toml names the test CA as `[delivery] ca_file`.
async fn prepare(server: &'static Server, trust_test_ca: bool) -> Setup {
    let certs = TestCerts::generate(Digest::Sha256);
    let db = TestDb::new(server).await;
    let receiver = RecordingAppservice::start(HS_TOKEN).await.unwrap();
    let proxy = TlsProxy::start(&certs, receiver.addr()).await;
    let url = format!("https://localhost:{}", proxy.port());
    let delivery = if trust_test_ca {
        vec![("ca_file", toml::Value::from(certs.ca_cert.display().to_string()))]
    } else {
        vec![]
    };
    let files = RelayFiles::with_delivery(
        &db,
        &[RegistrationSpec {
            id: "tls",
            url: Some(&url),
            hs_token: HS_TOKEN,
            sender_localpart: "tlsbot",
            user_regexes: &["@tls_.*"],
            opt_in: true,
        }],
        &delivery,
        "",
    );
    let out = files.command("setup", &[]);
    assert!(out.status.success(), "setup: {}", text(&out));
    Setup {
        db,
        receiver,
        proxy,
        files,
        _certs: certs,
    }
}

async fn start_relay(s: &Setup) -> RelayProcess {
    let relay = s.files.spawn_run();
    assert!(
        wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(20)).await,
        "relay did not start streaming:\n{}",
        relay.log_text()
    );
    relay
}

/// Global and room account data and tags, for two interested users and one who is not.
async fn write_some(s: &Setup) {
    let c = &s.db.client;
    for user in ["@tls_1:example.org", "@tls_2:example.org", "@other:example.org"] {
        w::set_global(c, user, "m.direct", "{\"@bob:example.org\":[\"!dm:example.org\"]}")
            .await
            .unwrap();
        w::set_global(c, user, "org.example.config", "{\"n\":1}").await.unwrap();
        w::set_room(c, user, "!r:example.org", "m.fully_read", "{\"event_id\":\"$e1\"}")
            .await
            .unwrap();
        w::add_tag(c, user, "!r:example.org", "u.work", "{\"order\":0.5}")
            .await
            .unwrap();
    }
    w::delete_global(c, "@tls_1:example.org", "org.example.config")
        .await
        .unwrap();
    w::set_global(c, "@tls_2:example.org", "org.example.config", "{\"n\":2}")
        .await
        .unwrap();
}

/// With the test CA as `ca_file`, deliveries over https arrive, and the receiver ends with the
/// database's final state.
async fn https_appservice_with_ca_file_receives_everything(server: &'static Server) {
    let s = prepare(server, true).await;
    let mut relay = start_relay(&s).await;
    write_some(&s).await;
    let want = s.db.final_state(interested).await;
    assert!(!want.is_empty());
    assert!(
        s.receiver.wait_for(WAIT, |got| *got == want).await,
        "the appservice differs from the database:\n{}\nrelay log:\n{}",
        diff(&s.receiver.state(), &want),
        relay.log_text()
    );
    assert_eq!(s.receiver.bad_auth(), 0);
    assert!(s.proxy.handshakes() >= 1);
    assert_eq!(s.proxy.handshake_errors(), Vec::<String>::new());
    assert_eq!(relay.terminate(), Some(0), "SIGTERM exits 0:\n{}", relay.log_text());
    s.db.drop_slot().await;
}

/// Without `ca_file`, the system roots do not trust the test CA: nothing reaches the
/// appservice, and the relay logs the certificate error for it and retries, without the token.
async fn https_appservice_with_an_unknown_ca_receives_nothing(server: &'static Server) {
    let s = prepare(server, false).await;
    let relay = start_relay(&s).await;
    write_some(&s).await;
    // Wait until the relay failed at least three times, and then a couple of seconds more.
    let retry_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("appservice did not accept the transaction; retrying") && l.contains("tls"))
            .map(str::to_owned)
            .collect()
    };
    let deadline = Instant::now() + WAIT;
    while retry_lines(&relay.log_text()).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the relay did not retry the appservice three times:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let log = relay.log_text();
    assert_eq!(s.receiver.attempts(), 0, "a request got through:\n{log}");
    assert!(s.receiver.transactions().is_empty());
    assert_eq!(s.proxy.handshakes(), 0, "a TLS handshake completed:\n{log}");
    assert!(
        !s.proxy.handshake_errors().is_empty(),
        "the relay never reached the proxy:\n{log}"
    );
    let lines = retry_lines(&log);
    let first = &lines[0];
    assert!(
        first.contains("appservice=tls") && first.contains("invalid peer certificate: UnknownIssuer"),
        "the retry line names neither the appservice nor the certificate error:\n{first}"
    );
    assert!(!log.contains(HS_TOKEN), "the hs_token is in the log:\n{log}");
    drop(relay);
    s.db.drop_slot().await;
}

on_both_servers!(
    https_appservice_with_ca_file_receives_everything,
    https_appservice_with_an_unknown_ca_receives_nothing,
);
