import Foundation

/// Units and limits of the heartbeat contract (docs/API.md "Signals and trust",
/// docs/INTEGRATION.md section 3).
///
/// The server's units are Android's: accelerometer in m/s² with gravity included, gyroscope in
/// rad/s, axes of the device's natural orientation (x right, y up, z out of the screen), so a phone
/// lying face up reads about `[0, 0, +9.81]`.
public enum Units {
    /// Standard gravity, m/s² per g.
    public static let standardGravity = 9.80665
    /// The server refuses readings beyond ±160 m/s² (16 g) and ±35 rad/s.
    public static let maxAcceleration = 160.0
    public static let maxRotationRate = 35.0
    /// `t_ms` may not exceed 60 s from the window start.
    public static let maxWindowMs = 60_000.0
    public static let maxSamplesPerSensor = 256
    public static let maxTouches = 64

    /// One axis of `CMAccelerometerData.acceleration` in the server's convention.
    ///
    /// CoreMotion reports **g**, and with the **opposite sign** to Android: a phone lying face up
    /// reads z = −1 where Android reads +9.81 (Android reports the reaction to gravity, CoreMotion
    /// the acceleration of gravity). The axes themselves are the same (x right, y to the top of the
    /// screen, z out of it), so each axis is `−9.80665 × g`. The gyroscope needs no conversion:
    /// `CMGyroData.rotationRate` is rad/s about the same axes, right-handed like Android's.
    public static func coreMotionToServer(_ g: Double) -> Double { -g * standardGravity }
}

/// What a touch event is; its raw value is the wire name.
public enum TouchAction: String, Encodable {
    case down, move, up
}

/// `[t_ms, x, y, z]`: milliseconds since the window start, then the three axes.
public struct Sample: Equatable {
    public let tMs: Double
    public let x: Double
    public let y: Double
    public let z: Double
}

/// One touch event: `t` on the window's clock (the sensors' clock), `x`, `y` in [0, 1] of the
/// screen in its natural (portrait) orientation, origin top-left, `pressure` 0–10, `size` 0–1.
public struct Touch: Equatable {
    public let tMs: Double
    public let x: Double
    public let y: Double
    public let pressure: Double
    public let size: Double
    public let action: TouchAction
}

/// A closed window: what one heartbeat carries, plus how much was dropped (for logging).
public struct WindowData {
    public let accelerometer: [Sample]
    public let gyroscope: [Sample]
    public let touches: [Touch]
    /// Length of the window, ms.
    public let durationMs: Double
    /// Events refused: beyond a cap, before the window start, past 60 s, or not finite.
    public let dropped: Int
}

/// Collects the samples and touches of one heartbeat against one clock.
///
/// Every timestamp is in **seconds since boot**, the clock of both `CMLogItem.timestamp` (motion)
/// and `UITouch.timestamp` (`ProcessInfo.processInfo.systemUptime`): the same clock for sensors and
/// touches is what lets the server find a tap's impulse in the motion. `start` is on that clock too.
///
/// As the Kotlin `HeartbeatWindow` (clients/android/core), which the JVM self-check exercises: it
/// refuses events before the start or more than 60 s after it, non-finite readings, and anything
/// beyond the caps (256 samples per sensor, 64 touches of which at most 32 moves, so that downs and
/// ups still fit); it holds a timestamp that runs backwards at the previous one (the server needs
/// non-decreasing `t_ms`), clamps saturated readings to ±160 m/s² / ±35 rad/s and touch fields into
/// range, and skips a move within 40 ms of the previous kept touch event.
///
/// Thread safety: the motion queue, the main thread and the heartbeat loop call it at once; a lock
/// guards every method. After `close(at:)` it takes nothing more.
public final class HeartbeatWindow: @unchecked Sendable {
    public let start: TimeInterval
    private let maxSamples: Int
    private let maxTouches: Int
    private let maxMoves: Int
    private let minMoveIntervalMs: Double
    private let lock = NSLock()
    private var accelerometer: [Sample] = []
    private var gyroscope: [Sample] = []
    private var touches: [Touch] = []
    private var moves = 0
    private var dropped = 0
    private var closed = false

