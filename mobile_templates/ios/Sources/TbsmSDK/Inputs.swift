import Foundation

/// The seven inputs of model.pte, in the program's order (manifest program.inputs): six int64, then user_state.
public struct ModelInputs {
    public let histItems: [Int64]
    public let histCategories: [Int64]
    public let histBehaviors: [Int64]
    public let histTimestamps: [Int64]
    public let requestTime: [Int64]
    public let candidates: [Int64]
    public let userState: [Float]

    /// The six int64 inputs, in order; `userState` (float32) follows them.
    public func longInputs() -> [[Int64]] { [histItems, histCategories, histBehaviors, histTimestamps, requestTime, candidates] }
}

/// Inputs 1-4 of refresh.pte: the last manifest.refresh.events (maxHistory + window) events, encoded like the ranking history.
public struct RefreshEvents {
    public let items: [Int64]
    public let categories: [Int64]
    public let behaviors: [Int64]
    public let timestamps: [Int64]

    public func all() -> [[Int64]] { [items, categories, behaviors, timestamps] }
}

public enum InputBuilder {
    /// Maps global ids to local rows and left-pads the history: the last maxHistory `events` (oldest
    /// first) end at index maxHistory - 1; padding slots hold the padding rows, behaviour 0, timestamp 0.
    /// `userState` is the refreshed state for this bundle, else the manifest's.
    public static func build(
        _ manifest: BundleManifest, _ events: [Event], _ requestTime: Int64, _ candidateIds: [Int64], userState: [Float]? = nil
    ) throws -> ModelInputs {
        if candidateIds.count < 1 || candidateIds.count > manifest.maxCandidates {
            throw TbsmError.invalidArgument("candidates: need 1..\(manifest.maxCandidates), got \(candidateIds.count)")
        }
        let state = userState ?? manifest.userState
        if state.count != manifest.userState.count {
            throw TbsmError.invalidArgument("user_state: need \(manifest.userState.count) values, got \(state.count)")
        }
        let history = try encode(manifest, events, manifest.maxHistory)
        let candidates = candidateIds.map { manifest.items.row($0) }
        return ModelInputs(
            histItems: history.items, histCategories: history.categories, histBehaviors: history.behaviors,
            histTimestamps: history.timestamps, requestTime: [requestTime], candidates: candidates, userState: state
        )
    }

    /// refresh.pte's event inputs: the last refresh.events (maxHistory + window) `events`, padded like the history.
    public static func refreshEvents(_ manifest: BundleManifest, _ events: [Event]) throws -> RefreshEvents {
        guard let spec = manifest.refresh else { throw TbsmError.invalidArgument("the bundle has no refresh program") }
        return try encode(manifest, events, spec.events)
    }

    private static func encode(_ manifest: BundleManifest, _ events: [Event], _ t: Int) throws -> RefreshEvents {
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
        return RefreshEvents(items: items, categories: categories, behaviors: behaviors, timestamps: timestamps)
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
