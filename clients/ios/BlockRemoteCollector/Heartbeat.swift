import Foundation

/// A number rounded (banker's rounding) to `places` fraction digits, as a `Decimal`, which
/// `JSONEncoder` writes as a plain decimal: no exponent, no 17-digit binary noise, never `-0`.
/// (Every value reaching here is finite: `HeartbeatWindow` refuses the others.)
func jsonDecimal(_ value: Double, _ places: Int) -> Decimal {
    var exact = Decimal(value)
    var rounded = Decimal()
    NSDecimalRound(&rounded, &exact, places, .bankers)
    return rounded
}

extension Sample: Encodable {
    /// `[t_ms, x, y, z]`: `t_ms` to the microsecond, axes to 10⁻⁶ (below any phone sensor's
    /// resolution, so the raw jitter the engine looks for is kept).
    public func encode(to encoder: Encoder) throws {
        var c = encoder.unkeyedContainer()
        try c.encode(jsonDecimal(tMs, 3))
        try c.encode(jsonDecimal(x, 6))
        try c.encode(jsonDecimal(y, 6))
        try c.encode(jsonDecimal(z, 6))
    }
}

extension Touch: Encodable {
    private enum CodingKeys: String, CodingKey { case t, x, y, pressure, size, action }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(jsonDecimal(tMs, 3), forKey: .t)
        try c.encode(jsonDecimal(x, 6), forKey: .x)
        try c.encode(jsonDecimal(y, 6), forKey: .y)
        try c.encode(jsonDecimal(pressure, 6), forKey: .pressure)
        try c.encode(jsonDecimal(size, 6), forKey: .size)
        try c.encode(action, forKey: .action)
    }
}

/// Bytes the whole device sent and received over `intervalMs` (1–600 000).
public struct Network: Encodable, Equatable {
    public let txBytes: UInt64
    public let rxBytes: UInt64
    public let intervalMs: UInt64

    public init(txBytes: UInt64, rxBytes: UInt64, intervalMs: UInt64) {
        self.txBytes = txBytes
        self.rxBytes = rxBytes
        self.intervalMs = intervalMs
    }

    private enum CodingKeys: String, CodingKey {
        case txBytes = "tx_bytes", rxBytes = "rx_bytes", intervalMs = "interval_ms"
    }
}

/// Per-interface byte counters → the per-heartbeat deltas of `network`
/// (INTEGRATION.md section 3, "Network").
///
/// iOS has no device-wide counter API; `getifaddrs()` gives each interface's `if_data`, whose
/// `ifi_obytes` / `ifi_ibytes` are **32-bit** and wrap. Deltas are taken per interface with
/// wrapping subtraction (`&-`, i.e. "add 2³² when negative") and then summed, so one interface
/// wrapping does not spoil the others; an interface that appeared since the last reading counts from
/// the next one. Only `en*` (Wi-Fi, Ethernet) and `pdp_ip*` (cellular) count.
///
/// Read it once per heartbeat, whether or not that heartbeat is sent, so a delta covers the same
/// span as its window. The first reading gives nil (no `network`), as does an interval outside
/// 1–600 000 ms.
public final class NetworkMeter: @unchecked Sendable {
    private let lock = NSLock()
    private var last: (counters: [String: (tx: UInt32, rx: UInt32)], at: TimeInterval)?

    public init() {}

    /// `now`: seconds since boot (`ProcessInfo.processInfo.systemUptime`).
    public func read(now: TimeInterval) -> Network? {
        guard let counters = NetworkMeter.interfaceCounters() else { return nil }
        lock.lock(); defer { lock.unlock() }
        let previous = last
        last = (counters, now)
        guard let previous else { return nil }
        var tx: UInt64 = 0
        var rx: UInt64 = 0
        for (name, current) in counters {
            guard let before = previous.counters[name] else { continue }
            tx += UInt64(current.tx &- before.tx)
            rx += UInt64(current.rx &- before.rx)
        }
        let interval = (now - previous.at) * 1000
        guard interval >= 1, interval <= 600_000 else { return nil }
        return Network(txBytes: tx, rxBytes: rx, intervalMs: UInt64(interval.rounded()))
    }

    /// `ifi_obytes` / `ifi_ibytes` of each `en*` and `pdp_ip*` link-layer entry, or nil when
    /// `getifaddrs` fails.
    static func interfaceCounters() -> [String: (tx: UInt32, rx: UInt32)]? {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return nil }
        defer { freeifaddrs(head) }
        var out: [String: (tx: UInt32, rx: UInt32)] = [:]
        for entry in sequence(first: first, next: { $0.pointee.ifa_next }) {
            let ifa = entry.pointee
            guard let addr = ifa.ifa_addr, addr.pointee.sa_family == UInt8(AF_LINK),
                  let data = ifa.ifa_data else { continue }
            let name = String(cString: ifa.ifa_name)
            guard name.hasPrefix("en") || name.hasPrefix("pdp_ip") else { continue }
            let d = data.assumingMemoryBound(to: if_data.self).pointee
            out[name] = (tx: d.ifi_obytes, rx: d.ifi_ibytes)
        }
        return out
    }
}

