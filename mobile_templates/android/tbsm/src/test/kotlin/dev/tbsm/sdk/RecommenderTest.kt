package dev.tbsm.sdk

import java.io.File
import java.io.IOException
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
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
        val rec = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { inference }, TestBundles.stillRefresh)
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

        val reopened = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, TestBundles.stillRefresh)
        assertEquals(listOf(1_000L, 2_000L), reopened.history().map { it.timestamp })
        assertEquals(rec.manifest.userId, JSONObject(historyFile.readText()).getLong("user_id"))
    }

    @Test
    fun corruptHistoryIsReportedAndReplaced() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json")
        historyFile.writeText("]]")
        val problems = mutableListOf<String>()
        val rec = TbsmRecommender.open(bundle, historyFile, { problems.add(it) }, { RowScoringInference() }, TestBundles.stillRefresh)
        assertEquals(1, problems.size)
        assertEquals(0, rec.history().size)
    }

    @Test
    fun refusesATamperedBundle() {
        val bundle = TestBundles.copyOfRealBundle()
        File(bundle, "golden.json").appendText(" ")
        try {
            TbsmRecommender.open(bundle, File(bundle.parentFile, "h.json"), {}, { RowScoringInference() }, TestBundles.stillRefresh)
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
            TbsmRecommender.open(bundle, File(bundle.parentFile, "h.json"), {}, { RowScoringInference() }, TestBundles.stillRefresh)
            fail("opened format_version 99")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.contains("format_version"))
        }
    }

    @Test
    fun twoRecommendersOnOneHistoryFileShareIt() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json")
        // Two screens, or an activity and its re-creation after a rotation, each opening the bundle.
        val first = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, TestBundles.stillRefresh)
        val second = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, TestBundles.stillRefresh)
        val ids = first.manifest.items.ids
        assertTrue(first.record(Event(ids[0], 1, "pv", 1_000)))
        assertTrue(second.record(Event(ids[1], 1, "pv", 2_000)))
        assertTrue(first.record(Event(ids[2], 1, "pv", 3_000)))
        assertFalse(second.record(Event(ids[3], 1, "pv", 2_500)))
        assertEquals(listOf(1_000L, 2_000L, 3_000L), second.history().map { it.timestamp })
        first.close()
        assertEquals(3, second.history().size)
        second.close()
        val reopened = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, TestBundles.stillRefresh)
        assertEquals(listOf(1_000L, 2_000L, 3_000L), reopened.history().map { it.timestamp })
        reopened.close()
    }

    @Test
    fun recordThatCannotBeSavedRecordsNothing() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json")
        TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, TestBundles.stillRefresh).use { rec ->
            val ids = rec.manifest.items.ids
            assertTrue(rec.record(Event(ids[0], 1, "pv", 1_000)))
            val blocker = File(historyFile.path + ".new").also { it.mkdirs(); File(it, "x").writeText("x") }
            try {
                rec.record(Event(ids[1], 1, "pv", 2_000))
                fail("recorded an event that could not be saved")
            } catch (e: IOException) {
                // expected
            }
            assertEquals(listOf(1_000L), rec.history().map { it.timestamp })
            blocker.deleteRecursively()
            assertTrue(rec.record(Event(ids[1], 1, "pv", 2_000)))
            assertEquals(listOf(1_000L, 2_000L), rec.history().map { it.timestamp })
        }
    }

    @Test
    fun unreadableHistoryFailsOpenWithoutResettingIt() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json").also { it.mkdirs() } // exists, cannot be read
        try {
            TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, TestBundles.stillRefresh)
            fail("opened with an unreadable history")
        } catch (e: HistoryUnavailableException) {
            // expected: retry later
        }
        assertTrue(historyFile.isDirectory)
        assertFalse(File(historyFile.path + ".corrupt").exists())
    }

    @Test
    fun failedOpenGivesTheHistoryFileBack() {
        val bundle = TestBundles.copyOfRealBundle()
        val historyFile = File(bundle.parentFile, "history.json")
        try {
            TbsmRecommender.open(bundle, historyFile, { fail(it) }, { throw BundleException("no model") }, TestBundles.stillRefresh)
            fail("opened without a model")
        } catch (e: BundleException) {
            // expected
        }
        // Nothing holds the file: another bundle (another user, another max_history) may open it.
        val other = HistoryStore.open(historyFile, TestBundles.smallManifest()) {}
        assertEquals(7L, other.userId)
        other.release()
    }

    @Test
    fun closeWaitsForARunningRankAndIsIdempotent() {
        val bundle = TestBundles.copyOfRealBundle()
        val model = BlockingInference()
        val rec = TbsmRecommender.open(bundle, File(bundle.parentFile, "history.json"), { fail(it) }, { model }, TestBundles.stillRefresh)
        val ids = rec.manifest.items.ids
        var ranked: List<TbsmRecommender.Scored>? = null
        val ranking = Thread { ranked = rec.rank(listOf(ids[0], ids[1]), requestTime = 10) }.apply { start() }
        assertTrue(model.entered.await(10, TimeUnit.SECONDS))
        val closing = Thread { rec.close() }.apply { start() }
        closing.join(300)
        assertTrue("close did not wait for the running rank", closing.isAlive)
        assertEquals(0, model.closes)
        model.proceed.countDown()
        ranking.join(10_000)
        closing.join(10_000)
        assertFalse(ranking.isAlive || closing.isAlive)
        assertEquals(2, ranked!!.size)
        assertEquals(1, model.closes)
        assertFalse(model.closedWhileRunning)
        rec.close()
        assertEquals(1, model.closes)
        for (call in listOf<() -> Unit>({ rec.rank(listOf(ids[0])) }, { rec.record(Event(ids[0], 1, "pv", 20)) }, { rec.history() })) {
            try {
                call()
                fail("a closed recommender answered")
            } catch (e: IllegalStateException) {
                assertTrue(e.message!!, e.message!!.contains("closed"))
            }
        }
    }
}

/**
 * A stand-in for ExecuTorch's Module: forward blocks until [proceed] is released, and close during a
 * forward is recorded (executorch-android's Module.destroy throws or skips freeing in that case).
 */
class BlockingInference : Inference {
    val entered = CountDownLatch(1)
    val proceed = CountDownLatch(1)

    @Volatile
    private var running = false

    @Volatile
    var closes = 0

    @Volatile
    var closedWhileRunning = false

    override fun scores(inputs: ModelInputs): FloatArray {
        running = true
        entered.countDown()
        check(proceed.await(10, TimeUnit.SECONDS)) { "never released" }
        running = false
        return FloatArray(inputs.candidates.size) { inputs.candidates[it].toFloat() }
    }

    override fun close() {
        if (running) closedWhileRunning = true
        closes += 1
    }
}
