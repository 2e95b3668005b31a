// Compile-only stub of org.pytorch.executorch.Tensor (executorch-android 1.5.1). Not for apps.
package org.pytorch.executorch

abstract class Tensor private constructor() {
    open val dataAsFloatArray: FloatArray
        get() = throw UnsupportedOperationException("stub")

    companion object {
        @JvmStatic
        fun fromBlob(data: LongArray, shape: LongArray): Tensor = throw UnsupportedOperationException("stub")

        @JvmStatic
        fun fromBlob(data: FloatArray, shape: LongArray): Tensor = throw UnsupportedOperationException("stub")
    }
}
