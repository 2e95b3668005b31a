package dev.tbsm.sample

import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import dev.tbsm.sdk.BundleManifest
import dev.tbsm.sdk.ExecuTorchInference
import dev.tbsm.sdk.ExecuTorchRefresh
import dev.tbsm.sdk.GoldenSet
import dev.tbsm.sdk.TbsmRecommender
import dev.tbsm.sdk.open
import java.io.File
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import org.junit.runner.RunWith

/** Replays golden.json of the shipped bundle through ExecuTorch on the device: no fakes. */
@RunWith(AndroidJUnit4::class)
class GoldenOnDeviceTest {
    @Test
    fun goldenScoresMatchOnDevice() {
        val context = InstrumentationRegistry.getInstrumentation().targetContext
        TbsmRecommender.open(context, copyFromAssets = "tbsm").close()
        val dir = File(context.filesDir, "tbsm/bundle")
        val manifest = BundleManifest.load(dir)
        val golden = GoldenSet.load(File(dir, "golden.json"), manifest.historyCapacity)
        val diff = ExecuTorchInference(File(dir, "model.pte")).use { golden.maxAbsDiff(manifest, it) }
        assertTrue("max abs diff $diff > tolerance ${golden.tolerance}", diff <= golden.tolerance)
    }

    @Test
    fun goldenRefreshCasesMatchOnDevice() {
        val context = InstrumentationRegistry.getInstrumentation().targetContext
        TbsmRecommender.open(context, copyFromAssets = "tbsm").close()
        val dir = File(context.filesDir, "tbsm/bundle")
        val manifest = BundleManifest.load(dir)
        val spec = manifest.refresh ?: return // a bundle built without --refresh has nothing to replay
        val golden = GoldenSet.load(File(dir, "golden.json"), manifest.historyCapacity)
        val failed = ExecuTorchRefresh(File(dir, spec.file), spec.method).use { golden.failedRefreshCases(manifest, it) }
        assertEquals(emptyList<String>(), failed)
    }
}
