import Foundation

/// What the platform adds to each window when it closes.
public protocol WindowSignals: AnyObject {
    /// Network deltas since the previous call (a `NetworkMeter` reading), or nil.
    func network() -> Network?
    /// The context as of now.
    func context() -> DeviceContext
}

/// What the app must act on. Called off the main thread: `BlockRemoteHeartbeats` hops to it.
public protocol HeartbeatListener: AnyObject {
    /// Every outcome, for logging and metrics.
    func onOutcome(_ outcome: HeartbeatOutcome)
    /// 403 `device_locked`: show the lock screen (INTEGRATION.md section 5). The loop has stopped.
    func onDeviceLocked()
    /// `.invalidToken`, `.deviceRevoked` or `.accountBlocked`: sign in again. The loop has stopped.
    func onSignInRequired(_ outcome: HeartbeatOutcome)
}

public extension HeartbeatListener {
    func onOutcome(_ outcome: HeartbeatOutcome) {}
    func onDeviceLocked() {}
    func onSignInRequired(_ outcome: HeartbeatOutcome) {}
}

/// The current window, reachable synchronously from the motion queue and the main thread.
public final class WindowBox: @unchecked Sendable {
    private let lock = NSLock()
    private var window: HeartbeatWindow

    init(start: TimeInterval) { window = HeartbeatWindow(start: start) }

    public var current: HeartbeatWindow {
        lock.lock(); defer { lock.unlock() }
        return window
    }

    /// Closes the current window at `now` and opens the next at the same instant.
    func rotate(at now: TimeInterval) -> WindowData {
        lock.lock()
        let closed = window
        window = HeartbeatWindow(start: now)
        lock.unlock()
        return closed.close(at: now)
    }

    func reset(at now: TimeInterval) {
        lock.lock(); defer { lock.unlock() }
        window = HeartbeatWindow(start: now)
    }
}

/// The heartbeat cadence and the policy for every answer (INTEGRATION.md section 4), as the Kotlin
/// `HeartbeatLoop` that the JVM self-check runs: the platform calls `tick()` every 2 s while the app
/// is in the foreground, and each tick closes the window, opens the next, and sends the closed one:
/// - 202 → next `seq`; 409 `replay` → the sender jumped `seq`, the window is dropped;
/// - 429 → nothing sent until `Retry-After` has passed, windows meanwhile dropped (the first one
///   sent afterwards is the newest);
/// - 503 → the same heartbeat once more after 1–2 s with jitter, then dropped;
/// - no answer, 422 and other client bugs → dropped;
/// - 403 `device_locked` → stop, `onDeviceLocked`; an uncured 401, `device_revoked`,
///   `account_blocked` → stop, `onSignInRequired`.
/// A tick that comes while the previous one is still waiting for its answer does nothing, so the
/// window simply grows (up to the 60 s the contract allows) rather than sends overlapping.
public actor HeartbeatLoop {
    private let clock: @Sendable () -> TimeInterval
    private let sender: HeartbeatSender
    private let signals: WindowSignals
    private let listener: HeartbeatListener?
    public nonisolated let windows: WindowBox
    private var ticking = false
    private var pausedUntil: TimeInterval?
    public private(set) var stopped = false

    /// `clock`: seconds since boot, the clock of `CMLogItem.timestamp` and `UITouch.timestamp`.
    public init(sender: HeartbeatSender, signals: WindowSignals, listener: HeartbeatListener?,
                clock: @escaping @Sendable () -> TimeInterval = { ProcessInfo.processInfo.systemUptime }) {
        self.clock = clock
        self.sender = sender
        self.signals = signals
        self.listener = listener
        self.windows = WindowBox(start: clock())
    }

    /// Back in the foreground: a fresh window, so the background is not one long window. A stopped
    /// loop stays stopped.
    public func resume() {
        windows.reset(at: clock())
    }

    /// After a new sign-in (with the `SeqStore` reset to 0) or an `UNLOCK`: clears a stop.
    public func restart() {
        windows.reset(at: clock())
        pausedUntil = nil
        stopped = false
    }

    @discardableResult
    public func tick() async -> HeartbeatOutcome? {
        guard !ticking else { return nil }
        ticking = true
        defer { ticking = false }
        let now = clock()
        let data = windows.rotate(at: now)
        let network = signals.network() // every tick: the next delta covers only the next window
        if stopped { return nil }
        if let until = pausedUntil, now < until { return nil }
        let context = signals.context()
        var outcome = await sender.send(data, network: network, context: context)
        if outcome.retrySame {
            listener?.onOutcome(outcome)
            try? await Task.sleep(nanoseconds: UInt64.random(in: 1_000_000_000..<2_000_000_000))
            outcome = await sender.send(data, network: network, context: context)
        }
        listener?.onOutcome(outcome)
        switch outcome {
        case .rateLimited(let seconds):
            pausedUntil = clock() + TimeInterval(seconds)
        case .deviceLocked:
            stopped = true
            listener?.onDeviceLocked()
        case .invalidToken, .deviceRevoked, .accountBlocked:
            stopped = true
            listener?.onSignInRequired(outcome)
        default:
            break
        }
        return outcome
    }
}
