package dev.blockremote.collector

import java.time.ZonedDateTime
import java.time.format.DateTimeFormatter

/** An HTTP answer as the classifier needs it: status, headers (names lower-cased), body text. */
data class HttpResult(val status: Int, val headers: Map<String, String>, val body: String) {
    fun header(name: String): String? = headers[name.lowercase()]
}

/**
 * What the server's answer to a heartbeat means for the app (INTEGRATION.md sections 2 and 4).
 *
 * Branch on the outcome, never on `detail` or `title`: [HeartbeatOutcome.classify] maps the HTTP
 * status plus the problem+json `code` (the stable part of every error, docs/ERRORS.md).
 */
sealed class HeartbeatOutcome {
    /** 202: queued for scoring; the next heartbeat is [seq] + 1. */
    data class Accepted(
        val seq: Long,
        /** Scored inline because the server's workers are behind; nothing to do. */
        val degraded: Boolean = false,
        /** `RateLimit-Remaining`: keep it above zero and no 429 comes. */
        val rateLimitRemaining: Long? = null,
    ) : HeartbeatOutcome()

    /**
     * 409 `replay`: this `seq` is not above the last accepted ([lastSeq]) — a retry after a lost
     * 202, or a restart that lost the counter. Do not resend it; continue at [lastSeq] + 1.
     */
    data class Replay(val lastSeq: Long) : HeartbeatOutcome()

    /** 429: the plan's bucket is empty. Wait [retryAfterSeconds], then send the newest window only. */
    data class RateLimited(val retryAfterSeconds: Long) : HeartbeatOutcome()

    /** 401 `token_expired`: refresh once (`POST /v1/auth/refresh`) and retry. */
    data object TokenExpired : HeartbeatOutcome()

    /** 401 `invalid_token` (or an unknown 401): missing, forged, signed out. Sign in again. */
    data object InvalidToken : HeartbeatOutcome()

    /** 401 `device_revoked`: the device's sessions were revoked. Sign in again. */
    data object DeviceRevoked : HeartbeatOutcome()

    /** 403 `device_locked`: the kill-switch locked the device. Show the lock screen; do not retry. */
    data object DeviceLocked : HeartbeatOutcome()

    /** 403 `account_blocked`: the user is blocked on every device. Stop; the user contacts the bank. */
    data object AccountBlocked : HeartbeatOutcome()

    /**
     * A client bug: 422 `validation_failed` ([field] names the value, e.g. `accelerometer[3]`),
     * 400, 413, 415, 401 `device_mismatch` (send `X-Device-Id` on every call), a 409 other than
     * `replay`. Log it and drop the heartbeat; its `seq` was not spent.
     */
    data class Invalid(val status: Int, val code: String?, val field: String?, val detail: String?) :
        HeartbeatOutcome()

    /**
     * The server could not take it. [retrySame] (503, e.g. `queue_full`: its `seq` was given back):
     * retry the same heartbeat after 1–2 s with jitter. Otherwise (500, other statuses) drop it.
     */
    data class ServerError(val status: Int, val code: String?, val retryAfterSeconds: Long?) : HeartbeatOutcome() {
        val retrySame: Boolean get() = status == 503
    }

    /** No answer (offline, DNS, timeout, TLS). Drop the window: old windows are not queued. */
    data class Unreachable(val reason: String) : HeartbeatOutcome()

    companion object {
        /**
         * The outcome of [result], the answer to a heartbeat sent with [sentSeq].
         *
         * Fallbacks, each chosen to fail safe: a 202 whose body does not parse is taken as
         * accepting [sentSeq]; a `replay` without `last_seq` as [sentSeq] (what the server itself
         * falls back to); a 429 without a usable `Retry-After` as 1 s; an unknown 401 as
         * [InvalidToken]. An unexplained 403 (no BlockRemote `code`, e.g. from a proxy) is a
         * [ServerError], not a lock: the kill-switch socket's state is the authority on locks.
         */
        fun classify(result: HttpResult, sentSeq: Long, nowEpochMs: Long = System.currentTimeMillis()): HeartbeatOutcome {
            val body = JsonReader.parseOrNull(result.body) as? Map<*, *>
            val code = body?.get("code") as? String
            val retryAfter = parseRetryAfter(result.header("Retry-After"), nowEpochMs)
            return when (result.status) {
                in 200..299 -> Accepted(
                    seq = (body?.get("seq") as? Long) ?: sentSeq,
                    degraded = body?.get("degraded") == true,
                    rateLimitRemaining = result.header("RateLimit-Remaining")?.trim()?.toLongOrNull(),
                )
                409 -> if (body != null && code == "replay") {
                    Replay((body["last_seq"] as? Long) ?: sentSeq)
                } else {
                    invalid(result.status, code, body)
                }
                429 -> RateLimited(retryAfter ?: 1)
                401 -> when (code) {
                    "token_expired" -> TokenExpired
                    "device_revoked" -> DeviceRevoked
                    "device_mismatch" -> invalid(result.status, code, body)
                    else -> InvalidToken
                }
                403 -> when (code) {
                    "device_locked" -> DeviceLocked
                    "account_blocked" -> AccountBlocked
                    else -> ServerError(result.status, code, retryAfter)
                }
                400, 404, 405, 413, 415, 422 -> invalid(result.status, code, body)
                else -> ServerError(result.status, code, retryAfter)
            }
        }

        private fun invalid(status: Int, code: String?, body: Map<*, *>?) =
            Invalid(status, code, body?.get("field") as? String, body?.get("detail") as? String)

        /**
         * `Retry-After` in whole seconds, clamped to 1–3600: delta-seconds, or an HTTP-date
         * (RFC 9110 section 10.2.3) counted from [nowEpochMs]; null when absent or unreadable.
         */
        fun parseRetryAfter(value: String?, nowEpochMs: Long): Long? {
            val v = value?.trim()?.takeIf { it.isNotEmpty() } ?: return null
            val seconds = v.toLongOrNull() ?: try {
                val at = ZonedDateTime.parse(v, DateTimeFormatter.RFC_1123_DATE_TIME).toInstant().toEpochMilli()
                (at - nowEpochMs + 999) / 1000
            } catch (e: java.time.DateTimeException) {
                return null
            }
            return seconds.coerceIn(1, 3600)
        }
    }
}
