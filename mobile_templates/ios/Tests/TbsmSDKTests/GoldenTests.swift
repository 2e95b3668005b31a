import XCTest
@testable import TbsmSDK

/// Replays golden.json through the real ExecuTorch runtime (macOS `swift test`, or an iOS device or
/// simulator from Xcode): no fakes.
final class GoldenTests: XCTestCase {
    func testGoldenScoresThroughExecuTorch() throws {
        let dir = try TestBundles.realBundle()
        let manifest = try BundleManifest.load(dir)
        let golden = try GoldenSet.load(dir.appendingPathComponent("golden.json"), maxHistory: manifest.maxHistory)
        let inference = try ExecuTorchInference(modelFile: dir.appendingPathComponent("model.pte"))
        let diff = try golden.maxAbsDiff(manifest, inference)
        XCTAssertLessThanOrEqual(diff, golden.tolerance, "max abs diff \(diff) > tolerance \(golden.tolerance)")
    }

    func testRecommenderRanksGoldenCandidatesInGoldenOrder() throws {
        let dir = try TestBundles.realBundle()
        let manifest = try BundleManifest.load(dir)
        let golden = try GoldenSet.load(dir.appendingPathComponent("golden.json"), maxHistory: manifest.maxHistory)
        for c in golden.cases {
            let historyFile = try TestBundles.tempDir().appendingPathComponent("history.json")
            let rec = try TbsmRecommender.open(bundleDir: dir, historyFile: historyFile)
            for e in c.history.events() { XCTAssertTrue(try rec.record(e)) }
            let ranked = try rec.rank(c.candidates, requestTime: c.requestTime)
            let expected = Dictionary(zip(c.candidates, c.scores), uniquingKeysWith: { first, _ in first })
            for s in ranked { XCTAssertEqual(Double(s.score), expected[s.itemId]!, accuracy: golden.tolerance, c.name) }
            XCTAssertEqual(ranked.map { $0.score }, ranked.map { $0.score }.sorted(by: >), c.name)
        }
    }
}
