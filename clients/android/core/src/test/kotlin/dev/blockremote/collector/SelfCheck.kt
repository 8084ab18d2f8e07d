package dev.blockremote.collector

import java.io.IOException
import java.net.HttpURLConnection
import java.net.URL
import kotlin.system.exitProcess

/*
 * The JVM self-check of the Kotlin core: a plain `main`, no test framework, so that
 * clients/check-kotlin.sh needs nothing but kotlinc and java.
 *
 * Offline part: unit conversion, the window clock, caps, the JSON body (exact text and parsed
 * back), the classification of every status/code, and the sender and loop policy against a
 * scripted fake server.
 *
 * Live part, when BLOCKREMOTE_URL, BLOCKREMOTE_TOKEN and BLOCKREMOTE_DEVICE_ID are set: one real
 * heartbeat with seq BLOCKREMOTE_SEQ (default 1) must get 202, the same seq again must be a
 * Replay naming it, and the next seq must be accepted; a forged token, a wrong X-Device-Id and a
 * 257-sample body must be classified as the server answers them.
 *
 * Prints one line per check and ends with "N passed, N failed"; exits 1 on any failure.
 */

private var passed = 0
private var failed = 0

private fun check(name: String, ok: Boolean, detail: () -> String = { "" }) {
    if (ok) {
        passed++
        println("ok    $name")
    } else {
        failed++
        println("FAIL  $name ${detail()}")
    }
}

private fun <T> expect(name: String, expected: T, actual: T) =
    check(name, expected == actual) { "\n      expected: $expected\n      actual:   $actual" }

private fun expectThrows(name: String, block: () -> Unit) {
    val thrown = try {
        block(); false
    } catch (e: Exception) {
        true
    }
    check(name, thrown) { "(nothing was thrown)" }
}

private const val MS = 1_000_000L

fun main() {
    units()
    windowClock()
    caps()
    screenGeometry()
    json()
    classification()
    networkMeter()
    senderAndLoop()
    live()
    println()
    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}

private fun units() {
    expect("CoreMotion face up (z = -1 g) is +9.80665 m/s²", 9.80665, Units.coreMotionToServer(-1.0))
    expect("CoreMotion +0.5 g is -4.903325 m/s²", -4.903325, Units.coreMotionToServer(0.5))
    val w = HeartbeatWindow(startNanos = 0)
    w.addAccelerometerInG(0, 0.0, 0.0, -1.0)
    w.addAccelerometer(20 * MS, 0.1, 0.2, 9.81)
    val s = w.close(2000 * MS).accelerometer
    expect("addAccelerometerInG converts g with the sign flip", Sample(0.0, -0.0, -0.0, 9.80665), s[0])
    expect("addAccelerometer keeps m/s² as they are", Sample(20.0, 0.1, 0.2, 9.81), s[1])
}

private fun windowClock() {
    val start = 5_000_000_000L // any point of the monotonic clock
    val w = HeartbeatWindow(start)
    check("a sample before the window start is refused", !w.addAccelerometer(start - 1, 0.0, 0.0, 9.8))
    w.addAccelerometer(start, 0.0, 0.0, 9.8)
    w.addAccelerometer(start + 20 * MS, 0.0, 0.0, 9.8)
    w.addAccelerometer(start + 40_500_000, 0.0, 0.0, 9.8)
    w.addAccelerometer(start + 30 * MS, 0.0, 0.0, 9.8) // runs backwards
    check("a sample 60 s after the start is kept", w.addGyroscope(start + 60_000 * MS, 0.0, 0.0, 0.0))
    check("a sample past 60 s is refused", !w.addGyroscope(start + 60_000 * MS + 1, 0.0, 0.0, 0.0))
    w.addTouch(start + 120 * MS, 0.4, 0.7, 0.6, 0.03, TouchAction.DOWN)
    w.addTouch(start + 100 * MS, 0.4, 0.7, 0.6, 0.03, TouchAction.UP) // runs backwards
    val d = w.close(start + 2000 * MS)
    expect("t_ms is relative to the window start", listOf(0.0, 20.0, 40.5, 40.5), d.accelerometer.map { it.tMs })
    check("t_ms never decreases", d.accelerometer.zipWithNext().all { (a, b) -> b.tMs >= a.tMs })
    expect("touch t is on the same window clock and never decreases", listOf(120.0, 120.0), d.touches.map { it.tMs })
    expect("the window's duration", 2000.0, d.durationMs)
    expect("refused events are counted", 2, d.dropped)
    check("a closed window takes nothing", !w.addAccelerometer(start + 50 * MS, 0.0, 0.0, 9.8))
}

