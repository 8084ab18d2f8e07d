//! `/v1/auth/*`: register, login, refresh, logout.

use axum::{extract::State, http::StatusCode, Json as JsonResponse};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{json::Json, validate};
use crate::{
    app::AppState,
    auth::sessions::{DeviceBinding, Opener, Origin, SessionTokens},
    error::{codes, ApiError, Problem},
    http::extract::{ClientIp, DeviceAuth},
};

/// The auth routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_register))
        .routes(routes!(post_login))
        .routes(routes!(post_refresh))
        .routes(routes!(post_logout))
}

/// Sign-up or sign-in on a device.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Email address (compared case-insensitively).
    #[schema(example = "ana@example.com")]
    pub email: String,
    /// 8–256 characters.
    pub password: String,
    /// 8–64 characters of `[A-Za-z0-9_-]`.
    #[schema(example = "a1b2c3d4e5f6")]
    pub device_id: String,
    /// The app's stable hardware/install fingerprint; only its SHA-256 is stored.
    pub device_fingerprint: String,
    /// `android` or `ios`.
    #[schema(example = "android")]
    pub platform: String,
}

impl Credentials {
    /// Checks every field (422 naming the first bad one); returns the
    /// normalised (lower-cased) email.
    fn validate(&self) -> Result<String, ApiError> {
        let email = validate::email(&self.email)?;
        validate::password(&self.password)?;
        validate::device(&self.device_id, &self.device_fingerprint, &self.platform)?;
        Ok(email)
    }

    fn binding(&self) -> DeviceBinding<'_> {
        DeviceBinding {
            device_id: &self.device_id,
            fingerprint: &self.device_fingerprint,
            platform: &self.platform,
        }
    }
}

/// A refresh-token exchange.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token last issued to this device.
    pub refresh_token: String,
    /// The device it was issued to.
    pub device_id: String,
    /// The fingerprint it was issued to.
    pub device_fingerprint: String,
}

fn origin(ip: ClientIp, headers: &axum::http::HeaderMap) -> Origin {
    Origin {
        ip: ip.0,
        user_agent: headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect()),
    }
}

/// Creates an account and signs the device in.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = Credentials,
    responses(
        (status = 201, description = "Account created; device session opened", body = SessionTokens),
        (status = 409, description = "`email_taken`, `device_in_use` or `too_many_devices`; nothing was created", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`service_unavailable`: too many passwords being hashed at once; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_register(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    Json(mut body): Json<Credentials>,
) -> Result<(StatusCode, JsonResponse<SessionTokens>), ApiError> {
    let email = body.validate()?;
    state
        .firewall
        .check(
            "create:user",
            crate::firewall::Subject {
                ip: origin(ip, &headers).ip,
                user_id: None,
                device_id: Some(&body.device_id),
            },
        )
        .await?;
    // Before hashing or creating anything: a registration naming a device
    // it may not take leaves nothing behind.
    state.sessions.check_device(None, body.binding()).await?;
    let hash = state
        .passwords
        .hash(std::mem::take(&mut body.password))
        .await?;
    let origin = origin(ip, &headers);
    let tokens = state
        .sessions
        .register(&email, hash, body.binding(), &origin)
        .await?;
    Ok((StatusCode::CREATED, JsonResponse(tokens)))
}

/// Signs a device in with email and password.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = Credentials,
    responses(
        (status = 200, description = "Device session opened", body = SessionTokens),
        (status = 401, description = "`invalid_credentials` (unknown email and wrong password alike)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`account_blocked` or `device_locked`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`device_in_use` or `too_many_devices`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: the address is throttled, or this email's wrong passwords are backing off; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`service_unavailable`: too many passwords being checked at once; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_login(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    Json(mut body): Json<Credentials>,
) -> Result<JsonResponse<SessionTokens>, ApiError> {
    let email = body.validate()?;
    let origin = origin(ip, &headers);
    let user = state.store.user_by_email(&email).await?;
    // Before the hash: a throttled scope, or an account whose wrong
    // passwords are backing off, is refused whatever the password.
    state
        .firewall
        .throttled(
            "login:failed",
            crate::firewall::Subject {
                ip: origin.ip,
                user_id: user.as_ref().map(|u| u.id),
                device_id: Some(&body.device_id),
            },
        )
        .await?;
    state.sessions.login_allowed(&email).await?;
    let ok = state
        .passwords
        .verify(
            std::mem::take(&mut body.password),
            user.as_ref().map(|u| u.password_hash.clone()),
        )
        .await?;
    let user = match user {
        Some(user) if ok => user,
        other => {
            state.sessions.login_failed(&email).await?;
            let user_id = other.as_ref().map(|u| u.id);
            state
                .firewall
                .check(
                    "login:failed",
                    crate::firewall::Subject {
                        ip: origin.ip,
                        user_id,
                        device_id: Some(&body.device_id),
                    },
                )
                .await?;
            let event = state.auth.event(
                "login:failed",
                user_id,
                Some(&body.device_id),
                origin.ip,
                serde_json::json!({"reason": "invalid_credentials"}),
            );
            state.store.record_event(event).await?;
            return Err(ApiError::unauthorized(
                codes::INVALID_CREDENTIALS,
                "The email or password is incorrect.",
            ));
        }
    };
    state.sessions.login_succeeded(&email).await?;
    let tokens = state
        .sessions
        .open(&user, body.binding(), &origin, Opener::User)
        .await?;
    Ok(JsonResponse(tokens))
}

/// Exchanges a refresh token for a new token pair (rotation on every use).
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 200, description = "New token pair; the presented refresh token is spent", body = SessionTokens),
        (status = 401, description = "`invalid_refresh_token`, or `refresh_token_reused` (the session and device were revoked)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_refresh(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    Json(body): Json<RefreshRequest>,
) -> Result<JsonResponse<SessionTokens>, ApiError> {
    validate::device_id(&body.device_id)?;
    validate::fingerprint(&body.device_fingerprint)?;
    if body.refresh_token.is_empty() || body.refresh_token.len() > 256 {
        return Err(ApiError::invalid_field(
            "refresh_token",
            "must be 1–256 characters",
        ));
    }
    let tokens = state
        .sessions
        .refresh(
            &body.refresh_token,
            &body.device_id,
            &body.device_fingerprint,
            &origin(ip, &headers),
        )
        .await?;
    Ok(JsonResponse(tokens))
}

/// Ends the device's session: its refresh-token family is revoked, and its
/// kill-switch sockets close with 4004 `revoked`.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth",
    params(("X-Device-Id" = String, Header, description = "The device the token is bound to")),
    security(("device_jwt" = [])),
    responses(
        (status = 204, description = "Signed out: the refresh family is revoked and the access token presented is refused from now on, until it expires"),
        (status = 401, description = "`invalid_token` (sign in again), `token_expired` (refresh), `device_mismatch` or `device_revoked`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_logout(
    State(state): State<AppState>,
    device: DeviceAuth,
) -> Result<StatusCode, ApiError> {
    state.sessions.logout(&device).await?;
    // A socket opened with this session must not outlive it.
    if let Err(e) = crate::realtime::disconnect(
        state.shared.as_ref(),
        &device.device_id,
        crate::realtime::CloseReason::Revoked,
    )
    .await
    {
        tracing::warn!(error = %e, "closing the device's sockets after logout failed");
    }
    Ok(StatusCode::NO_CONTENT)
}
