//! Access tokens already verified, so a device's requests do not each pay
//! for an ES256/RS256 signature check.
//!
//! Only a token that passed full verification is remembered, keyed by its
//! exact text, with its claims; a hit is valid until the token's `exp`
//! (plus the same clock-skew leeway verification allows). Device binding,
//! device status and rate limits are still checked on every request — this
//! caches the signature and claim checks only. Bounded: when full, expired
//! entries are swept, and if that is not enough the cache is cleared. When a
//! signing key is revoked every instance clears it ([`VerifiedTokens::clear`]),
//! so the revoked key's tokens meet the (now smaller) key set again.
//!
//! A token signed out (`POST /v1/auth/logout`) is denied until its `exp` in
//! shared state; every instance drops it from this cache when told
//! ([`VerifiedTokens::forget`]), and in any case trusts an entry for at most
//! [`RECHECK_SECONDS`] before the token is checked again — deny-list
//! included — so a lost message leaves a signed-out token usable for a
//! minute at most, never until it expires.

use dashmap::DashMap;
use uuid::Uuid;

use super::tokens::{Claims, LEEWAY_SECONDS};

/// Entries kept at most.
const MAX_ENTRIES: usize = 100_000;
/// How long an entry is trusted before the token is verified again.
pub const RECHECK_SECONDS: i64 = 60;

/// The cache (see the module docs).
#[derive(Debug, Default)]
pub struct VerifiedTokens {
    entries: DashMap<Box<str>, (Claims, i64)>,
}

impl VerifiedTokens {
    /// The claims of `token` if it was verified less than [`RECHECK_SECONDS`]
    /// ago and has not expired at `now`.
    pub fn get(&self, token: &str, now: i64) -> Option<Claims> {
        let hit = self.entries.get(token)?;
        let (claims, verified_at) = &*hit;
        if now <= claims.exp.saturating_add(LEEWAY_SECONDS as i64)
            && now < verified_at.saturating_add(RECHECK_SECONDS)
        {
            Some(claims.clone())
        } else {
            drop(hit);
            self.entries.remove(token);
            None
        }
    }

    /// Forgets every entry (a key was revoked: its tokens must be checked again).
    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Remembers a token that just passed verification.
    pub fn insert(&self, token: &str, claims: &Claims, now: i64) {
        if self.entries.len() >= MAX_ENTRIES {
            let leeway = LEEWAY_SECONDS as i64;
            self.entries
                .retain(|_, (c, _)| now <= c.exp.saturating_add(leeway));
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(token.into(), (claims.clone(), now));
    }

    /// Forgets the token with this `jti` (it was signed out).
    pub fn forget(&self, jti: Uuid) {
        self.entries.retain(|_, (c, _)| c.jti != jti);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "i".into(),
            aud: "a".into(),
            sub: Uuid::nil(),
            did: "device_0001".into(),
            jti: Uuid::nil(),
            iat: 0,
            nbf: 0,
            exp,
        }
    }

    #[test]
    fn hits_until_expiry_plus_leeway_only_for_the_exact_token() {
        let cache = VerifiedTokens::default();
        cache.insert("tok.en.one", &claims(1000), 990);
        assert!(cache.get("tok.en.one", 1000).is_some());
        assert!(cache
            .get("tok.en.one", 1000 + LEEWAY_SECONDS as i64)
            .is_some());
        assert!(cache.get("tok.en.onE", 1000).is_none());
        assert!(cache
            .get("tok.en.one", 1001 + LEEWAY_SECONDS as i64)
            .is_none());
        assert!(
            cache.get("tok.en.one", 995).is_none(),
            "an expired entry is dropped"
        );
    }

    #[test]
    fn entries_are_rechecked_after_a_minute_and_forgotten_by_jti() {
        let cache = VerifiedTokens::default();
        cache.insert("tok.en.one", &claims(10_000), 1000);
        assert!(cache
            .get("tok.en.one", 1000 + RECHECK_SECONDS - 1)
            .is_some());
        assert!(cache.get("tok.en.one", 1000 + RECHECK_SECONDS).is_none());
        let mut other = claims(10_000);
        other.jti = Uuid::from_u128(7);
        cache.insert("tok.en.one", &claims(10_000), 1000);
        cache.insert("tok.en.two", &other, 1000);
        cache.forget(Uuid::nil());
        assert!(cache.get("tok.en.one", 1001).is_none());
        assert!(cache.get("tok.en.two", 1001).is_some());
    }
}
