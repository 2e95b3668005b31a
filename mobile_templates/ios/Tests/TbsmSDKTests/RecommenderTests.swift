import XCTest
@testable import TbsmSDK

final class RecommenderTests: XCTestCase {
    func testRecordsPersistsAndRanks() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        let inference = RowScoringInference()
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in inference }, refresh: TestBundles.stillRefresh)
        let ids = rec.manifest.items.ids
        XCTAssertTrue(try rec.record(Event(itemId: ids[0], categoryId: 1, behavior: "pv", timestamp: 1_000)))
        XCTAssertTrue(try rec.record(Event(itemId: ids[1], categoryId: 1, behavior: "cart", timestamp: 2_000)))
        XCTAssertFalse(try rec.record(Event(itemId: ids[2], categoryId: 1, behavior: "pv", timestamp: 1_500)))
        let ranked = try rec.rank([ids[0], ids[5], 12_345_678_901, ids[3]], requestTime: 3_000)
        XCTAssertEqual(ranked.map { $0.itemId }, [ids[5], ids[3], ids[0], 12_345_678_901])
        XCTAssertEqual(inference.last?.requestTime, [3_000])
        XCTAssertEqual(inference.last?.histTimestamps.last, 2_000)
        XCTAssertEqual(try rec.rank([]), [])
        rec.close()

        let reopened = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)
        XCTAssertEqual(try reopened.history().map { $0.timestamp }, [1_000, 2_000])
        let saved = try JSONSerialization.jsonObject(with: Data(contentsOf: historyFile)) as? [String: Any]
        XCTAssertEqual((saved?["user_id"] as? NSNumber)?.int64Value, rec.manifest.userId)
    }

    func testCorruptHistoryIsReportedAndReplaced() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        try Data("]]".utf8).write(to: historyFile)
        var problems: [String] = []
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { problems.append($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)
        XCTAssertEqual(problems.count, 1)
        XCTAssertEqual(try rec.history().count, 0)
    }

    func testRefusesATamperedBundle() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let golden = bundle.appendingPathComponent("golden.json")
        try (Data(contentsOf: golden) + Data(" ".utf8)).write(to: golden)
        XCTAssertThrowsError(try TbsmRecommender.open(bundleDir: bundle, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)) { error in
            XCTAssertTrue("\(error)".contains("sha256"), "\(error)")
        }
    }

    func testRefusesAnUnknownFormatVersion() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let file = bundle.appendingPathComponent("manifest.json")
        var manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as! [String: Any]
        manifest["format_version"] = 99
        try JSONSerialization.data(withJSONObject: manifest).write(to: file)
        XCTAssertThrowsError(try TbsmRecommender.open(bundleDir: bundle, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)) { error in
            XCTAssertTrue("\(error)".contains("format_version"), "\(error)")
        }
    }

    func testTwoRecommendersOnOneHistoryFileShareIt() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        // Two screens (or two scenes) each opening the bundle.
        let first = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)
        let second = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)
        let ids = first.manifest.items.ids
        XCTAssertTrue(try first.record(Event(itemId: ids[0], categoryId: 1, behavior: "pv", timestamp: 1_000)))
        XCTAssertTrue(try second.record(Event(itemId: ids[1], categoryId: 1, behavior: "pv", timestamp: 2_000)))
        XCTAssertTrue(try first.record(Event(itemId: ids[2], categoryId: 1, behavior: "pv", timestamp: 3_000)))
        XCTAssertFalse(try second.record(Event(itemId: ids[3], categoryId: 1, behavior: "pv", timestamp: 2_500)))
        XCTAssertEqual(try second.history().map { $0.timestamp }, [1_000, 2_000, 3_000])
        first.close()
        XCTAssertEqual(try second.history().count, 3)
        second.close()
        let reopened = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)
        XCTAssertEqual(try reopened.history().map { $0.timestamp }, [1_000, 2_000, 3_000])
        reopened.close()
    }

    func testRecordThatCannotBeSavedRecordsNothing() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let dir = bundle.deletingLastPathComponent().appendingPathComponent("state")
        let historyFile = dir.appendingPathComponent("history.json")
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)
        defer { rec.close() }
        let ids = rec.manifest.items.ids
        XCTAssertTrue(try rec.record(Event(itemId: ids[0], categoryId: 1, behavior: "pv", timestamp: 1_000)))
        try FileManager.default.setAttributes([.posixPermissions: 0o555], ofItemAtPath: dir.path) // read-only
        XCTAssertThrowsError(try rec.record(Event(itemId: ids[1], categoryId: 1, behavior: "pv", timestamp: 2_000)))
        XCTAssertEqual(try rec.history().map { $0.timestamp }, [1_000])
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: dir.path)
        XCTAssertTrue(try rec.record(Event(itemId: ids[1], categoryId: 1, behavior: "pv", timestamp: 2_000)))
        XCTAssertEqual(try rec.history().map { $0.timestamp }, [1_000, 2_000])
    }

    func testUnreadableHistoryFailsOpenWithoutResettingIt() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        try FileManager.default.createDirectory(at: historyFile, withIntermediateDirectories: true) // exists, cannot be read
        XCTAssertThrowsError(try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in RowScoringInference() }, refresh: TestBundles.stillRefresh)) { error in
            XCTAssertTrue(error is HistoryUnavailableException, "\(error)") // retry later
        }
        var isDirectory: ObjCBool = false
        XCTAssertTrue(FileManager.default.fileExists(atPath: historyFile.path, isDirectory: &isDirectory) && isDirectory.boolValue)
        XCTAssertFalse(FileManager.default.fileExists(atPath: historyFile.path + ".corrupt"))
    }

    func testFailedOpenGivesTheHistoryFileBack() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        XCTAssertThrowsError(try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) }, inference: { _ in throw TbsmError.bundle("no model") }, refresh: TestBundles.stillRefresh))
        // Nothing holds the file: another bundle (another user, another max_history) may open it.
        let other = try HistoryStore.open(historyFile, TestBundles.smallManifest()) { _ in }
        XCTAssertEqual(other.userId, 7)
        other.release()
    }

    func testCloseWaitsForARunningRankAndIsIdempotent() throws {
        let bundle = try TestBundles.copyOfRealBundle()
        let model = BlockingInference()
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: bundle.deletingLastPathComponent().appendingPathComponent("history.json"), onHistoryProblem: { XCTFail($0) }, inference: { _ in model }, refresh: TestBundles.stillRefresh)
        let ids = rec.manifest.items.ids
        let ranked = Locked<[TbsmRecommender.Scored]?>(nil)
        let rankDone = DispatchSemaphore(value: 0)
        let closeDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            ranked.set(try? rec.rank([ids[0], ids[1]], requestTime: 10))
            rankDone.signal()
        }
        XCTAssertEqual(model.entered.wait(timeout: .now() + 10), .success)
        Thread.detachNewThread {
            rec.close()
            closeDone.signal()
        }
        XCTAssertEqual(closeDone.wait(timeout: .now() + 0.3), .timedOut, "close did not wait for the running rank")
        XCTAssertEqual(model.closes.get(), 0)
        model.proceed.signal()
        XCTAssertEqual(rankDone.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(closeDone.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(ranked.get()?.count, 2)
        XCTAssertEqual(model.closes.get(), 1)
        XCTAssertFalse(model.closedWhileRunning.get())
        rec.close()
        XCTAssertEqual(model.closes.get(), 1)
        XCTAssertThrowsError(try rec.rank([ids[0]])) { XCTAssertTrue("\($0)".contains("closed"), "\($0)") }
        XCTAssertThrowsError(try rec.record(Event(itemId: ids[0], categoryId: 1, behavior: "pv", timestamp: 20))) { XCTAssertTrue("\($0)".contains("closed"), "\($0)") }
        XCTAssertThrowsError(try rec.history()) { XCTAssertTrue("\($0)".contains("closed"), "\($0)") }
    }
}

/// A value shared between threads.
final class Locked<Value> {
    private var value: Value
    private let lock = NSLock()

    init(_ value: Value) { self.value = value }

    func get() -> Value {
        lock.lock()
        defer { lock.unlock() }
        return value
    }

    func set(_ newValue: Value) {
        lock.lock()
        defer { lock.unlock() }
        value = newValue
    }
}

/// A stand-in for ExecuTorch's Module: forward blocks until `proceed` is signalled, and close during a
/// forward is recorded.
final class BlockingInference: Inference {
    let entered = DispatchSemaphore(value: 0)
    let proceed = DispatchSemaphore(value: 0)
    private let running = Locked(false)
    let closes = Locked(0)
    let closedWhileRunning = Locked(false)

    func scores(_ inputs: ModelInputs) throws -> [Float] {
        running.set(true)
        entered.signal()
        if proceed.wait(timeout: .now() + 10) == .timedOut { throw TbsmError.illegalState("never released") }
        running.set(false)
        return inputs.candidates.map { Float($0) }
    }

    func close() {
        if running.get() { closedWhileRunning.set(true) }
        closes.set(closes.get() + 1)
    }
}
