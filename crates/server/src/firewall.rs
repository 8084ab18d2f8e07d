//! The abuse firewall: rules over business events, as data.
//!
//! Rules live in the database; every instance caches them and reloads when
//! one changes (pub/sub on [`CHANGED_CHANNEL`], and every [`RELOAD_EVERY`]
//! in case a message is lost). A sensitive action asks [`Firewall::check`] before it
//! proceeds: each rule counting that action's event type counts one more for
//! the caller's scope (exact IP by keyed HMAC, IP prefix, user or device) in
//! a shared, atomic counter per window. Past the threshold, the first time in
//! a window, the rule's side effect runs — block the users (revoking their
//! sessions, and taking their devices out of service with `CRITICAL_LOCK`)
//! or quarantine the devices (`IMMEDIATE_QUARANTINE`) the scope created
//! within the look-back — and a decision is
//! recorded with the rule as it was, the anonymised scope and every affected
//! id, so an operator can undo it in one call. While the scope stays over the
//! threshold the action gets the same generic 429 `rate_limited` a plain
//! rate limit gives: nothing about rules, thresholds or counts. In `simulate`
//! mode the decision is recorded and nothing is blocked.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use uuid::Uuid;

use crate::{
    auth::{client_ip, Auth},
    realtime::{self, Action},
    state::{SharedState, StateError},
    store::{
        reload::{keep_fresh, Reload},
        FirewallDecision, FirewallRule, NewDecision, RuleMode, RuleScope, SideEffect, Store,
        StoreError, StoreResult,
    },
    telemetry::{metrics::RuleLabels, Metrics},
};

/// Pub/sub channel announcing a rule change.
pub const CHANGED_CHANNEL: &str = "firewall:rules_changed";
/// Reload period without announcements.
pub const RELOAD_EVERY: Duration = Duration::from_secs(3);
/// How long an undone decision's scope is exempt, so the same burst does
/// not re-block at once.
pub const UNDO_ALLOW_FOR: Duration = Duration::from_secs(600);

/// Who is acting, as the firewall sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    /// The client address (only its HMAC or prefix is ever kept).
    pub ip: Option<IpAddr>,
    /// The user, when known.
    pub user_id: Option<Uuid>,
    /// The device, when known.
    pub device_id: Option<&'a str>,
}

/// The cached rules.
#[derive(Debug, Default)]
pub struct Rules {
    rules: RwLock<Vec<FirewallRule>>,
}

impl Rules {
    /// Loads the rules and keeps them fresh.
    pub async fn start(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
    ) -> anyhow::Result<Arc<Self>> {
        let rules = Arc::new(Self::default());
        keep_fresh(
            &rules,
            store,
            shared.as_ref(),
            CHANGED_CHANNEL,
            RELOAD_EVERY,
        )
        .await?;
        Ok(rules)
    }

    /// Replaces the cache with the store's rules.
    pub async fn reload(&self, store: &dyn Store) -> StoreResult<()> {
        Reload::reload(self, store).await
    }

