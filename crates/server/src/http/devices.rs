//! `/v1/admin/devices/*` and `/v1/admin/kill-switch/global`: operator
//! control of devices through the kill-switch.
//!
//! A lock places an admin hold on the device (API calls refused with 403
//! `device_locked` while any hold remains) and sends the command to the
//! device. Unlock removes the admin and engine holds — or, with `"all": true`,
//! every hold — and sends `UNLOCK`; when holds it does not cover remain
//! (a firewall decision, refresh reuse, attestation), it changes nothing and
//! answers 409 `device_held` naming them. Every command is audited.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json as JsonResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{json::Json, validate};
use crate::{
    app::AppState,
    error::{codes, ApiError, Problem},
    http::extract::{AdminAuth, ClientIp},
    realtime::{self, Action, CloseReason, DeviceCommand},
    state::{keys, StateError},
    store::{
        AttestationGrade, AuditSource, DeviceStatus, Hold, HoldAction, HoldSource, NewAuditEntry,
        NewHold, Release, ReleaseOutcome,
    },
};

/// The device-control routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_lock))
        .routes(routes!(post_unlock))
        .routes(routes!(get_device))
        .routes(routes!(post_global))
}

/// A lock request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// `CRITICAL_LOCK`, `IMMEDIATE_QUARANTINE` or `FORCE_OVERLAY` (`UNLOCK` has its own route).
    pub action: Action,
    /// A reason code, 1–64 characters of `[a-z0-9_.:-]`.
    #[schema(example = "fraud_team_request")]
    pub reason: String,
}

/// An unlock request (the body is optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnlockRequest {
    /// A reason code (default `operator_unlock`).
    pub reason: Option<String>,
    /// Clear every hold, whatever placed it (default: only `admin` and
    /// `engine` holds).
    #[serde(default)]
    pub all: bool,
}

/// A device as operators see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    /// Device id.
    pub device_id: String,
    /// Owner.
    pub user_id: uuid::Uuid,
    /// `android` or `ios`.
    pub platform: String,
    /// `active`, `locked`, `quarantined` or `revoked`: the strongest of its holds.
    pub status: String,
    /// True unless the status is `active`.
    pub locked: bool,
    /// Every restriction on the device, oldest first; it is active only with none.
    pub holds: Vec<Hold>,
    /// Restrictions on the owner's account (a blocked owner is refused on
    /// every device).
    pub user_holds: Vec<Hold>,
    /// The graded attestation as it counts now: `strong`, `device`, `basic`,
    /// `failed` or `unknown` (a verified state past the maximum age is `unknown`).
    pub attestation_state: AttestationGrade,
    /// The provider of the last verdict.
    pub attestation_provider: Option<String>,
    /// When the last verdict was recorded.
    pub attested_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Environment evidence of the last verdict (`controlling_app_detected`, …).
    pub attestation_evidence: Vec<String>,
    /// Attestation failures since the last success.
    pub attestation_failures: u32,
    /// The last command sent to the device.
    pub last_command: Option<DeviceCommand>,
    /// The engine's latest trust report.
    pub trust: crate::signals::report::TrustReport,
    /// When the device last sent a heartbeat that was scored.
    pub last_seen: Option<chrono::DateTime<chrono::Utc>>,
}

fn reason_code(raw: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&raw.len())
        && raw.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b':' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "reason",
            "must be 1–64 characters of a-z, 0-9, _ . : -",
        ))
    }
}

fn not_found() -> ApiError {
    ApiError::Client {
        status: StatusCode::NOT_FOUND,
        code: codes::DEVICE_NOT_FOUND,
        detail: "No device has this id.",
    }
}

