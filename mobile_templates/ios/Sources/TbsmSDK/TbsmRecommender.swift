import Foundation

/// Ranks items for the bundle's user with the on-device history.
///
/// Thread-safe: calls are serialised, and `close()` waits for a running `rank`; after `close()`, every
/// call throws `TbsmError.illegalState`. `rank` runs the model on the calling thread, so call it off the
/// main thread. Recommenders opened on the same history file share one `HistoryStore`.
public final class TbsmRecommender {
    public struct Scored: Equatable {
        public let itemId: Int64
        public let score: Float
    }

    public let manifest: BundleManifest
    private let inference: Inference
    private let store: HistoryStore
    private let lock = NSLock()
    private var closed = false

    init(manifest: BundleManifest, inference: Inference, store: HistoryStore) {
        self.manifest = manifest
        self.inference = inference
        self.store = store
    }

    deinit { close() }

    private func checkOpen() throws {
        if closed { throw TbsmError.illegalState("this TbsmRecommender is closed") }
    }

    /// Adds `event` to the history and persists it. Returns false, recording nothing, when the event is
    /// older than the last recorded one (the history is a time series: record events as they happen).
    /// The history is saved before it changes: when the save throws, nothing is recorded.
    @discardableResult
    public func record(_ event: Event) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        if manifest.behaviors[event.behavior] == nil { throw TbsmError.invalidArgument("unknown behavior \(event.behavior)") }
        if event.itemId < 0 || event.categoryId < 0 || event.timestamp < 0 { throw TbsmError.invalidArgument("ids and timestamp must be >= 0") }
        return try store.record(event)
    }

    public func history() throws -> [Event] {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        return store.events()
    }

    public func clearHistory() throws {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        try store.clear()
    }

    /// Scores `candidateIds` (global item ids, at most manifest.maxCandidates), best first.
    public func rank(_ candidateIds: [Int64], requestTime: Int64 = Int64(Date().timeIntervalSince1970)) throws -> [Scored] {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        if candidateIds.isEmpty { return [] }
        let scores = try inference.scores(InputBuilder.build(manifest, store.events(), requestTime, candidateIds))
        if scores.count != candidateIds.count { throw TbsmError.bundle("model returned \(scores.count) scores for \(candidateIds.count) items") }
        // Stable: equal scores keep candidate order, like Kotlin's sortedByDescending.
        let order = candidateIds.indices.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }
        return order.map { Scored(itemId: candidateIds[$0], score: scores[$0]) }
    }

    /// Frees the model and gives back the history store; waits for a running `rank`. Idempotent (and
    /// called by deinit).
    public func close() {
        lock.lock()
        defer { lock.unlock() }
        if closed { return }
        closed = true
        inference.close()
        store.release()
    }

    /// Opens the bundle in `bundleDir`: checks format_version and the sha256 of every file, opens the
    /// history in `historyFile` (shared with any recommender already open on that file; a corrupt file
    /// is reported through `onHistoryProblem` and replaced by an empty history; a file that cannot be
    /// read throws `HistoryUnavailableException`) and loads model.pte with its forward method.
    public static func open(
        bundleDir: URL,
        historyFile: URL? = nil,
        onHistoryProblem: (String) -> Void = { _ in },
        inference: (URL) throws -> Inference = { try ExecuTorchInference(modelFile: $0) }
    ) throws -> TbsmRecommender {
        let manifest = try BundleManifest.load(bundleDir)
        let file = historyFile ?? bundleDir.deletingLastPathComponent().appendingPathComponent("tbsm-history.json")
        let store = try HistoryStore.open(file, manifest, onHistoryProblem)
        let model: Inference
        do {
            model = try inference(bundleDir.appendingPathComponent("model.pte"))
        } catch {
            store.release()
            throw error
        }
        return TbsmRecommender(manifest: manifest, inference: model, store: store)
    }

    /// Opens the bundle folder `resourceFolder` shipped in the app (the counterpart of Android's
    /// copyFromAssets: app resources are plain files on iOS, so nothing is copied). The history lives
    /// in Application Support/tbsm/history.json.
    public static func open(
        resourceFolder: String = "tbsm",
        in bundle: Bundle = .main,
        onHistoryProblem: (String) -> Void = { _ in }
    ) throws -> TbsmRecommender {
        guard let dir = bundle.url(forResource: resourceFolder, withExtension: nil) else {
            throw TbsmError.bundle("no folder \(resourceFolder) in the app bundle")
        }
        let support = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        return try open(bundleDir: dir, historyFile: support.appendingPathComponent("tbsm/history.json"), onHistoryProblem: onHistoryProblem)
    }
}
