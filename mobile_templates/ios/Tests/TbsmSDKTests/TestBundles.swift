import Foundation
import XCTest
@testable import TbsmSDK

/// Test fixtures: a real bundle (TBSM_BUNDLE or Resources/tbsm) and a small hand-made manifest.
enum TestBundles {
    static func realBundle() throws -> URL {
        if let path = ProcessInfo.processInfo.environment["TBSM_BUNDLE"] { return URL(fileURLWithPath: path) }
        if let url = Bundle.module.resourceURL?.appendingPathComponent("Resources/tbsm"),
           FileManager.default.fileExists(atPath: url.appendingPathComponent("manifest.json").path) {
            return url
        }
        throw XCTSkip("set TBSM_BUNDLE=<bundle dir> or copy a bundle to Tests/TbsmSDKTests/Resources/tbsm")
    }

    static func copyOfRealBundle() throws -> URL {
        let dir = try tempDir().appendingPathComponent("bundle")
        try FileManager.default.copyItem(at: realBundle(), to: dir)
        return dir
    }

    /// A copy of the real bundle with a refresh program declared in its manifest (`refresh`, as `build
    /// --refresh` writes it) and a placeholder refresh.pte listed in its files: tests run the refresh
    /// loop with a stand-in for the ExecuTorch program, so only the manifest and the file hash matter.
    static func copyWithRefresh(_ refresh: [String: Any]) throws -> URL {
        let bundle = try copyOfRealBundle()
        let program = bundle.appendingPathComponent(refresh["file"] as! String)
        if !FileManager.default.fileExists(atPath: program.path) { try Data("placeholder".utf8).write(to: program) }
        let manifestFile = bundle.appendingPathComponent("manifest.json")
        var manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: manifestFile)) as! [String: Any]
        var refresh = refresh
        let maxHistory = ((manifest["program"] as! [String: Any])["max_history"] as! NSNumber).intValue
        refresh["events"] = maxHistory + (refresh["window"] as! Int)
        manifest["refresh"] = refresh
        var files = manifest["files"] as! [String: Any]
        files[program.lastPathComponent] = try BundleManifest.sha256(program)
        manifest["files"] = files
        try JSONSerialization.data(withJSONObject: manifest).write(to: manifestFile)
        try? FileManager.default.removeItem(at: bundle.appendingPathComponent("manifest.json.hmac"))
        return bundle
    }

    static func refreshSpec(window: Int = 3, everyEvents: Int = 2, steps: Int = 2, learningRate: Double = 0.5, maxDrift: Double = 1.0) -> [String: Any] {
        ["file": "refresh.pte", "method": "forward", "window": window, "every_events": everyEvents, "steps": steps,
         "learning_rate": learningRate, "max_drift": maxDrift]
    }

    /// For tests about ranking: a refresh program stand-in that leaves the state where it is (zero gradient).
    static func stillRefresh(_ file: URL, _ spec: RefreshSpec) throws -> Refresh { StillRefresh() }

    static func tempDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tbsm-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    static func smallManifest(maxHistory: Int = 4, maxCandidates: Int = 8, refresh: RefreshSpec? = nil) -> BundleManifest {
        BundleManifest(
            formatVersion: BundleManifest.supportedFormatVersion,
            userId: 7,
            items: IdShard(ids: [100, 200, 300], firstRow: 2, oovRow: 1, paddingRow: 0),
            categories: IdShard(ids: [5, 9], firstRow: 2, oovRow: 1, paddingRow: 0),
            behaviors: ["pv": 1, "buy": 2, "cart": 3, "fav": 4],
            method: "forward",
            maxHistory: maxHistory,
            maxCandidates: maxCandidates,
            files: [:],
            userState: [0.5, -0.25, 1],
            refresh: refresh
        )
    }
}

/// Returns the row of each candidate as its score and remembers the last inputs.
final class RowScoringInference: Inference {
    var last: ModelInputs?

    func scores(_ inputs: ModelInputs) throws -> [Float] {
        last = inputs
        return inputs.candidates.map { Float($0) }
    }
}

/// A refresh program whose gradient is zero: the refresh loop runs and the state stays the shipped one.
final class StillRefresh: Refresh {
    func gradient(_ state: [Float], _ events: RefreshEvents) throws -> [Float] { [Float](repeating: 0, count: state.count) }
}
