import Foundation

/// Ranks items for the bundle's user with the on-device history and, when the bundle has a refresh
/// program (manifest refresh), the user state refreshed on the device from that history.
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
    private let refresh: Refresh?
    private let onHistoryProblem: (String) -> Void
    private let lock = NSLock()
    private var closed = false

    init(manifest: BundleManifest, inference: Inference, store: HistoryStore, refresh: Refresh?, onHistoryProblem: @escaping (String) -> Void) {
        self.manifest = manifest
        self.inference = inference
        self.store = store
        self.refresh = refresh
        self.onHistoryProblem = onHistoryProblem
    }

    deinit { close() }

    private func checkOpen() throws {
        if closed { throw TbsmError.illegalState("this TbsmRecommender is closed") }
    }

    /// Adds `event` to the history and persists it. Returns false, recording nothing, when the event is
    /// older than the last recorded one (the history is a time series: record events as they happen).
    /// The history is saved before it changes: when the save throws, nothing is recorded.
    ///
    /// With a refresh program, a recorded event that brings the history every_events events past the last
    /// refresh runs the refresh loop here, on the calling thread, and saves the new user state; a refresh
    /// that fails is reported through onHistoryProblem (the event stays recorded, the state stays as it
    /// was, and the next event tries again).
    @discardableResult
    public func record(_ event: Event) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        if manifest.behaviors[event.behavior] == nil { throw TbsmError.invalidArgument("unknown behavior \(event.behavior)") }
        if event.itemId < 0 || event.categoryId < 0 || event.timestamp < 0 { throw TbsmError.invalidArgument("ids and timestamp must be >= 0") }
        if !(try store.record(event)) { return false }
        if let refresh = refresh {
            do {
                try store.refreshIfDue(refresh)
            } catch {
                onHistoryProblem("user state refresh failed: \(error)")
            }
        }
        return true
    }

    /// The user state ranking uses: the one refreshed on the device for this bundle, else the shipped one.
    public func userState() throws -> [Float] {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        return store.userState()
    }

    /// Forgets the refreshed user state: ranking goes back to the shipped one. Throws if it cannot be deleted.
    public func resetUserState() throws {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        try store.resetUserState()
    }

    public func history() throws -> [Event] {
        lock.lock()
        defer { lock.unlock() }
        try checkOpen()
        return store.events()
    }

    /// Empties the history and forgets the user state refreshed from it.
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
        let scores = try inference.scores(InputBuilder.build(manifest, store.events(), requestTime, candidateIds, userState: store.userState()))
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
        refresh?.close()
        store.release()
    }

    /// Opens the bundle in `bundleDir`: checks format_version and the sha256 of every file, opens the
    /// history in `historyFile` (shared with any recommender already open on that file; a corrupt file
    /// is reported through `onHistoryProblem` and replaced by an empty history; a file that cannot be
    /// read throws `HistoryUnavailableException`) and loads model.pte with its forward method, and the
    /// refresh program when the manifest has one (its state file lives beside `historyFile`).
    public static func open(
        bundleDir: URL,
        historyFile: URL? = nil,
        onHistoryProblem: @escaping (String) -> Void = { _ in },
        inference: (URL) throws -> Inference = { try ExecuTorchInference(modelFile: $0) },
        refresh: (URL, RefreshSpec) throws -> Refresh = { try ExecuTorchRefresh(programFile: $0, method: $1.method) }
    ) throws -> TbsmRecommender {
        let manifest = try BundleManifest.load(bundleDir)
        let file = historyFile ?? bundleDir.deletingLastPathComponent().appendingPathComponent("tbsm-history.json")
        let store = try HistoryStore.open(file, manifest, onHistoryProblem)
        var model: Inference?
        do {
            let loaded = try inference(bundleDir.appendingPathComponent("model.pte"))
            model = loaded
            let refresher = try manifest.refresh.map { try refresh(bundleDir.appendingPathComponent($0.file), $0) }
            return TbsmRecommender(manifest: manifest, inference: loaded, store: store, refresh: refresher, onHistoryProblem: onHistoryProblem)
        } catch {
            model?.close()
            store.release()
            throw error
        }
    }

    /// Opens the bundle folder `resourceFolder` shipped in the app (the counterpart of Android's
    /// copyFromAssets: app resources are plain files on iOS, so nothing is copied). The history lives
    /// in Application Support/tbsm/history.json.
    public static func open(
        resourceFolder: String = "tbsm",
        in bundle: Bundle = .main,
        onHistoryProblem: @escaping (String) -> Void = { _ in }
    ) throws -> TbsmRecommender {
        guard let dir = bundle.url(forResource: resourceFolder, withExtension: nil) else {
            throw TbsmError.bundle("no folder \(resourceFolder) in the app bundle")
        }
        let support = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        return try open(bundleDir: dir, historyFile: support.appendingPathComponent("tbsm/history.json"), onHistoryProblem: onHistoryProblem)
    }
}
