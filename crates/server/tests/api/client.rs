//! The one typed HTTP client the API tests talk to a server through.
//!
//! Why: audit, billing, firewall, identity, killswitch and signals each
//! carried their own `register` and credentials, their own `Session`/`Device`
//! struct, their own admin-key request, lock/unlock and device-authenticated
//! GET. Those copies had drifted (field names, which checks a registration
//! made). This module
//! is the single copy: [`Api`] wraps a `reqwest::Client`, a server's base
//! URL and the admin key that server was started with, and offers the flows
//! the tests share; [`Session`] is what a signed-in device holds.
//!
//! A [`TestApp`](crate::helpers::TestApp) dereferences to its [`Api`], so a
//! test writes `app.register(…)`, `app.lock(…)`, `app.heartbeat(…)`. Views
//! (trust report, device view, problems) stay `serde_json::Value`: the tests
//! assert on their exact fields. Methods named `…_json`, `register`, `lock`,
//! `unlock` and `admin_device` assert the status they expect; the others
//! return the raw response for the caller to check.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest},
    MaybeTlsStream, WebSocketStream,
};

/// The password of every user the suite registers.
pub const PASSWORD: &str = "correct horse battery";

/// A client-side WebSocket, as the kill-switch tests hold it.
pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the kill-switch socket of `api` with `query` and extra handshake
/// `headers`; on refusal returns the HTTP status and problem code.
pub async fn connect(
    api: &Api,
    query: &str,
    headers: &[(&str, String)],
) -> Result<(Socket, tungstenite::handshake::client::Response), (u16, String)> {
    let mut request = api
        .kill_switch_url(query)
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(ok) => Ok(ok),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body: Value = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((status, body["code"].as_str().unwrap_or_default().to_owned()))
        }
        Err(other) => panic!("unexpected handshake error: {other}"),
    }
}

/// The next JSON message on `socket` within 5 s, skipping pings and pongs.
pub async fn next_json(socket: &mut Socket) -> Value {
    use futures::StreamExt;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a message in time")
            .expect("socket open")
            .expect("no error");
        match message {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The register/login body for `email` on an Android device `device_id`
/// whose fingerprint is `fp-<device_id>`.
pub fn credentials(email: &str, device_id: &str) -> Value {
    json!({
        "email": email,
        "password": PASSWORD,
        "device_id": device_id,
        "device_fingerprint": format!("fp-{device_id}"),
        "platform": "android",
    })
}

/// A signed-in device: what register, login, refresh and an admin mint give.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user's id (a UUID).
    pub user_id: String,
    /// The device the tokens are bound to.
    pub device_id: String,
    /// The access token (a JWT).
    pub access: String,
    /// The refresh token.
    pub refresh: String,
}

impl Session {
    /// Reads a session body for `device_id`, checking the contract's
    /// `token_type: "Bearer"` and `expires_in: 900`. The caller checks the
    /// status (201 or 200 depending on the route).
    pub async fn from_response(response: Response, device_id: &str) -> Self {
        let body: Value = response.json().await.expect("json");
        Self::from_json(&body, device_id)
    }

    /// [`Self::from_response`] for a body already read.
    pub fn from_json(body: &Value, device_id: &str) -> Self {
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 900);
        Self {
            user_id: body["user_id"].as_str().expect("user_id").to_owned(),
            device_id: device_id.to_owned(),
            access: body["access_token"].as_str().expect("access").to_owned(),
            refresh: body["refresh_token"].as_str().expect("refresh").to_owned(),
        }
    }
}

/// A client for one server: HTTP client, base URL, admin key.
#[derive(Clone)]
pub struct Api {
    /// An HTTP client that ignores proxy settings, 10 s timeout.
    pub client: reqwest::Client,
    /// `http://127.0.0.1:<port>`
    pub address: String,
    admin_key: Option<String>,
}

impl Api {
    /// A client for the server at `address`; `admin_key` is the bearer
    /// the `admin*` methods send.
    pub fn new(address: String, admin_key: Option<String>) -> Self {
        Self {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            address,
            admin_key,
        }
    }

    /// The absolute URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// POST `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// POST `body` as JSON to `path` as the client at `ip` (the test servers
    /// trust the loopback proxy's `X-Forwarded-For`).
    pub async fn post_json_from(&self, ip: &str, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .header("x-forwarded-for", ip)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// POST to a device route with `token` and, if given, `X-Device-Id`.
    /// For the tests that send a mismatched or forged pair; a signed-in
    /// device uses [`Self::as_device`].
    pub async fn device_post(
        &self,
        path: &str,
        token: &str,
        device: Option<&str>,
        body: Option<&Value>,
    ) -> Response {
        let mut request = self.client.post(self.url(path)).bearer_auth(token);
        if let Some(device) = device {
            request = request.header("x-device-id", device);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.expect("request")
    }

    /// A request as `session`'s device: its access token and `X-Device-Id`.
    pub fn as_device(&self, method: Method, path: &str, session: &Session) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&session.access)
            .header("x-device-id", &session.device_id)
    }