private fun caps() {
    val w = HeartbeatWindow(0)
    repeat(300) { w.addAccelerometer(it * 5 * MS, 0.0, 0.0, 9.8) }
    repeat(256) { w.addGyroscope(it * 5 * MS, 0.0, 0.0, 0.0) }
    // 40 moves, 50 ms apart: 32 kept (half the touch cap), then downs and ups still fit.
    repeat(40) { w.addTouch((it * 50L) * MS, 0.5, 0.5, 1.0, 0.1, TouchAction.MOVE) }
    repeat(40) { w.addTouch((2000L + it) * MS, 0.5, 0.5, 1.0, 0.1, if (it % 2 == 0) TouchAction.DOWN else TouchAction.UP) }
    w.addTouch(2100 * MS, 1.2, -0.1, 12.0, 3.0, TouchAction.DOWN)
    val d = w.close(3000 * MS)
    expect("at most 256 accelerometer samples", 256, d.accelerometer.size)
    expect("the first 256 are kept", 255 * 5.0, d.accelerometer.last().tMs)
    expect("at most 256 gyroscope samples", 256, d.gyroscope.size)
    expect("at most 64 touches", 64, d.touches.size)
    expect("at most 32 of them moves", 32, d.touches.count { it.action == TouchAction.MOVE })
    expect("drops counted (44 samples + 8 moves + 9 touches)", 61, d.dropped)

    val c = HeartbeatWindow(0)
    check("NaN is refused", !c.addGyroscope(0, Double.NaN, 0.0, 0.0))
    c.addAccelerometer(0, 200.0, -200.0, 1.0)
    c.addGyroscope(0, 40.0, -40.0, 1.0)
    c.addTouch(0, 1.2, -0.1, 12.0, 3.0, TouchAction.DOWN)
    c.addTouch(10 * MS, 0.5, 0.5, 0.5, 0.5, TouchAction.MOVE) // 10 ms after: skipped, not dropped
    val e = c.close(100 * MS)
    expect("acceleration clamped to ±160", Sample(0.0, 160.0, -160.0, 1.0), e.accelerometer[0])
    expect("rotation clamped to ±35", Sample(0.0, 35.0, -35.0, 1.0), e.gyroscope[0])
    expect("touch fields clamped into range", Touch(0.0, 1.0, 0.0, 10.0, 1.0, TouchAction.DOWN), e.touches.single())
    expect("only the NaN counts as dropped: a move within 40 ms of the last touch is skipped", 1, e.dropped)
}

private fun screenGeometry() {
    // A 1080 x 2400 portrait phone turned to landscape: the current screen is 2400 x 1080.
    expect("rotation 0: raw / size", Pair(0.25, 0.5), ScreenGeometry.toNatural(270.0, 1200.0, 1080.0, 2400.0, 0))
    // Turned counter-clockwise (ROTATION_90): the natural top-left corner is at the bottom-left.
    expect("rotation 90: natural top-left", Pair(0.0, 0.0), ScreenGeometry.toNatural(0.0, 1080.0, 2400.0, 1080.0, 1))
    expect("rotation 90: natural top-right", Pair(1.0, 0.0), ScreenGeometry.toNatural(0.0, 0.0, 2400.0, 1080.0, 1))
    expect("rotation 180", Pair(0.75, 0.25), ScreenGeometry.toNatural(270.0, 1800.0, 1080.0, 2400.0, 2))
    // Turned clockwise (ROTATION_270): the natural top-left corner is at the top-right.
    expect("rotation 270: natural top-left", Pair(0.0, 0.0), ScreenGeometry.toNatural(2400.0, 0.0, 2400.0, 1080.0, 3))
}

