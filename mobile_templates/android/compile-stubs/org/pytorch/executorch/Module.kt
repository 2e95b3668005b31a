// Compile-only stub of org.pytorch.executorch.Module (executorch-android 1.5.1). Not for apps.
package org.pytorch.executorch

open class Module private constructor() {
    open fun forward(vararg inputs: EValue): Array<EValue> = throw UnsupportedOperationException("stub")

    open fun execute(methodName: String, vararg inputs: EValue): Array<EValue> = throw UnsupportedOperationException("stub")

    /** 0 (Error::Ok) when the method loaded, else an ExecuTorch error code. */
    open fun loadMethod(methodName: String?): Int = throw UnsupportedOperationException("stub")

    open fun destroy(): Unit = throw UnsupportedOperationException("stub")

    companion object {
        @JvmStatic
        fun load(modelPath: String?): Module = throw UnsupportedOperationException("stub")
    }
}
