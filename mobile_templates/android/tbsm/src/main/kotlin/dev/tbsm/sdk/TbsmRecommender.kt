package dev.tbsm.sdk

import java.io.File

/**
 * Ranks items for the bundle's user with the on-device history and, when the bundle has a refresh
 * program (manifest refresh), the user state refreshed on the device from that history.
 *
 * Thread-safe: calls are serialised, and [close] waits for a running [rank]; after [close], every call
 * throws IllegalStateException. [rank] runs the model on the calling thread, so call it off the main
 * thread. Recommenders opened on the same history file share one [HistoryStore].
 */
class TbsmRecommender internal constructor(
    val manifest: BundleManifest,
    private val inference: Inference,
    private val store: HistoryStore,
    private val refresh: Refresh?,
    private val onHistoryProblem: (String) -> Unit,
) : AutoCloseable {
    data class Scored(val itemId: Long, val score: Float)

    private val lock = Any()
    private var closed = false

    private fun checkOpen() = check(!closed) { "this TbsmRecommender is closed" }

    /**
     * Adds [event] to the history and persists it. Returns false, recording nothing, when the event is
     * older than the last recorded one (the history is a time series: record events as they happen).
     * The history is saved before it changes: when the save throws (IOException), nothing is recorded.
     *
     * With a refresh program, a recorded event that brings the history every_events events past the last
     * refresh runs the refresh loop here, on the calling thread, and saves the new user state; a refresh
     * that fails is reported through onHistoryProblem (the event stays recorded, the state stays as it
     * was, and the next event tries again).
     */
    fun record(event: Event): Boolean = synchronized(lock) {
        checkOpen()
        require(event.behavior in manifest.behaviors) { "unknown behavior ${event.behavior}" }
        require(event.itemId >= 0 && event.categoryId >= 0 && event.timestamp >= 0) { "ids and timestamp must be >= 0" }
        if (!store.record(event)) return false
        if (refresh != null) {
            try {
                store.refreshIfDue(refresh)
            } catch (e: Exception) {
                onHistoryProblem("user state refresh failed: ${e.message}")
            }
        }
        return true
    }

    /** The user state ranking uses: the one refreshed on the device for this bundle, else the shipped one. */
    fun userState(): FloatArray = synchronized(lock) {
        checkOpen()
        store.userState().copyOf()
    }

    /** Forgets the refreshed user state: ranking goes back to the shipped one. Throws IOException if it cannot be deleted. */
    fun resetUserState() = synchronized(lock) {
        checkOpen()
        store.resetUserState()
    }

    fun history(): List<Event> = synchronized(lock) {
        checkOpen()
        store.events()
    }

    /** Empties the history and forgets the user state refreshed from it. */
    fun clearHistory() = synchronized(lock) {
        checkOpen()
        store.clear()
    }

    /** Scores [candidateIds] (global item ids, at most manifest.maxCandidates), best first. */
    fun rank(candidateIds: List<Long>, requestTime: Long = System.currentTimeMillis() / 1000): List<Scored> = synchronized(lock) {
        checkOpen()
        if (candidateIds.isEmpty()) return emptyList()
        val scores = inference.scores(InputBuilder.build(manifest, store.events(), requestTime, candidateIds, store.userState()))
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
                refresh?.close()
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
         * read throws [HistoryUnavailableException]) and loads model.pte with its forward method, and the
         * refresh program when the manifest has one (its state file lives beside [historyFile]).
         */
        @JvmStatic
        @JvmOverloads
        fun open(
            bundleDir: File,
            historyFile: File = File(bundleDir.absoluteFile.parentFile, "tbsm-history.json"),
            onHistoryProblem: (String) -> Unit = {},
            inference: (File) -> Inference = { ExecuTorchInference(it) },
            refresh: (File, RefreshSpec) -> Refresh = { file, spec -> ExecuTorchRefresh(file, spec.method) },
        ): TbsmRecommender {
            val manifest = BundleManifest.load(bundleDir)
            val store = HistoryStore.open(historyFile, manifest, onHistoryProblem)
            var model: Inference? = null
            try {
                model = inference(File(bundleDir, "model.pte"))
                val refresher = manifest.refresh?.let { refresh(File(bundleDir, it.file), it) }
                return TbsmRecommender(manifest, model, store, refresher, onHistoryProblem)
            } catch (e: Throwable) {
                model?.close()
                store.release()
                throw e
            }
        }
    }
}
