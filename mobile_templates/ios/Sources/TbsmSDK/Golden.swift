import Foundation

/// One case of golden.json: what the phone must score for a history and candidates.
public struct GoldenCase {
    public let name: String
    public let history: HistoryBuffer
    public let requestTime: Int64
    public let candidates: [Int64]
    public let scores: [Double]
}

public struct GoldenSet {
    public let tolerance: Double
    public let cases: [GoldenCase]

    /// Largest |score - expected| over every case, scoring with `inference`.
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

    public static func load(_ file: URL, maxHistory: Int) throws -> GoldenSet {
        let json = try JSONObject(data: Data(contentsOf: file))
        let cases = try json.objects("cases").map { c in
            try GoldenCase(
                name: c.string("name"),
                history: HistoryBuffer.fromJson(JSONSerialization.data(withJSONObject: c.object("history").values), capacity: maxHistory),
                requestTime: c.long("request_time"),
                candidates: c.longs("candidates"),
                scores: c.doubles("scores")
            )
        }
        return try GoldenSet(tolerance: json.double("tolerance"), cases: cases)
    }
}
