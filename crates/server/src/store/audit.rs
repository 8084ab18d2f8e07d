//! The audit trail: append-only rows, each chained to the one before it.
//!
//! The database refuses updates and deletes (triggers on both dialects); the
//! hash chain ([`super::audit_chain`]) makes an edit by someone who can bypass
//! the triggers visible to `blockremote audit verify`. Appends are serialised
//! so the chain is one line: see [`Dialect::lock_audit_chain`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    audit_chain,
    columns::{Id, Time},
    decode_error, now_micros,
    sql::{Dialect, SqlStore},
    StoreResult,
};

/// Where an audited action came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditSource {
    /// An HTTP request.
    Http,
    /// A WebSocket connection.
    Ws,
    /// A gRPC call.
    Grpc,
    /// A background worker.
    Worker,
    /// A `blockremote` command run by an operator (key rotation, an admin
    /// key, a threat-intel import).
    Cli,
}

impl AuditSource {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Ws => "ws",
            Self::Grpc => "grpc",
            Self::Worker => "worker",
            Self::Cli => "cli",
        }
    }

    /// Parses the stored text.
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "http" => Self::Http,
            "ws" => Self::Ws,
            "grpc" => Self::Grpc,
            "worker" => Self::Worker,
            "cli" => Self::Cli,
            _ => return None,
        })
    }
}

/// An audit row to append. `ip` must already be anonymized (a /24 or /48 prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// The token id involved.
    pub jti: Option<String>,
    /// Anonymized client IP prefix.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Where the action came from.
    pub source: AuditSource,
    /// Threat score at the time of the decision.
    pub threat_score: Option<f64>,
    /// Stable reason code(s).
    pub decision_reason: Option<String>,
    /// The device's attestation state at the time.
    pub attestation_state: Option<String>,
    /// What was done.
    pub action_taken: String,
    /// Who did it, when an operator did (`admin:` and the key's id, `cli`).
    pub actor: Option<String>,
    /// The request that wrote it; `None` takes the request being served
    /// (`telemetry::request_id`), if any.
    pub request_id: Option<String>,
}

impl NewAuditEntry {
    /// An operator's change through the API that concerns no user or
    /// device (a rule, threat intel): `action` names it, `detail` says
    /// what changed, `actor` who (`admin:` and the key's id).
    pub fn operation(actor: &str, action: &str, detail: String, ip: Option<String>) -> Self {
        Self {
            user_id: None,
            device_id: None,
            jti: None,
            ip,
            user_agent: None,
            source: AuditSource::Http,
            threat_score: None,
            decision_reason: Some(detail),
            attestation_state: None,
            action_taken: action.to_owned(),
            actor: Some(actor.to_owned()),
            request_id: None,
        }
    }
}

impl NewAuditEntry {
    /// An operator's command on the host (`blockremote keys rotate`, …):
    /// source `cli`, actor `cli`.
    pub fn cli(action: &str, detail: String) -> Self {
        Self {
            source: AuditSource::Cli,
            actor: Some("cli".to_owned()),
            ip: None,
            ..Self::operation("cli", action, detail, None)
        }
    }
}

/// Which audit rows to list (every set field must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Rows about this user.
    pub user_id: Option<Uuid>,
    /// Rows about this device.
    pub device_id: Option<String>,
    /// Rows with this `action_taken`.
    pub action: Option<String>,
    /// Rows strictly older than this `(created_at, id)` (the page cursor).
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

/// A stored audit row.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AuditEntry {
    /// Row id (UUID v7, time-ordered).
    pub id: Uuid,
    /// The user concerned.
    pub user_id: Option<Uuid>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// The token id involved.
    pub jti: Option<String>,
    /// Anonymized client IP prefix.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Where the action came from.
    pub source: AuditSource,
    /// Threat score at the time of the decision.
    pub threat_score: Option<f64>,
    /// Stable reason code(s).
    pub decision_reason: Option<String>,
    /// The device's attestation state at the time.
    pub attestation_state: Option<String>,
    /// What was done.
    pub action_taken: String,
    /// Who did it, when an operator did (`admin:` and the key's id, `cli`).
    pub actor: Option<String>,
    /// The `X-Request-Id` of the request that wrote it (the correlation id
    /// of its log lines).
    pub request_id: Option<String>,
    /// When the row was written (UTC, microsecond precision).
    pub created_at: DateTime<Utc>,
}

