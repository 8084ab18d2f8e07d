//! Shared state on Redis, for production (several replicas and workers).
//!
//! * One node, a Sentinel-watched primary or a Redis Cluster, chosen by the
//!   URL ([`topology`]). Ordinary commands go over one multiplexed,
//!   reconnecting connection, each bounded by the call timeout and passed
//!   through the circuit [`breaker`]: a Redis that is down or hung fails a
//!   call in microseconds once the breaker opens.
//! * Cluster-safe by construction: every script touches the keys of one
//!   hash slot (a device's keys share its hash tag, see [`keys`](super::keys)),
//!   and on a cluster the batched calls are split into one pipeline per hash
//!   tag. The heartbeat's admission, one script on one node, becomes two on a
//!   cluster — the device's bucket and `seq`, then its queue shard — and a
//!   failed enqueue gives the `seq` back, so a 202 still means "queued" and a
//!   retry is never taken for a replay.
//! * Work queues may be sharded over N streams (`{q<i>}` hash tags, so a
//!   cluster spreads them over its masters); a device's heartbeats always go
//!   to the same shard, which keeps them in order.
//! * When Redis is unavailable, rate limits fall back to a bucket local to
//!   this instance (counted in `redis_rate_limit_fallback_total`); nothing else
//!   pretends: callers get [`StateError::Unavailable`] and answer 503.
//! * The token bucket is one Lua script: read, refill, take and write happen
//!   atomically inside Redis, using Redis's own clock, so replicas with skewed
//!   clocks still share one exact bucket.
//! * Each subscription holds its own pub/sub connection and resubscribes after
//!   a connection loss (messages published during the gap are missed; the
//!   kill-switch recovers them from its per-device history).
//! * Work queues are Streams read through the consumer group
//!   [`CONSUMER_GROUP`]. Entries are `XACK`ed and `XDEL`eted together once
//!   handled, so the stream's length is the backlog; a consumer that dies
//!   leaves entries in the group's pending list, where `XAUTOCLAIM` finds them.
//!   Each consumer has its own connection, because `XREADGROUP BLOCK` holds
//!   the connection it runs on.

pub mod breaker;
pub mod topology;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use redis::{
    aio::ConnectionLike,
    streams::{StreamAutoClaimReply, StreamId, StreamReadReply},
    Cmd, Pipeline, RedisError, RedisFuture, Script, Value,
};
use tokio::sync::mpsc;

use self::{
    breaker::{Breaker, BreakerState},
    topology::{is_connection_error, Conn, Connector, TlsFiles, Topology},
};
use super::{
    Admitted, Advanced, BucketDecision, Commit, Job, MemoryState, QueueConsumer, QueueStats,
    SharedState, StateError, StateResult, Subscription, Take,
};

/// The consumer group every worker joins.
pub const CONSUMER_GROUP: &str = "blockremote-workers";
const CHANNEL_CAPACITY: usize = 1024;
const MAX_BLOCK: Duration = Duration::from_secs(10);
/// Default bound on one call (`BLOCKREMOTE_REDIS_TIMEOUT_MS`).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Default number of queue shards on a cluster (`BLOCKREMOTE_REDIS_QUEUE_SHARDS`);
/// one node or a Sentinel primary gains nothing from more than one.
pub const DEFAULT_CLUSTER_SHARDS: usize = 8;

/// The token bucket's take, shared by the scripts below: KEYS[1] = bucket;
/// ARGV[1..3] = capacity, period (ms), cost. Leaves `allowed` (0 or 1),
/// `tokens`, `reset` (ms until full) and `retry` (ms until `cost` is
/// available) in locals. A capacity raised since the last take credits the
/// difference at once (see `state::bucket_resize`).
macro_rules! token_bucket_take_lua {
    () => {
        r"
local capacity = tonumber(ARGV[1])
local rate = capacity / tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'cap')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
local previous = tonumber(state[3])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
elseif previous ~= nil and capacity > previous then
  tokens = tokens + (capacity - previous)
end
local elapsed = now - at
if elapsed < 0 then elapsed = 0 end
tokens = math.min(capacity, tokens + elapsed * rate)
local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = math.ceil((cost - tokens) / rate)
end
local reset = math.ceil((capacity - tokens) / rate)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now), 'cap', capacity)
redis.call('PEXPIRE', KEYS[1], reset + 1000)
"
    };
}

/// Atomic token bucket. KEYS[1] = bucket; ARGV = capacity, period (ms), cost.
/// Returns {allowed, whole tokens left, ms until full, ms until `cost` available}.
const TOKEN_BUCKET_LUA: &str = concat!(
    token_bucket_take_lua!(),
    "return {allowed, math.floor(tokens), reset, retry}\n"
);

/// Bounded enqueue. KEYS[1] = stream; ARGV = capacity, payload.
const ENQUEUE_LUA: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[1], '*', 'p', ARGV[2])
";

/// A queue's backlog and its lag. KEYS[1] = stream; ARGV[1] = consumer
/// group. Returns {entries, ms the oldest entry not yet delivered to the
/// group has waited} — entry ids are the Redis clock's milliseconds at
/// `XADD`, compared with the same clock (`TIME`). Without the group (no
/// worker ever started) every entry is undelivered.
const QUEUE_STATS_LUA: &str = r"
local len = redis.call('XLEN', KEYS[1])
if len == 0 then
  return {0, 0}
end
local last = '0-0'
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered
  for i = 1, #group, 2 do
    if group[i] == 'name' then
      name = group[i + 1]
    elseif group[i] == 'last-delivered-id' then
      delivered = group[i + 1]
    end
  end
  if name == ARGV[1] then
    last = delivered
  end
end
local oldest = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #oldest == 0 then
  return {len, 0}
end
local added = tonumber(string.match(oldest[1][1], '^(%d+)'))
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {len, math.max(0, ms - added)}
";

/// `INCRBY` that sets the TTL only on the call that creates the key.
const INCR_LUA: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
";

