package dev.blockremote.collector

import java.time.Instant
import java.time.ZoneOffset
import java.time.format.DateTimeFormatter

/** Bytes the whole device sent and received over [intervalMs] (1–600 000). */
data class Network(val txBytes: Long, val rxBytes: Long, val intervalMs: Long)

/**
 * Turns cumulative byte counters into the per-heartbeat deltas of `network`.
 *
 * Read it once per heartbeat, whether or not that heartbeat is sent, so a delta always covers the
 * same span as the window it goes with. It gives null — send no `network` — for the first reading,
 * when a counter is unsupported, when the interval is outside what the server takes, or when a
 * counter went backwards (a reset, e.g. after an interface came back) and [counterBits] is null.
 * iOS `if_data` counters are 32-bit: pass 32 and a negative delta is taken as one wrap (add 2³²);
 * sum per-interface deltas yourself before calling if the interfaces wrap independently.
 */
class NetworkMeter(private val counterBits: Int? = null) {
    private var last: Triple<Long, Long, Long>? = null

    /** [tx], [rx] cumulative bytes (negative = unsupported), [nowMs] a monotonic clock in ms. */
    @Synchronized
    fun read(tx: Long, rx: Long, nowMs: Long): Network? {
        val previous = last
        last = if (tx < 0 || rx < 0) null else Triple(tx, rx, nowMs)
        if (previous == null || tx < 0 || rx < 0) return null
        val interval = nowMs - previous.third
        val dTx = delta(previous.first, tx) ?: return null
        val dRx = delta(previous.second, rx) ?: return null
        if (interval < 1 || interval > 600_000) return null
        return Network(dTx, dRx, interval)
    }

    private fun delta(before: Long, now: Long): Long? {
        val d = now - before
        if (d >= 0) return d
        val bits = counterBits ?: return null
        return if (bits in 1..62) d + (1L shl bits) else null
    }
}

/**
 * `context`: what the app knows about its surroundings (INTEGRATION.md section 3, "Context").
 *
 * The server takes at most 64 entries per list, each 1–255 bytes, and an installer of at most 255;
 * [sanitized] enforces that (dropping empty or over-long entries, and duplicates) rather than let
 * one odd package name cost the whole heartbeat a 422.
 */
data class DeviceContext(
    val screenCapture: Boolean = false,
    val accessibilityServices: List<String> = emptyList(),
    val installer: String? = null,
    val appHashes: List<String> = emptyList(),
    val dns: List<String> = emptyList(),
) {
    fun sanitized(): DeviceContext = DeviceContext(
        screenCapture,
        clean(accessibilityServices),
        installer?.takeIf { it.isNotEmpty() && utf8Length(it) <= MAX_ENTRY_BYTES },
        clean(appHashes.map { it.lowercase() }),
        clean(dns.map { it.lowercase().trimEnd('.') }),
    )

    companion object {
        const val MAX_ENTRIES = 64
        const val MAX_ENTRY_BYTES = 255

        private fun clean(list: List<String>): List<String> =
            list.asSequence()
                .filter { it.isNotEmpty() && utf8Length(it) <= MAX_ENTRY_BYTES }
                .distinct()
                .take(MAX_ENTRIES)
                .toList()

        private fun utf8Length(s: String) = s.toByteArray(Charsets.UTF_8).size
    }
}

/**
 * Host names the app itself resolved since the last heartbeat, for `context.dns`.
 *
 * Feed it from the HTTP client's DNS hook (OkHttp `Dns`, or the `URLSessionTaskMetrics` of iOS);
 * the heartbeat loop drains it once per window. Bounded: after 64 distinct names it keeps no more.
 */
class DnsLog {
    private val names = LinkedHashSet<String>()

    @Synchronized
    fun record(host: String) {
        if (names.size < DeviceContext.MAX_ENTRIES) names.add(host.lowercase().trimEnd('.'))
    }

    @Synchronized
    fun drain(): List<String> = names.toList().also { names.clear() }
}

/**
 * One heartbeat body (API.md "Signals and trust"): `seq`, `sent_at`, both sensors, touches,
 * `network` when known, and `context`.
 */
data class Heartbeat(
    val seq: Long,
    /** The phone's wall clock when sent, ms since the Unix epoch; written RFC 3339 UTC with ms. */
    val sentAtEpochMs: Long,
    val window: WindowData,
    val network: Network?,
    val context: DeviceContext,
) {
    /**
     * The JSON body. Precision: `t_ms` to the microsecond, axes to 10⁻⁶ (far below any phone
     * sensor's resolution, so the raw jitter the engine looks for is kept), touch fields to 10⁻⁶.
     */
    fun toJson(): String {
        val w = JsonWriter().beginObject()
        w.name("seq").value(seq)
        w.name("sent_at").value(formatSentAt(sentAtEpochMs))
        w.name("accelerometer"); samples(w, window.accelerometer)
        w.name("gyroscope"); samples(w, window.gyroscope)
        w.name("touches").beginArray()
        for (t in window.touches) {
            w.beginObject()
                .name("t").value(t.tMs, 3)
                .name("x").value(t.x, 6)
                .name("y").value(t.y, 6)
                .name("pressure").value(t.pressure, 6)
                .name("size").value(t.size, 6)
                .name("action").value(t.action.wire)
                .endObject()
        }
        w.endArray()
        if (network != null) {
            w.name("network").beginObject()
                .name("tx_bytes").value(network.txBytes)
                .name("rx_bytes").value(network.rxBytes)
                .name("interval_ms").value(network.intervalMs)
                .endObject()
        }
        val c = context.sanitized()
        w.name("context").beginObject()
        w.name("screen_capture").value(c.screenCapture)
        w.name("accessibility_services"); strings(w, c.accessibilityServices)
        if (c.installer != null) w.name("installer").value(c.installer)
        w.name("app_hashes"); strings(w, c.appHashes)
        w.name("dns"); strings(w, c.dns)
        w.endObject()
        return w.endObject().toString()
    }

    companion object {
        private val SENT_AT: DateTimeFormatter =
            DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss.SSS'Z'").withZone(ZoneOffset.UTC)

        /** RFC 3339, UTC, milliseconds: `2026-11-22T12:00:00.000Z`. */
        fun formatSentAt(epochMs: Long): String = SENT_AT.format(Instant.ofEpochMilli(epochMs))

        private fun samples(w: JsonWriter, list: List<Sample>) {
            w.beginArray()
            for (s in list) w.beginArray().value(s.tMs, 3).value(s.x, 6).value(s.y, 6).value(s.z, 6).endArray()
            w.endArray()
        }

        private fun strings(w: JsonWriter, list: List<String>) {
            w.beginArray()
            for (s in list) w.value(s)
            w.endArray()
        }
    }
}
