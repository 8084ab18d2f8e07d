//! Billing webhook signatures: the two schemes of the contract.
//!
//! 1. Stripe style — `X-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, HMAC-SHA256
//!    keyed with the secret's UTF-8 bytes over `"<t>.<raw body>"`.
//! 2. Standard Webhooks — `webhook-id`, `webhook-timestamp` and
//!    `webhook-signature: v1,<base64> [v1,<base64>…]`, HMAC-SHA256 keyed with
//!    the base64-decoded part of a `whsec_…` secret over
//!    `"<id>.<timestamp>.<raw body>"`.
//!
//! Every configured secret is tried against every signature offered, so a
//! sender and a receiver can rotate secrets independently. Comparisons are
//! constant-time. As in Stripe's library, the signature is checked before the
//! timestamp: an unsigned request learns nothing about the clock window.
//!
//! Pure functions: the caller supplies the headers, the secrets and `now`.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far a signed timestamp may be from now, either way (seconds).
pub const TOLERANCE_SECONDS: i64 = 300;

/// The signature headers of one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct SignatureHeaders<'a> {
    /// `X-Signature` (scheme 1).
    pub x_signature: Option<&'a str>,
    /// `webhook-id` (scheme 2).
    pub webhook_id: Option<&'a str>,
    /// `webhook-timestamp` (scheme 2).
    pub webhook_timestamp: Option<&'a str>,
    /// `webhook-signature` (scheme 2).
    pub webhook_signature: Option<&'a str>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No scheme's headers, malformed headers, or no signature matched.
    Invalid,
    /// Signed correctly, but the timestamp is more than the tolerance away.
    OutOfTolerance,
}

/// A request whose signature matched one of the secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signature that matched, as sent (hex or base64), for the record.
    pub signature: String,
    /// The signed timestamp (unix seconds).
    pub timestamp: i64,
}

/// Checks a webhook request (see the module docs). Scheme 1 is used when
/// `X-Signature` is present, scheme 2 otherwise.
pub fn verify<S: AsRef<str>>(
    headers: &SignatureHeaders<'_>,
    body: &[u8],
    secrets: &[S],
    now: i64,
) -> Result<Verified, SignatureError> {
    let verified = match headers.x_signature {
        Some(header) => verify_stripe_style(header, body, secrets)?,
        None => verify_standard_webhooks(headers, body, secrets)?,
    };
    if verified.timestamp.abs_diff(now) > TOLERANCE_SECONDS.unsigned_abs() {
        return Err(SignatureError::OutOfTolerance);
    }
    Ok(verified)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn parse_timestamp(text: &str) -> Result<i64, SignatureError> {
    let text = text.trim();
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Invalid);
    }
    text.parse().map_err(|_| SignatureError::Invalid)
}

fn verify_stripe_style<S: AsRef<str>>(
    header: &str,
    body: &[u8],
    secrets: &[S],
) -> Result<Verified, SignatureError> {
    let mut timestamp = None;
    let mut offered: Vec<[u8; 32]> = Vec::new();
    let mut offered_text: Vec<&str> = Vec::new();
    for item in header.split(',') {
        let Some((name, value)) = item.trim().split_once('=') else {
            continue;
        };
        match name {
            "t" => timestamp = Some(value),
            "v1" => {
                let mut bytes = [0u8; 32];
                if hex::decode_to_slice(value, &mut bytes).is_ok() {
                    offered.push(bytes);
                    offered_text.push(value);
                }
            }
            _ => {} // other schemes (e.g. v0) are ignored, as Stripe does
        }
    }
    let t = timestamp.ok_or(SignatureError::Invalid)?;
    let timestamp = parse_timestamp(t)?;
    for secret in secrets {
        let expected = hmac_sha256(secret.as_ref().as_bytes(), &[t.as_bytes(), b".", body]);
        if let Some(i) = matching(&expected, &offered) {
            return Ok(Verified {
                signature: offered_text[i].to_ascii_lowercase(),
                timestamp,
            });
        }
    }
    Err(SignatureError::Invalid)
}

/// The least length of a webhook secret, in bytes (of the decoded key for
/// `whsec_…`): 192 bits, Standard Webhooks' lower bound.
pub const MIN_SECRET_BYTES: usize = 24;

/// Checks a configured secret: a `whsec_` secret must be valid base64 (it is
/// its decoded bytes that key the HMAC), and every secret must be at least
/// [`MIN_SECRET_BYTES`] long. The message never contains the secret.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let len = match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64
            .decode(encoded)
            .map_err(|_| "a `whsec_` secret must be followed by valid base64".to_owned())?
            .len(),
        None => secret.len(),
    };
    if len < MIN_SECRET_BYTES {
        return Err(format!(
            "every secret must be at least {MIN_SECRET_BYTES} bytes (a `whsec_` secret: {MIN_SECRET_BYTES} decoded bytes); one is {len}"
        ));
    }
    Ok(())
}

