//! BlockRemote: a zero-trust backend for mobile fraud defense.
//!
//! The library behind the `blockremote` binary. See `ARCHITECTURE.md` at the
//! repository root for how the modules fit and how a heartbeat flows through
//! them; `../shared/API.md` is the public contract.

pub mod app;
pub mod auth;
pub mod billing;
pub mod config;
pub mod error;
pub mod firewall;
pub mod http;
pub mod intel_change;
pub mod realtime;
pub mod retention;
pub mod signals;
pub mod simulate;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod workers;
