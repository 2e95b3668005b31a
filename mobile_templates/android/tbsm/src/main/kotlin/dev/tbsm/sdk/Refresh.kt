package dev.tbsm.sdk

import androidx.core.util.AtomicFile
import java.io.File
import java.io.IOException
import org.json.JSONArray
import org.json.JSONObject
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/** Runs refresh.pte. [ExecuTorchRefresh] is the real one; tests may pass another. */
interface Refresh : AutoCloseable {
    /** d loss / d user_state at [state] on [events] (output 1 of the refresh program). */
    fun gradient(state: FloatArray, events: RefreshEvents): FloatArray
}

/**
 * The refresh loop, the same in every client (docs/bundle-format.md, on-device refresh), in float32:
 * `steps` times, state -= learning_rate * gradient, then the drift d = state - shipped is scaled back
 * onto the max_drift ball when its norm (summed in float64) exceeds max_drift.
 */
object RefreshLoop {
    fun run(spec: RefreshSpec, shipped: FloatArray, start: FloatArray, events: RefreshEvents, refresh: Refresh): FloatArray {
        val state = start.copyOf()
        val learningRate = spec.learningRate.toFloat()
        val drift = FloatArray(state.size)
        repeat(spec.steps) {
            val gradient = refresh.gradient(state.copyOf(), events)
            check(gradient.size == state.size) { "refresh gradient has ${gradient.size} values for a state of ${state.size}" }
            var squares = 0.0
            for (i in state.indices) {
                state[i] = state[i] - learningRate * gradient[i]
                drift[i] = state[i] - shipped[i]
                squares += drift[i].toDouble() * drift[i].toDouble()
            }
            val norm = Math.sqrt(squares)
            if (norm > spec.maxDrift) {
                val scale = (spec.maxDrift / norm).toFloat()
                for (i in state.indices) state[i] = shipped[i] + drift[i] * scale
            }
        }
        check(state.all { it.isFinite() }) { "the refresh produced a non-finite user state" }
        return state
    }

    /**
     * Events recorded after the newest one the last refresh trained on ([RefreshedState]'s marker): every
     * event of [events] when there was none.
     */
    fun eventsSince(events: List<Event>, last: RefreshedState?): Int {
        if (last == null) return events.size
        var newer = 0
        var atMarker = 0
        for (e in events) {
            if (e.timestamp > last.throughTimestamp) newer++ else if (e.timestamp == last.throughTimestamp) atMarker++
        }
        return newer + maxOf(0, atMarker - last.throughCount)
    }
}

/** refresh.pte through the ExecuTorch Android runtime; loaded at open, like [ExecuTorchInference]. */
class ExecuTorchRefresh(programFile: File, private val method: String) : Refresh {
    private val module: Module = Module.load(programFile.absolutePath)
    private var closed = false

    init {
        val status = module.loadMethod(method)
        if (status != 0) {
            module.destroy()
            throw BundleException("cannot load method $method of $programFile: ExecuTorch error 0x${status.toString(16)}")
        }
    }

    @Synchronized
    override fun gradient(state: FloatArray, events: RefreshEvents): FloatArray {
        check(!closed) { "the ExecuTorch module is closed" }
        val args = listOf(EValue.from(Tensor.fromBlob(state, longArrayOf(state.size.toLong())))) +
            events.all().map { EValue.from(Tensor.fromBlob(it, longArrayOf(it.size.toLong()))) }
        val outputs = module.execute(method, *args.toTypedArray())
        check(outputs.size >= 2) { "$method returned ${outputs.size} outputs, not (loss, gradient)" }
        return outputs[1].toTensor().dataAsFloatArray
    }

    @Synchronized
    override fun close() {
        if (closed) return
        closed = true
        module.destroy()
    }
}

/**
 * A user state refreshed on the device (sdk_builder/formats.py: RefreshedState), kept beside the history
 * in `<history>.state.json`, for the bundle whose manifest.json has [manifestSha256] only. The marker
 * ([throughTimestamp], [throughCount]: the newest event trained on and how many events of the history had
 * that timestamp) tells how many events arrived since.
 */
class RefreshedState(
    val manifestSha256: String,
    val userState: FloatArray,
    val throughTimestamp: Long,
    val throughCount: Int,
) {
    fun toJson(): String {
        val values = JSONArray()
        for (v in userState) values.put(v.toDouble()) // a float32 widened to double: read back exactly
        return JSONObject()
            .put("manifest_sha256", manifestSha256)
            .put("user_state", values)
            .put("through_timestamp", throughTimestamp)
            .put("through_count", throughCount)
            .toString()
    }

    companion object {
        fun fileFor(historyFile: File): File = File(historyFile.path.removeSuffix(".json") + ".state.json")

        /** The marker of the newest of [events] (oldest first). */
        fun after(manifest: BundleManifest, state: FloatArray, events: List<Event>): RefreshedState {
            val last = events.lastOrNull()?.timestamp ?: 0L
            return RefreshedState(manifest.sha256, state, last, events.count { it.timestamp == last })
        }

        /**
         * The state in [file] for [manifest]: null when there is none or it was refreshed with another
         * bundle (ignored); a file that cannot be parsed is reported through [onProblem], deleted and null.
         * A file that exists but cannot be read throws IOException.
         */
        fun load(file: File, manifest: BundleManifest, onProblem: (String) -> Unit): RefreshedState? {
            val bytes = try {
                AtomicFile(file).readFully()
            } catch (e: IOException) {
                if (!file.exists()) return null
                throw e
            }
            try {
                val json = JSONObject(String(bytes, Charsets.UTF_8))
                val sha = json.getString("manifest_sha256")
                if (sha != manifest.sha256) return null
                val values = json.getJSONArray("user_state")
                val state = FloatArray(values.length()) { values.getDouble(it).toFloat() }
                require(state.size == manifest.userState.size) { "user_state has ${state.size} values, the bundle ${manifest.userState.size}" }
                require(state.all { it.isFinite() }) { "user_state is not finite" }
                return RefreshedState(sha, state, json.getLong("through_timestamp"), json.getInt("through_count"))
            } catch (e: Exception) {
                AtomicFile(file).delete()
                onProblem("refreshed user state is corrupt: ${e.message} (deleted; ranking uses the shipped state)")
                return null
            }
        }

        /** Replaces [file] with [state] atomically ([replaceAtomically]). */
        fun save(file: File, state: RefreshedState) = replaceAtomically(file, state.toJson().toByteArray(Charsets.UTF_8))
    }
}
