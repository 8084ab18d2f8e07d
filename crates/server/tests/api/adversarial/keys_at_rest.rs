//! Keys at rest (issue 19, points 7 and 9): someone who gets the database —
//! a read-only replica, a backup, a stolen disk — must not be able to sign
//! tokens, learn the IP-HMAC key, or rewrite the audit trail unnoticed; and
//! a leaked signing key must be revocable on every instance at once.
//!
//! The configurations are built from environment maps (as an operator
//! writes them), so the stories also run against builds that predate the
//! settings and show what those builds did.

use std::{collections::BTreeMap, time::Duration};

use base64::Engine as _;
use blockremote::{
    app::AppState,
    config::{Config, DatabaseConfig},
    store::{AuditSource, NewAuditEntry, PostgresStore, SqliteStore},
};
use reqwest::StatusCode;
use secrecy::ExposeSecret;

use crate::helpers::{eventually, Backend, Backing, RawSql};

crate::on_both_backends!(
    private_keys_and_the_ip_hmac_key_are_sealed_in_the_database,
    a_copy_of_the_database_without_the_kek_cannot_sign,
    plaintext_keys_are_sealed_on_first_start_and_keep_working,
    rewrap_moves_every_row_to_the_new_kek,
    a_rewritten_audit_row_is_detected_without_the_key,
    audit_verify_with_an_anchored_head_detects_truncation,
    a_revoked_key_is_refused_at_once_by_a_running_server,
);

const BIN: &str = env!("CARGO_BIN_EXE_blockremote");

/// A fresh random KEK, base64.
fn new_kek() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// The configuration an operator writes (`env`), pointed at `backing`'s
/// database and shared state.
fn config_for(backing: &Backing, backend: Backend, env: &[(&str, String)]) -> Config {
    let mut vars: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    vars.entry("BLOCKREMOTE_DATA_DIR".into())
        .or_insert_with(|| backing.dir.path().join("data").display().to_string());
    vars.insert("BLOCKREMOTE_LISTEN".into(), "127.0.0.1:0".into());
    if let Some(db) = &backing.database {
        vars.insert("DATABASE_URL".into(), db.url.clone());
    }
    let mut config = Config::from_sources(None, &vars).expect("configuration loads");
    config.connect_timeout = Duration::from_secs(5);
    config.database_max_connections = 5;
    if backend == Backend::Production {
        config.redis_url = backing.config.redis_url.clone();
        config.redis_prefix = backing.config.redis_prefix.clone();
    }
    config
}

/// The environment a `blockremote` child process needs for `config`'s
/// backends, plus `extra`.
fn child_env(config: &Config, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = vec![(
        "BLOCKREMOTE_DATA_DIR".to_owned(),
        config.data_dir.display().to_string(),
    )];
    if let DatabaseConfig::Postgres { url } = &config.database {
        env.push(("DATABASE_URL".into(), url.expose_secret().to_owned()));
    }
    if let Some(redis) = &config.redis_url {
        env.push(("REDIS_URL".into(), redis.expose_secret().to_owned()));
        env.push((
            "BLOCKREMOTE_REDIS_PREFIX".into(),
            config.redis_prefix.clone(),
        ));
    }
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    env
}

