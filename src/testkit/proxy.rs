//! A TCP proxy a test controls, to cut the network between the relay and PostgreSQL or an
//! appservice: pass traffic, **cut** it (close every connection and refuse new ones, as a peer that
//! went away), or **blackhole** it (keep connections open but forward nothing, as a partition that
//! drops packets — TCP does not notice for many minutes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Pass,
    Cut,
    Blackhole,
}

/// See the module documentation.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // While blackholed, neither read nor write: bytes pile up in the peers' buffers.
        while *mode.borrow() == ProxyMode::Blackhole {
            if mode.changed().await.is_err() {
                return;
            }
        }
        if *mode.borrow() == ProxyMode::Cut {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = mode.changed() => continue,
        };
        while *mode.borrow() == ProxyMode::Blackhole {
            if mode.changed().await.is_err() {
                return;
            }
        }
        if *mode.borrow() == ProxyMode::Cut || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl FaultProxy {
    /// Listen on 127.0.0.1 (a free port) and forward to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, watcher) = watch::channel(ProxyMode::Pass);
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let conns = connections.clone();
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *watcher.borrow() == ProxyMode::Cut {
                    drop(client);
                    continue;
                }
                let watcher = watcher.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, watcher.clone()), pump(sr, cw, watcher));
                });
                let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|t| !t.is_finished());
                list.push(task);
            }
        });
        Ok(FaultProxy {
            addr,
            mode,
            connections,
            acceptor,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Change what happens to traffic. `Cut` also closes every open connection.
    pub fn set_mode(&self, mode: ProxyMode) {
        let _ = self.mode.send(mode);
        if mode == ProxyMode::Cut {
            for t in self.connections.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                t.abort();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        for t in self.connections.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
    }
}
