//! The billing webhook event (API.md "Billing") and what it asks for.
//!
//! Parsing is strict like every other body: unknown fields are refused and
//! the offending field is named. The subscription status comes from
//! `data.status`, or from the event type when `data.status` is absent
//! (`activated` → active, `canceled` → canceled, `past_due` → past_due;
//! `updated` must say). A status that contradicts the type is refused.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::store::SubscriptionStatus;

/// The event types this server applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub enum EventType {
    /// A subscription started (or restarted).
    #[serde(rename = "subscription.activated")]
    Activated,
    /// Plan, status or period changed.
    #[serde(rename = "subscription.updated")]
    Updated,
    /// The subscription ended: trial limits apply.
    #[serde(rename = "subscription.canceled")]
    Canceled,
    /// Payment failed: trial limits apply until it is paid.
    #[serde(rename = "subscription.past_due")]
    PastDue,
}

impl EventType {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activated => "subscription.activated",
            Self::Updated => "subscription.updated",
            Self::Canceled => "subscription.canceled",
            Self::PastDue => "subscription.past_due",
        }
    }

    /// The status the type implies, if it implies one.
    fn implied_status(self) -> Option<SubscriptionStatus> {
        match self {
            Self::Activated => Some(SubscriptionStatus::Active),
            Self::Updated => None,
            Self::Canceled => Some(SubscriptionStatus::Canceled),
            Self::PastDue => Some(SubscriptionStatus::PastDue),
        }
    }
}

/// A billing webhook event.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "evt_1Q2w3E", "type": "subscription.activated", "created": 1763812800,
    "data": {"user_id": "0192f0c4-7d4e-7c3a-9d1e-2b9f5a6c7d8e", "plan": "paid_basic", "status": "active",
    "current_period_end": "2026-12-23T00:00:00Z"}}))]
pub struct WebhookEvent {
    /// The provider's event id (1–255 printable ASCII characters).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the provider created the event (unix seconds). Orders events:
    /// an older event never rolls back a newer one.
    pub created: i64,
    /// The subscription as it is after the event.
    pub data: WebhookSubscription,
}

/// The subscription an event describes.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSubscription {
    /// The BlockRemote user id. Exactly one of `user_id` and
    /// `external_user_id`.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// The integrator's id for the user (`POST /v1/admin/users`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub external_user_id: Option<String>,
    /// A seeded plan name (`trial`, `paid_basic`, `paid`).
    pub plan: String,
    /// `active`, `canceled` or `past_due`; implied by the type when absent.
    #[serde(default)]
    pub status: Option<SubscriptionStatus>,
    /// End of the paid period (RFC 3339), if known.
    #[serde(default)]
    pub current_period_end: Option<DateTime<Utc>>,
}

/// A field that failed validation, named as in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField(pub &'static str);

