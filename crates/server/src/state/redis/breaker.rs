//! The Redis circuit breaker: a Redis that is down or hung costs each call
//! microseconds, not its timeout.
//!
//! Closed, it lets every call through and counts consecutive connection
//! failures (a timeout, a dropped or refused connection — never a command's
//! own error). After [`FAILURES_TO_OPEN`] it opens: calls fail at once, for a
//! cool-down that doubles on each failed probe (from [`FIRST_COOL_DOWN`] up
//! to [`MAX_COOL_DOWN`], with ±20% jitter so replicas do not probe in step).
//! Then it half-opens: one call goes through as a probe; success closes it,
//! failure opens it again. The connections underneath reconnect by
//! themselves; the breaker only decides who waits for them.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Consecutive connection failures that open the breaker.
pub const FAILURES_TO_OPEN: u32 = 5;
/// The first cool-down.
pub const FIRST_COOL_DOWN: Duration = Duration::from_millis(250);
/// The longest cool-down: a Redis that is back is noticed within about
/// this (a cluster failover takes a few seconds; waiting longer than it
/// only stretches the outage).
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(2);

/// What the breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Every call.
    Closed,
    /// None, until the cool-down ends.
    Open,
    /// One probe.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant, cool_down: Duration },
    HalfOpen { probing: bool, cool_down: Duration },
}

/// A circuit breaker (see the module doc).
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }
}

/// A call let through; [`Breaker::record`] says how it went. A probe's
/// permit dropped unrecorded (its call was cancelled: the request that
/// made it went away, an outer timeout fired) frees the probe slot, or the
/// breaker would stay half-open with a probe nobody finishes and refuse
/// every call for good.
#[derive(Debug)]
#[must_use]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut inner = self.breaker.lock();
            if let Inner::HalfOpen { cool_down, .. } = *inner {
                *inner = Inner::HalfOpen {
                    probing: false,
                    cool_down,
                };
            }
        }
    }
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a call through, or refuses it while open (or while another
    /// call is the half-open probe).
    pub fn admit(&self) -> Option<Permit<'_>> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<Permit<'_>> {
        let permit = |probe| Permit {
            breaker: self,
            probe,
            recorded: false,
        };
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Some(permit(false)),
            Inner::Open { until, cool_down } if now >= until => {
                *inner = Inner::HalfOpen {
                    probing: true,
                    cool_down,
                };
                Some(permit(true))
            }
            Inner::Open { .. } => None,
            Inner::HalfOpen {
                probing: false,
                cool_down,
            } => {
                *inner = Inner::HalfOpen {
                    probing: true,
                    cool_down,
                };
                Some(permit(true))
            }
            Inner::HalfOpen { probing: true, .. } => None,
        }
    }

    /// Records a call's outcome: `failed` when the connection failed.
    pub fn record(&self, permit: Permit<'_>, failed: bool) {
        self.record_at(permit, failed, Instant::now(), rand::random::<f64>());
    }

    fn record_at(&self, mut permit: Permit<'_>, failed: bool, now: Instant, jitter: f64) {
        permit.recorded = true;
        let mut inner = self.lock();
        let open = |cool_down: Duration| Inner::Open {
            // ±20%: replicas that failed together do not probe together.
            until: now + cool_down.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)),
            cool_down,
        };
        *inner = match (&*inner, failed) {
            (_, false) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, true) if failures + 1 >= FAILURES_TO_OPEN => {
                tracing::warn!("Redis circuit breaker opened");
                open(FIRST_COOL_DOWN)
            }
            (Inner::Closed { failures }, true) => Inner::Closed {
                failures: failures + 1,
            },
            (Inner::HalfOpen { cool_down, .. }, true) if permit.probe => {
                open((*cool_down * 2).min(MAX_COOL_DOWN))
            }
            // A call admitted before the breaker opened, failing late.
            (Inner::Open { until, cool_down }, true) => Inner::Open {
                until: *until,
                cool_down: *cool_down,
            },
            (Inner::HalfOpen { probing, cool_down }, true) => Inner::HalfOpen {
                probing: *probing,
                cool_down: *cool_down,
            },
        };
    }

    /// The state now (an open breaker whose cool-down ended reads half-open).
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until, .. } if Instant::now() < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &Breaker, now: Instant) {
        let permit = b.admit_at(now).expect("admitted");
        b.record_at(permit, true, now, 0.5);
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_between_them_resets_the_count() {
        let b = Breaker::default();
        let now = Instant::now();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            fail(&b, now);
        }
        let ok = b.admit_at(now).expect("still closed");
        b.record_at(ok, false, now, 0.5);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            fail(&b, now);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, now);
        assert!(b.admit_at(now).is_none(), "open: refused at once");
    }

    #[test]
    fn it_half_opens_for_one_probe_and_backs_off_when_the_probe_fails() {
        let b = Breaker::default();
        let start = Instant::now();
        for _ in 0..FAILURES_TO_OPEN {
            fail(&b, start);
        }
        assert!(b.admit_at(start + FIRST_COOL_DOWN / 2).is_none());
        let after = start + FIRST_COOL_DOWN;
        let probe = b.admit_at(after).expect("the probe");
        assert!(b.admit_at(after).is_none(), "one probe at a time");
        b.record_at(probe, true, after, 0.5);
        // The cool-down doubled: still open after one first cool-down.
        assert!(b.admit_at(after + FIRST_COOL_DOWN).is_none());
        let probe = b
            .admit_at(after + FIRST_COOL_DOWN * 2)
            .expect("probe after the doubled cool-down");
        b.record_at(probe, false, after, 0.5);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit_at(after).is_some());
    }

    #[test]
    fn a_probe_whose_call_was_cancelled_lets_the_next_call_probe() {
        let b = Breaker::default();
        let start = Instant::now();
        for _ in 0..FAILURES_TO_OPEN {
            fail(&b, start);
        }
        let after = start + FIRST_COOL_DOWN * 2;
        let probe = b.admit_at(after).expect("the probe");
        assert!(b.admit_at(after).is_none(), "one probe at a time");
        // Its call is dropped before it finishes: nothing is recorded.
        drop(probe);
        let next = b.admit_at(after).expect("another call probes");
        b.record_at(next, false, after, 0.5);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn the_cool_down_is_capped_and_jittered() {
        let b = Breaker::default();
        let mut now = Instant::now();
        for _ in 0..FAILURES_TO_OPEN {
            fail(&b, now);
        }
        for _ in 0..20 {
            now += MAX_COOL_DOWN * 2;
            let probe = b.admit_at(now).expect("probe");
            b.record_at(probe, true, now, 1.0);
        }
        // At most the cap plus 20%.
        assert!(b.admit_at(now + MAX_COOL_DOWN).is_none());
        assert!(b.admit_at(now + MAX_COOL_DOWN.mul_f64(1.21)).is_some());
    }
}
