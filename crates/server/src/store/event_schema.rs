//! Each business event type's metadata schema, checked on every write.
//!
//! Events feed the firewall and operators' investigations, so their shape is
//! part of the contract: a type nobody declared, a missing field, a field of
//! the wrong kind or an unexpected field is refused before it reaches the
//! database (the write fails; nothing malformed is ever stored).

use serde_json::Value;

/// What a metadata field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    List,
}

use Kind::{List, Number, Text};

/// Every event type and its fields (all required).
const SCHEMAS: &[(&str, &[(&str, Kind)])] = &[
    ("create:user", &[("platform", Text)]),
    ("create:session", &[("family_id", Text), ("platform", Text)]),
    ("login:failed", &[("reason", Text)]),
    ("refresh:rotated", &[("family_id", Text)]),
    ("refresh:reuse", &[("family_id", Text), ("why", Text)]),
    (
        "attestation:verified",
        &[
            ("provider", Text),
            ("state", Text),
            ("reasons", List),
            ("failures", Number),
        ],
    ),
    (
        "attestation:failed",
        &[
            ("provider", Text),
            ("state", Text),
            ("reasons", List),
            ("failures", Number),
        ],
    ),
    (
        "device:locked",
        &[
            ("source", Text),
            ("action", Text),
            ("trust_score", Number),
            ("threshold", Number),
            ("reasons", List),
        ],
    ),
    ("device:unlocked", &[("source", Text), ("reason", Text)]),
    (
        "billing:subscription_updated",
        &[
            ("event_id", Text),
            ("event_type", Text),
            ("plan", Text),
            ("status", Text),
        ],
    ),
    (
        "firewall:block",
        &[
            ("rule", Text),
            ("version", Number),
            ("mode", Text),
            ("side_effect", Text),
            ("threshold", Number),
            ("window_seconds", Number),
            ("lookback_seconds", Number),
            ("scope", Text),
            ("scope_key", Text),
            ("users", List),
            ("devices", List),
            ("decision_id", Text),
        ],
    ),
    ("firewall:undo", &[("decision_id", Text)]),
    ("signals:replay", &[("seq", Number)]),
];

/// The declared event types.
pub fn types() -> impl Iterator<Item = &'static str> {
    SCHEMAS.iter().map(|(t, _)| *t)
}

/// Checks `metadata` against `event_type`'s schema.
pub fn validate(event_type: &str, metadata: &Value) -> Result<(), String> {
    let Some((_, fields)) = SCHEMAS.iter().find(|(t, _)| *t == event_type) else {
        return Err(format!("unknown event type {event_type}"));
    };
    let Some(object) = metadata.as_object() else {
        return Err(format!("{event_type}: metadata must be an object"));
    };
    for (name, kind) in *fields {
        let ok = matches!(
            (object.get(*name), kind),
            (Some(Value::String(_)), Text)
                | (Some(Value::Number(_)), Number)
                | (Some(Value::Array(_)), List)
        );
        if !ok {
            return Err(format!(
                "{event_type}: field {name} missing or of the wrong kind"
            ));
        }
    }
    if let Some(extra) = object.keys().find(|k| !fields.iter().any(|(f, _)| f == k)) {
        return Err(format!("{event_type}: unexpected field {extra}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn declared_shapes_pass_and_others_fail() {
        assert_eq!(validate("create:user", &json!({"platform": "ios"})), Ok(()));
        assert!(validate("create:user", &json!({})).is_err());
        assert!(validate("create:user", &json!({"platform": 1})).is_err());
        assert!(validate("create:user", &json!({"platform": "ios", "ip": "1.2.3.4"})).is_err());
        assert!(validate("made:up", &json!({})).is_err());
        assert!(validate("signals:replay", &json!([1])).is_err());
        assert_eq!(validate("signals:replay", &json!({"seq": 3})), Ok(()));
    }

    #[test]
    fn every_type_of_the_contract_is_declared() {
        for t in [
            "create:user",
            "create:session",
            "login:failed",
            "refresh:rotated",
            "refresh:reuse",
            "attestation:verified",
            "attestation:failed",
            "device:locked",
            "device:unlocked",
            "billing:subscription_updated",
            "firewall:block",
            "firewall:undo",
        ] {
            assert!(types().any(|d| d == t), "{t}");
        }
    }
}
