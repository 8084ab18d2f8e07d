import Foundation

/// Where `seq` lives between heartbeats and across launches: the last `seq` the server accepted
/// (or named in a `replay`); the next heartbeat carries that + 1. Set it to 0 when a new session
/// starts (sign-in, reinstall): the server starts each session at 1. If it is ever stale, the 409
/// `replay` names `last_seq` and the sender jumps past it.
public protocol SeqStore: AnyObject {
    var lastSeq: UInt64 { get set }
}

/// A `SeqStore` in `UserDefaults`. `seq` is not a secret, so the Keychain is not needed; a copy
/// restored from a backup is merely stale, which the `replay` answer repairs.
public final class UserDefaultsSeqStore: SeqStore {
    private let defaults: UserDefaults
    private let key: String

    public init(defaults: UserDefaults = .standard, key: String = "dev.blockremote.collector.seq") {
        self.defaults = defaults
        self.key = key
    }

    public var lastSeq: UInt64 {
        get { (defaults.object(forKey: key) as? NSNumber)?.uint64Value ?? 0 }
        set { defaults.set(NSNumber(value: newValue), forKey: key) }
    }
}

/// A `SeqStore` that forgets on relaunch (tests).
public final class InMemorySeqStore: SeqStore {
    public var lastSeq: UInt64
    public init(_ lastSeq: UInt64 = 0) { self.lastSeq = lastSeq }
}

/// The access token, and the one place that refreshes it. Refresh tokens rotate on every use and a
/// second use revokes the device, so `refresh()` must be serialised app-wide (heartbeats, the
/// kill-switch socket and every API call share it) and must store the new refresh token before the
/// new access token is used.
public protocol TokenSource: AnyObject {
    func accessToken() async -> String?
    /// `POST /v1/auth/refresh`; true when a new access token is available.
    func refresh() async -> Bool
}

/// One HTTP POST.
public protocol HTTPTransport {
    func post(url: URL, headers: [String: String], body: Data) async throws -> HTTPAnswer
}

/// `HTTPTransport` on `URLSession` (iOS 15+ async API). An ephemeral session: no cookies, no cache.
/// Pass your own session with a `DNSMetricsDelegate` to feed `context.dns` from your other calls.
public final class URLSessionTransport: HTTPTransport {
    private let session: URLSession

    public init(session: URLSession = URLSession(configuration: .ephemeral)) {
        self.session = session
    }

    public func post(url: URL, headers: [String: String], body: Data) async throws -> HTTPAnswer {
        var request = URLRequest(url: url, cachePolicy: .reloadIgnoringLocalCacheData, timeoutInterval: 10)
        request.httpMethod = "POST"
        for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
        request.httpBody = body
        let (data, response) = try await session.data(for: request)
        guard let http = response as? HTTPURLResponse else { throw URLError(.badServerResponse) }
        var h: [String: String] = [:]
        for (name, value) in http.allHeaderFields {
            if let name = name as? String { h[name.lowercased()] = "\(value)" }
        }
        return HTTPAnswer(status: http.statusCode, headers: h, body: data)
    }
}

/// Sends one window as one heartbeat and keeps `seq` right: picks `lastSeq + 1`, stamps
/// `sent_at`, sends `Authorization` and `X-Device-Id`, refreshes once on 401 `token_expired` and
/// retries once with the same `seq`, records the `seq` on 202 and jumps to `last_seq` on 409
/// `replay` (that window is dropped). A refused heartbeat (422, 429, 503, no answer) spends no
/// `seq`. Waiting out 429, retrying 503 and stopping on a lock are `HeartbeatLoop`'s, which also
/// guarantees that two sends never overlap.
public final class HeartbeatSender: @unchecked Sendable {
    private let url: URL
    private let deviceId: String
    private let tokens: TokenSource
    private let seqStore: SeqStore
    private let transport: HTTPTransport
    private let now: () -> Date

    public init(baseURL: URL, deviceId: String, tokens: TokenSource, seqStore: SeqStore,
                transport: HTTPTransport = URLSessionTransport(), now: @escaping () -> Date = Date.init) {
        self.url = baseURL.appendingPathComponent("v1/signals/heartbeat")
        self.deviceId = deviceId
        self.tokens = tokens
        self.seqStore = seqStore
        self.transport = transport
        self.now = now
    }

    public func send(_ window: WindowData, network: Network?, context: DeviceContext) async -> HeartbeatOutcome {
        let seq = seqStore.lastSeq + 1
        var outcome = await post(seq, window, network, context)
        if outcome == .tokenExpired {
            if await tokens.refresh() {
                outcome = await post(seq, window, network, context)
            } else {
                outcome = .invalidToken
            }
            // Expired again right after a refresh: refreshing again would loop. Sign in again.
            if outcome == .tokenExpired { outcome = .invalidToken }
        }
        switch outcome {
        case .accepted(let accepted, _, _): seqStore.lastSeq = max(accepted, seq)
        case .replay(let last): seqStore.lastSeq = max(last, seqStore.lastSeq)
        default: break
        }
        return outcome
    }

    private func post(_ seq: UInt64, _ window: WindowData, _ network: Network?, _ context: DeviceContext) async -> HeartbeatOutcome {
        guard let token = await tokens.accessToken() else { return .invalidToken }
        let body: Data
        do {
            body = try Heartbeat(seq: seq, sentAt: now(), window: window, network: network, context: context).jsonData()
        } catch {
            return .invalid(status: 0, code: "encoding_failed", field: nil, detail: "\(error)")
        }
        let headers = [
            "Authorization": "Bearer \(token)",
            "X-Device-Id": deviceId,
            "Content-Type": "application/json",
            "Accept": "application/json, application/problem+json",
        ]
        do {
            let answer = try await transport.post(url: url, headers: headers, body: body)
            return HeartbeatOutcome.classify(answer, sentSeq: seq, now: now())
        } catch {
            return .unreachable("\(error)")
        }
    }
}
