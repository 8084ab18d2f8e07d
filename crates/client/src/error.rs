//! Errors: the transport's, and the server's problem+json answers.

use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize};

/// A result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused, and said why.
    #[error("{status} {}: {}", .problem.code, .problem.detail)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The problem+json body (boxed: it is the rare path).
        problem: Box<Problem>,
        /// `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
    },
    /// The request did not complete, or the answer was not what the
    /// contract says.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The WebSocket failed.
    #[error(transparent)]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server said something the contract does not allow.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

impl Error {
    /// The problem's stable code, for a refusal the server explained.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { problem, .. } => Some(&problem.code),
            _ => None,
        }
    }
}

/// An RFC 9457 problem as the server sends it (`docs/ERRORS.md`).
#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    /// The stable code to branch on.
    pub code: String,
    /// A human-readable explanation.
    #[serde(default)]
    pub detail: String,
    /// For `validation_failed`: the offending field.
    #[serde(default)]
    pub field: Option<String>,
    /// For `replay`: the highest `seq` accepted so far.
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// The request id, for support.
    #[serde(default)]
    pub request_id: String,
}

/// `Retry-After` in seconds, at least one (a `0` would make a retry loop
/// spin); `None` when absent or not delta-seconds (the server sends only
/// those).
pub(crate) fn retry_after(r: &reqwest::Response) -> Option<Duration> {
    r.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|secs| Duration::from_secs(secs.max(1)))
}

/// The refusal of a non-success answer.
pub(crate) async fn refusal(r: reqwest::Response) -> Error {
    let status = r.status().as_u16();
    let retry_after = retry_after(&r);
    match r.bytes().await {
        Ok(body) => match serde_json::from_slice::<Problem>(&body) {
            Ok(problem) => Error::Api {
                status,
                problem: Box::new(problem),
                retry_after,
            },
            Err(_) => Error::Protocol(format!("{status} without a problem body")),
        },
        Err(e) => e.into(),
    }
}

/// The JSON body of a success, or the refusal.
pub(crate) async fn json<T: DeserializeOwned>(r: reqwest::Response) -> Result<T> {
    if r.status().is_success() {
        Ok(r.json().await?)
    } else {
        Err(refusal(r).await)
    }
}

/// Nothing of a success, or the refusal.
pub(crate) async fn empty(r: reqwest::Response) -> Result<()> {
    if r.status().is_success() {
        Ok(())
    } else {
        Err(refusal(r).await)
    }
}
