import XCTest
@testable import TbsmSDK

final class RecommenderTests: XCTestCase {
    func testRecordsPersistsAndRanks() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        let inference = RowScoringInference()
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in inference })
        let ids = rec.manifest.items.ids
        XCTAssertTrue(try rec.record(Event(itemId: ids[0], categoryId: 1, behavior: "pv", timestamp: 1_000)))
        XCTAssertTrue(try rec.record(Event(itemId: ids[1], categoryId: 1, behavior: "cart", timestamp: 2_000)))
        XCTAssertFalse(try rec.record(Event(itemId: ids[2], categoryId: 1, behavior: "pv", timestamp: 1_500)))
        let ranked = try rec.rank([ids[0], ids[5], 12_345_678_901, ids[3]], requestTime: 3_000)
        XCTAssertEqual(ranked.map { $0.itemId }, [ids[5], ids[3], ids[0], 12_345_678_901])
        XCTAssertEqual(inference.last?.requestTime, [3_000])
        XCTAssertEqual(inference.last?.histTimestamps.last, 2_000)
        XCTAssertEqual(try rec.rank([]), [])

        let reopened = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() })
        XCTAssertEqual(reopened.history().map { $0.timestamp }, [1_000, 2_000])
        let saved = try JSONSerialization.jsonObject(with: Data(contentsOf: historyFile)) as? [String: Any]
        XCTAssertEqual((saved?["user_id"] as? NSNumber)?.int64Value, rec.manifest.userId)
    }

    func testCorruptHistoryIsReportedAndReplaced() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        try Data("]]".utf8).write(to: historyFile)
        var problems: [String] = []
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { problems.append($0) }, inference: { _ in RowScoringInference() })
        XCTAssertEqual(problems.count, 1)
        XCTAssertEqual(rec.history().count, 0)
    }

    func testRefusesATamperedBundle() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let golden = bundle.appendingPathComponent("golden.json")
        try (Data(contentsOf: golden) + Data(" ".utf8)).write(to: golden)
        XCTAssertThrowsError(try TbsmRecommender.open(bundleDir: bundle, inference: { _ in RowScoringInference() })) { error in
            XCTAssertTrue("\(error)".contains("sha256"), "\(error)")
        }
    }

    func testRefusesAnUnknownFormatVersion() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let file = bundle.appendingPathComponent("manifest.json")
        var manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as! [String: Any]
        manifest["format_version"] = 99
        try JSONSerialization.data(withJSONObject: manifest).write(to: file)
        XCTAssertThrowsError(try TbsmRecommender.open(bundleDir: bundle, inference: { _ in RowScoringInference() })) { error in
            XCTAssertTrue("\(error)".contains("format_version"), "\(error)")
        }
    }
}
