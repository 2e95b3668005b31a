package dev.tbsm.sdk

import java.io.File
import java.security.MessageDigest
import org.json.JSONObject

/** A bundle that cannot be used: unknown format, missing or altered file, malformed manifest. */
class BundleException(message: String) : Exception(message)

/** Global ids of one table in the bundle, sorted; ids[i] has local row i + firstRow. */
class IdShard(val ids: LongArray, val firstRow: Long, val oovRow: Long, val paddingRow: Long) {
    /** Local row of a global id: binary search, oovRow when the id is not in the bundle. */
    fun row(globalId: Long): Long {
        val i = ids.binarySearch(globalId)
        return if (i >= 0) i + firstRow else oovRow
    }

    companion object {
        /** 3 units of 23 bits hold 69: every id delta, like every id, is a non-negative Long. */
        private const val MAX_UNITS = 3
        private const val UNIT_BITS = 23
        private const val MORE = 1 shl UNIT_BITS
        private const val BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

        /** manifest [table] ("items" or "categories"): its ids, decoded and checked (sorted, unique, int64). */
        fun parse(json: JSONObject, table: String): IdShard {
            val ids = try {
                decodeIds(json.getString("ids"))
            } catch (e: IllegalArgumentException) {
                throw BundleException("manifest.json $table.ids: ${e.message}")
            }
            return IdShard(ids, json.getLong("first_row"), json.getLong("oov_row"), json.getLong("padding_row"))
        }

        /**
         * The manifest's id encoding (sdk_builder/formats.py, IDS_ENCODING): the first id, then each id minus
         * the one before it (>= 1), each in 23-bit groups, least significant first, one group a 3-byte
         * big-endian unit (group | 0x800000 if more groups follow), in base64. A unit is exactly 4 base64
         * characters, the first the most significant, so it is read straight off them. Throws
         * IllegalArgumentException with a one-line reason for anything else.
         */
        fun decodeIds(text: String): LongArray {
            for ((at, c) in text.withIndex()) {
                if (BASE64.indexOf(c) < 0) throw IllegalArgumentException("not base64 (character '$c' at $at; whole units are never padded)")
            }
            if (text.length % 4 != 0) {
                throw IllegalArgumentException("truncated unit: ${text.length} characters is not a whole number of 4-character units")
            }
            val units = IntArray(text.length / 4) { u -> (0 until 4).fold(0) { bits, k -> (bits shl 6) or BASE64.indexOf(text[4 * u + k]) } }
            val ids = LongArray(units.count { it < MORE }) // a value's last unit is the only one without the flag
            var n = 0
            var value = 0L
            var groups = 0
            var start = 0
            for ((u, unit) in units.withIndex()) {
                if (groups == MAX_UNITS) throw IllegalArgumentException("value $n (at unit $start) has more than $MAX_UNITS units: not an int64")
                val group = (unit and (MORE - 1)).toLong()
                // The last group may hold bits 46..62 only: more would make a value of 2^63 or more.
                if (groups == MAX_UNITS - 1 && group shr (63 - UNIT_BITS * (MAX_UNITS - 1)) != 0L) {
                    throw IllegalArgumentException("id $n exceeds int64")
                }
                value = value or (group shl (UNIT_BITS * groups))
                groups++
                if (unit < MORE) {
                    val previous = if (n == 0) 0L else ids[n - 1]
                    if (n > 0 && value == 0L) throw IllegalArgumentException("id $n repeats the one before it: ids must be sorted and unique")
                    if (value > Long.MAX_VALUE - previous) throw IllegalArgumentException("id $n exceeds int64")
                    ids[n++] = previous + value
                    value = 0L
                    groups = 0
                    start = u + 1
                }
            }
            if (groups != 0) throw IllegalArgumentException("truncated value: its last unit (${units.size - 1}) says more units follow")
            return ids
        }
    }
}

/**
 * manifest.refresh: refresh.pte's [method] takes (user_state, the last [events] = maxHistory + [window]
 * events) and returns (loss, gradient); the template runs [steps] steps of the loop when the history
 * has grown by [everyEvents] events since the last refresh (see [RefreshLoop]).
 */
class RefreshSpec(
    val file: String,
    val method: String,
    val window: Int,
    val events: Int,
    val everyEvents: Int,
    val steps: Int,
    val learningRate: Double,
    val maxDrift: Double,
) {
    companion object {
        fun parse(json: JSONObject): RefreshSpec {
            val spec = RefreshSpec(
                file = json.getString("file"),
                method = json.getString("method"),
                window = json.getInt("window"),
                events = json.getInt("events"),
                everyEvents = json.getInt("every_events"),
                steps = json.getInt("steps"),
                learningRate = json.getDouble("learning_rate"),
                maxDrift = json.getDouble("max_drift"),
            )
            if (spec.window < 1 || spec.everyEvents < 1 || spec.steps < 1 || !(spec.maxDrift > 0)) {
                throw BundleException("manifest refresh: window, every_events and steps must be >= 1, max_drift > 0")
            }
            return spec
        }
    }
}

