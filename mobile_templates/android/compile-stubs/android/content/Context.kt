// Compile-only stub of android.content.Context: the members the template uses. Not for apps.
package android.content

import android.content.res.AssetManager
import java.io.File

abstract class Context {
    abstract val filesDir: File
    abstract val assets: AssetManager
}
