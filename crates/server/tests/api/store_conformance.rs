//! The durable store's conformance story, run on SQLite and PostgreSQL.

use blockremote::store::{
    AttestationGrade, AttestationRecord, AuditSource, DeviceStatus, EnsuredUser, NewAppAttestKey,
    NewAuditEntry, NewRefreshToken, NewSession, Revocation, RotateOutcome,
};
use uuid::Uuid;

use crate::helpers::{store_for, Backend, Backing, RawSql};

crate::on_both_backends!(
    migrations_are_idempotent_and_seed_the_plans,
    schema_has_every_table_and_read_path_index,
    audit_rows_round_trip_newest_first,
    audit_rows_are_append_only_in_the_database,
    billing_event_ids_are_unique_forever,
    rotation_tells_a_spent_token_from_a_revoked_family,
    reinserting_a_retired_key_makes_it_current_again,
    retention_deletes_old_events_and_never_audit_rows,
    audit_chain_verifies_and_names_an_edited_or_removed_row,
    a_decision_whose_affected_ids_do_not_decode_is_an_error,
    firewall_side_effects_reach_only_devices_the_users_own,
    app_attest_counters_move_forward_once_and_verdicts_grade_the_device,
    external_users_are_created_once_and_never_sign_in_by_password,
    engine_snapshots_replace_skip_unknown_devices_and_go_with_their_user,
    append_only_tables_are_partitioned_by_month_on_postgres,
    device_commands_are_kept_bounded_and_read_above_a_position,
);

/// A user of `email` with `device_0001` (an iOS session).
async fn owner_of_device_0001(
    store: &dyn blockremote::store::Store,
    email: &str,
) -> blockremote::store::User {
    let user = store.create_user(email, "hash").await.expect("user");
    store
        .start_session(ios_session(user.id, Uuid::now_v7()))
        .await
        .expect("session");
    user
}

fn token(n: u8) -> NewRefreshToken {
    let now = blockremote::store::now_micros();
    NewRefreshToken {
        token_sha256: vec![n; 32],
        jti: Uuid::new_v4(),
        issued_at: now,
        expires_at: now + chrono::Duration::days(1),
    }
}

/// `device_0001`'s first session (iOS) for `user`, in refresh family `family`.
fn ios_session(user: Uuid, family: Uuid) -> NewSession {
    NewSession {
        user_id: user,
        device_id: "device_0001".into(),
        fingerprint_sha256: vec![9; 32],
        platform: "ios".into(),
        family_id: family,
        token: token(1),
        events: Vec::new(),
        max_devices: 10,
    }
}

async fn rotation_tells_a_spent_token_from_a_revoked_family(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let user = store
        .create_user("zed@example.com", "hash")
        .await
        .expect("user");
    let family = Uuid::now_v7();
    store
        .start_session(ios_session(user.id, family))
        .await
        .expect("session");
    let sealed = |hash: u8| {
        let store = store.clone();
        async move {
            store
                .refresh_record(&[hash; 32])
                .await
                .expect("read")
                .expect("exists")
                .successor_sealed
        }
    };
    assert_eq!(
        store
            .rotate_refresh(&[1; 32], family, token(2), Some(vec![1]))
            .await
            .expect("cas"),
        RotateOutcome::Rotated
    );
    assert_eq!(
        sealed(1).await,
        Some(vec![1]),
        "the spent token keeps its successor"
    );
    assert_eq!(
        store
            .rotate_refresh(&[1; 32], family, token(3), Some(vec![9]))
            .await
            .expect("cas"),
        RotateOutcome::AlreadyUsed
    );
    assert_eq!(sealed(1).await, Some(vec![1]), "a lost swap writes nothing");
    assert_eq!(
        store
            .rotate_refresh(&[2; 32], family, token(3), Some(vec![2]))
            .await
            .expect("cas"),
        RotateOutcome::Rotated
    );
    assert_eq!(
        sealed(1).await,
        None,
        "only the immediately previous token keeps one"
    );
    assert_eq!(sealed(2).await, Some(vec![2]));
    store
        .revoke_device(Revocation {
            device_id: "device_0001".into(),
            reason: "logout".into(),
            hold: None,
            audit: None,
            event: None,
        })
        .await
        .expect("revoke");
    assert_eq!(
        store
            .rotate_refresh(&[3; 32], family, token(4), None)
            .await
            .expect("cas"),
        RotateOutcome::FamilyInactive
    );
    let record = store
        .refresh_record(&[3; 32])
        .await
        .expect("read")
        .expect("exists");
    assert!(record.used_at.is_none() && !record.family_active);
}

async fn reinserting_a_retired_key_makes_it_current_again(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let a = blockremote::auth::keys::generate_es256().expect("key");
    let b = blockremote::auth::keys::generate_es256().expect("key");
    store.insert_signing_key(a.clone(), true).await.expect("a");
    store.insert_signing_key(b.clone(), true).await.expect("b");
    store
        .insert_signing_key(a.clone(), true)
        .await
        .expect("a again (PEM rollback)");
    let keys = store.signing_keys().await.expect("keys");
    let live: Vec<&str> = keys
        .iter()
        .filter(|k| k.retired_at.is_none())
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(live, vec![a.kid.as_str()]);
}

