//! The kill-switch socket (`GET /v1/security/kill-switch`), as a client
//! writer implements it: credentials in the `Authorization` header, `state`
//! first, every command acknowledged, `resume` after a reconnect.

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, Message},
    MaybeTlsStream, WebSocketStream,
};

use crate::{Error, Result};

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The device's current state: authoritative over any replayed history.
    State {
        /// Whether the device is locked.
        locked: bool,
        /// The action in force (`CRITICAL_LOCK`, …), if any.
        action: Option<String>,
        /// The device's last command `seq`.
        seq: u64,
    },
    /// A command to carry out and acknowledge.
    Command {
        /// Its id (for the ack).
        id: String,
        /// Per-device sequence number.
        seq: u64,
        /// `CRITICAL_LOCK`, `IMMEDIATE_QUARANTINE`, `FORCE_OVERLAY` or `UNLOCK`.
        action: String,
        /// Why.
        reason: String,
    },
    /// Any other message type (the protocol may grow).
    #[serde(other)]
    Other,
}

/// The socket's URL on the server at `base`: `https` → `wss`, `http` → `ws`.
fn socket_url(base: &str) -> Result<String> {
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| Error::Protocol(format!("{base} is not an http(s) URL")))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => "wss",
        "http" => "ws",
        _ => return Err(Error::Protocol(format!("{base} is not an http(s) URL"))),
    };
    Ok(format!("{scheme}://{rest}/v1/security/kill-switch"))
}

/// An open kill-switch socket.
#[derive(Debug)]
pub struct KillSwitch {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    close_code: Option<u16>,
}

impl KillSwitch {
    pub(crate) async fn connect(base: &str, device_id: &str, token: &str) -> Result<Self> {
        let mut request = socket_url(base)?.into_client_request().map_err(Box::new)?;
        let headers = request.headers_mut();
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Protocol("the token is not a header value".into()))?;
        headers.insert("authorization", bearer);
        headers.insert(
            "x-device-id",
            device_id
                .parse()
                .map_err(|_| Error::Protocol("the device id is not a header value".into()))?,
        );
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(Box::new)?;
        Ok(Self {
            socket,
            close_code: None,
        })
    }

    /// The next server message; `None` once the server closed the socket
    /// ([`close_code`](Self::close_code) says why). Pings are answered by
    /// the socket itself.
    pub async fn next(&mut self) -> Result<Option<ServerMessage>> {
        while let Some(frame) = self.socket.next().await {
            match frame.map_err(Box::new)? {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str())
                        .map(Some)
                        .map_err(|e| Error::Protocol(format!("server message: {e}")))
                }
                Message::Close(frame) => {
                    self.close_code = frame.map(|f| u16::from(f.code));
                    // Send the echo the socket queued (RFC 6455 §5.5.1).
                    let _ = self.socket.flush().await;
                    return Ok(None);
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// The code of the server's close frame, once it closed the socket:
    /// 1001 shutdown or idle (reconnect with backoff), 4001 replaced by a
    /// newer socket, 4002 token expired (refresh, reconnect), 4003 a lock
    /// was delivered (reconnect: the state says locked), 4004 sessions
    /// revoked (sign in again).
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Acknowledges a command.
    pub async fn ack(&mut self, id: &str) -> Result<()> {
        self.send(serde_json::json!({"type": "ack", "id": id}))
            .await
    }

    /// Asks for every command after `since_seq` (after a reconnect).
    pub async fn resume(&mut self, since_seq: u64) -> Result<()> {
        self.send(serde_json::json!({"type": "resume", "since_seq": since_seq}))
            .await
    }

    async fn send(&mut self, message: serde_json::Value) -> Result<()> {
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .map_err(|e| Box::new(e).into())
    }

    /// Closes the socket.
    pub async fn close(mut self) -> Result<()> {
        self.socket
            .close(None)
            .await
            .map_err(|e| Box::new(e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::socket_url;

    #[test]
    fn the_socket_url_follows_the_servers_scheme() {
        assert_eq!(
            socket_url("https://api.bank.example").ok().as_deref(),
            Some("wss://api.bank.example/v1/security/kill-switch")
        );
        assert_eq!(
            socket_url("HTTP://127.0.0.1:8000").ok().as_deref(),
            Some("ws://127.0.0.1:8000/v1/security/kill-switch")
        );
        for bad in ["ftp://x", "127.0.0.1:8000", "httpx://y"] {
            assert!(socket_url(bad).is_err(), "{bad}");
        }
    }
}
