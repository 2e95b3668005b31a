import Foundation

/// One case of golden.json: what the phone must score for a history and candidates (with the shipped state).
public struct GoldenCase {
    public let name: String
    public let history: HistoryBuffer
    public let requestTime: Int64
    public let candidates: [Int64]
    public let scores: [Double]
}

/// One refresh case of golden.json: one whole refresh loop from `stateBefore` on `events` gives `stateAfter`.
public struct GoldenRefreshCase {
    public let name: String
    public let events: [Event]
    public let stateBefore: [Float]
    public let stateAfter: [Double]
    public let tolerance: Double
}

public struct GoldenSet {
    public let tolerance: Double
    public let cases: [GoldenCase]
    public var refreshCases: [GoldenRefreshCase] = []

    /// Largest |score - expected| over every case, scoring with `inference` and the manifest's user_state.
    public func maxAbsDiff(_ manifest: BundleManifest, _ inference: Inference) throws -> Double {
        var worst = 0.0
        for c in cases {
            let got = try inference.scores(InputBuilder.build(manifest, c.history.events(), c.requestTime, c.candidates))
            if got.count != c.scores.count { throw TbsmError.invalidArgument("case \(c.name): \(got.count) scores for \(c.scores.count)") }
            for i in got.indices {
                let d = abs(Double(got[i]) - c.scores[i])
                if !(d <= worst) { worst = d }  // NaN propagates
            }
        }
        return worst
    }

    /// Names of the refresh cases whose state after the loop (run with `refresh`) is off by more than their tolerance.
    public func failedRefreshCases(_ manifest: BundleManifest, _ refresh: Refresh) throws -> [String] {
        guard let spec = manifest.refresh else { return refreshCases.map { $0.name } }
        return try refreshCases.filter { c in
            let events = try InputBuilder.refreshEvents(manifest, c.events)
            let got = try RefreshLoop.run(spec, manifest.userState, c.stateBefore, events, refresh)
            return got.count != c.stateAfter.count || got.indices.contains { !(abs(Double(got[$0]) - c.stateAfter[$0]) <= c.tolerance) }
        }.map { $0.name }
    }

    /// `capacity`: events kept per history (the manifest's historyCapacity).
    public static func load(_ file: URL, capacity: Int) throws -> GoldenSet {
        let json = try JSONObject(data: Data(contentsOf: file))
        let cases = try json.objects("cases").map { c in
            try GoldenCase(
                name: c.string("name"),
                history: HistoryBuffer.fromJson(JSONSerialization.data(withJSONObject: c.object("history").values), capacity: capacity),
                requestTime: c.long("request_time"),
                candidates: c.longs("candidates"),
                scores: c.doubles("scores")
            )
        }
        let refreshCases = try (json.values["refresh_cases"] == nil ? [] : json.objects("refresh_cases")).map { c in
            try GoldenRefreshCase(
                name: c.string("name"),
                events: HistoryBuffer.eventsFromJson(c.objects("events")),
                stateBefore: c.doubles("state_before").map { Float($0) },
                stateAfter: c.doubles("state_after"),
                tolerance: c.double("tolerance")
            )
        }
        return try GoldenSet(tolerance: json.double("tolerance"), cases: cases, refreshCases: refreshCases)
    }
}
