package dev.tbsm.sdk

import java.io.ByteArrayOutputStream
import java.io.File
import java.io.FileOutputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest
import java.util.zip.DataFormatException
import java.util.zip.Inflater
import org.json.JSONException
import org.json.JSONObject

/**
 * Applies a bundle patch (`tbsm-sdk build --delta-from OLD`; docs/bundle-format.md, Patches): the
 * old bundle + the patch = the new bundle, byte for byte, so an app downloads a few KB instead of
 * the whole bundle.
 *
 * Atomic: the new bundle is written to `.<dir>.patch-new` beside the bundle, every file's sha256 is
 * checked (manifest.json against the header's new_manifest_sha256, the files it lists against it,
 * any other file, i.e. the signature, against the header's own sha256) and only then swapped in; a bad patch
 * throws [BundleException] and leaves the old bundle as it was. Java has no atomic directory
 * exchange, so the swap is two renames; a process killed between them leaves the old bundle at
 * `.<dir>.patch-old`, which [recover] (call it before opening the bundle) puts back.
 */
object BundlePatch {
    const val PATCH_FORMAT_VERSION = 2
    private const val COPY = 1
    private const val INSERT = 2
    private const val MAX_OPS_BYTES = 256L shl 20 // a patch of a few-hundred-KB bundle is far smaller
    private val PLAIN_FILE_NAME = Regex("^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

    /** Patches [bundleDir] in place with [patch] (the bytes of a `.patch` file); returns the new manifest. */
    fun apply(bundleDir: File, patch: ByteArray): BundleManifest =
        try {
            applyChecked(bundleDir, patch)
        } catch (e: BundleException) {
            throw e
        } catch (e: Exception) { // a header key missing or of the wrong type, an unreadable file
            throw BundleException("bundle patch: ${e.javaClass.simpleName}: ${e.message}")
        }

    private fun applyChecked(bundleDir: File, patch: ByteArray): BundleManifest {
        recover(bundleDir)
        val newline = patch.indexOf('\n'.code.toByte())
        if (newline < 0) throw BundleException("not a bundle patch (no header line)")
        val header = try {
            JSONObject(String(patch, 0, newline, Charsets.UTF_8))
        } catch (e: JSONException) {
            throw BundleException("bundle patch header is not JSON: ${e.message}")
        }
        val version = header.getInt("patch_format_version")
        if (version != PATCH_FORMAT_VERSION) {
            throw BundleException("unsupported patch_format_version $version (this SDK reads $PATCH_FORMAT_VERSION)")
        }
        val have = sha256(File(bundleDir, "manifest.json").readBytes())
        val wanted = header.getString("old_manifest_sha256")
        if (have != wanted) throw BundleException("the patch is for the bundle with manifest sha256 $wanted, not $have")
        val ops = inflate(patch, newline + 1, header.getLong("ops_size"))

        val staging = sibling(bundleDir, "patch-new")
        staging.deleteRecursively()
        if (!staging.mkdirs()) throw BundleException("cannot create $staging")
        try {
            val files = header.getJSONArray("files")
            val unchecked = mutableListOf<String>() // no sha256 in the header: the new manifest must cover them
            var pos = 0
            for (i in 0 until files.length()) {
                val entry = files.getJSONObject(i)
                val name = entry.getString("name")
                if (!PLAIN_FILE_NAME.matches(name)) throw BundleException("patch file name $name is not a plain file name")
                val old = File(bundleDir, name).let { if (it.isFile) it.readBytes() else ByteArray(0) }
                val (data, next) = rebuild(old, ops, pos, entry.getLong("size"), name)
                pos = next
                if (!entry.has("sha256")) {
                    if (name != "manifest.json") unchecked.add(name)
                } else if (sha256(data) != entry.getString("sha256")) {
                    throw BundleException("patched $name: sha256 differs from the patch's")
                }
                FileOutputStream(File(staging, name)).use { out ->
                    out.write(data)
                    out.fd.sync()
                }
            }
            if (pos != ops.size) throw BundleException("${ops.size - pos} op stream bytes left after the last file")
            if (sha256(File(staging, "manifest.json").readBytes()) != header.getString("new_manifest_sha256")) {
                throw BundleException("patched manifest.json differs from the patch's new_manifest_sha256")
            }
            val manifest = BundleManifest.load(staging) // the sha256 of every file the new manifest lists
            unchecked.firstOrNull { it !in manifest.files }?.let {
                throw BundleException("patched $it: no sha256 in the patch and not listed in the new manifest")
            }
            swap(bundleDir, staging)
            return manifest
        } catch (e: Exception) {
            staging.deleteRecursively()
            throw e
        }
    }

    /** Puts back a bundle a killed [apply] left aside between its two renames; drops a half-written new one. */
    fun recover(bundleDir: File) {
        val aside = sibling(bundleDir, "patch-old")
        if (!bundleDir.exists() && aside.isDirectory && !aside.renameTo(bundleDir)) {
            throw BundleException("cannot move $aside back to $bundleDir")
        }
        aside.deleteRecursively()
        sibling(bundleDir, "patch-new").deleteRecursively()
    }

    private fun sibling(bundleDir: File, what: String) = File(bundleDir.absoluteFile.parentFile, ".${bundleDir.name}.$what")

    private fun swap(bundleDir: File, staging: File) {
        val aside = sibling(bundleDir, "patch-old")
        if (!bundleDir.renameTo(aside)) throw BundleException("cannot move $bundleDir aside")
        if (!staging.renameTo(bundleDir)) {
            aside.renameTo(bundleDir)
            throw BundleException("cannot move the patched bundle to $bundleDir")
        }
        aside.deleteRecursively()
    }

    /** The raw DEFLATE op stream after the header: exactly [size] bytes, or BundleException. */
    private fun inflate(patch: ByteArray, offset: Int, size: Long): ByteArray {
        if (size < 0 || size > MAX_OPS_BYTES) throw BundleException("patch ops_size $size out of range")
        // zlib may read one byte past a raw DEFLATE stream (Inflater's "nowrap" note): give it one.
        val input = ByteArray(patch.size - offset + 1)
        patch.copyInto(input, 0, offset, patch.size)
        val inflater = Inflater(true)
        try {
            inflater.setInput(input)
            val out = ByteArray(size.toInt())
            var n = 0
            while (n < out.size) {
                val k = inflater.inflate(out, n, out.size - n)
                if (k == 0 && (inflater.finished() || inflater.needsInput() || inflater.needsDictionary())) break
                n += k
            }
            val more = inflater.inflate(ByteArray(1))
            if (n != out.size || more != 0 || !inflater.finished()) {
                throw BundleException("patch op stream does not inflate to its ops_size $size bytes")
            }
            return out
        } catch (e: DataFormatException) {
            throw BundleException("patch op stream is not valid DEFLATE: ${e.message}")
        } finally {
            inflater.end()
        }
    }

    /** One file from the ops starting at [start]: (its bytes, where the next file's ops start). */
    private fun rebuild(old: ByteArray, ops: ByteArray, start: Int, size: Long, name: String): Pair<ByteArray, Int> {
        val buffer = ByteBuffer.wrap(ops).order(ByteOrder.LITTLE_ENDIAN)
        fun u32(at: Int): Long {
            if (at + 4 > ops.size) throw BundleException("patch op stream ends inside an op ($name)")
            return buffer.getInt(at).toLong() and 0xffffffffL
        }
        val out = ByteArrayOutputStream()
        var pos = start
        while (out.size() < size) {
            if (pos >= ops.size) throw BundleException("patch op stream ends inside $name")
            val length: Long
            when (ops[pos].toInt()) {
                COPY -> {
                    val offset = u32(pos + 1)
                    length = u32(pos + 5)
                    if (offset + length > old.size) throw BundleException("patch copies bytes beyond the old $name")
                    if (out.size() + length > size) throw BundleException("patch ops overrun $name")
                    out.write(old, offset.toInt(), length.toInt())
                    pos += 9
                }
                INSERT -> {
                    length = u32(pos + 1)
                    if (pos + 5 + length > ops.size) throw BundleException("patch literal runs past the op stream ($name)")
                    if (out.size() + length > size) throw BundleException("patch ops overrun $name")
                    out.write(ops, pos + 5, length.toInt())
                    pos += 5 + length.toInt()
                }
                else -> throw BundleException("unknown patch op ${ops[pos]} in $name")
            }
        }
        return Pair(out.toByteArray(), pos)
    }

    private fun sha256(data: ByteArray): String =
        MessageDigest.getInstance("SHA-256").digest(data).joinToString("") { "%02x".format(it) }
}
