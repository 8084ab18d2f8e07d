//! `GET /v1/security/kill-switch`: the WebSocket handshake.
//!
//! Checks, in order: no `token` (or `access_token`) query parameter in any
//! case (400 `token_in_query` — a token in a URL ends up in proxy logs); an
//! `Origin`, when sent, on the allow-list (403 `origin_not_allowed`); the
//! handshake rate per client address — per IPv4 address, per IPv6 /64, since
//! one host is given a whole /64 (429); credentials from `Authorization:
//! Bearer` or `Sec-WebSocket-Protocol: blockremote.v1, bearer.<jwt>` (then
//! `blockremote.v1` is selected); `X-Device-Id`, when sent, equal to the
//! token's device; room in the hub (the device's oldest socket is replaced
//! beyond its cap; else 503 `too_many_connections` beyond the user's or the
//! instance's cap, see `realtime::hub`). Socket buffers are sized for many
//! idle sockets; a message over [`MAX_MESSAGE`] closes the socket with 1009.
//! The socket closes at the token's `exp` (4002 `token_expired`).

use axum::{
    extract::{
        ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade},
        Query, State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    app::AppState,
    error::{codes, ApiError, Problem},
    http::extract::{authenticate, ClientIp, DeviceGate, DEVICE_ID_HEADER},
    realtime::{hub::Full, socket},
    state::keys,
};

/// The subprotocol of this API.
pub const SUBPROTOCOL: &str = "blockremote.v1";
/// Bytes read from the socket at a time; clients only send small acks.
const READ_BUFFER: usize = 4 * 1024;
/// Longest a handshake may take on the server before it is refused.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest message accepted from a client.
pub const MAX_MESSAGE: usize = 4 * 1024;

/// The kill-switch route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_kill_switch))
}

fn bearer_from_protocols(headers: &HeaderMap) -> (Option<String>, bool) {
    let mut token = None;
    let mut offers_v1 = false;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        for item in value.to_str().unwrap_or_default().split(',') {
            let item = item.trim();
            if item == SUBPROTOCOL {
                offers_v1 = true;
            } else if let Some(jwt) = item.strip_prefix("bearer.") {
                token = Some(jwt.to_owned());
            }
        }
    }
    (token, offers_v1)
}

/// Opens the kill-switch socket (WebSocket; JSON text frames of at most 4 KiB).
///
/// The server first sends the device's state, `{"type":"state","locked":bool,"action":string|null,"seq":int}`,
/// which is authoritative over any history replayed after it; then every command the device has
/// not acknowledged, then live ones: `{"type":"command","id","seq","action","reason","issued_at"}`
/// with `action` one of `CRITICAL_LOCK`, `IMMEDIATE_QUARANTINE`, `FORCE_OVERLAY`, `UNLOCK` and
/// `seq` increasing per device. The client answers `{"type":"ack","id"}` (delivery is
/// at-least-once across reconnects: dedupe by `id`) and after a reconnect may send
/// `{"type":"resume","since_seq":int}`. Close codes: 1001 shutdown or idle (reconnect), 4001
/// replaced by a newer socket, 4002 token expired (refresh, reconnect), 4003 locked (reconnect
/// to read the state), 4004 revoked (sign in again).
#[utoipa::path(get, path = "/v1/security/kill-switch", tag = "kill-switch",
    params(
        ("X-Device-Id" = Option<String>, Header, description = "When sent, must equal the token's device"),
        ("Sec-WebSocket-Protocol" = Option<String>, Header, description = "`blockremote.v1, bearer.<jwt>` (browsers); native apps send Authorization instead"),
    ),
    security(("device_jwt" = [])),
    responses(
        (status = 101, description = "Switching protocols; the server sends `state` first. \
            The server closes with 4001 `replaced`, 4002 `token_expired` (at the token's `exp`), \
            4003 `locked`, 4004 `revoked`, 1009 (message over 4 KiB), 1001 (shutdown, idle)"),
        (status = 400, description = "`token_in_query` (a `token` or `access_token` query parameter, any case), or not a WebSocket handshake", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`origin_not_allowed`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (handshakes per IPv4 address or IPv6 /64)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`too_many_connections`: the instance's or the user's socket cap, for a device with no socket on this instance", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_kill_switch(
    State(state): State<AppState>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    ip: ClientIp,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    // The whole handshake (checks, token, device lookup) must finish in time.
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(state, query, ip, headers, upgrade, started),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ApiError::Client {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: codes::SERVICE_UNAVAILABLE,
            detail: "The handshake took too long.",
        })
    })
}