impl AuditEntry {
    fn from_new(entry: NewAuditEntry, id: Uuid, created_at: DateTime<Utc>) -> Self {
        Self {
            id,
            user_id: entry.user_id,
            device_id: entry.device_id,
            jti: entry.jti,
            ip: entry.ip,
            user_agent: entry.user_agent,
            source: entry.source,
            threat_score: entry.threat_score,
            decision_reason: entry.decision_reason,
            attestation_state: entry.attestation_state,
            action_taken: entry.action_taken,
            actor: entry.actor,
            request_id: entry.request_id.or_else(crate::telemetry::request_id),
            created_at,
        }
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows in the chain.
    pub rows: u64,
    /// The newest row's `(seq, row_hash)`, if any.
    pub head: Option<(i64, String)>,
    /// Whether the row an anchored head names is present with that hash
    /// (`None` when no anchor was given).
    pub anchor_found: Option<bool>,
}

/// An operator's anchor: a head printed by `blockremote audit head`, as
/// `seq:hash`, or a bare hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchor {
    /// The row at `seq` must have this hash.
    At(i64, String),
    /// Some row must have this hash.
    Hash(String),
}

impl Anchor {
    /// Parses `seq:hash` or `hash`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let hex_like = |h: &str| {
            let digits = h.strip_prefix(audit_chain::KEYED_PREFIX).unwrap_or(h);
            digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit())
        };
        match text.split_once(':') {
            Some((seq, hash)) if seq.bytes().all(|b| b.is_ascii_digit()) && !seq.is_empty() => {
                let seq = seq.parse().ok()?;
                hex_like(hash).then(|| Self::At(seq, hash.to_ascii_lowercase()))
            }
            _ => hex_like(text).then(|| Self::Hash(text.to_ascii_lowercase())),
        }
    }

    fn matches(&self, seq: i64, hash: &str) -> bool {
        match self {
            Self::At(at, expected) => *at == seq && expected == hash,
            Self::Hash(expected) => expected == hash,
        }
    }
}

/// Recomputes the whole audit chain with `key` (the audit-chain key, when
/// the chain is keyed): `Ok(Ok(report))` when intact, `Ok(Err(…))` naming
/// the first broken row. With an `anchor`, the report says whether the
/// anchored row is still there with its hash (when it is not, rows were cut
/// off or rewritten since the anchor was taken).
pub async fn verify_chain(
    store: &dyn AuditStore,
    key: Option<&audit_chain::ChainKey>,
    anchor: Option<&Anchor>,
) -> StoreResult<Result<ChainReport, audit_chain::ChainBreak>> {
    let (mut prev, mut prev_seq) = (audit_chain::GENESIS.to_owned(), 0i64);
    let mut anchor_found = anchor.map(|a| a.matches(0, audit_chain::GENESIS));
    loop {
        let rows = store.audit_chain(prev_seq, 1000).await?;
        if rows.is_empty() {
            return Ok(Ok(ChainReport {
                rows: u64::try_from(prev_seq).unwrap_or(0),
                head: (prev_seq > 0).then_some((prev_seq, prev)),
                anchor_found,
            }));
        }
        if let Some(anchor) = anchor {
            if rows.iter().any(|r| anchor.matches(r.seq, &r.row_hash)) {
                anchor_found = Some(true);
            }
        }
        match audit_chain::check(&rows, key, prev, prev_seq) {
            Ok((hash, seq)) => (prev, prev_seq) = (hash, seq),
            Err(broken) => return Ok(Err(broken)),
        }
    }
}

/// [`verify_chain`] of an unkeyed chain without an anchor: the number of
/// rows when intact.
pub async fn verify_audit_chain(
    store: &dyn AuditStore,
) -> StoreResult<Result<u64, audit_chain::ChainBreak>> {
    Ok(verify_chain(store, None, None)
        .await?
        .map(|report| report.rows))
}

