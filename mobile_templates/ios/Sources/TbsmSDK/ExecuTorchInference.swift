import ExecuTorch
import Foundation

/// model.pte through the ExecuTorch runtime (SwiftPM products executorch, backend_xnnpack, kernels).
public final class ExecuTorchInference: Inference {
    private let module: Module

    public init(modelFile: URL) throws {
        module = Module(filePath: modelFile.path)
        try module.load("forward")
    }

    public func scores(_ inputs: ModelInputs) throws -> [Float] {
        let args: [ValueConvertible] = inputs.all().map { Tensor<Int64>($0, shape: [$0.count]) }
        let outputs: [Value] = try module.forward(args)
        guard let scores: Tensor<Float> = outputs.first?.tensor() else {
            throw TbsmError.bundle("output 0 of model.pte is not a float32 tensor")
        }
        return scores.scalars()
    }
}
