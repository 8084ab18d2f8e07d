//! The JSON Web Key Set: every public key that may still verify a live token.

use axum::{extract::State, http::header, response::IntoResponse, Json};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;

/// The JWKS routes (public and internal paths serve the same set).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_jwks))
        .routes(routes!(get_internal_jwks))
}

fn jwks(state: &AppState) -> impl IntoResponse {
    (
        // Short enough that verifiers pick up a rotation well before the old
        // key leaves the set.
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(state.auth.keys.current().jwks.clone()),
    )
}

/// The signing keys' public halves (RFC 7517), each with `kid`, `alg` and `use`.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "JSON Web Key Set", body = Object)))]
pub async fn get_jwks(State(state): State<AppState>) -> impl IntoResponse {
    jwks(&state)
}

/// The same key set, for internal verifiers.
#[utoipa::path(get, path = "/internal/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "JSON Web Key Set", body = Object)))]
pub async fn get_internal_jwks(State(state): State<AppState>) -> impl IntoResponse {
    jwks(&state)
}