async fn handshake(
    state: AppState,
    query: std::collections::HashMap<String, String>,
    ip: ClientIp,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    started: std::time::Instant,
) -> Result<Response, ApiError> {
    if query
        .keys()
        .any(|k| k.eq_ignore_ascii_case("token") || k.eq_ignore_ascii_case("access_token"))
    {
        return Err(ApiError::Client {
            status: StatusCode::BAD_REQUEST,
            code: codes::TOKEN_IN_QUERY,
            detail: "Send the token in the Authorization header or the Sec-WebSocket-Protocol header, never in the URL.",
        });
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| {
            state
                .config
                .allowed_origins
                .iter()
                .any(|a| a == o || a == "*")
        });
        if !allowed {
            return Err(ApiError::forbidden(
                codes::ORIGIN_NOT_ALLOWED,
                "This origin may not open the kill-switch socket.",
            ));
        }
    }
    if let Some(ip) = ip.0 {
        // Keyed by the subscriber: the IPv4 address or the IPv6 /64.
        let scope = crate::auth::client_ip::hmac(state.auth.ip_key(), ip);
        let bucket = state
            .shared
            .take_tokens(
                &keys::ws_handshake_limit(&scope),
                state.config.ws_handshakes_per_minute,
                std::time::Duration::from_secs(60),
                1,
            )
            .await?;
        if !bucket.allowed {
            return Err(ApiError::RateLimited {
                retry_after: bucket.retry_after,
            });
        }
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    let (protocol_token, offers_v1) = bearer_from_protocols(&headers);
    let token = authorization.or(protocol_token).ok_or_else(|| {
        ApiError::unauthorized(
            codes::INVALID_TOKEN,
            "The access token is missing; send it as a Bearer token.",
        )
    })?;
    let header_device = headers.get(DEVICE_ID_HEADER).and_then(|v| v.to_str().ok());
    let (device, _) = authenticate(
        &state,
        &token,
        header_device,
        false,
        DeviceGate::AllowLocked,
    )
    .await?;
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let now = chrono::Utc::now().timestamp();
    let exp = match state.auth.verified.get(&token, now) {
        Some(claims) => claims.exp,
        // Verified a moment ago; only an evicted cache entry lands here.
        None => now + i64::try_from(state.auth.access_ttl.as_secs()).unwrap_or(i64::MAX),
    };
    let token_expires = tokio::time::Instant::now()
        + std::time::Duration::from_secs(u64::try_from(exp - now).unwrap_or(0));
    let registered = match state.hub.register(&device.device_id, device.user_id) {
        Ok(registered) => registered,
        Err(Full::Instance) => {
            return Err(ApiError::Client {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: codes::TOO_MANY_CONNECTIONS,
                detail: "The server holds as many sockets as it allows; retry later.",
            })
        }
        Err(Full::User) => {
            return Err(ApiError::Client {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: codes::TOO_MANY_CONNECTIONS,
                detail: "This account's devices hold as many sockets as they may; close one first.",
            })
        }
    };
    let upgrade = upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE);
    let upgrade = if offers_v1 {
        upgrade.protocols([SUBPROTOCOL])
    } else {
        upgrade
    };
    let handles = socket::SocketHandles {
        store: state.store.clone(),
        shared: state.shared.clone(),
        metrics: state.metrics.clone(),
        hub: state.hub.clone(),
        sequences: state.ingestion.sequences(),
        shutdown: state.shutdown.clone(),
    };
    Ok(upgrade.on_upgrade(move |socket| {
        socket::serve(socket, handles, device, registered, token_expires, started)
    }))
}
