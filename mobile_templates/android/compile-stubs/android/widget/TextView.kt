// Compile-only stub of android.widget.TextView. Not for apps.
package android.widget

import android.content.Context
import android.view.View

open class TextView(context: Context) : View(context) {
    open var text: CharSequence
        get() = throw UnsupportedOperationException("stub")
        set(value) = throw UnsupportedOperationException("stub")
}