/**
 * The fields of manifest.json a phone needs (sdk_builder/formats.py: Manifest). [sha256] is the hash of
 * manifest.json itself: a refreshed user state is kept only for the bundle it was refreshed with.
 */
class BundleManifest(
    val formatVersion: Int,
    val userId: Long?, // null: a cold-start bundle (manifest kind cold_start), for any user without one
    val items: IdShard,
    val categories: IdShard,
    val behaviors: Map<String, Long>,
    val method: String,
    val maxHistory: Int,
    val maxCandidates: Int,
    val files: Map<String, String>,
    val userState: FloatArray,
    val refresh: RefreshSpec? = null,
    val sha256: String = "",
) {
    /** Events the history keeps: what ranking reads and, with a refresh program, what it trains on. */
    val historyCapacity: Int
        get() = refresh?.let { maxOf(it.events, it.everyEvents) } ?: maxHistory

    companion object {
        const val FORMAT_VERSION = 3
        val INPUT_NAMES = listOf(
            "hist_items", "hist_categories", "hist_behaviors", "hist_timestamps", "request_time", "candidates",
            "user_state",
        )

        fun parse(text: String): BundleManifest {
            val json = JSONObject(text)
            val version = json.getInt("format_version")
            if (version != FORMAT_VERSION) {
                throw BundleException("unsupported bundle format_version $version (this SDK reads $FORMAT_VERSION)")
            }
            val program = json.getJSONObject("program")
            val inputs = program.getJSONArray("inputs")
            val names = List(inputs.length()) { inputs.getJSONObject(it).getString("name") }
            if (names != INPUT_NAMES) throw BundleException("program inputs $names differ from $INPUT_NAMES")
            val behaviors = json.getJSONObject("behaviors")
            val files = json.getJSONObject("files")
            // float(np.float32) in the JSON: the double read back narrows to that float32 exactly.
            val state = json.getJSONArray("user_state")
            if (state.length() == 0) throw BundleException("manifest user_state is empty")
            val refresh = if (json.isNull("refresh")) null else RefreshSpec.parse(json.getJSONObject("refresh"))
            val fileHashes = files.keys().asSequence().associateWith { files.getString(it) }
            if (refresh != null && refresh.file !in fileHashes) throw BundleException("manifest files lists no sha256 for ${refresh.file}")
            val maxHistory = program.getInt("max_history")
            if (refresh != null && refresh.events != maxHistory + refresh.window) {
                throw BundleException("manifest refresh: events ${refresh.events} is not max_history + window")
            }
            return BundleManifest(
                formatVersion = version,
                userId = if (json.get("user_id") == JSONObject.NULL) null else json.getLong("user_id"),
                items = IdShard.parse(json.getJSONObject("items"), "items"),
                categories = IdShard.parse(json.getJSONObject("categories"), "categories"),
                behaviors = behaviors.keys().asSequence().associateWith { behaviors.getLong(it) },
                method = program.getString("method"),
                maxHistory = maxHistory,
                maxCandidates = program.getInt("max_candidates"),
                files = fileHashes,
                userState = FloatArray(state.length()) { state.getDouble(it).toFloat() },
                refresh = refresh,
                sha256 = sha256(text.toByteArray(Charsets.UTF_8)),
            )
        }

        /** Reads manifest.json of [dir] and checks the sha256 of every file it lists. */
        fun load(dir: File): BundleManifest {
            val manifest = parse(File(dir, "manifest.json").readText())
            if ("model.pte" !in manifest.files) throw BundleException("manifest files lists no sha256 for model.pte")
            for ((name, expected) in manifest.files) {
                val file = File(dir, name)
                if (name.contains('/') || !file.isFile) throw BundleException("bundle file $name is missing")
                val actual = sha256(file)
                if (actual != expected) throw BundleException("sha256 mismatch for $name: manifest $expected, file $actual")
            }
            return manifest
        }

        fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            file.inputStream().use { input ->
                val buffer = ByteArray(1 shl 16)
                while (true) {
                    val n = input.read(buffer)
                    if (n < 0) break
                    digest.update(buffer, 0, n)
                }
            }
            return digest.digest().joinToString("") { "%02x".format(it) }
        }

        fun sha256(bytes: ByteArray): String =
            MessageDigest.getInstance("SHA-256").digest(bytes).joinToString("") { "%02x".format(it) }
    }
}
