package dev.blockremote.collector

import java.util.Random

/** A monotonic clock in nanoseconds: on Android `SystemClock::elapsedRealtimeNanos`, the sensors' clock. */
fun interface MonotonicClock {
    fun nanos(): Long
}

/** What the platform adds to each window when it closes. */
interface WindowSignals {
    /** Network deltas since the previous call (a [NetworkMeter] reading), or null. */
    fun network(): Network?

    /** The context as of now. */
    fun context(): DeviceContext
}

/** What the app must act on. Called on the loop's thread: hand UI work to the main thread. */
interface HeartbeatListener {
    /** Every outcome, for logging and metrics. */
    fun onOutcome(outcome: HeartbeatOutcome) {}

    /** 403 `device_locked`: show the lock screen (INTEGRATION.md section 5). The loop has stopped. */
    fun onDeviceLocked() {}

    /** [HeartbeatOutcome.InvalidToken], [HeartbeatOutcome.DeviceRevoked] or [HeartbeatOutcome.AccountBlocked]: sign in again. The loop has stopped. */
    fun onSignInRequired(outcome: HeartbeatOutcome) {}
}

/**
 * The heartbeat cadence and the policy for every answer (INTEGRATION.md section 4), with no
 * timer of its own: the platform calls [tick] every 2 s while the app is in the foreground (a
 * `ScheduledExecutorService` with fixed delay on Android, a `DispatchSourceTimer` on iOS), and
 * stops calling it in the background. Keeping time out of this class is what lets the JVM
 * self-check run it against a fake clock and a fake server.
 *
 * Each [tick] closes the current window, opens the next at the same instant (no gap, no overlap),
 * and sends the closed one:
 * - 202 → next `seq`; 409 `replay` → the sender jumped `seq`, the window is dropped;
 * - 429 → no heartbeat until `Retry-After` has passed; windows closed meanwhile are dropped, so
 *   the first one sent afterwards is the newest;
 * - 503 → the same heartbeat once more after 1–2 s with jitter, then dropped;
 * - no answer → dropped (offline windows are not queued: old motion is judged as old motion);
 * - 422 and other client bugs → dropped (and reported through [HeartbeatListener.onOutcome]);
 * - 403 `device_locked` → stop, [HeartbeatListener.onDeviceLocked];
 * - 401 that a refresh did not cure, `device_revoked`, `account_blocked` → stop,
 *   [HeartbeatListener.onSignInRequired].
 *
 * Feed events through [window]: the sensor listener and the touch hook call `window().add…` with
 * timestamps on [clock].
 */
class HeartbeatLoop(
    private val clock: MonotonicClock,
    private val sender: HeartbeatSender,
    private val signals: WindowSignals,
    private val listener: HeartbeatListener = object : HeartbeatListener {},
    private val sleepMs: (Long) -> Unit = { Thread.sleep(it) },
    private val random: Random = Random(),
) {
    @Volatile private var current = HeartbeatWindow(clock.nanos())
    /** Set by a 429: no heartbeat is sent before this instant of [clock]. */
    @Volatile private var pausedUntilNanos: Long? = null
    @Volatile var stopped: Boolean = false
        private set

    /** The window events go into now. */
    fun window(): HeartbeatWindow = current

    /**
     * Starts a fresh window now: call it when the app comes back to the foreground, so the time
     * spent in the background is not one long window. A stopped loop stays stopped.
     */
    fun resume() {
        current = HeartbeatWindow(clock.nanos())
    }

    /**
     * Clears a stop: after the user signed in again (with the [SeqStore] reset to 0 for the new
     * session), or after the kill-switch socket's state or an `UNLOCK` said the device is unlocked.
     * Never on a timer: a locked device sends nothing until the server says otherwise.
     */
    fun restart() {
        current = HeartbeatWindow(clock.nanos())
        pausedUntilNanos = null
        stopped = false
    }

    /** Closes the window and sends it per the policy above; the outcome, or null if nothing was sent. */
    fun tick(): HeartbeatOutcome? {
        val now = clock.nanos()
        val closed = current
        current = HeartbeatWindow(now)
        val data = closed.close(now)
        // Read the counters every tick, so the next delta covers only the next window.
        val network = signals.network()
        val pausedUntil = pausedUntilNanos
        if (stopped || (pausedUntil != null && now - pausedUntil < 0)) return null
        val context = signals.context()
        var outcome = sender.send(data, network, context)
        if (outcome is HeartbeatOutcome.ServerError && outcome.retrySame) {
            listener.onOutcome(outcome)
            sleepMs(1000L + random.nextInt(1000))
            outcome = sender.send(data, network, context)
        }
        listener.onOutcome(outcome)
        when (outcome) {
            is HeartbeatOutcome.RateLimited -> pausedUntilNanos = clock.nanos() + outcome.retryAfterSeconds * 1_000_000_000L
            HeartbeatOutcome.DeviceLocked -> {
                stopped = true
                listener.onDeviceLocked()
            }
            HeartbeatOutcome.InvalidToken, HeartbeatOutcome.DeviceRevoked, HeartbeatOutcome.AccountBlocked -> {
                stopped = true
                listener.onSignInRequired(outcome)
            }
            else -> {}
        }
        return outcome
    }
}
