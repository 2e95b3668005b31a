package dev.tbsm.sdk

import java.io.File
import java.io.IOException
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNotSame
import org.junit.Assert.assertSame
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
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

    @Test
    fun missingFileIsAnEmptyHistoryAndNoProblem() {
        val file = File(TestBundles.tempDir(), "history.json")
        val h = HistoryStore.load(file, TestBundles.smallManifest()) { throw AssertionError(it) }
        assertEquals(0, h.size)
        assertFalse(file.exists())
    }

    @Test
    fun saveReplacesTheFileAtomically() {
        val manifest = TestBundles.smallManifest()
        val dir = TestBundles.tempDir()
        val file = File(dir, "history.json")
        val h = HistoryBuffer(7, 4).also { it.add(event(1)) }
        HistoryStore.save(file, h)
        // A write interrupted before its rename (power loss) leaves "<file>.new": the old history stays.
        File(file.path + ".new").writeText("{\"user_id\":7,\"ev")
        assertEquals(h.events(), HistoryStore.load(file, manifest) { throw AssertionError(it) }.events())
        h.add(event(2))
        HistoryStore.save(file, h)
        assertEquals(setOf("history.json"), dir.list()!!.toSet()) // no temporary file left behind
        assertEquals(h.toJson(), file.readText())
        // A backup left by an older AtomicFile is what an interrupted old-style write leaves: it wins.
        File(file.path + ".bak").writeText(HistoryBuffer(7, 4).also { it.add(event(5)) }.toJson())
        assertEquals(listOf(5L), HistoryStore.load(file, manifest) { throw AssertionError(it) }.events().map { it.timestamp })
    }

    @Test
    fun aFailedSaveChangesNothing() {
        val manifest = TestBundles.smallManifest()
        val file = File(TestBundles.tempDir(), "history.json")
        val store = HistoryStore.open(file, manifest) { throw AssertionError(it) }
        try {
            assertTrue(store.record(event(1)))
            val saved = file.readText()
            // Make the write fail: "<file>.new" cannot be created (works as root too, unlike a read-only dir).
            val blocker = File(file.path + ".new").also { it.mkdirs(); File(it, "x").writeText("x") }
            for (change in listOf<() -> Unit>({ store.record(event(2)) }, { store.clear() })) {
                try {
                    change()
                    fail("the save did not fail")
                } catch (e: IOException) {
                    // expected
                }
                assertEquals(listOf(1L), store.events().map { it.timestamp })
                assertEquals(saved, file.readText())
            }
            blocker.deleteRecursively()
            assertTrue(store.record(event(2)))
            assertEquals(listOf(1L, 2L), HistoryStore.load(file, manifest) { throw AssertionError(it) }.events().map { it.timestamp })
        } finally {
            store.release()
        }
    }

    @Test
    fun unreadableFileIsNotResetButReported() {
        val manifest = TestBundles.smallManifest()
        val dir = TestBundles.tempDir()
        // A path that exists but cannot be read as a file (as root, a chmod 000 file is still readable).
        val file = File(dir, "history.json").also { it.mkdirs() }
        for (attempt in 1..2) {
            try {
                HistoryStore.open(file, manifest) { throw AssertionError(it) }
                fail("opened an unreadable history")
            } catch (e: HistoryUnavailableException) {
                assertTrue(e.message!!, e.message!!.contains("cannot read"))
            }
            assertTrue(file.isDirectory)
            assertFalse(File(file.path + ".corrupt").exists())
        }
        // Once it can be read again (storage unlocked), its history is there.
        file.delete()
        HistoryStore.save(file, HistoryBuffer(7, 4).also { it.add(event(3)) })
        val unreadable = file.setReadable(false, false) && !file.canRead()
        if (unreadable) { // not root: the usual case of an existing file the process cannot read now
            try {
                HistoryStore.load(file, manifest) { throw AssertionError(it) }
                fail("loaded an unreadable history")
            } catch (e: HistoryUnavailableException) {
                // expected
            }
            file.setReadable(true, false)
        }
        assertEquals(listOf(3L), HistoryStore.load(file, manifest) { throw AssertionError(it) }.events().map { it.timestamp })
    }

    @Test
    fun oneStorePerHistoryFile() {
        val manifest = TestBundles.smallManifest()
        val dir = TestBundles.tempDir()
        val file = File(dir, "history.json")
        val a = HistoryStore.open(file, manifest) { throw AssertionError(it) }
        val b = HistoryStore.open(File(dir, "../${dir.name}/./history.json"), manifest) { throw AssertionError(it) }
        assertSame(a, b)
        assertTrue(a.record(event(1)))
        assertEquals(listOf(1L), b.events().map { it.timestamp })
        try {
            HistoryStore.open(file, TestBundles.smallManifest(maxHistory = 9)) {}
            fail("shared a store across two max_history values")
        } catch (e: IllegalStateException) {
            // expected
        }
        a.release()
        assertSame(b, HistoryStore.open(file, manifest) {})
        b.release()
        b.release()
        val c = HistoryStore.open(file, manifest) { throw AssertionError(it) }
        assertNotSame(a, c) // all released: the next open reads the file again
        assertEquals(listOf(1L), c.events().map { it.timestamp })
        c.release()
    }
}