/// `context` (INTEGRATION.md section 3, "Context"). On iOS `accessibility_services` and
/// `app_hashes` are always empty: iOS has no third-party accessibility services, and an app cannot
/// see other apps.
public struct DeviceContext: Encodable {
    public var screenCapture: Bool = false
    public var accessibilityServices: [String] = []
    public var installer: String?
    public var appHashes: [String] = []
    public var dns: [String] = []

    public static let maxEntries = 64
    public static let maxEntryBytes = 255

    public init(screenCapture: Bool = false, accessibilityServices: [String] = [], installer: String? = nil,
                appHashes: [String] = [], dns: [String] = []) {
        self.screenCapture = screenCapture
        self.accessibilityServices = accessibilityServices
        self.installer = installer
        self.appHashes = appHashes
        self.dns = dns
    }

    private enum CodingKeys: String, CodingKey {
        case screenCapture = "screen_capture", accessibilityServices = "accessibility_services",
             installer, appHashes = "app_hashes", dns
    }

    /// At most 64 entries per list, each 1–255 bytes, no duplicates; an installer over 255 bytes
    /// is left out — rather than let one odd value cost the whole heartbeat a 422.
    public func sanitized() -> DeviceContext {
        func clean(_ list: [String]) -> [String] {
            var seen = Set<String>()
            var out: [String] = []
            for s in list where !s.isEmpty && s.utf8.count <= DeviceContext.maxEntryBytes && !seen.contains(s) {
                seen.insert(s)
                out.append(s)
                if out.count == DeviceContext.maxEntries { break }
            }
            return out
        }
        let installer = self.installer.flatMap { !$0.isEmpty && $0.utf8.count <= DeviceContext.maxEntryBytes ? $0 : nil }
        return DeviceContext(screenCapture: screenCapture,
                             accessibilityServices: clean(accessibilityServices),
                             installer: installer,
                             appHashes: clean(appHashes.map { $0.lowercased() }),
                             dns: clean(dns.map { DnsLog.normalise($0) }))
    }
}

/// Host names the app itself resolved since the last heartbeat, for `context.dns`; fed by
/// `DNSMetricsDelegate` (from `URLSessionTaskMetrics`), drained once per heartbeat, at most 64.
public final class DnsLog: @unchecked Sendable {
    private let lock = NSLock()
    private var names: [String] = []
    private var seen = Set<String>()

    public init() {}

    static func normalise(_ host: String) -> String {
        var h = host.lowercased()
        while h.hasSuffix(".") { h.removeLast() }
        return h
    }

    public func record(_ host: String) {
        let h = DnsLog.normalise(host)
        lock.lock(); defer { lock.unlock() }
        guard !h.isEmpty, names.count < DeviceContext.maxEntries, !seen.contains(h) else { return }
        seen.insert(h)
        names.append(h)
    }

    public func drain() -> [String] {
        lock.lock(); defer { lock.unlock() }
        let out = names
        names = []
        seen = []
        return out
    }
}

/// One heartbeat body (API.md "Signals and trust").
public struct Heartbeat: Encodable {
    public let seq: UInt64
    /// The phone's clock when sent; written RFC 3339, UTC, milliseconds.
    public let sentAt: Date
    public let window: WindowData
    public let network: Network?
    public let context: DeviceContext

    private enum CodingKeys: String, CodingKey {
        case seq, sentAt = "sent_at", accelerometer, gyroscope, touches, network, context
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(seq, forKey: .seq)
        try c.encode(Heartbeat.formatSentAt(sentAt), forKey: .sentAt)
        try c.encode(window.accelerometer, forKey: .accelerometer)
        try c.encode(window.gyroscope, forKey: .gyroscope)
        try c.encode(window.touches, forKey: .touches)
        try c.encodeIfPresent(network, forKey: .network) // no counters: no `network` member
        try c.encode(context.sanitized(), forKey: .context) // a nil installer is left out
    }

    /// `2026-11-22T12:00:00.000Z`. `ISO8601DateFormatter` is thread-safe and defaults to UTC.
    private static let sentAtFormatter: ISO8601DateFormatter = {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        f.timeZone = TimeZone(identifier: "UTC")
        return f
    }()

    public static func formatSentAt(_ date: Date) -> String { sentAtFormatter.string(from: date) }

    /// The JSON body. `JSONEncoder` throws on a non-finite `Double` rather than write `NaN`; there
    /// are none (see `jsonDecimal`), so an error here is a bug.
    public func jsonData() throws -> Data {
        try JSONEncoder().encode(self)
    }
}
