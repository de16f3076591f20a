//! Running the relay the way an admin does: systemd's notify protocol, the operations endpoint
//! (`/metrics`, `/healthz`, `/readyz`, `/status.json`), `status`, SIGHUP reloads, SIGTERM, and
//! no secret anywhere in what the relay prints or serves.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use synapse_account_data_relay::testkit::free_port;
use synapse_account_data_relay::testkit::receiver::{ReceiverMode, RecordingAppservice};
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::support::scenario::*;
use crate::support::{
    RegistrationSpec, RelayFiles, Server, TestDb, diff, eventually, relay_binary, text, wait_for_log,
};
use crate::{on_both_own_servers, on_both_servers};

/// A Unix datagram socket standing in for systemd's notify socket: collects every line sent.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, st) = (lines.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    l.lock().unwrap().extend(text.lines().map(str::to_owned));
                }
            }
        });
        NotifySocket {
            _dir: dir,
            path,
            lines,
            stop,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on the notify socket; got: {:?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// GET `url`: status, content type, body.
async fn get(url: &str) -> Result<(u16, String, String), String> {
    synapse_account_data_relay::delivery::worker::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((status, ct, resp.text().await.map_err(|e| e.to_string())?))
}

/// A scrape: `name{labels}` → value. Checks the text format strictly on the way: every sample
/// line is `name{labels} value`, every family has HELP and TYPE lines, and an independent parser
/// (`prometheus-parse`) reads the same number of samples.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let sample = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? (\S+)$"#,
    )
    .unwrap();
    let mut typed = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let c = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not a sample line: {line:?}\n{text}"));
        let name = &c[1];
        let family_typed = typed.iter().any(|t| {
            name == t
                || [
                    name.strip_suffix("_bucket"),
                    name.strip_suffix("_sum"),
                    name.strip_suffix("_count"),
                ]
                .into_iter()
                .flatten()
                .any(|base| base == t)
        });
        assert!(family_typed, "{name} has no TYPE line:\n{text}");
        let value: f64 = c[4].parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(format!("{}{}", name, c.get(2).map(|m| m.as_str()).unwrap_or("")), value);
    }
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("prometheus-parse");
    assert!(!parsed.samples.is_empty());
    out
}

fn metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(&format!("synapse_account_data_relay_{name}"))
        .unwrap_or_else(|| panic!("no {name} in {m:#?}"))
}

async fn scrape(base: &str) -> BTreeMap<String, f64> {
    let (status, ct, body) = get(&format!("{base}/metrics")).await.expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    parse_metrics(&body)
}

/// The txnId's last LSN (`msc3682-<first>-<last>-<hash>`).
fn txn_last_lsn(txn_id: &str) -> u64 {
    let parts: Vec<&str> = txn_id.split('-').collect();
    u64::from_str_radix(parts[2], 16).unwrap_or_else(|_| panic!("txnId {txn_id}"))
}

