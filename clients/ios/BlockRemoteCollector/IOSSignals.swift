import Foundation
import Security
import UIKit

/// `network` and `context` of each heartbeat on iOS (INTEGRATION.md section 3).
///
/// UIKit state (screen capture) may only be read on the main thread, while the loop builds its
/// heartbeat elsewhere: `refreshOnMain(window:)` is called on the main thread just before each
/// tick and the loop reads the copy.
public final class IOSSignals: WindowSignals, @unchecked Sendable {
    private let meter = NetworkMeter()
    private let dnsLog: DnsLog
    private let lock = NSLock()
    private var captured = false
    /// Read once: it cannot change while the app runs.
    public let installer: String = IOSSignals.readInstaller()

    public init(dnsLog: DnsLog) {
        self.dnsLog = dnsLog
    }

    /// `screen_capture`: iOS 17+, the scene's `traitCollection.sceneCaptureState == .active`; before,
    /// `UIScreen.isCaptured` (deprecated from iOS 18). Either is true while the screen is recorded
    /// (Control Center, ReplayKit), mirrored (AirPlay, Sidecar) or captured over the cable
    /// (QuickTime); neither sees screenshots or a camera pointed at the screen.
    @MainActor
    public func refreshOnMain(window: UIWindow?) {
        var value = false
        if #available(iOS 17.0, *), let scene = window?.windowScene {
            value = scene.traitCollection.sceneCaptureState == .active
        } else {
            value = (window?.windowScene?.screen ?? UIScreen.main).isCaptured
        }
        lock.lock(); captured = value; lock.unlock()
    }

    public func network() -> Network? {
        meter.read(now: ProcessInfo.processInfo.systemUptime)
    }

    public func context() -> DeviceContext {
        lock.lock(); let capturedNow = captured; lock.unlock()
        return DeviceContext(screenCapture: capturedNow,
                             accessibilityServices: [], // iOS has no third-party accessibility services
                             installer: installer,
                             appHashes: [],             // an iOS app cannot see other apps
                             dns: dnsLog.drain())
    }

    /// `"com.apple.appstore"`, or `"com.apple.testflight"` when the receipt is the sandbox one
    /// (`appStoreReceiptURL` ends in `sandboxReceipt`), as INTEGRATION.md says. Caveats: builds run
    /// from Xcode have the sandbox path too (reported as TestFlight), ad-hoc and enterprise builds
    /// read as the App Store, and `appStoreReceiptURL` is deprecated from iOS 18 in favour of
    /// StoreKit 2's `AppTransaction.shared` (`environment` `.production` / `.sandbox` / `.xcode`).
    static func readInstaller() -> String {
        Bundle.main.appStoreReceiptURL?.lastPathComponent == "sandboxReceipt" ? "com.apple.testflight" : "com.apple.appstore"
    }
}

/// Feeds `context.dns` from `URLSessionTaskMetrics`: set it as the delegate of the app's
/// `URLSession`s (or pass it to `data(for:delegate:)`). It records the host of every transaction
/// that did a DNS lookup (`domainLookupStartDate` set; a reused connection did none).
public final class DNSMetricsDelegate: NSObject, URLSessionTaskDelegate {
    private let log: DnsLog

    public init(log: DnsLog) { self.log = log }

    public func urlSession(_ session: URLSession, task: URLSessionTask, didFinishCollecting metrics: URLSessionTaskMetrics) {
        for t in metrics.transactionMetrics where t.domainLookupStartDate != nil {
            if let host = t.request.url?.host { log.record(host) }
        }
    }
}

/// The device's identity for sign-in (INTEGRATION.md section 1).
///
/// `device_id`: a random UUID without dashes (32 characters of `[0-9A-F]`), generated once and kept
/// in the Keychain with `kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly`: it survives an app
/// update, and is not carried to another phone by a backup. `device_fingerprint`:
/// `identifierForVendor` (the server stores only its SHA-256).
public enum DeviceIdentity {
    private static let service = "dev.blockremote.collector"
    private static let account = "device_id"

    public static func deviceId() -> String {
        let query: [String: Any] = [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: service,
            kSecAttrAccount as String: account,
            kSecReturnData as String: true,
            kSecMatchLimit as String: kSecMatchLimitOne,
        ]
        var item: CFTypeRef?
        if SecItemCopyMatching(query as CFDictionary, &item) == errSecSuccess,
           let data = item as? Data, let id = String(data: data, encoding: .utf8), isValid(id) {
            return id
        }
        let id = UUID().uuidString.replacingOccurrences(of: "-", with: "")
        let match: [String: Any] = [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: service,
            kSecAttrAccount as String: account,
        ]
        SecItemDelete(match as CFDictionary)
        var add = match
        add[kSecValueData as String] = Data(id.utf8)
        add[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        SecItemAdd(add as CFDictionary, nil)
        return id
    }

    @MainActor
    public static func fingerprint() -> String {
        UIDevice.current.identifierForVendor?.uuidString ?? ""
    }

    static func isValid(_ id: String) -> Bool {
        (8...64).contains(id.count) && id.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") }
    }
}
