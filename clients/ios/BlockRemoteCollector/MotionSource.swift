import CoreMotion
import Foundation

/// Accelerometer and gyroscope into the current `HeartbeatWindow` (INTEGRATION.md section 3).
///
/// - Raw `CMAccelerometerData` and `CMGyroData`, not `CMDeviceMotion`: device motion's
///   `userAcceleration` has gravity removed, and its `gravity` / `rotationRate` come out of Apple's
///   sensor fusion (filtered, bias-corrected). The engine needs the sensors' raw jitter; a smoothed
///   stream looks synthetic.
/// - 0.02 s update intervals (50 Hz): enough for the touch-impulse test, far from the cap.
/// - Conversion: acceleration is in g with the opposite sign to Android (face up: z = −1), so
///   `HeartbeatWindow.addAccelerometer` multiplies each axis by −9.80665; rotation rate is rad/s
///   about the same right-handed axes as Android's and goes in as it is. No rotation with the
///   interface orientation: axes stay the device's.
/// - `CMLogItem.timestamp` is seconds since boot, the window's clock: no conversion.
/// - Handlers run on a private serial `OperationQueue`, never the main queue.
///
/// Apple recommends one `CMMotionManager` per app: pass the app's own if it has one.
public final class MotionSource {
    private let manager: CMMotionManager
    private let queue: OperationQueue
    private let window: () -> HeartbeatWindow

    public init(manager: CMMotionManager = CMMotionManager(), window: @escaping () -> HeartbeatWindow) {
        self.manager = manager
        self.window = window
        queue = OperationQueue()
        queue.name = "blockremote-motion"
        queue.maxConcurrentOperationCount = 1
        queue.qualityOfService = .userInitiated
    }

    /// Starts both sensors (each only if the device has it). Call when the app becomes active.
    public func start() {
        let window = self.window
        if manager.isAccelerometerAvailable && !manager.isAccelerometerActive {
            manager.accelerometerUpdateInterval = 0.02
            manager.startAccelerometerUpdates(to: queue) { data, _ in
                guard let d = data else { return }
                window().addAccelerometer(timestamp: d.timestamp,
                                          gx: d.acceleration.x, gy: d.acceleration.y, gz: d.acceleration.z)
            }
        }
        if manager.isGyroAvailable && !manager.isGyroActive {
            manager.gyroUpdateInterval = 0.02
            manager.startGyroUpdates(to: queue) { data, _ in
                guard let d = data else { return }
                window().addGyroscope(timestamp: d.timestamp,
                                      x: d.rotationRate.x, y: d.rotationRate.y, z: d.rotationRate.z)
            }
        }
    }

    /// Stops both: in the background nothing is collected or sent.
    public func stop() {
        manager.stopAccelerometerUpdates()
        manager.stopGyroUpdates()
    }
}
