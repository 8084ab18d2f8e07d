//! Device access tokens: issue and verify.
//!
//! Verification follows RFC 8725: the `kid` selects a key, the key fixes the
//! algorithm, and `iss`, `aud`, `exp`, `nbf` are required, with at most
//! [`LEEWAY_SECONDS`] of clock skew.

use std::time::Duration;

use jsonwebtoken::{decode, decode_header, encode, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::KeySet;

/// The most clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;

/// The claims of a device access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// User id.
    pub sub: Uuid,
    /// Device id the token is bound to.
    pub did: String,
    /// Token id.
    pub jti: Uuid,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not before (Unix seconds).
    pub nbf: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
}

/// Why a token was refused. Deliberately coarse: the client learns only
/// whether refreshing can help — a token whose signature, issuer and
/// audience all verified but whose `exp` has passed is [`Self::Expired`];
/// anything else (a bad signature, an unknown key, a wrong audience, a
/// malformed token) is [`Self::Invalid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    /// Genuine but past its `exp` (plus the leeway): refresh.
    #[error("token expired")]
    Expired,
    /// Not acceptable: sign in again.
    #[error("invalid token")]
    Invalid,
}

/// Who a token is for and how long it lives.
pub struct TokenSpec<'a> {
    /// `iss`.
    pub issuer: &'a str,
    /// `aud`.
    pub audience: &'a str,
    /// Lifetime.
    pub ttl: Duration,
}

/// Signs a new access token with the current key; returns it with its claims.
pub fn issue(
    keys: &KeySet,
    spec: &TokenSpec<'_>,
    user_id: Uuid,
    device_id: &str,
    jti: Uuid,
) -> anyhow::Result<(String, Claims)> {
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        iss: spec.issuer.to_owned(),
        aud: spec.audience.to_owned(),
        sub: user_id,
        did: device_id.to_owned(),
        jti,
        iat: now,
        nbf: now,
        exp: now + i64::try_from(spec.ttl.as_secs()).unwrap_or(900),
    };
    let mut header = Header::new(keys.current.alg);
    header.kid = Some(keys.current.kid.clone());
    header.typ = Some("JWT".to_owned());
    let token = encode(&header, &claims, &keys.current.encoding)?;
    Ok((token, claims))
}

/// The token's `kid` when it is well-formed but not in `keys` (the key set
/// may be stale after a rotation elsewhere).
pub fn unknown_kid(keys: &KeySet, token: &str) -> Option<String> {
    let kid = decode_header(token).ok()?.kid?;
    (!keys.verifying.contains_key(&kid) && kid.len() <= 128).then_some(kid)
}

/// Verifies a token against the key set.
pub fn verify(
    keys: &KeySet,
    issuer: &str,
    audience: &str,
    token: &str,
) -> Result<Claims, InvalidToken> {
    // An unknown `alg` (including "none") fails to parse here.
    let header = decode_header(token).map_err(|_| InvalidToken::Invalid)?;
    let kid = header.kid.ok_or(InvalidToken::Invalid)?;
    let key = keys.verifying.get(&kid).ok_or(InvalidToken::Invalid)?;
    if header.alg != key.alg {
        return Err(InvalidToken::Invalid);
    }
    let mut validation = Validation::new(key.alg);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    match decode::<Claims>(token, &key.decoding, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
            // `decode` checks the signature first, but `exp` before `aud`
            // and `iss`: "expired" is said only of a token that passes every
            // other check, so it tells a forger nothing.
            validation.validate_exp = false;
            match decode::<Claims>(token, &key.decoding, &validation) {
                Ok(_) => Err(InvalidToken::Expired),
                Err(_) => Err(InvalidToken::Invalid),
            }
        }
        Err(_) => Err(InvalidToken::Invalid),
    }
}
