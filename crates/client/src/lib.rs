//! The reference Rust client of the BlockRemote API.
//!
//! It is what `docs/INTEGRATION.md` tells an app or a bank's back end to do,
//! written once and exercised by CI: `blockremote simulate`, `blockremote
//! demo` and the API tests drive the server through it. It speaks the
//! contract of `docs/API.md` and nothing else — no server types — so a change
//! to the wire format that would break an integrator breaks this crate's
//! callers too.
//!
//! Three handles, one per credential:
//! - [`Client`]: anonymous calls (register, sign in, refresh) and the factory
//!   of the others;
//! - [`Device`]: a device session (access token + `X-Device-Id`): heartbeats
//!   with their outcome as a value ([`HeartbeatOutcome`]), the trust report,
//!   the kill-switch socket ([`KillSwitch`]);
//! - [`Admin`]: an admin key: external users, sessions, lock and unlock.
//!
//! Every refusal the server explains is an [`Error::Api`] carrying the
//! problem+json body, so callers branch on its stable `code`.

mod admin;
mod device;
mod error;
mod killswitch;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use admin::{Admin, ExternalUser, SessionRequest, UserPage};
pub use device::{Device, HeartbeatOutcome, TrustReport};
pub use error::{Error, Problem, Result};
pub use killswitch::{KillSwitch, ServerMessage};

/// Tokens of a device session (`POST /v1/auth/*`, `POST /v1/admin/sessions`).
#[derive(Clone, Deserialize)]
pub struct Tokens {
    /// The user.
    pub user_id: String,
    /// The device-bound access token (JWT).
    pub access_token: String,
    /// The single-use refresh token.
    pub refresh_token: String,
    /// Access-token lifetime in seconds.
    pub expires_in: u64,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("user_id", &self.user_id)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// The device fields every sign-in carries.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceIdentity {
    /// 8–64 characters of `[A-Za-z0-9_-]`, generated once per install.
    pub device_id: String,
    /// The app's stable hardware/install fingerprint.
    pub device_fingerprint: String,
    /// `android` or `ios`.
    pub platform: String,
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:8000`), with a
    /// 30 s request timeout and no proxy from the environment.
    pub fn new(base: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self::with_http(base, http))
    }

    /// A client over a configured `reqwest` client.
    pub fn with_http(base: &str, http: reqwest::Client) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /v1/auth/register`: a new user with email and password, signed in
    /// on `device`.
    pub async fn register(
        &self,
        email: &str,
        password: &str,
        device: &DeviceIdentity,
    ) -> Result<Tokens> {
        self.sign_in("/v1/auth/register", email, password, device)
            .await
    }

    /// `POST /v1/auth/login`.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        device: &DeviceIdentity,
    ) -> Result<Tokens> {
        self.sign_in("/v1/auth/login", email, password, device)
            .await
    }

    async fn sign_in(
        &self,
        path: &str,
        email: &str,
        password: &str,
        device: &DeviceIdentity,
    ) -> Result<Tokens> {
        #[derive(Serialize)]
        struct Body<'a> {
            email: &'a str,
            password: &'a str,
            #[serde(flatten)]
            device: &'a DeviceIdentity,
        }
        let r = self
            .http
            .post(self.url(path))
            .json(&Body {
                email,
                password,
                device,
            })
            .send()
            .await?;
        error::json(r).await
    }

    /// `POST /v1/auth/refresh`: the next pair. Store the new refresh token
    /// before using the new access token; never refresh twice at once.
    pub async fn refresh(&self, refresh_token: &str, device: &DeviceIdentity) -> Result<Tokens> {
        let r = self
            .http
            .post(self.url("/v1/auth/refresh"))
            .json(&serde_json::json!({
                "refresh_token": refresh_token,
                "device_id": device.device_id,
                "device_fingerprint": device.device_fingerprint,
            }))
            .send()
            .await?;
        error::json(r).await
    }

    /// The device session of `tokens` on `device_id`.
    pub fn device(&self, device_id: &str, access_token: &str) -> Device {
        Device::new(self.clone(), device_id, access_token)
    }

    /// The admin API with `key`.
    pub fn admin(&self, key: &str) -> Admin {
        Admin::new(self.clone(), key)
    }

    /// A request to `path` with `Authorization: Bearer <token>`.
    pub(crate) fn bearer(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(token)
    }
}
