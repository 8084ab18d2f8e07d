//! One integration binary: every test starts real servers or real backends.

mod adversarial;
mod attestation;
#[path = "../fixtures/attestation.rs"]
mod attestation_fixtures;
mod audit;
mod billing;
mod cli;
mod client;
mod external_identity;
mod firewall;
mod helpers;
mod http_surface;
mod identity;
mod killswitch;
mod lifecycle;
mod observability;
mod proxy;
mod redis_faults;
mod reference_client;
mod signals;
mod state_conformance;
mod store_conformance;
mod store_faults;
mod workers;
