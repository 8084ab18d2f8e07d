package dev.blockremote.collector.android

import android.accessibilityservice.AccessibilityServiceInfo
import android.app.Activity
import android.content.pm.PackageManager
import android.content.pm.Signature
import android.net.TrafficStats
import android.os.Build
import android.os.SystemClock
import android.view.WindowManager
import android.view.accessibility.AccessibilityManager
import dev.blockremote.collector.DeviceContext
import dev.blockremote.collector.DnsLog
import dev.blockremote.collector.Network
import dev.blockremote.collector.NetworkMeter
import dev.blockremote.collector.WindowSignals
import java.security.MessageDigest
import java.util.function.Consumer

/**
 * `network` and `context` of each heartbeat on Android (INTEGRATION.md section 3).
 *
 * @param watchedPackages packages whose signing-certificate SHA-256 goes into `app_hashes`
 *   (remote-control and screen-sharing tools the bank cares about). Since Android 11 an app sees
 *   only the packages it declares in the manifest's `<queries>`: declare exactly these.
 * @param dnsLog fed by the app's HTTP client (see the README: an OkHttp `Dns` that records names).
 */
class AndroidSignals(
    private val activity: Activity,
    private val watchedPackages: List<String>,
    private val dnsLog: DnsLog,
) : WindowSignals {
    private val app = activity.applicationContext
    private val meter = NetworkMeter()
    private val installer: String? by lazy { readInstaller() }
    @Volatile private var appHashes: List<String> = emptyList()
    @Volatile private var recorded = false
    private var recordingCallback: Consumer<Int>? = null

    /** Call when the app comes to the foreground: screen-recording callback, fresh app hashes. */
    fun start() {
        appHashes = readAppHashes()
        startScreenRecordingWatch()
    }

    fun stop() {
        stopScreenRecordingWatch()
    }

    /**
     * Bytes of the **whole device** (a screen-streaming tool is another app), so
     * `getTotalTxBytes`/`getTotalRxBytes`, not the per-UID counters; `UNSUPPORTED` (−1) gives no
     * `network` at all. The interval comes from `elapsedRealtime`, which does not jump with the
     * wall clock.
     */
    override fun network(): Network? =
        meter.read(TrafficStats.getTotalTxBytes(), TrafficStats.getTotalRxBytes(), SystemClock.elapsedRealtime())

    override fun context(): DeviceContext = DeviceContext(
        screenCapture = recorded,
        accessibilityServices = enabledAccessibilityServices(),
        installer = installer,
        appHashes = appHashes,
        dns = dnsLog.drain(),
    )

    /**
     * Ids (`package/.Service`) of every enabled accessibility service, whatever its feedback type.
     * Read per heartbeat: a service can be switched on while the app is open, and this is a cheap
     * binder call.
     */
    private fun enabledAccessibilityServices(): List<String> {
        val am = app.getSystemService(android.content.Context.ACCESSIBILITY_SERVICE) as AccessibilityManager
        return am.getEnabledAccessibilityServiceList(AccessibilityServiceInfo.FEEDBACK_ALL_MASK).map { it.id }
    }

    /**
     * Who installed this app: `com.android.vending` for Play, another store's package, or null
     * (sideloaded through `adb`, or the platform does not say). API 30+:
     * `getInstallSourceInfo(...).installingPackageName`; before, the deprecated
     * `getInstallerPackageName`.
     */
    private fun readInstaller(): String? = try {
        val pm = app.packageManager
        if (Build.VERSION.SDK_INT >= 30) {
            pm.getInstallSourceInfo(app.packageName).installingPackageName
        } else {
            @Suppress("DEPRECATION")
            pm.getInstallerPackageName(app.packageName)
        }
    } catch (e: PackageManager.NameNotFoundException) {
        null
    }

    /**
     * Lower-case hex SHA-256 of the signing certificate(s) of each watched package that is
     * installed (at most 64 in all). API 28+: `signingInfo.apkContentsSigners` (the certificates
     * that signed the current APK, rotation included); before: the deprecated `signatures`.
     */
    private fun readAppHashes(): List<String> {
        val pm = app.packageManager
        val out = ArrayList<String>()
        for (pkg in watchedPackages) {
            val signers: Array<Signature>? = try {
                if (Build.VERSION.SDK_INT >= 28) {
                    val info = if (Build.VERSION.SDK_INT >= 33) {
                        pm.getPackageInfo(pkg, PackageManager.PackageInfoFlags.of(PackageManager.GET_SIGNING_CERTIFICATES.toLong()))
                    } else {
                        @Suppress("DEPRECATION")
                        pm.getPackageInfo(pkg, PackageManager.GET_SIGNING_CERTIFICATES)
                    }
                    info.signingInfo?.apkContentsSigners
                } else {
                    @Suppress("DEPRECATION")
                    pm.getPackageInfo(pkg, PackageManager.GET_SIGNATURES).signatures
                }
            } catch (e: PackageManager.NameNotFoundException) {
                null // not installed, or not declared in <queries>
            }
            signers?.forEach { out.add(sha256Hex(it.toByteArray())) }
            if (out.size >= DeviceContext.MAX_ENTRIES) break
        }
        return out.take(DeviceContext.MAX_ENTRIES)
    }

    /**
     * `screen_capture`: API 35+ only, through `WindowManager.addScreenRecordingCallback` (needs the
     * normal permission `android.permission.DETECT_SCREEN_RECORDING` in the manifest). It says
     * whether any activity of this app's UID is visible in a recording made through
     * `MediaProjection` — screen recorders, screen sharing, and the remote-control tools that
     * stream the screen. Its limits: nothing below API 35 (we send `false`, as INTEGRATION.md
     * says); it does not see screenshots (that is API 34's `ScreenCaptureCallback`, a different
     * question), a camera filming the screen, or an HDMI capture device; windows with
     * `FLAG_SECURE` are blanked in recordings, and are then reported as not visible.
     */
    private fun startScreenRecordingWatch() {
        if (Build.VERSION.SDK_INT < 35 || recordingCallback != null) return
        val callback = Consumer<Int> { state -> recorded = state == WindowManager.SCREEN_RECORDING_STATE_VISIBLE }
        val initial = activity.windowManager.addScreenRecordingCallback(activity.mainExecutor, callback)
        recorded = initial == WindowManager.SCREEN_RECORDING_STATE_VISIBLE
        recordingCallback = callback
    }

    private fun stopScreenRecordingWatch() {
        val callback = recordingCallback ?: return
        if (Build.VERSION.SDK_INT >= 35) activity.windowManager.removeScreenRecordingCallback(callback)
        recordingCallback = null
        recorded = false
    }

    private fun sha256Hex(bytes: ByteArray): String =
        MessageDigest.getInstance("SHA-256").digest(bytes).joinToString("") { "%02x".format(it) }
}