/// Reading and appending the audit trail.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Sets the key appends are chained with from now on (see
    /// [`audit_chain`]); `None` writes unkeyed rows.
    fn set_chain_key(&self, key: Option<audit_chain::ChainKey>);

    /// The key appends are chained with (what verification needs).
    fn chain_key(&self) -> Option<audit_chain::ChainKey>;

    /// The newest chained row's `(seq, row_hash)`, if any.
    async fn audit_head(&self) -> StoreResult<Option<(i64, String)>>;

    /// Appends a row to the audit trail.
    async fn append_audit(&self, entry: NewAuditEntry) -> StoreResult<AuditEntry>;

    /// The newest audit rows about `user_id`, newest first.
    async fn audit_for_user(&self, user_id: Uuid, limit: u32) -> StoreResult<Vec<AuditEntry>>;

    /// Chained audit rows with `seq` greater than `after`, in order, at most `limit`.
    async fn audit_chain(
        &self,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<audit_chain::ChainedRow>>;

    /// Audit rows matching `filter`, newest first, at most `limit`.
    async fn audit_page(&self, filter: &AuditFilter, limit: u32) -> StoreResult<Vec<AuditEntry>>;
}

/// An `audit_logs` row as both dialects return it.
#[derive(FromRow)]
struct AuditRow {
    id: Id,
    user_id: Option<Id>,
    device_id: Option<String>,
    jti: Option<String>,
    ip: Option<String>,
    user_agent: Option<String>,
    source: String,
    threat_score: Option<f64>,
    decision_reason: Option<String>,
    attestation_state: Option<String>,
    action_taken: String,
    actor: Option<String>,
    request_id: Option<String>,
    created_at: Time,
}

impl TryFrom<AuditRow> for AuditEntry {
    type Error = super::StoreError;

    fn try_from(row: AuditRow) -> StoreResult<Self> {
        Ok(Self {
            id: row.id.into(),
            user_id: row.user_id.map(Into::into),
            device_id: row.device_id,
            jti: row.jti,
            ip: row.ip,
            user_agent: row.user_agent,
            source: AuditSource::parse(&row.source)
                .ok_or_else(|| decode_error(format!("unknown audit source {}", row.source)))?,
            threat_score: row.threat_score,
            decision_reason: row.decision_reason,
            attestation_state: row.attestation_state,
            action_taken: row.action_taken,
            actor: row.actor,
            request_id: row.request_id,
            created_at: row.created_at.into(),
        })
    }
}

/// A chained row: its links and the row itself.
#[derive(FromRow)]
struct ChainRow {
    seq: i64,
    prev_hash: String,
    row_hash: String,
    #[sqlx(flatten)]
    row: AuditRow,
}

fn entries(rows: Vec<AuditRow>) -> StoreResult<Vec<AuditEntry>> {
    rows.into_iter().map(AuditEntry::try_from).collect()
}