/// Raise-to. KEYS[1] = key; ARGV = value, ttl (ms). Returns the stored value.
const SET_MAX_LUA: &str = r"
local current = tonumber(redis.call('GET', KEYS[1])) or 0
local value = tonumber(ARGV[1])
if value > current then current = value end
redis.call('SET', KEYS[1], current, 'PX', ARGV[2])
return current
";

/// [`SET_MAX_LUA`] over many keys. KEYS = counters; ARGV = their values, then the TTL (ms).
/// (All keys share the instance's prefix; Redis Cluster would need hash tags.)
const SET_MAX_MANY_LUA: &str = r"
local ttl = ARGV[#ARGV]
for i, key in ipairs(KEYS) do
  local current = tonumber(redis.call('GET', key)) or 0
  local value = tonumber(ARGV[i])
  if value > current then current = value end
  redis.call('SET', key, current, 'PX', ttl)
end
return #KEYS
";

/// Next position and history entry for many devices. KEYS = counter,
/// history pairs; ARGV = max history length, TTL (ms), then one payload per
/// pair. Returns the positions.
const SEQUENCE_AND_PUSH_LUA: &str = r"
local keep = tonumber(ARGV[1])
local ttl = ARGV[2]
local seqs = {}
for i = 1, #KEYS / 2 do
  local counter, history = KEYS[2 * i - 1], KEYS[2 * i]
  local seq = redis.call('INCR', counter)
  redis.call('PEXPIRE', counter, ttl)
  redis.call('ZADD', history, seq, ARGV[i + 2])
  redis.call('ZREMRANGEBYRANK', history, 0, -(keep + 1))
  redis.call('PEXPIRE', history, ttl)
  seqs[i] = seq
end
return seqs
";

/// Store ARGV[1] at KEYS[1] only if greater than what is there; returns the
/// previous value when stored, -1 when not. (Values stay below 2^53, where
/// Lua numbers are exact: ingestion caps `seq`.)
const ADVANCE_LUA: &str = r"
local current = tonumber(redis.call('GET', KEYS[1])) or 0
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return current
end
return -1
";

/// Set KEYS[1] back to ARGV[2] if it holds ARGV[1]; 1 if it did.
const RETREAT_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Delete KEYS[1] if it holds ARGV[1]; 1 if deleted.
const DELETE_IF_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// [`ADVANCE_LUA`] then [`ENQUEUE_LUA`]. KEYS = counter, stream; ARGV =
/// value, TTL (ms), capacity, payload. Returns {previous, -1 when not above
/// it or -3 when no value is stored, id or false}. (Two keys of two slots:
/// one node only; a cluster takes two steps, see `admit_in_two_steps`.)
const ADVANCE_AND_ENQUEUE_LUA: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then
  return {-3, false}
end
local current = tonumber(stored) or 0
if tonumber(ARGV[1]) <= current then
  return {-1, false}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return {current, false}
end
return {current, redis.call('XADD', KEYS[2], '*', 'p', ARGV[4])}
";

/// [`TOKEN_BUCKET_LUA`], then — when it allowed — [`ADVANCE_AND_ENQUEUE_LUA`].
/// KEYS = bucket, counter, stream; ARGV = capacity, period (ms), cost,
/// value, TTL (ms), queue capacity, payload. Returns {allowed, whole tokens
/// left, ms until full, ms until `cost` available, previous or -1 (-2 when
/// refused, -3 when no value is stored), id or false}. (The stream is in
/// another slot: one node only.)
const TAKE_ADVANCE_AND_ENQUEUE_LUA: &str = concat!(
    token_bucket_take_lua!(),
    r"
if allowed == 0 then
  return {allowed, math.floor(tokens), reset, retry, -2, false}
end
local stored = redis.call('GET', KEYS[2])
if not stored then
  return {allowed, math.floor(tokens), reset, retry, -3, false}
end
local current = tonumber(stored) or 0
if tonumber(ARGV[4]) <= current then
  return {allowed, math.floor(tokens), reset, retry, -1, false}
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[6]) then
  return {allowed, math.floor(tokens), reset, retry, current, false}
end
return {allowed, math.floor(tokens), reset, retry, current, redis.call('XADD', KEYS[3], '*', 'p', ARGV[7])}
"
);

/// [`TOKEN_BUCKET_LUA`], then — when it allowed — [`ADVANCE_LUA`]: the part of
/// [`TAKE_ADVANCE_AND_ENQUEUE_LUA`] that lives in the device's slot, for a
/// cluster (the enqueue follows on the queue shard's node). KEYS = bucket,
/// counter; ARGV = capacity, period (ms), cost, value, TTL (ms). Returns
/// {allowed, whole tokens left, ms until full, ms until `cost` available,
/// previous or -1 (-2 when refused, -3 when no value is stored)}.
const TAKE_AND_ADVANCE_LUA: &str = concat!(
    token_bucket_take_lua!(),
    r"
if allowed == 0 then
  return {allowed, math.floor(tokens), reset, retry, -2}
end
local stored = redis.call('GET', KEYS[2])
if not stored then
  return {allowed, math.floor(tokens), reset, retry, -3}
end
local current = tonumber(stored) or 0
if tonumber(ARGV[4]) <= current then
  return {allowed, math.floor(tokens), reset, retry, -1}
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
return {allowed, math.floor(tokens), reset, retry, current}
"
);

fn unavailable(err: RedisError) -> StateError {
    StateError::Unavailable(err.to_string())
}

/// The hash tag of a key as Redis Cluster reads it: what is between the
/// first `{` and the next `}`, when not empty; else the whole key. Keys
/// with equal tags share a slot.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// FNV-1a: a stable hash (the same in every process and build) for
/// choosing a device's queue shard.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A connection whose every call is bounded by a timeout and passes the
/// circuit breaker.
#[derive(Clone)]
struct Guarded {
    conn: Conn,
    breaker: Arc<Breaker>,
    timeout: Duration,
    /// Where each call's latency goes (`redis_command_duration_seconds`).
    observed: Option<Arc<Observed>>,
}

