//! The integrator's identity, server to server: `POST /v1/admin/users`
//! maps the integrator's own user id (`external_id`) to a BlockRemote user,
//! and `POST /v1/admin/sessions` signs a device in for a user named either
//! way — so a bank never gives BlockRemote a password. Users named by an
//! external id can be listed by prefix and deleted, which is how tagged
//! users (the simulator's `simulate:` ones, a bank's test customers) are
//! removed. (Device control and the global kill-switch are in `devices.rs`.)

use axum::{
    extract::{rejection::QueryRejection, Path, Query, State},
    http::StatusCode,
    Json as JsonResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{json::Json, paging, validate};
use crate::{
    app::AppState,
    auth::{
        sessions::{DeviceBinding, Opener, Origin, SessionTokens},
        Auth,
    },
    error::{codes, ApiError, Problem},
    http::extract::{AdminAuth, ClientIp},
    state::keys,
    store::{AuditSource, EnsuredUser, NewAuditEntry, StoreError, User},
};

/// The admin routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_user, get_users))
        .routes(routes!(delete_user))
        .routes(routes!(post_session))
}

/// Map one of the integrator's users to a BlockRemote user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalUserRequest {
    /// The integrator's own, stable id for the user: 1–128 visible ASCII
    /// characters, compared exactly. Use an opaque customer reference, not
    /// an account number or a national id.
    #[schema(min_length = 1, max_length = 128, example = "cust_8412")]
    pub external_id: String,
    /// Optional; unique among users. The user still has no password.
    #[serde(default)]
    #[schema(format = "email")]
    pub email: Option<String>,
}

/// The BlockRemote user of an external id.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExternalUser {
    /// The BlockRemote user id.
    pub user_id: Uuid,
    /// The integrator's id, as given.
    pub external_id: String,
    /// True when this call created the user.
    pub created: bool,
}

/// Creates the user of `external_id`, or returns the one it already has
/// (idempotent: the same request answers 201 once, then 200).
#[utoipa::path(post, path = "/v1/admin/users", tag = "admin", request_body = ExternalUserRequest,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "User created", body = ExternalUser),
        (status = 200, description = "The external id already had this user (same email, or none given)", body = ExternalUser),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`external_id_conflict` (the external id's user has another email) or `email_taken` (another user has this email)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`external_id` or `email`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_user(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Json(body): Json<ExternalUserRequest>,
) -> Result<(StatusCode, JsonResponse<ExternalUser>), ApiError> {
    validate::external_id("external_id", &body.external_id)?;
    let email = body.email.as_deref().map(validate::email).transpose()?;
    let (user, created) =
        ensure_user(&state, &admin, &body.external_id, email.as_deref(), ip).await?;
    if let Some(email) = &email {
        if !created && user.email != *email {
            return Err(ApiError::conflict(
                codes::EXTERNAL_ID_CONFLICT,
                "This external id already has a user with another email.",
            ));
        }
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        JsonResponse(ExternalUser {
            user_id: user.id,
            external_id: body.external_id,
            created,
        }),
    ))
}

/// Query of `GET /v1/admin/users`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsersQuery {
    /// Users whose `external_id` starts with this (1–128 characters, as an
    /// external id).
    pub external_id_prefix: String,
    /// Users per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of users.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    /// Users in id (creation) order; `created` is always false here.
    pub items: Vec<ExternalUser>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// List the users whose external id starts with a prefix.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", params(UsersQuery),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "One page", body = UserPage),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`external_id_prefix`, `limit`, `cursor` or `query`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_users(
    State(state): State<AppState>,
    _admin: AdminAuth,
    query: Result<Query<UsersQuery>, QueryRejection>,
) -> Result<JsonResponse<UserPage>, ApiError> {
    let query = paging::query(query)?;
    validate::external_id("external_id_prefix", &query.external_id_prefix)?;
    let limit = paging::limit(query.limit)?;
    let after = paging::id_position(query.cursor.as_deref())?;
    let users = state
        .store
        .users_by_external_prefix(&query.external_id_prefix, after, limit + 1)
        .await?;
    let (users, next_cursor) = paging::id_page(users, limit, |u| u.id);
    let items = users
        .into_iter()
        .filter_map(|u| {
            Some(ExternalUser {
                user_id: u.id,
                external_id: u.external_id?,
                created: false,
            })
        })
        .collect();
    Ok(JsonResponse(UserPage { items, next_cursor }))
}

