//! Threat intelligence: blacklisted app hashes, domains and IPs/CIDRs.
//!
//! The lists live in the database (so no restart forgets them) and every
//! instance holds them in memory for lookups on the hot path. A change —
//! `POST /v1/admin/threat-intel` or `blockremote intel import` — publishes on
//! [`CHANGED_CHANNEL`] and every instance reloads; a periodic reload covers a
//! lost message. A hit is a hard fact: the engine locks at once.
//!
//! Domains match exactly or as a parent (`evil.example` blacklists
//! `cdn.evil.example`). The client address is checked at ingestion, where
//! it is known; only the verdict travels with the job, never the address.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use blockremote_engine::{heartbeat::Context, IntelHits};
use ipnet::IpNet;

use crate::{
    state::SharedState,
    store::{
        reload::{keep_fresh, Reload},
        Store, StoreResult,
    },
};

/// Pub/sub channel announcing a change to the lists.
pub const CHANGED_CHANNEL: &str = "intel:changed";
/// Reload period when no change is announced.
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// The kinds of entry.
pub const KINDS: [&str; 3] = ["app_hash", "domain", "ip"];

#[derive(Debug, Default)]
struct Lists {
    app_hashes: HashSet<String>,
    domains: HashSet<String>,
    nets: Vec<IpNet>,
}

/// The in-memory lists (see the module docs).
#[derive(Debug, Default)]
pub struct ThreatIntel {
    lists: RwLock<Lists>,
}

/// Normalises an entry of `kind`; `None` when it is not valid.
pub fn normalize(kind: &str, value: &str) -> Option<String> {
    let value = value.trim();
    match kind {
        "app_hash" => {
            let ok = (8..=128).contains(&value.len())
                && value.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'-' | b'_' | b':' | b'=' | b'+' | b'/')
                });
            ok.then(|| value.to_ascii_lowercase())
        }
        "domain" => {
            let d = value.trim_end_matches('.').to_ascii_lowercase();
            let ok = (1..=253).contains(&d.len())
                && d.split('.').all(|l| {
                    (1..=63).contains(&l.len())
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            ok.then_some(d)
        }
        "ip" => {
            if let Ok(net) = value.parse::<IpNet>() {
                Some(net.trunc().to_string())
            } else {
                value
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| IpNet::from(ip).to_string())
            }
        }
        _ => None,
    }
}

impl ThreatIntel {
    /// Loads the lists, subscribes to changes and reloads periodically.
    pub async fn start(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
    ) -> anyhow::Result<Arc<Self>> {
        let intel = Arc::new(Self::default());
        keep_fresh(
            &intel,
            store,
            shared.as_ref(),
            CHANGED_CHANNEL,
            RELOAD_EVERY,
        )
        .await?;
        Ok(intel)
    }

    /// Replaces the lists with the store's.
    pub async fn reload(&self, store: &dyn Store) -> StoreResult<()> {
        Reload::reload(self, store).await
    }

    /// True when `ip` is on the blacklist.
    pub fn ip_listed(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else { return false };
        self.lists
            .read()
            .map(|l| l.nets.iter().any(|n| n.contains(&ip)))
            .unwrap_or(false)
    }

    /// What the heartbeat's context hits (the address verdict comes from
    /// ingestion: `ip_hit`).
    pub fn hits(&self, context: &Context, ip_hit: bool) -> IntelHits {
        let Ok(lists) = self.lists.read() else {
            return IntelHits::default();
        };
        let app = context
            .app_hashes
            .iter()
            .any(|h| lists.app_hashes.contains(&h.trim().to_ascii_lowercase()));
        let domain = context.dns.iter().any(|d| {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            let mut rest = d.as_str();
            loop {
                if lists.domains.contains(rest) {
                    return true;
                }
                match rest.split_once('.') {
                    Some((_, parent)) => rest = parent,
                    None => return false,
                }
            }
        });
        IntelHits {
            app,
            domain,
            ip: ip_hit,
            window_seen_elsewhere: false,
        }
    }
}

#[async_trait::async_trait]
impl Reload for ThreatIntel {
    async fn reload(&self, store: &dyn Store) -> StoreResult<()> {
        let mut lists = Lists::default();
        for (kind, value) in store.threat_intel().await? {
            match kind.as_str() {
                "app_hash" => {
                    lists.app_hashes.insert(value);
                }
                "domain" => {
                    lists.domains.insert(value);
                }
                "ip" => {
                    if let Ok(net) = value.parse() {
                        lists.nets.push(net);
                    }
                }
                _ => {}
            }
        }
        if let Ok(mut current) = self.lists.write() {
            *current = lists;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_normalised_or_refused() {
        assert_eq!(
            normalize("domain", "Evil.Example."),
            Some("evil.example".into())
        );
        assert_eq!(normalize("domain", "bad domain"), None);
        assert_eq!(normalize("ip", "10.1.2.3/8"), Some("10.0.0.0/8".into()));
        assert_eq!(normalize("ip", "192.0.2.7"), Some("192.0.2.7/32".into()));
        assert_eq!(
            normalize("ip", "2001:db8::1"),
            Some("2001:db8::1/128".into())
        );
        assert_eq!(normalize("ip", "nope"), None);
        assert_eq!(
            normalize("app_hash", "ABCDEF0123456789"),
            Some("abcdef0123456789".into())
        );
        assert_eq!(normalize("app_hash", "short"), None);
        assert_eq!(normalize("other", "x"), None);
    }

    #[test]
    fn hits_match_hashes_parent_domains_and_networks() {
        let intel = ThreatIntel::default();
        {
            let mut l = intel.lists.write().expect("lock");
            l.app_hashes.insert("deadbeefdeadbeef".into());
            l.domains.insert("evil.example".into());
            l.nets.push("203.0.113.0/24".parse().expect("net"));
        }
        let context = Context {
            app_hashes: vec!["DEADBEEFDEADBEEF".into()],
            dns: vec!["cdn.evil.example".into()],
            ..Default::default()
        };
        let hits = intel.hits(&context, false);
        assert!(hits.app && hits.domain && !hits.ip);
        let clean = Context {
            dns: vec!["notevil.example".into(), "example".into()],
            ..Default::default()
        };
        assert_eq!(intel.hits(&clean, false), IntelHits::default());
        assert!(intel.ip_listed(Some("203.0.113.9".parse().expect("ip"))));
        assert!(!intel.ip_listed(Some("198.51.100.9".parse().expect("ip"))));
        assert!(!intel.ip_listed(None));
    }
}
