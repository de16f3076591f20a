//! libpq's TCP socket options (`keepalives`, `keepalives_idle`, `keepalives_interval`,
//! `keepalives_count`), set on the sockets of the replication and the SQL connections.

use std::io;

use tokio::net::TcpStream;

use crate::postgres::config::Keepalives;

/// Applies libpq's `keepalives*` settings to a TCP socket.
pub fn set_keepalives(tcp: &TcpStream, keepalives: &Keepalives) -> io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    if !keepalives.enabled {
        return socket.set_keepalive(false);
    }
    let mut params = socket2::TcpKeepalive::new();
    if let Some(idle) = keepalives.idle {
        params = params.with_time(idle);
    }
    if let Some(interval) = keepalives.interval {
        params = params.with_interval(interval);
    }
    if let Some(count) = keepalives.count {
        params = params.with_retries(count);
    }
    socket.set_tcp_keepalive(&params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_settings_reach_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let keepalives = Keepalives {
            enabled: true,
            idle: Some(std::time::Duration::from_secs(17)),
            interval: Some(std::time::Duration::from_secs(4)),
            count: Some(3),
        };
        set_keepalives(&tcp, &keepalives).unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), std::time::Duration::from_secs(17));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            std::time::Duration::from_secs(4)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        let off = Keepalives {
            enabled: false,
            ..Keepalives::default()
        };
        set_keepalives(&tcp, &off).unwrap();
        assert!(!socket.keepalive().unwrap());
    }
}
