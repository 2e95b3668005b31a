package dev.tbsm.sdk

import java.io.File

/**
 * Ranks items for the bundle's user with the on-device history.
 *
 * Thread-safe; [rank] runs the model on the calling thread, so call it off the main thread.
 */
class TbsmRecommender(
    val manifest: BundleManifest,
    private val inference: Inference,
    private val historyFile: File,
    private val buffer: HistoryBuffer,
) : AutoCloseable {
    data class Scored(val itemId: Long, val score: Float)

    /**
     * Adds [event] to the history and persists it. Returns false, recording nothing, when the event is
     * older than the last recorded one (the history is a time series: record events as they happen).
     */
    @Synchronized
    fun record(event: Event): Boolean {
        require(event.behavior in manifest.behaviors) { "unknown behavior ${event.behavior}" }
        require(event.itemId >= 0 && event.categoryId >= 0 && event.timestamp >= 0) { "ids and timestamp must be >= 0" }
        if (!buffer.add(event)) return false
        HistoryStore.save(historyFile, buffer)
        return true
    }

    @Synchronized
    fun history(): List<Event> = buffer.events()

    @Synchronized
    fun clearHistory() {
        buffer.clear()
        HistoryStore.save(historyFile, buffer)
    }

    /** Scores [candidateIds] (global item ids, at most manifest.maxCandidates), best first. */
    @Synchronized
    fun rank(candidateIds: List<Long>, requestTime: Long = System.currentTimeMillis() / 1000): List<Scored> {
        if (candidateIds.isEmpty()) return emptyList()
        val scores = inference.scores(InputBuilder.build(manifest, buffer.events(), requestTime, candidateIds))
        check(scores.size == candidateIds.size) { "model returned ${scores.size} scores for ${candidateIds.size} items" }
        return candidateIds.indices.map { Scored(candidateIds[it], scores[it]) }.sortedByDescending { it.score }
    }

    override fun close() = inference.close()

    companion object {
        /**
         * Opens the bundle in [bundleDir]: checks format_version and the sha256 of every file, loads the
         * history from [historyFile] (a corrupt one is reported through [onHistoryProblem] and replaced
         * by an empty history) and loads model.pte.
         */
        @JvmStatic
        @JvmOverloads
        fun open(
            bundleDir: File,
            historyFile: File = File(bundleDir.absoluteFile.parentFile, "tbsm-history.json"),
            onHistoryProblem: (String) -> Unit = {},
            inference: (File) -> Inference = { ExecuTorchInference(it) },
        ): TbsmRecommender {
            val manifest = BundleManifest.load(bundleDir)
            val buffer = HistoryStore.load(historyFile, manifest, onHistoryProblem)
            return TbsmRecommender(manifest, inference(File(bundleDir, "model.pte")), historyFile, buffer)
        }
    }
}
