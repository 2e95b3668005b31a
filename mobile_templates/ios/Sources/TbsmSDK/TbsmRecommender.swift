import Foundation

/// Ranks items for the bundle's user with the on-device history.
///
/// Thread-safe; `rank` runs the model on the calling thread, so call it off the main thread.
public final class TbsmRecommender {
    public struct Scored: Equatable {
        public let itemId: Int64
        public let score: Float
    }

    public let manifest: BundleManifest
    private let inference: Inference
    private let historyFile: URL
    private let buffer: HistoryBuffer
    private let lock = NSLock()

    public init(manifest: BundleManifest, inference: Inference, historyFile: URL, buffer: HistoryBuffer) {
        self.manifest = manifest
        self.inference = inference
        self.historyFile = historyFile
        self.buffer = buffer
    }

    /// Adds `event` to the history and persists it. Returns false, recording nothing, when the event is
    /// older than the last recorded one (the history is a time series: record events as they happen).
    @discardableResult
    public func record(_ event: Event) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if manifest.behaviors[event.behavior] == nil { throw TbsmError.invalidArgument("unknown behavior \(event.behavior)") }
        if event.itemId < 0 || event.categoryId < 0 || event.timestamp < 0 { throw TbsmError.invalidArgument("ids and timestamp must be >= 0") }
        if !buffer.add(event) { return false }
        try HistoryStore.save(historyFile, buffer)
        return true
    }

    public func history() -> [Event] {
        lock.lock()
        defer { lock.unlock() }
        return buffer.events()
    }

    public func clearHistory() throws {
        lock.lock()
        defer { lock.unlock() }
        buffer.clear()
        try HistoryStore.save(historyFile, buffer)
    }

    /// Scores `candidateIds` (global item ids, at most manifest.maxCandidates), best first.
    public func rank(_ candidateIds: [Int64], requestTime: Int64 = Int64(Date().timeIntervalSince1970)) throws -> [Scored] {
        lock.lock()
        defer { lock.unlock() }
        if candidateIds.isEmpty { return [] }
        let scores = try inference.scores(InputBuilder.build(manifest, buffer.events(), requestTime, candidateIds))
        if scores.count != candidateIds.count { throw TbsmError.bundle("model returned \(scores.count) scores for \(candidateIds.count) items") }
        // Stable: equal scores keep candidate order, like Kotlin's sortedByDescending.
        let order = candidateIds.indices.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }
        return order.map { Scored(itemId: candidateIds[$0], score: scores[$0]) }
    }

    /// Opens the bundle in `bundleDir`: checks format_version and the sha256 of every file, loads the
    /// history from `historyFile` (a corrupt one is reported through `onHistoryProblem` and replaced
    /// by an empty history) and loads model.pte.
    public static func open(
        bundleDir: URL,
        historyFile: URL? = nil,
        onHistoryProblem: (String) -> Void = { _ in },
        inference: (URL) throws -> Inference = { try ExecuTorchInference(modelFile: $0) }
    ) throws -> TbsmRecommender {
        let manifest = try BundleManifest.load(bundleDir)
        let file = historyFile ?? bundleDir.deletingLastPathComponent().appendingPathComponent("tbsm-history.json")
        let buffer = HistoryStore.load(file, manifest, onHistoryProblem)
        return try TbsmRecommender(manifest: manifest, inference: inference(bundleDir.appendingPathComponent("model.pte")), historyFile: file, buffer: buffer)
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