/// READY, STATUS and WATCHDOG on a notify socket; `/metrics` that parses and moves as the
/// end-to-end writes go through; `/healthz`, `/readyz`, `/status.json` and `status`; SIGTERM
/// while a request is in flight: it finishes, the final position is confirmed, STOPPING, exit 0.
async fn systemd_metrics_status_and_sigterm(server: &'static Server) {
    let port = free_port().unwrap();
    let s = prepare_with(
        server,
        &[],
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[shutdown]\ntimeout = \"8s\"\n"),
    )
    .await;
    let notify = NotifySocket::new();
    let socket = notify.path.display().to_string();
    let mut relay = s
        .files
        .spawn_run_with(&[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")], &[]);
    notify.wait_for("READY=1", |l| l == "READY=1").await;
    assert!(
        relay.log_text().contains("streaming account-data changes"),
        "READY before streaming:\n{}",
        relay.log_text()
    );
    let status = notify
        .wait_for("a STATUS line", |l| l.starts_with("STATUS=streaming from slot"))
        .await;
    assert!(status.contains("appservices up 2/2"), "{status}");
    notify.wait_for("WATCHDOG=1", |l| l == "WATCHDOG=1").await;

    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);
    assert!(
        eventually(Duration::from_secs(20), || async {
            get(&format!("{base}/readyz"))
                .await
                .map(|r| r.0 == 200)
                .unwrap_or(false)
        })
        .await,
        "never ready: {:?}",
        get(&format!("{base}/readyz")).await
    );
    let before = scrape(&base).await;
    assert_eq!(metric(&before, "ready"), 1.0);
    assert_eq!(metric(&before, "replication_connected"), 1.0);
    let (_, ct, om) = {
        let client = reqwest::Client::new();
        let r = client
            .get(format!("{base}/metrics"))
            .header("accept", "application/openmetrics-text; version=1.0.0")
            .send()
            .await
            .unwrap();
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        (r.status().as_u16(), ct, r.text().await.unwrap())
    };
    assert!(
        ct.starts_with("application/openmetrics-text") && om.ends_with("# EOF\n"),
        "{ct}"
    );

    // Appservices start in recording mode (resending what the slot streams again with current
    // values); latency is observed for live deliveries, so write once they are live.
    assert!(
        eventually(Duration::from_secs(30), || {
            let base = base.clone();
            async move {
                let m = scrape(&base).await;
                metric(&m, "appservice_recording{appservice=\"a\"}") == 0.0
                    && metric(&m, "appservice_recording{appservice=\"b\"}") == 0.0
            }
        })
        .await,
        "not live:\n{}",
        relay.log_text()
    );
    write_randomly(&s, rand::random(), 80, 2).await;
    assert_final_states(&s, &relay).await;
    let sent = |m: &BTreeMap<String, f64>, a: &str| {
        metric(m, &format!("appservice_transactions_sent_total{{appservice=\"{a}\"}}"))
    };
    let mut after = scrape(&base).await;
    assert!(
        eventually(Duration::from_secs(20), || {
            let base = base.clone();
            async move {
                let m = scrape(&base).await;
                metric(&m, "appservice_pending_keys{appservice=\"a\"}") == 0.0
                    && metric(&m, "appservice_pending_keys{appservice=\"b\"}") == 0.0
                    && metric(&m, "slot_retained_wal_bytes") > 0.0
            }
        })
        .await,
        "{after:#?}"
    );
    after = scrape(&base).await;
    for a in ["a", "b"] {
        assert!(sent(&after, a) > sent(&before, a), "{a}: {after:#?}");
        assert!(metric(&after, &format!("appservice_sent_bytes_total{{appservice=\"{a}\"}}")) > 0.0);
        assert_eq!(metric(&after, &format!("appservice_up{{appservice=\"{a}\"}}")), 1.0);
        assert_eq!(
            metric(&after, &format!("appservice_recording{{appservice=\"{a}\"}}")),
            0.0
        );
        let count = metric(
            &after,
            &format!("commit_to_ack_latency_seconds_count{{appservice=\"{a}\"}}"),
        );
        assert!(count >= 1.0, "{a}: no latency observed: {after:#?}");
        let inf = metric(
            &after,
            &format!("commit_to_ack_latency_seconds_bucket{{appservice=\"{a}\",le=\"+Inf\"}}"),
        );
        assert_eq!(inf, count);
    }
    assert!(
        metric(&after, "replication_received_position_bytes") > metric(&before, "replication_received_position_bytes")
    );
    assert!(
        metric(&after, "replication_confirmed_position_bytes")
            > metric(&before, "replication_confirmed_position_bytes")
    );
    assert!(!after.keys().any(|k| k.contains("appservice=\"c\"")), "C is not served");

    let (code, ct, body) = get(&format!("{base}/status.json")).await.unwrap();
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["ready"], true, "{body}");
    assert_eq!(st["appservices"].as_array().unwrap().len(), 2, "{body}");

    // `status`: the table and --json, from the database and this relay's endpoint.
    let out = s.files.command("status", &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for needle in [
        "streaming (walsender pid",
        "ready, streaming",
        "APPSERVICE",
        "up",
        "live",
    ] {
        assert!(t.contains(needle), "{needle:?} missing:\n{t}");
    }
    let out = s.files.command("status", &["--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(j["healthy"], true, "{j}");
    assert_eq!(j["slot"]["active"], true, "{j}");
    assert_eq!(j["relay"]["appservices"][0]["id"], "a", "{j}");

    // SIGTERM while a request is in flight: it finishes, and its commit is confirmed.
    s.a.set_mode(ReceiverMode::Delay(Duration::from_millis(1500)));
    let (accepted, attempts) = (s.a.transactions().len(), s.a.attempts());
    w::set_global(&s.db.client, "@a_1:example.org", "org.example.last", r#"{"last":true}"#)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async { s.a.attempts() > attempts }).await,
        "no request for the last change"
    );
    let code = relay.terminate();
    assert_eq!(code, Some(0), "SIGTERM exits 0:\n{}", relay.log_text());
    let txns = s.a.transactions();
    assert!(
        txns.len() > accepted,
        "the request in flight was not allowed to finish:\n{}",
        relay.log_text()
    );
    let last = txns.last().unwrap();
    assert!(last.body.to_string().contains("org.example.last"), "{:?}", last.body);
    let (confirmed, _) = s.db.slot_position().await;
    assert!(
        confirmed > txn_last_lsn(&last.txn_id),
        "the final status did not confirm the delivered commit ({:X} ≤ {}):\n{}",
        confirmed,
        last.txn_id,
        relay.log_text()
    );
    notify.wait_for("STOPPING=1", |l| l == "STOPPING=1").await;
    assert!(relay.log_text().contains("replication stopped"), "{}", relay.log_text());
    s.db.drop_slot().await;
}

/// SIGTERM while an appservice hangs: the relay gives up after `shutdown.timeout`, exits 0, and
/// does not confirm the undelivered change, which the next run delivers.
async fn sigterm_gives_up_on_a_hanging_appservice(server: &'static Server) {
    let s = prepare_with(
        server,
        &[("request_timeout", "60s".into())],
        "[shutdown]\ntimeout = \"1s\"\n",
    )
    .await;
    let mut relay = start_relay(&s).await;
    s.a.set_mode(ReceiverMode::Hang);
    let attempts = s.a.attempts();
    w::set_global(&s.db.client, "@a_1:example.org", "org.example.hung", r#"{"n":1}"#)
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || async { s.a.attempts() > attempts }).await);
    let started = Instant::now();
    assert_eq!(relay.terminate(), Some(0), "{}", relay.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(relay.log_text().contains("given up"), "{}", relay.log_text());
    s.a.set_mode(ReceiverMode::Accept);
    let relay = start_relay(&s).await;
    let key = ("@a_1:example.org".to_owned(), None, "org.example.hung".to_owned());
    assert!(
        s.a.wait_for(WAIT, |st| st.contains_key(&key)).await,
        "the change abandoned at shutdown was lost:\n{}",
        relay.log_text()
    );
    drop(relay);
    s.db.drop_slot().await;
}

fn edit(path: PathBuf, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, f(text)).unwrap();
}

async fn active_pid(db: &TestDb) -> Option<i32> {
    db.client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0)
}