impl WebhookEvent {
    /// Checks what the types cannot, at `now` (Unix seconds); returns the
    /// status to apply.
    ///
    /// `created` orders a subscription's events (an older one never
    /// overwrites a newer), so one dated in the future would freeze the
    /// subscription until then: more than the signature tolerance ahead of
    /// the server's clock is refused.
    pub fn validate(&self, now: i64) -> Result<SubscriptionStatus, InvalidField> {
        let id_ok =
            (1..=255).contains(&self.id.len()) && self.id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok {
            return Err(InvalidField("id"));
        }
        if self.created <= 0
            || self.created > now.saturating_add(super::signature::TOLERANCE_SECONDS)
        {
            return Err(InvalidField("created"));
        }
        match (&self.data.user_id, &self.data.external_user_id) {
            (Some(_), None) => {}
            (None, Some(external)) => {
                if !crate::store::is_external_id(external) {
                    return Err(InvalidField("data.external_user_id"));
                }
            }
            _ => return Err(InvalidField("data.user_id")),
        }
        let plan_ok = (1..=64).contains(&self.data.plan.len())
            && self
                .data
                .plan
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plan_ok {
            return Err(InvalidField("data.plan"));
        }
        match (self.event_type.implied_status(), self.data.status) {
            (Some(implied), Some(given)) if implied != given => Err(InvalidField("data.status")),
            (Some(implied), _) => Ok(implied),
            (None, Some(given)) => Ok(given),
            (None, None) => Err(InvalidField("data.status")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_763_812_800;

    #[test]
    fn created_more_than_the_tolerance_ahead_is_refused() {
        let at = |created: i64| {
            event(&format!(
                r#"{{"id":"e","type":"subscription.activated","created":{created},"data":{{"user_id":"{USER}","plan":"paid"}}}}"#
            ))
            .validate(NOW)
        };
        assert!(at(NOW + super::super::signature::TOLERANCE_SECONDS).is_ok());
        assert_eq!(
            at(NOW + super::super::signature::TOLERANCE_SECONDS + 1),
            Err(InvalidField("created"))
        );
        assert_eq!(at(i64::MAX), Err(InvalidField("created")));
    }

    fn event(json: &str) -> WebhookEvent {
        serde_json::from_str(json).expect("test value")
    }

    const USER: &str = "0192f0c4-7d4e-7c3a-9d1e-2b9f5a6c7d8e";

    #[test]
    fn status_comes_from_data_or_the_type() {
        let e = event(&format!(
            r#"{{"id":"evt_1","type":"subscription.canceled","created":1,"data":{{"user_id":"{USER}","plan":"paid"}}}}"#
        ));
        assert_eq!(e.validate(NOW), Ok(SubscriptionStatus::Canceled));
        let e = event(&format!(
            r#"{{"id":"evt_1","type":"subscription.updated","created":1,"data":{{"user_id":"{USER}","plan":"paid","status":"past_due"}}}}"#
        ));
        assert_eq!(e.validate(NOW), Ok(SubscriptionStatus::PastDue));
        let e = event(&format!(
            r#"{{"id":"evt_1","type":"subscription.updated","created":1,"data":{{"user_id":"{USER}","plan":"paid"}}}}"#
        ));
        assert_eq!(e.validate(NOW), Err(InvalidField("data.status")));
        let e = event(&format!(
            r#"{{"id":"evt_1","type":"subscription.canceled","created":1,"data":{{"user_id":"{USER}","plan":"paid","status":"active"}}}}"#
        ));
        assert_eq!(e.validate(NOW), Err(InvalidField("data.status")));
    }

    #[test]
    fn ids_plans_and_times_are_checked() {
        let base = |id: &str, created: i64, plan: &str| {
            event(&format!(
                r#"{{"id":"{id}","type":"subscription.activated","created":{created},"data":{{"user_id":"{USER}","plan":"{plan}"}}}}"#
            ))
        };
        assert!(base("evt_ok", 1, "paid").validate(NOW).is_ok());
        assert_eq!(base("", 1, "paid").validate(NOW), Err(InvalidField("id")));
        assert_eq!(
            base("evt with space", 1, "paid").validate(NOW),
            Err(InvalidField("id"))
        );
        assert_eq!(
            base("evt", 0, "paid").validate(NOW),
            Err(InvalidField("created"))
        );
        assert_eq!(
            base("evt", 1, "Paid!").validate(NOW),
            Err(InvalidField("data.plan"))
        );
    }

    #[test]
    fn the_user_is_named_exactly_once_by_either_id() {
        let with = |data: &str| {
            event(&format!(
                r#"{{"id":"e","type":"subscription.activated","created":1,"data":{{{data}"plan":"paid"}}}}"#
            ))
            .validate(NOW)
        };
        assert!(with(&format!(r#""user_id":"{USER}","#)).is_ok());
        assert!(with(r#""external_user_id":"cust_8412","#).is_ok());
        assert_eq!(with(""), Err(InvalidField("data.user_id")));
        assert_eq!(
            with(&format!(
                r#""user_id":"{USER}","external_user_id":"cust_8412","#
            )),
            Err(InvalidField("data.user_id"))
        );
        for bad in ["", "with space", &"x".repeat(129)] {
            assert_eq!(
                with(&format!(r#""external_user_id":"{bad}","#)),
                Err(InvalidField("data.external_user_id")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let extra = format!(
            r#"{{"id":"e","type":"subscription.activated","created":1,"livemode":true,"data":{{"user_id":"{USER}","plan":"paid"}}}}"#
        );
        assert!(serde_json::from_str::<WebhookEvent>(&extra).is_err());
        let unknown = format!(
            r#"{{"id":"e","type":"invoice.paid","created":1,"data":{{"user_id":"{USER}","plan":"paid"}}}}"#
        );
        assert!(serde_json::from_str::<WebhookEvent>(&unknown).is_err());
    }
}
