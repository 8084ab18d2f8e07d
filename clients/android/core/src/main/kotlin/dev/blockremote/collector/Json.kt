package dev.blockremote.collector

import java.math.BigDecimal
import java.math.RoundingMode

/**
 * A small JSON writer for heartbeat bodies.
 *
 * Why not a library: the core must run unchanged on a plain JVM and on Android with no third-party
 * dependency, and a heartbeat needs only objects, arrays, strings, booleans and numbers. Why not
 * `toString()` of a `Double`: it prints `1.0E-5`, `NaN` and `Infinity`. The server refuses the last
 * two (API.md: "every number finite"), and plain decimals keep the body small and on the server's
 * fast reading path. So every number goes through [number], which refuses non-finite values and
 * writes a plain decimal with a bounded number of fraction digits.
 *
 * The writer tracks commas itself; callers only say what comes next.
 */
class JsonWriter {
    private val out = StringBuilder(4096)

    /** One entry per open container: true once it holds a value, so the next needs a comma. */
    private val hasValue = ArrayList<Boolean>()

    /** True right after [name], when the value must follow without a comma. */
    private var afterName = false

    private fun beforeValue() {
        if (afterName) {
            afterName = false
            return
        }
        if (hasValue.isNotEmpty()) {
            if (hasValue[hasValue.size - 1]) out.append(',')
            hasValue[hasValue.size - 1] = true
        }
    }

    fun beginObject(): JsonWriter = apply { beforeValue(); out.append('{'); hasValue.add(false) }

    fun endObject(): JsonWriter = apply { hasValue.removeAt(hasValue.size - 1); out.append('}') }

    fun beginArray(): JsonWriter = apply { beforeValue(); out.append('['); hasValue.add(false) }

    fun endArray(): JsonWriter = apply { hasValue.removeAt(hasValue.size - 1); out.append(']') }

    /** A member name inside an object; the next call writes its value. */
    fun name(name: String): JsonWriter = apply {
        beforeValue()
        string(name)
        out.append(':')
        afterName = true
    }

    fun value(s: String): JsonWriter = apply { beforeValue(); string(s) }

    fun value(b: Boolean): JsonWriter = apply { beforeValue(); out.append(if (b) "true" else "false") }

    fun value(n: Long): JsonWriter = apply { beforeValue(); out.append(n) }

    /** A finite number with at most [decimals] fraction digits (see the class comment). */
    fun value(n: Double, decimals: Int): JsonWriter = apply { beforeValue(); out.append(number(n, decimals)) }

    /** The document; only once every container is closed. */
    override fun toString(): String {
        check(hasValue.isEmpty()) { "unclosed JSON container" }
        return out.toString()
    }

    private fun string(s: String) {
        out.append('"')
        var i = 0
        while (i < s.length) {
            val c = s[i]
            when {
                c == '"' -> out.append("\\\"")
                c == '\\' -> out.append("\\\\")
                c == '\n' -> out.append("\\n")
                c == '\r' -> out.append("\\r")
                c == '\t' -> out.append("\\t")
                c < ' ' || c == '\u2028' || c == '\u2029' -> hex(c)
                // A surrogate pair is one character: copy both halves. A lone half has no UTF-8
                // encoding (the JVM would write '?', serde_json refuses its escape): replace it.
                Character.isHighSurrogate(c) && i + 1 < s.length && Character.isLowSurrogate(s[i + 1]) -> {
                    out.append(c).append(s[i + 1])
                    i++
                }
                Character.isSurrogate(c) -> out.append('\uFFFD')
                else -> out.append(c)
            }
            i++
        }
        out.append('"')
    }

    private fun hex(c: Char) {
        out.append("\\u")
        val h = Integer.toHexString(c.code)
        repeat(4 - h.length) { out.append('0') }
        out.append(h)
    }

    companion object {
        /**
         * [n] as a plain JSON decimal rounded (half-even, from its exact binary value) to at most
         * [decimals] fraction digits, without trailing zeros, `-0` written as `0`.
         *
         * @throws IllegalArgumentException when [n] is NaN or infinite: a caller bug, because
         *   [HeartbeatWindow] never stores such a value.
         */
        fun number(n: Double, decimals: Int): String {
            require(n.isFinite()) { "JSON numbers must be finite, got $n" }
            val d = BigDecimal(n).setScale(decimals, RoundingMode.HALF_EVEN).stripTrailingZeros()
            return if (d.signum() == 0) "0" else d.toPlainString()
        }
    }
}

/**
 * A minimal JSON parser, for the server's answers (`{"accepted": true, "seq": 42}` and problem+json
 * bodies) and for the self-check reading a heartbeat back.
 *
 * It gives `Map<String, Any?>`, `List<Any?>`, `String`, `Long` (integers that fit), `Double`,
 * `Boolean` and `null`, and throws [JsonException] on anything that is not exactly one JSON value
 * (RFC 8259), including trailing bytes. Depth is bounded so a hostile body cannot exhaust the stack.
 */
