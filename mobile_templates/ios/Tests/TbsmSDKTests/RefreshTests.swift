import Foundation
import XCTest
@testable import TbsmSDK

final class RefreshTests: XCTestCase {
    private func spec(_ steps: Int, _ learningRate: Double, _ maxDrift: Double) -> RefreshSpec {
        RefreshSpec(file: "refresh.pte", method: "forward", window: 2, events: 6, everyEvents: 2, steps: steps, learningRate: learningRate, maxDrift: maxDrift)
    }

    private let noEvents = RefreshEvents(items: [], categories: [], behaviors: [], timestamps: [])

    private func event(_ item: Int64, _ ts: Int64) -> Event { Event(itemId: item, categoryId: 1, behavior: "pv", timestamp: ts) }

    func testRefreshLoopStepsAndClipsTheDrift() throws {
        let shipped: [Float] = [1, 1]
        let constant = ConstantGradient([-3, -4])
        // One step of 0.5 * (3, 4): a drift of norm 2.5, inside the bound.
        XCTAssertEqual(try RefreshLoop.run(spec(1, 0.5, 10), shipped, shipped, noEvents, constant), [2.5, 3])
        // Three steps: drift (4.5, 6) of norm 7.5 > 5, scaled back onto the ball: (3, 4).
        let clipped = try RefreshLoop.run(spec(3, 0.5, 5), shipped, shipped, noEvents, constant)
        XCTAssertEqual(clipped[0], 4, accuracy: 1e-6)
        XCTAssertEqual(clipped[1], 5, accuracy: 1e-6)
        XCTAssertEqual(constant.calls, 4)
        // The gradient is taken at the current state: g = state - (3, 3) walks to (3, 3) and stops there.
        final class ToTarget: Refresh {
            func gradient(_ state: [Float], _ events: RefreshEvents) throws -> [Float] { state.map { $0 - 3 } }
        }
        XCTAssertEqual(try RefreshLoop.run(spec(5, 1, 10), shipped, shipped, noEvents, ToTarget()), [3, 3])
    }

    func testEventsSinceCountsPastTheMarker() {
        let events = [event(1, 10), event(2, 20), event(3, 20), event(4, 30)]
        XCTAssertEqual(RefreshLoop.eventsSince(events, nil), 4)
        // The last refresh saw the first event at t=20 only: one more at 20 and the one at 30 are new.
        XCTAssertEqual(RefreshLoop.eventsSince(events, RefreshedState(manifestSha256: "x", userState: [], throughTimestamp: 20, throughCount: 1)), 2)
        XCTAssertEqual(RefreshLoop.eventsSince(events, RefreshedState(manifestSha256: "x", userState: [], throughTimestamp: 30, throughCount: 1)), 0)
    }