/// What names a call in the latency metric: our scripts by their SHA-1.
struct Observed {
    metrics: Arc<crate::telemetry::Metrics>,
    scripts: Vec<(String, &'static str)>,
}

/// Every script, by the name its calls are counted under.
const SCRIPTS: &[(&str, &str)] = &[
    ("take_and_advance", TAKE_AND_ADVANCE_LUA),
    ("token_bucket", TOKEN_BUCKET_LUA),
    ("enqueue", ENQUEUE_LUA),
    ("queue_stats", QUEUE_STATS_LUA),
    ("incr", INCR_LUA),
    ("set_max", SET_MAX_LUA),
    ("set_max_many", SET_MAX_MANY_LUA),
    ("advance", ADVANCE_LUA),
    ("retreat", RETREAT_LUA),
    ("delete_if", DELETE_IF_LUA),
    ("sequence_and_push", SEQUENCE_AND_PUSH_LUA),
    ("advance_and_enqueue", ADVANCE_AND_ENQUEUE_LUA),
    ("take_advance_and_enqueue", TAKE_ADVANCE_AND_ENQUEUE_LUA),
];

/// The commands named in the metric; any other is `other` (the label set stays bounded).
const COMMANDS: &[&str] = &[
    "GET",
    "SET",
    "DEL",
    "MGET",
    "EVAL",
    "SCRIPT",
    "XADD",
    "XREADGROUP",
    "XACK",
    "XAUTOCLAIM",
    "XPENDING",
    "XLEN",
    "XGROUP",
    "XINFO",
    "XRANGE",
    "XDEL",
    "XTRIM",
    "PUBLISH",
    "SPUBLISH",
    "PING",
    "INCRBY",
    "PEXPIRE",
    "PTTL",
    "ZADD",
    "ZRANGEBYSCORE",
    "ZRANGE",
    "ZREMRANGEBYRANK",
    "HGET",
    "HSET",
    "SCAN",
    "INFO",
    "FLUSHDB",
    "EXISTS",
];

impl Observed {
    fn new(metrics: Arc<crate::telemetry::Metrics>) -> Self {
        Self {
            metrics,
            scripts: SCRIPTS
                .iter()
                .map(|(name, lua)| (Script::new(lua).get_hash().to_owned(), *name))
                .collect(),
        }
    }

    /// The label of `cmd`: its name, or for `EVALSHA` the script's.
    fn op(&self, cmd: &Cmd) -> &'static str {
        let mut args = cmd.args_iter().filter_map(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes),
            redis::Arg::Cursor => None,
        });
        let Some(name) = args.next() else {
            return "other";
        };
        if name.eq_ignore_ascii_case(b"EVALSHA") {
            let sha = args.next().unwrap_or_default();
            return self
                .scripts
                .iter()
                .find(|(hash, _)| hash.as_bytes() == sha)
                .map_or("other", |(_, name)| name);
        }
        COMMANDS
            .iter()
            .find(|c| c.as_bytes().eq_ignore_ascii_case(name))
            .copied()
            .unwrap_or("other")
    }

    fn observe<T>(
        &self,
        op: &'static str,
        reply: &redis::RedisResult<T>,
        started: std::time::Instant,
    ) {
        let outcome = match reply {
            Ok(_) => "ok",
            Err(e) if e.to_string().contains("circuit breaker is open") => "rejected",
            Err(e) if e.is_timeout() => "timeout",
            Err(_) => "error",
        };
        self.metrics
            .observe_redis(op, outcome, started.elapsed().as_secs_f64());
    }
}

fn breaker_open() -> RedisError {
    RedisError::from((
        redis::ErrorKind::IoError,
        "the Redis circuit breaker is open",
    ))
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

impl Guarded {
    async fn guard<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        let permit = self.breaker.admit().ok_or_else(breaker_open)?;
        let reply = tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        let failed = reply.as_ref().err().is_some_and(is_connection_error);
        if let (true, Err(e)) = (failed, &reply) {
            tracing::debug!(error = %e, "Redis call failed");
        }
        self.breaker.record(permit, failed);
        reply
    }
}

