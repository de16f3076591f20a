//! The mautrix-python example (`examples/mautrix_python_appservice.py`, the real `mautrix` from
//! PyPI in the test virtualenv) as the relay's appservice: what it received through mautrix's
//! `extra_data` must end equal to the database's final state for its users.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;
use synapse_account_data_relay::testkit::free_port;
use synapse_account_data_relay::testkit::receiver::{ReceivedKey, events_of};
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::on_both_servers;
use crate::support::scenario::{WAIT, interested_a, random_write};
use crate::support::synapse::synapse_venv;
use crate::support::{RegistrationSpec, RelayFiles, Server, TestDb, diff, eventually, text, wait_for_log};

/// The example program, killed when dropped.
struct MautrixAppservice {
    child: Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl MautrixAppservice {
    fn start(venv: &Path, dir: &Path, port: u16, hs_token: &str) -> MautrixAppservice {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mautrix_python_appservice.py");
        let (stdout, stderr) = (dir.join("mautrix.stdout"), dir.join("mautrix.stderr"));
        let child = Command::new(venv.join("bin/python"))
            .arg(&example)
            .args([
                "--port",
                &port.to_string(),
                "--hs-token",
                hs_token,
                "--as-token",
                "as_mautrix",
            ])
            .args(["--server-name", "example.org", "--bot-localpart", "abot"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", example.display()));
        MautrixAppservice { child, stdout, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The transactions it printed: (txn id, the body's MSC3682 fields as it got them).
    fn transactions(&self) -> Vec<(String, serde_json::Value)> {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        out.lines()
            .filter(|l| l.ends_with('}')) // a line still being written is not complete yet
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("the example printed a bad line {l:?}: {e}"));
                let body = json!({
                    "events": [],
                    "org.matrix.msc3682.account_data": v["account_data"],
                    "org.matrix.msc3682.room_account_data": v["room_account_data"],
                });
                (v["txn_id"].as_str().unwrap_or_default().to_owned(), body)
            })
            .collect()
    }

    /// The latest value per key it received, in the order it received them.
    fn state(&self) -> BTreeMap<ReceivedKey, serde_json::Value> {
        let mut state = BTreeMap::new();
        for (_, body) in self.transactions() {
            state.extend(events_of(&body));
        }
        state
    }
}

impl Drop for MautrixAppservice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn mautrix_python_example_receives_the_final_state(server: &'static Server) {
    let venv = synapse_venv();
    let db = TestDb::new(server).await;
    let port = free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let files = RelayFiles::new(
        &db,
        &[RegistrationSpec {
            id: "mautrix",
            url: Some(&url),
            hs_token: "hs_token_m",
            sender_localpart: "abot",
            user_regexes: &["@a_.*", "@shared_.*"],
            opt_in: true,
        }],
        "",
    );
    let appservice = MautrixAppservice::start(&venv, files.path(), port, "hs_token_m");
    assert!(
        eventually(Duration::from_secs(60), || async {
            appservice.log().contains("listening on")
        })
        .await,
        "the mautrix example did not start:\n{}",
        appservice.log()
    );
    let out = files.command("setup", &[]);
    assert!(out.status.success(), "setup: {}", text(&out));
    let relay = files.spawn_run();
    assert!(
        wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(20)).await,
        "relay did not start streaming:\n{}",
        relay.log_text()
    );

    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..120 {
        random_write(&db.client, &mut rng, i).await;
    }
    // A deletion arrives through extra_data as `{}` (MSC3391), like any value.
    w::set_global(&db.client, "@a_1:example.org", "org.example.gone", r#"{"x":1}"#)
        .await
        .unwrap();
    w::delete_global(&db.client, "@a_1:example.org", "org.example.gone")
        .await
        .unwrap();
    let want = db.final_state(interested_a).await;
    let gone: ReceivedKey = ("@a_1:example.org".into(), None, "org.example.gone".into());
    assert_eq!(
        want.get(&gone),
        Some(&json!({})),
        "the deletion is in the database's state"
    );
    let arrived = eventually(WAIT, || async { appservice.state() == want }).await;
    assert!(
        arrived,
        "what mautrix-python handed the example differs from the database:\n{}\nexample's log:\n{}\nrelay log:\n{}",
        diff(&appservice.state(), &want),
        appservice.log(),
        relay.log_text()
    );
    // mautrix answers a txnId it has seen with 200 and drops the body: ids never repeat.
    let ids: Vec<String> = appservice.transactions().into_iter().map(|(id, _)| id).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a txnId was sent twice: {ids:?}");
    drop(relay);
    db.drop_slot().await;
}

on_both_servers!(mautrix_python_example_receives_the_final_state);
