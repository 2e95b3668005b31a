package dev.tbsm.sdk

import org.junit.Assert.assertEquals
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
}
