//! The audit trail's hash chain: what is hashed, and how a chain is checked.
//!
//! Row `n` stores `prev_hash` (row `n−1`'s `row_hash`, or 64 zeros for the
//! first) and `row_hash`, computed over `prev_hash "|" canonical row`, where
//! the canonical row is a fixed-order JSON array of every column and `seq`.
//! Appends are serialised (an advisory transaction lock on PostgreSQL, the
//! single writer on SQLite), so the chain is one line. Editing a row breaks
//! its own hash; deleting or inserting one breaks the link after it.
//!
//! **Keyed.** With a key-encryption key configured, the hash is
//! HMAC-SHA256 under the *audit-chain key*, stored as `hmac:<hex>`: someone
//! who can write the database but lacks the KEK cannot recompute the chain
//! after an edit. The audit-chain key is a random 32-byte server secret
//! sealed under the KEK (so `keys rewrap` keeps it), together with the
//! `seq` of the first row written under it ([`ChainKey::keyed_from`]). Rows
//! before that point were written unkeyed (plain SHA-256 hex, as before) and
//! verify as such; from it on, an unkeyed row is a break ([`ChainBreak::Unkeyed`]),
//! so a chain cannot be downgraded by rewriting its tail as plain SHA-256.
//! The newest rows can still be cut off without breaking any link: anchor
//! the head (`blockremote audit head`) elsewhere and check it with
//! `audit verify --head`.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::AuditEntry;

/// `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The prefix of a keyed `row_hash`.
pub const KEYED_PREFIX: &str = "hmac:";

/// The audit-chain key and the first row written under it.
#[derive(Clone, PartialEq, Eq)]
pub struct ChainKey {
    /// The HMAC key.
    pub key: [u8; 32],
    /// `seq` of the first keyed row: earlier rows are unkeyed.
    pub keyed_from: i64,
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainKey(keyed from {})", self.keyed_from)
    }
}

impl ChainKey {
    /// The stored form (sealed by the caller): key, then `keyed_from` big-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.key.to_vec();
        out.extend_from_slice(&self.keyed_from.to_be_bytes());
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let key: [u8; 32] = bytes.get(..32)?.try_into().ok()?;
        let from: [u8; 8] = bytes.get(32..40)?.try_into().ok()?;
        (bytes.len() == 40).then(|| Self {
            key,
            keyed_from: i64::from_be_bytes(from),
        })
    }
}

fn canonical(seq: i64, entry: &AuditEntry) -> String {
    let row = serde_json::json!([
        seq,
        entry.id,
        entry.user_id,
        entry.device_id,
        entry.jti,
        entry.ip,
        entry.user_agent,
        entry.source.as_str(),
        entry.threat_score,
        entry.decision_reason,
        entry.attestation_state,
        entry.action_taken,
        entry
            .created_at
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
    ]);
    // Rows from before `actor` and `request_id` existed have neither, and
    // keep the hash they were written with; a row with either hashes both.
    if let (None, None) = (&entry.actor, &entry.request_id) {
        return row.to_string();
    }
    let mut row = row;
    if let Some(fields) = row.as_array_mut() {
        fields.push(serde_json::json!(entry.actor));
        fields.push(serde_json::json!(entry.request_id));
    }
    row.to_string()
}

/// Unkeyed `row_hash` of `entry` at position `seq` after `prev_hash`.
pub fn row_hash(prev_hash: &str, seq: i64, entry: &AuditEntry) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"|");
    hasher.update(canonical(seq, entry).as_bytes());
    hex::encode(hasher.finalize())
}

/// Keyed `row_hash` (`hmac:<hex>`) of `entry` at `seq` after `prev_hash`.
pub fn keyed_row_hash(key: &[u8; 32], prev_hash: &str, seq: i64, entry: &AuditEntry) -> String {
    // HMAC takes keys of any length; 32 bytes cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(prev_hash.as_bytes());
    mac.update(b"|");
    mac.update(canonical(seq, entry).as_bytes());
    format!("{KEYED_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
}

/// The `row_hash` a row at `seq` gets when written with `key` (if any).
pub fn hash_for(key: Option<&ChainKey>, prev_hash: &str, seq: i64, entry: &AuditEntry) -> String {
    match key {
        Some(k) if seq >= k.keyed_from => keyed_row_hash(&k.key, prev_hash, seq, entry),
        _ => row_hash(prev_hash, seq, entry),
    }
}

/// One chained row as stored.
#[derive(Debug, Clone)]
pub struct ChainedRow {
    /// Position in the chain (1, 2, …).
    pub seq: i64,
    /// Stored link to the previous row.
    pub prev_hash: String,
    /// Stored hash of this row.
    pub row_hash: String,
    /// The row.
    pub entry: AuditEntry,
}

/// Where a chain check stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// The row's content no longer matches its hash (edited).
    Edited {
        /// Position of the row.
        seq: i64,
    },
    /// The row does not link to the one before it (a row removed or inserted).
    Unlinked {
        /// Position of the row.
        seq: i64,
    },
    /// The row should be keyed (it comes after the chain was keyed) but is
    /// not: rewritten by someone without the key.
    Unkeyed {
        /// Position of the row.
        seq: i64,
    },
    /// The row is keyed but no audit-chain key is available (no KEK
    /// configured, or its sealed key was removed from the database).
    KeyMissing {
        /// Position of the row.
        seq: i64,
    },
}

