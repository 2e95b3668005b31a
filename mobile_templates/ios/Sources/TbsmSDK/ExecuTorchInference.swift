import ExecuTorch
import Foundation

/// model.pte through the ExecuTorch runtime (SwiftPM products executorch, backend_xnnpack, kernels).
/// The forward method is loaded here, so a bad or incompatible .pte fails at open (`TbsmError.bundle`)
/// rather than at the first rank. `scores` and `close` are mutually exclusive; `close` is idempotent.
public final class ExecuTorchInference: Inference {
    private var module: Module?
    private let lock = NSLock()

    public init(modelFile: URL) throws {
        let module = Module(filePath: modelFile.path)
        do {
            try module.load("forward")
        } catch {
            throw TbsmError.bundle("cannot load method forward of \(modelFile.path): \(error)")
        }
        self.module = module
    }

    public func scores(_ inputs: ModelInputs) throws -> [Float] {
        lock.lock()
        defer { lock.unlock() }
        guard let module = module else { throw TbsmError.illegalState("the ExecuTorch module is closed") }
        let args: [ValueConvertible] = inputs.longInputs().map { Tensor<Int64>($0, shape: [$0.count]) } +
            [Tensor<Float>(inputs.userState, shape: [inputs.userState.count])]
        let outputs: [Value] = try module.forward(args)
        guard let scores: Tensor<Float> = outputs.first?.tensor() else {
            throw TbsmError.bundle("output 0 of model.pte is not a float32 tensor")
        }
        return scores.scalars()
    }

    public func close() {
        lock.lock()
        defer { lock.unlock() }
        module = nil
    }
}
