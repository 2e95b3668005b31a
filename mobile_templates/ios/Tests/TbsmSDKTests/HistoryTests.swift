import XCTest
@testable import TbsmSDK

final class HistoryTests: XCTestCase {
    private func event(_ ts: Int64, item: Int64 = 100) -> Event { Event(itemId: item, categoryId: 5, behavior: "pv", timestamp: ts) }

    func testKeepsTheMostRecentCapacityEvents() {
        let h = HistoryBuffer(userId: 7, capacity: 3)
        for ts: Int64 in 1...5 { XCTAssertTrue(h.add(event(ts))) }
        XCTAssertEqual(h.events().map { $0.timestamp }, [3, 4, 5])
    }

    func testRejectsAnEventOlderThanTheLastAndAcceptsEqualTimes() {
        let h = HistoryBuffer(userId: 7, capacity: 5)
        XCTAssertTrue(h.add(event(10)))
        XCTAssertTrue(h.add(event(10, item: 200)))
        XCTAssertFalse(h.add(event(9)))
        XCTAssertEqual(h.size, 2)
    }

    func testJsonRoundTripFollowsTheEventsSchema() throws {
        let h = HistoryBuffer(userId: 7, capacity: 5)
        XCTAssertTrue(h.add(Event(itemId: 100, categoryId: 5, behavior: "buy", timestamp: 1_700_000_000)))
        XCTAssertTrue(h.add(Event(itemId: 200, categoryId: 9, behavior: "fav", timestamp: 1_700_000_100)))
        let text = try String(decoding: h.toJson(), as: UTF8.self)
        for key in ["\"user_id\"", "\"events\"", "\"item_id\"", "\"category_id\"", "\"behavior\"", "\"timestamp\""] {
            XCTAssertTrue(text.contains(key), text)
        }
        let back = try HistoryBuffer.fromJson(h.toJson(), capacity: 5)
        XCTAssertEqual(back.userId, h.userId)
        XCTAssertEqual(back.events(), h.events())
    }

    func testMissingEventsMeansAnEmptyHistory() throws {
        let h = try HistoryBuffer.fromJson(Data(#"{"user_id":7}"#.utf8), capacity: 5)
        XCTAssertEqual(h.userId, 7)
        XCTAssertEqual(h.size, 0)
    }

    func testFromJsonRefusesUnorderedEvents() {
        let text = #"{"user_id":7,"events":[{"item_id":1,"category_id":1,"behavior":"pv","timestamp":5},"# +
            #"{"item_id":1,"category_id":1,"behavior":"pv","timestamp":4}]}"#
        XCTAssertThrowsError(try HistoryBuffer.fromJson(Data(text.utf8), capacity: 5))
    }

    func testStoreSurvivesARestart() throws {
        let manifest = TestBundles.smallManifest()
        let file = try TestBundles.tempDir().appendingPathComponent("history.json")
        let h = HistoryStore.load(file, manifest) { XCTFail($0) }
        XCTAssertTrue(h.add(event(1)))
        XCTAssertTrue(h.add(event(2, item: 300)))
        try HistoryStore.save(file, h)
        let again = HistoryStore.load(file, manifest) { XCTFail($0) }
        XCTAssertEqual(again.events(), h.events())
    }

    func testCorruptFileStartsEmptyAndIsReported() throws {
        let manifest = TestBundles.smallManifest()
        let file = try TestBundles.tempDir().appendingPathComponent("history.json")
        for content in ["{not json", #"{"user_id":8,"events":[]}"#, #"{"user_id":7,"events":[{"item_id":1}]}"#] {
            try Data(content.utf8).write(to: file)
            var problems: [String] = []
            let h = HistoryStore.load(file, manifest) { problems.append($0) }
            XCTAssertEqual(h.size, 0)
            XCTAssertEqual(problems.count, 1, content)
            XCTAssertFalse(FileManager.default.fileExists(atPath: file.path))
            XCTAssertTrue(FileManager.default.fileExists(atPath: file.path + ".corrupt"))
        }
    }
}
