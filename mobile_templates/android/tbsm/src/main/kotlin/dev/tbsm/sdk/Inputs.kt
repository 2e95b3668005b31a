package dev.tbsm.sdk

/** The seven inputs of model.pte, in the program's order (manifest program.inputs): six int64, then user_state. */
class ModelInputs(
    val histItems: LongArray,
    val histCategories: LongArray,
    val histBehaviors: LongArray,
    val histTimestamps: LongArray,
    val requestTime: LongArray,
    val candidates: LongArray,
    val userState: FloatArray,
) {
    /** The six int64 inputs, in order; [userState] (float32) follows them. */
    fun longInputs(): List<LongArray> = listOf(histItems, histCategories, histBehaviors, histTimestamps, requestTime, candidates)
}

/** Inputs 1-4 of refresh.pte: the last manifest.refresh.events (maxHistory + window) events, encoded like the ranking history. */
class RefreshEvents(val items: LongArray, val categories: LongArray, val behaviors: LongArray, val timestamps: LongArray) {
    fun all(): List<LongArray> = listOf(items, categories, behaviors, timestamps)
}

object InputBuilder {
    /**
     * Maps global ids to local rows and left-pads the history: the last maxHistory [events] (oldest
     * first) end at index maxHistory - 1; padding slots hold the padding rows, behaviour 0, timestamp 0.
     * [userState] is the refreshed state for this bundle, else the manifest's.
     */
    fun build(
        manifest: BundleManifest,
        events: List<Event>,
        requestTime: Long,
        candidateIds: List<Long>,
        userState: FloatArray = manifest.userState,
    ): ModelInputs {
        require(candidateIds.size in 1..manifest.maxCandidates) {
            "candidates: need 1..${manifest.maxCandidates}, got ${candidateIds.size}"
        }
        require(userState.size == manifest.userState.size) { "user_state: need ${manifest.userState.size} values, got ${userState.size}" }
        val history = encode(manifest, events, manifest.maxHistory)
        val candidates = LongArray(candidateIds.size) { manifest.items.row(candidateIds[it]) }
        return ModelInputs(
            history.items, history.categories, history.behaviors, history.timestamps, longArrayOf(requestTime), candidates, userState,
        )
    }

    /** refresh.pte's event inputs: the last refresh.events (maxHistory + window) [events], padded like the history. */
    fun refreshEvents(manifest: BundleManifest, events: List<Event>): RefreshEvents {
        val spec = requireNotNull(manifest.refresh) { "the bundle has no refresh program" }
        return encode(manifest, events, spec.events)
    }

    private fun encode(manifest: BundleManifest, events: List<Event>, t: Int): RefreshEvents {
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
        return RefreshEvents(items, categories, behaviors, timestamps)
    }
}

/** Runs model.pte. [ExecuTorchInference] is the real one; tests may pass another. */
interface Inference : AutoCloseable {
    /** One score per candidate, in candidate order. */
    fun scores(inputs: ModelInputs): FloatArray
}
