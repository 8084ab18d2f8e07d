//! `/v1/admin/firewall/*`: rules as data, decisions, and undo.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    Json as JsonResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::json::Json;
use crate::{
    app::AppState,
    error::{codes, ApiError, Problem},
    firewall,
    http::extract::{AdminAuth, ClientIp},
    store::{FirewallDecision, FirewallRule, NewAuditEntry, RuleMode, RuleUpdate, SideEffect},
};

/// The firewall routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_rules))
        .routes(routes!(put_rule))
        .routes(routes!(get_decisions))
        .routes(routes!(post_undo))
}

/// The rules.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    /// Every rule, by name.
    pub items: Vec<FirewallRule>,
}

/// Lists the rules.
#[utoipa::path(get, path = "/v1/admin/firewall/rules", tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every rule", body = RuleList),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_rules(
    State(state): State<AppState>,
    _admin: AdminAuth,
) -> Result<JsonResponse<RuleList>, ApiError> {
    Ok(JsonResponse(RuleList {
        items: state.store.firewall_rules().await?,
    }))
}

const MAX_SECONDS: u32 = 30 * 86_400;

fn validate(update: &RuleUpdate) -> Result<(), ApiError> {
    if update
        .threshold
        .is_some_and(|t| !(1..=1_000_000).contains(&t))
    {
        return Err(ApiError::invalid_field(
            "threshold",
            "must be within 1–1000000",
        ));
    }
    if update
        .window_seconds
        .is_some_and(|w| !(1..=MAX_SECONDS).contains(&w))
    {
        return Err(ApiError::invalid_field(
            "window_seconds",
            "must be within 1–2592000",
        ));
    }
    if update.lookback_seconds.is_some_and(|l| l > MAX_SECONDS) {
        return Err(ApiError::invalid_field(
            "lookback_seconds",
            "must be within 0–2592000",
        ));
    }
    if update
        .mode
        .as_deref()
        .is_some_and(|m| RuleMode::parse(m).is_none())
    {
        return Err(ApiError::invalid_field(
            "mode",
            "must be enforce, simulate or off",
        ));
    }
    if update
        .side_effect
        .as_deref()
        .is_some_and(|m| SideEffect::parse(m).is_none())
    {
        return Err(ApiError::invalid_field(
            "side_effect",
            "must be block_users, quarantine_devices or throttle",
        ));
    }
    Ok(())
}

/// Changes a rule; every instance applies it within seconds.
#[utoipa::path(put, path = "/v1/admin/firewall/rules/{name}", tag = "admin", request_body = RuleUpdate,
    params(("name" = String, Path, description = "The rule")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The rule, with its new version", body = FirewallRule),
        (status = 404, description = "`rule_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_rule(
    State(state): State<AppState>,
    admin: AdminAuth,
    ip: ClientIp,
    Path(name): Path<String>,
    Json(update): Json<RuleUpdate>,
) -> Result<JsonResponse<FirewallRule>, ApiError> {
    validate(&update)?;
    let rule = state
        .store
        .update_firewall_rule(&name, &update)
        .await?
        .ok_or(ApiError::Client {
            status: StatusCode::NOT_FOUND,
            code: codes::RULE_NOT_FOUND,
            detail: "No firewall rule has this name.",
        })?;
    state
        .store
        .append_audit(NewAuditEntry::operation(
            &admin.operator,
            "firewall_rule_updated",
            format!(
                "{} v{} mode={} threshold={} window={}s",
                rule.name,
                rule.version,
                rule.mode.as_str(),
                rule.threshold,
                rule.window_seconds
            ),
            crate::auth::Auth::ip_prefix(ip.0),
        ))
        .await?;
    state.firewall.rules().reload(state.store.as_ref()).await?;
    if let Err(e) = state.shared.publish(firewall::CHANGED_CHANNEL, b"1").await {
        tracing::warn!(error = %e, "rule change not broadcast; instances reload within seconds anyway");
    }
    Ok(JsonResponse(rule))
}

/// Query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DecisionsQuery {
    /// At most this many, newest first (1–200, default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// Decisions.
#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionList {
    /// Newest first.
    pub items: Vec<FirewallDecision>,
}

/// Lists the newest decisions.
#[utoipa::path(get, path = "/v1/admin/firewall/decisions", tag = "admin",
    params(DecisionsQuery),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Decisions, newest first", body = DecisionList),
        (status = 401, description = "`invalid_admin_key`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_decisions(
    State(state): State<AppState>,
    _admin: AdminAuth,
    query: Result<Query<DecisionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<JsonResponse<DecisionList>, ApiError> {
    let query = super::paging::query(query)?;
    let limit = super::paging::limit(query.limit)?;
    Ok(JsonResponse(DecisionList {
        items: state.store.firewall_decisions(limit).await?,
    }))
}

/// Undoes a decision: exactly its users unblocked and devices unlocked.
#[utoipa::path(post, path = "/v1/admin/firewall/decisions/{id}/undo", tag = "admin",
    params(("id" = Uuid, Path, description = "The decision")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Undone", body = FirewallDecision),
        (status = 404, description = "`decision_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_undone`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_undo(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path(id): Path<Uuid>,
) -> Result<JsonResponse<FirewallDecision>, ApiError> {
    match state.firewall.undo(id, &admin.operator).await? {
        None => Err(ApiError::Client {
            status: StatusCode::NOT_FOUND,
            code: codes::DECISION_NOT_FOUND,
            detail: "No firewall decision has this id.",
        }),
        Some((_, false)) => Err(ApiError::conflict(
            codes::ALREADY_UNDONE,
            "This decision was already undone.",
        )),
        Some((decision, true)) => Ok(JsonResponse(decision)),
    }
}
