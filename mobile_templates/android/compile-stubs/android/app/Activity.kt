// Compile-only stub of android.app.Activity: the members the sample uses. Not for apps.
package android.app

import android.content.Context
import android.content.res.AssetManager
import android.os.Bundle
import android.view.View
import java.io.File

open class Activity : Context() {
    override val filesDir: File get() = throw UnsupportedOperationException("stub")
    override val assets: AssetManager get() = throw UnsupportedOperationException("stub")

    protected open fun onCreate(savedInstanceState: Bundle?) {}

    fun setContentView(view: View): Unit = throw UnsupportedOperationException("stub")

    fun runOnUiThread(action: Runnable): Unit = throw UnsupportedOperationException("stub")
}