async fn migrations_are_idempotent_and_seed_the_plans(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("first migration");
    store.migrate().await.expect("second migration is a no-op");
    store.ping().await.expect("ping");
    let plans: Vec<(String, u32)> = store
        .plans()
        .await
        .expect("plans")
        .into_iter()
        .map(|p| (p.name, p.rate_limit_per_minute))
        .collect();
    assert_eq!(
        plans,
        vec![
            ("trial".to_owned(), 120),
            ("paid_basic".to_owned(), 600),
            ("paid".to_owned(), 1200)
        ]
    );
}

async fn schema_has_every_table_and_read_path_index(backend: Backend) {
    let Some((store, raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let (tables_sql, indexes_sql) = match backend {
        Backend::Embedded => (
            "SELECT name FROM sqlite_master WHERE type = 'table'",
            "SELECT name FROM sqlite_master WHERE type = 'index'",
        ),
        Backend::Production => (
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public'",
        ),
    };
    let tables = raw.strings(tables_sql).await;
    for table in [
        "users",
        "devices",
        "refresh_families",
        "refresh_tokens",
        "business_events",
        "firewall_rules",
        "firewall_decisions",
        "audit_logs",
        "plans",
        "subscriptions",
        "billing_events",
        "app_attest_keys",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "missing table {table}: {tables:?}"
        );
    }
    let indexes = raw.strings(indexes_sql).await;
    for index in [
        "audit_logs_user_idx",
        "audit_logs_device_idx",
        "business_events_type_idx",
        "business_events_user_idx",
        "business_events_device_idx",
    ] {
        assert!(
            indexes.iter().any(|i| i == index),
            "missing index {index}: {indexes:?}"
        );
    }
    // The composite indexes lead with the filter column and end with created_at.
    let columns = match backend {
        Backend::Embedded => {
            raw.strings("SELECT name FROM pragma_index_info('audit_logs_user_idx') ORDER BY seqno")
                .await
        }
        Backend::Production => {
            raw.strings(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE c.relname = 'audit_logs_user_idx' ORDER BY k.n",
            )
            .await
        }
    };
    assert_eq!(columns, vec!["user_id", "created_at"]);
    if backend == Backend::Embedded {
        // The embedded database runs in WAL mode: readers beside the writer.
        assert_eq!(raw.strings("PRAGMA journal_mode").await, vec!["wal"]);
    }
}

fn entry(user: Uuid, action: &str) -> NewAuditEntry {
    NewAuditEntry {
        user_id: Some(user),
        device_id: Some("device_0001".into()),
        jti: Some(Uuid::new_v4().to_string()),
        ip: Some("203.0.113.0/24".into()),
        user_agent: Some("BlockRemoteTest/1.0".into()),
        source: AuditSource::Http,
        threat_score: Some(12.5),
        decision_reason: Some("touch_without_motion".into()),
        attestation_state: Some("verified".into()),
        action_taken: action.into(),
        actor: None,
        request_id: None,
    }
}

async fn audit_rows_round_trip_newest_first(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let alice = Uuid::now_v7();
    let bob = Uuid::now_v7();
    let first = store
        .append_audit(entry(alice, "login"))
        .await
        .expect("append");
    let second = store
        .append_audit(entry(alice, "CRITICAL_LOCK"))
        .await
        .expect("append");
    store
        .append_audit(entry(bob, "login"))
        .await
        .expect("append");
    let mut sparse = entry(alice, "worker_note");
    sparse.source = AuditSource::Worker;
    sparse.user_agent = None;
    sparse.threat_score = None;
    sparse.ip = None;
    let third = store.append_audit(sparse).await.expect("append sparse");

    let rows = store.audit_for_user(alice, 10).await.expect("read");
    assert_eq!(
        rows,
        vec![third, second, first],
        "exact round trip, newest first"
    );
    assert_eq!(store.audit_for_user(alice, 1).await.expect("read").len(), 1);
    assert!(store
        .audit_for_user(Uuid::now_v7(), 10)
        .await
        .expect("read")
        .is_empty());
}

async fn audit_rows_are_append_only_in_the_database(backend: Backend) {
    let Some((store, raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let user = Uuid::now_v7();
    let row = store
        .append_audit(entry(user, "login"))
        .await
        .expect("append");

    let update = raw
        .execute("UPDATE audit_logs SET action_taken = 'nothing_happened'")
        .await;
    assert!(
        update.as_ref().is_err_and(|e| e.contains("append-only")),
        "UPDATE must be refused: {update:?}"
    );
    let delete = raw.execute("DELETE FROM audit_logs").await;
    assert!(
        delete.as_ref().is_err_and(|e| e.contains("append-only")),
        "DELETE must be refused: {delete:?}"
    );
    if backend == Backend::Production {
        let truncate = raw.execute("TRUNCATE audit_logs").await;
        assert!(truncate.is_err(), "TRUNCATE must be refused");
    }
    assert_eq!(
        store.audit_for_user(user, 10).await.expect("read"),
        vec![row],
        "the row is unchanged"
    );
}

async fn billing_event_ids_are_unique_forever(backend: Backend) {
    let Some((store, raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let insert = "INSERT INTO billing_events (event_id, type, signature, payload_sha256, created) \
                  VALUES ('evt_1', 'subscription.activated', 'v1=ab', 'deadbeef', 1763812800)";
    raw.execute(insert).await.expect("first insert");
    let again = raw.execute(insert).await;
    assert!(again.is_err(), "a second event with the same id is refused");
}

async fn retention_deletes_old_events_and_never_audit_rows(backend: Backend) {
    let Some((store, _sql, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    for (kind, metadata) in [
        ("create:user", serde_json::json!({"platform": "ios"})),
        (
            "login:failed",
            serde_json::json!({"reason": "invalid_credentials"}),
        ),
    ] {
        store
            .record_event(blockremote::store::NewEvent {
                event_type: kind.into(),
                user_id: None,
                device_id: None,
                ip_prefix: Some("192.0.2.0/24".into()),
                ip_hmac: None,
                metadata,
            })
            .await
            .expect("event");
    }
    store
        .append_audit(blockremote::store::NewAuditEntry {
            user_id: None,
            device_id: None,
            jti: None,
            ip: None,
            user_agent: None,
            source: blockremote::store::AuditSource::Worker,
            threat_score: None,
            decision_reason: None,
            attestation_state: None,
            action_taken: "retention_probe".into(),
            actor: None,
            request_id: None,
        })
        .await
        .expect("audit");
    // A malformed event is refused on write.
    let malformed = store
        .record_event(blockremote::store::NewEvent {
            event_type: "create:user".into(),
            user_id: None,
            device_id: None,
            ip_prefix: None,
            ip_hmac: None,
            metadata: serde_json::json!({"platform": "ios", "ip": "192.0.2.7"}),
        })
        .await;
    assert!(malformed.is_err(), "metadata outside the schema is refused");
    // Nothing is older than a day yet.
    let kept =
        blockremote::retention::run_once(store.as_ref(), std::time::Duration::from_secs(86_400))
            .await
            .expect("retention");
    assert_eq!(kept, 0);
    // Everything is older than "now + 1 s": both events go, in batches of one.
    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        store.delete_events_before(cutoff, 1).await.expect("delete"),
        1
    );
    assert_eq!(
        store
            .delete_events_before(cutoff, 10)
            .await
            .expect("delete"),
        1
    );
    assert!(store
        .events_of_type("create:user", 10)
        .await
        .expect("events")
        .is_empty());
    let audit = store
        .audit_page(
            &blockremote::store::AuditFilter {
                action: Some("retention_probe".into()),
                ..Default::default()
            },
            10,
        )
        .await
        .expect("audit");
    assert_eq!(audit.len(), 1, "audit rows are kept");
}

async fn audit_chain_verifies_and_names_an_edited_or_removed_row(backend: Backend) {
    use blockremote::store::{audit_chain::ChainBreak, verify_audit_chain};
    let Some((store, sql, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    for i in 0..4 {
        store
            .append_audit(blockremote::store::NewAuditEntry {
                user_id: None,
                device_id: Some(format!("device_chain_{i}")),
                jti: None,
                ip: Some("192.0.2.0/24".into()),
                user_agent: None,
                source: blockremote::store::AuditSource::Http,
                threat_score: Some(12.5 * f64::from(i)),
                decision_reason: Some("fraud_team".into()),
                attestation_state: None,
                action_taken: "FORCE_OVERLAY".into(),
                actor: None,
                request_id: None,
            })
            .await
            .expect("audit");
    }
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(4)
    );
    // Concurrent appends still form one chain.
    let appends = (0..8).map(|i| {
        let store = store.clone();
        async move {
            store
                .append_audit(blockremote::store::NewAuditEntry {
                    user_id: None,
                    device_id: None,
                    jti: None,
                    ip: None,
                    user_agent: None,
                    source: blockremote::store::AuditSource::Worker,
                    threat_score: None,
                    decision_reason: None,
                    attestation_state: None,
                    action_taken: format!("concurrent_{i}"),
                    actor: None,
                    request_id: None,
                })
                .await
                .expect("audit")
        }
    });
    futures::future::join_all(appends).await;
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(12)
    );

    // Someone with database access edits a row (after disabling the guard).
    let disable = match backend {
        Backend::Embedded => "DROP TRIGGER audit_logs_no_update",
        Backend::Production => "ALTER TABLE audit_logs DISABLE TRIGGER audit_logs_no_update",
    };
    sql.execute(disable).await.expect("disable guard");
    sql.execute("UPDATE audit_logs SET action_taken = 'UNLOCK' WHERE seq = 2")
        .await
        .expect("tamper");
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Err(ChainBreak::Edited { seq: 2 })
    );
    // The background verifier gauges the break, and finds the chain whole
    // again (from its first row) once repaired.
    use blockremote::telemetry::{watch, Metrics};
    let metrics = Metrics::new();
    let gauge = |m: &Metrics| {
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix("audit_chain_broken ").map(str::to_owned))
    };
    let cursor = watch::verify_from(store.as_ref(), &metrics, Default::default()).await;
    assert_eq!(gauge(&metrics).as_deref(), Some("1"));
    assert!(cursor.is_broken(), "nothing more is read until a full pass");
    let again = watch::verify_from(store.as_ref(), &metrics, cursor.clone()).await;
    assert_eq!(again, cursor);
    sql.execute("UPDATE audit_logs SET action_taken = 'FORCE_OVERLAY' WHERE seq = 2")
        .await
        .expect("restore");
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(12)
    );
    let cursor = watch::verify_from(store.as_ref(), &metrics, Default::default()).await;
    assert_eq!(gauge(&metrics).as_deref(), Some("0"));
    assert_ne!(cursor, Default::default(), "verified to the head");
    // Or removes one.
    let disable_delete = match backend {
        Backend::Embedded => "DROP TRIGGER audit_logs_no_delete",
        Backend::Production => "ALTER TABLE audit_logs DISABLE TRIGGER audit_logs_no_delete",
    };
    sql.execute(disable_delete).await.expect("disable guard");
    sql.execute("DELETE FROM audit_logs WHERE seq = 3")
        .await
        .expect("tamper");
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Err(ChainBreak::Unlinked { seq: 4 })
    );
}

/// A corrupt decision row must fail loudly: read as "affected nobody", an
/// undo would silently restore no one.
async fn a_decision_whose_affected_ids_do_not_decode_is_an_error(backend: Backend) {
    let Some((store, raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let rule = store
        .firewall_rules()
        .await
        .expect("rules")
        .into_iter()
        .next()
        .expect("a seeded rule");
    let user = Uuid::now_v7();
    let metadata = serde_json::json!({
        "rule": rule.name, "version": rule.version, "mode": rule.mode,
        "side_effect": rule.side_effect, "threshold": rule.threshold,
        "window_seconds": rule.window_seconds, "lookback_seconds": rule.lookback_seconds,
        "scope": rule.scope, "scope_key": "k", "users": [user], "devices": ["device_0001"],
    });
    let decision = store
        .record_firewall_decision(
            blockremote::store::NewDecision {
                rule,
                scope_key: "k".into(),
                users: vec![user],
                devices: vec!["device_0001".into()],
                event: blockremote::store::NewEvent {
                    event_type: "firewall:block".into(),
                    user_id: None,
                    device_id: None,
                    ip_prefix: None,
                    ip_hmac: None,
                    metadata,
                },
            },
            false,
        )
        .await
        .expect("recorded");
    let listed = store.firewall_decisions(10).await.expect("decodes");
    assert_eq!(listed[0].affected_users, vec![user]);
    assert_eq!(listed[0].affected_devices, vec!["device_0001".to_owned()]);

    raw.execute(&format!(
        "UPDATE firewall_decisions SET affected_user_ids = '[\"not-a-uuid\"]' WHERE id = '{}'",
        decision.id
    ))
    .await
    .expect("corrupted");
    assert!(
        store.firewall_decisions(10).await.is_err(),
        "a corrupt decision must not list as one that affected nobody"
    );
    let undo = blockremote::store::NewEvent {
        event_type: "firewall:undo".into(),
        user_id: None,
        device_id: None,
        ip_prefix: None,
        ip_hmac: None,
        metadata: serde_json::json!({"decision_id": decision.id}),
    };
    assert!(
        store
            .undo_firewall_decision(decision.id, undo)
            .await
            .is_err(),
        "undo of a corrupt decision must fail, not restore no one"
    );
}

/// Side effects find devices by a join on ownership, never by the ids events
/// carry: an event naming somebody else's device cannot reach it (issue 19.1).
async fn firewall_side_effects_reach_only_devices_the_users_own(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let session = |user: Uuid, device: &str, n: u8| NewSession {
        user_id: user,
        device_id: device.into(),
        fingerprint_sha256: vec![n; 32],
        platform: "android".into(),
        family_id: Uuid::now_v7(),
        token: token(n),
        events: Vec::new(),
        max_devices: 10,
    };
    let victim = store
        .create_user("victim@example.com", "h")
        .await
        .expect("user");
    store
        .start_session(session(victim.id, "device_victim", 1))
        .await
        .expect("victim's device");
    let attacker = store
        .create_user("attacker@example.com", "h")
        .await
        .expect("user");
    store
        .start_session(session(attacker.id, "device_attacker", 2))
        .await
        .expect("attacker's device");
    for event_type in ["create:user", "create:session"] {
        store
            .record_event(blockremote::store::NewEvent {
                event_type: event_type.into(),
                user_id: Some(attacker.id),
                device_id: Some("device_victim".into()),
                ip_prefix: None,
                ip_hmac: Some("scope-key".into()),
                metadata: if event_type == "create:user" {
                    serde_json::json!({"platform": "android"})
                } else {
                    serde_json::json!({"family_id": Uuid::now_v7(), "platform": "android"})
                },
            })
            .await
            .expect("event");
    }
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let scope = blockremote::store::RuleScope::Ip;
    let blocked = store
        .scope_members("create:user", scope, "scope-key", since, true)
        .await
        .expect("members");
    assert_eq!(
        blocked,
        (vec![attacker.id], vec!["device_attacker".to_owned()])
    );
    let quarantined = store
        .scope_members("create:session", scope, "scope-key", since, false)
        .await
        .expect("members");
    assert_eq!(quarantined, (vec![attacker.id], Vec::<String>::new()));
}

async fn app_attest_counters_move_forward_once_and_verdicts_grade_the_device(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    owner_of_device_0001(store.as_ref(), "cas@example.com").await;
    let record = |grade, hard, key: Option<NewAppAttestKey>| AttestationRecord {
        device_id: "device_0001".into(),
        grade,
        evidence: vec!["capturing_app_detected"],
        provider: "app_attest",
        hard,
        app_attest_key: key,
        authentic: true,
        lock: false,
    };
    let key = NewAppAttestKey {
        key_id: vec![1; 32],
        public_key: vec![4; 65],
        receipt: b"receipt".to_vec(),
        app_id: "TEAM.app".into(),
    };
    let outcome = store
        .record_attestation(
            record(AttestationGrade::Strong, false, Some(key.clone())),
            3,
        )
        .await
        .expect("record");
    assert_eq!((outcome.failures, outcome.quarantined), (0, false));
    let device = store
        .device("device_0001")
        .await
        .expect("device")
        .expect("exists");
    assert_eq!(device.attestation.grade, AttestationGrade::Strong);
    assert_eq!(device.attestation.provider.as_deref(), Some("app_attest"));
    assert_eq!(device.attestation.evidence, ["capturing_app_detected"]);
    assert!(device.attestation.attested_at.is_some());
    let stored = store
        .app_attest_key("device_0001")
        .await
        .expect("key")
        .expect("stored");
    assert_eq!((stored.counter, stored.key_id.clone()), (0, vec![1; 32]));

    // Two assertions verified against counter 0: exactly one moves it.
    let (a, b) = tokio::join!(
        store.advance_app_attest_counter("device_0001", &[1; 32], 0, 5),
        store.advance_app_attest_counter("device_0001", &[1; 32], 0, 6),
    );
    assert_eq!(
        [a.expect("a"), b.expect("b")]
            .iter()
            .filter(|won| **won)
            .count(),
        1
    );
    let now = store
        .app_attest_key("device_0001")
        .await
        .expect("key")
        .expect("stored");
    assert!(matches!(now.counter, 5 | 6), "{}", now.counter);
    // Never backwards, never for another key, never to the same value.
    let c = now.counter;
    assert!(!store
        .advance_app_attest_counter("device_0001", &[1; 32], c, c)
        .await
        .expect("same"));
    assert!(!store
        .advance_app_attest_counter("device_0001", &[1; 32], c, c - 1)
        .await
        .expect("back"));
    assert!(!store
        .advance_app_attest_counter("device_0001", &[2; 32], c, c + 1)
        .await
        .expect("other key"));
    assert!(store
        .advance_app_attest_counter("device_0001", &[1; 32], c, c + 1)
        .await
        .expect("forward"));

    // A new attestation replaces the key and starts its counter at 0.
    let replaced = NewAppAttestKey {
        key_id: vec![2; 32],
        ..key
    };
    store
        .record_attestation(record(AttestationGrade::Strong, false, Some(replaced)), 3)
        .await
        .expect("record");
    let now = store
        .app_attest_key("device_0001")
        .await
        .expect("key")
        .expect("stored");
    assert_eq!((now.counter, now.key_id), (0, vec![2; 32]));

    // Soft failures count up to the limit; a hard one quarantines at once, once.
    let soft = store
        .record_attestation(record(AttestationGrade::Failed, false, None), 3)
        .await
        .expect("soft");
    assert_eq!((soft.failures, soft.quarantined), (1, false));
    let hard = store
        .record_attestation(record(AttestationGrade::Failed, true, None), 3)
        .await
        .expect("hard");
    assert_eq!((hard.failures, hard.quarantined), (2, true));
    let again = store
        .record_attestation(record(AttestationGrade::Failed, true, None), 3)
        .await
        .expect("again");
    assert_eq!((again.failures, again.quarantined), (3, false));
    let device = store
        .device("device_0001")
        .await
        .expect("device")
        .expect("exists");
    assert_eq!(device.status, DeviceStatus::Quarantined);
    assert_eq!(device.attestation.grade, AttestationGrade::Failed);
    let holds = store.device_holds("device_0001").await.expect("holds");
    assert_eq!(holds.len(), 1, "{holds:?}");

    // A failure of the request (not authentic) counts but keeps the verdict.
    store
        .record_attestation(record(AttestationGrade::Strong, false, None), 3)
        .await
        .expect("strong again");
    let refused = AttestationRecord {
        grade: AttestationGrade::Failed,
        evidence: Vec::new(),
        authentic: false,
        ..record(AttestationGrade::Failed, false, None)
    };
    let outcome = store.record_attestation(refused, 3).await.expect("refused");
    assert_eq!(outcome.failures, 1);
    let device = store
        .device("device_0001")
        .await
        .expect("device")
        .expect("exists");
    assert_eq!(device.attestation.grade, AttestationGrade::Strong);
    assert_eq!(device.attestation.evidence, ["capturing_app_detected"]);
}

async fn external_users_are_created_once_and_never_sign_in_by_password(backend: Backend) {
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    // Eight concurrent calls for one external id: exactly one creates it.
    let calls = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.ensure_external_user("cust_race", None).await })
    });
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for call in calls {
        match call.await.expect("join").expect("ensure") {
            EnsuredUser::Created(user) => {
                created += 1;
                ids.insert(user.id);
            }
            EnsuredUser::Existing(user) => {
                ids.insert(user.id);
            }
        }
    }
    assert_eq!((created, ids.len()), (1, 1));
    let user = store
        .user_by_external_id("cust_race")
        .await
        .expect("lookup")
        .expect("the user");
    assert_eq!(user.external_id.as_deref(), Some("cust_race"));
    assert_eq!((user.email.as_str(), user.password_hash.as_str()), ("", ""));
    // Users without email do not collide on '', and are never found by it.
    for n in 0..3 {
        store
            .ensure_external_user(&format!("cust_{n}"), None)
            .await
            .expect("no email");
    }
    assert!(store.user_by_email("").await.expect("lookup").is_none());
    // An email is still unique across both kinds of user.
    store
        .create_user("gail@example.com", "hash")
        .await
        .expect("user");
    assert!(matches!(
        store
            .ensure_external_user("cust_gail", Some("gail@example.com"))
            .await,
        Err(blockremote::store::StoreError::Conflict { .. })
    ));
    assert!(store
        .user_by_external_id("cust_gail")
        .await
        .expect("lookup")
        .is_none());
    // The database refuses an out-of-range external id whatever the caller.
    assert!(store
        .ensure_external_user(&"x".repeat(129), None)
        .await
        .is_err());
}

