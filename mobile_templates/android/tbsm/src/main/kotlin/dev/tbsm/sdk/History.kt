package dev.tbsm.sdk

import androidx.core.util.AtomicFile
import java.io.File
import java.io.IOException
import org.json.JSONArray
import org.json.JSONObject

/** One interaction (events.schema.json: Event). [behavior] is a key of the manifest's behaviors. */
data class Event(val itemId: Long, val categoryId: Long, val behavior: String, val timestamp: Long)

/**
 * The user's most recent events, oldest first, at most [capacity] (the manifest's max_history, or what
 * the refresh program reads: [BundleManifest.historyCapacity]).
 * An event older than the last one is rejected: the model reads the history as a time series.
 */
class HistoryBuffer(val userId: Long?, val capacity: Int) {
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

    /** An independent copy: changes go to the copy first and replace the original once saved. */
    fun copy(): HistoryBuffer = HistoryBuffer(userId, capacity).also { it.events.addAll(events) }

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
        return JSONObject().put("user_id", userId ?: JSONObject.NULL).put("events", array).toString()
    }

    companion object {
        /** Parses an EventHistory document; throws IllegalArgumentException or JSONException when invalid. */
        fun fromJson(text: String, capacity: Int): HistoryBuffer {
            val json = JSONObject(text)
            val buffer = HistoryBuffer(if (json.get("user_id") == JSONObject.NULL) null else json.getLong("user_id"), capacity)
            // "events" may be absent (the schema's default is an empty list).
            for (event in eventsFromJson(if (json.has("events")) json.getJSONArray("events") else JSONArray())) buffer.add(event)
            return buffer
        }

        /** Events of the events schema, oldest first; throws IllegalArgumentException or JSONException when invalid. */
        fun eventsFromJson(array: JSONArray): List<Event> = List(array.length()) { i ->
            val e = array.getJSONObject(i)
            Event(e.getLong("item_id"), e.getLong("category_id"), e.getString("behavior"), e.getLong("timestamp"))
        }.also { events ->
            for (i in 1 until events.size) require(events[i].timestamp >= events[i - 1].timestamp) { "events[$i] is older than events[${i - 1}]" }
        }
    }
}

/**
 * The history file exists but cannot be read now (an I/O error, storage still locked after a reboot):
 * nothing was reset or moved; open again later.
 */
class HistoryUnavailableException(message: String, cause: Throwable? = null) : IOException(message, cause)

/**
 * The history kept in one JSON file, shared by every [TbsmRecommender] of the process that uses that
 * file: [open] returns the same instance for the same canonical path, so two screens (or an activity
 * and its re-creation after a rotation) add to one history instead of overwriting each other's.
 *
 * Every change is saved first (an [AtomicFile]: a new file, fsync, rename over the old one) and applied
 * in memory only once the save has succeeded: a failed save throws and changes nothing.
 *
 * With a refresh program, the store also keeps the user state refreshed from this history
 * ([RefreshedState], in `<history>.state.json` beside it) and holds maxHistory + window events.
 */