impl ConnectionLike for Guarded {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let started = std::time::Instant::now();
            let reply = self.guard(conn.req_packed_command(cmd)).await;
            if let Some(observed) = &self.observed {
                observed.observe(observed.op(cmd), &reply, started);
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let started = std::time::Instant::now();
            let reply = self
                .guard(conn.req_packed_commands(cmd, offset, count))
                .await;
            if let Some(observed) = &self.observed {
                observed.observe("pipeline", &reply, started);
            }
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// How to reach Redis and how to use it.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `REDIS_URL`, any of its forms.
    pub url: String,
    /// Put before every key.
    pub prefix: String,
    /// Bound of each queue (split evenly over its shards).
    pub queue_capacity: usize,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Bound on each call.
    pub call_timeout: Duration,
    /// TLS files for `rediss` forms.
    pub tls: TlsFiles,
    /// Streams per work queue; `None`: 1 on one node, [`DEFAULT_CLUSTER_SHARDS`] on a cluster.
    pub queue_shards: Option<usize>,
    /// Where command latency is observed (none in most tests).
    pub metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl RedisOptions {
    /// Defaults for everything but the URL, prefix, capacity and connect timeout.
    pub fn new(url: &str, prefix: &str, queue_capacity: usize, connect_timeout: Duration) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            queue_capacity,
            connect_timeout,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            tls: TlsFiles::default(),
            queue_shards: None,
            metrics: None,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Redis implementation of [`SharedState`].
pub struct RedisState {
    connector: Connector,
    conn: Guarded,
    breaker: Arc<Breaker>,
    cluster: bool,
    prefix: String,
    queue_capacity: usize,
    shards: usize,
    next_shard: AtomicUsize,
    /// Rate limits while Redis is unavailable: this instance's own buckets.
    fallback: MemoryState,
    fallback_takes: AtomicU64,
    take_and_advance: Script,
    token_bucket: Script,
    enqueue: Script,
    queue_stats: Script,
    incr: Script,
    set_max: Script,
    set_max_many: Script,
    advance: Script,
    retreat: Script,
    delete_if: Script,
    sequence_and_push: Script,
    advance_and_enqueue: Script,
    take_advance_and_enqueue: Script,
}

impl RedisState {
    /// Connects to `url` with the default call timeout and shards; every
    /// key is stored under `prefix`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        queue_capacity: usize,
        timeout: Duration,
    ) -> StateResult<Self> {
        Self::connect_with(RedisOptions::new(url, prefix, queue_capacity, timeout)).await
    }

    /// Connects as `options` say.
    pub async fn connect_with(options: RedisOptions) -> StateResult<Self> {
        let topology = Topology::parse(&options.url).map_err(StateError::Unavailable)?;
        let cluster = topology.is_cluster();
        let connector = Connector::new(topology, &options.tls, options.connect_timeout)
            .map_err(StateError::Unavailable)?;
        let timeout = options.connect_timeout;
        let conn = tokio::time::timeout(timeout, connector.shared(options.call_timeout))
            .await
            .map_err(|_| {
                StateError::Unavailable(format!("no answer within {} s", timeout.as_secs()))
            })?
            .map_err(unavailable)?;
        let breaker = Arc::new(Breaker::default());
        let shards = options
            .queue_shards
            .unwrap_or(if cluster { DEFAULT_CLUSTER_SHARDS } else { 1 })
            .clamp(1, 1024);
        Ok(Self {
            connector,
            conn: Guarded {
                conn,
                breaker: breaker.clone(),
                timeout: options.call_timeout,
                observed: options.metrics.map(|m| Arc::new(Observed::new(m))),
            },
            breaker,
            cluster,
            prefix: options.prefix,
            queue_capacity: options.queue_capacity.max(1),
            shards,
            next_shard: AtomicUsize::new(0),
            fallback: MemoryState::new(1),
            fallback_takes: AtomicU64::new(0),
            take_and_advance: Script::new(TAKE_AND_ADVANCE_LUA),
            token_bucket: Script::new(TOKEN_BUCKET_LUA),
            enqueue: Script::new(ENQUEUE_LUA),
            queue_stats: Script::new(QUEUE_STATS_LUA),
            incr: Script::new(INCR_LUA),
            set_max: Script::new(SET_MAX_LUA),
            set_max_many: Script::new(SET_MAX_MANY_LUA),
            advance: Script::new(ADVANCE_LUA),
            retreat: Script::new(RETREAT_LUA),
            delete_if: Script::new(DELETE_IF_LUA),
            sequence_and_push: Script::new(SEQUENCE_AND_PUSH_LUA),
            advance_and_enqueue: Script::new(ADVANCE_AND_ENQUEUE_LUA),
            take_advance_and_enqueue: Script::new(TAKE_ADVANCE_AND_ENQUEUE_LUA),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// The stream key of one shard of `queue` (the bare name when unsharded).
    fn shard_key(&self, queue: &str, shard: usize) -> String {
        if self.shards == 1 {
            self.key(queue)
        } else {
            self.key(&format!("{queue}:{{q{shard}}}"))
        }
    }

    /// The shard a job about `key` goes to: the same for every key of one
    /// device (same hash tag), so a device's jobs stay in order.
    fn shard_of(&self, key: &str) -> usize {
        (fnv1a(hash_tag(key)) % self.shards as u64) as usize
    }

    /// Each shard's bound: the queue's capacity split over its shards.
    fn shard_capacity(&self) -> usize {
        self.queue_capacity.div_ceil(self.shards)
    }

    /// Indices of `keys`, grouped so each group may share one script or
    /// pipeline: all of them on one node, by hash tag on a cluster.
    fn slot_groups<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Vec<Vec<usize>> {
        if !self.cluster {
            let all: Vec<usize> = keys.enumerate().map(|(i, _)| i).collect();
            return if all.is_empty() {
                Vec::new()
            } else {
                vec![all]
            };
        }
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.enumerate() {
            groups.entry(hash_tag(key)).or_default().push(i);
        }
        groups.into_values().collect()
    }

    /// Runs `run` on each slot group of `items` (concurrently) and puts the
    /// answers back in the items' order.
    async fn by_slot<'i, T, R, F, Fut>(
        &self,
        items: &'i [T],
        key_of: impl Fn(&'i T) -> &'i str,
        run: F,
    ) -> StateResult<Vec<R>>
    where
        F: Fn(Vec<&'i T>) -> Fut,
        Fut: std::future::Future<Output = StateResult<Vec<R>>>,
    {
        let groups = self.slot_groups(items.iter().map(key_of));
        let answers = futures::future::try_join_all(
            groups
                .iter()
                .map(|group| run(group.iter().map(|&i| &items[i]).collect())),
        )
        .await?;
        let mut placed: Vec<Option<R>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        for (group, answer) in groups.iter().zip(answers) {
            if answer.len() != group.len() {
                return Err(StateError::Corrupt(format!(
                    "a batch answered {} replies, expected {}",
                    answer.len(),
                    group.len()
                )));
            }
            for (&i, r) in group.iter().zip(answer) {
                placed[i] = Some(r);
            }
        }
        placed
            .into_iter()
            .map(|r| r.ok_or_else(|| StateError::Corrupt("a batch left an item unanswered".into())))
            .collect()
    }

    /// `SET set_key value NX PX ttl` then `GET get_key`, for each
    /// `(set_key, value, get_key)`, pipelined in one round trip: whether
    /// each SET happened, and what each GET read.
    async fn set_nx_then_get_many(
        &self,
        ops: &[(&str, &[u8], &str)],
        ttl: Duration,
    ) -> StateResult<Vec<(bool, Option<Vec<u8>>)>> {
        self.by_slot(
            ops,
            |(set_key, _, _)| set_key,
            |group| async move {
                let mut pipe = redis::pipe();
                for (set_key, value, get_key) in &group {
                    pipe.cmd("SET")
                        .arg(self.key(set_key))
                        .arg(*value)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(ttl));
                    pipe.cmd("GET").arg(self.key(get_key));
                }
                let replies = self.query_values(&pipe, 2 * group.len()).await?;
                pairs(replies)
                    .map(|(set, read)| Ok((set_happened(&set), bytes(read)?)))
                    .collect()
            },
        )
        .await
    }

    /// [`set_nx_then_get_many`](Self::set_nx_then_get_many) for one.
    async fn set_nx_then_get(
        &self,
        set_key: &str,
        value: &[u8],
        ttl: Duration,
        get_key: &str,
    ) -> StateResult<(bool, Option<Vec<u8>>)> {
        let mut answers = self
            .set_nx_then_get_many(&[(set_key, value, get_key)], ttl)
            .await?;
        answers
            .pop()
            .ok_or_else(|| StateError::Corrupt("a pipeline answered nothing".into()))
    }

    /// Runs `pipe` and checks it answered `expected` replies (those not ignored).
    async fn query_values(
        &self,
        pipe: &redis::Pipeline,
        expected: usize,
    ) -> StateResult<Vec<redis::Value>> {
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        if replies.len() != expected {
            return Err(StateError::Corrupt(format!(
                "pipeline answered {} replies, expected {expected}",
                replies.len()
            )));
        }
        Ok(replies)
    }

    /// Admission on a cluster: the bucket and the `seq` in the device's
    /// slot, then the job on its shard; a failed enqueue gives the `seq`
    /// back. `bucket` `None`: no rate limit (advance and enqueue only).
    #[allow(clippy::too_many_arguments)]
    async fn admit_in_two_steps(
        &self,
        bucket: Option<Take<'_>>,
        key: &str,
        value: u64,
        ttl: Duration,
        queue: &str,
        payload: &[u8],
    ) -> StateResult<Admitted> {
        let mut conn = self.conn.clone();
        let (decision, previous) = match bucket {
            Some(b) => {
                let (allowed, remaining, reset_ms, retry_ms, previous): (i64, i64, u64, u64, i64) =
                    self.take_and_advance
                        .key(self.key(b.key))
                        .key(self.key(key))
                        .arg(b.capacity)
                        .arg(millis(b.period))
                        .arg(b.cost)
                        .arg(value)
                        .arg(millis(ttl))
                        .invoke_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                let decision =
                    bucket_decision(b.capacity, (allowed, remaining, reset_ms, retry_ms));
                if !decision.allowed {
                    return Ok(Admitted {
                        bucket: decision,
                        advanced: None,
                    });
                }
                (decision, previous)
            }
            None => {
                let previous = if self.get(key).await?.is_none() {
                    -3
                } else {
                    self.advance(key, value, ttl)
                        .await?
                        .map_or(-1, |p| p as i64)
                };
                (unlimited(), previous)
            }
        };
        if previous == -3 {
            return Ok(Admitted {
                bucket: decision,
                advanced: Some(Advanced::Unknown),
            });
        }
        let Ok(previous) = u64::try_from(previous) else {
            return Ok(Admitted {
                bucket: decision,
                advanced: Some(Advanced::Stale),
            });
        };
        let shard = self.shard_key(queue, self.shard_of(key));
        let queued: StateResult<Option<String>> = self
            .enqueue
            .key(&shard)
            .arg(self.shard_capacity())
            .arg(payload)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable);
        let advanced = match queued {
            Ok(Some(_)) => Advanced::Queued { previous },
            Ok(None) => Advanced::QueueFull { previous },
            Err(e) => {
                // Give the value back: the caller's retry must not be stale.
                let _ = self.retreat(key, value, previous, ttl).await;
                return Err(e);
            }
        };
        Ok(Admitted {
            bucket: decision,
            advanced: Some(advanced),
        })
    }
}

/// The decision of a take that took nothing from no bucket.
fn unlimited() -> BucketDecision {
    BucketDecision {
        allowed: true,
        limit: 0,
        remaining: 0,
        reset_after: Duration::ZERO,
        retry_after: Duration::ZERO,
    }
}

/// The outcome of the advance-and-enqueue scripts: the previous value (or
/// -1 when not above it, -3 when none is stored) and the stream id (or nil
/// when the queue is full).
fn advanced_of(previous: i64, id: Option<String>) -> Advanced {
    if previous == -3 {
        return Advanced::Unknown;
    }
    match (u64::try_from(previous), id) {
        (Err(_), _) => Advanced::Stale,
        (Ok(previous), Some(_)) => Advanced::Queued { previous },
        (Ok(previous), None) => Advanced::QueueFull { previous },
    }
}

/// The token-bucket scripts' reply: {allowed, whole tokens left, ms until
/// full, ms until the cost is available}.
fn bucket_decision(capacity: u32, reply: (i64, i64, u64, u64)) -> BucketDecision {
    let (allowed, remaining, reset_ms, retry_ms) = reply;
    BucketDecision {
        allowed: allowed == 1,
        limit: capacity,
        remaining: u32::try_from(remaining.max(0)).unwrap_or(capacity),
        reset_after: Duration::from_millis(reset_ms),
        retry_after: Duration::from_millis(retry_ms),
    }
}

/// Replies taken two by two (a `SET NX` and the `GET` after it).
fn pairs(replies: Vec<redis::Value>) -> impl Iterator<Item = (redis::Value, redis::Value)> {
    let mut replies = replies.into_iter();
    std::iter::from_fn(move || Some((replies.next()?, replies.next()?)))
}

/// Whether a `SET ... NX` reply says the key was set.
fn set_happened(reply: &redis::Value) -> bool {
    !matches!(reply, redis::Value::Nil)
}

/// A `GET` reply: the value, or `None` when absent.
fn bytes(reply: redis::Value) -> StateResult<Option<Vec<u8>>> {
    match reply {
        redis::Value::Nil => Ok(None),
        redis::Value::BulkString(b) => Ok(Some(b)),
        other => Err(StateError::Corrupt(format!("unexpected reply {other:?}"))),
    }
}

fn ttl_millis(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(millis)
}

#[async_trait]
impl SharedState for RedisState {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> StateResult<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value);
        if let Some(ms) = ttl_millis(ttl) {
            cmd.arg("PX").arg(ms);
        }
        cmd.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value).arg("NX");
        if let Some(ms) = ttl_millis(ttl) {
            cmd.arg("PX").arg(ms);
        }
        let reply: Option<String> = cmd.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(reply.is_some())
    }

    async fn take(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("GETDEL")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("DEL")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(n > 0)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> StateResult<i64> {
        let mut conn = self.conn.clone();
        self.incr
            .key(self.key(key))
            .arg(by)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| match e.kind() {
                redis::ErrorKind::ResponseError | redis::ErrorKind::ExtensionError => {
                    StateError::Corrupt(format!("{key} is not an integer"))
                }
                _ => unavailable(e),
            })
    }

    async fn set_max(&self, key: &str, value: u64, ttl: Duration) -> StateResult<u64> {
        let mut conn = self.conn.clone();
        self.set_max
            .key(self.key(key))
            .arg(value)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn advance(&self, key: &str, value: u64, ttl: Duration) -> StateResult<Option<u64>> {
        let mut conn = self.conn.clone();
        let previous: i64 = self
            .advance
            .key(self.key(key))
            .arg(value)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(u64::try_from(previous).ok())
    }

    async fn retreat(
        &self,
        key: &str,
        value: u64,
        previous: u64,
        ttl: Duration,
    ) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let done: i64 = self
            .retreat
            .key(self.key(key))
            .arg(value)
            .arg(previous)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    async fn delete_if(&self, key: &str, value: &[u8]) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let done: i64 = self
            .delete_if
            .key(self.key(key))
            .arg(value)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    // The three below are plain commands pipelined in one round trip, not
    // scripts: on Redis a script call costs several times a plain command
    // (docs/BENCHMARKS.md), and none of them needs one.

    async fn lock_and_get(
        &self,
        lock: &str,
        token: &[u8],
        ttl: Duration,
        key: &str,
    ) -> StateResult<Option<Option<Vec<u8>>>> {
        // The read is wasted when the lock is held elsewhere; the caller
        // then discards it (and it never sees a value read without the lock).
        let (locked, value) = self.set_nx_then_get(lock, token, ttl, key).await?;
        Ok(locked.then_some(value))
    }

    async fn set_many_and_unlock(
        &self,
        entries: &[(&str, &[u8], Option<Duration>)],
        lock: &str,
        token: &[u8],
        within_ttl: bool,
    ) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for (key, value, ttl) in entries {
            pipe.cmd("SET").arg(self.key(key)).arg(*value);
            if let Some(ms) = ttl_millis(*ttl) {
                pipe.arg("PX").arg(ms);
            }
            pipe.ignore();
        }
        if within_ttl {
            // Still ours for certain: a plain delete, in the same round trip.
            pipe.cmd("DEL").arg(self.key(lock));
            let (deleted,): (u64,) = pipe.query_async(&mut conn).await.map_err(unavailable)?;
            return Ok(deleted == 1);
        }
        // It may have expired and been taken since: only a compare-and-delete.
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.delete_if(lock, token).await
    }

    async fn lock_and_get_many(
        &self,
        requests: &[(&str, &[u8], &str)],
        ttl: Duration,
    ) -> StateResult<Vec<Option<Option<Vec<u8>>>>> {
        // A value read without the lock is discarded, never returned.
        let answers = self.set_nx_then_get_many(requests, ttl).await?;
        Ok(answers
            .into_iter()
            .map(|(locked, value)| locked.then_some(value))
            .collect())
    }

    async fn commit_many(&self, commits: &[Commit<'_>]) -> StateResult<Vec<bool>> {
        // One holder's writes and lock share the lock's hash tag.
        self.by_slot(
            commits,
            |c| c.lock,
            |group| async move {
                let mut pipe = redis::pipe();
                for c in &group {
                    for (key, value, ttl) in &c.entries {
                        pipe.cmd("SET").arg(self.key(key)).arg(*value);
                        if let Some(ms) = ttl_millis(*ttl) {
                            pipe.arg("PX").arg(ms);
                        }
                        pipe.ignore();
                    }
                    if c.within_ttl {
                        pipe.cmd("DEL").arg(self.key(c.lock));
                    }
                }
                let within = group.iter().filter(|c| c.within_ttl).count();
                let replies = self.query_values(&pipe, within).await?;
                let mut deleted = replies.iter();
                let mut released = Vec::with_capacity(group.len());
                for c in &group {
                    released.push(if c.within_ttl {
                        matches!(deleted.next(), Some(redis::Value::Int(1)))
                    } else {
                        // It may have expired and been taken since: compare-and-delete.
                        self.delete_if(c.lock, c.token).await?
                    });
                }
                Ok(released)
            },
        )
        .await
    }

    async fn claim_many(
        &self,
        claims: &[(&str, &[u8])],
        ttl: Duration,
    ) -> StateResult<Vec<Option<Vec<u8>>>> {
        // As `claim`: each SET NX, then a GET of the same key.
        let ops: Vec<(&str, &[u8], &str)> = claims
            .iter()
            .map(|(key, value)| (*key, *value, *key))
            .collect();
        let answers = self.set_nx_then_get_many(&ops, ttl).await?;
        Ok(answers
            .into_iter()
            .map(|(claimed, holder)| if claimed { None } else { holder })
            .collect())
    }

    async fn claim(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<Option<Vec<u8>>> {
        // Not one atomic step, and it need not be: if the holder's key
        // expires between the two commands, the GET finds nothing and the
        // caller is told no one else holds it — which is then true.
        let (claimed, holder) = self.set_nx_then_get(key, value, ttl, key).await?;
        Ok(if claimed { None } else { holder })
    }

    async fn advance_and_enqueue(
        &self,
        key: &str,
        value: u64,
        ttl: Duration,
        queue: &str,
        payload: &[u8],
    ) -> StateResult<Advanced> {
        if self.cluster {
            let admitted = self
                .admit_in_two_steps(None, key, value, ttl, queue, payload)
                .await?;
            return Ok(admitted.advanced.unwrap_or(Advanced::Stale));
        }
        let mut conn = self.conn.clone();
        let (previous, id): (i64, Option<String>) = self
            .advance_and_enqueue
            .key(self.key(key))
            .key(self.shard_key(queue, self.shard_of(key)))
            .arg(value)
            .arg(millis(ttl))
            .arg(self.shard_capacity())
            .arg(payload)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(advanced_of(previous, id))
    }

    async fn take_then_advance_and_enqueue(
        &self,
        bucket: Take<'_>,
        key: &str,
        value: u64,
        ttl: Duration,
        queue: &str,
        payload: &[u8],
    ) -> StateResult<Admitted> {
        if self.cluster {
            return self
                .admit_in_two_steps(Some(bucket), key, value, ttl, queue, payload)
                .await;
        }
        let mut conn = self.conn.clone();
        let (allowed, remaining, reset_ms, retry_ms, previous, id): (
            i64,
            i64,
            u64,
            u64,
            i64,
            Option<String>,
        ) = self
            .take_advance_and_enqueue
            .key(self.key(bucket.key))
            .key(self.key(key))
            .key(self.shard_key(queue, self.shard_of(key)))
            .arg(bucket.capacity)
            .arg(millis(bucket.period))
            .arg(bucket.cost)
            .arg(value)
            .arg(millis(ttl))
            .arg(self.shard_capacity())
            .arg(payload)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let decision = bucket_decision(bucket.capacity, (allowed, remaining, reset_ms, retry_ms));
        let advanced = decision.allowed.then(|| advanced_of(previous, id));
        Ok(Admitted {
            bucket: decision,
            advanced,
        })
    }

    async fn set_max_many(&self, entries: &[(String, u64)], ttl: Duration) -> StateResult<()> {
        self.by_slot(
            entries,
            |(key, _)| key,
            |group| async move {
                let mut conn = self.conn.clone();
                let mut invocation = self.set_max_many.prepare_invoke();
                for (key, _) in &group {
                    invocation.key(self.key(key));
                }
                for (_, value) in &group {
                    invocation.arg(*value);
                }
                invocation.arg(millis(ttl));
                invocation
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(unavailable)?;
                Ok(vec![(); group.len()])
            },
        )
        .await
        .map(drop)
    }

    async fn ttl(&self, key: &str) -> StateResult<Option<Duration>> {
        let mut conn = self.conn.clone();
        let ms: i64 = redis::cmd("PTTL")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    async fn take_tokens(
        &self,
        key: &str,
        capacity: u32,
        period: Duration,
        cost: u32,
    ) -> StateResult<BucketDecision> {
        let mut conn = self.conn.clone();
        let reply: Result<(i64, i64, u64, u64), RedisError> = self
            .token_bucket
            .key(self.key(key))
            .arg(capacity)
            .arg(millis(period))
            .arg(cost)
            .invoke_async(&mut conn)
            .await;
        match reply {
            Ok(reply) => Ok(bucket_decision(capacity, reply)),
            Err(e) if is_connection_error(&e) => {
                // Redis is unavailable: a limit this instance enforces alone
                // (N replicas admit up to N times the plan) beats refusing
                // every request or admitting all of them.
                self.fallback_takes.fetch_add(1, Ordering::Relaxed);
                self.fallback.take_tokens(key, capacity, period, cost).await
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn history_push(
        &self,
        key: &str,
        seq: u64,
        payload: &[u8],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<()> {
        let mut conn = self.conn.clone();
        let key = self.key(key);
        let keep = i64::try_from(max_len.max(1)).unwrap_or(i64::MAX);
        redis::pipe()
            .atomic()
            .cmd("ZADD")
            .arg(&key)
            .arg(seq)
            .arg(payload)
            .ignore()
            .cmd("ZREMRANGEBYRANK")
            .arg(&key)
            .arg(0)
            .arg(-(keep + 1))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(millis(ttl))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn sequence_and_push(
        &self,
        entries: &[(String, String)],
        payloads: &[Vec<u8>],
        max_len: usize,
        ttl: Duration,
    ) -> StateResult<Vec<u64>> {
        let n = entries.len().min(payloads.len());
        let items: Vec<(&(String, String), &Vec<u8>)> =
            entries.iter().zip(payloads).take(n).collect();
        // A device's counter and history share its hash tag; on a cluster,
        // one script per tag (devices are independent: no step needs two).
        self.by_slot(
            &items,
            |((counter, _), _)| counter,
            |group| async move {
                let mut conn = self.conn.clone();
                let mut invocation = self.sequence_and_push.prepare_invoke();
                for ((counter, history), _) in &group {
                    invocation.key(self.key(counter)).key(self.key(history));
                }
                invocation.arg(max_len.max(1)).arg(millis(ttl));
                for (_, payload) in &group {
                    invocation.arg(payload.as_slice());
                }
                invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)
            },
        )
        .await
    }

    async fn history_since(&self, key: &str, since: u64) -> StateResult<Vec<(u64, Vec<u8>)>> {
        let mut conn = self.conn.clone();
        let flat: Vec<(Vec<u8>, u64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key(key))
            .arg(format!("({since}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(flat
            .into_iter()
            .map(|(payload, seq)| (seq, payload))
            .collect())
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> StateResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.key(channel))
            .arg(payload)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn subscribe(&self, channel: &str) -> StateResult<Subscription> {
        let channel = self.key(channel);
        let connector = self.connector.clone();
        let timeout = self.conn.timeout.max(Duration::from_secs(1));
        // On a cluster, any node delivers every `PUBLISH`: `attempt` moves
        // to the next seed node when one is lost.
        let open = move |connector: Connector, channel: String, attempt: usize| async move {
            let subscribed = tokio::time::timeout(timeout, async {
                let client = connector.pubsub_client(attempt).await?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, RedisError>(pubsub)
            })
            .await
            .map_err(|_| StateError::Unavailable("pub/sub connect timed out".into()))?
            .map_err(unavailable)?;
            Ok::<_, StateError>(subscribed.into_on_message())
        };
        // The first subscription happens before returning, so that a message
        // published after `subscribe` returns is guaranteed to arrive.
        let mut attempt = 0;
        let mut messages = open(connector.clone(), channel.clone(), attempt).await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    message = messages.next() => match message {
                        Some(msg) => {
                            backoff = Duration::from_millis(50);
                            if tx.send(msg.get_payload_bytes().to_vec()).await.is_err() {
                                return;
                            }
                        }
                        None => {
                            tracing::warn!(channel, "pub/sub connection lost; resubscribing");
                            loop {
                                tokio::select! {
                                    _ = tx.closed() => return,
                                    _ = tokio::time::sleep(backoff) => {}
                                }
                                attempt += 1;
                                match open(connector.clone(), channel.clone(), attempt).await {
                                    Ok(stream) => {
                                        messages = stream;
                                        // A gap: what was published meanwhile is lost.
                                        if tx.send(Vec::new()).await.is_err() {
                                            return;
                                        }
                                        break;
                                    }
                                    Err(e) => {
                                        tracing::warn!(channel, error = %e, "resubscribe failed");
                                        backoff = (backoff * 2).min(Duration::from_secs(5));
                                    }
                                }
                            }
                        }
                    },
                }
            }
        });
        Ok(rx)
    }

    async fn enqueue(&self, queue: &str, payload: &[u8]) -> StateResult<String> {
        let mut conn = self.conn.clone();
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards;
        let id: Option<String> = self
            .enqueue
            .key(self.shard_key(queue, shard))
            .arg(self.shard_capacity())
            .arg(payload)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        id.ok_or_else(|| StateError::QueueFull(queue.to_owned()))
    }

    async fn queue_stats(&self, queue: &str) -> StateResult<QueueStats> {
        // Every shard's: the backlog is their sum, the lag their worst.
        let shards = futures::future::try_join_all((0..self.shards).map(|shard| {
            let mut conn = self.conn.clone();
            let key = self.shard_key(queue, shard);
            async move {
                self.queue_stats
                    .key(key)
                    .arg(CONSUMER_GROUP)
                    .invoke_async::<(u64, u64)>(&mut conn)
                    .await
                    .map_err(unavailable)
            }
        }))
        .await?;
        Ok(QueueStats {
            len: shards.iter().map(|(len, _)| len).sum(),
            oldest_wait: Duration::from_millis(shards.iter().map(|(_, w)| *w).max().unwrap_or(0)),
        })
    }

    fn queue_shards(&self) -> usize {
        self.shards
    }

    fn breaker_state(&self) -> Option<BreakerState> {
        Some(self.breaker.state())
    }

    fn fallback_takes(&self) -> u64 {
        self.fallback_takes.load(Ordering::Relaxed)
    }

    async fn consumer(
        &self,
        queue: &str,
        shard: usize,
        name: &str,
    ) -> StateResult<Box<dyn QueueConsumer>> {
        let key = self.shard_key(queue, shard % self.shards);
        create_group(&mut self.conn.clone(), &key)
            .await
            .map_err(unavailable)?;
        let mut consumer = RedisConsumer {
            connector: self.connector.clone(),
            conn: None,
            key,
            name: name.to_owned(),
        };
        consumer.connection().await?;
        Ok(Box::new(consumer))
    }
}

/// Creates the consumer group of the stream `key` (and the stream), unless
/// it exists. From the beginning of the stream ("0"), not "$": entries
/// enqueued before the first worker ever started, or since Redis lost the
/// group, must still be handled.
async fn create_group(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(CONSUMER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// A consumer of one stream, on a connection of its own (a blocking read
/// holds it), reopened after a connection error.
struct RedisConsumer {
    connector: Connector,
    conn: Option<Conn>,
    key: String,
    name: String,
}

impl RedisConsumer {
    async fn connection(&mut self) -> StateResult<Conn> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let conn = self
            .connector
            .dedicated(MAX_BLOCK + DEFAULT_CALL_TIMEOUT * 4)
            .await
            .map_err(unavailable)?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `cmd`, dropping the connection if it failed. A Redis that lost
    /// its data (restarted without persistence, failed over to a replica
    /// that never saw the group, flushed) answers `NOGROUP`: the group is
    /// created again and the command retried once, or the stream's new
    /// entries would never be read.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> StateResult<T> {
        let mut conn = self.connection().await?;
        let mut reply = cmd.query_async(&mut conn).await;
        if reply.as_ref().err().and_then(RedisError::code) == Some("NOGROUP") {
            tracing::warn!(stream = %self.key, "consumer group lost; creating it again");
            reply = match create_group(&mut conn, &self.key).await {
                Ok(()) => cmd.query_async(&mut conn).await,
                Err(e) => Err(e),
            };
        }
        self.settle(reply)
    }

    /// Drops the connection when `reply` says it broke (the next call reopens it).
    fn settle<T>(&mut self, reply: redis::RedisResult<T>) -> StateResult<T> {
        if reply.as_ref().err().is_some_and(is_connection_error) {
            self.conn = None;
        }
        reply.map_err(unavailable)
    }
}

/// The job of a stream entry; its payload is moved out of the reply, not copied.
fn job_of(mut entry: StreamId) -> Option<Job> {
    match entry.map.remove("p")? {
        redis::Value::BulkString(payload) => Some(Job {
            id: entry.id,
            payload: payload.into(),
        }),
        _ => None,
    }
}

#[async_trait]
impl QueueConsumer for RedisConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> StateResult<Vec<Job>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max.max(1))
            .arg("BLOCK")
            .arg(millis(wait.min(MAX_BLOCK)))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">");
        let reply: Option<StreamReadReply> = self.query(&cmd).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .filter_map(job_of)
            .collect())
    }

    async fn ack(&mut self, ids: &[String]) -> StateResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&self.key)
            .arg(CONSUMER_GROUP)
            .arg(ids)
            .ignore()
            .cmd("XDEL")
            .arg(&self.key)
            .arg(ids)
            .ignore();
        let mut conn = self.connection().await?;
        let reply = pipe.query_async::<()>(&mut conn).await;
        self.settle(reply)
    }

    async fn reclaim(&mut self, min_idle: Duration, max: usize) -> StateResult<Vec<Job>> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.key)
            .arg(CONSUMER_GROUP)
            .arg(&self.name)
            .arg(millis(min_idle))
            .arg("0-0")
            .arg("COUNT")
            .arg(max.max(1));
        let reply: StreamAutoClaimReply = self.query(&cmd).await?;
        Ok(reply.claimed.into_iter().filter_map(job_of).collect())
    }
}
