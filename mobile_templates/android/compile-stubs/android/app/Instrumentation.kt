// Compile-only stub of android.app.Instrumentation. Not for apps.
package android.app

import android.content.Context

abstract class Instrumentation {
    abstract val targetContext: Context
}
