//! What the embedded default's in-process state keeps across a restart.
//!
//! On Redis, security state outlives a server restart because Redis holds
//! it. In-process it lived in this process's memory only: a restart forgot
//! every accepted heartbeat `seq` (a replay was accepted and scored again),
//! every window fingerprint, the engine's baselines, the heartbeat counts,
//! and the kill-switch command numbering (a `resume` got nothing). So the
//! keys that replay protection, the kill-switch protocol and the device view
//! depend on ([`durability`]) are written through to a SQLite file of their
//! own, `state.db` in the data dir (0600; a separate file, so these writes
//! never wait for the main database's single writer), and loaded back at
//! start with their remaining TTLs.
//!
//! Writes are group-committed: a write marks its key dirty, and one writer
//! task saves the current value of dirty keys in one transaction
//! ([`Journal::flush`]). A write of a [`Durability::Committed`] key
//! (heartbeat `seq`s, kill-switch numbering and history, revocations,
//! sessions) wakes the writer and returns only once a transaction holding
//! it has committed, so an accepted `seq` is never lost, even if the
//! process is killed right after answering; concurrent heartbeats share
//! the commit, and it carries only such small keys. [`Durability::Batched`]
//! keys (engine state, reports, window fingerprints, firewall counters,
//! acks) are saved every [`FLUSH_EVERY`], each once however often it changed
//! in between: an engine state is ~2.5 KB, and writing it at every
//! heartbeat cost more than the rest of the heartbeat (docs/BENCHMARKS.md,
//! "Saving the embedded state"). On a clean shutdown
//! ([`SharedState::close`](super::SharedState::close)) every dirty key is
//! saved, and so are the heartbeats still queued for scoring, which are
//! queued again at the next start.
//!
//! The file uses WAL with `synchronous = NORMAL`, as the main database
//! does: a committed transaction survives a crash of the process; a crash
//! of the machine (power loss) can lose the transactions since the last
//! checkpoint.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
    Connection, Executor, QueryBuilder, Row, Sqlite, SqliteConnection,
};
use tokio::sync::{watch, Notify};

use super::{StateError, StateResult};

/// The longest a [`Durability::Batched`] write waits to be committed.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The longest a [`Durability::Committed`] write waits for its commit
/// before the write is answered with an error.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Rows per statement (three parameters each: within SQLite's limit).
const ROWS_PER_STATEMENT: usize = 300;
/// Batched keys per transaction of a full flush.
const LAZY_CHUNK: usize = 256;

/// How a key of shared state survives a restart of the embedded default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Forgotten: locks, health reports, rate-limit buckets (which start
    /// full), caches.
    Volatile,
    /// Committed within [`FLUSH_EVERY`] of the write.
    Batched,
    /// Committed before the write returns.
    Committed,
}

/// Which keys outlive a restart, and how (key names: [`super::keys`]).
/// `commit_seqs`: heartbeat `seq`s are committed before the heartbeat is
/// answered (`BLOCKREMOTE_STATE_COMMIT_SEQ`); else they are batched.
pub fn durability(key: &str, commit_seqs: bool) -> Durability {
    // The last accepted heartbeat `seq` (replay protection).
    if key.starts_with("sig:seq:") {
        return if commit_seqs {
            Durability::Committed
        } else {
            Durability::Batched
        };
    }
    // Engine state and baselines (`sig:{device}`), trust reports (the
    // device view's heartbeat count), window fingerprints (replays across
    // devices).
    if key.starts_with("sig:{") || key.starts_with("sig:report:") || key.starts_with("sig:fp:") {
        return Durability::Batched;
    }
    // Acks only spare a resend on `resume`: batched. Command numbering and
    // history must never go back: committed.
    if key.starts_with("force_overlay:acked:") {
        return Durability::Batched;
    }
    if key.starts_with("force_overlay:")
        || key.starts_with("revoked:")
        || key.starts_with("session:")
    {
        return Durability::Committed;
    }
    // Firewall windows and markers, attestation nonces.
    if key.starts_with("fw:") || key.starts_with("nonce:") {
        return Durability::Batched;
    }
    Durability::Volatile
}

/// One flush's rows: `(key, value, expires_at as Unix ms)` to write, keys
/// to delete — for plain keys and for histories.
#[derive(Debug, Default)]
pub struct Batch {
    /// Plain keys to write.
    pub puts: Vec<(String, Vec<u8>, Option<i64>)>,
    /// Plain keys gone (deleted or expired).
    pub deletes: Vec<String>,
    /// Histories to write (entries encoded by [`encode_history`]).
    pub history_puts: Vec<(String, Vec<u8>, Option<i64>)>,
    /// Histories gone.
    pub history_deletes: Vec<String>,
}

