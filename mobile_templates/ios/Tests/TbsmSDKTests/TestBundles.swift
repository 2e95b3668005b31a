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

    static func tempDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tbsm-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    static func smallManifest(maxHistory: Int = 4, maxCandidates: Int = 8) -> BundleManifest {
        BundleManifest(
            formatVersion: BundleManifest.supportedFormatVersion,
            userId: 7,
            items: IdShard(ids: [100, 200, 300], firstRow: 2, oovRow: 1, paddingRow: 0),
            categories: IdShard(ids: [5, 9], firstRow: 2, oovRow: 1, paddingRow: 0),
            behaviors: ["pv": 1, "buy": 2, "cart": 3, "fav": 4],
            method: "forward",
            maxHistory: maxHistory,
            maxCandidates: maxCandidates,
            files: [:]
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
