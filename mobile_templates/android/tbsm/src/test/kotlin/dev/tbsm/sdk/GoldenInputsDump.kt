package dev.tbsm.sdk

import java.io.File
import org.json.JSONArray
import org.json.JSONObject

/**
 * `GoldenInputsDumpKt BUNDLE_DIR [EXTRA_CASES_JSON]`: prints, per golden case, the seven input tensors
 * the template builds, as one JSON line, so a test can compare them with the Python reference.
 * Each case goes two ways that must agree: InputBuilder on the parsed history, and
 * TbsmRecommender.record + rank (with an Inference that captures its inputs). Then, per refresh case
 * of golden.json, the four event tensors of refresh.pte (`{"refresh_case", "events_items", ...}`).
 */
fun main(args: Array<String>) {
    val bundle = File(args[0])
    val manifest = BundleManifest.load(bundle)
    val sets = listOf(File(bundle, "golden.json")) + args.drop(1).map { File(it) }
    for (set in sets) {
        for (case in GoldenSet.load(set, manifest.historyCapacity).cases) {
            val direct = InputBuilder.build(manifest, case.history.events(), case.requestTime, case.candidates)
            val capture = RowScoringInference()
            val historyFile = File.createTempFile("tbsm-history", ".json").also { it.delete() }
            // A refresh that leaves the state where it is: the golden scores are the shipped state's.
            TbsmRecommender.open(bundle, historyFile, { error(it) }, { capture }, TestBundles.stillRefresh).use { rec ->
                for (e in case.history.events()) check(rec.record(e)) { "record refused $e" }
                rec.rank(case.candidates, case.requestTime)
            }
            historyFile.delete()
            RefreshedState.fileFor(historyFile).delete()
            val viaRecommender = capture.last!!
            for ((a, b) in direct.longInputs().zip(viaRecommender.longInputs())) {
                check(a.contentEquals(b)) { "case ${case.name}: InputBuilder and TbsmRecommender disagree" }
            }
            check(direct.userState.contentEquals(viaRecommender.userState)) { "case ${case.name}: user_state differs" }
            val line = JSONObject().put("case", case.name)
            for ((name, values) in BundleManifest.INPUT_NAMES.zip(direct.longInputs())) {
                line.put(name, JSONArray().also { array -> values.forEach { array.put(it) } })
            }
            line.put("user_state", JSONArray().also { array -> direct.userState.forEach { array.put(it.toDouble()) } })
            println(line.toString())
        }
    }
    if (manifest.refresh == null) return
    for (case in GoldenSet.load(File(bundle, "golden.json"), manifest.historyCapacity).refreshCases) {
        val events = InputBuilder.refreshEvents(manifest, case.events)
        val line = JSONObject().put("refresh_case", case.name)
        for ((name, values) in listOf("events_items", "events_categories", "events_behaviors", "events_timestamps").zip(events.all())) {
            line.put(name, JSONArray().also { array -> values.forEach { array.put(it) } })
        }
        println(line.toString())
    }
}
