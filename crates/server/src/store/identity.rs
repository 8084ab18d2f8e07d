//! Rows of the identity tables: users, devices, refresh families, signing
//! keys, admin keys, business events.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::NewAuditEntry;

/// Whether a user may sign in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    /// Normal.
    Active,
    /// Blocked by an operator or the firewall.
    Blocked,
}

impl UserStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Blocked => "blocked",
        }
    }

    /// Parses the stored text (unknown values are treated as blocked: fail closed).
    pub fn parse(raw: &str) -> Self {
        if raw == "active" {
            Self::Active
        } else {
            Self::Blocked
        }
    }
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub id: Uuid,
    /// Lower-cased email.
    pub email: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Whether the user may sign in.
    pub status: UserStatus,
}

/// Whether a device's tokens are honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Normal.
    Active,
    /// Its sessions were revoked (e.g. refresh-token reuse): 401 `device_revoked`.
    Revoked,
    /// Quarantined (e.g. repeated attestation failures): 403 `device_locked`.
    Quarantined,
    /// Locked by the kill-switch: 403 `device_locked`.
    Locked,
}

impl DeviceStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Quarantined => "quarantined",
            Self::Locked => "locked",
        }
    }

    /// Parses the stored text (unknown values are treated as revoked: fail closed).
    pub fn parse(raw: &str) -> Self {
        match raw {
            "active" => Self::Active,
            "quarantined" => Self::Quarantined,
            "locked" => Self::Locked,
            _ => Self::Revoked,
        }
    }
}

/// A device bound to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Client-chosen device id (`[A-Za-z0-9_-]{8,64}`).
    pub id: String,
    /// Owner.
    pub user_id: Uuid,
    /// SHA-256 of the app's device fingerprint.
    pub fingerprint_sha256: Vec<u8>,
    /// `android` or `ios`.
    pub platform: String,
    /// Whether its tokens are honoured.
    pub status: DeviceStatus,
    /// `unknown`, `verified` or `failed`.
    pub attestation_state: String,
    /// Attestation failures since the last success.
    pub attestation_failures: u32,
}

/// A refresh token to store (only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRefreshToken {
    /// SHA-256 of the opaque token.
    pub token_sha256: Vec<u8>,
    /// Id of the access token issued with it.
    pub jti: Uuid,
    /// Issue time.
    pub issued_at: DateTime<Utc>,
    /// Sliding expiry.
    pub expires_at: DateTime<Utc>,
}

/// A new device session: bind the device, revoke its previous family, start
/// a new one with its first refresh token — one transaction.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The user signing in.
    pub user_id: Uuid,
    /// The device.
    pub device_id: String,
    /// SHA-256 of the device fingerprint.
    pub fingerprint_sha256: Vec<u8>,
    /// `android` or `ios`.
    pub platform: String,
    /// The new family's id.
    pub family_id: Uuid,
    /// Its first refresh token.
    pub token: NewRefreshToken,
}

/// What the store knows of a presented refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// The family it belongs to.
    pub family_id: Uuid,
    /// Whether the family is still active.
    pub family_active: bool,
    /// The family's user.
    pub user_id: Uuid,
    /// The family's device.
    pub device_id: String,
    /// The fingerprint hash the family was issued to.
    pub fingerprint_sha256: Vec<u8>,
    /// Whether this token was already exchanged.
    pub used: bool,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// A JWT signing key as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyRecord {
    /// Key id (`kid`).
    pub kid: String,
    /// `ES256` or `RS256`.
    pub alg: String,
    /// PKCS#8 DER of the private key; `None` when held outside the database.
    pub private_der: Option<Vec<u8>>,
    /// The public JWK.
    pub public_jwk: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it stopped signing.
    pub retired_at: Option<DateTime<Utc>>,
}

/// A business event to record. IPs are already anonymized.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `create:user`, `refresh:reuse`, …
    pub event_type: String,
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// IPv4 /24 or IPv6 /48.
    pub ip_prefix: Option<String>,
    /// Keyed HMAC of the full address.
    pub ip_hmac: Option<String>,
    /// Type-specific metadata.
    pub metadata: serde_json::Value,
}

/// Revokes every session of a device, optionally changing its status and
/// writing an audit row and an event — one transaction.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The device.
    pub device_id: String,
    /// Why (stored on the families).
    pub reason: String,
    /// New device status, if it changes.
    pub device_status: Option<DeviceStatus>,
    /// Audit row to append.
    pub audit: Option<NewAuditEntry>,
    /// Event to record.
    pub event: Option<NewEvent>,
}

/// The result of recording an attestation verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttestationOutcome {
    /// Failures since the last success.
    pub failures: u32,
    /// True when this verdict moved the device into quarantine.
    pub quarantined: bool,
}

/// The result of a refresh-token compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was unused and its family active: it is now spent and the
    /// new token stored.
    Rotated,
    /// The token had already been spent (by an earlier or concurrent request).
    AlreadyUsed,
    /// The family was revoked (logout, new sign-in, reuse) in the meantime.
    FamilyInactive,
}
