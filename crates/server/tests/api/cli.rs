//! The operator's one-shot commands at their edges (issue 19, point 10): no
//! argument panics, and a command that needs a database says which one it
//! expected instead of creating one.

use std::time::Duration;

use crate::helpers::{spawn_app_with, Backend, Backing};

crate::on_both_backends!(commands_that_need_a_database_create_nothing_and_say_which,);

const BIN: &str = env!("CARGO_BIN_EXE_blockremote");
const ADMIN_KEY: &str = "cli-admin-key-0123456789abcdef0123456789";

async fn run(env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command ends")
    .expect("run blockremote")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `simulate --length 5` panicked (index out of bounds); huge values
/// aborted on allocation. Out-of-range values are now refused by the parser
/// and small ones run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_refuses_out_of_range_arguments_and_never_panics() {
    let Some(app) = spawn_app_with(Backend::Embedded, |c| {
        c.admin_token = Some(ADMIN_KEY.to_owned().into());
    })
    .await
    else {
        return;
    };
    let env = [("BLOCKREMOTE_ADMIN_TOKEN", ADMIN_KEY.to_owned())];
    let url = app.address.clone();
    for (flag, value) in [
        ("--length", "0"),
        ("--length", "10001"),
        ("--length", "18446744073709551616"),
        ("--sessions", "0"),
        ("--sessions", "99999999999"),
        ("--concurrency", "0"),
        ("--concurrency", "-1"),
        ("--seed", "-1"),
    ] {
        let out = run(&env, &["simulate", "--url", &url, flag, value]).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} {value}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(flag) || err.contains(value), "names it: {err}");
    }
    for length in ["1", "5"] {
        let out = run(
            &env,
            &[
                "simulate",
                "--url",
                &url,
                "--sessions",
                "1",
                "--concurrency",
                "4",
                "--length",
                length,
            ],
        )
        .await;
        assert!(out.status.success(), "--length {length}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

/// `audit verify` and friends created `./data` and an empty database, then
/// failed with a raw SQL error.
async fn commands_that_need_a_database_create_nothing_and_say_which(backend: Backend) {
    let Some(backing) = Backing::new(backend).await else {
        return;
    };
    let data = backing.dir.path().join("nothing-here");
    let mut env = vec![
        ("BLOCKREMOTE_DATA_DIR", data.display().to_string()),
        (
            "BLOCKREMOTE_KEK",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned(),
        ),
        ("BLOCKREMOTE_CONNECT_TIMEOUT_SECONDS", "5".to_owned()),
    ];
    let expected = match &backing.database {
        Some(db) => {
            env.push(("DATABASE_URL", db.url.clone()));
            "is not initialised".to_owned()
        }
        None => format!("no database at {}", data.join("blockremote.db").display()),
    };
    for args in [
        &["audit", "verify"][..],
        &[
            "audit",
            "verify",
            "--head",
            "0:0000000000000000000000000000000000000000000000000000000000000000",
        ],
        &["audit", "head"],
        &["keys", "rotate"],
        &["keys", "revoke", "some-kid"],
        &["keys", "rewrap"],
    ] {
        let out = run(&env, args).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(err.contains(&expected), "{args:?}: {err}");
        assert!(
            err.contains("blockremote migrate"),
            "{args:?}: says how: {err}"
        );
        assert!(!data.exists(), "{args:?} created {}", data.display());
    }
}

/// A `whsec_` secret that is not base64 used to be accepted (and never
/// verified anything); a short secret was accepted too. Both are start-up
/// errors naming the setting.
#[tokio::test]
async fn weak_or_malformed_webhook_secrets_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    for secret in ["whsec_not*base64*at*all*0123456789", "sk_live_short"] {
        let out = run(
            &[
                ("BLOCKREMOTE_DATA_DIR", dir.path().display().to_string()),
                ("BLOCKREMOTE_WEBHOOK_SECRETS", secret.to_owned()),
            ],
            &["serve"],
        )
        .await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{secret}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("BLOCKREMOTE_WEBHOOK_SECRETS"), "{err}");
        assert!(!err.contains(secret), "the secret is not echoed: {err}");
    }
}
