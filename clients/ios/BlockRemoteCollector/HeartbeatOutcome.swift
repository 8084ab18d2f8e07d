import Foundation

/// An HTTP answer as the classifier needs it: status, headers (names lower-cased), body.
public struct HTTPAnswer {
    public let status: Int
    public let headers: [String: String]
    public let body: Data

    public init(status: Int, headers: [String: String], body: Data) {
        self.status = status
        self.headers = Dictionary(headers.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { _, last in last })
        self.body = body
    }

    public func header(_ name: String) -> String? { headers[name.lowercased()] }
}

/// What the server's answer to a heartbeat means for the app (INTEGRATION.md sections 2 and 4).
/// Branch on the outcome, never on `detail` or `title`: `classify` maps the HTTP status plus the
/// problem+json `code`, the stable part of every error (docs/ERRORS.md).
public enum HeartbeatOutcome: Equatable {
    /// 202: queued for scoring; the next heartbeat is `seq + 1`. `rateLimitRemaining` is
    /// `RateLimit-Remaining`: keep it above zero and no 429 comes.
    case accepted(seq: UInt64, degraded: Bool, rateLimitRemaining: Int?)
    /// 409 `replay`: `seq` not above the last accepted (a retry after a lost 202, or a lost
    /// counter). Do not resend it; continue at `lastSeq + 1`.
    case replay(lastSeq: UInt64)
    /// 429: wait `retryAfterSeconds`, then send the newest window only.
    case rateLimited(retryAfterSeconds: Int)
    /// 401 `token_expired`: refresh once and retry.
    case tokenExpired
    /// 401 `invalid_token` (or an unknown 401): sign in again.
    case invalidToken
    /// 401 `device_revoked`: sign in again.
    case deviceRevoked
    /// 403 `device_locked`: show the lock screen; do not retry.
    case deviceLocked
    /// 403 `account_blocked`: the user is blocked on every device.
    case accountBlocked
    /// A client bug: 422 `validation_failed` (`field` names the value), 400, 413, 415, 401
    /// `device_mismatch`, a 409 other than `replay`. Log it, drop the heartbeat (its `seq` was not
    /// spent).
    case invalid(status: Int, code: String?, field: String?, detail: String?)
    /// The server could not take it: 503 (e.g. `queue_full`, its `seq` given back) → retry the same
    /// heartbeat after 1–2 s with jitter (`retrySame`); anything else → drop it.
    case serverError(status: Int, code: String?, retryAfterSeconds: Int?)
    /// No answer (offline, DNS, timeout, TLS): drop the window; offline windows are not queued.
    case unreachable(String)

    public var retrySame: Bool {
        if case .serverError(503, _, _) = self { return true }
        return false
    }

    private struct Problem: Decodable {
        let code: String?
        let detail: String?
        let field: String?
        let last_seq: UInt64?
    }

    private struct AcceptedBody: Decodable {
        let seq: UInt64?
        let degraded: Bool?
    }

    /// The outcome of `answer`, the reply to a heartbeat sent with `sentSeq`. Fallbacks as in the
    /// Kotlin core: an unreadable 202 accepts `sentSeq`; a `replay` without `last_seq` is
    /// `sentSeq`; a 429 without a usable `Retry-After` waits 1 s; an unknown 401 is
    /// `.invalidToken`; a 403 without a BlockRemote `code` (a proxy) is a `.serverError`, not a
    /// lock — the kill-switch socket's state is the authority on locks.
    public static func classify(_ answer: HTTPAnswer, sentSeq: UInt64, now: Date = Date()) -> HeartbeatOutcome {
        let problem = try? JSONDecoder().decode(Problem.self, from: answer.body)
        let code = problem?.code
        let retryAfter = parseRetryAfter(answer.header("Retry-After"), now: now)
        func invalid() -> HeartbeatOutcome {
            .invalid(status: answer.status, code: code, field: problem?.field, detail: problem?.detail)
        }
        switch answer.status {
        case 200...299:
            let body = try? JSONDecoder().decode(AcceptedBody.self, from: answer.body)
            let remaining = answer.header("RateLimit-Remaining").flatMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            return .accepted(seq: body?.seq ?? sentSeq, degraded: body?.degraded ?? false, rateLimitRemaining: remaining)
        case 409:
            return code == "replay" ? .replay(lastSeq: problem?.last_seq ?? sentSeq) : invalid()
        case 429:
            return .rateLimited(retryAfterSeconds: retryAfter ?? 1)
        case 401:
            switch code ?? "" {
            case "token_expired": return .tokenExpired
            case "device_revoked": return .deviceRevoked
            case "device_mismatch": return invalid()
            default: return .invalidToken
            }
        case 403:
            switch code ?? "" {
            case "device_locked": return .deviceLocked
            case "account_blocked": return .accountBlocked
            default: return .serverError(status: 403, code: code, retryAfterSeconds: retryAfter)
            }
        case 400, 404, 405, 413, 415, 422:
            return invalid()
        default:
            return .serverError(status: answer.status, code: code, retryAfterSeconds: retryAfter)
        }
    }

    private static let httpDate: DateFormatter = {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "GMT")
        f.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        return f
    }()

    /// `Retry-After` in whole seconds, clamped to 1–3600: delta-seconds or an HTTP-date.
    public static func parseRetryAfter(_ value: String?, now: Date) -> Int? {
        guard let v = value?.trimmingCharacters(in: .whitespaces), !v.isEmpty else { return nil }
        let seconds: Int
        if let n = Int(v) {
            seconds = n
        } else if let date = httpDate.date(from: v) {
            seconds = Int(date.timeIntervalSince(now).rounded(.up))
        } else {
            return nil
        }
        return min(max(seconds, 1), 3600)
    }
}
