import UIKit

/// A `UIWindow` that records every touch event before delivering it (INTEGRATION.md section 3:
/// touches are collected at the window, in a `sendEvent` override, not per view). Use it as the
/// scene's window (`window = HeartbeatCapturingWindow(windowScene: scene)`) and give it
/// `BlockRemoteHeartbeats` through `attach(to:)`.
open class HeartbeatCapturingWindow: UIWindow {
    /// The window touches go into; set by `BlockRemoteHeartbeats.attach(to:)`.
    public var heartbeatWindow: (() -> HeartbeatWindow)?

    open override func sendEvent(_ event: UIEvent) {
        if event.type == .touches, let touches = event.allTouches, let target = heartbeatWindow?() {
            TouchCapture.record(touches, in: self, into: target)
        }
        super.sendEvent(event)
    }
}

/// `UITouch` → the contract's touch fields.
public enum TouchCapture {
    /// - `x`, `y`: the touch's location converted to the screen's `fixedCoordinateSpace` (portrait-up:
    ///   the device's natural orientation, the frame of the motion axes), ÷ that space's width and
    ///   height. `location(in: nil)` alone is in the window's space, which turns with the interface
    ///   orientation; on a portrait-only app the two are the same.
    /// - `pressure`: `force / maximumPossibleForce` when `maximumPossibleForce > 0` (3D Touch or
    ///   Pencil), else 1.0.
    /// - `size`: `majorRadius` ÷ the screen's width in points.
    /// - `t`: `UITouch.timestamp`, seconds since boot like `CMLogItem.timestamp`.
    /// - Phases: `.began` → down, `.moved` → move, `.ended` / `.cancelled` → up; `.stationary`
    ///   (another finger moved) and pointer-hover phases are skipped.
    @MainActor
    public static func record(_ touches: Set<UITouch>, in window: UIWindow, into target: HeartbeatWindow) {
        let screen = window.windowScene?.screen ?? window.screen
        let fixed = screen.fixedCoordinateSpace
        let bounds = fixed.bounds
        guard bounds.width > 0, bounds.height > 0 else { return }
        for touch in touches {
            let action: TouchAction
            switch touch.phase {
            case .began: action = .down
            case .moved: action = .move
            case .ended, .cancelled: action = .up
            default: continue
            }
            let p = window.convert(touch.location(in: window), to: fixed)
            let pressure = touch.maximumPossibleForce > 0 ? Double(touch.force / touch.maximumPossibleForce) : 1.0
            target.addTouch(timestamp: touch.timestamp,
                            x: Double((p.x - bounds.minX) / bounds.width),
                            y: Double((p.y - bounds.minY) / bounds.height),
                            pressure: pressure,
                            size: Double(touch.majorRadius / bounds.width),
                            action: action)
        }
    }
}