/// Delete a user: its subscription, devices, their sessions and holds go;
/// every device is refused at once, on every instance. Audit rows and
/// business events stay (append-only, with pseudonymous ids); an audit row
/// `user_deleted` records the deletion.
#[utoipa::path(delete, path = "/v1/admin/users/{user_id}", tag = "admin",
    params(("user_id" = Uuid, Path, description = "The user")),
    security(("admin_key" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`user_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (`user_id` is not a UUID)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_user(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    user_id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(user_id) =
        user_id.map_err(|_| ApiError::invalid_field("user_id", "must be a UUID"))?;
    let devices = state
        .store
        .delete_user(user_id, operator_audit(&admin, user_id, ip, "user_deleted"))
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::Client {
                status: StatusCode::NOT_FOUND,
                code: codes::USER_NOT_FOUND,
                detail: "No user has this id.",
            },
            other => other.into(),
        })?;
    for device_id in &devices {
        state.auth.devices.invalidate(device_id).await;
        forget_device(&state, device_id).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// After a deletion: the device's sockets close (4004, as for a revoked
/// session) and what shared state keeps of it goes, so a device that signs
/// in again under the same id starts afresh. Its command sequence stays, so
/// the app's "highest seq seen" never runs ahead of new commands.
async fn forget_device(state: &AppState, device_id: &str) {
    state.scoring.forget_device(device_id);
    state.hub.forget_undelivered(device_id);
    if let Err(e) = crate::realtime::disconnect(
        state.shared.as_ref(),
        device_id,
        crate::realtime::CloseReason::Revoked,
    )
    .await
    {
        tracing::warn!(error = %e, device_id, "a deleted device's sockets were not told to close");
    }
    for key in [
        keys::signal_state(device_id),
        keys::trust_report(device_id),
        keys::heartbeat_seq(device_id),
        keys::force_overlay(device_id),
        keys::revoked_device(device_id),
        keys::nonce(device_id),
        keys::rate_limit(device_id),
        keys::refresh_rate_limit(device_id),
    ] {
        if let Err(e) = state.shared.delete(&key).await {
            tracing::warn!(error = %e, device_id, "a deleted device's state was not removed");
        }
    }
}

/// The audit row of an operator's action on a user (`decision_reason`:
/// which admin key, as `admin:` and 8 hex digits of its hash).
fn operator_audit(admin: &AdminAuth, user_id: Uuid, ip: ClientIp, action: &str) -> NewAuditEntry {
    NewAuditEntry {
        user_id: Some(user_id),
        device_id: None,
        jti: None,
        ip: Auth::ip_prefix(ip.0),
        user_agent: None,
        source: AuditSource::Http,
        threat_score: None,
        decision_reason: None,
        attestation_state: None,
        action_taken: action.to_owned(),
        actor: Some(admin.operator.clone()),
        request_id: None,
    }
}

/// The user of `external_id`, created (and audited) when it has none.
async fn ensure_user(
    state: &AppState,
    admin: &AdminAuth,
    external_id: &str,
    email: Option<&str>,
    ip: ClientIp,
) -> Result<(User, bool), ApiError> {
    let ensured = state
        .store
        .ensure_external_user(external_id, email)
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => ApiError::conflict(
                codes::EMAIL_TAKEN,
                "An account with this email already exists.",
            ),
            other => other.into(),
        })?;
    match ensured {
        EnsuredUser::Existing(user) => Ok((user, false)),
        EnsuredUser::Created(user) => {
            state
                .store
                .append_audit(operator_audit(admin, user.id, ip, "user_created:external"))
                .await?;
            Ok((user, true))
        }
    }
}

/// Mint a device session for a user, named by its id or its external id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminSessionRequest {
    /// The user (authenticated elsewhere by the calling app). Exactly one of
    /// `user_id` and `external_user_id`.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// The integrator's id for the user (`POST /v1/admin/users`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub external_user_id: Option<String>,
    /// With `external_user_id`: create the user on first use instead of
    /// answering 404 `user_not_found`.
    #[serde(default)]
    pub create: bool,
    /// 8–64 characters of `[A-Za-z0-9_-]`.
    pub device_id: String,
    /// The app's device fingerprint.
    pub device_fingerprint: String,
    /// `android` or `ios`.
    pub platform: String,
}

/// Server-to-server sign-in: mints a device session for an existing user.
#[utoipa::path(post, path = "/v1/admin/sessions", tag = "admin", request_body = AdminSessionRequest,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "Device session opened", body = SessionTokens),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`user_not_found` (no such `user_id`, or an unknown `external_user_id` without `create`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: the device fields, or not exactly one of `user_id` and `external_user_id`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`account_blocked` or `device_locked`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`device_in_use` (operators are not held to `BLOCKREMOTE_MAX_DEVICES_PER_USER`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_session(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Json(body): Json<AdminSessionRequest>,
) -> Result<(StatusCode, JsonResponse<SessionTokens>), ApiError> {
    validate::device(&body.device_id, &body.device_fingerprint, &body.platform)?;
    let not_found = ApiError::Client {
        status: StatusCode::NOT_FOUND,
        code: codes::USER_NOT_FOUND,
        detail: "No user has this id.",
    };
    let user = match (body.user_id, body.external_user_id.as_deref()) {
        (Some(id), None) => {
            if body.create {
                return Err(ApiError::invalid_field(
                    "create",
                    "applies to external_user_id only",
                ));
            }
            state.store.user_by_id(id).await?.ok_or(not_found)?
        }
        (None, Some(external)) => {
            validate::external_id("external_user_id", external)?;
            if body.create {
                ensure_user(&state, &admin, external, None, ip).await?.0
            } else {
                state
                    .store
                    .user_by_external_id(external)
                    .await?
                    .ok_or(not_found)?
            }
        }
        _ => {
            return Err(ApiError::invalid_field(
                "user_id",
                "give exactly one of user_id and external_user_id",
            ))
        }
    };
    let binding = DeviceBinding {
        device_id: &body.device_id,
        fingerprint: &body.device_fingerprint,
        platform: &body.platform,
    };
    let origin = Origin {
        ip: ip.0,
        user_agent: None,
    };
    let tokens = state
        .sessions
        .open(&user, binding, &origin, Opener::Operator)
        .await?;
    Ok((StatusCode::CREATED, JsonResponse(tokens)))
}