    fn for_event(&self, event_type: &str) -> Vec<FirewallRule> {
        self.rules
            .read()
            .map(|rules| {
                rules
                    .iter()
                    .filter(|r| r.event_type == event_type && r.mode != RuleMode::Off)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Reload for Rules {
    async fn reload(&self, store: &dyn Store) -> StoreResult<()> {
        let fresh = store.firewall_rules().await?;
        if let Ok(mut rules) = self.rules.write() {
            *rules = fresh;
        }
        Ok(())
    }
}

/// The `Retry-After` of every firewall refusal, whatever the rule: the same
/// for all of them, so the answer tells a prober nothing about the rule's
/// window (or which rule it met).
pub const REFUSED_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why the firewall refused an action, or could not decide.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// An enforcing rule's threshold is passed: the generic 429, the same a
    /// plain rate limit gives (nothing about rules, thresholds or counts).
    #[error("refused for {retry_after:?}")]
    Refused {
        /// When the caller may try again.
        retry_after: Duration,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shared state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The abuse firewall: the cached rules and the handles their side effects use.
pub struct Firewall {
    rules: Arc<Rules>,
    store: Arc<dyn Store>,
    shared: Arc<dyn SharedState>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
}

fn counter_key(rule: &FirewallRule, key: &str) -> String {
    format!("fw:{}:v{}:{key}", rule.name, rule.version)
}

fn allow_key(rule: &str, key: &str) -> String {
    format!("fw:allow:{rule}:{key}")
}

impl Firewall {
    /// Loads the rules and keeps them fresh (see [`Rules::start`]).
    pub async fn start(
        store: Arc<dyn Store>,
        shared: Arc<dyn SharedState>,
        auth: Arc<Auth>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let rules = Rules::start(store.clone(), shared.clone()).await?;
        Ok(Self {
            rules,
            store,
            shared,
            auth,
            metrics,
        })
    }

    /// The metric labels of `rule`.
    fn labels(rule: &FirewallRule) -> RuleLabels {
        RuleLabels {
            rule: rule.name.clone(),
            mode: rule.mode.as_str(),
        }
    }

    /// The cached rules (reloaded at once after an operator's change).
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The anonymised key of `subject` in `scope` (never an address).
    fn scope_key(&self, scope: RuleScope, subject: &Subject<'_>) -> Option<String> {
        match scope {
            RuleScope::Ip => subject.ip.map(|ip| client_ip::hmac(self.auth.ip_key(), ip)),
            RuleScope::IpPrefix => subject.ip.map(client_ip::prefix),
            RuleScope::User => subject.user_id.map(|u| u.to_string()),
            RuleScope::Device => subject.device_id.map(str::to_owned),
        }
    }

    /// The key `subject` is counted under for `rule`, unless the subject has
    /// none for the rule's scope or an undo exempted it.
    async fn counted_key(
        &self,
        rule: &FirewallRule,
        subject: &Subject<'_>,
    ) -> Result<Option<String>, FirewallError> {
        let Some(key) = self.scope_key(rule.scope, subject) else {
            return Ok(None);
        };
        let exempt = self
            .shared
            .get(&allow_key(&rule.name, &key))
            .await?
            .is_some();
        Ok((!exempt).then_some(key))
    }

    /// Counts `event_type` for `subject` against every rule on it;
    /// [`FirewallError::Refused`] when an enforcing rule's threshold is
    /// passed (see the module docs).
    pub async fn check(&self, event_type: &str, subject: Subject<'_>) -> Result<(), FirewallError> {
        for rule in self.rules.for_event(event_type) {
            let Some(key) = self.counted_key(&rule, &subject).await? else {
                continue;
            };
            let window = Duration::from_secs(u64::from(rule.window_seconds));
            let count = self
                .shared
                .incr(&counter_key(&rule, &key), 1, window)
                .await?;
            self.metrics
                .firewall_evaluations
                .get_or_create(&Self::labels(&rule))
                .inc();
            let threshold = i64::from(rule.threshold);
            if count <= threshold {
                continue;
            }
            if count == threshold + 1 {
                // The first request past the threshold in this window decides.
                self.metrics
                    .firewall_decisions
                    .get_or_create(&Self::labels(&rule))
                    .inc();
                if let Err(e) = self.decide(&rule, &key).await {
                    tracing::error!(error = %e, rule = %rule.name, "firewall decision failed");
                }
            }
            if rule.mode == RuleMode::Enforce {
                return Err(FirewallError::Refused {
                    retry_after: REFUSED_RETRY_AFTER,
                });
            }
        }
        Ok(())
    }

    /// Whether `subject` is already past an enforcing rule on `event_type`,
    /// without counting: what an action whose failures are counted (a login)
    /// asks *before* its expensive work, so a throttled scope is refused
    /// outright — right answers included — and never costs a password hash.
    pub async fn throttled(
        &self,
        event_type: &str,
        subject: Subject<'_>,
    ) -> Result<(), FirewallError> {
        for rule in self.rules.for_event(event_type) {
            if rule.mode != RuleMode::Enforce {
                continue;
            }
            let Some(key) = self.counted_key(&rule, &subject).await? else {
                continue;
            };
            let count = self
                .shared
                .get(&counter_key(&rule, &key))
                .await?
                .and_then(|raw| std::str::from_utf8(&raw).ok()?.parse::<i64>().ok())
                .unwrap_or(0);
            if count > i64::from(rule.threshold) {
                return Err(FirewallError::Refused {
                    retry_after: REFUSED_RETRY_AFTER,
                });
            }
        }
        Ok(())
    }

    #[tracing::instrument(name = "firewall.decide", skip_all, fields(rule = %rule.name, mode = rule.mode.as_str()))]
    async fn decide(&self, rule: &FirewallRule, key: &str) -> anyhow::Result<FirewallDecision> {
        let since = chrono::Utc::now()
            - chrono::Duration::seconds(i64::from(rule.lookback_seconds.max(rule.window_seconds)));
        let (users, devices) = match rule.side_effect {
            // The users the scope created, and the devices they registered with
            // (locked too, so the block bites before their access tokens expire).
            SideEffect::BlockUsers => {
                self.store
                    .scope_members("create:user", rule.scope, key, since, true)
                    .await?
            }
            SideEffect::QuarantineDevices => {
                let devices = if rule.scope == RuleScope::Device {
                    vec![key.to_owned()]
                } else {
                    self.store
                        .scope_members("create:session", rule.scope, key, since, false)
                        .await?
                        .1
                };
                (Vec::new(), devices)
            }
            SideEffect::Throttle => (Vec::new(), Vec::new()),
        };
        let enforce = rule.mode == RuleMode::Enforce;
        let event = self.auth.event(
            "firewall:block",
            None,
            None,
            None,
            serde_json::json!({
                "rule": rule.name, "version": rule.version, "mode": rule.mode,
                "side_effect": rule.side_effect, "threshold": rule.threshold,
                "window_seconds": rule.window_seconds, "lookback_seconds": rule.lookback_seconds,
                "scope": rule.scope, "scope_key": key, "users": users, "devices": devices,
            }),
        );
        let decision = self
            .store
            .record_firewall_decision(
                NewDecision {
                    rule: rule.clone(),
                    scope_key: key.to_owned(),
                    users,
                    devices,
                    event,
                },
                enforce,
            )
            .await?;
        self.audit(
            &decision,
            &format!(
                "firewall:{}:{}",
                rule.mode.as_str(),
                rule.side_effect.as_str()
            ),
            None,
        )
        .await?;
        if enforce {
            let action = if rule.side_effect == SideEffect::BlockUsers {
                Action::CriticalLock
            } else {
                Action::ImmediateQuarantine
            };
            for device in &decision.affected_devices {
                self.auth.devices.invalidate(device).await;
                realtime::issue(
                    self.shared.as_ref(),
                    self.store.as_ref(),
                    &self.metrics,
                    realtime::Origin::Firewall,
                    device,
                    action,
                    "abuse_firewall",
                )
                .await?;
            }
        }
        tracing::warn!(
            rule = %rule.name,
            mode = rule.mode.as_str(),
            users = decision.affected_users.len(),
            devices = decision.affected_devices.len(),
            decision = %decision.id,
            "firewall decision"
        );
        Ok(decision)
    }

    /// One audit row per decision and per undo: the rule and the counts, never
    /// the scope's address; an undo names its operator.
    async fn audit(
        &self,
        decision: &FirewallDecision,
        action: &str,
        actor: Option<&str>,
    ) -> StoreResult<()> {
        self.store
            .append_audit(crate::store::NewAuditEntry {
                user_id: None,
                device_id: None,
                jti: None,
                ip: None,
                user_agent: None,
                source: crate::store::AuditSource::Http,
                threat_score: None,
                decision_reason: Some(format!(
                    "{} v{} decision {} ({} users, {} devices)",
                    decision.rule_name,
                    decision.rule_version,
                    decision.id,
                    decision.affected_users.len(),
                    decision.affected_devices.len()
                )),
                attestation_state: None,
                action_taken: action.to_owned(),
                actor: actor.map(str::to_owned),
                request_id: None,
            })
            .await?;
        Ok(())
    }

    /// Undoes a decision (see [`crate::store::FirewallStore::undo_firewall_decision`]),
    /// removing exactly its holds, tells each device nothing else holds `UNLOCK`, and exempts its scope for [`UNDO_ALLOW_FOR`].
    #[tracing::instrument(name = "firewall.undo", skip_all, fields(decision_id = %id))]
    pub async fn undo(
        &self,
        id: Uuid,
        operator: &str,
    ) -> Result<Option<(FirewallDecision, bool)>, FirewallError> {
        let event = self.auth.event(
            "firewall:undo",
            None,
            None,
            None,
            serde_json::json!({"decision_id": id}),
        );
        let Some((decision, undone)) = self.store.undo_firewall_decision(id, event).await? else {
            return Ok(None);
        };
        if undone {
            self.audit(&decision, "firewall:undo", Some(operator))
                .await?;
            self.shared
                .set(
                    &allow_key(&decision.rule_name, &decision.scope_key),
                    b"1",
                    Some(UNDO_ALLOW_FOR),
                )
                .await?;
            if decision.mode == RuleMode::Enforce {
                for device in &decision.affected_devices {
                    self.auth.devices.invalidate(device).await;
                    // Only a device nothing else holds is told it is free.
                    let free = self
                        .store
                        .device(device)
                        .await?
                        .is_some_and(|d| d.status == crate::store::DeviceStatus::Active);
                    if !free {
                        continue;
                    }
                    realtime::issue(
                        self.shared.as_ref(),
                        self.store.as_ref(),
                        &self.metrics,
                        realtime::Origin::Firewall,
                        device,
                        Action::Unlock,
                        "firewall_undo",
                    )
                    .await?;
                }
            }
        }
        Ok(Some((decision, undone)))
    }
}
