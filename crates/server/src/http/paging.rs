//! Paged listings (`/v1/audit/logs`, `/v1/admin/events`, firewall
//! decisions): strict query parsing, the page size, and opaque cursors.
//!
//! A cursor names the position `(created_at, id)` of the last item of a
//! page; the next page is everything strictly older. Fetching one item more
//! than the page size tells whether another page exists.

use axum::extract::{rejection::QueryRejection, Query};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine as _};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ApiError;

/// A position in a newest-first listing.
pub type Position = (DateTime<Utc>, Uuid);

/// Query parameters parsed strictly: a malformed or unknown parameter is
/// 422 `validation_failed` naming `query`.
pub fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|q| q.0).map_err(|e| ApiError::Validation {
        field: "query".into(),
        message: e.body_text(),
    })
}

/// A page size: `limit` within 1–200, 50 when absent.
pub fn limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(50);
    if (1..=200).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid_field("limit", "must be within 1–200"))
    }
}

/// The position a `cursor` parameter names (none for the first page).
pub fn position(cursor: Option<&str>) -> Result<Option<Position>, ApiError> {
    cursor
        .map(|raw| {
            decode(raw)
                .ok_or_else(|| ApiError::invalid_field("cursor", "is not a cursor this API issued"))
        })
        .transpose()
}

/// Cuts `items` (fetched with `limit + 1`) to the page and makes the cursor
/// of the next page, if there is one.
pub fn page<T>(
    items: Vec<T>,
    limit: u32,
    position_of: impl Fn(&T) -> Position,
) -> (Vec<T>, Option<String>) {
    cut(items, limit, |item| encode(position_of(item)))
}

/// Cuts `items` (fetched with `limit + 1`) to the page; the next page's
/// cursor is `cursor_of` its last item, when there is a next page.
fn cut<T>(
    mut items: Vec<T>,
    limit: u32,
    cursor_of: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next = if more {
        items.last().map(cursor_of)
    } else {
        None
    };
    (items, next)
}

/// The user id a `cursor` of an id-ordered listing names.
pub fn id_position(cursor: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    cursor
        .map(|raw| {
            B64.decode(raw)
                .ok()
                .and_then(|bytes| Uuid::from_slice(&bytes).ok())
                .ok_or_else(|| ApiError::invalid_field("cursor", "is not a cursor this API issued"))
        })
        .transpose()
}

/// [`page`] for an id-ordered listing (oldest first).
pub fn id_page<T>(
    items: Vec<T>,
    limit: u32,
    id_of: impl Fn(&T) -> Uuid,
) -> (Vec<T>, Option<String>) {
    cut(items, limit, |item| B64.encode(id_of(item).as_bytes()))
}

fn encode((at, id): Position) -> String {
    B64.encode(format!("{}|{}", at.to_rfc3339(), id))
}

fn decode(raw: &str) -> Option<Position> {
    let text = String::from_utf8(B64.decode(raw).ok()?).ok()?;
    let (at, id) = text.split_once('|')?;
    Some((
        DateTime::parse_from_rfc3339(at).ok()?.to_utc(),
        Uuid::parse_str(id).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_cursors_never_panic(raw in "\\PC{0,200}") {
            let _ = decode(&raw);
            let _ = id_position(Some(&raw));
        }
    }

    #[test]
    fn cursors_round_trip() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T10:00:00.123456Z")
            .expect("time")
            .to_utc();
        let id = Uuid::now_v7();
        let raw = B64.encode(format!("{}|{}", at.to_rfc3339(), id));
        assert_eq!(decode(&raw), Some((at, id)));
        assert_eq!(decode("bm9wZQ"), None);
    }

    #[test]
    fn id_pages_cut_at_the_limit_and_their_cursor_names_the_last_id() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let (items, next) = id_page(ids.clone(), 2, |id| *id);
        assert_eq!(items, ids[..2]);
        let cursor = next.expect("a next page");
        assert_eq!(id_position(Some(&cursor)).ok().flatten(), Some(ids[1]));
        assert_eq!(id_page(ids[..2].to_vec(), 2, |id| *id).1, None);
        assert!(id_position(Some("bm9wZQ")).is_err());
    }
}
