package dev.tbsm.sdk

import java.io.File
import kotlin.system.exitProcess

/**
 * `dev.tbsm.sdk.BundlePatchApply BUNDLE_DIR PATCH_FILE`: applies the patch in place with [BundlePatch]
 * (a test compares the result with the Python-built bundle byte for byte); prints OK, or the
 * one-line error on stderr with exit status 1.
 */
object BundlePatchApply {
    @JvmStatic
    fun main(args: Array<String>) {
        try {
            val manifest = BundlePatch.apply(File(args[0]), File(args[1]).readBytes())
            println("OK user ${manifest.userId}")
        } catch (e: BundleException) {
            System.err.println(e.message)
            exitProcess(1)
        }
    }
}
