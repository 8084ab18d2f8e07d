//! A bulk change to the threat-intelligence blacklists, as the admin API
//! (`POST /v1/admin/threat-intel`) and the CLI (`blockremote intel import`)
//! both accept it: parsed, validated and flattened here, once.
//!
//! The lists themselves, their cache and their matching live in
//! [`crate::signals::intel`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    signals::intel::{self, ThreatIntel},
    state::SharedState,
    store::{Store, StoreError},
};

/// Entries by kind.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntelEntries {
    /// App package hashes (8–128 characters).
    #[serde(default)]
    pub app_hashes: Vec<String>,
    /// Domains; a listed domain also lists its subdomains.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Addresses or CIDRs.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// A bulk change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"add": {"app_hashes": ["9f2c1e0b7a6d5c4b"], "domains": ["evil.example"], "ips": ["203.0.113.0/24"]},
    "remove": {"domains": ["old.example"]}, "reason": "feed-2026-11-23"}))]
pub struct IntelChange {
    /// Entries to add.
    #[serde(default)]
    pub add: IntelEntries,
    /// Entries to remove.
    #[serde(default)]
    pub remove: IntelEntries,
    /// Why (kept with added entries).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Largest number of entries in one change (through the API).
pub const MAX_ENTRIES: usize = 10_000;

/// Why a change was refused, or could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum IntelChangeError {
    /// An entry does not normalise; `field` is its JSON path
    /// (`add.domains[3]`).
    #[error("validation failed on {field}: is not a valid entry")]
    InvalidEntry {
        /// The first bad entry's path.
        field: String,
    },
    /// An address range broader than /8 (IPv4) or /32 (IPv6) added: one
    /// entry must not blacklist a sizeable share of the Internet.
    #[error("validation failed on {field}: is broader than /8 (IPv4) or /32 (IPv6)")]
    TooBroad {
        /// The entry's path.
        field: String,
    },
    /// More than [`MAX_ENTRIES`] entries added and removed together.
    #[error("validation failed on add: at most {MAX_ENTRIES} entries per change")]
    TooManyEntries,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Flattens and validates entries into `(kind, normalised value)` pairs;
/// the error names the first bad entry, under `side` (`add` or `remove`).
pub fn flatten(
    entries: &IntelEntries,
    side: &str,
) -> Result<Vec<(String, String)>, IntelChangeError> {
    let mut out = Vec::new();
    for (kind, field, values) in [
        ("app_hash", "app_hashes", &entries.app_hashes),
        ("domain", "domains", &entries.domains),
        ("ip", "ips", &entries.ips),
    ] {
        for (i, value) in values.iter().enumerate() {
            let normalized =
                intel::normalize(kind, value).ok_or_else(|| IntelChangeError::InvalidEntry {
                    field: format!("{side}.{field}[{i}]"),
                })?;
            // Only additions are held to the breadth limit: an entry stored
            // before it existed can still be removed.
            if kind == "ip" && side == "add" && too_broad(&normalized) {
                return Err(IntelChangeError::TooBroad {
                    field: format!("{side}.{field}[{i}]"),
                });
            }
            out.push((kind.to_owned(), normalized));
        }
    }
    Ok(out)
}

/// True for a normalised range broader than /8 (IPv4) or /32 (IPv6).
fn too_broad(net: &str) -> bool {
    match net.parse::<ipnet::IpNet>() {
        Ok(ipnet::IpNet::V4(v4)) => v4.prefix_len() < 8,
        Ok(ipnet::IpNet::V6(v6)) => v6.prefix_len() < 32,
        Err(_) => false,
    }
}

/// Applies a change of at most [`MAX_ENTRIES`] entries, reloads this
/// instance's lists and tells every other instance to reload; returns how
/// many entries were added or removed.
pub async fn apply(
    store: &dyn Store,
    lists: &ThreatIntel,
    shared: &dyn SharedState,
    change: &IntelChange,
) -> Result<u64, IntelChangeError> {
    let add = flatten(&change.add, "add")?;
    let remove = flatten(&change.remove, "remove")?;
    if add.len() + remove.len() > MAX_ENTRIES {
        return Err(IntelChangeError::TooManyEntries);
    }
    let changed = store
        .update_threat_intel(&add, &remove, change.reason.as_deref())
        .await?;
    lists.reload(store).await?;
    if let Err(e) = shared.publish(intel::CHANGED_CHANNEL, b"1").await {
        tracing::warn!(error = %e, "threat-intel change not broadcast; other instances reload within 30 s");
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_flatten_in_kind_order_normalised() {
        let entries = IntelEntries {
            app_hashes: vec!["9f2c1e0b7a6d5c4b".into()],
            domains: vec!["Evil.Example".into()],
            ips: vec!["203.0.113.0/24".into()],
        };
        let flat = flatten(&entries, "add").expect("valid entries");
        let kinds: Vec<&str> = flat.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["app_hash", "domain", "ip"]);
        assert_eq!(
            flat[1].1,
            intel::normalize("domain", "Evil.Example").expect("valid domain")
        );
    }

    #[test]
    fn the_first_bad_entry_is_named_with_its_side() {
        let entries = IntelEntries {
            domains: vec!["ok.example".into()],
            ips: vec![
                "203.0.113.1".into(),
                "not an address".into(),
                "also bad".into(),
            ],
            ..IntelEntries::default()
        };
        let err = flatten(&entries, "remove").expect_err("a bad entry");
        assert!(
            matches!(&err, IntelChangeError::InvalidEntry { field } if field == "remove.ips[1]"),
            "{err:?}"
        );
        // The CLI prints this line; it is the wording the API's error had.
        assert_eq!(
            err.to_string(),
            "validation failed on remove.ips[1]: is not a valid entry"
        );
    }
}
