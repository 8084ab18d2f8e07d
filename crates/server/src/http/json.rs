//! The strict JSON body extractor.
//!
//! axum's own `Json` answers bad input with plain-text rejections and one
//! status for every kind of mistake. The contract wants more: malformed JSON is
//! 400 `invalid_body`; a well-formed body with a wrong, missing or unknown
//! field is 422 `validation_failed` naming that field; more than 64 KiB is 413;
//! a body that is not `application/json` is 415. Request types derive
//! `Deserialize` with `#[serde(deny_unknown_fields)]`.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{header, StatusCode},
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The most a request body may hold (API.md, "Conventions").
pub const BODY_LIMIT: usize = 64 * 1024;

/// A JSON request body, validated strictly (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawJson(bytes) = RawJson::from_request(req, state).await?;
        parse(&bytes).map(Json)
    }
}

/// The raw bytes of a JSON body (content type and size checked), for
/// handlers that keep the bytes (a queue job, a signature check).
#[derive(Debug, Clone, Default)]
pub struct RawJson(pub Bytes);

impl<S> FromRequest<S> for RawJson
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::InvalidBody("The request body could not be read.".into())
            }
        })?;
        Ok(Self(bytes))
    }
}

/// Parses `bytes` as `T`, classifying failures as the contract asks.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // The fast path: most bodies are valid. Only a failure pays for the
    // path-tracking parse that names the offending field.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(classify)?;
    // Trailing bytes after the value make the body malformed too.
    de.end().map_err(|e| {
        ApiError::InvalidBody(format!(
            "The request body is not valid JSON: {}.",
            strip_position(&e.to_string())
        ))
    })?;
    Ok(value)
}

fn classify(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                // serde_path_to_error already ends the path with an unknown
                // field's name; a missing field's name must be appended.
                let field = unknown_field_name(&message)
                    .map(|name| {
                        if path == name || path.ends_with(&format!(".{name}")) {
                            path.clone()
                        } else {
                            join_path(&path, name)
                        }
                    })
                    .or_else(|| missing_field_name(&message).map(|name| join_path(&path, name)))
                    .unwrap_or_else(|| if path == "." { "body".to_owned() } else { path });
                ApiError::Validation {
                    field,
                    message: strip_position(&message),
                }
            }
            _ => ApiError::InvalidBody(format!(
                "The request body is not valid JSON: {}.",
                strip_position(&inner.to_string())
            )),
        }
    }
}

fn join_path(path: &str, name: &str) -> String {
    if path == "." || path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    let end = rest.find('`')?;
    Some(&rest[..end])
}

fn unknown_field_name(message: &str) -> Option<&str> {
    backticked(message, "unknown field `")
}

fn missing_field_name(message: &str) -> Option<&str> {
    backticked(message, "missing field `")
}

/// serde_json appends " at line L column C"; useful to a developer, but it is
/// noise in an API error, so it is dropped.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        x: f64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
        inner: Option<Inner>,
    }

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::Validation { field, .. } => field,
            other => panic!("expected validation error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_json_is_invalid_body() {
        for raw in [
            "{",
            "nope",
            "{\"name\": }",
            "{\"name\":\"a\",\"count\":1} x",
            "",
        ] {
            assert!(
                matches!(parse::<Body>(raw.as_bytes()), Err(ApiError::InvalidBody(_))),
                "{raw}"
            );
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let err = parse::<Body>(br#"{"name":"a","count":-1}"#).expect_err("negative");
        assert_eq!(field_of(err), "count");
        let err = parse::<Body>(br#"{"name":"a"}"#).expect_err("missing");
        assert_eq!(field_of(err), "count");
        let err = parse::<Body>(br#"{"name":"a","count":1,"extra":true}"#).expect_err("unknown");
        assert_eq!(field_of(err), "extra");
        let err =
            parse::<Body>(br#"{"name":"a","count":1,"inner":{"x":1,"y":2}}"#).expect_err("nested");
        assert_eq!(field_of(err), "inner.y");
        let err = parse::<Body>(br#"{"name":"a","count":1,"inner":{"x":"s"}}"#).expect_err("type");
        assert_eq!(field_of(err), "inner.x");
        let err = parse::<Body>(br#""just a string""#).expect_err("not an object");
        assert_eq!(field_of(err), "body");
    }

    #[test]
    fn good_body_parses() {
        let body: Body = parse(br#"{"name":"a","count":3}"#).expect("valid");
        assert_eq!(body.count, 3);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse::<Body>(&raw);
        }
    }
}
