package dev.tbsm.sdk

import java.io.File
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/**
 * model.pte through the ExecuTorch Android runtime (org.pytorch:executorch-android). The forward method
 * is loaded here, so a bad or incompatible .pte fails at open (BundleException) rather than at the first
 * rank, as on iOS. [scores] and [close] are mutually exclusive; [close] is idempotent.
 */
class ExecuTorchInference(modelFile: File) : Inference {
    private val module: Module = Module.load(modelFile.absolutePath)
    private var closed = false

    init {
        val status = module.loadMethod("forward")
        if (status != 0) {
            module.destroy()
            throw BundleException("cannot load method forward of $modelFile: ExecuTorch error 0x${status.toString(16)}")
        }
    }

    @Synchronized
    override fun scores(inputs: ModelInputs): FloatArray {
        check(!closed) { "the ExecuTorch module is closed" }
        val args = inputs.longInputs().map { EValue.from(Tensor.fromBlob(it, longArrayOf(it.size.toLong()))) } +
            EValue.from(Tensor.fromBlob(inputs.userState, longArrayOf(inputs.userState.size.toLong())))
        val outputs = module.forward(*args.toTypedArray())
        check(outputs.isNotEmpty()) { "forward returned no output" }
        return outputs[0].toTensor().dataAsFloatArray
    }

    @Synchronized
    override fun close() {
        if (closed) return
        closed = true
        module.destroy()
    }
}