/// SIGHUP: bad registration and relay config files are refused with what was wrong and the
/// running configuration keeps delivering; a good reload changes A's URL and token, adds D (with
/// its first-opt-in backfill), opts B out, and reports a restart-only change, all on the same
/// replication connection.
async fn sighup_reloads_without_dropping_the_connection(server: &'static Server) {
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    w::set_global(&s.db.client, "@a_1:example.org", "m.direct", r#"{"v":1}"#)
        .await
        .unwrap();
    w::set_global(&s.db.client, "@d_1:example.org", "m.direct", r#"{"d":1}"#)
        .await
        .unwrap();
    let key_a = ("@a_1:example.org".to_owned(), None, "m.direct".to_owned());
    assert!(
        s.a.wait_for(WAIT, |st| st.get(&key_a).is_some_and(|v| v["v"] == 1))
            .await
    );
    let pid = active_pid(&s.db).await;
    assert!(pid.is_some());
    let dir = s.files.path().to_owned();

    // A registration whose regex does not compile.
    let good_a = std::fs::read_to_string(dir.join("a.yaml")).unwrap();
    edit(dir.join("a.yaml"), |t| t.replace("'@a_.*'", "'@a_(.*'"));
    relay.signal("HUP");
    assert!(
        wait_for_log(&relay, "reload failed", Duration::from_secs(20)).await,
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(
        log.contains("a.yaml") && log.contains("@a_(.*"),
        "the error names the file and the pattern:\n{log}"
    );
    // A relay config with a mistake.
    std::fs::write(dir.join("a.yaml"), &good_a).unwrap();
    let good_toml = std::fs::read_to_string(dir.join("relay.toml")).unwrap();
    edit(dir.join("relay.toml"), |t| {
        format!("{t}[retention]\nmax_failing = \"soon\"\n")
    });
    relay.signal("HUP");
    assert!(
        eventually(Duration::from_secs(20), || async {
            relay.log_text().matches("reload failed").count() >= 2
        })
        .await,
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(log.contains("relay.toml") && log.contains("soon"), "{log}");
    // The running configuration still delivers.
    w::set_global(&s.db.client, "@a_1:example.org", "m.direct", r#"{"v":2}"#)
        .await
        .unwrap();
    assert!(
        s.a.wait_for(WAIT, |st| st.get(&key_a).is_some_and(|v| v["v"] == 2))
            .await,
        "{}",
        relay.log_text()
    );

    // A good reload.
    let a2 = RecordingAppservice::start("hs_token_a2").await.unwrap();
    let d = RecordingAppservice::start("hs_token_d").await.unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        good_a
            .replace(&s.a.url(), &a2.url())
            .replace("hs_token: hs_token_a", "hs_token: hs_token_a2"),
    )
    .unwrap();
    std::fs::write(
        dir.join("d.yaml"),
        format!(
            "id: d\nurl: '{}'\nas_token: as_d\nhs_token: hs_token_d\nsender_localpart: dbot\nnamespaces:\n  users:\n    - regex: '@d_.*'\n      exclusive: true\norg.matrix.msc3682.account_data: true\n",
            d.url()
        ),
    )
    .unwrap();
    edit(dir.join("homeserver.yaml"), |t| format!("{t}  - d.yaml\n"));
    std::fs::write(
        dir.join("relay.toml"),
        good_toml.replace(
            &format!("slot_name = \"{}\"", s.db.name),
            "slot_name = \"another_slot\"",
        ) + "[appservices.b]\naccount_data = false\n",
    )
    .unwrap();
    let (a_before, b_before) = (s.a.transactions().len(), s.b.transactions().len());
    relay.signal("HUP");
    assert!(
        wait_for_log(&relay, "configuration reloaded", Duration::from_secs(20)).await,
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(
        log.contains("replication.slot_name") && log.contains("takes a restart"),
        "{log}"
    );
    for (i, user) in [
        "@a_1:example.org",
        "@a_2:example.org",
        "@b_1:example.org",
        "@d_1:example.org",
        "@d_2:example.org",
    ]
    .iter()
    .enumerate()
    {
        w::set_global(&s.db.client, user, "org.example.after", &format!("{{\"after\":{i}}}"))
            .await
            .unwrap();
    }
    let want_a2: BTreeMap<_, _> = [("@a_1:example.org", 0), ("@a_2:example.org", 1)]
        .into_iter()
        .map(|(u, i)| {
            (
                (u.to_owned(), None, "org.example.after".to_owned()),
                serde_json::json!({ "after": i }),
            )
        })
        .collect();
    assert!(
        a2.wait_for(WAIT, |st| want_a2.iter().all(|(k, v)| st.get(k) == Some(v)))
            .await,
        "A's new URL and token:\n{}\n{}",
        diff(&a2.state(), &want_a2),
        relay.log_text()
    );
    let want_d =
        s.db.final_state(|u| u.starts_with("@d_") || u == "@dbot:example.org")
            .await;
    assert!(
        d.wait_for(WAIT, |st| *st == want_d).await,
        "D, new, with its first-opt-in backfill:\n{}\n{}",
        diff(&d.state(), &want_d),
        relay.log_text()
    );
    assert_eq!(a2.bad_auth() + d.bad_auth(), 0, "new tokens are used");
    assert_eq!(
        s.a.transactions().len(),
        a_before,
        "A's old URL receives nothing after the reload"
    );
    assert_eq!(
        s.b.transactions().len(),
        b_before,
        "B opted out receives nothing after the reload"
    );
    assert_eq!(
        active_pid(&s.db).await,
        pid,
        "the replication connection was not dropped"
    );
    assert_eq!(relay.log_text().matches("streaming account-data changes").count(), 1);
    drop(relay);
    s.db.drop_slot().await;
}

/// The id of the container publishing `port`.
fn container_publishing(port: u16) -> String {
    let out = std::process::Command::new("docker")
        .args(["ps", "--format", "{{.ID}} {{.Ports}}"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    listing
        .lines()
        .find(|l| l.contains(&format!(":{port}->")))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no container publishes port {port}:\n{listing}"))
        .to_owned()
}

/// `/readyz` answers 503, with the reason, once PostgreSQL is stopped (and 200 again once it is
/// back, where the test can restart it); `/healthz` stays 200.
async fn readyz_fails_when_postgres_stops(server: &'static Server) {
    let port = free_port().unwrap();
    let s = prepare_with(server, &[], &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    let relay = start_relay(&s).await;
    let base = format!("http://127.0.0.1:{port}");
    let ready = |want: u16| {
        let base = base.clone();
        async move {
            eventually(Duration::from_secs(30), || {
                let base = base.clone();
                async move {
                    get(&format!("{base}/readyz"))
                        .await
                        .map(|r| r.0 == want)
                        .unwrap_or(false)
                }
            })
            .await
        }
    };
    assert!(ready(200).await, "{}", relay.log_text());
    match &server.local {
        Some(c) => c.stop("fast").unwrap(),
        None => {
            let id = container_publishing(server.port);
            let out = std::process::Command::new("docker")
                .args(["stop", "-t", "5", &id])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
        }
    }
    assert!(ready(503).await, "{}", relay.log_text());
    let (_, _, body) = get(&format!("{base}/readyz")).await.unwrap();
    assert!(body.contains("connection is down"), "{body}");
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);
    assert_eq!(metric(&scrape(&base).await, "ready"), 0.0);
    if let Some(c) = &server.local {
        c.restart().unwrap();
        assert!(
            ready(200).await,
            "ready again after PostgreSQL is back:\n{}",
            relay.log_text()
        );
        assert!(metric(&scrape(&base).await, "reconnects_total") >= 1.0);
    }
}

/// Known tokens and passwords never appear in the relay's output (JSON logs at debug level),
/// its metrics, its status, `status`, `check`, or its errors: with legacy authorization (the
/// token in the query string), a failing appservice, one whose URL carries a password, a token
/// in its path and one in its query string and is unreachable, and a bad reload of a
/// registration holding a token.
async fn no_secret_anywhere(server: &'static Server) {
    const HS_A: &str = "S3CRET-hs-a-5d1f0c";
    const AS_A: &str = "S3CRET-as-a-77ab12";
    const HS_B: &str = "S3CRET-hs-b-9e0d44";
    const URL_PW: &str = "S3CRET-urlpass-31c7";
    const DB_PW: &str = "S3CRET-dbpass-f00d";
    const PATH_TOKEN: &str = "S3CRETpathtoken0c9e2a";
    const QUERY_TOKEN: &str = "S3CRET-query-5e7b";
    let db = TestDb::new(server).await;
    let a = RecordingAppservice::start(HS_A).await.unwrap();
    let dead = free_port().unwrap();
    let port = free_port().unwrap();
    let url_b = format!("http://bridge:{URL_PW}@127.0.0.1:{dead}/hooks/{PATH_TOKEN}?secret={QUERY_TOKEN}");
    let a_url = a.url();
    let files = RelayFiles::new(
        &db,
        &[
            RegistrationSpec {
                id: "a",
                url: Some(&a_url),
                hs_token: HS_A,
                sender_localpart: "abot",
                user_regexes: &["@a_.*"],
                opt_in: true,
            },
            RegistrationSpec {
                id: "b",
                url: Some(&url_b),
                hs_token: HS_B,
                sender_localpart: "bbot",
                user_regexes: &["@b_.*"],
                opt_in: true,
            },
        ],
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let dir = files.path().to_owned();
    edit(dir.join("a.yaml"), |t| {
        t.replace("as_token: as_a", &format!("as_token: {AS_A}"))
    });
    edit(dir.join("homeserver.yaml"), |t| {
        t.replace(
            "    user: postgres\n",
            &format!("    user: postgres\n    password: {DB_PW}\n"),
        ) + "use_appservice_legacy_authorization: true\n"
    });
    let mut outputs = Vec::new();
    let out = files.command("setup", &[]);
    assert!(out.status.success(), "{}", text(&out));
    outputs.push(("setup", text(&out)));
    a.set_mode(ReceiverMode::Fail(500));
    let relay = Command::new(relay_binary())
        .current_dir(&dir)
        .args([
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "run",
            "--synapse-config",
            &dir.join("homeserver.yaml").display().to_string(),
            "--config",
            &dir.join("relay.toml").display().to_string(),
        ])
        .stdout(std::fs::File::create(dir.join("out.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("err.log")).unwrap())
        .spawn()
        .unwrap();
    let mut relay = Child(Some(relay));
    let log = || {
        std::fs::read_to_string(dir.join("out.log")).unwrap_or_default()
            + &std::fs::read_to_string(dir.join("err.log")).unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            log().contains("streaming account-data changes")
        })
        .await,
        "{}",
        log()
    );
    w::set_global(&db.client, "@a_1:example.org", "m.direct", "{}")
        .await
        .unwrap();
    w::set_global(&db.client, "@b_1:example.org", "m.direct", "{}")
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(30), || async { a.attempts() >= 2 }).await);
    assert!(
        eventually(Duration::from_secs(30), || async {
            log().contains("connection failed") && log().contains("HTTP status 500")
        })
        .await,
        "{}",
        log()
    );
    a.set_mode(ReceiverMode::Accept);
    let key = ("@a_1:example.org".to_owned(), None, "m.direct".to_owned());
    assert!(a.wait_for(WAIT, |st| st.contains_key(&key)).await, "{}", log());
    let base = format!("http://127.0.0.1:{port}");
    for path in ["/metrics", "/status.json", "/readyz", "/healthz"] {
        let (_, _, body) = get(&format!("{base}{path}")).await.unwrap();
        outputs.push((path, body));
    }
    // A reload whose registration breaks right at the token.
    edit(dir.join("a.yaml"), |t| {
        t.replace(&format!("hs_token: {HS_A}"), &format!("hs_token: [{HS_A}"))
    });
    relay.signal("HUP");
    assert!(
        eventually(Duration::from_secs(20), || async { log().contains("reload failed") }).await,
        "{}",
        log()
    );
    for args in [&["status"][..], &["status", "--json"], &["check"]] {
        let out = files.command(args[0], &args[1..]);
        outputs.push((args[0], text(&out)));
    }
    relay.signal("TERM");
    relay.wait();
    outputs.push(("relay log", log()));
    for (what, output) in &outputs {
        for secret in [HS_A, AS_A, HS_B, URL_PW, DB_PW, PATH_TOKEN, QUERY_TOKEN] {
            assert!(!output.contains(secret), "{secret} appears in {what}:\n{output}");
        }
    }
    assert!(
        outputs.iter().any(|(w, o)| *w == "check" && o.contains("a.yaml")),
        "{outputs:?}"
    );
    assert!(log().contains("legacy") || log().contains("\"level\""), "JSON logs");
    db.drop_slot().await;
}

/// A relay config whose `password` line is wrong, each way it can be: the error gives the
/// position and the key, never the line (toml's own message quotes it) — at startup (`run` exits
/// 2), in `check`, and on SIGHUP (in the log and in systemd's `STATUS=` line, which any local
/// user can read).
async fn no_secret_in_relay_config_errors(server: &'static Server) {
    const PW: &str = "S3CRET-tomlpw-4b1d";
    const NUMERIC_PW: &str = "982451653";
    let s = prepare(server).await;
    let dir = s.files.path().to_owned();
    let good = std::fs::read_to_string(dir.join("relay.toml")).unwrap();
    let bad_lines = [
        ("bad escape", format!("password = \"{PW}\\q\"")),
        ("misspelt key", format!("pasword = \"{PW}\"")),
        ("unterminated string", format!("password = \"{PW}")),
        ("unquoted", format!("password = {PW}")),
        ("wrong type", format!("password = {NUMERIC_PW}")),
        ("wrong type (array)", format!("password = [\"{PW}\"]")),
        ("duplicate key", format!("password = \"{PW}\"\npassword = \"{PW}\"")),
        ("junk after the value", format!("password = \"{PW}\" x")),
    ];
    let write_bad = |line: &str| std::fs::write(dir.join("relay.toml"), format!("{good}[postgres]\n{line}\n")).unwrap();
    let assert_clean = |what: &str, output: &str| {
        for secret in [PW, NUMERIC_PW] {
            assert!(!output.contains(secret), "{secret} appears in {what}:\n{output}");
        }
    };
    for (how, line) in &bad_lines {
        write_bad(line);
        for sub in ["run", "check"] {
            let out = s.files.command(sub, &[]);
            let t = text(&out);
            assert_eq!(out.status.code(), Some(2), "`{sub}` with a {how}: {t}");
            assert!(
                t.contains("relay.toml") && t.contains("line "),
                "`{sub}` with a {how}: {t}"
            );
            assert_clean(&format!("`{sub}` with a {how}"), &t);
        }
    }
    std::fs::write(dir.join("relay.toml"), &good).unwrap();
    let notify = NotifySocket::new();
    let socket = notify.path.display().to_string();
    let relay = s.files.spawn_run_with(&[("NOTIFY_SOCKET", &socket)], &[]);
    notify.wait_for("READY=1", |l| l == "READY=1").await;
    for (i, (how, line)) in bad_lines.iter().enumerate() {
        write_bad(line);
        relay.signal("HUP");
        assert!(
            eventually(Duration::from_secs(20), || async {
                relay.log_text().matches("reload failed").count() > i
            })
            .await,
            "no failed reload for a {how}:\n{}",
            relay.log_text()
        );
    }
    let status = notify
        .wait_for("the failed reload's STATUS", |l| {
            l.starts_with("STATUS=reload failed") && l.contains("relay.toml")
        })
        .await;
    assert!(status.contains("line "), "{status}");
    assert_clean("the relay's log", &relay.log_text());
    assert_clean("the notify socket", &notify.lines().join("\n"));
    s.db.drop_slot().await;
}

use std::process::Command;

/// A child process killed on drop.
struct Child(Option<std::process::Child>);

impl Child {
    fn signal(&self, name: &str) {
        if let Some(c) = &self.0 {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &c.id().to_string()])
                .status();
        }
    }
    fn wait(&mut self) {
        if let Some(mut c) = self.0.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A statement that fails while a session is being activated (here: the relay's state table is
/// locked and the database's `lock_timeout` cancels the read) is retried like any transient
/// fault; `run` does not end.
async fn a_failing_statement_at_activation_is_retried(server: &'static Server) {
    let s = prepare(server).await;
    let admin = s.db.connect().await;
    admin
        .batch_execute(&format!("ALTER DATABASE {} SET lock_timeout = '200ms'", s.db.name))
        .await
        .unwrap();
    let mut locker = s.db.connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE synapse_account_data_relay.pending_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut relay = s.files.spawn_run();
    assert!(
        wait_for_log(&relay, "cannot start the session", Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );
    // Still failing a while later, and still running.
    assert!(
        eventually(Duration::from_secs(20), || async {
            relay.log_text().matches("cannot start the session").count() >= 2
        })
        .await,
        "{}",
        relay.log_text()
    );
    assert!(relay.is_running(), "{}", relay.log_text());
    lock.commit().await.unwrap();
    w::set_global(&s.db.client, "@a_1:example.org", "m.direct", r#"{"after":1}"#)
        .await
        .unwrap();
    let key = ("@a_1:example.org".to_owned(), None, "m.direct".to_owned());
    assert!(
        s.a.wait_for(WAIT, |st| st.get(&key).is_some_and(|v| v["after"] == 1))
            .await,
        "{}",
        relay.log_text()
    );
    assert!(relay.is_running());
    relay.terminate();
}

/// `push_rules = true` turned on by SIGHUP for the first appservice: the push-rules publication is
/// added to the running stream (the stream restarts after the last commit received), not left
/// for some later reconnect; delivery goes on, and it is not mistaken for a takeover.
async fn sighup_push_rules_adds_the_publication(server: &'static Server) {
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    let key = ("@a_1:example.org".to_owned(), None, "m.direct".to_owned());
    w::set_global(&s.db.client, "@a_1:example.org", "m.direct", r#"{"v":1}"#)
        .await
        .unwrap();
    assert!(s.a.wait_for(WAIT, |st| st.get(&key).is_some_and(|v| v["v"] == 1)).await);
    let toml = s.files.path().join("relay.toml");
    edit(toml, |t| {
        format!("{t}[synapse]\nclient_url = \"http://127.0.0.1:9\"\n[appservices.a]\npush_rules = true\n")
    });
    relay.signal("HUP");
    assert!(
        wait_for_log(
            &relay,
            "restarting the replication stream with the new publications",
            Duration::from_secs(20)
        )
        .await,
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    let restart = log
        .lines()
        .find(|l| l.contains("restarting the replication stream"))
        .unwrap_or_default();
    assert!(
        restart.contains("push_rules"),
        "the push-rules publication is streamed: {restart}"
    );
    assert!(!restart.contains("resume_after=0/0"), "{restart}");
    w::set_global(&s.db.client, "@a_1:example.org", "m.direct", r#"{"v":2}"#)
        .await
        .unwrap();
    assert!(
        s.a.wait_for(WAIT, |st| st.get(&key).is_some_and(|v| v["v"] == 2)).await,
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(!log.contains("took the replication slot over"), "{log}");
    let started: Vec<&str> = log.lines().filter(|l| l.contains("starting replication")).collect();
    assert!(
        started.last().is_some_and(|l| l.contains("push_rules")),
        "the stream was started again with the push-rules publication: {started:?}"
    );
}

on_both_servers!(
    sighup_push_rules_adds_the_publication,
    a_failing_statement_at_activation_is_retried,
    systemd_metrics_status_and_sigterm,
    sigterm_gives_up_on_a_hanging_appservice,
    sighup_reloads_without_dropping_the_connection,
    no_secret_anywhere,
    no_secret_in_relay_config_errors,
);

on_both_own_servers!(readyz_fails_when_postgres_stops, &[]);

/// `--help` of every subcommand says what it does and shows an example.
#[test]
fn every_subcommand_help_has_an_example() {
    let top = Command::new(relay_binary()).arg("--help").output().unwrap();
    let top = text(&top);
    for sub in ["setup", "run", "check", "backfill", "status", "teardown", "demo"] {
        assert!(top.contains(sub), "{sub} missing from --help:\n{top}");
        let out = Command::new(relay_binary()).args([sub, "--help"]).output().unwrap();
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(t.contains("Example"), "`{sub} --help` shows no example:\n{t}");
        assert!(
            t.contains("synapse-account-data-relay ") && t.lines().count() > 5,
            "{t}"
        );
    }
}
