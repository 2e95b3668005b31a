// Compile-only stub of androidx.test.platform.app.InstrumentationRegistry. Not for apps.
package androidx.test.platform.app

import android.app.Instrumentation

object InstrumentationRegistry {
    @JvmStatic
    fun getInstrumentation(): Instrumentation = throw UnsupportedOperationException("stub")
}
