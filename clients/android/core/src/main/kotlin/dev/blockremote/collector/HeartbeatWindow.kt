package dev.blockremote.collector

/**
 * Units and limits of the heartbeat contract (docs/API.md "Signals and trust",
 * docs/INTEGRATION.md section 3).
 *
 * The server's units are Android's: accelerometer in m/s² with gravity included, gyroscope in
 * rad/s, axes of the device's natural orientation (x right, y up, z out of the screen), so a phone
 * lying face up reads about `[0, 0, +9.81]`.
 */
object Units {
    /** Standard gravity, m/s² per g. */
    const val STANDARD_GRAVITY = 9.80665

    /** The server refuses readings beyond ±160 m/s² (16 g) ... */
    const val MAX_ACCELERATION = 160.0

    /** ... and beyond ±35 rad/s. */
    const val MAX_ROTATION_RATE = 35.0

    /** `t_ms` may not exceed 60 s from the window start. */
    const val MAX_WINDOW_MS = 60_000.0

    const val MAX_SAMPLES_PER_SENSOR = 256
    const val MAX_TOUCHES = 64

    /**
     * One axis of an iOS `CMAccelerometerData.acceleration` (in g, and of the opposite sign to
     * Android: face up reads z = −1) in the server's convention: `−9.80665 × g`. Android needs no
     * conversion; this is here so that the one formula both clients rely on is checked on the JVM.
     */
    fun coreMotionToServer(g: Double): Double = -g * STANDARD_GRAVITY
}

/** What a touch event is, and its wire name. */
enum class TouchAction(val wire: String) { DOWN("down"), MOVE("move"), UP("up") }

/** `[t_ms, x, y, z]`: milliseconds since the window start, then the three axes. */
data class Sample(val tMs: Double, val x: Double, val y: Double, val z: Double)

/**
 * One touch event: [tMs] on the window's clock (the sensors' clock), [x] and [y] in [0, 1] of the
 * screen in its natural orientation (origin top-left), [pressure] 0–10, [size] 0–1.
 */
data class Touch(
    val tMs: Double,
    val x: Double,
    val y: Double,
    val pressure: Double,
    val size: Double,
    val action: TouchAction,
)

/** A closed window: what one heartbeat carries, plus how much was dropped (for logging). */
data class WindowData(
    val accelerometer: List<Sample>,
    val gyroscope: List<Sample>,
    val touches: List<Touch>,
    /** Length of the window, ms. */
    val durationMs: Double,
    /** Events refused: beyond a cap, before the window start, past 60 s, or not finite. */
    val dropped: Int,
)

/**
 * Collects the samples and touches of one heartbeat against one monotonic clock.
 *
 * Every timestamp given to it is in nanoseconds of the same clock as [startNanos] — on Android
 * `SystemClock.elapsedRealtimeNanos()`, the base of `SensorEvent.timestamp` (touch times must be
 * converted to it first: `MotionEvent` times are on `uptimeMillis`, another clock); on iOS the
 * seconds since boot of `CMLogItem.timestamp` and `UITouch.timestamp`. One clock for sensors and
 * touches is what lets the server find a tap's impulse in the motion; a 100 ms offset between
 * them makes every real tap look injected.
 *
 * What it refuses, rather than send something the server would refuse whole (422) or misjudge:
 * - an event timestamped before the window start (it belonged to the previous window, which is
 *   gone) or more than 60 s after it;
 * - a non-finite reading;
 * - anything beyond the caps: 256 samples per sensor (ask for 50–100 Hz, so a 2 s window holds
 *   100–200 and never reaches it) and 64 touches, of which at most [maxMoves] are `move`s so
 *   that later `down`s and `up`s still fit (the engine needs every down and up, and a few moves).
 *
 * What it adjusts: a timestamp that runs backwards within one list is held at the previous one
 * (the server requires non-decreasing `t_ms`); readings beyond ±160 m/s² or ±35 rad/s are
 * clamped to the bound (the sensor saturated; the reading is kept, the body stays valid); touch
 * coordinates and size are clamped into [0, 1] and pressure into [0, 10].
 *
 * Thread safety: the sensor thread, the UI thread and the heartbeat loop may call it at once; every
 * method is synchronized. After [close] it takes nothing more.
 */