    func testRefreshRunsEveryEventsPersistsAndRanksWithTheState() throws {
        let bundle = try TestBundles.copyWithRefresh(TestBundles.refreshSpec(window: 3, everyEvents: 2))
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        let inference = RowScoringInference()
        let refresh = ConstantGradient(nil)
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) },
                                           inference: { _ in inference }, refresh: { _, _ in refresh })
        let ids = rec.manifest.items.ids
        let shipped = rec.manifest.userState
        XCTAssertEqual(rec.manifest.historyCapacity, rec.manifest.maxHistory + 3)
        XCTAssertTrue(try rec.record(event(ids[0], 1_000)))
        XCTAssertEqual(refresh.calls, 0)
        XCTAssertEqual(try rec.userState(), shipped)
        XCTAssertTrue(try rec.record(event(ids[1], 2_000)))
        XCTAssertEqual(refresh.calls, 2)  // every_events reached: one loop of two steps
        let refreshed = try rec.userState()
        XCTAssertNotEqual(refreshed, shipped)
        // The program saw the last maxHistory + window events, left-padded.
        let seen = try XCTUnwrap(refresh.lastEvents)
        XCTAssertEqual(seen.items.count, rec.manifest.maxHistory + 3)
        XCTAssertEqual(Array(seen.timestamps.suffix(2)), [1_000, 2_000])
        _ = try rec.rank([ids[0]], requestTime: 3_000)
        XCTAssertEqual(inference.last?.userState, refreshed)
        let saved = try JSONSerialization.jsonObject(with: Data(contentsOf: RefreshedState.fileFor(historyFile))) as? [String: Any]
        XCTAssertEqual(saved?["manifest_sha256"] as? String, rec.manifest.sha256)
        rec.close()

        let again = ConstantGradient(nil)
        let reopened = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) },
                                                inference: { _ in RowScoringInference() }, refresh: { _, _ in again })
        XCTAssertEqual(try reopened.userState(), refreshed)
        XCTAssertTrue(try reopened.record(event(ids[2], 3_000)))
        XCTAssertEqual(again.calls, 0)  // one event since the last refresh
        XCTAssertTrue(try reopened.record(event(ids[3], 3_000)))
        XCTAssertEqual(again.calls, 2)
        reopened.close()
    }

    func testAStateRefreshedForAnotherBundleIsIgnored() throws {
        let bundle = try TestBundles.copyWithRefresh(TestBundles.refreshSpec())
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        let manifest = try BundleManifest.load(bundle)
        let other = [Float](repeating: 9, count: manifest.userState.count)
        try RefreshedState.save(RefreshedState.fileFor(historyFile),
                                RefreshedState(manifestSha256: String(repeating: "0", count: 64), userState: other, throughTimestamp: 0, throughCount: 0))
        var rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) },
                                           inference: { _ in RowScoringInference() }, refresh: { _, _ in ConstantGradient(nil) })
        XCTAssertEqual(try rec.userState(), manifest.userState)
        rec.close()
        try RefreshedState.save(RefreshedState.fileFor(historyFile),
                                RefreshedState(manifestSha256: manifest.sha256, userState: other, throughTimestamp: 0, throughCount: 0))
        rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) },
                                       inference: { _ in RowScoringInference() }, refresh: { _, _ in ConstantGradient(nil) })
        XCTAssertEqual(try rec.userState(), other)
        rec.close()
    }

    func testResetRestoresTheShippedState() throws {
        let bundle = try TestBundles.copyWithRefresh(TestBundles.refreshSpec(everyEvents: 1))
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        let stateFile = RefreshedState.fileFor(historyFile)
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { XCTFail($0) },
                                           inference: { _ in RowScoringInference() }, refresh: { _, _ in ConstantGradient(nil) })
        defer { rec.close() }
        let ids = rec.manifest.items.ids
        XCTAssertTrue(try rec.record(event(ids[0], 1_000)))
        XCTAssertNotEqual(try rec.userState(), rec.manifest.userState)
        try rec.resetUserState()
        XCTAssertEqual(try rec.userState(), rec.manifest.userState)
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateFile.path))
        XCTAssertTrue(try rec.record(event(ids[1], 2_000)))
        XCTAssertTrue(FileManager.default.fileExists(atPath: stateFile.path))
        try rec.clearHistory()  // the state learned from a cleared history goes with it
        XCTAssertEqual(try rec.userState(), rec.manifest.userState)
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateFile.path))
    }

    func testAFailedRefreshKeepsTheEventAndIsReported() throws {
        let bundle = try TestBundles.copyWithRefresh(TestBundles.refreshSpec(everyEvents: 1))
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        final class Broken: Refresh {
            func gradient(_ state: [Float], _ events: RefreshEvents) throws -> [Float] { throw TbsmError.illegalState("program failed") }
        }
        var problems: [String] = []
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { problems.append($0) },
                                           inference: { _ in RowScoringInference() }, refresh: { _, _ in Broken() })
        defer { rec.close() }
        XCTAssertTrue(try rec.record(event(rec.manifest.items.ids[0], 1_000)))
        XCTAssertEqual(try rec.history().count, 1)
        XCTAssertEqual(problems.count, 1)
        XCTAssertTrue(problems[0].contains("program failed"), problems[0])
        XCTAssertEqual(try rec.userState(), rec.manifest.userState)
        XCTAssertFalse(FileManager.default.fileExists(atPath: RefreshedState.fileFor(historyFile).path))
    }

    func testACorruptStateFileIsReportedAndIgnored() throws {
        let bundle = try TestBundles.copyWithRefresh(TestBundles.refreshSpec())
        let historyFile = bundle.deletingLastPathComponent().appendingPathComponent("history.json")
        try Data("{\"manifest_sha256\":".utf8).write(to: RefreshedState.fileFor(historyFile))
        var problems: [String] = []
        let rec = try TbsmRecommender.open(bundleDir: bundle, historyFile: historyFile, onHistoryProblem: { problems.append($0) },
                                           inference: { _ in RowScoringInference() }, refresh: { _, _ in ConstantGradient(nil) })
        defer { rec.close() }
        XCTAssertEqual(problems.count, 1)
        XCTAssertEqual(try rec.userState(), rec.manifest.userState)
        XCTAssertFalse(FileManager.default.fileExists(atPath: RefreshedState.fileFor(historyFile).path))
    }
}

/// A stand-in for refresh.pte: a fixed gradient (by default 0.1 on every element); counts calls, keeps the last events.
final class ConstantGradient: Refresh {
    private let fixed: [Float]?
    var calls = 0
    var lastEvents: RefreshEvents?

    init(_ fixed: [Float]?) { self.fixed = fixed }

    func gradient(_ state: [Float], _ events: RefreshEvents) throws -> [Float] {
        calls += 1
        lastEvents = events
        return fixed ?? [Float](repeating: 0.1, count: state.count)
    }
}
