import ExecuTorch
import Foundation

/// Runs refresh.pte. `ExecuTorchRefresh` is the real one; tests may pass another.
public protocol Refresh: AnyObject {
    /// d loss / d user_state at `state` on `events` (output 1 of the refresh program).
    func gradient(_ state: [Float], _ events: RefreshEvents) throws -> [Float]

    /// Frees the program; `TbsmRecommender.close()` calls it once. (Kotlin: AutoCloseable.close.)
    func close()
}

public extension Refresh {
    func close() {}
}

/// The refresh loop, the same in every client (docs/bundle-format.md, on-device refresh), in float32:
/// `steps` times, state -= learning_rate * gradient, then the drift d = state - shipped is scaled back
/// onto the max_drift ball when its norm (summed in float64) exceeds max_drift.
public enum RefreshLoop {
    public static func run(_ spec: RefreshSpec, _ shipped: [Float], _ start: [Float], _ events: RefreshEvents, _ refresh: Refresh) throws -> [Float] {
        var state = start
        let learningRate = Float(spec.learningRate)
        var drift = [Float](repeating: 0, count: state.count)
        for _ in 0..<spec.steps {
            let gradient = try refresh.gradient(state, events)
            if gradient.count != state.count {
                throw TbsmError.bundle("refresh gradient has \(gradient.count) values for a state of \(state.count)")
            }
            var squares = 0.0
            for i in state.indices {
                state[i] = state[i] - learningRate * gradient[i]
                drift[i] = state[i] - shipped[i]
                squares += Double(drift[i]) * Double(drift[i])
            }
            let norm = squares.squareRoot()
            if norm > spec.maxDrift {
                let scale = Float(spec.maxDrift / norm)
                for i in state.indices { state[i] = shipped[i] + drift[i] * scale }
            }
        }
        if !state.allSatisfy({ $0.isFinite }) { throw TbsmError.illegalState("the refresh produced a non-finite user state") }
        return state
    }

    /// Events recorded after the newest one the last refresh trained on (`RefreshedState`'s marker):
    /// every event of `events` when there was none.
    public static func eventsSince(_ events: [Event], _ last: RefreshedState?) -> Int {
        guard let last = last else { return events.count }
        var newer = 0
        var atMarker = 0
        for e in events {
            if e.timestamp > last.throughTimestamp { newer += 1 } else if e.timestamp == last.throughTimestamp { atMarker += 1 }
        }
        return newer + max(0, atMarker - last.throughCount)
    }
}

/// refresh.pte through the ExecuTorch runtime's plain `Module` (its forward returns the loss and the
/// gradient: no training wrapper needed); loaded at open, like `ExecuTorchInference`.
public final class ExecuTorchRefresh: Refresh {
    private var module: Module?
    private let method: String
    private let lock = NSLock()

    public init(programFile: URL, method: String) throws {
        let module = Module(filePath: programFile.path)
        do {
            try module.load(method)
        } catch {
            throw TbsmError.bundle("cannot load method \(method) of \(programFile.path): \(error)")
        }
        self.module = module
        self.method = method
    }

    public func gradient(_ state: [Float], _ events: RefreshEvents) throws -> [Float] {
        lock.lock()
        defer { lock.unlock() }
        guard let module = module else { throw TbsmError.illegalState("the ExecuTorch module is closed") }
        let args: [ValueConvertible] = [Tensor<Float>(state, shape: [state.count])] + events.all().map { Tensor<Int64>($0, shape: [$0.count]) }
        let outputs: [Value] = try module.execute(method, args)
        guard outputs.count >= 2, let gradient: Tensor<Float> = outputs[1].tensor() else {
            throw TbsmError.bundle("\(method) of refresh.pte did not return (loss, float32 gradient)")
        }
        return gradient.scalars()
    }

    public func close() {
        lock.lock()
        defer { lock.unlock() }
        module = nil
    }
}

/// A user state refreshed on the device (sdk_builder/formats.py: RefreshedState), kept beside the history
/// in `<history>.state.json`, for the bundle whose manifest.json has `manifestSha256` only. The marker
/// (`throughTimestamp`, `throughCount`: the newest event trained on and how many events of the history had
/// that timestamp) tells how many events arrived since.
public struct RefreshedState {
    public let manifestSha256: String
    public let userState: [Float]
    public let throughTimestamp: Int64
    public let throughCount: Int

    public func toJson() throws -> Data {
        // A float32 widened to Double: read back exactly.
        let document: [String: Any] = [
            "manifest_sha256": manifestSha256, "user_state": userState.map { Double($0) },
            "through_timestamp": throughTimestamp, "through_count": throughCount,
        ]
        return try JSONSerialization.data(withJSONObject: document)
    }

    public static func fileFor(_ historyFile: URL) -> URL {
        let name = historyFile.lastPathComponent
        let stem = name.hasSuffix(".json") ? String(name.dropLast(5)) : name
        return historyFile.deletingLastPathComponent().appendingPathComponent(stem + ".state.json")
    }

    /// The marker of the newest of `events` (oldest first).
    public static func after(_ manifest: BundleManifest, _ state: [Float], _ events: [Event]) -> RefreshedState {
        let last = events.last?.timestamp ?? 0
        return RefreshedState(manifestSha256: manifest.sha256, userState: state, throughTimestamp: last,
                              throughCount: events.filter { $0.timestamp == last }.count)
    }

    /// The state in `file` for `manifest`: nil when there is none or it was refreshed with another bundle
    /// (ignored); a file that cannot be parsed is reported through `onProblem`, deleted and nil. A file
    /// that exists but cannot be read throws.
    public static func load(_ file: URL, _ manifest: BundleManifest, _ onProblem: (String) -> Void) throws -> RefreshedState? {
        let data: Data
        do {
            data = try Data(contentsOf: file)
        } catch {
            if !FileManager.default.fileExists(atPath: file.path) { return nil }
            throw error
        }
        do {
            let json = try JSONObject(data: data)
            let sha = try json.string("manifest_sha256")
            if sha != manifest.sha256 { return nil }
            let state = try json.doubles("user_state").map { Float($0) }
            if state.count != manifest.userState.count {
                throw TbsmError.bundle("user_state has \(state.count) values, the bundle \(manifest.userState.count)")
            }
            if !state.allSatisfy({ $0.isFinite }) { throw TbsmError.bundle("user_state is not finite") }
            return try RefreshedState(manifestSha256: sha, userState: state, throughTimestamp: json.long("through_timestamp"),
                                      throughCount: json.int("through_count"))
        } catch {
            try? FileManager.default.removeItem(at: file)
            onProblem("refreshed user state is corrupt: \(error) (deleted; ranking uses the shipped state)")
            return nil
        }
    }

    /// Replaces `file` with `state` atomically (a temporary file, fsync, rename), like `HistoryStore.save`.
    public static func save(_ file: URL, _ state: RefreshedState) throws {
        try replaceAtomically(file, state.toJson())
    }
}