/// A history's entries: `(position, payload)`, in order.
pub type HistoryEntries = Vec<(u64, Vec<u8>)>;

/// What [`Journal::open`] found in the file.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live plain keys with their time left (`None`: no TTL).
    pub entries: Vec<(String, Vec<u8>, Option<Duration>)>,
    /// Live histories with their time left.
    pub histories: Vec<(String, HistoryEntries, Option<Duration>)>,
    /// Jobs saved at the last clean shutdown: `(queue, payload)`, in order.
    pub jobs: Vec<(String, Vec<u8>)>,
}

/// The state file and its writer's bookkeeping.
pub struct Journal {
    path: PathBuf,
    conn: tokio::sync::Mutex<Option<SqliteConnection>>,
    /// Plain keys changed whose writers wait for the commit.
    urgent: Mutex<HashSet<String>>,
    /// Plain keys changed that are saved by the next full flush.
    lazy: Mutex<HashSet<String>>,
    /// Histories changed (all of them kill-switch histories: urgent).
    dirty_histories: Mutex<HashSet<String>>,
    /// Wakes the writer (a committed write is waiting).
    pub(super) wake: Notify,
    /// Flushes started.
    started: AtomicU64,
    /// `(flushes finished, the last that committed)`.
    finished: watch::Sender<(u64, u64)>,
    /// Closed by a clean shutdown: the writer stops.
    closed: AtomicBool,
    /// Whether heartbeat `seq`s are committed before they are answered.
    commit_seqs: bool,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Encodes a history's entries for its row.
pub fn encode_history(entries: &[(u64, &[u8])]) -> Vec<u8> {
    postcard::to_allocvec(entries).unwrap_or_default()
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!("{}: {e}", path.display()))
}