private val EXAMPLE_WINDOW = WindowData(
    accelerometer = listOf(Sample(0.0, 0.12, 9.78, 0.31), Sample(20.0, 0.10, 9.80, 0.29)),
    gyroscope = listOf(Sample(0.0, 0.001, -0.002, 0.0005)),
    touches = listOf(Touch(120.0, 0.41, 0.77, 0.62, 0.031, TouchAction.DOWN)),
    durationMs = 2000.0,
    dropped = 0,
)
private const val EXAMPLE_SENT_AT = 1_795_348_800_000L // 2026-11-22T12:00:00.000Z

private fun json() {
    val hb = Heartbeat(
        42, EXAMPLE_SENT_AT, EXAMPLE_WINDOW, Network(1200, 5600, 2000),
        DeviceContext(installer = "com.android.vending"),
    )
    val expected = """{"seq":42,"sent_at":"2026-11-22T12:00:00.000Z",""" +
        """"accelerometer":[[0,0.12,9.78,0.31],[20,0.1,9.8,0.29]],"gyroscope":[[0,0.001,-0.002,0.0005]],""" +
        """"touches":[{"t":120,"x":0.41,"y":0.77,"pressure":0.62,"size":0.031,"action":"down"}],""" +
        """"network":{"tx_bytes":1200,"rx_bytes":5600,"interval_ms":2000},""" +
        """"context":{"screen_capture":false,"accessibility_services":[],"installer":"com.android.vending",""" +
        """"app_hashes":[],"dns":[]}}"""
    val text = hb.toJson()
    expect("the API.md example heartbeat, byte for byte", expected, text)

    val back = JsonReader.parse(text) as Map<*, *>
    expect("parsed back: seq", 42L, back["seq"])
    expect("parsed back: sent_at", "2026-11-22T12:00:00.000Z", back["sent_at"])
    expect("parsed back: accelerometer", listOf(listOf(0L, 0.12, 9.78, 0.31), listOf(20L, 0.1, 9.8, 0.29)), back["accelerometer"])
    expect("parsed back: touch action", "down", ((back["touches"] as List<*>)[0] as Map<*, *>)["action"])
    expect("parsed back: network", mapOf("tx_bytes" to 1200L, "rx_bytes" to 5600L, "interval_ms" to 2000L), back["network"])
    expect("parsed back: installer", "com.android.vending", (back["context"] as Map<*, *>)["installer"])

    val bare = Heartbeat(1, 0, WindowData(emptyList(), emptyList(), emptyList(), 0.0, 0), null, DeviceContext()).toJson()
    expect(
        "no network and no installer: both left out",
        """{"seq":1,"sent_at":"1970-01-01T00:00:00.000Z","accelerometer":[],"gyroscope":[],"touches":[],""" +
            """"context":{"screen_capture":false,"accessibility_services":[],"app_hashes":[],"dns":[]}}""",
        bare,
    )

    expect("numbers: 1e-5 in plain notation", "0.00001", JsonWriter.number(1e-5, 6))
    expect("numbers: rounded to the given decimals", "0.000001", JsonWriter.number(7e-7, 6))
    expect("numbers: -0 is 0", "0", JsonWriter.number(-0.0, 6))
    expect("numbers: tiny negative rounds to 0", "0", JsonWriter.number(-1e-9, 6))
    expect("numbers: integral values without a fraction", "100", JsonWriter.number(100.0, 6))
    expect("numbers: t to the microsecond", "40.5", JsonWriter.number(40.5, 3))
    expect("numbers: negative", "-9.80665", JsonWriter.number(-9.80665, 6))
    expectThrows("numbers: NaN refused") { JsonWriter.number(Double.NaN, 6) }
    expectThrows("numbers: infinity refused") { JsonWriter.number(Double.POSITIVE_INFINITY, 6) }

    val nasty = "a\"b\\c\n\t\u0001\u2028é😀\uD800z"
    val escaped = JsonWriter().value(nasty).toString()
    expect("strings: escaped", "\"a\\\"b\\\\c\\n\\t\\u0001\\u2028é😀\uFFFDz\"", escaped)
    expect("strings: read back (the lone surrogate replaced)", "a\"b\\c\n\t\u0001\u2028é😀\uFFFDz", JsonReader.parse(escaped))

    val ctx = DeviceContext(
        accessibilityServices = listOf("com.a/.S", "", "com.a/.S", "x".repeat(256)),
        installer = "y".repeat(256),
        appHashes = List(70) { "AB%02d".format(it) },
        dns = listOf("API.Example.com.", "api.example.com"),
    ).sanitized()
    expect("context: empty, over-long and repeated entries dropped", listOf("com.a/.S"), ctx.accessibilityServices)
    expect("context: an over-long installer is left out", null, ctx.installer)
    expect("context: at most 64 app hashes, lower-case", Pair(64, "ab00"), Pair(ctx.appHashes.size, ctx.appHashes[0]))
    expect("context: dns names normalised and deduplicated", listOf("api.example.com"), ctx.dns)

    expectThrows("reader: trailing characters refused") { JsonReader.parse("{} x") }
    expectThrows("reader: duplicate members refused") { JsonReader.parse("""{"a":1,"a":2}""") }
    expectThrows("reader: bare control character refused") { JsonReader.parse("\"\u0001\"") }
    expect("reader: nested values", mapOf("a" to listOf(1L, -2.5, true, null, "x")), JsonReader.parse("""{"a":[1,-2.5e0,true,null,"x"]}"""))
}