for_each_dialect! {
    impl SqlStore<Db> {
        /// Appends `entry` inside the caller's transaction, which must write
        /// (so it holds, or will hold, the dialect's write serialisation).
        pub(super) async fn insert_audit(
            &self,
            conn: &mut <Db as sqlx::Database>::Connection,
            entry: NewAuditEntry,
        ) -> StoreResult<AuditEntry> {
            let key = self
                .chain_key
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            <Db as Dialect>::lock_audit_chain(&mut *conn).await?;
            let last: Option<(i64, String)> = sqlx::query_as(
                "SELECT seq, row_hash FROM audit_logs WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&mut *conn)
            .await?;
            let (seq, prev_hash) =
                last.map_or((1, audit_chain::GENESIS.to_owned()), |(s, h)| (s + 1, h));
            let stored = AuditEntry::from_new(entry, Uuid::now_v7(), now_micros());
            let row_hash = audit_chain::hash_for(key.as_ref(), &prev_hash, seq, &stored);
            sqlx::query(
                "INSERT INTO audit_logs (id, user_id, device_id, jti, ip, user_agent, source, \
                 threat_score, decision_reason, attestation_state, action_taken, created_at, \
                 seq, prev_hash, row_hash, actor, request_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            )
            .bind(Id(stored.id))
            .bind(stored.user_id.map(Id))
            .bind(&stored.device_id)
            .bind(&stored.jti)
            .bind(&stored.ip)
            .bind(&stored.user_agent)
            .bind(stored.source.as_str())
            .bind(stored.threat_score)
            .bind(&stored.decision_reason)
            .bind(&stored.attestation_state)
            .bind(&stored.action_taken)
            .bind(Time(stored.created_at))
            .bind(seq)
            .bind(&prev_hash)
            .bind(&row_hash)
            .bind(&stored.actor)
            .bind(&stored.request_id)
            .execute(&mut *conn)
            .await?;
            Ok(stored)
        }
    }

    #[async_trait]
    impl AuditStore for SqlStore<Db> {
        fn set_chain_key(&self, key: Option<audit_chain::ChainKey>) {
            *self
                .chain_key
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = key;
        }

        fn chain_key(&self) -> Option<audit_chain::ChainKey> {
            self.chain_key
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }

        async fn audit_head(&self) -> StoreResult<Option<(i64, String)>> {
            Ok(sqlx::query_as(
                "SELECT seq, row_hash FROM audit_logs WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&self.pool)
            .await?)
        }

        #[tracing::instrument(skip_all, name = "store.append_audit", fields(action = %entry.action_taken))]
        async fn append_audit(&self, entry: NewAuditEntry) -> StoreResult<AuditEntry> {
            let mut tx = <Db as Dialect>::begin_write(&self.pool).await?;
            let stored = self.insert_audit(&mut tx, entry).await?;
            tx.commit().await?;
            Ok(stored)
        }

        async fn audit_for_user(&self, user_id: Uuid, limit: u32) -> StoreResult<Vec<AuditEntry>> {
            entries(
                sqlx::query_as(
                    "SELECT * FROM audit_logs WHERE user_id = $1 \
                     ORDER BY created_at DESC, id DESC LIMIT $2",
                )
                .bind(Id(user_id))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?,
            )
        }

        async fn audit_chain(
            &self,
            after: i64,
            limit: u32,
        ) -> StoreResult<Vec<audit_chain::ChainedRow>> {
            let rows: Vec<ChainRow> =
                sqlx::query_as("SELECT * FROM audit_logs WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(audit_chain::ChainedRow {
                        seq: r.seq,
                        prev_hash: r.prev_hash,
                        row_hash: r.row_hash,
                        entry: r.row.try_into()?,
                    })
                })
                .collect()
        }

        async fn audit_page(&self, filter: &AuditFilter, limit: u32) -> StoreResult<Vec<AuditEntry>> {
            let (before_at, before_id) = filter.before.unzip();
            entries(
                sqlx::query_as(
                    "SELECT * FROM audit_logs WHERE ($1 IS NULL OR user_id = $1) \
                     AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR action_taken = $3) \
                     AND ($4 IS NULL OR (created_at, id) < ($4, $5)) \
                     ORDER BY created_at DESC, id DESC LIMIT $6",
                )
                .bind(filter.user_id.map(Id))
                .bind(&filter.device_id)
                .bind(&filter.action)
                .bind(before_at.map(Time))
                .bind(before_id.map(Id))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_seq_colon_hash_or_a_bare_hash() {
        let hex = "ab".repeat(32);
        assert_eq!(
            Anchor::parse(&format!("12:hmac:{hex}")),
            Some(Anchor::At(12, format!("hmac:{hex}")))
        );
        assert_eq!(
            Anchor::parse(&format!(" 3:{} \n", hex.to_uppercase())),
            Some(Anchor::At(3, hex.clone()))
        );
        assert_eq!(Anchor::parse(&hex), Some(Anchor::Hash(hex.clone())));
        for bad in ["", "12", "x:abc", "12:", "12:hmac:zz", "-1:00"] {
            assert_eq!(Anchor::parse(bad), None, "{bad:?}");
        }
    }
}