impl Journal {
    /// Opens (creating, 0600) the state file at `path` and reads what it
    /// holds; expired rows are deleted, saved jobs taken out.
    pub async fn open(path: &Path, commit_seqs: bool) -> StateResult<(Self, Loaded)> {
        create_private(path).map_err(|e| unavailable(path, e))?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| unavailable(path, e))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| unavailable(path, e))?;
        let loaded = load(&mut conn).await.map_err(|e| unavailable(path, e))?;
        let journal = Self {
            path: path.to_owned(),
            conn: tokio::sync::Mutex::new(Some(conn)),
            urgent: Mutex::default(),
            lazy: Mutex::default(),
            dirty_histories: Mutex::default(),
            wake: Notify::new(),
            started: AtomicU64::new(0),
            finished: watch::channel((0, 0)).0,
            closed: AtomicBool::new(false),
            commit_seqs,
        };
        Ok((journal, loaded))
    }

    /// Marks a plain key changed (after the change); its durability.
    pub fn mark(&self, key: &str) -> Durability {
        let durability = durability(key, self.commit_seqs);
        match durability {
            Durability::Volatile => {}
            Durability::Batched => {
                lock(&self.lazy).insert(key.to_owned());
            }
            Durability::Committed => {
                lock(&self.urgent).insert(key.to_owned());
            }
        }
        durability
    }

    /// Marks a history changed (after the change); its durability.
    pub fn mark_history(&self, key: &str) -> Durability {
        let durability = durability(key, self.commit_seqs);
        if durability != Durability::Volatile {
            lock(&self.dirty_histories).insert(key.to_owned());
        }
        durability
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Returns once a flush that started after this call has committed
    /// (every change marked before it is then in the file).
    pub async fn committed(&self) -> StateResult<()> {
        let target = self.started.load(Ordering::SeqCst) + 1;
        let mut finished = self.finished.subscribe();
        self.wake.notify_one();
        let done = tokio::time::timeout(
            COMMIT_WAIT,
            finished.wait_for(|(finished, _)| *finished >= target),
        )
        .await;
        match done {
            Ok(Ok(state)) if state.1 >= target => Ok(()),
            Ok(Ok(_)) => Err(unavailable(&self.path, "not saved")),
            Ok(Err(_)) | Err(_) => Err(unavailable(&self.path, "not saved in time")),
        }
    }

    /// Saves what `snapshot` makes of the dirty keys: the urgent ones, and
    /// when `full` the lazy ones too, [`LAZY_CHUNK`] to a transaction — each
    /// with the urgent keys dirty by then — so a large flush never holds up
    /// a committed write for long (one transaction of a second's engine
    /// states took ~0.3 s). `snapshot` is called with the connection held,
    /// so transactions commit in the order they took their keys. On failure
    /// the keys stay dirty.
    pub async fn flush(
        &self,
        full: bool,
        snapshot: impl Fn(Vec<String>, Vec<String>) -> Batch,
    ) -> StateResult<()> {
        let mut lazy: Vec<String> = if full {
            std::mem::take(&mut *lock(&self.lazy)).into_iter().collect()
        } else {
            Vec::new()
        };
        loop {
            // The last LAZY_CHUNK keys (or fewer), leaving the rest.
            let chunk = lazy.split_off(lazy.len().saturating_sub(LAZY_CHUNK));
            if let Err(e) = self.commit_once(chunk, &snapshot).await {
                lock(&self.lazy).extend(lazy);
                return Err(e);
            }
            if lazy.is_empty() {
                return Ok(());
            }
        }
    }

    /// One transaction: the urgent keys and histories dirty now, and `lazy`.
    async fn commit_once(
        &self,
        lazy: Vec<String>,
        snapshot: &impl Fn(Vec<String>, Vec<String>) -> Batch,
    ) -> StateResult<()> {
        let mut conn = self.conn.lock().await;
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let mut keys: Vec<String> = std::mem::take(&mut *lock(&self.urgent))
            .into_iter()
            .collect();
        let urgent_keys = keys.len();
        keys.extend(lazy);
        let histories: Vec<String> = std::mem::take(&mut *lock(&self.dirty_histories))
            .into_iter()
            .collect();
        let result = match conn.as_mut() {
            None => Err(unavailable(&self.path, "closed")),
            Some(_) if keys.is_empty() && histories.is_empty() => Ok(()),
            Some(conn) => {
                let batch = snapshot(keys.clone(), histories.clone());
                write(conn, &batch)
                    .await
                    .map_err(|e| unavailable(&self.path, e))
            }
        };
        if result.is_err() {
            let (urgent, lazy) = keys.split_at(urgent_keys);
            lock(&self.urgent).extend(urgent.iter().cloned());
            lock(&self.lazy).extend(lazy.iter().cloned());
            lock(&self.dirty_histories).extend(histories);
        }
        self.finished.send_modify(|(finished, ok)| {
            *finished = n;
            if result.is_ok() {
                *ok = n;
            }
        });
        result
    }

    /// The last flush, then the queued `jobs` saved for the next start, and
    /// the file closed: later writes stay in memory only.
    pub async fn close(
        &self,
        snapshot: impl Fn(Vec<String>, Vec<String>) -> Batch,
        jobs: Vec<(String, Vec<u8>)>,
    ) -> StateResult<()> {
        self.closed.store(true, Ordering::SeqCst);
        self.flush(true, snapshot).await?;
        let mut conn = self.conn.lock().await;
        let Some(mut open) = conn.take() else {
            return Ok(());
        };
        let saved = save_jobs(&mut open, &jobs).await;
        let _ = open.execute("PRAGMA wal_checkpoint(TRUNCATE)").await;
        let _ = open.close().await;
        saved.map_err(|e| unavailable(&self.path, e))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every mutation under these locks is one insert or one swap.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates the file readable by its owner only (or narrows an existing one).
fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS history (
    key TEXT PRIMARY KEY NOT NULL,
    entries BLOB NOT NULL,
    expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    queue TEXT NOT NULL,
    position INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (queue, position)
);
";

/// Time left until `expires_at` (Unix ms); `None` when already past.
fn remaining(expires_at: Option<i64>, now: i64) -> Option<Option<Duration>> {
    match expires_at {
        None => Some(None),
        Some(at) if at > now => Some(Some(Duration::from_millis(
            u64::try_from(at - now).unwrap_or(0),
        ))),
        Some(_) => None,
    }
}

async fn load(conn: &mut SqliteConnection) -> sqlx::Result<Loaded> {
    conn.execute(SCHEMA).await?;
    let now = unix_ms_now();
    for table in ["kv", "history"] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE expires_at IS NOT NULL AND expires_at <= ?"
        ))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    let mut loaded = Loaded::default();
    for row in sqlx::query("SELECT key, value, expires_at FROM kv")
        .fetch_all(&mut *conn)
        .await?
    {
        if let Some(ttl) = remaining(row.try_get("expires_at")?, now) {
            loaded
                .entries
                .push((row.try_get("key")?, row.try_get("value")?, ttl));
        }
    }
    for row in sqlx::query("SELECT key, entries, expires_at FROM history")
        .fetch_all(&mut *conn)
        .await?
    {
        let raw: Vec<u8> = row.try_get("entries")?;
        let Ok(entries) = postcard::from_bytes::<HistoryEntries>(&raw) else {
            tracing::warn!("a saved kill-switch history did not decode; dropped");
            continue;
        };
        if let Some(ttl) = remaining(row.try_get("expires_at")?, now) {
            loaded.histories.push((row.try_get("key")?, entries, ttl));
        }
    }
    for row in sqlx::query("SELECT queue, payload FROM jobs ORDER BY queue, position")
        .fetch_all(&mut *conn)
        .await?
    {
        loaded
            .jobs
            .push((row.try_get("queue")?, row.try_get("payload")?));
    }
    conn.execute("DELETE FROM jobs").await?;
    Ok(loaded)
}