class JsonReader private constructor(private val s: String) {
    private var i = 0

    class JsonException(message: String) : Exception(message)

    companion object {
        private const val MAX_DEPTH = 64

        fun parse(text: String): Any? {
            val r = JsonReader(text)
            r.ws()
            val v = r.value(0)
            r.ws()
            if (r.i != text.length) throw r.fail("trailing characters")
            return v
        }

        /** [parse] that gives null instead of throwing, for bodies that may not be JSON at all. */
        fun parseOrNull(text: String?): Any? =
            try {
                if (text.isNullOrEmpty()) null else parse(text)
            } catch (e: JsonException) {
                null
            }
    }

    private fun fail(what: String) = JsonException("$what at offset $i")

    private fun ws() {
        while (i < s.length && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++
    }

    private fun value(depth: Int): Any? {
        if (depth > MAX_DEPTH) throw fail("nesting too deep")
        if (i >= s.length) throw fail("unexpected end")
        return when (s[i]) {
            '{' -> obj(depth)
            '[' -> arr(depth)
            '"' -> str()
            't' -> literal("true", true)
            'f' -> literal("false", false)
            'n' -> literal("null", null)
            else -> num()
        }
    }

    private fun literal(word: String, v: Any?): Any? {
        if (!s.startsWith(word, i)) throw fail("unexpected character")
        i += word.length
        return v
    }

    private fun obj(depth: Int): Map<String, Any?> {
        i++
        val m = LinkedHashMap<String, Any?>()
        ws()
        if (i < s.length && s[i] == '}') {
            i++
            return m
        }
        while (true) {
            ws()
            if (i >= s.length || s[i] != '"') throw fail("expected a member name")
            val k = str()
            ws()
            if (i >= s.length || s[i] != ':') throw fail("expected ':'")
            i++
            ws()
            if (m.containsKey(k)) throw fail("duplicate member \"$k\"")
            m[k] = value(depth + 1)
            ws()
            if (i >= s.length) throw fail("unexpected end")
            when (s[i++]) {
                ',' -> continue
                '}' -> return m
                else -> { i--; throw fail("expected ',' or '}'") }
            }
        }
    }

    private fun arr(depth: Int): List<Any?> {
        i++
        val a = ArrayList<Any?>()
        ws()
        if (i < s.length && s[i] == ']') {
            i++
            return a
        }
        while (true) {
            ws()
            a.add(value(depth + 1))
            ws()
            if (i >= s.length) throw fail("unexpected end")
            when (s[i++]) {
                ',' -> continue
                ']' -> return a
                else -> { i--; throw fail("expected ',' or ']'") }
            }
        }
    }

    private fun str(): String {
        i++ // opening quote
        val b = StringBuilder()
        while (true) {
            if (i >= s.length) throw fail("unterminated string")
            val c = s[i++]
            when {
                c == '"' -> return b.toString()
                c == '\\' -> {
                    if (i >= s.length) throw fail("unterminated escape")
                    when (val e = s[i++]) {
                        '"', '\\', '/' -> b.append(e)
                        'b' -> b.append('\b')
                        'f' -> b.append('\u000C')
                        'n' -> b.append('\n')
                        'r' -> b.append('\r')
                        't' -> b.append('\t')
                        'u' -> {
                            if (i + 4 > s.length) throw fail("short \\u escape")
                            val code = s.substring(i, i + 4).toIntOrNull(16) ?: throw fail("bad \\u escape")
                            b.append(code.toChar())
                            i += 4
                        }
                        else -> throw fail("bad escape")
                    }
                }
                c < ' ' -> throw fail("control character in string")
                else -> b.append(c)
            }
        }
    }

    private fun num(): Any {
        val start = i
        if (i < s.length && s[i] == '-') i++
        if (i >= s.length) throw fail("bad number")
        if (s[i] == '0') {
            i++
        } else if (s[i] in '1'..'9') {
            while (i < s.length && s[i].isAsciiDigit()) i++
        } else {
            throw fail("unexpected character")
        }
        var integral = true
        if (i < s.length && s[i] == '.') {
            integral = false
            i++
            if (i >= s.length || !s[i].isAsciiDigit()) throw fail("bad fraction")
            while (i < s.length && s[i].isAsciiDigit()) i++
        }
        if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
            integral = false
            i++
            if (i < s.length && (s[i] == '+' || s[i] == '-')) i++
            if (i >= s.length || !s[i].isAsciiDigit()) throw fail("bad exponent")
            while (i < s.length && s[i].isAsciiDigit()) i++
        }
        val text = s.substring(start, i)
        return (if (integral) text.toLongOrNull() else null) ?: text.toDouble()
    }

    private fun Char.isAsciiDigit() = this in '0'..'9'
}
