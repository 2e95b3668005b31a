// Compile-only stub of androidx.test.ext.junit.runners.AndroidJUnit4. Not for apps.
package androidx.test.ext.junit.runners

import org.junit.runners.BlockJUnit4ClassRunner

class AndroidJUnit4(klass: Class<*>) : BlockJUnit4ClassRunner(klass)
