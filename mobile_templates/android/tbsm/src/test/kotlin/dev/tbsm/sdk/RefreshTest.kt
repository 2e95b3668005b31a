package dev.tbsm.sdk

import java.io.File
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class RefreshTest {
    private fun spec(steps: Int, learningRate: Double, maxDrift: Double) =
        RefreshSpec("refresh.pte", "forward", window = 2, events = 6, everyEvents = 2, steps = steps, learningRate = learningRate, maxDrift = maxDrift)

    private val noEvents = RefreshEvents(LongArray(0), LongArray(0), LongArray(0), LongArray(0))

    @Test
    fun refreshLoopStepsAndClipsTheDrift() {
        val shipped = floatArrayOf(1f, 1f)
        val constant = ConstantGradient(floatArrayOf(-3f, -4f))
        // One step of 0.5 * (3, 4): a drift of norm 2.5, inside the bound.
        assertArrayEquals(floatArrayOf(2.5f, 3f), RefreshLoop.run(spec(1, 0.5, 10.0), shipped, shipped, noEvents, constant), 0f)
        // Three steps: drift (4.5, 6) of norm 7.5 > 5, scaled back onto the ball: (3, 4).
        assertArrayEquals(floatArrayOf(4f, 5f), RefreshLoop.run(spec(3, 0.5, 5.0), shipped, shipped, noEvents, constant), 1e-6f)
        assertEquals(4, constant.calls)
        // The gradient is taken at the current state: g = state - (3, 3) walks to (3, 3) and stops there.
        val toTarget = object : Refresh {
            override fun gradient(state: FloatArray, events: RefreshEvents) = FloatArray(state.size) { state[it] - 3f }
            override fun close() {}
        }
        assertArrayEquals(floatArrayOf(3f, 3f), RefreshLoop.run(spec(5, 1.0, 10.0), shipped, shipped, noEvents, toTarget), 0f)
    }

    @Test
    fun eventsSinceCountsPastTheMarker() {
        val events = listOf(Event(1, 1, "pv", 10), Event(2, 1, "pv", 20), Event(3, 1, "pv", 20), Event(4, 1, "pv", 30))
        assertEquals(4, RefreshLoop.eventsSince(events, null))
        // The last refresh saw the first event at t=20 only: one more at 20 and the one at 30 are new.
        assertEquals(2, RefreshLoop.eventsSince(events, RefreshedState("x", floatArrayOf(), 20, 1)))
        assertEquals(0, RefreshLoop.eventsSince(events, RefreshedState("x", floatArrayOf(), 30, 1)))
    }

    @Test
    fun refreshRunsEveryEventsPersistsAndRanksWithTheState() {
        val bundle = TestBundles.copyWithRefresh(TestBundles.refreshSpec(window = 3, everyEvents = 2))
        val historyFile = File(bundle.parentFile, "history.json")
        val inference = RowScoringInference()
        val refresh = ConstantGradient(null)
        val rec = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { inference }, { _, _ -> refresh })
        val ids = rec.manifest.items.ids
        val shipped = rec.manifest.userState
        assertEquals(rec.manifest.maxHistory + 3, rec.manifest.historyCapacity)
        assertTrue(rec.record(Event(ids[0], 1, "pv", 1_000)))
        assertEquals(0, refresh.calls)
        assertArrayEquals(shipped, rec.userState(), 0f)
        assertTrue(rec.record(Event(ids[1], 1, "pv", 2_000)))
        assertEquals(2, refresh.calls) // every_events reached: one loop of two steps
        val refreshed = rec.userState()
        assertFalse(refreshed.contentEquals(shipped))
        // The program saw the last maxHistory + window events, left-padded.
        val seen = refresh.lastEvents!!
        assertEquals(rec.manifest.maxHistory + 3, seen.items.size)
        assertEquals(listOf(1_000L, 2_000L), seen.timestamps.takeLast(2))
        rec.rank(listOf(ids[0]), requestTime = 3_000)
        assertArrayEquals(refreshed, inference.last!!.userState, 0f)
        val stateFile = RefreshedState.fileFor(historyFile)
        assertEquals(rec.manifest.sha256, JSONObject(stateFile.readText()).getString("manifest_sha256"))
        rec.close()

        val again = ConstantGradient(null)
        val reopened = TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, { _, _ -> again })
        assertArrayEquals(refreshed, reopened.userState(), 0f)
        assertTrue(reopened.record(Event(ids[2], 1, "pv", 3_000)))
        assertEquals(0, again.calls) // one event since the last refresh
        assertTrue(reopened.record(Event(ids[3], 1, "pv", 3_000)))
        assertEquals(2, again.calls)
        reopened.close()
    }

    @Test
    fun aStateRefreshedForAnotherBundleIsIgnored() {
        val bundle = TestBundles.copyWithRefresh(TestBundles.refreshSpec())
        val historyFile = File(bundle.parentFile, "history.json")
        val manifest = BundleManifest.load(bundle)
        val other = FloatArray(manifest.userState.size) { 9f }
        RefreshedState.save(RefreshedState.fileFor(historyFile), RefreshedState("0".repeat(64), other, 0, 0))
        TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, { _, _ -> ConstantGradient(null) }).use { rec ->
            assertArrayEquals(manifest.userState, rec.userState(), 0f)
        }
        RefreshedState.save(RefreshedState.fileFor(historyFile), RefreshedState(manifest.sha256, other, 0, 0))
        TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, { _, _ -> ConstantGradient(null) }).use { rec ->
            assertArrayEquals(other, rec.userState(), 0f)
        }
    }

    @Test
    fun resetRestoresTheShippedState() {
        val bundle = TestBundles.copyWithRefresh(TestBundles.refreshSpec(everyEvents = 1))
        val historyFile = File(bundle.parentFile, "history.json")
        TbsmRecommender.open(bundle, historyFile, { fail(it) }, { RowScoringInference() }, { _, _ -> ConstantGradient(null) }).use { rec ->
            val ids = rec.manifest.items.ids
            assertTrue(rec.record(Event(ids[0], 1, "pv", 1_000)))
            assertFalse(rec.userState().contentEquals(rec.manifest.userState))
            rec.resetUserState()
            assertArrayEquals(rec.manifest.userState, rec.userState(), 0f)
            assertFalse(RefreshedState.fileFor(historyFile).exists())
            assertTrue(rec.record(Event(ids[1], 1, "pv", 2_000)))
            assertTrue(RefreshedState.fileFor(historyFile).exists())
            rec.clearHistory() // the state learned from a cleared history goes with it
            assertArrayEquals(rec.manifest.userState, rec.userState(), 0f)
            assertFalse(RefreshedState.fileFor(historyFile).exists())
        }
    }

    @Test
    fun aFailedRefreshKeepsTheEventAndIsReported() {
        val bundle = TestBundles.copyWithRefresh(TestBundles.refreshSpec(everyEvents = 1))
        val historyFile = File(bundle.parentFile, "history.json")
        val problems = mutableListOf<String>()
        val broken = object : Refresh {
            override fun gradient(state: FloatArray, events: RefreshEvents): FloatArray = throw IllegalStateException("program failed")
            override fun close() {}
        }
        TbsmRecommender.open(bundle, historyFile, { problems.add(it) }, { RowScoringInference() }, { _, _ -> broken }).use { rec ->
            assertTrue(rec.record(Event(rec.manifest.items.ids[0], 1, "pv", 1_000)))
            assertEquals(1, rec.history().size)
            assertEquals(1, problems.size)
            assertTrue(problems[0], problems[0].contains("program failed"))
            assertArrayEquals(rec.manifest.userState, rec.userState(), 0f)
            assertFalse(RefreshedState.fileFor(historyFile).exists())
        }
    }

    @Test
    fun aCorruptStateFileIsReportedAndIgnored() {
        val bundle = TestBundles.copyWithRefresh(TestBundles.refreshSpec())
        val historyFile = File(bundle.parentFile, "history.json")
        RefreshedState.fileFor(historyFile).writeText("{\"manifest_sha256\":")
        val problems = mutableListOf<String>()
        TbsmRecommender.open(bundle, historyFile, { problems.add(it) }, { RowScoringInference() }, { _, _ -> ConstantGradient(null) }).use { rec ->
            assertEquals(1, problems.size)
            assertArrayEquals(rec.manifest.userState, rec.userState(), 0f)
            assertFalse(RefreshedState.fileFor(historyFile).exists())
        }
    }
}

/** A stand-in for refresh.pte: a fixed gradient (by default 0.1 on every element); counts calls, keeps the last events. */
class ConstantGradient(private val gradient: FloatArray?) : Refresh {
    var calls = 0
    var lastEvents: RefreshEvents? = null

    override fun gradient(state: FloatArray, events: RefreshEvents): FloatArray {
        calls += 1
        lastEvents = events
        return gradient?.copyOf() ?: FloatArray(state.size) { 0.1f }
    }

    override fun close() {}
}
