//! Test certificates, made with the `openssl` CLI (which must be installed; the tests fail with a
//! message saying so otherwise): a CA, a server certificate for `localhost` and `127.0.0.1`
//! (not `127.0.0.2`, so tests can connect to a name the certificate does not hold) signed by it,
//! and an unrelated CA that trusts nothing of ours.

use std::path::{Path, PathBuf};
use std::process::Command;

use synapse_account_data_relay::testkit::ServerTls;

/// The hash the CA signs the server certificate with. It decides the hash of SCRAM channel
/// binding (`tls-server-end-point`), so SHA-384 exercises the non-default case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digest {
    Sha256,
    Sha384,
}

/// Certificates in a temporary directory, removed when this value is dropped.
pub struct TestCerts {
    dir: tempfile::TempDir,
    /// The CA that signed `server_cert` (PEM).
    pub ca_cert: PathBuf,
    /// A CA unrelated to `server_cert` (PEM).
    pub other_ca_cert: PathBuf,
    /// The server certificate for `localhost` and `127.0.0.1`, EC P-256 key (PEM).
    pub server_cert: PathBuf,
    /// Its private key (PKCS#8 PEM, mode 0600).
    pub server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `openssl` ({e}), which makes the test certificates: install it \
                 (Debian/Ubuntu: `apt-get install openssl`)"
            )
        });
    assert!(
        output.status.success(),
        "openssl {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn new_ec_key_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    args.extend_from_slice(extra);
    args
}

impl TestCerts {
    /// Make a CA, an unrelated CA and a server certificate signed by the first with `digest`.
    pub fn generate(digest: Digest) -> TestCerts {
        let dir = tempfile::Builder::new().prefix("relay-certs-").tempdir().unwrap();
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            let subject = format!("/CN=relay test {ca}");
            let key = format!("{ca}.key");
            let cert = format!("{ca}.crt");
            let mut args = vec!["req", "-x509"];
            args.extend(new_ec_key_args(&[
                "-sha256", "-days", "30", "-subj", &subject, "-keyout", &key, "-out", &cert,
            ]));
            openssl(d, &args);
        }
        let mut args = vec!["req", "-new"];
        args.extend(new_ec_key_args(&[
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]));
        openssl(d, &args);
        std::fs::write(
            d.join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
             subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        let digest = match digest {
            Digest::Sha256 => "-sha256",
            Digest::Sha384 => "-sha384",
        };
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                digest,
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        );
        let server_key = d.join("server.key");
        std::fs::set_permissions(&server_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        TestCerts {
            ca_cert: d.join("ca.crt"),
            other_ca_cert: d.join("other-ca.crt"),
            server_cert: d.join("server.crt"),
            server_key,
            dir,
        }
    }

    /// A client certificate for `common_name` signed by the test CA: (certificate, key) files.
    pub fn client_cert(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let (cert, key, csr) = (
            format!("client-{common_name}.crt"),
            format!("client-{common_name}.key"),
            format!("client-{common_name}.csr"),
        );
        let subject = format!("/CN={common_name}");
        let mut args = vec!["req", "-new"];
        args.extend(new_ec_key_args(&["-subj", &subject, "-keyout", &key, "-out", &csr]));
        openssl(d, &args);
        std::fs::write(
            d.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-sha256",
                "-extfile",
                "client.ext",
                "-out",
                &cert,
            ],
        );
        (d.join(cert), d.join(key))
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server certificate and key, for a TLS-serving [`LocalCluster`](synapse_account_data_relay::testkit::LocalCluster).
    pub fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
        }
    }
}
