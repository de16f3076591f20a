//! A TLS-terminating TCP proxy: accepts TLS on 127.0.0.1 with a test server certificate and
//! forwards the decrypted bytes to a plain TCP address (an HTTP receiver), so plain test servers
//! can be reached through `https` URLs. It records how each handshake went.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::certs::TestCerts;

#[derive(Default)]
struct Record {
    handshakes: u64,
    handshake_errors: Vec<String>,
}

/// See the module documentation. Dropping it closes the listener and every connection.
pub struct TlsProxy {
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Serve `certs.server_cert` (for `localhost` and 127.0.0.1) on a free port and forward to `target`.
    pub async fn start(certs: &TestCerts, target: SocketAddr) -> TlsProxy {
        synapse_account_data_relay::delivery::worker::install_crypto_provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Mutex::new(Record::default()));
        let rec = record.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the accept loop closes them too.
            let mut connections = JoinSet::new();
            loop {
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let rec = rec.clone();
                connections.spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(s) => {
                            rec.lock().unwrap().handshakes += 1;
                            s
                        }
                        Err(e) => {
                            rec.lock().unwrap().handshake_errors.push(e.to_string());
                            return;
                        }
                    };
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
                // Reap finished connections.
                while connections.try_join_next().is_some() {}
            }
        });
        TlsProxy { addr, record, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TLS handshakes that completed.
    pub fn handshakes(&self) -> u64 {
        self.record.lock().unwrap().handshakes
    }

    /// Why handshakes failed, as the server side saw it (e.g. the client's alert).
    pub fn handshake_errors(&self) -> Vec<String> {
        self.record.lock().unwrap().handshake_errors.clone()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
