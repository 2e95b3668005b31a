package dev.tbsm.sdk

import java.io.File
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test

class HistoryTest {
    private fun event(ts: Long, item: Long = 100) = Event(item, 5, "pv", ts)

    @Test
    fun keepsTheMostRecentCapacityEvents() {
        val h = HistoryBuffer(userId = 7, capacity = 3)
        for (ts in 1L..5L) assertTrue(h.add(event(ts)))
        assertEquals(listOf(3L, 4L, 5L), h.events().map { it.timestamp })
    }

    @Test
    fun rejectsAnEventOlderThanTheLastAndAcceptsEqualTimes() {
        val h = HistoryBuffer(7, 5)
        assertTrue(h.add(event(10)))
        assertTrue(h.add(event(10, item = 200)))
        assertFalse(h.add(event(9)))
        assertEquals(2, h.size)
    }

    @Test
    fun jsonRoundTripFollowsTheEventsSchema() {
        val h = HistoryBuffer(7, 5)
        h.add(Event(100, 5, "buy", 1_700_000_000))
        h.add(Event(200, 9, "fav", 1_700_000_100))
        val text = h.toJson()
        for (key in listOf("\"user_id\"", "\"events\"", "\"item_id\"", "\"category_id\"", "\"behavior\"", "\"timestamp\"")) {
            assertTrue(text, text.contains(key))
        }
        val back = HistoryBuffer.fromJson(text, 5)
        assertEquals(h.userId, back.userId)
        assertEquals(h.events(), back.events())
    }

    @Test
    fun missingEventsMeansAnEmptyHistory() {
        val h = HistoryBuffer.fromJson("""{"user_id":7}""", 5)
        assertEquals(7L, h.userId)
        assertEquals(0, h.size)
    }

    @Test(expected = IllegalArgumentException::class)
    fun fromJsonRefusesUnorderedEvents() {
        HistoryBuffer.fromJson(
            """{"user_id":7,"events":[{"item_id":1,"category_id":1,"behavior":"pv","timestamp":5},""" +
                """{"item_id":1,"category_id":1,"behavior":"pv","timestamp":4}]}""",
            5,
        )
    }

    @Test
    fun storeSurvivesARestart() {
        val manifest = TestBundles.smallManifest()
        val file = File(TestBundles.tempDir(), "history.json")
        val h = HistoryStore.load(file, manifest) { throw AssertionError(it) }
        h.add(event(1))
        h.add(event(2, item = 300))
        HistoryStore.save(file, h)
        val again = HistoryStore.load(file, manifest) { throw AssertionError(it) }
        assertEquals(h.events(), again.events())
    }

    @Test
    fun corruptFileStartsEmptyAndIsReported() {
        val manifest = TestBundles.smallManifest()
        val file = File(TestBundles.tempDir(), "history.json")
        for (content in listOf("{not json", """{"user_id":8,"events":[]}""", """{"user_id":7,"events":[{"item_id":1}]}""")) {
            file.writeText(content)
            val problems = mutableListOf<String>()
            val h = HistoryStore.load(file, manifest) { problems.add(it) }
            assertEquals(0, h.size)
            assertEquals(content, 1, problems.size)
            assertFalse(file.exists())
            assertTrue(File(file.path + ".corrupt").exists())
        }
    }
}