    public init(start: TimeInterval,
                maxSamples: Int = Units.maxSamplesPerSensor,
                maxTouches: Int = Units.maxTouches,
                minMoveIntervalMs: Double = 40) {
        self.start = start
        self.maxSamples = maxSamples
        self.maxTouches = maxTouches
        self.maxMoves = maxTouches / 2
        self.minMoveIntervalMs = minMoveIntervalMs
        accelerometer.reserveCapacity(maxSamples)
        gyroscope.reserveCapacity(maxSamples)
    }

    /// Milliseconds since the window start, or nil outside the window.
    private func relativeMs(_ timestamp: TimeInterval) -> Double? {
        let ms = (timestamp - start) * 1000
        return (ms >= 0 && ms <= Units.maxWindowMs) ? ms : nil
    }

    /// A `CMAccelerometerData` reading, **in g as CoreMotion reports it**: converted here
    /// (`Units.coreMotionToServer`).
    @discardableResult
    public func addAccelerometer(timestamp: TimeInterval, gx: Double, gy: Double, gz: Double) -> Bool {
        lock.lock(); defer { lock.unlock() }
        return addSample(&accelerometer, timestamp,
                         Units.coreMotionToServer(gx), Units.coreMotionToServer(gy), Units.coreMotionToServer(gz),
                         bound: Units.maxAcceleration)
    }

    /// A `CMGyroData.rotationRate` reading in rad/s, as it is.
    @discardableResult
    public func addGyroscope(timestamp: TimeInterval, x: Double, y: Double, z: Double) -> Bool {
        lock.lock(); defer { lock.unlock() }
        return addSample(&gyroscope, timestamp, x, y, z, bound: Units.maxRotationRate)
    }

    private func addSample(_ list: inout [Sample], _ timestamp: TimeInterval,
                           _ x: Double, _ y: Double, _ z: Double, bound: Double) -> Bool {
        guard !closed, let t = relativeMs(timestamp), list.count < maxSamples,
              x.isFinite, y.isFinite, z.isFinite else {
            dropped += 1
            return false
        }
        let last = list.last?.tMs ?? 0
        func clamp(_ v: Double) -> Double { min(max(v, -bound), bound) }
        list.append(Sample(tMs: max(t, last), x: clamp(x), y: clamp(y), z: clamp(z)))
        return true
    }

    /// A touch event, `x` and `y` already normalised (see `TouchCapture`).
    @discardableResult
    public func addTouch(timestamp: TimeInterval, x: Double, y: Double,
                         pressure: Double, size: Double, action: TouchAction) -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard !closed, let t = relativeMs(timestamp),
              x.isFinite, y.isFinite, pressure.isFinite, size.isFinite else {
            dropped += 1
            return false
        }
        let last = touches.last
        if action == .move {
            // A few moves per gesture are enough; skipping the rest is not a drop.
            if let last, t - last.tMs < minMoveIntervalMs { return false }
            if moves >= maxMoves { dropped += 1; return false }
        }
        guard touches.count < maxTouches else { dropped += 1; return false }
        if action == .move { moves += 1 }
        func unit(_ v: Double) -> Double { min(max(v, 0), 1) }
        touches.append(Touch(tMs: max(t, last?.tMs ?? 0), x: unit(x), y: unit(y),
                             pressure: min(max(pressure, 0), 10), size: unit(size), action: action))
        return true
    }

    /// Ends the window at `end` (seconds since boot) and gives what it collected.
    public func close(at end: TimeInterval) -> WindowData {
        lock.lock(); defer { lock.unlock() }
        closed = true
        return WindowData(accelerometer: accelerometer, gyroscope: gyroscope, touches: touches,
                          durationMs: max(0, (end - start) * 1000), dropped: dropped)
    }
}
