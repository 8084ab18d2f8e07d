import CoreMotion
import UIKit

/// The heartbeat collector: motion, touches, network and context, sent every 2 s while the app is
/// active, nothing in the background.
///
/// ```swift
/// // SceneDelegate
/// func scene(_ scene: UIScene, willConnectTo session: UISceneSession, options: UIScene.ConnectionOptions) {
///     guard let scene = scene as? UIWindowScene else { return }
///     let window = HeartbeatCapturingWindow(windowScene: scene)
///     heartbeats = BlockRemoteHeartbeats(baseURL: URL(string: "https://blockremote.example.com")!,
///                                        tokens: session, listener: self)
///     heartbeats.attach(to: window)
///     self.window = window
/// }
/// func sceneDidBecomeActive(_ scene: UIScene) { heartbeats.start() }
/// func sceneDidEnterBackground(_ scene: UIScene) { heartbeats.stop() }
/// ```
///
/// `session` is the app's one `TokenSource` (tokens from the bank's back end, serialised refresh).
/// After a new sign-in call `onNewSession()`; when the kill-switch socket says unlocked,
/// `onUnlocked()`. The listener is held weakly and called on the main thread.
@MainActor
public final class BlockRemoteHeartbeats {
    private let seqStore: SeqStore
    private let signals: IOSSignals
    private let loop: HeartbeatLoop
    private let motion: MotionSource
    private weak var window: UIWindow?
    private var timer: Timer?
    /// Feed it through `DNSMetricsDelegate`; drained into `context.dns` every heartbeat.
    public let dnsLog: DnsLog

    public init(baseURL: URL, tokens: TokenSource, listener: HeartbeatListener,
                seqStore: SeqStore = UserDefaultsSeqStore(), dnsLog: DnsLog = DnsLog(),
                motionManager: CMMotionManager = CMMotionManager()) {
        self.seqStore = seqStore
        self.dnsLog = dnsLog
        let signals = IOSSignals(dnsLog: dnsLog)
        self.signals = signals
        let sender = HeartbeatSender(baseURL: baseURL, deviceId: DeviceIdentity.deviceId(),
                                     tokens: tokens, seqStore: seqStore)
        let loop = HeartbeatLoop(sender: sender, signals: signals, listener: OnMainThread(listener))
        self.loop = loop
        motion = MotionSource(manager: motionManager) { loop.windows.current }
    }

    /// Records the touches of `window` (and reads its scene's capture state).
    public func attach(to window: HeartbeatCapturingWindow) {
        self.window = window
        let windows = loop.windows
        window.heartbeatWindow = { windows.current }
    }

    /// The app became active: collect, and send every 2 s.
    public func start() {
        guard timer == nil else { return }
        let loop = self.loop
        Task { await loop.resume() }
        motion.start()
        // A main-run-loop timer fires on the main thread; the Task states it for the compiler.
        timer = Timer.scheduledTimer(withTimeInterval: 2.0, repeats: true) { [weak self] _ in
            Task { @MainActor in self?.fire() }
        }
    }

    /// The app went to the background: nothing is collected or sent.
    public func stop() {
        timer?.invalidate()
        timer = nil
        motion.stop()
    }

    /// A new session: `seq` starts again at 1, and a stopped loop restarts.
    public func onNewSession() {
        seqStore.lastSeq = 0
        let loop = self.loop
        Task { await loop.restart() }
    }

    /// The kill-switch socket's state or an `UNLOCK` said the device is unlocked.
    public func onUnlocked() {
        let loop = self.loop
        Task { await loop.restart() }
    }

    private func fire() {
        signals.refreshOnMain(window: window)
        let loop = self.loop
        Task.detached { await loop.tick() }
    }

    private final class OnMainThread: HeartbeatListener {
        private weak var inner: HeartbeatListener?
        init(_ inner: HeartbeatListener) { self.inner = inner }
        func onOutcome(_ outcome: HeartbeatOutcome) {
            DispatchQueue.main.async { [weak self] in self?.inner?.onOutcome(outcome) }
        }
        func onDeviceLocked() {
            DispatchQueue.main.async { [weak self] in self?.inner?.onDeviceLocked() }
        }
        func onSignInRequired(_ outcome: HeartbeatOutcome) {
            DispatchQueue.main.async { [weak self] in self?.inner?.onSignInRequired(outcome) }
        }
    }
}
