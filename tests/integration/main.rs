//! The integration suite: one binary, real PostgreSQL, real HTTP receivers.
mod support;

#[test]
fn local_cluster_starts() {
    let c = synapse_account_data_relay::testkit::LocalCluster::start(Default::default()).unwrap();
    let out = std::process::Command::new(c.bindir().join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port().to_string(),
            "-U",
            "postgres",
            "-Atc",
            "show wal_level",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "logical");
}
