//! The logical key names of shared state, in one place.
//!
//! Namespaces (DESIGN.md): `session:` `refresh:` `revoked:` `metrics:` `sig:`
//! `nonce:` `force_overlay:` `rl:`. Per-device keys wrap the device id in
//! braces — `rl:{device}` — which in Redis Cluster is a *hash tag*: every key
//! of one device lands in the same slot, so a script over one device's keys
//! stays legal in a cluster. The calls that batch many devices (a burst of
//! acks, a global command's sequence numbers, a worker's locks and commits)
//! are split by hash tag on a cluster, and a heartbeat's admission — its
//! device's bucket and `seq`, then its queue shard (`{q<i>}`) — becomes two
//! steps there (see `state::redis`). Device ids are `[A-Za-z0-9_-]{8,64}`
//! (validated at the edge), so they can never contain a brace themselves.

/// Token bucket of a device: `rl:{device}`.
pub fn rate_limit(device_id: &str) -> String {
    format!("rl:{{{device_id}}}")
}

/// Refresh-rate bucket of a device: `rl:refresh:{device}`.
pub fn refresh_rate_limit(device_id: &str) -> String {
    format!("rl:refresh:{{{device_id}}}")
}

/// Revocation marker of a device: `revoked:device:{device}`.
pub fn revoked_device(device_id: &str) -> String {
    format!("revoked:device:{{{device_id}}}")
}

/// A signed-out access token, denied until its expiry: `session:denied:{jti}`.
pub fn denied_token(jti: uuid::Uuid) -> String {
    format!("session:denied:{jti}")
}

/// Attestation nonce bound to a device: `nonce:{device}`.
pub fn nonce(device_id: &str) -> String {
    format!("nonce:{{{device_id}}}")
}

/// Kill-switch command history of a device: `force_overlay:{device}`.
pub fn force_overlay(device_id: &str) -> String {
    format!("force_overlay:{{{device_id}}}")
}

/// Last kill-switch command sequence number of a device: `force_overlay:seq:{device}`.
pub fn command_seq(device_id: &str) -> String {
    format!("force_overlay:seq:{{{device_id}}}")
}

/// Highest command sequence number the device acknowledged: `force_overlay:acked:{device}`.
pub fn command_acked(device_id: &str) -> String {
    format!("force_overlay:acked:{{{device_id}}}")
}

/// WebSocket handshake bucket of a client address (by its keyed HMAC): `rl:ws:{hmac}`.
pub fn ws_handshake_limit(ip_hmac: &str) -> String {
    format!("rl:ws:{ip_hmac}")
}

/// Scoring state of a device: `sig:{device}`.
pub fn signal_state(device_id: &str) -> String {
    format!("sig:{{{device_id}}}")
}

/// The last heartbeat `seq` accepted from a device: `sig:seq:{device}`.
pub fn heartbeat_seq(device_id: &str) -> String {
    format!("sig:seq:{{{device_id}}}")
}

/// The device's latest trust report: `sig:report:{device}`.
pub fn trust_report(device_id: &str) -> String {
    format!("sig:report:{{{device_id}}}")
}

/// Held while one worker updates a device's scoring state: `sig:lock:{device}`.
pub fn scoring_lock(device_id: &str) -> String {
    format!("sig:lock:{{{device_id}}}")
}

/// Which device first sent an accelerometer window (replays across devices):
/// `sig:fp:{hash}`.
pub fn window_fingerprint(hash: u64) -> String {
    format!("sig:fp:{hash:016x}")
}

/// Heartbeats the scoring workers scored in a Unix second (every worker
/// adds to it, zero too): `sig:health:scored:{second}`.
pub fn workers_scored(second: u64) -> String {
    format!("sig:health:scored:{second}")
}

/// The highest scoring p95 (µs) a worker reported for a Unix second:
/// `sig:health:p95_us:{second}`.
pub fn workers_p95(second: u64) -> String {
    format!("sig:health:p95_us:{second}")
}

/// The heartbeat work queue (a Redis Stream; sharded into
/// `sig:queue:heartbeats:{q<i>}` when `BLOCKREMOTE_REDIS_QUEUE_SHARDS` > 1).
pub const HEARTBEAT_QUEUE: &str = "sig:queue:heartbeats";

/// The pub/sub channel carrying kill-switch commands to every replica.
pub const KILL_SWITCH_CHANNEL: &str = "force_overlay:commands";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_are_hash_tagged_by_device() {
        for key in [
            rate_limit("dev_12345"),
            revoked_device("dev_12345"),
            nonce("dev_12345"),
            force_overlay("dev_12345"),
            signal_state("dev_12345"),
        ] {
            assert!(key.ends_with("{dev_12345}"), "{key}");
        }
        assert_eq!(rate_limit("dev_12345"), "rl:{dev_12345}");
    }
}