class HistoryStore private constructor(
    val file: File,
    private val key: String,
    private val manifest: BundleManifest,
    private var buffer: HistoryBuffer,
    private var refreshed: RefreshedState?,
) {
    /** Open recommenders using this store; guarded by [registry]. */
    private var users = 0

    val userId: Long? get() = buffer.userId

    val stateFile: File get() = RefreshedState.fileFor(file)

    @Synchronized
    fun events(): List<Event> = buffer.events()

    /** The state to rank with: the one refreshed for this bundle, else the manifest's user_state. */
    @Synchronized
    fun userState(): FloatArray = refreshed?.userState ?: manifest.userState

    /**
     * Saves the history with [event] appended, then keeps it. False (nothing saved or recorded) when
     * [event] is older than the last event; an IOException from the save leaves the history as it was.
     */
    @Synchronized
    fun record(event: Event): Boolean {
        val next = buffer.copy()
        if (!next.add(event)) return false
        save(file, next)
        buffer = next
        return true
    }

    /** Saves an empty history, then keeps it; the state learned from the old one goes too ([resetUserState]). */
    @Synchronized
    fun clear() {
        val next = HistoryBuffer(buffer.userId, buffer.capacity)
        save(file, next)
        buffer = next
        resetUserState()
    }

    /**
     * Runs the refresh loop when the history has grown by every_events events since the last refresh
     * (since the bundle was installed, the first time), saves the new state, then keeps it. True when it
     * ran. A failure (the program, the save) throws and leaves the state as it was.
     */
    @Synchronized
    fun refreshIfDue(refresh: Refresh): Boolean {
        val spec = manifest.refresh ?: return false
        val events = buffer.events()
        if (RefreshLoop.eventsSince(events, refreshed) < spec.everyEvents) return false
        val start = refreshed?.userState ?: manifest.userState
        val state = RefreshLoop.run(spec, manifest.userState, start, InputBuilder.refreshEvents(manifest, events), refresh)
        val next = RefreshedState.after(manifest, state, events)
        RefreshedState.save(stateFile, next)
        refreshed = next
        return true
    }

    /** Deletes the refreshed state: ranking goes back to the shipped user_state. */
    @Synchronized
    fun resetUserState() {
        AtomicFile(stateFile).delete()
        if (stateFile.exists()) throw IOException("cannot delete $stateFile")
        refreshed = null
    }

    /** Gives back one [open]; the last release forgets the instance (the next open reads the file again). */
    fun release() {
        synchronized(registry) {
            users -= 1
            if (users <= 0 && registry[key] === this) registry.remove(key)
        }
    }

    companion object {
        /** One store per canonical history path, for the whole process. */
        private val registry = HashMap<String, HistoryStore>()

        /**
         * The store of [file] for [manifest]'s user: the instance already open for that file, or a new one
         * with the history read from it ([load]) and the refreshed state beside it ([RefreshedState.load]).
         * Each open needs one [release]. Throws [HistoryUnavailableException] when a file exists but cannot
         * be read, and IllegalStateException when the file is open for another bundle.
         */
        @JvmStatic
        fun open(file: File, manifest: BundleManifest, onProblem: (String) -> Unit): HistoryStore {
            val canonical = file.canonicalFile
            val key = canonical.path
            synchronized(registry) {
                val store = registry[key] ?: run {
                    val history = load(canonical, manifest, onProblem)
                    val state = try {
                        RefreshedState.load(RefreshedState.fileFor(canonical), manifest, onProblem)
                    } catch (e: IOException) {
                        throw HistoryUnavailableException("cannot read the refreshed state of $canonical: ${e.message}", e)
                    }
                    HistoryStore(canonical, key, manifest, history, state).also { registry[key] = it }
                }
                check((manifest.userId == null || store.buffer.userId == manifest.userId) && store.manifest.sha256 == manifest.sha256 &&
                    store.buffer.capacity == manifest.historyCapacity) {
                    "$file is already open for user ${store.buffer.userId} with another bundle " +
                        "(manifest sha256 ${store.manifest.sha256.take(12)}), not ${manifest.sha256.take(12)}: close that recommender first"
                }
                store.users += 1
                return store
            }
        }

        /**
         * The history in [file]:
         * - no file: an empty history (a new user);
         * - a file that exists but cannot be read: [HistoryUnavailableException], nothing is touched;
         * - a file that is read but is not a valid history for this bundle (bad JSON, events out of order,
         *   another user, unknown behaviours): moved aside to `<file>.corrupt`, reported through
         *   [onProblem], replaced by an empty history.
         */
        @JvmStatic
        fun load(file: File, manifest: BundleManifest, onProblem: (String) -> Unit): HistoryBuffer {
            val empty = HistoryBuffer(manifest.userId, manifest.historyCapacity)
            val bytes = try {
                AtomicFile(file).readFully()
            } catch (e: IOException) {
                if (!file.exists()) return empty
                throw HistoryUnavailableException("cannot read the history file $file: ${e.message}", e)
            }
            val problem = try {
                val buffer = HistoryBuffer.fromJson(String(bytes, Charsets.UTF_8), manifest.historyCapacity)
                val unknown = buffer.events().map { it.behavior }.filter { it !in manifest.behaviors }
                when {
                    manifest.userId != null && buffer.userId != manifest.userId -> "history is for user ${buffer.userId}, the bundle for ${manifest.userId}"
                    unknown.isNotEmpty() -> "history has unknown behaviors $unknown"
                    else -> return buffer
                }
            } catch (e: Exception) {
                "history file is corrupt: ${e.message}"
            }
            val aside = File(file.path + ".corrupt")
            aside.delete()
            val moved = file.renameTo(aside)
            onProblem(if (moved) "$problem (moved to ${aside.name})" else "$problem (could not move it to ${aside.name})")
            return empty
        }

        /** Replaces [file] with [history] atomically ([replaceAtomically]). */
        @JvmStatic
        fun save(file: File, history: HistoryBuffer) = replaceAtomically(file, history.toJson().toByteArray(Charsets.UTF_8))
    }
}

/** Replaces [file] with [bytes] through [AtomicFile] (written to `<file>.new`, fsynced, renamed): the
 *  history and the refreshed user state are each either the old or the new file, never a torn one. */
internal fun replaceAtomically(file: File, bytes: ByteArray) {
    file.parentFile?.mkdirs()
    val atomic = AtomicFile(file)
    val out = atomic.startWrite()
    try {
        out.write(bytes)
    } catch (e: IOException) {
        atomic.failWrite(out)
        throw e
    }
    atomic.finishWrite(out)
    // finishWrite logs a failed rename instead of throwing; a "<file>.new" still there means the old
    // file was not replaced, and the caller must not keep the change.
    if (File(file.path + ".new").exists()) throw IOException("cannot replace $file")
}
