plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.tbsm.sample"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.tbsm.sample"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "1.0"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
        ndk {
            // executorch-android ships these ABIs.
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    androidResources {
        // model.pte is read from a copied file; keep the assets as they are.
        noCompress += listOf("pte", "json")
    }
}

kotlin {
    // Java 17 bytecode without jvmToolchain(17): that would demand a JDK 17 installation (or a toolchain
    // resolver) and fail on Android Studio's bundled JDK 21. Any JDK 17+ running Gradle builds this.
    compilerOptions { jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_17) }
}

dependencies {
    implementation(project(":tbsm"))
    androidTestImplementation("androidx.test.ext:junit:1.2.1")
    androidTestImplementation("androidx.test:runner:1.6.2")
}
