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
        let h = try HistoryStore.load(file, manifest) { XCTFail($0) }
        XCTAssertTrue(h.add(event(1)))
        XCTAssertTrue(h.add(event(2, item: 300)))
        try HistoryStore.save(file, h)
        let again = try HistoryStore.load(file, manifest) { XCTFail($0) }
        XCTAssertEqual(again.events(), h.events())
    }

    func testCorruptFileStartsEmptyAndIsReported() throws {
        let manifest = TestBundles.smallManifest()
        let file = try TestBundles.tempDir().appendingPathComponent("history.json")
        for content in ["{not json", #"{"user_id":8,"events":[]}"#, #"{"user_id":7,"events":[{"item_id":1}]}"#] {
            try Data(content.utf8).write(to: file)
            var problems: [String] = []
            let h = try HistoryStore.load(file, manifest) { problems.append($0) }
            XCTAssertEqual(h.size, 0)
            XCTAssertEqual(problems.count, 1, content)
            XCTAssertFalse(FileManager.default.fileExists(atPath: file.path))
            XCTAssertTrue(FileManager.default.fileExists(atPath: file.path + ".corrupt"))
        }
    }

    func testMissingFileIsAnEmptyHistoryAndNoProblem() throws {
        let file = try TestBundles.tempDir().appendingPathComponent("history.json")
        let h = try HistoryStore.load(file, TestBundles.smallManifest()) { XCTFail($0) }
        XCTAssertEqual(h.size, 0)
        XCTAssertFalse(FileManager.default.fileExists(atPath: file.path))
    }

    func testSaveReplacesTheFileAtomically() throws {
        let manifest = TestBundles.smallManifest()
        let dir = try TestBundles.tempDir()
        let file = dir.appendingPathComponent("history.json")
        let h = HistoryBuffer(userId: 7, capacity: 4)
        XCTAssertTrue(h.add(event(1)))
        try HistoryStore.save(file, h)
        // A write interrupted before its rename (power loss) leaves only a temporary file: the old history stays.
        try Data(#"{"user_id":7,"ev"#.utf8).write(to: dir.appendingPathComponent(".dat.nosync1234.history"))
        XCTAssertEqual(try HistoryStore.load(file, manifest) { XCTFail($0) }.events(), h.events())
        try FileManager.default.removeItem(at: dir.appendingPathComponent(".dat.nosync1234.history"))
        XCTAssertTrue(h.add(event(2)))
        try HistoryStore.save(file, h)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["history.json"]) // no temporary file left behind
        XCTAssertEqual(try Data(contentsOf: file), try h.toJson())
    }

    func testAFailedSaveChangesNothing() throws {
        let manifest = TestBundles.smallManifest()
        let dir = try TestBundles.tempDir()
        let file = dir.appendingPathComponent("history.json")
        let store = try HistoryStore.open(file, manifest) { XCTFail($0) }
        defer { store.release() }
        XCTAssertTrue(try store.record(event(1)))
        let saved = try Data(contentsOf: file)
        // Make the write fail: a read-only directory (XCTest does not run as root).
        try FileManager.default.setAttributes([.posixPermissions: 0o555], ofItemAtPath: dir.path)
        XCTAssertThrowsError(try store.record(event(2)))
        XCTAssertThrowsError(try store.clear())
        XCTAssertEqual(store.events().map { $0.timestamp }, [1])
        XCTAssertEqual(try Data(contentsOf: file), saved)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: dir.path)
        XCTAssertTrue(try store.record(event(2)))
        XCTAssertEqual(try HistoryStore.load(file, manifest) { XCTFail($0) }.events().map { $0.timestamp }, [1, 2])
    }

    func testUnreadableFileIsNotResetButReported() throws {
        let manifest = TestBundles.smallManifest()
        let dir = try TestBundles.tempDir()
        // A path that exists but cannot be read as a file.
        let file = dir.appendingPathComponent("history.json")
        try FileManager.default.createDirectory(at: file, withIntermediateDirectories: true)
        for _ in 1...2 {
            XCTAssertThrowsError(try HistoryStore.open(file, manifest) { XCTFail($0) }) { error in
                XCTAssertTrue(error is HistoryUnavailableException, "\(error)")
                XCTAssertTrue("\(error)".contains("cannot read"), "\(error)")
            }
            var isDirectory: ObjCBool = false
            XCTAssertTrue(FileManager.default.fileExists(atPath: file.path, isDirectory: &isDirectory) && isDirectory.boolValue)
            XCTAssertFalse(FileManager.default.fileExists(atPath: file.path + ".corrupt"))
        }
        // A file the process cannot read now (on iOS: data protection before the first unlock).
        try FileManager.default.removeItem(at: file)
        let h = HistoryBuffer(userId: 7, capacity: 4)
        XCTAssertTrue(h.add(event(3)))
        try HistoryStore.save(file, h)
        try FileManager.default.setAttributes([.posixPermissions: 0o000], ofItemAtPath: file.path)
        XCTAssertThrowsError(try HistoryStore.load(file, manifest) { XCTFail($0) }) { error in
            XCTAssertTrue(error is HistoryUnavailableException, "\(error)")
        }
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: file.path)
        // Once it can be read again (storage unlocked), its history is there.
        XCTAssertEqual(try HistoryStore.load(file, manifest) { XCTFail($0) }.events().map { $0.timestamp }, [3])
    }

    func testOneStorePerHistoryFile() throws {
        let manifest = TestBundles.smallManifest()
        let dir = try TestBundles.tempDir()
        let file = dir.appendingPathComponent("history.json")
        let a = try HistoryStore.open(file, manifest) { XCTFail($0) }
        let b = try HistoryStore.open(dir.appendingPathComponent("../\(dir.lastPathComponent)/./history.json"), manifest) { XCTFail($0) }
        XCTAssertTrue(a === b)
        XCTAssertTrue(try a.record(event(1)))
        XCTAssertEqual(b.events().map { $0.timestamp }, [1])
        XCTAssertThrowsError(try HistoryStore.open(file, TestBundles.smallManifest(maxHistory: 9)) { _ in }) // another max_history
        a.release()
        XCTAssertTrue(try HistoryStore.open(file, manifest) { _ in } === b)
        b.release()
        b.release()
        let c = try HistoryStore.open(file, manifest) { XCTFail($0) }
        XCTAssertFalse(a === c) // all released: the next open reads the file again
        XCTAssertEqual(c.events().map { $0.timestamp }, [1])
        c.release()
    }
}
