// A working JVM stand-in for androidx.core.util.AtomicFile (androidx.core:core 1.15.0): the same public
// members and the same file protocol, so the template's history store can be unit-tested with plain
// kotlinc. Apps get the real class from androidx.core through Gradle; this folder is never part of an app.
//
// Protocol (as in androidx): startWrite() opens "<base>.new"; finishWrite() fsyncs it, closes it and
// renames it over the base file; failWrite() fsyncs, closes and deletes it; openRead()/readFully()
// first restore a legacy "<base>.bak" left by older releases and drop a "<base>.new" when the base file
// exists. As in androidx, a failed fsync or rename in finishWrite/failWrite is logged, not thrown.
package androidx.core.util

import java.io.File
import java.io.FileInputStream
import java.io.FileNotFoundException
import java.io.FileOutputStream
import java.io.IOException

open class AtomicFile(private val baseName: File) {
    private val newName = File(baseName.path + ".new")
    private val legacyBackupName = File(baseName.path + ".bak")

    val baseFile: File
        get() = baseName

    fun delete() {
        baseName.delete()
        newName.delete()
        legacyBackupName.delete()
    }

    @Throws(IOException::class)
    fun startWrite(): FileOutputStream {
        if (legacyBackupName.exists()) rename(legacyBackupName, baseName)
        return try {
            FileOutputStream(newName)
        } catch (e: FileNotFoundException) {
            val parent = newName.parentFile
            if (parent == null || !parent.mkdirs()) throw IOException("Failed to create directory for $newName", e)
            try {
                FileOutputStream(newName)
            } catch (e2: FileNotFoundException) {
                throw IOException("Failed to create new file $newName", e2)
            }
        }
    }

    fun finishWrite(str: FileOutputStream?) {
        if (str == null) return
        syncAndClose(str)
        rename(newName, baseName)
    }

    fun failWrite(str: FileOutputStream?) {
        if (str == null) return
        syncAndClose(str)
        if (!newName.delete()) log("Failed to delete new file $newName")
    }

    private fun syncAndClose(str: FileOutputStream) {
        if (!sync(str)) log("Failed to sync file output stream")
        try {
            str.close()
        } catch (e: IOException) {
            log("Failed to close file output stream: $e")
        }
    }

    @Throws(FileNotFoundException::class)
    fun openRead(): FileInputStream {
        if (legacyBackupName.exists()) rename(legacyBackupName, baseName)
        if (newName.exists() && baseName.exists() && !newName.delete()) log("Failed to delete outdated new file $newName")
        return FileInputStream(baseName)
    }

    @Throws(IOException::class)
    fun readFully(): ByteArray = openRead().use { it.readBytes() }

    companion object {
        private fun sync(stream: FileOutputStream): Boolean = try {
            stream.fd.sync()
            true
        } catch (e: IOException) {
            false
        }

        private fun rename(source: File, target: File) {
            if (target.isDirectory && !target.delete()) log("Failed to delete file which is a directory $target")
            if (!source.renameTo(target)) log("Failed to rename $source to $target")
        }

        private fun log(message: String) = System.err.println("AtomicFile: $message")
    }
}
