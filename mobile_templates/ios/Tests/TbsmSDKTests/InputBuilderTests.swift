import XCTest
@testable import TbsmSDK

final class InputBuilderTests: XCTestCase {
    private let manifest = TestBundles.smallManifest(maxHistory: 4)

    func testLeftPadsAShortHistory() throws {
        let events = [Event(itemId: 200, categoryId: 9, behavior: "buy", timestamp: 50), Event(itemId: 999, categoryId: 5, behavior: "fav", timestamp: 60)]
        let inputs = try InputBuilder.build(manifest, events, 100, [300, 100, 42])
        XCTAssertEqual(inputs.histItems, [0, 0, 3, 1])
        XCTAssertEqual(inputs.histCategories, [0, 0, 3, 2])
        XCTAssertEqual(inputs.histBehaviors, [0, 0, 2, 4])
        XCTAssertEqual(inputs.histTimestamps, [0, 0, 50, 60])
        XCTAssertEqual(inputs.requestTime, [100])
        XCTAssertEqual(inputs.candidates, [4, 2, 1])
    }

    func testKeepsTheLastMaxHistoryEvents() throws {
        let events = (Int64(1)...6).map { Event(itemId: 100, categoryId: 5, behavior: "pv", timestamp: $0) }
        XCTAssertEqual(try InputBuilder.build(manifest, events, 10, [100]).histTimestamps, [3, 4, 5, 6])
    }

    func testRefusesNoCandidates() {
        XCTAssertThrowsError(try InputBuilder.build(manifest, [], 10, []))
    }

    func testRefusesTooManyCandidates() {
        XCTAssertThrowsError(try InputBuilder.build(manifest, [], 10, [Int64](repeating: 100, count: 9)))
    }

    func testRefusesAnUnknownBehavior() {
        XCTAssertThrowsError(try InputBuilder.build(manifest, [Event(itemId: 100, categoryId: 5, behavior: "like", timestamp: 1)], 10, [100]))
    }

    func testGoldenCasesMapLikeALinearScan() throws {
        let dir = try TestBundles.realBundle()
        let real = try BundleManifest.load(dir)
        func scan(_ shard: IdShard, _ id: Int64) -> Int64 {
            guard let i = shard.ids.firstIndex(of: id) else { return shard.oovRow }
            return Int64(i) + shard.firstRow
        }
        for c in try GoldenSet.load(dir.appendingPathComponent("golden.json"), capacity: real.maxHistory).cases {
            let events = c.history.events()
            let inputs = try InputBuilder.build(real, events, c.requestTime, c.candidates)
            let pad = real.maxHistory - events.count
            XCTAssertEqual(inputs.histItems.count, real.maxHistory)
            for k in 0..<pad { XCTAssertEqual(inputs.histItems[k], real.items.paddingRow) }
            for (k, e) in events.enumerated() {
                XCTAssertEqual(inputs.histItems[pad + k], scan(real.items, e.itemId))
                XCTAssertEqual(inputs.histCategories[pad + k], scan(real.categories, e.categoryId))
                XCTAssertEqual(inputs.histBehaviors[pad + k], real.behaviors[e.behavior])
                XCTAssertEqual(inputs.histTimestamps[pad + k], e.timestamp)
            }
            XCTAssertEqual(inputs.candidates, c.candidates.map { scan(real.items, $0) })
        }
    }
}