async fn engine_snapshots_replace_skip_unknown_devices_and_go_with_their_user(backend: Backend) {
    use blockremote::store::EngineSnapshot;
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let user = owner_of_device_0001(store.as_ref(), "snap@example.com").await;
    let snapshot = |device: &str, state: &[u8], saved_at| EngineSnapshot {
        device_id: device.into(),
        state: state.to_vec(),
        saved_at,
    };
    // A device that does not exist is skipped, not an error that would
    // keep the whole batch pending.
    store
        .save_engine_snapshots(&[
            snapshot("device_0001", &[1, 2, 3], 10),
            snapshot("device_gone_1", &[9], 10),
        ])
        .await
        .expect("saved");
    let found = store
        .engine_snapshots(&["device_0001", "device_gone_1"])
        .await
        .expect("read");
    assert_eq!(found, [snapshot("device_0001", &[1, 2, 3], 10)]);
    store
        .save_engine_snapshots(&[snapshot("device_0001", &[4], 20)])
        .await
        .expect("replaced");
    assert_eq!(
        store
            .engine_snapshots(&["device_0001"])
            .await
            .expect("read"),
        [snapshot("device_0001", &[4], 20)]
    );
    // An older snapshot, flushed later by another process, does not
    // replace it (an unlock's cleared evidence must not come back).
    store
        .save_engine_snapshots(&[snapshot("device_0001", &[5], 15)])
        .await
        .expect("saved");
    assert_eq!(
        store
            .engine_snapshots(&["device_0001"])
            .await
            .expect("read"),
        [snapshot("device_0001", &[4], 20)]
    );
    store
        .delete_user(user.id, entry(user.id, "user_deleted"))
        .await
        .expect("deleted");
    assert!(store
        .engine_snapshots(&["device_0001"])
        .await
        .expect("read")
        .is_empty());
}

