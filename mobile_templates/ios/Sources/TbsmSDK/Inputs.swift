import Foundation

/// The six int64 inputs of model.pte, in the program's order (manifest program.inputs).
public struct ModelInputs {
    public let histItems: [Int64]
    public let histCategories: [Int64]
    public let histBehaviors: [Int64]
    public let histTimestamps: [Int64]
    public let requestTime: [Int64]
    public let candidates: [Int64]

    public func all() -> [[Int64]] { [histItems, histCategories, histBehaviors, histTimestamps, requestTime, candidates] }
}

public enum InputBuilder {
    /// Maps global ids to local rows and left-pads the history: the last maxHistory `events` (oldest
    /// first) end at index maxHistory - 1; padding slots hold the padding rows, behaviour 0, timestamp 0.
    public static func build(_ manifest: BundleManifest, _ events: [Event], _ requestTime: Int64, _ candidateIds: [Int64]) throws -> ModelInputs {
        if candidateIds.count < 1 || candidateIds.count > manifest.maxCandidates {
            throw TbsmError.invalidArgument("candidates: need 1..\(manifest.maxCandidates), got \(candidateIds.count)")
        }
        let t = manifest.maxHistory
        let recent = Array(events.suffix(t))
        let pad = t - recent.count
        var items = [Int64](repeating: manifest.items.paddingRow, count: t)
        var categories = [Int64](repeating: manifest.categories.paddingRow, count: t)
        var behaviors = [Int64](repeating: 0, count: t)
        var timestamps = [Int64](repeating: 0, count: t)
        for (k, e) in recent.enumerated() {
            items[pad + k] = manifest.items.row(e.itemId)
            categories[pad + k] = manifest.categories.row(e.categoryId)
            guard let code = manifest.behaviors[e.behavior] else { throw TbsmError.invalidArgument("unknown behavior \(e.behavior)") }
            behaviors[pad + k] = code
            timestamps[pad + k] = e.timestamp
        }
        let candidates = candidateIds.map { manifest.items.row($0) }
        return ModelInputs(
            histItems: items, histCategories: categories, histBehaviors: behaviors, histTimestamps: timestamps,
            requestTime: [requestTime], candidates: candidates
        )
    }
}

/// Runs model.pte. `ExecuTorchInference` is the real one; tests may pass another.
public protocol Inference: AnyObject {
    /// One score per candidate, in candidate order.
    func scores(_ inputs: ModelInputs) throws -> [Float]

    /// Frees the model; `TbsmRecommender.close()` calls it once, never during `scores`.
    /// (Kotlin: AutoCloseable.close.)
    func close()
}

public extension Inference {
    func close() {}
}