async fn write(conn: &mut SqliteConnection, batch: &Batch) -> sqlx::Result<()> {
    let mut tx = conn.begin().await?;
    for (table, value, puts, deletes) in [
        ("kv", "value", &batch.puts, &batch.deletes),
        (
            "history",
            "entries",
            &batch.history_puts,
            &batch.history_deletes,
        ),
    ] {
        for chunk in deletes.chunks(ROWS_PER_STATEMENT * 3) {
            let mut q = QueryBuilder::<Sqlite>::new(format!("DELETE FROM {table} WHERE key IN ("));
            let mut keys = q.separated(", ");
            for key in chunk {
                keys.push_bind(key.as_str());
            }
            q.push(")");
            q.build().execute(&mut *tx).await?;
        }
        for chunk in puts.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(format!(
                "INSERT INTO {table} (key, {value}, expires_at) "
            ));
            q.push_values(chunk, |mut row, (key, bytes, expires_at)| {
                row.push_bind(key.as_str())
                    .push_bind(bytes.as_slice())
                    .push_bind(*expires_at);
            });
            q.push(format!(
                " ON CONFLICT (key) DO UPDATE SET {value} = excluded.{value}, expires_at = excluded.expires_at"
            ));
            q.build().execute(&mut *tx).await?;
        }
    }
    tx.commit().await
}

async fn save_jobs(conn: &mut SqliteConnection, jobs: &[(String, Vec<u8>)]) -> sqlx::Result<()> {
    let mut tx = conn.begin().await?;
    tx.execute("DELETE FROM jobs").await?;
    let numbered: Vec<(i64, &(String, Vec<u8>))> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| (i64::try_from(i).unwrap_or(i64::MAX), job))
        .collect();
    for chunk in numbered.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO jobs (queue, position, payload) ");
        q.push_values(chunk, |mut row, (position, (queue, payload))| {
            row.push_bind(queue.as_str())
                .push_bind(*position)
                .push_bind(payload.as_slice());
        });
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_state_is_kept_and_the_rest_forgotten() {
        use super::super::keys;
        let committed = [
            keys::heartbeat_seq("dev_12345"),
            keys::command_seq("dev_12345"),
            keys::force_overlay("dev_12345"),
            keys::revoked_device("dev_12345"),
            "session:login_backoff:ab".to_owned(),
        ];
        let batched = [
            keys::signal_state("dev_12345"),
            keys::trust_report("dev_12345"),
            keys::window_fingerprint(7),
            keys::command_acked("dev_12345"),
            keys::nonce("dev_12345"),
            "fw:login_failed_per_ip:v1:abc".to_owned(),
        ];
        let volatile = [
            keys::scoring_lock("dev_12345"),
            keys::rate_limit("dev_12345"),
            keys::workers_scored(1),
            keys::workers_p95(1),
            keys::ws_handshake_limit("abc"),
        ];
        for key in committed {
            assert_eq!(durability(&key, true), Durability::Committed, "{key}");
        }
        for key in batched {
            assert_eq!(durability(&key, true), Durability::Batched, "{key}");
        }
        for key in volatile {
            assert_eq!(durability(&key, true), Durability::Volatile, "{key}");
        }
        // Unless told otherwise: then seqs wait for the next full flush.
        assert_eq!(
            durability(&keys::heartbeat_seq("dev_12345"), false),
            Durability::Batched
        );
        assert_eq!(
            durability(&keys::command_seq("dev_12345"), false),
            Durability::Committed
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data").join("state.db");
        let (_journal, loaded) = Journal::open(&path, true).await.expect("opens");
        assert!(loaded.entries.is_empty());
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("dir"))
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }
}
