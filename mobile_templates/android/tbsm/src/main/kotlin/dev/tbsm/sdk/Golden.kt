package dev.tbsm.sdk

import java.io.File
import org.json.JSONObject

/** One case of golden.json: what the phone must score for a history and candidates. */
class GoldenCase(
    val name: String,
    val history: HistoryBuffer,
    val requestTime: Long,
    val candidates: List<Long>,
    val scores: DoubleArray,
)

class GoldenSet(val tolerance: Double, val cases: List<GoldenCase>) {
    /** Largest |score - expected| over every case, scoring with [inference]. */
    fun maxAbsDiff(manifest: BundleManifest, inference: Inference): Double = cases.maxOfOrNull { case ->
        val got = inference.scores(InputBuilder.build(manifest, case.history.events(), case.requestTime, case.candidates))
        require(got.size == case.scores.size) { "case ${case.name}: ${got.size} scores for ${case.scores.size}" }
        got.indices.maxOfOrNull { Math.abs(got[it].toDouble() - case.scores[it]) } ?: 0.0
    } ?: 0.0

    companion object {
        fun load(file: File, maxHistory: Int): GoldenSet {
            val json = JSONObject(file.readText())
            val cases = json.getJSONArray("cases")
            return GoldenSet(
                json.getDouble("tolerance"),
                List(cases.length()) { i ->
                    val c = cases.getJSONObject(i)
                    val candidates = c.getJSONArray("candidates")
                    val scores = c.getJSONArray("scores")
                    GoldenCase(
                        name = c.getString("name"),
                        history = HistoryBuffer.fromJson(c.getJSONObject("history").toString(), maxHistory),
                        requestTime = c.getLong("request_time"),
                        candidates = List(candidates.length()) { candidates.getLong(it) },
                        scores = DoubleArray(scores.length()) { scores.getDouble(it) },
                    )
                },
            )
        }
    }
}
