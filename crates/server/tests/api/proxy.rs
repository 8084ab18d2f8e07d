//! A TCP proxy a test can cut, to make a real PostgreSQL or Redis
//! "unreachable" for one server without touching the shared service.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections to `upstream` until [`cut`](Proxy::cut).
pub struct Proxy {
    /// The address to connect to instead of the upstream.
    pub addr: SocketAddr,
    cut: CancellationToken,
}

impl Proxy {
    /// Starts forwarding to `upstream` (host:port).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = CancellationToken::new();
        let token = cut.clone();
        let upstream = Arc::new(upstream);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let token = token.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).expect("url");
    parsed.set_host(Some(&addr.ip().to_string())).expect("host");
    parsed.set_port(Some(addr.port())).expect("port");
    parsed.to_string()
}

/// `host:port` of `url`.
pub fn upstream_of(url: &str, default_port: u16) -> String {
    let parsed = url::Url::parse(url).expect("url");
    format!(
        "{}:{}",
        parsed.host_str().expect("host"),
        parsed.port().unwrap_or(default_port)
    )
}
