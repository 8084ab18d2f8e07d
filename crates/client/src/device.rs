//! A device session: heartbeats, the trust report, the kill-switch socket.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{error, Client, Error, KillSwitch, Result};

/// The calls of one device session: `Authorization: Bearer <access token>`
/// and `X-Device-Id` on each.
#[derive(Clone)]
pub struct Device {
    client: Client,
    device_id: String,
    token: String,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Device")
            .field("client", &self.client)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// What became of a heartbeat. The answers an app handles in its send loop
/// are values; anything else (an expired token, a bad body) is an
/// [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// 202: queued for scoring.
    Accepted {
        /// The heartbeat's `seq`.
        seq: u64,
    },
    /// 409 `replay`: this `seq` (or a later one) was already accepted;
    /// continue above `last_seq`.
    Replay {
        /// The highest `seq` accepted from this device.
        last_seq: Option<u64>,
    },
    /// 429 `rate_limited`: not accepted, so its `seq` is unspent; send it
    /// again after `retry_after`.
    RateLimited {
        /// The server's `Retry-After`.
        retry_after: Duration,
    },
    /// 403 `device_locked`: the kill-switch locked or quarantined the device.
    Locked,
}

/// The trust report (`GET /v1/security/trust-score`), as far as a client
/// acts on it.
#[derive(Debug, Clone, Deserialize)]
pub struct TrustReport {
    /// The device.
    pub device_id: String,
    /// 0–100, 100 = fully trusted.
    pub trust_score: u8,
    /// `trusted`, `suspicious` or `critical`.
    pub level: String,
    /// Stable reason codes.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Whether the device is locked.
    pub locked: bool,
    /// Heartbeats scored so far.
    pub heartbeats: u64,
    /// The last `seq` scored.
    #[serde(default)]
    pub last_seq: u64,
}

impl Device {
    pub(crate) fn new(client: Client, device_id: &str, token: &str) -> Self {
        Self {
            client,
            device_id: device_id.to_owned(),
            token: token.to_owned(),
        }
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.device_id
    }

    /// The access token in use.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Uses a new access token (after a refresh).
    pub fn set_token(&mut self, token: &str) {
        token.clone_into(&mut self.token);
    }

    /// The server this session talks to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .bearer(method, path, &self.token)
            .header("x-device-id", &self.device_id)
    }

    /// `POST /v1/signals/heartbeat` with `body` (the API.md heartbeat).
    pub async fn heartbeat(&self, body: &impl Serialize) -> Result<HeartbeatOutcome> {
        let r = self
            .request(reqwest::Method::POST, "/v1/signals/heartbeat")
            .json(body)
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::ACCEPTED {
            #[derive(Deserialize)]
            struct Accepted {
                seq: u64,
            }
            let Accepted { seq } = r.json().await?;
            return Ok(HeartbeatOutcome::Accepted { seq });
        }
        match error::refusal(r).await {
            Error::Api { problem, .. } if problem.code == "replay" => {
                Ok(HeartbeatOutcome::Replay {
                    last_seq: problem.last_seq,
                })
            }
            Error::Api {
                problem,
                retry_after,
                ..
            } if problem.code == "rate_limited" => Ok(HeartbeatOutcome::RateLimited {
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            }),
            Error::Api { problem, .. } if problem.code == "device_locked" => {
                Ok(HeartbeatOutcome::Locked)
            }
            other => Err(other),
        }
    }

    /// `GET /v1/security/trust-score`.
    pub async fn trust_score(&self) -> Result<TrustReport> {
        let r = self
            .request(reqwest::Method::GET, "/v1/security/trust-score")
            .send()
            .await?;
        error::json(r).await
    }

    /// `POST /v1/auth/logout`: ends the device's sessions.
    pub async fn logout(&self) -> Result<()> {
        let r = self
            .request(reqwest::Method::POST, "/v1/auth/logout")
            .send()
            .await?;
        error::empty(r).await
    }

    /// Opens the kill-switch socket; the server's first message is the
    /// device's `state`.
    pub async fn kill_switch(&self) -> Result<KillSwitch> {
        KillSwitch::connect(self.client.base(), &self.device_id, &self.token).await
    }
}
