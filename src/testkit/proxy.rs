//! A TCP proxy a test controls, to cut the network between the relay and PostgreSQL or an
//! appservice: pass traffic, **cut** it (close every connection and refuse new ones, as a peer that
//! went away), or **blackhole** it (keep connections open but forward nothing, as a partition that
//! drops packets — TCP does not notice for many minutes); a blackhole can end for new connections
//! only, leaving the open ones stranded ([`FaultProxy::strand_open_connections`]). It can also
//! **lag** PostgreSQL replication connections: everything the server sends on them arrives a fixed
//! time late, as a stream that runs behind the WAL tip (ordinary SQL connections through it are not
//! delayed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// See [`FaultProxy::set_replication_lag`].
    replication_lag: Arc<Mutex<Duration>>,
}

/// Whether a client's first bytes are a PostgreSQL startup message asking for replication.
fn asks_for_replication(first: &[u8]) -> bool {
    first.windows(12).any(|w| w == b"replication\0")
}

/// Forward the client's startup packets (answering an SSL or GSSAPI encryption request with the
/// server's refusal), and tell whether its startup message asks for replication. `None`: the
/// connection failed or went encrypted (then nothing is delayed).
async fn startup_asks_for_replication(
    cr: &mut tokio::net::tcp::OwnedReadHalf,
    cw: &mut tokio::net::tcp::OwnedWriteHalf,
    sr: &mut tokio::net::tcp::OwnedReadHalf,
    sw: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Option<bool> {
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;
    loop {
        let mut len = [0u8; 4];
        cr.read_exact(&mut len).await.ok()?;
        let n = u32::from_be_bytes(len) as usize;
        if !(8..=10_000).contains(&n) {
            return None;
        }
        let mut packet = vec![0u8; n];
        packet[..4].copy_from_slice(&len);
        cr.read_exact(&mut packet[4..]).await.ok()?;
        sw.write_all(&packet).await.ok()?;
        let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        if n == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST) {
            let mut answer = [0u8; 1];
            sr.read_exact(&mut answer).await.ok()?;
            cw.write_all(&answer).await.ok()?;
            if answer[0] != b'N' {
                return None;
            }
            continue;
        }
        return Some(asks_for_replication(&packet));
    }
}

/// As [`pump`], but once `streaming` is set (the client started replication), every chunk is
/// written `lag` after it was read (throughput is kept: chunks wait in a queue, not behind each
/// other). The connection set-up is not delayed.
async fn lagged_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    lag: Duration,
    streaming: Arc<AtomicBool>,
    mode: ConnectionMode,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = if streaming.load(Ordering::Acquire) {
                        lag
                    } else {
                        Duration::ZERO
                    };
                    if tx
                        .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if mode.get() == ProxyMode::Cut || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
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

async fn pump(from: tokio::net::tcp::OwnedReadHalf, to: tokio::net::tcp::OwnedWriteHalf, mode: ConnectionMode) {
    watching_pump(from, to, mode, None).await
}

/// As [`pump`]; sets `streaming` once the client sent `START_REPLICATION`.
async fn watching_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: ConnectionMode,
    streaming: Option<Arc<AtomicBool>>,
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
        if let Some(flag) = &streaming
            && buf[..n].windows(17).any(|w| w == b"START_REPLICATION")
        {
            flag.store(true, Ordering::Release);
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
        let replication_lag: Arc<Mutex<Duration>> = Arc::default();
        let lag_setting = replication_lag.clone();
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
                let lag = *lag_setting.lock().unwrap_or_else(|p| p.into_inner());
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let (mut cr, mut cw) = (cr, cw);
                    if !lag.is_zero()
                        && startup_asks_for_replication(&mut cr, &mut cw, &mut sr, &mut sw).await == Some(true)
                    {
                        let streaming = Arc::new(AtomicBool::new(false));
                        tokio::join!(
                            watching_pump(cr, sw, modes(), Some(streaming.clone())),
                            lagged_pump(sr, cw, lag, streaming, modes())
                        );
                        return;
                    }
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
            replication_lag,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delay what the server sends on replication connections opened from now on by `lag`
    /// (zero: no delay).
    pub fn set_replication_lag(&self, lag: Duration) {
        *self.replication_lag.lock().unwrap_or_else(|p| p.into_inner()) = lag;
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
