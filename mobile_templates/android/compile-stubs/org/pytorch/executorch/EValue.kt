// Compile-only stub of org.pytorch.executorch.EValue (executorch-android 1.5.1). Not for apps.
package org.pytorch.executorch

class EValue private constructor() {
    fun toTensor(): Tensor = throw UnsupportedOperationException("stub")

    companion object {
        @JvmStatic
        fun from(tensor: Tensor): EValue = throw UnsupportedOperationException("stub")
    }
}