/// The HMAC key of a secret under Standard Webhooks: the base64 after
/// `whsec_`, or the whole secret when it is plain base64.
fn standard_webhooks_key(secret: &str) -> Option<Vec<u8>> {
    BASE64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()
        .filter(|key| !key.is_empty())
}

fn verify_standard_webhooks<S: AsRef<str>>(
    headers: &SignatureHeaders<'_>,
    body: &[u8],
    secrets: &[S],
) -> Result<Verified, SignatureError> {
    let (Some(id), Some(t), Some(signatures)) = (
        headers.webhook_id,
        headers.webhook_timestamp,
        headers.webhook_signature,
    ) else {
        return Err(SignatureError::Invalid);
    };
    let timestamp = parse_timestamp(t)?;
    let mut offered: Vec<[u8; 32]> = Vec::new();
    let mut offered_text: Vec<&str> = Vec::new();
    for item in signatures.split_whitespace() {
        let Some(("v1", value)) = item.split_once(',') else {
            continue; // other versions (v1a: asymmetric) are not configured here
        };
        if let Ok(bytes) = BASE64.decode(value) {
            if let Ok(bytes) = <[u8; 32]>::try_from(bytes.as_slice()) {
                offered.push(bytes);
                offered_text.push(value);
            }
        }
    }
    for secret in secrets {
        let Some(key) = standard_webhooks_key(secret.as_ref()) else {
            continue;
        };
        let expected = hmac_sha256(
            &key,
            &[id.as_bytes(), b".", t.trim().as_bytes(), b".", body],
        );
        if let Some(i) = matching(&expected, &offered) {
            return Ok(Verified {
                signature: offered_text[i].to_owned(),
                timestamp,
            });
        }
    }
    Err(SignatureError::Invalid)
}

