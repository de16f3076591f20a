//! A TCP proxy a test controls, to cut the network between the relay and PostgreSQL or an
//! appservice: pass traffic, **cut** it (close every connection and refuse new ones, as a peer that
//! went away), or **blackhole** it (keep connections open but forward nothing, as a partition that
//! drops packets — TCP does not notice for many minutes); a blackhole can end for new connections
//! only, leaving the open ones stranded ([`FaultProxy::strand_open_connections`]).

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
    /// Bumped by [`FaultProxy::strand_open_connections`].
    strand: watch::Sender<u64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

/// What one connection's pumps see: the proxy's mode, unless the connection was stranded.
struct ConnectionMode {
    mode: watch::Receiver<ProxyMode>,
    strand: watch::Receiver<u64>,
    /// The strand generation when the connection was accepted.
    generation: u64,
}

impl ConnectionMode {
    fn get(&self) -> ProxyMode {
        match *self.mode.borrow() {
            ProxyMode::Cut => ProxyMode::Cut,
            _ if *self.strand.borrow() > self.generation => ProxyMode::Blackhole,
            m => m,
        }
    }

    /// Wait for a change; false when the proxy is gone.
    async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.mode.changed() => r.is_ok(),
            r = self.strand.changed() => r.is_ok(),
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: ConnectionMode,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // While blackholed, neither read nor write: bytes pile up in the peers' buffers.
        while mode.get() == ProxyMode::Blackhole {
            if !mode.changed().await {
                return;
            }
        }
        if mode.get() == ProxyMode::Cut {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = mode.changed() => continue,
        };
        while mode.get() == ProxyMode::Blackhole {
            if !mode.changed().await {
                return;
            }
        }
        if mode.get() == ProxyMode::Cut || to.write_all(&buf[..n]).await.is_err() {
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
        let (strand, strand_watcher) = watch::channel(0u64);
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
                let strand_watcher = strand_watcher.clone();
                let generation = *strand_watcher.borrow();
                let modes = move || ConnectionMode {
                    mode: watcher.clone(),
                    strand: strand_watcher.clone(),
                    generation,
                };
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, modes()), pump(sr, cw, modes()));
                });
                let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|t| !t.is_finished());
                list.push(task);
            }
        });
        Ok(FaultProxy {
            addr,
            mode,
            strand,
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

impl FaultProxy {
    /// End a blackhole the way a partition often ends: new connections pass, but the ones open
    /// now stay blackholed for good (the flows the partition lost, whose peers only learn of it
    /// at their own timeouts, e.g. a walsender's `wal_sender_timeout`). Sets the mode to `Pass`.
    pub fn strand_open_connections(&self) {
        self.strand.send_modify(|g| *g += 1);
        let _ = self.mode.send(ProxyMode::Pass);
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