    /// GET `path` as `session`'s device.
    pub async fn device_get(&self, path: &str, session: &Session) -> Response {
        self.as_device(Method::GET, path, session)
            .send()
            .await
            .expect("request")
    }

    // --- identity ---------------------------------------------------------

    /// Registers `email` with a fresh device `device_id` (see
    /// [`credentials`]); asserts 201 and reads the session.
    pub async fn register(&self, email: &str, device_id: &str) -> Session {
        let response = self
            .post_json("/v1/auth/register", &credentials(email, device_id))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        Session::from_response(response, device_id).await
    }

    /// `POST /v1/auth/login` with [`credentials`]; the caller checks it.
    pub async fn login(&self, email: &str, device_id: &str) -> Response {
        self.post_json("/v1/auth/login", &credentials(email, device_id))
            .await
    }

    /// `POST /v1/auth/refresh`; the caller checks it (see
    /// [`Session::from_response`] for a 200).
    pub async fn refresh(&self, token: &str, device_id: &str, fingerprint: &str) -> Response {
        self.post_json(
            "/v1/auth/refresh",
            &json!({"refresh_token": token, "device_id": device_id, "device_fingerprint": fingerprint}),
        )
        .await
    }

    /// A protected call: `POST /v1/attestation/nonce` with `token` for
    /// `device_id` (201 when the token and device are accepted).
    pub async fn probe(&self, token: &str, device_id: &str) -> Response {
        self.device_post("/v1/attestation/nonce", token, Some(device_id), None)
            .await
    }

    /// `POST /v1/attestation/verify` with `body` as `session`'s device.
    pub async fn attestation_verify(&self, session: &Session, body: &Value) -> Response {
        self.as_device(Method::POST, "/v1/attestation/verify", session)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    // --- device routes ----------------------------------------------------

    /// `POST /v1/signals/heartbeat` with `body` as `session`'s device.
    pub async fn heartbeat(&self, session: &Session, body: &Value) -> Response {
        self.as_device(Method::POST, "/v1/signals/heartbeat", session)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// `GET /v1/security/trust-score` as `session`'s device; asserts 200.
    pub async fn trust_score_json(&self, session: &Session) -> Value {
        let response = self.device_get("/v1/security/trust-score", session).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }

    /// `GET /v1/billing/subscription` as `session`'s device.
    pub async fn subscription(&self, session: &Session) -> Response {
        self.device_get("/v1/billing/subscription", session).await
    }

    /// `ws://…/v1/security/kill-switch<query>`.
    pub fn kill_switch_url(&self, query: &str) -> String {
        format!(
            "{}/v1/security/kill-switch{query}",
            self.address.replace("http://", "ws://")
        )
    }

    /// Opens the kill-switch socket as `session`'s device (bearer in the
    /// `Authorization` header); panics when the handshake is refused.
    pub async fn kill_switch(&self, session: &Session) -> Socket {
        let mut request = self
            .kill_switch_url("")
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", session.access)
                .parse()
                .expect("header"),
        );
        tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("handshake refused: {e:?}"))
            .0
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.expect("text")
    }

    // --- admin --------------------------------------------------------------

    /// `method path` with the admin key, and `body` as JSON if given; the
    /// caller checks it. Panics when the server has no admin key.
    pub async fn admin(&self, method: Method, path: &str, body: Option<&Value>) -> Response {
        let key = self
            .admin_key
            .as_deref()
            .expect("the server was started with an admin_token");
        let mut request = self.client.request(method, self.url(path)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.expect("request")
    }

    /// GET `path` with the admin key; asserts 200.
    pub async fn admin_json(&self, path: &str) -> Value {
        let response = self.admin(Method::GET, path, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }

    /// The admin view of device `id`; asserts 200.
    pub async fn admin_device(&self, id: &str) -> Value {
        self.admin_json(&format!("/v1/admin/devices/{id}")).await
    }

    /// Locks device `id` with `action` (reason `fraud_team`); asserts 200
    /// and returns the issued command.
    pub async fn lock(&self, id: &str, action: &str) -> Value {
        let response = self
            .admin(
                Method::POST,
                &format!("/v1/admin/devices/{id}/lock"),
                Some(&json!({"action": action, "reason": "fraud_team"})),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }

    /// Unlocks device `id`; asserts 200 and returns the issued command.
    pub async fn unlock(&self, id: &str) -> Value {
        let response = self
            .admin(
                Method::POST,
                &format!("/v1/admin/devices/{id}/unlock"),
                Some(&json!({})),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }
}