async fn run(env: &[(String, String)], args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(BIN)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command ends")
    .expect("run blockremote")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Raw SQL on `config`'s database, past the store.
async fn raw(config: &Config) -> RawSql {
    match &config.database {
        DatabaseConfig::Sqlite { url } => RawSql::Sqlite(
            SqliteStore::connect(url.expose_secret(), 1, Duration::from_secs(5))
                .await
                .expect("sqlite")
                .pool()
                .clone(),
        ),
        DatabaseConfig::Postgres { url } => RawSql::Postgres(
            PostgresStore::connect(url.expose_secret(), 1, Duration::from_secs(5))
                .await
                .expect("postgres")
                .pool()
                .clone(),
        ),
    }
}

/// The hex of a BLOB column, per dialect.
fn hex_of(raw: &RawSql, column: &str) -> String {
    match raw {
        RawSql::Sqlite(_) => format!("lower(hex({column}))"),
        RawSql::Postgres(_) => format!("encode({column}, 'hex')"),
    }
}

async fn connect(config: &Config) -> AppState {
    AppState::connect(config.clone(), true)
        .await
        .expect("server state loads")
}

/// A read-only copy of the database once minted accepted tokens: the private
/// keys and the IP-HMAC key were plain bytes in their tables.
async fn private_keys_and_the_ip_hmac_key_are_sealed_in_the_database(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let config = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", new_kek())]);
    let state = connect(&config).await;
    let ip_key = hex::encode(state.auth.ip_key());
    state.store.close().await;

    let sql = raw(&config).await;
    let keys = sql
        .strings(&format!(
            "SELECT {} FROM signing_keys WHERE private_der IS NOT NULL",
            hex_of(&sql, "private_der")
        ))
        .await;
    assert!(!keys.is_empty());
    for key in &keys {
        // "BRKE": the envelope's magic; a plaintext DER key starts with 0x30.
        assert!(
            key.starts_with("42524b45"),
            "a private key is stored in plaintext: {key:.16}…"
        );
    }
    let secrets = sql
        .strings(&format!(
            "SELECT {} FROM server_secrets",
            hex_of(&sql, "value")
        ))
        .await;
    assert!(
        secrets.iter().all(|s| !s.contains(&ip_key)),
        "the IP-HMAC key is readable in server_secrets"
    );
}

/// A copy of the database (or a backup) without the KEK: the server refuses
/// to start, naming what is wrong, instead of signing with the copied keys.
async fn a_copy_of_the_database_without_the_kek_cannot_sign(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let kek = new_kek();
    let config = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", kek.clone())]);
    let state = connect(&config).await;
    let kid = state.auth.keys.current().current.kid.clone();
    state.store.close().await;
    drop(state);

    // Another KEK.
    let wrong = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", new_kek())]);
    let err = AppState::connect(wrong, false)
        .await
        .err()
        .expect("a wrong KEK does not start")
        .to_string();
    assert!(err.contains("sealed under KEK"), "{err}");
    assert!(err.contains(&kid), "names the key: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // No KEK at all.
    let copy = match backend {
        Backend::Embedded => {
            // The file copied into a data dir of its own (which has no `kek`).
            let dir = backing.dir.path().join("copy");
            std::fs::create_dir_all(&dir).expect("dir");
            // With its write-ahead log: what the server wrote may not be
            // checkpointed into the main file yet.
            for file in ["blockremote.db", "blockremote.db-wal", "blockremote.db-shm"] {
                let from = config.data_dir.join(file);
                if from.exists() {
                    std::fs::copy(from, dir.join(file)).expect("copy");
                }
            }
            config_for(
                &backing,
                backend,
                &[("BLOCKREMOTE_DATA_DIR", dir.display().to_string())],
            )
        }
        Backend::Production => config_for(
            &backing,
            backend,
            &[("BLOCKREMOTE_INSECURE_KEYS", "1".to_owned())],
        ),
    };
    let err = AppState::connect(copy, false)
        .await
        .err()
        .expect("the copy does not start")
        .to_string();
    assert!(err.contains("sealed under KEK"), "{err}");
}

/// Rows written before a KEK was configured are sealed on the first start
/// with one, keeping their values: the same current key, the same IP key.
async fn plaintext_keys_are_sealed_on_first_start_and_keep_working(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let insecure = config_for(
        &backing,
        backend,
        &[("BLOCKREMOTE_INSECURE_KEYS", "1".to_owned())],
    );
    let insecure = match backend {
        // The embedded default before keys were sealed: no `kek` file.
        Backend::Embedded => Config {
            kek: blockremote::config::KekSetting::Insecure,
            ..insecure
        },
        Backend::Production => insecure,
    };
    let before = connect(&insecure).await;
    let kid = before.auth.keys.current().current.kid.clone();
    let ip_key = before.auth.ip_key().to_vec();
    before.store.close().await;
    drop(before);
    let sql = raw(&insecure).await;
    let plain = sql
        .strings(&format!(
            "SELECT {} FROM signing_keys",
            hex_of(&sql, "private_der")
        ))
        .await;
    assert!(plain[0].starts_with("30"), "plaintext DER before");

    let kek = new_kek();
    let config = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", kek)]);
    let after = connect(&config).await;
    assert_eq!(after.auth.keys.current().current.kid, kid, "same key");
    assert_eq!(after.auth.ip_key(), ip_key.as_slice(), "same IP key");
    after.store.close().await;
    let sealed = sql
        .strings(&format!(
            "SELECT {} FROM signing_keys",
            hex_of(&sql, "private_der")
        ))
        .await;
    assert!(
        sealed.iter().all(|k| k.starts_with("42524b45")),
        "sealed now"
    );
    // Starting again changes nothing.
    let again = connect(&config).await;
    assert_eq!(again.auth.keys.current().current.kid, kid);
    again.store.close().await;
}

/// `keys rewrap` re-seals every row under a new KEK, opening them with the
/// previous one; afterwards only the new KEK starts the server.
async fn rewrap_moves_every_row_to_the_new_kek(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let (old, new) = (new_kek(), new_kek());
    let config = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", old.clone())]);
    let state = connect(&config).await;
    let kid = state.auth.keys.current().current.kid.clone();
    let ip_key = state.auth.ip_key().to_vec();
    state.store.close().await;
    drop(state);

    // Without the previous KEK: refused, nothing changed.
    let out = run(
        &child_env(&config, &[("BLOCKREMOTE_KEK", new.clone())]),
        &["keys", "rewrap"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("BLOCKREMOTE_KEK_PREVIOUS"),
        "{}",
        text(&out.stderr)
    );

    // Servers deployed with both KEKs open rows under either, before the rewrap.
    let both = [
        ("BLOCKREMOTE_KEK", new.clone()),
        ("BLOCKREMOTE_KEK_PREVIOUS", old.clone()),
    ];
    let state = connect(&config_for(&backing, backend, &both)).await;
    assert_eq!(state.auth.keys.current().current.kid, kid);
    state.store.close().await;
    drop(state);

    let env = child_env(&config, &both);
    let out = run(&env, &["keys", "rewrap"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("rewrapped 1 signing key(s) and 2 server secret(s)"),
        "{}",
        text(&out.stdout)
    );
    // Again: nothing left to do.
    let out = run(&env, &["keys", "rewrap"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("rewrapped 0 signing key(s) and 0 server secret(s)"));

    let renewed = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", new)]);
    let state = connect(&renewed).await;
    assert_eq!(state.auth.keys.current().current.kid, kid);
    assert_eq!(state.auth.ip_key(), ip_key.as_slice());
    state.store.close().await;
    let stale = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", old)]);
    assert!(
        AppState::connect(stale, false).await.is_err(),
        "the old KEK no longer opens them"
    );
}

fn probe_entry(action: &str) -> NewAuditEntry {
    NewAuditEntry {
        user_id: None,
        device_id: Some("device_audit_01".into()),
        jti: None,
        ip: None,
        user_agent: None,
        source: AuditSource::Http,
        threat_score: None,
        decision_reason: Some("fraud_team".into()),
        attestation_state: None,
        action_taken: action.into(),
        actor: None,
        request_id: None,
    }
}

fn disable_guards(backend: Backend) -> [&'static str; 2] {
    match backend {
        Backend::Embedded => [
            "DROP TRIGGER audit_logs_no_update",
            "DROP TRIGGER audit_logs_no_delete",
        ],
        Backend::Production => [
            "ALTER TABLE audit_logs DISABLE TRIGGER audit_logs_no_update",
            "ALTER TABLE audit_logs DISABLE TRIGGER audit_logs_no_delete",
        ],
    }
}

/// With write access to the database, the chain's plain SHA-256 could be
/// recomputed after an edit: rewriting the newest row and its hash left
/// `audit verify` saying "intact". Keyed rows cannot be recomputed without
/// the key, and a row rewritten unkeyed is named.
async fn a_rewritten_audit_row_is_detected_without_the_key(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let kek_env = [("BLOCKREMOTE_KEK", new_kek())];
    let config = config_for(&backing, backend, &kek_env);
    let state = connect(&config).await;
    for action in ["FORCE_OVERLAY", "CRITICAL_LOCK", "CRITICAL_LOCK"] {
        state
            .store
            .append_audit(probe_entry(action))
            .await
            .expect("audit");
    }
    let sql = raw(&config).await;
    let out = run(&child_env(&config, &kek_env), &["audit", "verify"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The attacker unlocks the record of the last action and recomputes its
    // hash the way an unkeyed chain is hashed.
    for statement in disable_guards(backend) {
        sql.execute(statement).await.expect("disable guard");
    }
    let last = state
        .store
        .audit_chain(0, 100)
        .await
        .expect("chain")
        .pop()
        .expect("rows");
    let mut entry = last.entry.clone();
    entry.action_taken = "UNLOCK".into();
    let forged = blockremote::store::audit_chain::row_hash(&last.prev_hash, last.seq, &entry);
    sql.execute(&format!(
        "UPDATE audit_logs SET action_taken = 'UNLOCK', row_hash = '{forged}' WHERE seq = {}",
        last.seq
    ))
    .await
    .expect("tamper");
    state.store.close().await;

    let out = run(&child_env(&config, &kek_env), &["audit", "verify"]).await;
    assert!(!out.status.success(), "the rewrite went unnoticed");
    assert!(
        text(&out.stderr).contains(&format!("row {}", last.seq)),
        "{}",
        text(&out.stderr)
    );
}

/// Deleting the newest rows breaks no link; a head anchored elsewhere
/// (`audit head`) shows it.
async fn audit_verify_with_an_anchored_head_detects_truncation(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let kek = new_kek();
    let config = config_for(&backing, backend, &[("BLOCKREMOTE_KEK", kek.clone())]);
    let env = child_env(&config, &[("BLOCKREMOTE_KEK", kek)]);
    let state = connect(&config).await;
    for action in ["FORCE_OVERLAY", "CRITICAL_LOCK", "CRITICAL_LOCK"] {
        state
            .store
            .append_audit(probe_entry(action))
            .await
            .expect("audit");
    }
    let out = run(&env, &["audit", "head"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let head = text(&out.stdout).trim().to_owned();
    assert!(head.starts_with("3:"), "{head}");
    let out = run(&env, &["audit", "verify", "--head", &head]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let sql = raw(&config).await;
    for statement in disable_guards(backend) {
        sql.execute(statement).await.expect("disable guard");
    }
    sql.execute("DELETE FROM audit_logs WHERE seq = 3")
        .await
        .expect("truncate");
    state.store.close().await;
    let out = run(&env, &["audit", "verify"]).await;
    assert!(
        out.status.success(),
        "without an anchor the cut is invisible"
    );
    let out = run(&env, &["audit", "verify", "--head", &head]).await;
    assert!(!out.status.success(), "truncation went unnoticed");
    assert!(
        text(&out.stderr).contains("truncated"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&env, &["audit", "verify", "--head", "not-a-head"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--head"),
        "{}",
        text(&out.stderr)
    );
}

/// A leaked signing key: `keys revoke` makes every running instance refuse
/// its tokens at once (they were accepted until expiry, cached as verified).
async fn a_revoked_key_is_refused_at_once_by_a_running_server(backend: Backend) {
    let Some(app) = crate::helpers::spawn_app(backend).await else {
        return;
    };
    let session = app.register("rev@example.com", "device_0001").await;
    assert_eq!(
        app.probe(&session.access, "device_0001").await.status(),
        StatusCode::CREATED
    );
    let kid = app.state.auth.keys.current().current.kid.clone();
    // On the production backend, a second replica that has the token cached
    // as verified too.
    let second = match backend {
        Backend::Production => {
            let second = crate::helpers::second_instance(&app).await;
            assert_eq!(
                second.probe(&session.access, "device_0001").await.status(),
                StatusCode::CREATED
            );
            Some(second)
        }
        Backend::Embedded => None,
    };
    let config = &app.state.config;
    let mut extra = Vec::new();
    if matches!(config.database, DatabaseConfig::Postgres { .. }) {
        extra.push((
            "BLOCKREMOTE_KEK_FILE",
            config.data_dir.join("kek").display().to_string(),
        ));
    }
    let out = run(&child_env(config, &extra), &["keys", "revoke", &kid]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("revoked {kid}")));

    // Within the revocation poll (embedded) or at once (Redis).
    let refused = eventually(Duration::from_secs(3), || async {
        app.probe(&session.access, "device_0001").await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(refused, "a token of the revoked key is still accepted");
    if let Some(second) = &second {
        let refused = eventually(Duration::from_secs(3), || async {
            second.probe(&session.access, "device_0001").await.status() == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(refused, "the other replica still accepts it");
    }
    let jwks: serde_json::Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("jwks");
    assert!(jwks["keys"].as_array().is_some_and(|k| !k.is_empty()));
    assert!(
        !jwks.to_string().contains(&kid),
        "the revoked key is still published"
    );
    // Signing in again works, with the new key.
    let again = app.register("rev2@example.com", "device_0002").await;
    assert_eq!(
        app.probe(&again.access, "device_0002").await.status(),
        StatusCode::CREATED
    );
    let unknown = run(
        &child_env(config, &extra),
        &["keys", "revoke", "no-such-kid"],
    )
    .await;
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("no-such-kid"));
    // A kid is base64url and may begin with `-` (one did, and the command
    // took it for a flag): it is taken as the kid.
    let dashed = run(
        &child_env(config, &extra),
        &["keys", "revoke", "-tNoSuchKid"],
    )
    .await;
    assert!(!dashed.status.success());
    assert!(
        text(&dashed.stderr).contains("-tNoSuchKid")
            && !text(&dashed.stderr).contains("unexpected argument"),
        "{}",
        text(&dashed.stderr)
    );
}

/// The embedded default's data dir and database files are the operator's
/// only (they were created 0755 / 0644), and so is its generated KEK.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_database_files_and_kek_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let mut vars = BTreeMap::new();
    vars.insert(
        "BLOCKREMOTE_DATA_DIR".to_owned(),
        data.display().to_string(),
    );
    vars.insert("BLOCKREMOTE_LISTEN".to_owned(), "127.0.0.1:0".to_owned());
    let config = Config::from_sources(None, &vars).expect("config");
    let state = connect(&config).await;
    state
        .store
        .append_audit(probe_entry("FORCE_OVERLAY"))
        .await
        .expect("a write (WAL and SHM exist)");
    let mode = |name: &str| {
        std::fs::metadata(data.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(format!("{:o}", mode("")), "700", "data dir");
    for file in [
        "blockremote.db",
        "blockremote.db-wal",
        "blockremote.db-shm",
        "kek",
    ] {
        assert_eq!(format!("{:o}", mode(file)), "600", "{file}");
    }
    state.store.close().await;
}

/// Production (DATABASE_URL set) without a KEK refuses to start, in one
/// line naming the settings; BLOCKREMOTE_INSECURE_KEYS=1 starts with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_without_a_kek_refuses_to_start() {
    let Some(backing) = Backing::new(Backend::Production).await else {
        return;
    };
    let mut env: Vec<(String, String)> = backing
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "BLOCKREMOTE_KEK_FILE")
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let out = run(&env, &["serve"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    for setting in [
        "BLOCKREMOTE_KEK",
        "BLOCKREMOTE_KEK_FILE",
        "BLOCKREMOTE_INSECURE_KEYS",
    ] {
        assert!(stderr.contains(setting), "{setting}: {stderr}");
    }
    // Opting out explicitly starts, warning loudly.
    env.push(("BLOCKREMOTE_INSECURE_KEYS".into(), "1".into()));
    let mut child = tokio::process::Command::new(BIN)
        .arg("serve")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut warned = false;
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            warned |= line.contains("BLOCKREMOTE_INSECURE_KEYS");
            if line.contains("\"listening\"") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    assert!(started, "starts with BLOCKREMOTE_INSECURE_KEYS=1");
    assert!(warned, "and says why that is unsafe");
}
