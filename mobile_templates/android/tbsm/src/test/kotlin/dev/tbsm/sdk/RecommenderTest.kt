package dev.tbsm.sdk

import java.io.File
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class RecommenderTest {
    @Test
    fun recordsPersistsAndRanks() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json")
        val inference = RowScoringInference()
        val rec = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { inference })
        val ids = rec.manifest.items.ids
        assertTrue(rec.record(Event(ids[0], 1, "pv", 1_000)))
        assertTrue(rec.record(Event(ids[1], 1, "cart", 2_000)))
        assertFalse(rec.record(Event(ids[2], 1, "pv", 1_500)))
        val ranked = rec.rank(listOf(ids[0], ids[5], 12345678901L, ids[3]), requestTime = 3_000)
        assertEquals(listOf(ids[5], ids[3], ids[0], 12345678901L), ranked.map { it.itemId })
        assertArrayEquals(longArrayOf(3_000), inference.last!!.requestTime)
        assertEquals(2_000L, inference.last!!.histTimestamps.last())
        assertEquals(emptyList<TbsmRecommender.Scored>(), rec.rank(emptyList()))
        rec.close()

        val reopened = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() })
        assertEquals(listOf(1_000L, 2_000L), reopened.history().map { it.timestamp })
        assertEquals(rec.manifest.userId, JSONObject(historyFile.readText()).getLong("user_id"))
    }

    @Test
    fun corruptHistoryIsReportedAndReplaced() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json")
        historyFile.writeText("]]")
        val problems = mutableListOf<String>()
        val rec = TbsmRecommender.open(bundle, historyFile, { problems.add(it) }, { RowScoringInference() })
        assertEquals(1, problems.size)
        assertEquals(0, rec.history().size)
    }

    @Test
    fun refusesATamperedBundle() {
        val bundle = TestBundles.copyOfRealBundle()
        File(bundle, "golden.json").appendText(" ")
        try {
            TbsmRecommender.open(bundle, File(bundle.parentFile, "h.json"), {}, { RowScoringInference() })
            fail("opened a tampered bundle")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.contains("sha256"))
        }
    }

    @Test
    fun refusesAnUnknownFormatVersion() {
        val bundle = TestBundles.copyOfRealBundle()
        val manifest = JSONObject(File(bundle, "manifest.json").readText()).put("format_version", 99)
        File(bundle, "manifest.json").writeText(manifest.toString())
        try {
            TbsmRecommender.open(bundle, File(bundle.parentFile, "h.json"), {}, { RowScoringInference() })
            fail("opened format_version 99")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.contains("format_version"))
        }
    }
}
