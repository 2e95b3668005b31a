// Compile-only stub of android.view.View. Not for apps.
package android.view

import android.content.Context

open class View(context: Context)
