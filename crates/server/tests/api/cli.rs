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

fn steps_of_the_tour(stdout: &str) {
    for step in [
        "1. bank: POST /v1/admin/users",
        "2. bank: POST /v1/admin/sessions",
        "3. app: kill-switch socket open -> state {locked: false, seq: 0}",
        "4. app: 5 heartbeats of a phone held in hand -> 202 each; trust",
        "5. bank: POST /v1/admin/devices/",
        "6. app: next heartbeat -> 403 device_locked",
        "7. bank: POST /v1/admin/devices/",
        "8. app: the refused heartbeat again -> 202 (seq 6)",
        "tour done in",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
}

/// The README's tour, as a newcomer runs it: the script starts `serve` on
/// the embedded default and runs `demo --url` against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_script_tours_a_fresh_embedded_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("bash")
            .arg(root.join("scripts/quickstart.sh"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BLOCKREMOTE_BIN", BIN)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the script ends")
    .expect("run the script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    steps_of_the_tour(&stdout);
}

/// `blockremote demo` alone brings its own throw-away server and removes
/// its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_brings_its_own_server() {
    let out = run(&[("RUST_LOG", "warn".to_owned())], &["demo"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    steps_of_the_tour(&stdout);
    let dir = stdout
        .lines()
        .find_map(|l| l.split("(data in ").nth(1))
        .and_then(|rest| rest.strip_suffix(')'))
        .expect("the data dir is printed");
    assert!(!std::path::Path::new(dir).exists(), "{dir} was removed");
}

/// A simulation creates users and devices: never on a remote server by
/// accident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_refuses_a_non_loopback_target_unless_forced() {
    let env = [("BLOCKREMOTE_ADMIN_TOKEN", ADMIN_KEY.to_owned())];
    for url in [
        "http://10.1.2.3:8000",
        "https://bank.example",
        "http://[2001:db8::1]:8000",
    ] {
        for args in [
            &["simulate", "--url", url][..],
            &["simulate", "--cleanup", "--url", url],
        ] {
            let out = run(&env, args).await;
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("is not a loopback address")
                    && stderr(&out).contains("--force"),
                "{}",
                stderr(&out)
            );
        }
    }
}
