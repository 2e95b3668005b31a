package dev.tbsm.sdk

import java.io.File
import org.json.JSONArray
import org.json.JSONObject

/** One interaction (events.schema.json: Event). [behavior] is a key of the manifest's behaviors. */
data class Event(val itemId: Long, val categoryId: Long, val behavior: String, val timestamp: Long)

/**
 * The user's most recent events, oldest first, at most [capacity] (the manifest's max_history).
 * An event older than the last one is rejected: the model reads the history as a time series.
 */
class HistoryBuffer(val userId: Long, val capacity: Int) {
    private val events = ArrayDeque<Event>()

    val size: Int get() = events.size

    fun events(): List<Event> = events.toList()

    /** Appends [event], dropping the oldest when full. False (nothing recorded) if it is older than the last. */
    fun add(event: Event): Boolean {
        val last = events.lastOrNull()
        if (last != null && event.timestamp < last.timestamp) return false
        events.addLast(event)
        while (events.size > capacity) events.removeFirst()
        return true
    }

    fun clear() = events.clear()

    /** The EventHistory JSON document (events.schema.json). */
    fun toJson(): String {
        val array = JSONArray()
        for (e in events) {
            array.put(
                JSONObject()
                    .put("item_id", e.itemId)
                    .put("category_id", e.categoryId)
                    .put("behavior", e.behavior)
                    .put("timestamp", e.timestamp),
            )
        }
        return JSONObject().put("user_id", userId).put("events", array).toString()
    }

    companion object {
        /** Parses an EventHistory document; throws IllegalArgumentException or JSONException when invalid. */
        fun fromJson(text: String, capacity: Int): HistoryBuffer {
            val json = JSONObject(text)
            val buffer = HistoryBuffer(json.getLong("user_id"), capacity)
            // "events" may be absent (the schema's default is an empty list).
            val array = if (json.has("events")) json.getJSONArray("events") else JSONArray()
            for (i in 0 until array.length()) {
                val e = array.getJSONObject(i)
                val event = Event(e.getLong("item_id"), e.getLong("category_id"), e.getString("behavior"), e.getLong("timestamp"))
                require(buffer.add(event)) { "events[$i] is older than events[${i - 1}]" }
            }
            return buffer
        }
    }
}

/** Keeps a [HistoryBuffer] in a JSON file so the history survives restarts. */
object HistoryStore {
    /**
     * The history in [file], or an empty one when there is none. A corrupt file, or one written for
     * another user, is moved aside to `<file>.corrupt`, reported through [onProblem], and replaced by
     * an empty history.
     */
    fun load(file: File, manifest: BundleManifest, onProblem: (String) -> Unit): HistoryBuffer {
        val empty = HistoryBuffer(manifest.userId, manifest.maxHistory)
        if (!file.exists()) return empty
        val problem = try {
            val buffer = HistoryBuffer.fromJson(file.readText(), manifest.maxHistory)
            val unknown = buffer.events().map { it.behavior }.filter { it !in manifest.behaviors }
            when {
                buffer.userId != manifest.userId -> "history is for user ${buffer.userId}, the bundle for ${manifest.userId}"
                unknown.isNotEmpty() -> "history has unknown behaviors $unknown"
                else -> return buffer
            }
        } catch (e: Exception) {
            "history file is corrupt: ${e.message}"
        }
        file.renameTo(File(file.path + ".corrupt"))
        onProblem(problem)
        return empty
    }

    /** Writes atomically: a temporary file renamed over the old one. */
    fun save(file: File, history: HistoryBuffer) {
        file.parentFile?.mkdirs()
        val tmp = File(file.path + ".tmp")
        tmp.writeText(history.toJson())
        if (!tmp.renameTo(file)) {
            file.delete()
            check(tmp.renameTo(file)) { "cannot write $file" }
        }
    }
}
