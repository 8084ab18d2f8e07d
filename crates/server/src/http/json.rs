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
                    message: plain(&strip_position(&message)),
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

/// serde's messages in words a client developer reads without knowing Rust
/// ("expected u64" → "a whole number, 0 or more"), keeping what they say.
fn plain(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("must be {}, not {got}", expected_in_words(expected));
        }
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("must be {} (got {got})", expected_in_words(expected));
        }
    }
    if missing_field_name(message).is_some() {
        return "is required".to_owned();
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return match rest.split_once(", expected ") {
            Some((_, known)) => format!("is not a known field (expected {known})"),
            None => "is not a known field".to_owned(),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((_, known)) = rest.split_once(", expected ") {
            return format!("must be {known}");
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("must be {expected} (got {got} values)");
        }
    }
    message.to_owned()
}

fn expected_in_words(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number, 0 or more".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a borrowed string" | "a string" => "a string".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "an object".to_owned(),
        e if e.starts_with("struct ") => "an object".to_owned(),
        e if e.contains("UUID") => "a UUID".to_owned(),
        e if e.contains("RFC 3339") || e.contains("datetime") => {
            "an RFC 3339 timestamp (2026-12-01T12:00:00Z)".to_owned()
        }
        other => other.to_owned(),
    }
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

    fn message_of(err: ApiError) -> String {
        match err {
            ApiError::Validation { message, .. } => message,
            other => panic!("expected validation error, got {other:?}"),
        }
    }

    #[test]
    fn messages_speak_json_not_rust() {
        for (raw, field, says) in [
            (
                r#"{"name":"a","count":"7"}"#,
                "count",
                "must be a whole number, 0 or more, not string \"7\"",
            ),
            (
                r#"{"name":"a","count":-1}"#,
                "count",
                "must be a whole number, 0 or more (got integer `-1`)",
            ),
            (
                r#"{"name":7,"count":1}"#,
                "name",
                "must be a string, not integer `7`",
            ),
            (r#"{"name":"a"}"#, "count", "is required"),
            (
                r#"{"name":"a","count":1,"inner":{"x":true}}"#,
                "inner.x",
                "must be a number, not boolean `true`",
            ),
            (
                r#"{"name":"a","count":1,"inner":"x"}"#,
                "inner",
                "must be an object, not string \"x\"",
            ),
        ] {
            let err = parse::<Body>(raw.as_bytes()).expect_err(raw);
            let message = message_of(err);
            assert_eq!(message, says, "{raw}");
            assert!(
                !message.contains("u32") && !message.contains("f64"),
                "{raw}: {message}"
            );
            let err = parse::<Body>(raw.as_bytes()).expect_err(raw);
            assert_eq!(field_of(err), field, "{raw}");
        }
        let err = parse::<Body>(br#"{"name":"a","count":1,"extra":1}"#).expect_err("unknown");
        assert_eq!(
            message_of(err),
            "is not a known field (expected one of `name`, `count`, `inner`)"
        );
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