/// `YYYYMM` of the month `offset` months from now (UTC).
fn month(offset: i32) -> String {
    use chrono::Datelike;
    let now = chrono::Utc::now();
    let index = now.year() * 12 + now.month0() as i32 + offset;
    format!("{:04}{:02}", index.div_euclid(12), index.rem_euclid(12) + 1)
}

async fn append_only_tables_are_partitioned_by_month_on_postgres(backend: Backend) {
    use chrono::Datelike;
    let Some((store, raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    if backend == Backend::Embedded {
        // SQLite has no partitions; retention deletes by age.
        assert_eq!(store.ensure_partitions(1).await.expect("ensure"), 0);
        assert_eq!(
            store
                .drop_event_partitions_before(chrono::Utc::now())
                .await
                .expect("drop"),
            0
        );
        return;
    }
    assert_eq!(
        raw.strings(
            "SELECT c.relname::text FROM pg_partitioned_table p \
             JOIN pg_class c ON c.oid = p.partrelid ORDER BY 1"
        )
        .await,
        ["audit_logs", "business_events"]
    );
    let partitions = |table: &'static str| {
        let raw = &raw;
        async move {
            raw.strings(&format!(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = '{table}'::regclass ORDER BY 1"
            ))
            .await
        }
    };
    for table in ["business_events", "audit_logs"] {
        let names = partitions(table).await;
        for offset in [-1, 0, 1, 12] {
            let name = format!("{table}_{}", month(offset));
            assert!(names.contains(&name), "{name} missing: {names:?}");
        }
        assert!(names.contains(&format!("{table}_default")), "{names:?}");
    }
    // Rows land in this month's partition.
    store
        .record_event(blockremote::store::NewEvent {
            event_type: "login:failed".into(),
            user_id: None,
            device_id: None,
            ip_prefix: Some("192.0.2.0/24".into()),
            ip_hmac: None,
            metadata: serde_json::json!({"reason": "invalid_credentials"}),
        })
        .await
        .expect("event");
    store
        .append_audit(entry(Uuid::now_v7(), "partition_probe"))
        .await
        .expect("audit");
    for table in ["business_events", "audit_logs"] {
        assert_eq!(
            raw.strings(&format!("SELECT count(*)::text FROM {table}_{}", month(0)))
                .await,
            ["1"],
            "{table}"
        );
    }
    // Idempotent: everything is there already.
    assert_eq!(store.ensure_partitions(1).await.expect("ensure"), 0);
    // An audit partition cannot be emptied by name either.
    let truncate = raw
        .execute(&format!("TRUNCATE audit_logs_{}", month(0)))
        .await;
    assert!(
        truncate.as_ref().is_err_and(|e| e.contains("append-only")),
        "{truncate:?}"
    );
    // Retention drops the event months wholly before the cutoff — here,
    // last month — and nothing of the audit trail.
    let this_month = chrono::Utc::now()
        .date_naive()
        .with_day(1)
        .expect("day 1")
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let audit_before = partitions("audit_logs").await;
    assert_eq!(
        store
            .drop_event_partitions_before(this_month)
            .await
            .expect("drop"),
        1
    );
    let left = partitions("business_events").await;
    assert!(
        !left.contains(&format!("business_events_{}", month(-1))),
        "{left:?}"
    );
    assert!(
        left.contains(&format!("business_events_{}", month(0))),
        "{left:?}"
    );
    assert_eq!(partitions("audit_logs").await, audit_before);
    assert_eq!(
        raw.strings("SELECT count(*)::text FROM business_events")
            .await,
        ["1"],
        "this month's event kept"
    );
}

/// A PostgreSQL database from before 0017 keeps every row, and its audit
/// chain still verifies, once its tables move into monthly partitions —
/// a row three months old included, in its own month.
#[tokio::test]
async fn an_existing_postgres_database_moves_into_partitions_with_its_rows_and_chain() {
    use blockremote::store::verify_audit_chain;
    let Some((store, raw, backing)) = store_for(Backend::Production).await else {
        return;
    };
    let RawSql::Postgres(pool) = &raw else {
        unreachable!("a production store")
    };
    // Migrations 0001–0016 only, from a copy of their files.
    let before = migrations_before(&backing, "postgres", "0017");
    sqlx::migrate::Migrator::new(before.as_path())
        .await
        .expect("migrator")
        .run(pool)
        .await
        .expect("0001-0016");
    // Today's code appends the rows; the two columns of 0019 it writes are
    // added by hand (empty in every row here, as in any row from before
    // 0019, so the rows hash as they did), and 0017 copies the rest.
    sqlx::query("ALTER TABLE audit_logs ADD COLUMN actor TEXT, ADD COLUMN request_id TEXT")
        .execute(pool)
        .await
        .expect("0019's columns");
    for i in 0..3 {
        store
            .append_audit(entry(Uuid::now_v7(), &format!("before_{i}")))
            .await
            .expect("audit");
    }
    store
        .record_event(blockremote::store::NewEvent {
            event_type: "login:failed".into(),
            user_id: None,
            device_id: None,
            ip_prefix: Some("192.0.2.0/24".into()),
            ip_hmac: None,
            metadata: serde_json::json!({"reason": "invalid_credentials"}),
        })
        .await
        .expect("event");
    raw.execute(
        "INSERT INTO business_events (id, type, metadata, created_at) \
         VALUES (gen_random_uuid(), 'login:failed', '{}', now() - interval '95 days')",
    )
    .await
    .expect("an old event");

    store.migrate().await.expect("0017");
    assert_eq!(
        raw.strings("SELECT count(*)::text FROM business_events")
            .await,
        ["2"]
    );
    assert_eq!(
        raw.strings("SELECT count(*)::text FROM business_events_default")
            .await,
        ["0"],
        "every row in its month"
    );
    assert_eq!(
        raw.strings("SELECT count(*)::text FROM audit_logs").await,
        ["3"]
    );
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(3)
    );
    // The chain goes on across the move.
    store
        .append_audit(entry(Uuid::now_v7(), "after"))
        .await
        .expect("audit");
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(4)
    );
}

