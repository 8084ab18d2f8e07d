//! Signals: heartbeat ingestion, scoring workers and the trust report.
//!
//! * [`ingest`] — the heartbeat body, its validation, and the queue job (the
//!   validated heartbeat in compact binary, so workers parse no JSON).
//! * [`scoring`] — [`scoring::Scoring`], built once from the handles it uses
//!   and shared by the workers and the inline path: load the device's engine state,
//!   assess, store the report, and act on a lock decision (device status,
//!   kill-switch command, audit row).
//! * [`reader`] — the fast path for reading a heartbeat body.
//! * [`report`] — the trust report as API.md defines it.
//! * [`snapshots`] — engine states written behind to the store on Redis,
//!   read back when Redis lost them.
//! * [`intel`] — blacklisted app hashes, domains and addresses.
//! * [`breaker`] — the circuit breaker watching the workers, and the meter
//!   through which workers report their throughput and scoring p95.
//!
//! Nothing is scored on the request path unless the circuit breaker says
//! the workers are behind (see [`breaker`]).

pub mod breaker;
pub mod ingest;
pub mod intel;
pub mod reader;
pub mod report;
pub mod scoring;
pub mod snapshots;
