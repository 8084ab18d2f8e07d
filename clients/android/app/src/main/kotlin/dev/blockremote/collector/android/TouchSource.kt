package dev.blockremote.collector.android

import android.app.Activity
import android.graphics.Point
import android.os.Build
import android.os.SystemClock
import android.view.MotionEvent
import android.view.Surface
import dev.blockremote.collector.HeartbeatWindow
import dev.blockremote.collector.ScreenGeometry
import dev.blockremote.collector.TouchAction

/**
 * `MotionEvent`s into normalised touches of the current [HeartbeatWindow].
 *
 * Call [record] from the Activity's `dispatchTouchEvent` override, before `super`, so every touch
 * of the window is seen whatever view handles it (INTEGRATION.md section 3). Events the platform
 * flags as injected (`FLAG_IS_GENERATED_GESTURE`, accessibility gestures) are recorded like any
 * other: the engine judges them by physics.
 *
 * Clock: `MotionEvent` times are on `SystemClock.uptimeMillis()` — `getEventTimeNanos()` (API 34)
 * too; it only adds precision — while sensor timestamps are on `elapsedRealtimeNanos()`, which
 * keeps counting in deep sleep. Each event is moved onto the sensors' clock with the current
 * offset between the two, `elapsedRealtimeNanos() − System.nanoTime()` (on Android `nanoTime` is
 * `CLOCK_MONOTONIC`, the clock of `uptimeMillis`, with nanosecond resolution). The offset only
 * changes during deep sleep, when there are no touches, so reading it per event is exact enough.
 *
 * Fields: `x`, `y` = raw screen coordinates ÷ the display's size, turned back to the natural
 * orientation when the interface is rotated ([ScreenGeometry.toNatural]); `pressure` =
 * `getPressure(i)` (may exceed 1; clamped at 10); `size` = `getSize(i)` (0–1).
 * Actions: `ACTION_DOWN`/`POINTER_DOWN` → down (that pointer), `ACTION_UP`/`POINTER_UP` → up (that
 * pointer), `ACTION_MOVE` → move (every pointer; the window keeps a few), `ACTION_CANCEL` → up for
 * every pointer (the gesture ended without a lift; iOS `.cancelled` maps to `up` the same way).
 */
class TouchSource(
    private val activity: Activity,
    private val window: () -> HeartbeatWindow,
) {
    fun record(ev: MotionEvent) {
        val action = when (ev.actionMasked) {
            MotionEvent.ACTION_DOWN, MotionEvent.ACTION_POINTER_DOWN -> TouchAction.DOWN
            MotionEvent.ACTION_UP, MotionEvent.ACTION_POINTER_UP, MotionEvent.ACTION_CANCEL -> TouchAction.UP
            MotionEvent.ACTION_MOVE -> TouchAction.MOVE
            else -> return
        }
        val t = onSensorClock(ev)
        val (width, height) = displaySize()
        val rotation = displayRotation()
        val pointers = when (ev.actionMasked) {
            MotionEvent.ACTION_MOVE, MotionEvent.ACTION_CANCEL -> 0 until ev.pointerCount
            else -> ev.actionIndex..ev.actionIndex
        }
        val w = window()
        for (i in pointers) {
            val (x, y) = ScreenGeometry.toNatural(rawX(ev, i), rawY(ev, i), width, height, rotation)
            w.addTouch(t, x, y, ev.getPressure(i).toDouble(), ev.getSize(i).toDouble(), action)
        }
    }

    private fun onSensorClock(ev: MotionEvent): Long {
        val uptimeNanos = if (Build.VERSION.SDK_INT >= 34) ev.eventTimeNanos else ev.eventTime * 1_000_000L
        return uptimeNanos + (SystemClock.elapsedRealtimeNanos() - System.nanoTime())
    }

    /** `getRawX(i)` exists from API 29; before it, shift the pointer's view coordinate by the primary's offset. */
    private fun rawX(ev: MotionEvent, i: Int): Double =
        if (Build.VERSION.SDK_INT >= 29) ev.getRawX(i).toDouble() else (ev.rawX - ev.x + ev.getX(i)).toDouble()

    private fun rawY(ev: MotionEvent, i: Int): Double =
        if (Build.VERSION.SDK_INT >= 29) ev.getRawY(i).toDouble() else (ev.rawY - ev.y + ev.getY(i)).toDouble()

    /** The whole display in its current rotation, in pixels: the space of `getRawX`/`getRawY`. */
    private fun displaySize(): Pair<Double, Double> =
        if (Build.VERSION.SDK_INT >= 30) {
            val b = activity.windowManager.maximumWindowMetrics.bounds
            Pair(b.width().toDouble(), b.height().toDouble())
        } else {
            val p = Point()
            @Suppress("DEPRECATION")
            activity.windowManager.defaultDisplay.getRealSize(p)
            Pair(p.x.toDouble(), p.y.toDouble())
        }

    private fun displayRotation(): Int {
        val r = if (Build.VERSION.SDK_INT >= 30) {
            activity.display?.rotation ?: Surface.ROTATION_0
        } else {
            @Suppress("DEPRECATION")
            activity.windowManager.defaultDisplay.rotation
        }
        return when (r) {
            Surface.ROTATION_90 -> 1
            Surface.ROTATION_180 -> 2
            Surface.ROTATION_270 -> 3
            else -> 0
        }
    }
}
