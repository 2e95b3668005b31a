package dev.tbsm.sdk

/** The six int64 inputs of model.pte, in the program's order (manifest program.inputs). */
class ModelInputs(
    val histItems: LongArray,
    val histCategories: LongArray,
    val histBehaviors: LongArray,
    val histTimestamps: LongArray,
    val requestTime: LongArray,
    val candidates: LongArray,
) {
    fun all(): List<LongArray> = listOf(histItems, histCategories, histBehaviors, histTimestamps, requestTime, candidates)
}

object InputBuilder {
    /**
     * Maps global ids to local rows and left-pads the history: the last maxHistory [events] (oldest
     * first) end at index maxHistory - 1; padding slots hold the padding rows, behaviour 0, timestamp 0.
     */
    fun build(manifest: BundleManifest, events: List<Event>, requestTime: Long, candidateIds: List<Long>): ModelInputs {
        require(candidateIds.size in 1..manifest.maxCandidates) {
            "candidates: need 1..${manifest.maxCandidates}, got ${candidateIds.size}"
        }
        val t = manifest.maxHistory
        val recent = events.takeLast(t)
        val pad = t - recent.size
        val items = LongArray(t) { manifest.items.paddingRow }
        val categories = LongArray(t) { manifest.categories.paddingRow }
        val behaviors = LongArray(t)
        val timestamps = LongArray(t)
        for ((k, e) in recent.withIndex()) {
            items[pad + k] = manifest.items.row(e.itemId)
            categories[pad + k] = manifest.categories.row(e.categoryId)
            behaviors[pad + k] = manifest.behaviors[e.behavior] ?: throw IllegalArgumentException("unknown behavior ${e.behavior}")
            timestamps[pad + k] = e.timestamp
        }
        val candidates = LongArray(candidateIds.size) { manifest.items.row(candidateIds[it]) }
        return ModelInputs(items, categories, behaviors, timestamps, longArrayOf(requestTime), candidates)
    }
}

/** Runs model.pte. [ExecuTorchInference] is the real one; tests may pass another. */
interface Inference : AutoCloseable {
    /** One score per candidate, in candidate order. */
    fun scores(inputs: ModelInputs): FloatArray
}
