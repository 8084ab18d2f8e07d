//! BlockRemote: a zero-trust backend for mobile fraud defense.
//!
//! The library behind the `blockremote` binary. See `ARCHITECTURE.md` at the
//! repository root for how the modules fit and how a heartbeat flows through
//! them; `docs/API.md` is the public contract.

pub mod app;
pub mod auth;
pub mod billing;
pub mod config;
pub mod demo;
pub mod error;
pub mod firewall;
pub mod http;
pub mod intel_change;
pub mod realtime;
pub mod retention;
pub mod sequences;
pub mod signals;
pub mod simulate;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod workers;

#[cfg(test)]
mod layering {
    //! Keeps the dependency direction ARCHITECTURE.md states: domain code
    //! never sees the composition root or the HTTP error, and the CLI takes
    //! nothing from `http` but the OpenAPI document.

    use std::path::{Path, PathBuf};

    /// Modules that must not depend on `app` or `http`.
    const DOMAIN: &[&str] = &[
        "auth",
        "billing",
        "firewall.rs",
        "intel_change.rs",
        "realtime",
        "retention.rs",
        "signals",
        "state",
        "store",
        "workers",
    ];

    fn sources(path: &Path, out: &mut Vec<PathBuf>) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).expect("read dir").flatten() {
                sources(&entry.path(), out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.to_owned());
        }
    }

    /// A file's text before its unit tests (tests may compare with HTTP code).
    fn code_of(path: &Path) -> String {
        let text = std::fs::read_to_string(path).expect("read source");
        match text.find("#[cfg(test)]") {
            Some(tests) => text[..tests].to_owned(),
            None => text,
        }
    }

    #[test]
    fn domain_modules_never_see_app_state_or_http() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        for module in DOMAIN {
            sources(&src.join(module), &mut files);
        }
        assert!(files.len() > 20, "the walk found the modules");
        let mut offences = Vec::new();
        for file in &files {
            let code = code_of(file);
            for word in ["AppState", "ApiError", "crate::http", "crate::app"] {
                if code.contains(word) {
                    offences.push(format!("{} uses {word}", file.display()));
                }
            }
        }
        assert!(offences.is_empty(), "{offences:#?}");
    }

    #[test]
    fn the_cli_takes_only_the_openapi_document_from_http() {
        let main = code_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs"));
        let uses: Vec<&str> = main
            .match_indices("http::")
            .map(|(at, _)| &main[at..(at + 20).min(main.len())])
            .collect();
        assert!(
            uses.iter().all(|u| u.starts_with("http::openapi(")),
            "{uses:?}"
        );
        assert!(!uses.is_empty(), "main.rs prints the OpenAPI document");
    }
}