async fn device_commands_are_kept_bounded_and_read_above_a_position(backend: Backend) {
    use blockremote::store::SequenceKind;
    let Some((store, _raw, _b)) = store_for(backend).await else {
        return;
    };
    store.migrate().await.expect("migrate");
    let user = owner_of_device_0001(store.as_ref(), "commands@example.com").await;
    for seq in 1..=6u64 {
        store
            .record_command("device_0001", seq, &format!("{{\"n\":{seq}}}"), 1_000, 4)
            .await
            .expect("recorded");
    }
    // An unknown device is skipped, not an error.
    store
        .record_command("device_gone_1", 1, "{}", 1_000, 4)
        .await
        .expect("skipped");
    // The counter follows, and only the newest `keep` are kept.
    assert_eq!(
        store
            .device_sequence("device_0001", SequenceKind::Command)
            .await
            .expect("seq"),
        6
    );
    let seqs = |since, after| {
        let store = store.clone();
        async move {
            store
                .commands_since("device_0001", since, after, 100)
                .await
                .expect("read")
                .into_iter()
                .map(|c| c.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(seqs(0, 0).await, [3, 4, 5, 6]);
    assert_eq!(seqs(4, 0).await, [5, 6]);
    assert!(seqs(0, 2_000).await.is_empty(), "older than asked for");
    let read = store
        .commands_since("device_0001", 5, 0, 100)
        .await
        .expect("read");
    assert_eq!(read[0].command, "{\"n\":6}");
    store
        .delete_user(user.id, entry(user.id, "user_deleted"))
        .await
        .expect("deleted");
    assert!(seqs(0, 0).await.is_empty(), "gone with the user");
}

/// A SQLite database from before 0019 (which rebuilds `audit_logs` to allow
/// the `cli` source) keeps every row, its chain and its append-only guards.
#[tokio::test]
async fn an_sqlite_audit_trail_keeps_its_rows_chain_and_guards_through_0019() {
    use blockremote::store::verify_audit_chain;
    let Some((store, raw, backing)) = store_for(Backend::Embedded).await else {
        return;
    };
    let RawSql::Sqlite(pool) = &raw else {
        unreachable!("an embedded store")
    };
    let before = migrations_before(&backing, "sqlite", "0019");
    sqlx::migrate::Migrator::new(before.as_path())
        .await
        .expect("migrator")
        .run(pool)
        .await
        .expect("0001-0018");
    // Today's code appends; the two columns it writes are added by hand
    // (empty in every row, as in any row from before 0019, which 0019 copies).
    for column in ["actor", "request_id"] {
        raw.execute(&format!("ALTER TABLE audit_logs ADD COLUMN {column} TEXT"))
            .await
            .expect("column");
    }
    for i in 0..3 {
        store
            .append_audit(entry(Uuid::now_v7(), &format!("before_{i}")))
            .await
            .expect("audit");
    }
    store.migrate().await.expect("0019");
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(3)
    );
    for refused in [
        "UPDATE audit_logs SET action_taken = 'x'",
        "DELETE FROM audit_logs",
    ] {
        assert!(raw.execute(refused).await.is_err(), "{refused} refused");
    }
    store
        .append_audit(NewAuditEntry::cli("signing_key_rotated", "kid".into()))
        .await
        .expect("a cli row");
    assert_eq!(
        verify_audit_chain(store.as_ref()).await.expect("verify"),
        Ok(4)
    );
}

/// A directory holding a copy of `dialect`'s migrations numbered below
/// `first_left_out`: a database as an older release left it.
fn migrations_before(backing: &Backing, dialect: &str, first_left_out: &str) -> std::path::PathBuf {
    let before = backing.dir.path().join(format!("before-{first_left_out}"));
    std::fs::create_dir_all(&before).expect("dir");
    let source = format!("{}/migrations/{dialect}", env!("CARGO_MANIFEST_DIR"));
    for file in std::fs::read_dir(source).expect("migrations") {
        let file = file.expect("entry").path();
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.as_str() < first_left_out {
            std::fs::copy(&file, before.join(&name)).expect("copy");
        }
    }
    before
}
