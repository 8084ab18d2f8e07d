package dev.blockremote.collector.android

import android.annotation.SuppressLint
import android.content.Context
import android.provider.Settings
import android.util.AtomicFile
import dev.blockremote.collector.SeqStore
import java.io.File
import java.io.IOException
import java.util.UUID

/**
 * The device's identity for sign-in (INTEGRATION.md section 1).
 *
 * `device_id`: a random UUID without dashes (32 characters of `[0-9a-f]`, inside the contract's
 * 8–64 of `[A-Za-z0-9_-]`), generated once per install. It is kept in `noBackupFilesDir`, not in
 * ordinary `SharedPreferences`, because Auto Backup would otherwise restore it onto a new phone —
 * the same reason iOS keeps it with `kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly`.
 *
 * `device_fingerprint`: `Settings.Secure.ANDROID_ID` (per app signing key, user and device; it
 * changes on a factory reset). Only its SHA-256 is stored by the server.
 */
object DeviceIdentity {
    @Synchronized
    fun deviceId(context: Context): String {
        val file = AtomicFile(File(context.noBackupFilesDir, "blockremote-device-id"))
        val existing = try {
            file.readFully().toString(Charsets.US_ASCII).trim()
        } catch (e: IOException) {
            ""
        }
        if (existing.matches(Regex("[A-Za-z0-9_-]{8,64}"))) return existing
        val id = UUID.randomUUID().toString().replace("-", "")
        write(file, id)
        return id
    }

    @SuppressLint("HardwareIds") // exactly what it is for here
    fun fingerprint(context: Context): String =
        Settings.Secure.getString(context.contentResolver, Settings.Secure.ANDROID_ID) ?: ""

    internal fun write(file: AtomicFile, text: String) {
        val out = file.startWrite()
        try {
            out.write(text.toByteArray(Charsets.US_ASCII))
            file.finishWrite(out)
        } catch (e: IOException) {
            file.failWrite(out)
            throw e
        }
    }
}

/**
 * [SeqStore] in one small file of `noBackupFilesDir`, written atomically (`AtomicFile`) after
 * every accepted heartbeat, so a process restart continues above the last `seq`. Call
 * `setLastSeq(0)` when a new session starts. A failed write is not fatal: the server's 409
 * `replay` names `last_seq` and the sender jumps past it.
 */
class FileSeqStore(context: Context, name: String = "blockremote-seq") : SeqStore {
    private val file = AtomicFile(File(context.noBackupFilesDir, name))
    @Volatile private var cached: Long? = null

    @Synchronized
    override fun lastSeq(): Long = cached ?: (
        try {
            file.readFully().toString(Charsets.US_ASCII).trim().toLongOrNull() ?: 0L
        } catch (e: IOException) {
            0L
        }
        ).also { cached = it }

    @Synchronized
    override fun setLastSeq(seq: Long) {
        cached = seq
        try {
            DeviceIdentity.write(file, seq.toString())
        } catch (e: IOException) {
            // Kept in memory; see the class comment.
        }
    }
}