class HeartbeatWindow(
    val startNanos: Long,
    private val maxSamples: Int = Units.MAX_SAMPLES_PER_SENSOR,
    private val maxTouches: Int = Units.MAX_TOUCHES,
    private val maxMoves: Int = maxTouches / 2,
    /** A `move` closer than this to the previous kept touch event is skipped. */
    private val minMoveIntervalMs: Double = 40.0,
) {
    private val accelerometer = ArrayList<Sample>(maxSamples)
    private val gyroscope = ArrayList<Sample>(maxSamples)
    private val touches = ArrayList<Touch>()
    private var moves = 0
    private var dropped = 0
    private var closedAtMs: Double? = null

    /** Milliseconds since the window start of [timestampNanos], or null when outside the window. */
    private fun relativeMs(timestampNanos: Long): Double? {
        val ms = (timestampNanos - startNanos) / 1_000_000.0
        return if (ms < 0.0 || ms > Units.MAX_WINDOW_MS) null else ms
    }

    /** An accelerometer reading already in the server's units (Android's `TYPE_ACCELEROMETER`). */
    @Synchronized
    fun addAccelerometer(timestampNanos: Long, x: Double, y: Double, z: Double): Boolean =
        addSample(accelerometer, timestampNanos, x, y, z, Units.MAX_ACCELERATION)

    /** An accelerometer reading in iOS CoreMotion's convention (g, opposite sign): converted here. */
    @Synchronized
    fun addAccelerometerInG(timestampNanos: Long, gx: Double, gy: Double, gz: Double): Boolean =
        addSample(
            accelerometer, timestampNanos,
            Units.coreMotionToServer(gx), Units.coreMotionToServer(gy), Units.coreMotionToServer(gz),
            Units.MAX_ACCELERATION,
        )

    /** A gyroscope reading in rad/s (Android `TYPE_GYROSCOPE`, iOS `CMGyroData`: both as they are). */
    @Synchronized
    fun addGyroscope(timestampNanos: Long, x: Double, y: Double, z: Double): Boolean =
        addSample(gyroscope, timestampNanos, x, y, z, Units.MAX_ROTATION_RATE)

    private fun addSample(
        list: ArrayList<Sample>, timestampNanos: Long, x: Double, y: Double, z: Double, bound: Double,
    ): Boolean {
        val t = relativeMs(timestampNanos)
        if (closedAtMs != null || t == null || list.size >= maxSamples ||
            !x.isFinite() || !y.isFinite() || !z.isFinite()
        ) {
            dropped++
            return false
        }
        val last = list.lastOrNull()?.tMs ?: 0.0
        list.add(Sample(maxOf(t, last), x.coerceIn(-bound, bound), y.coerceIn(-bound, bound), z.coerceIn(-bound, bound)))
        return true
    }

    /**
     * A touch event; [x] and [y] already normalised to the screen in its natural orientation (see
     * [ScreenGeometry]), [pressure] and [size] as the platform gives them.
     */
    @Synchronized
    fun addTouch(
        timestampNanos: Long, x: Double, y: Double, pressure: Double, size: Double, action: TouchAction,
    ): Boolean {
        val t = relativeMs(timestampNanos)
        if (closedAtMs != null || t == null || !x.isFinite() || !y.isFinite() ||
            !pressure.isFinite() || !size.isFinite()
        ) {
            dropped++
            return false
        }
        val last = touches.lastOrNull()
        if (action == TouchAction.MOVE) {
            // A few moves per gesture are enough; skipping the rest is not a drop.
            if (last != null && t - last.tMs < minMoveIntervalMs) return false
            if (moves >= maxMoves) {
                dropped++
                return false
            }
        }
        if (touches.size >= maxTouches) {
            dropped++
            return false
        }
        if (action == TouchAction.MOVE) moves++
        touches.add(
            Touch(
                maxOf(t, last?.tMs ?: 0.0),
                x.coerceIn(0.0, 1.0), y.coerceIn(0.0, 1.0),
                pressure.coerceIn(0.0, 10.0), size.coerceIn(0.0, 1.0),
                action,
            ),
        )
        return true
    }

    /** Ends the window at [endNanos] and gives what it collected; later events are refused. */
    @Synchronized
    fun close(endNanos: Long): WindowData {
        val duration = ((endNanos - startNanos) / 1_000_000.0).coerceAtLeast(0.0)
        closedAtMs = duration
        return WindowData(accelerometer.toList(), gyroscope.toList(), touches.toList(), duration, dropped)
    }
}

/**
 * Screen coordinates → the contract's touch `x`, `y`: shares of the screen's width and height,
 * origin top-left, **in the device's natural orientation** (as for the sensors' axes).
 *
 * On a portrait-locked app this is just `rawX / width`, `rawY / height`. When the interface is
 * rotated, the platform's raw coordinates follow the rotated screen and have to be turned back,
 * or a tap's position would not match the axes of the motion it causes. On iOS the same is done by
 * converting to `UIScreen.fixedCoordinateSpace`.
 */
object ScreenGeometry {
    /**
     * @param x, y raw coordinates in the current (rotated) screen, pixels or points
     * @param width, height the current screen's size in the same unit
     * @param quarterTurns Android `Display.getRotation()` (`Surface.ROTATION_0`..`ROTATION_270`
     *   are 0..3): how far the rendering is rotated clockwise to compensate a counter-clockwise
     *   device rotation
     * @return `(x, y)` in [0, 1] of the natural orientation
     */
    fun toNatural(x: Double, y: Double, width: Double, height: Double, quarterTurns: Int): Pair<Double, Double> {
        if (!(width > 0.0) || !(height > 0.0)) return Pair(Double.NaN, Double.NaN)
        val u = (x / width).coerceIn(0.0, 1.0)
        val v = (y / height).coerceIn(0.0, 1.0)
        return when (((quarterTurns % 4) + 4) % 4) {
            0 -> Pair(u, v)
            // Device turned 90° counter-clockwise: its natural top is now on the left.
            1 -> Pair(1.0 - v, u)
            2 -> Pair(1.0 - u, 1.0 - v)
            // Device turned 90° clockwise: its natural top is now on the right.
            else -> Pair(v, 1.0 - u)
        }
    }
}
