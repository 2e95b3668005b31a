package dev.tbsm.sdk

import java.io.File
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/** model.pte through the ExecuTorch Android runtime (org.pytorch:executorch-android). */
class ExecuTorchInference(modelFile: File) : Inference {
    private val module: Module = Module.load(modelFile.absolutePath)

    override fun scores(inputs: ModelInputs): FloatArray {
        val args = inputs.all().map { EValue.from(Tensor.fromBlob(it, longArrayOf(it.size.toLong()))) }
        val outputs = module.forward(*args.toTypedArray())
        return outputs[0].toTensor().dataAsFloatArray
    }

    override fun close() = module.destroy()
}
