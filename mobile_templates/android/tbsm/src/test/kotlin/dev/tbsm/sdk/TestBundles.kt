package dev.tbsm.sdk

import java.io.File
import java.nio.file.Files
import org.junit.Assume

/** Test fixtures: a real bundle (`-Dtbsm.bundle=DIR` or TBSM_BUNDLE) and a small hand-made manifest. */
object TestBundles {
    fun realBundle(): File {
        val path = System.getProperty("tbsm.bundle") ?: System.getenv("TBSM_BUNDLE")
        Assume.assumeTrue("set -Dtbsm.bundle=<bundle dir> to run this test", path != null && File(path, "manifest.json").isFile)
        return File(path!!)
    }

    fun copyOfRealBundle(): File {
        val dir = Files.createTempDirectory("tbsm-bundle").toFile()
        realBundle().copyRecursively(File(dir, "bundle"))
        return File(dir, "bundle")
    }

    fun tempDir(): File = Files.createTempDirectory("tbsm-test").toFile()

    fun smallManifest(maxHistory: Int = 4, maxCandidates: Int = 8) = BundleManifest(
        formatVersion = BundleManifest.FORMAT_VERSION,
        userId = 7,
        items = IdShard(longArrayOf(100, 200, 300), firstRow = 2, oovRow = 1, paddingRow = 0),
        categories = IdShard(longArrayOf(5, 9), firstRow = 2, oovRow = 1, paddingRow = 0),
        behaviors = mapOf("pv" to 1L, "buy" to 2L, "cart" to 3L, "fav" to 4L),
        method = "forward",
        maxHistory = maxHistory,
        maxCandidates = maxCandidates,
        files = emptyMap(),
    )
}

/** Returns the row of each candidate as its score and remembers the last inputs. */
class RowScoringInference : Inference {
    var last: ModelInputs? = null

    override fun scores(inputs: ModelInputs): FloatArray {
        last = inputs
        return FloatArray(inputs.candidates.size) { inputs.candidates[it].toFloat() }
    }

    override fun close() {}
}
