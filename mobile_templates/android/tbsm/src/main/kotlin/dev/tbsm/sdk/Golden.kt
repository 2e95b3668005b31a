package dev.tbsm.sdk

import java.io.File
import org.json.JSONArray
import org.json.JSONObject

/** One case of golden.json: what the phone must score for a history and candidates (with the shipped state). */
class GoldenCase(
    val name: String,
    val history: HistoryBuffer,
    val requestTime: Long,
    val candidates: List<Long>,
    val scores: DoubleArray,
)

/** One refresh case of golden.json: one whole refresh loop from [stateBefore] on [events] gives [stateAfter]. */
class GoldenRefreshCase(
    val name: String,
    val events: List<Event>,
    val stateBefore: FloatArray,
    val stateAfter: DoubleArray,
    val tolerance: Double,
)

class GoldenSet(val tolerance: Double, val cases: List<GoldenCase>, val refreshCases: List<GoldenRefreshCase> = emptyList()) {
    /** Largest |score - expected| over every case, scoring with [inference] and the manifest's user_state. */
    fun maxAbsDiff(manifest: BundleManifest, inference: Inference): Double = cases.maxOfOrNull { case ->
        val got = inference.scores(InputBuilder.build(manifest, case.history.events(), case.requestTime, case.candidates))
        require(got.size == case.scores.size) { "case ${case.name}: ${got.size} scores for ${case.scores.size}" }
        got.indices.maxOfOrNull { Math.abs(got[it].toDouble() - case.scores[it]) } ?: 0.0
    } ?: 0.0

    /** Names of the refresh cases whose state after the loop (run with [refresh]) is off by more than their tolerance. */
    fun failedRefreshCases(manifest: BundleManifest, refresh: Refresh): List<String> {
        val spec = manifest.refresh ?: return refreshCases.map { it.name }
        return refreshCases.filter { case ->
            val events = InputBuilder.refreshEvents(manifest, case.events)
            val got = RefreshLoop.run(spec, manifest.userState, case.stateBefore, events, refresh)
            got.size != case.stateAfter.size || got.indices.any { !(Math.abs(got[it] - case.stateAfter[it]) <= case.tolerance) }
        }.map { it.name }
    }

    companion object {
        /** [capacity]: events kept per history (the manifest's historyCapacity). */
        fun load(file: File, capacity: Int): GoldenSet {
            val json = JSONObject(file.readText())
            val cases = json.getJSONArray("cases")
            val refresh = if (json.has("refresh_cases")) json.getJSONArray("refresh_cases") else JSONArray()
            return GoldenSet(
                json.getDouble("tolerance"),
                List(cases.length()) { i ->
                    val c = cases.getJSONObject(i)
                    val candidates = c.getJSONArray("candidates")
                    val scores = c.getJSONArray("scores")
                    GoldenCase(
                        name = c.getString("name"),
                        history = HistoryBuffer.fromJson(c.getJSONObject("history").toString(), capacity),
                        requestTime = c.getLong("request_time"),
                        candidates = List(candidates.length()) { candidates.getLong(it) },
                        scores = DoubleArray(scores.length()) { scores.getDouble(it) },
                    )
                },
                List(refresh.length()) { i ->
                    val c = refresh.getJSONObject(i)
                    val before = c.getJSONArray("state_before")
                    val after = c.getJSONArray("state_after")
                    GoldenRefreshCase(
                        name = c.getString("name"),
                        events = HistoryBuffer.eventsFromJson(c.getJSONArray("events")),
                        stateBefore = FloatArray(before.length()) { before.getDouble(it).toFloat() },
                        stateAfter = DoubleArray(after.length()) { after.getDouble(it) },
                        tolerance = c.getDouble("tolerance"),
                    )
                },
            )
        }
    }
}
