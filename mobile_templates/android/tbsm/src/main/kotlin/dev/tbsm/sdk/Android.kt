package dev.tbsm.sdk

import android.content.Context
import java.io.File

/**
 * Opens the bundle kept in the app's files directory (filesDir/tbsm/bundle; the history lives in
 * filesDir/tbsm/history.json). With [copyFromAssets], the bundle is first copied from that assets
 * folder, unless the copy already there has the same manifest (a copy that fails its sha256 check is
 * replaced). ExecuTorch reads a file path only, so a bundle inside the APK has to be copied out once.
 * Throws [HistoryUnavailableException] when the history file exists but cannot be read now.
 */
@JvmOverloads
fun TbsmRecommender.Companion.open(
    context: Context,
    copyFromAssets: String? = null,
    onHistoryProblem: (String) -> Unit = {},
): TbsmRecommender {
    val root = File(context.filesDir, "tbsm")
    val bundleDir = File(root, "bundle")
    val historyFile = File(root, "history.json")
    if (copyFromAssets == null) return TbsmRecommender.open(bundleDir, historyFile, onHistoryProblem)
    copyBundle(context, copyFromAssets, bundleDir, force = false)
    return try {
        TbsmRecommender.open(bundleDir, historyFile, onHistoryProblem)
    } catch (e: BundleException) {
        copyBundle(context, copyFromAssets, bundleDir, force = true) // a damaged copy: copy again, once
        TbsmRecommender.open(bundleDir, historyFile, onHistoryProblem)
    }
}

private fun copyBundle(context: Context, assetDir: String, bundleDir: File, force: Boolean) {
    val assets = context.assets
    val manifest = assets.open("$assetDir/manifest.json").use { it.readBytes() }
    val current = File(bundleDir, "manifest.json")
    if (!force && current.isFile && current.readBytes().contentEquals(manifest)) return
    val tmp = File(bundleDir.path + ".tmp")
    tmp.deleteRecursively()
    tmp.mkdirs()
    for (name in assets.list(assetDir) ?: emptyArray()) {
        assets.open("$assetDir/$name").use { input -> File(tmp, name).outputStream().use { input.copyTo(it) } }
    }
    bundleDir.deleteRecursively()
    check(tmp.renameTo(bundleDir)) { "cannot move the bundle to $bundleDir" }
}
