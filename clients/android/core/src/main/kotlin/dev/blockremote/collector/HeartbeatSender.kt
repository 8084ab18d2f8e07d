package dev.blockremote.collector

import java.io.IOException
import java.net.HttpURLConnection
import java.net.URL

/**
 * Where `seq` lives between heartbeats and across process restarts.
 *
 * It holds the last `seq` the server accepted (or told us about in a `replay`); the next heartbeat
 * carries that + 1. Persist it *with the session* (Android: the session's `SharedPreferences`,
 * written with `commit()`; iOS: beside the tokens) and set it to 0 when a new session starts
 * (sign-in, reinstall), because the server starts each session at 1. If it is ever lost or stale,
 * the server's 409 `replay` carries `last_seq` and the sender jumps past it: one heartbeat lost.
 */
interface SeqStore {
    /** The last `seq` spent; 0 for a new session. */
    fun lastSeq(): Long

    fun setLastSeq(seq: Long)
}

/** A [SeqStore] that forgets on restart: for tests, or an app that starts a session per launch. */
class InMemorySeqStore(initial: Long = 0) : SeqStore {
    @Volatile private var seq = initial
    override fun lastSeq(): Long = seq
    override fun setLastSeq(seq: Long) { this.seq = seq }
}

/**
 * The device's access token, and the one place that refreshes it.
 *
 * Refresh tokens rotate on every use and a second use is treated as theft (the device is
 * revoked), so [refresh] must be serialised across the whole app — the heartbeat loop, the
 * kill-switch socket and every API call share one implementation — and must store the new refresh
 * token before the new access token is used.
 */
interface TokenSource {
    /** The current access token, or null when signed out. */
    fun accessToken(): String?

    /** `POST /v1/auth/refresh`; true when a new access token is now available. */
    fun refresh(): Boolean
}

/** One HTTP POST. The core's default is [UrlConnectionTransport]; an app may plug its own client. */
fun interface HttpTransport {
    /** @throws IOException when no answer arrived. */
    fun post(url: String, headers: Map<String, String>, body: ByteArray): HttpResult
}

/**
 * [HttpTransport] on `java.net.HttpURLConnection`, which exists on the JVM and on Android alike
 * (`java.net.http.HttpClient` does not exist on Android).
 *
 * The body is buffered, not streamed: a heartbeat is at most a few tens of KB (the server takes
 * 64 KiB), and a streamed POST makes the JVM's implementation throw `HttpRetryException` on a 401
 * that carries `WWW-Authenticate`, which is exactly the answer [HeartbeatOutcome.TokenExpired]
 * needs to read.
 */
class UrlConnectionTransport(
    private val connectTimeoutMs: Int = 10_000,
    private val readTimeoutMs: Int = 10_000,
) : HttpTransport {
    override fun post(url: String, headers: Map<String, String>, body: ByteArray): HttpResult {
        val c = URL(url).openConnection() as HttpURLConnection
        try {
            c.requestMethod = "POST"
            c.connectTimeout = connectTimeoutMs
            c.readTimeout = readTimeoutMs
            c.instanceFollowRedirects = false
            c.useCaches = false
            c.doOutput = true
            for ((k, v) in headers) c.setRequestProperty(k, v)
            c.outputStream.use { it.write(body) }
            val status = c.responseCode
            val stream = if (status >= 400) c.errorStream else c.inputStream
            val text = stream?.use { it.readBytes().toString(Charsets.UTF_8) } ?: ""
            val h = HashMap<String, String>()
            for ((k, v) in c.headerFields) if (k != null && v.isNotEmpty()) h[k.lowercase()] = v.last()
            return HttpResult(status, h, text)
        } finally {
            c.disconnect()
        }
    }
}

/**
 * Sends one window as one heartbeat and keeps `seq` right.
 *
 * What it does itself: picks `seq` ([SeqStore.lastSeq] + 1), stamps `sent_at`, sends with
 * `Authorization` and `X-Device-Id`, on 401 `token_expired` refreshes once and retries once with
 * the same `seq`, records the `seq` on 202, and on 409 `replay` jumps the store to `last_seq` (the
 * window is dropped, never resent). A refused heartbeat (422, 429, 503, no answer) spends no `seq`.
 *
 * What it leaves to its caller ([HeartbeatLoop]): waiting out a 429, retrying a 503 once, stopping
 * on a lock or a sign-out. It is blocking: call it off the main thread.
 */
class HeartbeatSender(
    baseUrl: String,
    private val deviceId: String,
    private val tokens: TokenSource,
    private val seqStore: SeqStore,
    private val transport: HttpTransport = UrlConnectionTransport(),
    private val wallClockMs: () -> Long = System::currentTimeMillis,
) {
    private val url = baseUrl.trimEnd('/') + "/v1/signals/heartbeat"

    /** Serialises sends, so two callers never pick the same `seq`. */
    private val lock = Any()

    fun send(window: WindowData, network: Network?, context: DeviceContext): HeartbeatOutcome = synchronized(lock) {
        val seq = seqStore.lastSeq() + 1
        var outcome = post(seq, window, network, context)
        if (outcome == HeartbeatOutcome.TokenExpired) {
            outcome = if (tokens.refresh()) post(seq, window, network, context) else HeartbeatOutcome.InvalidToken
            // A second token_expired right after a successful refresh means the clocks disagree
            // or the refresh gave an old token: refreshing again would loop, so sign in again.
            if (outcome == HeartbeatOutcome.TokenExpired) outcome = HeartbeatOutcome.InvalidToken
        }
        when (outcome) {
            is HeartbeatOutcome.Accepted -> seqStore.setLastSeq(maxOf(outcome.seq, seq))
            is HeartbeatOutcome.Replay -> seqStore.setLastSeq(maxOf(outcome.lastSeq, seqStore.lastSeq()))
            else -> {}
        }
        outcome
    }

    private fun post(seq: Long, window: WindowData, network: Network?, context: DeviceContext): HeartbeatOutcome {
        val token = tokens.accessToken() ?: return HeartbeatOutcome.InvalidToken
        val body = Heartbeat(seq, wallClockMs(), window, network, context).toJson().toByteArray(Charsets.UTF_8)
        val headers = mapOf(
            "Authorization" to "Bearer $token",
            "X-Device-Id" to deviceId,
            "Content-Type" to "application/json",
            "Accept" to "application/json, application/problem+json",
        )
        val result = try {
            transport.post(url, headers, body)
        } catch (e: IOException) {
            return HeartbeatOutcome.Unreachable(e.toString())
        }
        return HeartbeatOutcome.classify(result, seq, wallClockMs())
    }
}
