// Compile-only stub of android.content.res.AssetManager. Not for apps.
package android.content.res

import java.io.InputStream

abstract class AssetManager {
    abstract fun list(path: String): Array<String>?

    abstract fun open(fileName: String): InputStream
}
