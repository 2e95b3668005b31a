plugins {
    id("com.android.library")
    // AGP 9+ compiles Kotlin itself (built-in Kotlin): delete this line when the app uses AGP 9.
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.tbsm.sdk"
    compileSdk = 35
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    testOptions {
        // AtomicFile logs (android.util.Log) on its failure paths; android.jar's stubs throw on the JVM.
        unitTests.isReturnDefaultValues = true
        unitTests.all {
            // The JVM unit tests read a real bundle: the one the sample app ships.
            it.systemProperty("tbsm.bundle", rootProject.file("sample/src/main/assets/tbsm").absolutePath)
        }
    }
}

kotlin {
    // Java 17 bytecode without jvmToolchain(17): that would demand a JDK 17 installation (or a toolchain
    // resolver) and fail on Android Studio's bundled JDK 21. Any JDK 17+ running Gradle builds this.
    compilerOptions { jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_17) }
}

dependencies {
    // Same ExecuTorch release as the one that exported model.pte (manifest "versions").
    api("org.pytorch:executorch-android:1.5.1")
    // androidx.core.util.AtomicFile: the history file is replaced with write-new + fsync + rename.
    implementation("androidx.core:core:1.15.0")
    testImplementation("junit:junit:4.13.2")
    // android.jar's org.json is a stub on the JVM; unit tests need a real implementation.
    testImplementation("org.json:json:20240303")
}
