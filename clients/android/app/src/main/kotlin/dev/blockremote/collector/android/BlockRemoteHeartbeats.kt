package dev.blockremote.collector.android

import android.app.Activity
import android.os.Handler
import android.os.Looper
import android.os.SystemClock
import android.util.Log
import android.view.MotionEvent
import dev.blockremote.collector.DnsLog
import dev.blockremote.collector.HeartbeatListener
import dev.blockremote.collector.HeartbeatLoop
import dev.blockremote.collector.HeartbeatOutcome
import dev.blockremote.collector.HeartbeatSender
import dev.blockremote.collector.MonotonicClock
import dev.blockremote.collector.TokenSource
import java.util.concurrent.Executors
import java.util.concurrent.ScheduledExecutorService
import java.util.concurrent.TimeUnit

/**
 * The heartbeat collector of one Activity: sensors, touches, network and context, sent every 2 s
 * while the Activity is in the foreground.
 *
 * ```kotlin
 * class MainActivity : Activity() {
 *     private lateinit var heartbeats: BlockRemoteHeartbeats
 *     override fun onCreate(state: Bundle?) {
 *         super.onCreate(state)
 *         heartbeats = BlockRemoteHeartbeats(this, "https://blockremote.example.com", session, object : HeartbeatListener {
 *             override fun onDeviceLocked() = showLockScreen()
 *             override fun onSignInRequired(outcome: HeartbeatOutcome) = showSignIn()
 *         })
 *     }
 *     override fun onStart() { super.onStart(); heartbeats.start() }
 *     override fun onStop() { heartbeats.stop(); super.onStop() }
 *     override fun dispatchTouchEvent(ev: MotionEvent): Boolean {
 *         heartbeats.onTouchEvent(ev)
 *         return super.dispatchTouchEvent(ev)
 *     }
 * }
 * ```
 *
 * `session` is the app's one [TokenSource]: it holds the tokens the bank's back end handed over
 * (`POST /v1/admin/sessions`) and serialises `POST /v1/auth/refresh`. After a new sign-in call
 * [onNewSession]; after the kill-switch socket says the device is unlocked, [onUnlocked].
 *
 * Threads: sensors on their own HandlerThread, touches on the main thread, ticks and HTTP on a
 * single background thread; the listener is called on the main thread.
 */
class BlockRemoteHeartbeats(
    activity: Activity,
    baseUrl: String,
    tokens: TokenSource,
    listener: HeartbeatListener,
    watchedPackages: List<String> = emptyList(),
    /** Feed it from the HTTP client's DNS hook; drained into `context.dns` every heartbeat. */
    val dnsLog: DnsLog = DnsLog(),
) {
    private val app = activity.applicationContext
    private val seqStore = FileSeqStore(app)
    private val clock = MonotonicClock { SystemClock.elapsedRealtimeNanos() } // SensorEvent.timestamp's clock
    private val signals = AndroidSignals(activity, watchedPackages, dnsLog)
    private val loop = HeartbeatLoop(
        clock,
        HeartbeatSender(baseUrl, DeviceIdentity.deviceId(app), tokens, seqStore),
        signals,
        OnMainThread(listener),
    )
    private val sensors = SensorSource(app) { loop.window() }
    private val touches = TouchSource(activity) { loop.window() }
    private var timer: ScheduledExecutorService? = null

    /** From `onStart`: collect and send. The first heartbeat covers the 2 s from now. */
    fun start() {
        if (timer != null) return
        loop.resume()
        sensors.start()
        signals.start()
        timer = Executors.newSingleThreadScheduledExecutor { r -> Thread(r, "blockremote-heartbeat") }.also {
            // Fixed delay, not fixed rate: a slow answer makes the next window longer (up to the
            // 60 s the contract allows) instead of queueing ticks behind it.
            it.scheduleWithFixedDelay({ tick() }, PERIOD_MS, PERIOD_MS, TimeUnit.MILLISECONDS)
        }
    }

    /** From `onStop`: in the background nothing is collected or sent. */
    fun stop() {
        timer?.shutdownNow()
        timer = null
        sensors.stop()
        signals.stop()
    }

    /** From `dispatchTouchEvent`, before `super`. */
    fun onTouchEvent(ev: MotionEvent) = touches.record(ev)

    /** A new session (sign-in, reinstall): `seq` starts again at 1, and a stopped loop restarts. */
    fun onNewSession() {
        seqStore.setLastSeq(0)
        loop.restart()
    }

    /** The kill-switch socket's state or an `UNLOCK` said the device is no longer locked. */
    fun onUnlocked() = loop.restart()

    private fun tick() {
        try {
            loop.tick()
        } catch (e: RuntimeException) {
            // An exception would cancel the schedule silently; log it and keep the cadence.
            Log.w(TAG, "heartbeat tick failed", e)
        }
    }

    private class OnMainThread(private val inner: HeartbeatListener) : HeartbeatListener {
        private val main = Handler(Looper.getMainLooper())
        override fun onOutcome(outcome: HeartbeatOutcome) {
            when (outcome) {
                is HeartbeatOutcome.Invalid -> Log.e(TAG, "heartbeat refused (a client bug): $outcome")
                is HeartbeatOutcome.ServerError, is HeartbeatOutcome.RateLimited -> Log.w(TAG, "heartbeat: $outcome")
                else -> {}
            }
            main.post { inner.onOutcome(outcome) }
        }
        override fun onDeviceLocked() { main.post { inner.onDeviceLocked() } }
        override fun onSignInRequired(outcome: HeartbeatOutcome) { main.post { inner.onSignInRequired(outcome) } }
    }

    private companion object {
        const val TAG = "BlockRemote"
        const val PERIOD_MS = 2000L
    }
}