private fun problem(status: Int, code: String, extra: String = "") =
    """{"type":"https://blockremote.dev/problems/$code","title":"t","status":$status,"detail":"d","code":"$code"$extra,"request_id":"r"}"""

private fun res(status: Int, body: String = "", vararg headers: Pair<String, String>) =
    HttpResult(status, headers.associate { (k, v) -> k.lowercase() to v }, body)

private fun classification() {
    val now = 1_795_348_800_000L
    fun c(r: HttpResult, seq: Long = 42) = HeartbeatOutcome.classify(r, seq, now)
    expect("202 accepted", HeartbeatOutcome.Accepted(42, false, 119), c(res(202, """{"accepted":true,"seq":42}""", "RateLimit-Remaining" to "119")))
    expect("202 degraded", HeartbeatOutcome.Accepted(42, true, null), c(res(202, """{"accepted":true,"seq":42,"degraded":true}""")))
    expect("202 with an unreadable body: the sent seq", HeartbeatOutcome.Accepted(7), c(res(202, "oops"), 7))
    expect("409 replay with last_seq", HeartbeatOutcome.Replay(57), c(res(409, problem(409, "replay", ""","last_seq":57"""))))
    expect("409 replay without last_seq: the sent seq", HeartbeatOutcome.Replay(42), c(res(409, problem(409, "replay"))))
    expect("409 other than replay: a client bug", HeartbeatOutcome.Invalid(409, "device_in_use", null, "d"), c(res(409, problem(409, "device_in_use"))))
    expect("429 with Retry-After seconds", HeartbeatOutcome.RateLimited(7), c(res(429, problem(429, "rate_limited"), "Retry-After" to "7")))
    expect("429 with an HTTP-date Retry-After", HeartbeatOutcome.RateLimited(30), c(res(429, "", "Retry-After" to "Sun, 22 Nov 2026 12:00:30 GMT")))
    expect("429 without Retry-After: 1 s", HeartbeatOutcome.RateLimited(1), c(res(429, problem(429, "rate_limited"))))
    expect("401 token_expired", HeartbeatOutcome.TokenExpired, c(res(401, problem(401, "token_expired"))))
    expect("401 invalid_token", HeartbeatOutcome.InvalidToken, c(res(401, problem(401, "invalid_token"))))
    expect("401 device_revoked", HeartbeatOutcome.DeviceRevoked, c(res(401, problem(401, "device_revoked"))))
    expect("401 device_mismatch: a client bug", HeartbeatOutcome.Invalid(401, "device_mismatch", null, "d"), c(res(401, problem(401, "device_mismatch"))))
    expect("401 without a body: sign in again", HeartbeatOutcome.InvalidToken, c(res(401)))
    expect("403 device_locked", HeartbeatOutcome.DeviceLocked, c(res(403, problem(403, "device_locked"))))
    expect("403 account_blocked", HeartbeatOutcome.AccountBlocked, c(res(403, problem(403, "account_blocked"))))
    expect("403 from something else is not a lock", HeartbeatOutcome.ServerError(403, null, null), c(res(403, "<html>proxy</html>")))
    expect(
        "422 validation_failed names the field",
        HeartbeatOutcome.Invalid(422, "validation_failed", "accelerometer[3]", "d"),
        c(res(422, problem(422, "validation_failed", ""","field":"accelerometer[3]""""))),
    )
    expect("400 invalid_body", HeartbeatOutcome.Invalid(400, "invalid_body", null, "d"), c(res(400, problem(400, "invalid_body"))))
    expect("413 payload_too_large", HeartbeatOutcome.Invalid(413, "payload_too_large", null, "d"), c(res(413, problem(413, "payload_too_large"))))
    val queueFull = c(res(503, problem(503, "queue_full")))
    expect("503 queue_full", HeartbeatOutcome.ServerError(503, "queue_full", null), queueFull)
    check("503 is retried with the same heartbeat", (queueFull as HeartbeatOutcome.ServerError).retrySame)
    val internal = c(res(500, problem(500, "internal_error")))
    check("500 is not retried", internal is HeartbeatOutcome.ServerError && !internal.retrySame) { "$internal" }
}

private fun networkMeter() {
    val m = NetworkMeter()
    expect("network: no delta from the first reading", null, m.read(1000, 5000, 10_000))
    expect("network: deltas and interval", Network(200, 800, 2000), m.read(1200, 5800, 12_000))
    expect("network: a counter that went back gives no network", null, m.read(100, 5900, 14_000))
    expect("network: unsupported (-1) gives no network", null, m.read(-1, -1, 16_000))
    val wrap = NetworkMeter(counterBits = 32)
    wrap.read(4_294_967_000, 10, 0)
    expect("network: a 32-bit counter wraps", Network(396, 5, 2000), wrap.read(100, 15, 2000))
}

/** A fake server: answers from a script and keeps what it was sent. */
private class ScriptedTransport(vararg answers: Any) : HttpTransport {
    val script = ArrayDeque(answers.toList())
    val requests = ArrayList<Pair<Map<String, String>, Map<*, *>>>()
    override fun post(url: String, headers: Map<String, String>, body: ByteArray): HttpResult {
        requests.add(headers to (JsonReader.parse(body.toString(Charsets.UTF_8)) as Map<*, *>))
        return when (val a = script.removeFirst()) {
            is HttpResult -> a
            is IOException -> throw a
            else -> error("bad script entry $a")
        }
    }
    fun seqs() = requests.map { it.second["seq"] }
}

private class FakeTokens(var refreshWorks: Boolean = true) : TokenSource {
    var refreshes = 0
    var token = "t0"
    override fun accessToken() = token
    override fun refresh(): Boolean {
        refreshes++
        if (refreshWorks) token = "t$refreshes"
        return refreshWorks
    }
}

private class FakeClock(var now: Long = 0) : MonotonicClock {
    override fun nanos() = now
}

private class RecordingListener : HeartbeatListener {
    var locked = 0
    val signIn = ArrayList<HeartbeatOutcome>()
    override fun onDeviceLocked() { locked++ }
    override fun onSignInRequired(outcome: HeartbeatOutcome) { signIn.add(outcome) }
}

private val NO_SIGNALS = object : WindowSignals {
    override fun network(): Network? = null
    override fun context() = DeviceContext()
}

private fun accepted(seq: Long) = res(202, """{"accepted":true,"seq":$seq}""")

private fun senderAndLoop() {
    val empty = WindowData(emptyList(), emptyList(), emptyList(), 2000.0, 0)

    // seq, headers, replay jump.
    run {
        val store = InMemorySeqStore()
        val t = ScriptedTransport(accepted(1), accepted(2), res(409, problem(409, "replay", ""","last_seq":10""")), accepted(11))
        val s = HeartbeatSender("http://server/", "dev_12345678", FakeTokens(), store, t) { EXAMPLE_SENT_AT }
        repeat(4) { s.send(empty, null, DeviceContext()) }
        expect("sender: seq starts at 1, +1 per accepted, jumps past a replay's last_seq", listOf(1L, 2L, 3L, 11L), t.seqs())
        expect("sender: the store holds the last accepted seq", 11L, store.lastSeq())
        val h = t.requests[0].first
        expect("sender: Authorization and X-Device-Id on every call", Pair("Bearer t0", "dev_12345678"), Pair(h["Authorization"], h["X-Device-Id"]))
        expect("sender: sent_at is RFC 3339 UTC with ms", "2026-11-22T12:00:00.000Z", t.requests[0].second["sent_at"])
    }

    // token_expired → one refresh, same seq again.
    run {
        val tokens = FakeTokens()
        val t = ScriptedTransport(res(401, problem(401, "token_expired")), accepted(1))
        val s = HeartbeatSender("http://server", "dev_12345678", tokens, InMemorySeqStore(), t)
        val o = s.send(empty, null, DeviceContext())
        expect("sender: token_expired → refresh once → accepted", HeartbeatOutcome.Accepted(1), o)
        expect("sender: retried with the same seq and the new token", Pair(listOf(1L, 1L), "Bearer t1"), Pair(t.seqs(), t.requests[1].first["Authorization"]))
        expect("sender: exactly one refresh", 1, tokens.refreshes)
    }

    // token_expired twice → sign in again; the loop stops.
    run {
        val tokens = FakeTokens()
        val t = ScriptedTransport(res(401, problem(401, "token_expired")), res(401, problem(401, "token_expired")))
        val l = RecordingListener()
        val loop = HeartbeatLoop(FakeClock(), HeartbeatSender("http://s", "dev_12345678", tokens, InMemorySeqStore(), t), NO_SIGNALS, l)
        expect("loop: token_expired after a refresh → InvalidToken", HeartbeatOutcome.InvalidToken, loop.tick())
        expect("loop: one refresh only, sign-in asked for", Pair(1, listOf<HeartbeatOutcome>(HeartbeatOutcome.InvalidToken)), Pair(tokens.refreshes, l.signIn))
        expect("loop: stopped after sign-in is required", null, loop.tick())
    }

    // A failed refresh → InvalidToken without a second post.
    run {
        val t = ScriptedTransport(res(401, problem(401, "token_expired")))
        val s = HeartbeatSender("http://s", "dev_12345678", FakeTokens(refreshWorks = false), InMemorySeqStore(), t)
        expect("sender: refresh refused → InvalidToken", HeartbeatOutcome.InvalidToken, s.send(empty, null, DeviceContext()))
        expect("sender: nothing posted after a refused refresh", 1, t.requests.size)
    }

    // 429: windows dropped until Retry-After has passed, then the newest one is sent.
    run {
        val clock = FakeClock(0)
        val store = InMemorySeqStore(4)
        val t = ScriptedTransport(res(429, problem(429, "rate_limited"), "Retry-After" to "3"), accepted(5))
        val loop = HeartbeatLoop(clock, HeartbeatSender("http://s", "dev_12345678", FakeTokens(), store, t), NO_SIGNALS)
        clock.now = 2000 * MS
        expect("loop: 429 → RateLimited", HeartbeatOutcome.RateLimited(3), loop.tick())
        clock.now = 4000 * MS
        expect("loop: nothing sent during Retry-After", null, loop.tick())
        loop.window().addAccelerometer(5000 * MS, 0.0, 0.0, 9.8)
        clock.now = 6000 * MS
        expect("loop: sent again once Retry-After has passed", HeartbeatOutcome.Accepted(5), loop.tick())
        expect("loop: the 429'd seq was not spent", listOf(5L, 5L), t.seqs())
        val sent = t.requests[1].second["accelerometer"] as List<*>
        expect("loop: the newest window is the one sent, t relative to its start", listOf(listOf(1000L, 0L, 0L, 9.8)), sent)
    }

    // 503: the same heartbeat once more after 1–2 s.
    run {
        val sleeps = ArrayList<Long>()
        val t = ScriptedTransport(res(503, problem(503, "queue_full")), accepted(1))
        val loop = HeartbeatLoop(FakeClock(), HeartbeatSender("http://s", "dev_12345678", FakeTokens(), InMemorySeqStore(), t), NO_SIGNALS, sleepMs = { sleeps.add(it) })
        expect("loop: 503 → retried → accepted", HeartbeatOutcome.Accepted(1), loop.tick())
        check("loop: waited 1–2 s before the retry", sleeps.size == 1 && sleeps[0] in 1000..1999) { "$sleeps" }
        expect("loop: the retry has the same seq", listOf(1L, 1L), t.seqs())
    }

    // No answer: dropped, seq not spent.
    run {
        val store = InMemorySeqStore()
        val t = ScriptedTransport(IOException("offline"), accepted(1))
        val loop = HeartbeatLoop(FakeClock(), HeartbeatSender("http://s", "dev_12345678", FakeTokens(), store, t), NO_SIGNALS)
        check("loop: offline → Unreachable", loop.tick() is HeartbeatOutcome.Unreachable)
        loop.tick()
        expect("loop: the offline window is dropped, its seq reused", listOf(1L, 1L), t.seqs())
    }

    // 403 device_locked: stop, lock screen, nothing more sent.
    run {
        val l = RecordingListener()
        val t = ScriptedTransport(res(403, problem(403, "device_locked")), accepted(1))
        val loop = HeartbeatLoop(FakeClock(), HeartbeatSender("http://s", "dev_12345678", FakeTokens(), InMemorySeqStore(), t), NO_SIGNALS, l)
        expect("loop: device_locked", HeartbeatOutcome.DeviceLocked, loop.tick())
        loop.tick()
        loop.resume() // back to the foreground: still locked
        loop.tick()
        expect("loop: lock screen shown once, nothing more sent", Pair(1, 1), Pair(l.locked, t.requests.size))
        loop.restart() // the kill-switch said UNLOCK
        expect("loop: sends again after restart()", HeartbeatOutcome.Accepted(1), loop.tick())
    }
}

// ---- Live -------------------------------------------------------------------------------------

private fun live() {
    val url = System.getenv("BLOCKREMOTE_URL")
    val token = System.getenv("BLOCKREMOTE_TOKEN")
    val deviceId = System.getenv("BLOCKREMOTE_DEVICE_ID")
    if (url.isNullOrEmpty() || token.isNullOrEmpty() || deviceId.isNullOrEmpty()) {
        println("--    live part skipped (set BLOCKREMOTE_URL, BLOCKREMOTE_TOKEN, BLOCKREMOTE_DEVICE_ID)")
        return
    }
    val seq = System.getenv("BLOCKREMOTE_SEQ")?.toLongOrNull() ?: 1L
    println("--    live: $url, device $deviceId, seq $seq")
    val tokens = object : TokenSource {
        override fun accessToken() = token
        override fun refresh() = false
    }
    val store = InMemorySeqStore(seq - 1)
    val sender = HeartbeatSender(url, deviceId, tokens, store)
    // Every accepted heartbeat carries fresh motion: a window sent twice is a replayed window, a
    // hard fact that locks the device at once (docs/DETECTION.md). A 409 replay is never scored,
    // so the same window may go with the repeated seq.
    val window = phoneOnATable(seed = seq)
    val network = Network(1200, 5600, 2000)
    val context = DeviceContext(installer = "com.android.vending")

    val first = sender.send(window, network, context)
    check("live: 202 for seq $seq", first is HeartbeatOutcome.Accepted && first.seq == seq) { "$first" }
    check("live: 202 carries RateLimit-Remaining", (first as? HeartbeatOutcome.Accepted)?.rateLimitRemaining != null) { "$first" }

    store.setLastSeq(seq - 1) // as a restart that lost the counter would
    expect("live: the same seq again is a Replay naming it", HeartbeatOutcome.Replay(seq), sender.send(window, network, context))
    expect("live: the store jumped past last_seq", seq, store.lastSeq())
    val next = sender.send(phoneOnATable(seed = seq + 1), network, context)
    check("live: the next seq (${seq + 1}) is accepted", next is HeartbeatOutcome.Accepted && next.seq == seq + 1) { "$next" }

    val forged = object : TokenSource {
        override fun accessToken() = token.substringBeforeLast('.') + "." + "A".repeat(86)
        override fun refresh() = false
    }
    expect(
        "live: a forged token is InvalidToken",
        HeartbeatOutcome.InvalidToken,
        HeartbeatSender(url, deviceId, forged, InMemorySeqStore(seq + 1)).send(window, network, context),
    )
    val mismatch = HeartbeatSender(url, "dev_not_this_one", tokens, InMemorySeqStore(seq + 1)).send(window, network, context)
    check("live: a wrong X-Device-Id is Invalid(device_mismatch)", mismatch is HeartbeatOutcome.Invalid && mismatch.code == "device_mismatch") { "$mismatch" }

    // A body the window would never build (257 samples), posted raw, to see the 422 classified.
    val oversized = Heartbeat(
        seq + 2, System.currentTimeMillis(),
        window.copy(accelerometer = List(257) { Sample(it.toDouble(), 0.0, 0.0, 9.8) }), null, DeviceContext(),
    ).toJson().toByteArray()
    val raw = UrlConnectionTransport().post(
        url.trimEnd('/') + "/v1/signals/heartbeat",
        mapOf("Authorization" to "Bearer $token", "X-Device-Id" to deviceId, "Content-Type" to "application/json"),
        oversized,
    )
    expect(
        "live: 257 samples is Invalid(validation_failed, accelerometer)",
        Pair("validation_failed", "accelerometer"),
        (HeartbeatOutcome.classify(raw, seq + 2) as? HeartbeatOutcome.Invalid)?.let { Pair(it.code, it.field) },
    )

    // The accepted heartbeats were scored: the trust report's last_seq reaches seq + 1.
    var lastScored: Long? = null
    val deadline = System.nanoTime() + 10_000 * MS
    while (System.nanoTime() < deadline) {
        val report = JsonReader.parseOrNull(get(url.trimEnd('/') + "/v1/security/trust-score", token, deviceId)) as? Map<*, *>
        lastScored = report?.get("last_seq") as? Long
        if (lastScored != null && lastScored >= seq + 1) break
        Thread.sleep(200)
    }
    check("live: the trust report's last_seq reached ${seq + 1}", lastScored != null && lastScored >= seq + 1) { "last_seq $lastScored" }

    // 403 device_locked, when the check may lock this (throw-away) device through the admin API.
    val admin = System.getenv("BLOCKREMOTE_SELFCHECK_ADMIN_TOKEN")
    if (admin.isNullOrEmpty()) {
        println("--    live lock check skipped (set BLOCKREMOTE_SELFCHECK_ADMIN_TOKEN to let it lock the device)")
        return
    }
    val lock = UrlConnectionTransport().post(
        url.trimEnd('/') + "/v1/admin/devices/$deviceId/lock",
        mapOf("Authorization" to "Bearer $admin", "Content-Type" to "application/json"),
        """{"action":"CRITICAL_LOCK","reason":"check_kotlin_selfcheck"}""".toByteArray(),
    )
    check("live: the admin API locked the device", lock.status in 200..299) { "${lock.status} ${lock.body}" }
    expect("live: a heartbeat from a locked device is DeviceLocked", HeartbeatOutcome.DeviceLocked, sender.send(phoneOnATable(seed = seq + 3), network, context))
}

/** 100 samples per sensor at 50 Hz of a phone lying face up (noise from [seed]), and one tap. */
private fun phoneOnATable(seed: Long): WindowData {
    val w = HeartbeatWindow(0)
    val r = java.util.Random(seed)
    for (i in 0 until 100) {
        val t = i * 20 * MS
        w.addAccelerometer(t, 0.02 * r.nextGaussian(), 0.02 * r.nextGaussian(), 9.81 + 0.02 * r.nextGaussian())
        w.addGyroscope(t, 0.002 * r.nextGaussian(), 0.002 * r.nextGaussian(), 0.002 * r.nextGaussian())
    }
    w.addTouch(500 * MS, 0.41, 0.77, 0.62, 0.031, TouchAction.DOWN)
    w.addTouch(580 * MS, 0.41, 0.77, 0.60, 0.031, TouchAction.UP)
    return w.close(2000 * MS)
}

private fun get(url: String, token: String, deviceId: String): String? {
    val c = URL(url).openConnection() as HttpURLConnection
    return try {
        c.setRequestProperty("Authorization", "Bearer $token")
        c.setRequestProperty("X-Device-Id", deviceId)
        c.connectTimeout = 5000
        c.readTimeout = 5000
        if (c.responseCode == 200) c.inputStream.use { it.readBytes().toString(Charsets.UTF_8) } else null
    } catch (e: IOException) {
        null
    } finally {
        c.disconnect()
    }
}
