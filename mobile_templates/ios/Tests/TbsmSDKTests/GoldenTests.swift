import XCTest
@testable import TbsmSDK

/// Replays golden.json through the real ExecuTorch runtime (macOS `swift test`, or an iOS device or
/// simulator from Xcode): no fakes.
final class GoldenTests: XCTestCase {
    func testGoldenScoresThroughExecuTorch() throws {
        let dir = try TestBundles.realBundle()
        let manifest = try BundleManifest.load(dir)
        let golden = try GoldenSet.load(dir.appendingPathComponent("golden.json"), capacity: manifest.historyCapacity)
        let inference = try ExecuTorchInference(modelFile: dir.appendingPathComponent("model.pte"))
        let diff = try golden.maxAbsDiff(manifest, inference)
        XCTAssertLessThanOrEqual(diff, golden.tolerance, "max abs diff \(diff) > tolerance \(golden.tolerance)")
    }

    func testGoldenRefreshCasesThroughExecuTorch() throws {
        let dir = try TestBundles.realBundle()
        let manifest = try BundleManifest.load(dir)
        guard let spec = manifest.refresh else { throw XCTSkip("the bundle was built without --refresh") }
        let golden = try GoldenSet.load(dir.appendingPathComponent("golden.json"), capacity: manifest.historyCapacity)
        let refresh = try ExecuTorchRefresh(programFile: dir.appendingPathComponent(spec.file), method: spec.method)
        XCTAssertEqual(try golden.failedRefreshCases(manifest, refresh), [])
    }

    func testRecommenderRanksGoldenCandidatesInGoldenOrder() throws {
        let dir = try TestBundles.realBundle()
        let manifest = try BundleManifest.load(dir)
        let golden = try GoldenSet.load(dir.appendingPathComponent("golden.json"), capacity: manifest.historyCapacity)
        for c in golden.cases {
            let historyFile = try TestBundles.tempDir().appendingPathComponent("history.json")
            // The golden scores are the shipped state's: a refresh stand-in keeps it.
            let rec = try TbsmRecommender.open(bundleDir: dir, historyFile: historyFile, refresh: TestBundles.stillRefresh)
            for e in c.history.events() { XCTAssertTrue(try rec.record(e)) }
            let ranked = try rec.rank(c.candidates, requestTime: c.requestTime)
            let expected = Dictionary(zip(c.candidates, c.scores), uniquingKeysWith: { first, _ in first })
            for s in ranked { XCTAssertEqual(Double(s.score), expected[s.itemId]!, accuracy: golden.tolerance, c.name) }
            XCTAssertEqual(ranked.map { $0.score }, ranked.map { $0.score }.sorted(by: >), c.name)
        }
    }
}
