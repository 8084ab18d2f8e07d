//! The audit trail's hash chain: what is hashed, and how a chain is checked.
//!
//! Row `n` stores `prev_hash` (row `n−1`'s `row_hash`, or 64 zeros for the
//! first) and `row_hash = SHA-256(prev_hash "|" canonical row)`, where the
//! canonical row is a fixed-order JSON array of every column and `seq`.
//! Appends are serialised (an advisory transaction lock on PostgreSQL, the
//! single writer on SQLite), so the chain is one line. Editing a row breaks
//! its own hash; deleting or inserting one breaks the link after it.

use sha2::{Digest, Sha256};

use super::AuditEntry;

/// `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `row_hash` of `entry` at position `seq` after `prev_hash`.
pub fn row_hash(prev_hash: &str, seq: i64, entry: &AuditEntry) -> String {
    let canonical = serde_json::json!([
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
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"|");
    hasher.update(canonical.to_string().as_bytes());
    hex::encode(hasher.finalize())
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
}

/// Checks consecutive `rows` (ordered by `seq`) that follow a row whose
/// `row_hash` is `prev` (and position `prev_seq`); returns the last hash
/// and position, for the next batch.
pub fn check(
    rows: &[ChainedRow],
    mut prev: String,
    mut prev_seq: i64,
) -> Result<(String, i64), ChainBreak> {
    for row in rows {
        if row.seq != prev_seq + 1 || row.prev_hash != prev {
            return Err(ChainBreak::Unlinked { seq: row.seq });
        }
        if row_hash(&row.prev_hash, row.seq, &row.entry) != row.row_hash {
            return Err(ChainBreak::Edited { seq: row.seq });
        }
        prev = row.row_hash.clone();
        prev_seq = row.seq;
    }
    Ok((prev, prev_seq))
}
