package dev.tbsm.sdk

import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Test

class IdShardTest {
    private val shard = IdShard(longArrayOf(10, 20, 30), firstRow = 2, oovRow = 1, paddingRow = 0)

    @Test
    fun knownIdsMapToTheirRow() {
        assertEquals(2L, shard.row(10))
        assertEquals(3L, shard.row(20))
        assertEquals(4L, shard.row(30))
    }

    @Test
    fun unknownIdsMapToTheOovRow() {
        for (id in listOf(0L, 5L, 15L, 25L, 31L, Long.MAX_VALUE)) assertEquals(1L, shard.row(id))
    }

    @Test
    fun realManifestMapsEveryIdToItsIndex() {
        val manifest = BundleManifest.load(TestBundles.realBundle())
        for ((i, id) in manifest.items.ids.withIndex()) assertEquals(i + manifest.items.firstRow, manifest.items.row(id))
        for ((i, id) in manifest.categories.ids.withIndex()) assertEquals(i + manifest.categories.firstRow, manifest.categories.row(id))
    }

    @Test
    fun decodesTheManifestIdEncoding() {
        // sdk_builder.formats.encode_ids of these ids: differences of 1, 2 and 3 units (2^23 - 1 the largest
        // of one unit, 2^23 the smallest of two), up to the largest int64.
        val ids = longArrayOf(5, 6, 300, 300 + (1L shl 23) - 1, 300 + (1L shl 24) - 1, (1L shl 46) + 7, 1L shl 62, Long.MAX_VALUE)
        assertArrayEquals(ids, IdShard.decodeIds("AAAFAAABAAEmf///gAAAAAAB//7cf//9///5////AP/+////////AP//"))
        assertArrayEquals(longArrayOf(), IdShard.decodeIds(""))
    }

    @Test
    fun brokenIdEncodingsFailNamingTheField() {
        val broken = listOf(
            "AAA!" to "not base64", "AAA=" to "not base64", "AAAAAA" to "truncated unit", "gAAA" to "truncated value",
            "AAABAAAA" to "repeats", "gAAAgAAAgAAAAAAA" to "more than 3 units", "////////AgAA" to "exceeds int64",
            "////////Af//AAAB" to "exceeds int64",
        )
        for ((text, reason) in broken) {
            val shard = JSONObject().put("ids", text).put("first_row", 2).put("oov_row", 1).put("padding_row", 0)
            val e = assertThrows(BundleException::class.java) { IdShard.parse(shard, "items") }
            val message = e.message!!
            assertTrue(message, message.startsWith("manifest.json items.ids: ") && reason in message && '\n' !in message)
        }
    }
}
