//! The API's self-description: `/openapi.json` and the interactive `/docs`.
//!
//! The OpenAPI document is generated from the handlers' `#[utoipa::path]`
//! annotations as the routers are assembled, so the served routes and the
//! document cannot drift apart. It is serialised once at start.

use std::sync::Arc;

use axum::{
    http::header,
    response::{Html, IntoResponse},
    Extension,
};
use utoipa::openapi::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;

/// The rendered documents, shared with the handlers as an extension.
#[derive(Clone)]
pub struct RenderedDocs {
    json: Arc<str>,
    html: Arc<str>,
}

impl RenderedDocs {
    /// Renders `doc` as JSON and as the interactive reference page.
    pub fn new(doc: &OpenApi) -> Self {
        let json = doc.to_pretty_json().unwrap_or_else(|_| "{}".to_owned());
        let html = utoipa_scalar::Scalar::new(doc.clone()).to_html();
        Self {
            json: json.into(),
            html: html.into(),
        }
    }
}

/// The documentation routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_openapi))
        .routes(routes!(get_docs))
}

/// This OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn get_openapi(Extension(docs): Extension<RenderedDocs>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        docs.json.to_string(),
    )
}

/// The interactive API reference.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "An HTML API reference", body = String, content_type = "text/html")))]
pub async fn get_docs(Extension(docs): Extension<RenderedDocs>) -> Html<String> {
    Html(docs.html.to_string())
}