fn audit_entry(
    device_id: Option<&str>,
    user_id: Option<uuid::Uuid>,
    action: Action,
    reason: &str,
    ip: ClientIp,
    admin: &AdminAuth,
) -> NewAuditEntry {
    NewAuditEntry {
        user_id,
        device_id: device_id.map(str::to_owned),
        jti: None,
        ip: crate::auth::Auth::ip_prefix(ip.0),
        user_agent: None,
        source: AuditSource::Http,
        threat_score: None,
        decision_reason: Some(reason.to_owned()),
        attestation_state: None,
        action_taken: action.as_str().to_owned(),
        actor: Some(admin.operator.clone()),
        request_id: None,
    }
}

/// Locks a device and sends it the command.
#[utoipa::path(post, path = "/v1/admin/devices/{device_id}/lock", tag = "admin", request_body = LockRequest,
    params(("device_id" = String, Path, description = "The device")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Locked; the command that was sent", body = DeviceCommand),
        (status = 404, description = "`device_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_lock(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Path(device_id): Path<String>,
    Json(body): Json<LockRequest>,
) -> Result<JsonResponse<DeviceCommand>, ApiError> {
    validate::device_id(&device_id)?;
    reason_code(&body.reason)?;
    let action = match body.action {
        Action::CriticalLock | Action::ForceOverlay => HoldAction::Lock,
        Action::ImmediateQuarantine => HoldAction::Quarantine,
        Action::Unlock => {
            return Err(ApiError::invalid_field(
                "action",
                "use POST /v1/admin/devices/{device_id}/unlock to unlock",
            ))
        }
    };
    let device = state
        .store
        .device(&device_id)
        .await?
        .ok_or_else(not_found)?;
    let hold = NewHold {
        created_by: Some(admin.operator.clone()),
        ..NewHold::new(HoldSource::Admin, action, &body.reason)
    };
    let audit = audit_entry(
        Some(&device_id),
        Some(device.user_id),
        body.action,
        &body.reason,
        ip,
        &admin,
    );
    state
        .store
        .hold_device(&device_id, hold, Some(audit))
        .await?
        .ok_or_else(not_found)?;
    state.auth.devices.invalidate(&device_id).await;
    let command = match realtime::issue(
        state.shared.as_ref(),
        state.store.as_ref(),
        &state.metrics,
        realtime::Origin::Admin,
        &device_id,
        body.action,
        &body.reason,
    )
    .await
    {
        Ok(command) => command,
        Err(e @ StateError::Unavailable(_)) => {
            // Shared state is down, so the command has no number and reaches
            // no other instance. The hold is durable (every instance refuses
            // the device once its status cache, 5 s, expires); this
            // instance's sockets of the device close with 4003 now, every
            // other instance's once Redis is back (the hub publishes the
            // disconnect), and a phone that reconnects is told `locked` from
            // the store. The 503 asks the operator to retry for the command
            // itself.
            state.hub.close_everywhere(&device_id, CloseReason::Locked);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    Ok(JsonResponse(command))
}

/// Unlocks a device and sends it `UNLOCK`.
#[utoipa::path(post, path = "/v1/admin/devices/{device_id}/unlock", tag = "admin", request_body(content = Option<UnlockRequest>),
    params(("device_id" = String, Path, description = "The device")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Unlocked; the command that was sent", body = DeviceCommand),
        (status = 409, description = "`device_held`: holds the unlock does not cover remain; nothing was changed", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`device_not_found`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_unlock(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Path(device_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<JsonResponse<DeviceCommand>, ApiError> {
    validate::device_id(&device_id)?;
    // The body is optional: empty means the default reason.
    let request: UnlockRequest = if body.is_empty() {
        UnlockRequest::default()
    } else {
        super::json::parse(&body)?
    };
    let reason = request
        .reason
        .unwrap_or_else(|| "operator_unlock".to_owned());
    reason_code(&reason)?;
    let device = state
        .store
        .device(&device_id)
        .await?
        .ok_or_else(not_found)?;
    let release = if request.all {
        Release::All
    } else {
        Release::UNLOCK
    };
    let audit = audit_entry(
        Some(&device_id),
        Some(device.user_id),
        Action::Unlock,
        &reason,
        ip,
        &admin,
    );
    match state
        .store
        .release_device(&device_id, release, Some(audit))
        .await?
        .ok_or_else(not_found)?
    {
        ReleaseOutcome::Released { .. } => {}
        ReleaseOutcome::Remaining(_) => return Err(still_held()),
    }
    state
        .shared
        .delete(&keys::revoked_device(&device_id))
        .await?;
    state.auth.devices.invalidate(&device_id).await;
    // A lock taken while Redis was down must not close its sockets now.
    state.hub.forget_undelivered(&device_id);
    // The engine forgets the evidence behind the lock (not the baselines).
    state
        .scoring
        .clear_evidence(&device_id)
        .await
        .map_err(ApiError::from)?;
    let command = realtime::issue(
        state.shared.as_ref(),
        state.store.as_ref(),
        &state.metrics,
        realtime::Origin::Admin,
        &device_id,
        Action::Unlock,
        &reason,
    )
    .await?;
    Ok(JsonResponse(command))
}

/// 409 `device_held`: holds an unlock does not cover remain; the device view
/// lists them.
fn still_held() -> ApiError {
    ApiError::Client {
        status: StatusCode::CONFLICT,
        code: codes::DEVICE_HELD,
        detail: "Nothing was changed: holds placed by the firewall, refresh-token reuse or attestation remain (GET the device to see them). Undo the firewall decision, or unlock with \"all\": true to clear every hold.",
    }
}

/// A device's status, lock state and last command.
#[utoipa::path(get, path = "/v1/admin/devices/{device_id}", tag = "admin",
    params(("device_id" = String, Path, description = "The device")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 404, description = "`device_not_found`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_device(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(device_id): Path<String>,
) -> Result<JsonResponse<DeviceView>, ApiError> {
    validate::device_id(&device_id)?;
    let device = state
        .store
        .device(&device_id)
        .await?
        .ok_or_else(not_found)?;
    let last_command = state
        .shared
        .history_since(&keys::force_overlay(&device_id), 0)
        .await?
        .last()
        .and_then(|(seq, payload)| crate::realtime::DeviceCommand::from_history(*seq, payload));
    let trust = super::signals::report_for(&state, &device.id).await?;
    let holds = state.store.device_holds(&device.id).await?;
    let user_holds = state.store.user_holds(device.user_id).await?;
    let attestation = state.auth.devices.attestation_of(&device);
    Ok(JsonResponse(DeviceView {
        device_id: device.id,
        user_id: device.user_id,
        platform: device.platform,
        status: device.status.as_str().to_owned(),
        locked: device.status != DeviceStatus::Active,
        holds,
        user_holds,
        attestation_state: attestation.grade,
        attestation_provider: attestation.provider,
        attested_at: attestation.attested_at,
        attestation_evidence: attestation.evidence,
        attestation_failures: device.attestation_failures,
        last_command,
        last_seen: trust.updated_at,
        trust,
    }))
}

/// Sends a command to every connected device, on every instance.
#[utoipa::path(post, path = "/v1/admin/kill-switch/global", tag = "admin", request_body = LockRequest,
    security(("admin_key" = [])),
    responses(
        (status = 202, description = "Fanning out; each device gets its own sequence number", body = DeviceCommand),
    ))]
pub async fn post_global(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Json(body): Json<LockRequest>,
) -> Result<(StatusCode, JsonResponse<DeviceCommand>), ApiError> {
    reason_code(&body.reason)?;
    let command = realtime::issue_global(state.shared.as_ref(), body.action, &body.reason).await?;
    state
        .store
        .append_audit(audit_entry(
            None,
            None,
            command.action,
            &body.reason,
            ip,
            &admin,
        ))
        .await?;
    Ok((StatusCode::ACCEPTED, JsonResponse(command)))
}