/// The index of the offered signature equal to `expected`, compared in
/// constant time (every candidate is compared, whatever matches).
fn matching(expected: &[u8; 32], offered: &[[u8; 32]]) -> Option<usize> {
    let mut found = None;
    for (i, candidate) in offered.iter().enumerate() {
        if bool::from(candidate.ct_eq(expected)) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Vectors computed outside this code base (Python's hmac module).
    const BODY: &str = r#"{"id":"evt_1","type":"subscription.activated","created":1763812800,"data":{"user_id":"u","plan":"paid","status":"active","current_period_end":null}}"#;
    const T: i64 = 1_763_812_800;
    const STRIPE_SECRET: &str = "sk_test_rotation_one";
    const STRIPE_SIG: &str = "511f1f0f4bfd8a5db03d1bcf3610bc1c8a0f5501a355c2f05a4df932172775f9";
    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const STD_SIG: &str = "yPXwd5UQTwgFIQwAohenX0DUjK5SIZ3UzEQJsGnKIhw=";

    fn stripe(header: &str) -> SignatureHeaders<'_> {
        SignatureHeaders {
            x_signature: Some(header),
            ..Default::default()
        }
    }

    fn standard<'a>(id: &'a str, t: &'a str, sig: &'a str) -> SignatureHeaders<'a> {
        SignatureHeaders {
            webhook_id: Some(id),
            webhook_timestamp: Some(t),
            webhook_signature: Some(sig),
            ..Default::default()
        }
    }

    #[test]
    fn stripe_style_known_vector_verifies() {
        let header = format!("t={T},v1={STRIPE_SIG}");
        let v = verify(&stripe(&header), BODY.as_bytes(), &[STRIPE_SECRET], T).expect("test value");
        assert_eq!(v.signature, STRIPE_SIG);
        assert_eq!(v.timestamp, T);
    }

    #[test]
    fn standard_webhooks_known_vectors_verify() {
        let sig = format!("v1,{STD_SIG}");
        let h = standard("msg_2Kweh", "1763812800", &sig);
        verify(&h, BODY.as_bytes(), &[WHSEC], T).expect("test value");
        // The Standard Webhooks specification's own example.
        let h = standard(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        );
        verify(&h, br#"{"test": 2432232314}"#, &[WHSEC], 1_614_265_330).expect("test value");
    }

    /// The worked examples integrators are given
    /// (`clients/http/SIGNATURES.md`), checked byte for byte against the
    /// document itself so it cannot drift from what the server accepts.
    #[test]
    fn the_documented_worked_examples_verify() {
        let doc = include_str!("../../../../clients/http/SIGNATURES.md");
        let x_body = r#"{"id":"evt_1Q2w3E","type":"subscription.activated","created":1763812800,"data":{"external_user_id":"cust_8412","plan":"paid_basic","status":"active","current_period_end":"2026-12-23T00:00:00Z"}}"#;
        let x_header =
            "t=1763812800,v1=f7700f8ad5bd4ee790938e5f492ff70a914b1046fb2f5d7edd918d02bf77cb7d";
        let std_body = r#"{"id":"evt_1Q2w3F","type":"subscription.updated","created":1763812860,"data":{"external_user_id":"cust_8412","plan":"paid","status":"active","current_period_end":"2026-12-23T00:00:00Z"}}"#;
        let std_sig = "v1,/ObOV4/K4tN0J9KvS8DGFAik+qsaMAfNFFBhVvQAkrw=";
        for shown in [
            x_body,
            x_header,
            std_body,
            std_sig,
            "example-x-signature-secret-2026-01",
            "msg_2YbVk1d8QmZ4pT7w",
        ] {
            assert!(doc.contains(shown), "SIGNATURES.md no longer shows {shown}");
        }
        let v = verify(
            &stripe(x_header),
            x_body.as_bytes(),
            &["example-x-signature-secret-2026-01"],
            1_763_812_800,
        )
        .expect("scheme 1 example");
        assert_eq!(v.timestamp, 1_763_812_800);
        let h = standard("msg_2YbVk1d8QmZ4pT7w", "1763812860", std_sig);
        verify(&h, std_body.as_bytes(), &[WHSEC], 1_763_812_860).expect("scheme 2 example");
        // One byte of the body changed: refused.
        let altered = x_body.replace("paid_basic", "paid_basiC");
        assert_eq!(
            verify(
                &stripe(x_header),
                altered.as_bytes(),
                &["example-x-signature-secret-2026-01"],
                1_763_812_800
            ),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn any_configured_secret_and_any_offered_signature_may_match() {
        let header = format!("t={T},v1={},v1={STRIPE_SIG}", "ab".repeat(32));
        verify(
            &stripe(&header),
            BODY.as_bytes(),
            &["old-secret", STRIPE_SECRET],
            T,
        )
        .expect("test value");
        let sig = format!("v1,{} v1,{STD_SIG}", BASE64.encode([7u8; 32]));
        let h = standard("msg_2Kweh", "1763812800", &sig);
        verify(&h, BODY.as_bytes(), &["whsec_b2xk", WHSEC], T).expect("test value");
    }

    #[test]
    fn wrong_secret_body_or_timestamp_is_invalid() {
        let header = format!("t={T},v1={STRIPE_SIG}");
        let invalid = Err(SignatureError::Invalid);
        assert_eq!(
            verify(&stripe(&header), BODY.as_bytes(), &["other"], T),
            invalid
        );
        assert_eq!(
            verify(&stripe(&header), b"{}", &[STRIPE_SECRET], T),
            invalid
        );
        let moved = format!("t={},v1={STRIPE_SIG}", T + 1);
        assert_eq!(
            verify(&stripe(&moved), BODY.as_bytes(), &[STRIPE_SECRET], T),
            invalid
        );
        assert_eq!(
            verify(
                &SignatureHeaders::default(),
                BODY.as_bytes(),
                &[STRIPE_SECRET],
                T
            ),
            invalid
        );
        let no_secrets: [&str; 0] = [];
        assert_eq!(
            verify(&stripe(&header), BODY.as_bytes(), &no_secrets, T),
            invalid
        );
        // A Standard Webhooks signature does not verify under the other id.
        let sig = format!("v1,{STD_SIG}");
        let h = standard("msg_other", "1763812800", &sig);
        assert_eq!(verify(&h, BODY.as_bytes(), &[WHSEC], T), invalid);
    }

    #[test]
    fn configured_secrets_must_be_long_and_whsec_must_be_base64() {
        assert!(check_secret(WHSEC).is_ok());
        assert!(check_secret("sk_live_0123456789abcdefghij").is_ok());
        let short = check_secret("sk_live_short").expect_err("short");
        assert!(!short.contains("sk_live_short"), "{short}");
        assert!(check_secret("whsec_not*base64*at*all*0123456789").is_err());
        assert!(check_secret("whsec_b2xk").is_err(), "3 bytes once decoded");
    }

    #[test]
    fn tolerance_is_300_seconds_both_ways() {
        let header = format!("t={T},v1={STRIPE_SIG}");
        let body = BODY.as_bytes();
        assert!(verify(&stripe(&header), body, &[STRIPE_SECRET], T + 300).is_ok());
        assert!(verify(&stripe(&header), body, &[STRIPE_SECRET], T - 300).is_ok());
        let late = Err(SignatureError::OutOfTolerance);
        assert_eq!(
            verify(&stripe(&header), body, &[STRIPE_SECRET], T + 301),
            late
        );
        assert_eq!(
            verify(&stripe(&header), body, &[STRIPE_SECRET], T - 301),
            late
        );
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic_and_never_verify(
            x in "\\PC{0,200}", id in "\\PC{0,40}", t in "\\PC{0,20}", sig in "\\PC{0,200}",
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let h = stripe(&x);
            prop_assert!(verify(&h, &body, &[STRIPE_SECRET], T).is_err());
            let h = standard(&id, &t, &sig);
            prop_assert!(verify(&h, &body, &[WHSEC], T).is_err());
        }
    }
}
