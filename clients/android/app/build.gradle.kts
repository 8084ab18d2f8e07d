// The Android adapter as a library module. Not built here (no Android SDK on this machine):
// see clients/android/README.md. The platform-independent core is compiled in as a source
// directory, so the module has no dependency beyond the Kotlin standard library.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.blockremote.collector.android"
    compileSdk = 35
    defaultConfig {
        // java.time (sent_at, Retry-After) and noBackupFilesDir are available from 26 without desugaring.
        minSdk = 26
    }
    sourceSets["main"].java.srcDirs("src/main/kotlin", "../core/src/main/kotlin")
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    jvmToolchain(17)
}
