package dev.tbsm.sdk

import java.io.File

/**
 * Ranks items for the bundle's user with the on-device history.
 *
 * Thread-safe: calls are serialised, and [close] waits for a running [rank]; after [close], every call
 * throws IllegalStateException. [rank] runs the model on the calling thread, so call it off the main
 * thread. Recommenders opened on the same history file share one [HistoryStore].
 */
class TbsmRecommender internal constructor(
    val manifest: BundleManifest,
    private val inference: Inference,
    private val store: HistoryStore,
) : AutoCloseable {
    data class Scored(val itemId: Long, val score: Float)

    private val lock = Any()
    private var closed = false

    private fun checkOpen() = check(!closed) { "this TbsmRecommender is closed" }

    /**
     * Adds [event] to the history and persists it. Returns false, recording nothing, when the event is
     * older than the last recorded one (the history is a time series: record events as they happen).
     * The history is saved before it changes: when the save throws (IOException), nothing is recorded.
     */
    fun record(event: Event): Boolean = synchronized(lock) {
        checkOpen()
        require(event.behavior in manifest.behaviors) { "unknown behavior ${event.behavior}" }
        require(event.itemId >= 0 && event.categoryId >= 0 && event.timestamp >= 0) { "ids and timestamp must be >= 0" }
        store.record(event)
    }

    fun history(): List<Event> = synchronized(lock) {
        checkOpen()
        store.events()
    }

    fun clearHistory() = synchronized(lock) {
        checkOpen()
        store.clear()
    }

    /** Scores [candidateIds] (global item ids, at most manifest.maxCandidates), best first. */
    fun rank(candidateIds: List<Long>, requestTime: Long = System.currentTimeMillis() / 1000): List<Scored> = synchronized(lock) {
        checkOpen()
        if (candidateIds.isEmpty()) return emptyList()
        val scores = inference.scores(InputBuilder.build(manifest, store.events(), requestTime, candidateIds))
        check(scores.size == candidateIds.size) { "model returned ${scores.size} scores for ${candidateIds.size} items" }
        return candidateIds.indices.map { Scored(candidateIds[it], scores[it]) }.sortedByDescending { it.score }
    }

    /** Frees the model and gives back the history store; waits for a running [rank]. Idempotent. */
    override fun close() {
        synchronized(lock) {
            if (closed) return
            closed = true
            try {
                inference.close()
            } finally {
                store.release()
            }
        }
    }

    companion object {
        /**
         * Opens the bundle in [bundleDir]: checks format_version and the sha256 of every file, opens the
         * history in [historyFile] (shared with any recommender already open on that file; a corrupt file
         * is reported through [onHistoryProblem] and replaced by an empty history; a file that cannot be
         * read throws [HistoryUnavailableException]) and loads model.pte with its forward method.
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
            val store = HistoryStore.open(historyFile, manifest, onHistoryProblem)
            val model = try {
                inference(File(bundleDir, "model.pte"))
            } catch (e: Throwable) {
                store.release()
                throw e
            }
            return TbsmRecommender(manifest, model, store)
        }
    }
}
