package dev.blockremote.collector.android

import android.content.Context
import android.hardware.Sensor
import android.hardware.SensorEvent
import android.hardware.SensorEventListener
import android.hardware.SensorManager
import android.os.Handler
import android.os.HandlerThread
import dev.blockremote.collector.HeartbeatWindow

/**
 * Accelerometer and gyroscope into the current [HeartbeatWindow] (INTEGRATION.md section 3).
 *
 * - `TYPE_ACCELEROMETER` (m/s², gravity included), not `TYPE_LINEAR_ACCELERATION`, which removes
 *   gravity; `TYPE_GYROSCOPE` (rad/s), not `_UNCALIBRATED`. Values are sent as they are: no
 *   filtering (the engine needs the sensor's raw jitter) and no remapping to the screen's rotation
 *   (axes stay those of the natural orientation, as the server expects).
 * - `SENSOR_DELAY_GAME` (20 000 µs, ≈50 Hz): enough for the touch-impulse test, far from the 256
 *   samples per 2 s window cap. `maxReportLatencyUs = 0`: no FIFO batching in the foreground,
 *   because bursts of near-identical timestamps disable two of the engine's tests.
 * - `SensorEvent.timestamp` is nanoseconds on `SystemClock.elapsedRealtimeNanos()`, the clock of
 *   the window, so it goes in unconverted.
 * - Events are delivered on a background [HandlerThread], never the main thread.
 *
 * A phone without a gyroscope sends an empty `gyroscope` list; the engine abstains on it.
 */
class SensorSource(
    context: Context,
    private val window: () -> HeartbeatWindow,
) : SensorEventListener {
    private val sensors = context.getSystemService(Context.SENSOR_SERVICE) as SensorManager
    private var thread: HandlerThread? = null

    /** Registers both sensors; false when the phone has neither. Call when the app comes to the foreground. */
    fun start(): Boolean {
        if (thread != null) return true
        val t = HandlerThread("blockremote-sensors").also { it.start() }
        thread = t
        val handler = Handler(t.looper)
        var any = false
        for (type in intArrayOf(Sensor.TYPE_ACCELEROMETER, Sensor.TYPE_GYROSCOPE)) {
            val sensor = sensors.getDefaultSensor(type) ?: continue
            any = sensors.registerListener(this, sensor, SensorManager.SENSOR_DELAY_GAME, 0, handler) || any
        }
        return any
    }

    /** Unregisters: in the background nothing is collected or sent. */
    fun stop() {
        sensors.unregisterListener(this)
        thread?.quitSafely()
        thread = null
    }

    override fun onSensorChanged(event: SensorEvent) {
        val v = event.values
        if (v.size < 3) return
        when (event.sensor.type) {
            Sensor.TYPE_ACCELEROMETER ->
                window().addAccelerometer(event.timestamp, v[0].toDouble(), v[1].toDouble(), v[2].toDouble())
            Sensor.TYPE_GYROSCOPE ->
                window().addGyroscope(event.timestamp, v[0].toDouble(), v[1].toDouble(), v[2].toDouble())
        }
    }

    override fun onAccuracyChanged(sensor: Sensor, accuracy: Int) {}
}
