//! Field validation shared by the routes (422 `validation_failed`, field named).

use crate::error::ApiError;

/// A plausible email address in its one spelling: Unicode NFKC of its full
/// case folding (`NFKC(casefold(NFKC(s)))`, Unicode's canonical caseless
/// match), so `Alice@Example.com`, a full-width `ａｌｉｃｅ@example.com` and
/// `ALICE@EXAMPLE.COM` are one account and one sign-in backoff.
pub fn email(raw: &str) -> Result<String, ApiError> {
    let email = normalize_email(raw.trim());
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && local.len() <= 64
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        });
    if valid {
        Ok(email)
    } else {
        Err(ApiError::invalid_field("email", "must be an email address"))
    }
}

fn normalize_email(raw: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded = caseless::default_case_fold_str(&raw.nfkc().collect::<String>());
    folded.nfkc().collect()
}

/// 8–256 characters.
pub fn password(raw: &str) -> Result<(), ApiError> {
    let n = raw.chars().count();
    if (8..=256).contains(&n) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "password",
            "must be 8–256 characters",
        ))
    }
}

/// An integrator's user id: 1–128 visible ASCII characters (no spaces),
/// compared exactly. `field` names it in the problem.
pub fn external_id(field: &str, raw: &str) -> Result<(), ApiError> {
    if crate::store::is_external_id(raw) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            field,
            "must be 1–128 visible ASCII characters (no spaces)",
        ))
    }
}

/// 8–64 characters of `[A-Za-z0-9_-]`.
pub fn device_id(raw: &str) -> Result<(), ApiError> {
    let ok = (8..=64).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "device_id",
            "must be 8–64 characters of A-Z, a-z, 0-9, _ and -",
        ))
    }
}

/// 1–512 printable characters.
pub fn fingerprint(raw: &str) -> Result<(), ApiError> {
    if (1..=512).contains(&raw.len()) && !raw.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "device_fingerprint",
            "must be 1–512 printable characters",
        ))
    }
}

/// `android` or `ios`.
pub fn platform(raw: &str) -> Result<(), ApiError> {
    if matches!(raw, "android" | "ios") {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "platform",
            "must be android or ios",
        ))
    }
}

/// The three device fields together.
pub fn device(id: &str, fingerprint_raw: &str, platform_raw: &str) -> Result<(), ApiError> {
    device_id(id)?;
    fingerprint(fingerprint_raw)?;
    platform(platform_raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_variants_of_an_address_are_one_address() {
        let one = email("alice@example.com").expect("valid");
        for variant in [
            "Alice@Example.com",
            "ALICE@EXAMPLE.COM",
            "\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}@example.com",
            "  alice@example.com ",
        ] {
            assert_eq!(email(variant).expect("valid"), one, "{variant:?}");
        }
        // Full case folding, not only lower-casing.
        assert_eq!(
            email("STRASSE@example.com").expect("valid"),
            email("straße@example.com").expect("valid")
        );
        // Composed and decomposed accents are one spelling.
        assert_eq!(
            email("jos\u{e9}@example.com").expect("valid"),
            email("jose\u{301}@example.com").expect("valid")
        );
        assert_ne!(email("bob@example.com").expect("valid"), one);
    }
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(
            email(" Ana@Example.COM ").expect("valid"),
            "ana@example.com"
        );
        for bad in [
            "",
            "ana",
            "ana@",
            "@example.com",
            "ana@example",
            "a b@example.com",
            "ana@.com",
        ] {
            assert!(email(bad).is_err(), "{bad}");
        }
        assert!(device_id("abc_DEF-123").is_ok());
        assert!(device_id("short").is_err());
        assert!(device_id("has space here").is_err());
        assert!(device_id("{braces}xx").is_err());
        assert!(platform("ios").is_ok() && platform("windows").is_err());
        assert!(password("12345678").is_ok() && password("1234567").is_err());
    }

    proptest! {
        #[test]
        fn accepted_device_ids_are_safe_key_parts(raw in "\\PC{0,80}") {
            if device_id(&raw).is_ok() {
                let unsafe_char = raw.contains(['{', '}', ':', ' ']);
                prop_assert!(!unsafe_char, "accepted an unsafe id");
                prop_assert!((8..=64).contains(&raw.len()));
            }
        }

        #[test]
        fn validators_never_panic(raw in "\\PC{0,300}") {
            let _ = email(&raw);
            let _ = password(&raw);
            let _ = fingerprint(&raw);
        }
    }
}
