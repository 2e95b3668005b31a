package dev.tbsm.sdk

import java.io.File
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Test

class InputBuilderTest {
    private val manifest = TestBundles.smallManifest(maxHistory = 4)

    @Test
    fun leftPadsAShortHistory() {
        val events = listOf(Event(200, 9, "buy", 50), Event(999, 5, "fav", 60))
        val inputs = InputBuilder.build(manifest, events, 100, listOf(300, 100, 42))
        assertArrayEquals(longArrayOf(0, 0, 3, 1), inputs.histItems)
        assertArrayEquals(longArrayOf(0, 0, 3, 2), inputs.histCategories)
        assertArrayEquals(longArrayOf(0, 0, 2, 4), inputs.histBehaviors)
        assertArrayEquals(longArrayOf(0, 0, 50, 60), inputs.histTimestamps)
        assertArrayEquals(longArrayOf(100), inputs.requestTime)
        assertArrayEquals(longArrayOf(4, 2, 1), inputs.candidates)
    }

    @Test
    fun keepsTheLastMaxHistoryEvents() {
        val events = (1L..6L).map { Event(100, 5, "pv", it) }
        assertArrayEquals(longArrayOf(3, 4, 5, 6), InputBuilder.build(manifest, events, 10, listOf(100)).histTimestamps)
    }

    @Test(expected = IllegalArgumentException::class)
    fun refusesNoCandidates() {
        InputBuilder.build(manifest, emptyList(), 10, emptyList())
    }

    @Test(expected = IllegalArgumentException::class)
    fun refusesTooManyCandidates() {
        InputBuilder.build(manifest, emptyList(), 10, List(9) { 100L })
    }

    @Test(expected = IllegalArgumentException::class)
    fun refusesAnUnknownBehavior() {
        InputBuilder.build(manifest, listOf(Event(100, 5, "like", 1)), 10, listOf(100))
    }

    @Test
    fun goldenCasesMapLikeALinearScan() {
        val dir = TestBundles.realBundle()
        val real = BundleManifest.load(dir)
        fun scan(shard: IdShard, id: Long): Long {
            val i = shard.ids.indexOf(id)
            return if (i >= 0) i + shard.firstRow else shard.oovRow
        }
        for (case in GoldenSet.load(File(dir, "golden.json"), real.maxHistory).cases) {
            val events = case.history.events()
            val inputs = InputBuilder.build(real, events, case.requestTime, case.candidates)
            val pad = real.maxHistory - events.size
            assertEquals(real.maxHistory, inputs.histItems.size)
            for (k in 0 until pad) assertEquals(real.items.paddingRow, inputs.histItems[k])
            for ((k, e) in events.withIndex()) {
                assertEquals(scan(real.items, e.itemId), inputs.histItems[pad + k])
                assertEquals(scan(real.categories, e.categoryId), inputs.histCategories[pad + k])
                assertEquals(real.behaviors.getValue(e.behavior), inputs.histBehaviors[pad + k])
                assertEquals(e.timestamp, inputs.histTimestamps[pad + k])
            }
            assertArrayEquals(case.candidates.map { scan(real.items, it) }.toLongArray(), inputs.candidates)
        }
    }
}
