package dev.tbsm.sdk

import java.io.File
import java.nio.file.Files
import org.json.JSONObject
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

    /**
     * A copy of the real bundle with a refresh program declared in its manifest ([refresh], as `build
     * --refresh` writes it) and a placeholder refresh.pte listed in its files: tests run the refresh
     * loop with a stand-in for the ExecuTorch program, so only the manifest and the file hash matter.
     */
    fun copyWithRefresh(refresh: JSONObject): File {
        val bundle = copyOfRealBundle()
        val maxHistory = JSONObject(File(bundle, "manifest.json").readText()).getJSONObject("program").getInt("max_history")
        refresh.put("events", maxHistory + refresh.getInt("window"))
        val program = File(bundle, refresh.getString("file")).also { if (!it.exists()) it.writeText("placeholder") }
        val manifest = JSONObject(File(bundle, "manifest.json").readText())
        manifest.put("refresh", refresh)
        manifest.getJSONObject("files").put(program.name, BundleManifest.sha256(program))
        File(bundle, "manifest.json").writeText(manifest.toString())
        File(bundle, "manifest.json.hmac").delete() // the signature no longer matches; nothing here reads it
        return bundle
    }

    fun refreshSpec(window: Int = 3, everyEvents: Int = 2, steps: Int = 2, learningRate: Double = 0.5, maxDrift: Double = 1.0) =
        JSONObject().put("file", "refresh.pte").put("method", "forward").put("window", window).put("every_events", everyEvents)
            .put("steps", steps).put("learning_rate", learningRate).put("max_drift", maxDrift)

    /** For tests about ranking: a refresh program stand-in that leaves the state where it is (zero gradient). */
    val stillRefresh: (File, RefreshSpec) -> Refresh = { _, _ -> StillRefresh() }

    fun tempDir(): File = Files.createTempDirectory("tbsm-test").toFile()

    fun smallManifest(maxHistory: Int = 4, maxCandidates: Int = 8, refresh: RefreshSpec? = null) = BundleManifest(
        formatVersion = BundleManifest.FORMAT_VERSION,
        userId = 7,
        items = IdShard(longArrayOf(100, 200, 300), firstRow = 2, oovRow = 1, paddingRow = 0),
        categories = IdShard(longArrayOf(5, 9), firstRow = 2, oovRow = 1, paddingRow = 0),
        behaviors = mapOf("pv" to 1L, "buy" to 2L, "cart" to 3L, "fav" to 4L),
        method = "forward",
        maxHistory = maxHistory,
        maxCandidates = maxCandidates,
        files = emptyMap(),
        userState = floatArrayOf(0.5f, -0.25f, 1f),
        refresh = refresh,
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

/** A refresh program whose gradient is zero: the refresh loop runs and the state stays the shipped one. */
class StillRefresh : Refresh {
    override fun gradient(state: FloatArray, events: RefreshEvents) = FloatArray(state.size)

    override fun close() {}
}