/// Checks consecutive `rows` (ordered by `seq`) that follow a row whose
/// `row_hash` is `prev` (and position `prev_seq`); returns the last hash
/// and position, for the next batch.
pub fn check(
    rows: &[ChainedRow],
    key: Option<&ChainKey>,
    mut prev: String,
    mut prev_seq: i64,
) -> Result<(String, i64), ChainBreak> {
    for row in rows {
        if row.seq != prev_seq + 1 || row.prev_hash != prev {
            return Err(ChainBreak::Unlinked { seq: row.seq });
        }
        let keyed = row.row_hash.starts_with(KEYED_PREFIX);
        let expected = match key {
            Some(k) if row.seq >= k.keyed_from && !keyed => {
                return Err(ChainBreak::Unkeyed { seq: row.seq })
            }
            // Keyed rows and no key, or keyed rows before the key's first
            // row (the key was deleted and a new one made since).
            None if keyed => return Err(ChainBreak::KeyMissing { seq: row.seq }),
            Some(k) if row.seq < k.keyed_from && keyed => {
                return Err(ChainBreak::KeyMissing { seq: row.seq })
            }
            _ => hash_for(key, &row.prev_hash, row.seq, &row.entry),
        };
        if expected != row.row_hash {
            return Err(ChainBreak::Edited { seq: row.seq });
        }
        prev = row.row_hash.clone();
        prev_seq = row.seq;
    }
    Ok((prev, prev_seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditSource;

    fn entry(i: u32) -> AuditEntry {
        AuditEntry {
            id: uuid::Uuid::now_v7(),
            user_id: None,
            device_id: Some(format!("device_{i}")),
            jti: None,
            ip: None,
            user_agent: None,
            source: AuditSource::Http,
            threat_score: None,
            decision_reason: None,
            attestation_state: None,
            action_taken: "CRITICAL_LOCK".into(),
            actor: None,
            request_id: None,
            created_at: chrono::Utc::now(),
        }
    }

    /// Rows 1–2 written unkeyed, 3–4 under `key`.
    fn chain(key: &ChainKey) -> Vec<ChainedRow> {
        let mut prev = GENESIS.to_owned();
        (1..=4)
            .map(|seq| {
                let e = entry(seq as u32);
                let hash = hash_for(Some(key), &prev, seq, &e);
                let row = ChainedRow {
                    seq,
                    prev_hash: prev.clone(),
                    row_hash: hash.clone(),
                    entry: e,
                };
                prev = hash;
                row
            })
            .collect()
    }

    #[test]
    fn rows_before_keying_verify_unkeyed_and_after_it_only_keyed() {
        let key = ChainKey {
            key: [3; 32],
            keyed_from: 3,
        };
        let rows = chain(&key);
        assert!(!rows[1].row_hash.starts_with(KEYED_PREFIX));
        assert!(rows[2].row_hash.starts_with(KEYED_PREFIX));
        assert!(check(&rows, Some(&key), GENESIS.into(), 0).is_ok());

        // The newest row rewritten and re-hashed without the key.
        let mut forged = rows.clone();
        forged[3].entry.action_taken = "UNLOCK".into();
        forged[3].row_hash = row_hash(&forged[3].prev_hash, 4, &forged[3].entry);
        assert_eq!(
            check(&forged, Some(&key), GENESIS.into(), 0),
            Err(ChainBreak::Unkeyed { seq: 4 })
        );
        // Re-hashed with a guessed key.
        let guess = ChainKey {
            key: [4; 32],
            keyed_from: 3,
        };
        forged[3].row_hash = hash_for(Some(&guess), &forged[3].prev_hash, 4, &forged[3].entry);
        assert_eq!(
            check(&forged, Some(&key), GENESIS.into(), 0),
            Err(ChainBreak::Edited { seq: 4 })
        );
        // No key, or a newer key than the rows'.
        assert_eq!(
            check(&rows, None, GENESIS.into(), 0),
            Err(ChainBreak::KeyMissing { seq: 3 })
        );
        let newer = ChainKey {
            key: [5; 32],
            keyed_from: 5,
        };
        assert_eq!(
            check(&rows, Some(&newer), GENESIS.into(), 0),
            Err(ChainBreak::KeyMissing { seq: 3 })
        );
    }

    #[test]
    fn the_key_round_trips_through_its_stored_form() {
        let key = ChainKey {
            key: [7; 32],
            keyed_from: 42,
        };
        assert_eq!(ChainKey::from_bytes(&key.to_bytes()), Some(key));
        assert_eq!(ChainKey::from_bytes(&[0; 39]), None);
    }
}
