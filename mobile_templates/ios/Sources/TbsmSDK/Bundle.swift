import CryptoKit
import Foundation

/// A bundle that cannot be used (unknown format, missing or altered file, malformed manifest), a call
/// that breaks the contract, or a call on a closed recommender. (Kotlin: BundleException,
/// IllegalArgumentException, IllegalStateException.)
public enum TbsmError: Error, CustomStringConvertible {
    case bundle(String)
    case invalidArgument(String)
    case illegalState(String)

    public var description: String {
        switch self {
        case .bundle(let message): return message
        case .invalidArgument(let message): return message
        case .illegalState(let message): return message
        }
    }
}

/// Global ids of one table in the bundle, sorted; ids[i] has local row i + firstRow.
public struct IdShard {
    public let ids: [Int64]
    public let firstRow: Int64
    public let oovRow: Int64
    public let paddingRow: Int64

    public init(ids: [Int64], firstRow: Int64, oovRow: Int64, paddingRow: Int64) {
        self.ids = ids
        self.firstRow = firstRow
        self.oovRow = oovRow
        self.paddingRow = paddingRow
    }

    /// Local row of a global id: binary search, oovRow when the id is not in the bundle.
    public func row(_ globalId: Int64) -> Int64 {
        var low = 0
        var high = ids.count - 1
        while low <= high {
            let mid = low + (high - low) / 2
            if ids[mid] < globalId {
                low = mid + 1
            } else if ids[mid] > globalId {
                high = mid - 1
            } else {
                return Int64(mid) + firstRow
            }
        }
        return oovRow
    }

    /// 3 units of 23 bits hold 69: every id delta, like every id, is a non-negative Int64.
    static let maxUnits = 3
    static let unitBits = 23
    static let more = 1 << unitBits
    static let base64: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    /// manifest `table` ("items" or "categories"): its ids, decoded and checked (sorted, unique, int64).
    static func parse(_ json: JSONObject, table: String) throws -> IdShard {
        let ids: [Int64]
        do {
            ids = try decodeIds(json.string("ids"))
        } catch TbsmError.invalidArgument(let reason) {
            throw TbsmError.bundle("manifest.json \(table).ids: \(reason)")
        }
        return try IdShard(ids: ids, firstRow: json.long("first_row"), oovRow: json.long("oov_row"), paddingRow: json.long("padding_row"))
    }

    /// The manifest's id encoding (sdk_builder/formats.py, IDS_ENCODING): the first id, then each id minus
    /// the one before it (>= 1), each in 23-bit groups, least significant first, one group a 3-byte big-endian
    /// unit (group | 0x800000 if more groups follow), in base64. A unit is exactly 4 base64 characters, the
    /// first the most significant, so it is read straight off them. Throws TbsmError.invalidArgument with a
    /// one-line reason for anything else.
    public static func decodeIds(_ text: String) throws -> [Int64] {
        var sextets: [Int] = []
        sextets.reserveCapacity(text.utf8.count)
        for (at, c) in text.unicodeScalars.enumerated() {
            guard c.isASCII, let sextet = base64.firstIndex(of: UInt8(c.value)) else {
                throw TbsmError.invalidArgument("not base64 (character '\(c)' at \(at); whole units are never padded)")
            }
            sextets.append(sextet)
        }
        if sextets.count % 4 != 0 {
            throw TbsmError.invalidArgument("truncated unit: \(sextets.count) characters is not a whole number of 4-character units")
        }
        let units = stride(from: 0, to: sextets.count, by: 4).map { sextets[$0] << 18 | sextets[$0 + 1] << 12 | sextets[$0 + 2] << 6 | sextets[$0 + 3] }
        var ids: [Int64] = []
        ids.reserveCapacity(units.filter { $0 < more }.count)  // a value's last unit is the only one without the flag
        var value: Int64 = 0
        var groups = 0
        var start = 0
        for (u, unit) in units.enumerated() {
            if groups == maxUnits {
                throw TbsmError.invalidArgument("value \(ids.count) (at unit \(start)) has more than \(maxUnits) units: not an int64")
            }
            let group = Int64(unit & (more - 1))
            // The last group may hold bits 46..62 only: more would make a value of 2^63 or more.
            if groups == maxUnits - 1 && group >> (63 - unitBits * (maxUnits - 1)) != 0 {
                throw TbsmError.invalidArgument("id \(ids.count) exceeds int64")
            }
            value |= group << (unitBits * groups)
            groups += 1
            if unit < more {
                let previous = ids.last ?? 0
                if !ids.isEmpty && value == 0 {
                    throw TbsmError.invalidArgument("id \(ids.count) repeats the one before it: ids must be sorted and unique")
                }
                if value > Int64.max - previous { throw TbsmError.invalidArgument("id \(ids.count) exceeds int64") }
                ids.append(previous + value)
                value = 0
                groups = 0
                start = u + 1
            }
        }
        if groups != 0 { throw TbsmError.invalidArgument("truncated value: its last unit (\(units.count - 1)) says more units follow") }
        return ids
    }
    }
}

/// manifest.refresh: refresh.pte's `method` takes (user_state, the last `events` = maxHistory + `window`
/// events) and returns (loss, gradient); the template runs `steps` steps of the loop when the history
/// has grown by `everyEvents` events since the last refresh (see `RefreshLoop`).
public struct RefreshSpec {
    public let file: String
    public let method: String
    public let window: Int
    public let events: Int
    public let everyEvents: Int
    public let steps: Int
    public let learningRate: Double
    public let maxDrift: Double

    public init(file: String, method: String, window: Int, events: Int, everyEvents: Int, steps: Int, learningRate: Double, maxDrift: Double) {
        self.file = file
        self.method = method
        self.window = window
        self.events = events
        self.everyEvents = everyEvents
        self.steps = steps
        self.learningRate = learningRate
        self.maxDrift = maxDrift
    }

    static func parse(_ json: JSONObject) throws -> RefreshSpec {
        let spec = try RefreshSpec(
            file: json.string("file"),
            method: json.string("method"),
            window: json.int("window"),
            events: json.int("events"),
            everyEvents: json.int("every_events"),
            steps: json.int("steps"),
            learningRate: json.double("learning_rate"),
            maxDrift: json.double("max_drift")
        )
        if spec.window < 1 || spec.everyEvents < 1 || spec.steps < 1 || !(spec.maxDrift > 0) {
            throw TbsmError.bundle("manifest refresh: window, every_events and steps must be >= 1, max_drift > 0")
        }
        return spec
    }
}

/// The fields of manifest.json a phone needs (sdk_builder/formats.py: Manifest). `sha256` is the hash of
/// manifest.json itself: a refreshed user state is kept only for the bundle it was refreshed with.
public struct BundleManifest {
    public static let supportedFormatVersion = 3
    public static let inputNames = [
        "hist_items", "hist_categories", "hist_behaviors", "hist_timestamps", "request_time", "candidates",
        "user_state",
    ]

    public let formatVersion: Int
    public let userId: Int64?  // nil: a cold-start bundle (manifest kind cold_start), for any user without one
    public let items: IdShard
    public let categories: IdShard
    public let behaviors: [String: Int64]
    public let method: String
    public let maxHistory: Int
    public let maxCandidates: Int
    public let files: [String: String]
    public let userState: [Float]
    public var refresh: RefreshSpec? = nil
    public var sha256: String = ""

    /// Events the history keeps: what ranking reads and, with a refresh program, what it trains on.
    public var historyCapacity: Int {
        guard let refresh = refresh else { return maxHistory }
        return max(refresh.events, refresh.everyEvents)
    }

    public static func parse(_ data: Data) throws -> BundleManifest {
        let json = try JSONObject(data: data)
        let version = try json.int("format_version")
        if version != supportedFormatVersion {
            throw TbsmError.bundle("unsupported bundle format_version \(version) (this SDK reads \(supportedFormatVersion))")
        }
        let program = try json.object("program")
        let names = try program.objects("inputs").map { try $0.string("name") }
        if names != inputNames { throw TbsmError.bundle("program inputs \(names) differ from \(inputNames)") }
        // float(np.float32) in the JSON: the double read back narrows to that float32 exactly.
        let state = try json.doubles("user_state").map { Float($0) }
        if state.isEmpty { throw TbsmError.bundle("manifest user_state is empty") }
        var refresh: RefreshSpec? = nil
        if let value = json.values["refresh"], !(value is NSNull) { refresh = try RefreshSpec.parse(json.object("refresh")) }
        let files = try json.stringMap("files")
        if let refresh = refresh, files[refresh.file] == nil { throw TbsmError.bundle("manifest files lists no sha256 for \(refresh.file)") }
        let maxHistory = try program.int("max_history")
        if let refresh = refresh, refresh.events != maxHistory + refresh.window {
            throw TbsmError.bundle("manifest refresh: events \(refresh.events) is not max_history + window")
        }
        return try BundleManifest(
            formatVersion: version,
            userId: json.values["user_id"] is NSNull ? nil : json.long("user_id"),
            items: IdShard.parse(json.object("items"), table: "items"),
            categories: IdShard.parse(json.object("categories"), table: "categories"),
            behaviors: json.longMap("behaviors"),
            method: program.string("method"),
            maxHistory: maxHistory,
            maxCandidates: program.int("max_candidates"),
            files: files,
            userState: state,
            refresh: refresh,
            sha256: sha256(data)
        )
    }

    /// Reads manifest.json of `dir` and checks the sha256 of every file it lists.
    public static func load(_ dir: URL) throws -> BundleManifest {
        let manifest = try parse(Data(contentsOf: dir.appendingPathComponent("manifest.json")))
        if manifest.files["model.pte"] == nil { throw TbsmError.bundle("manifest files lists no sha256 for model.pte") }
        for (name, expected) in manifest.files {
            let file = dir.appendingPathComponent(name)
            if name.contains("/") || !FileManager.default.fileExists(atPath: file.path) {
                throw TbsmError.bundle("bundle file \(name) is missing")
            }
            let actual = try sha256(file)
            if actual != expected { throw TbsmError.bundle("sha256 mismatch for \(name): manifest \(expected), file \(actual)") }
        }
        return manifest
    }

    public static func sha256(_ file: URL) throws -> String {
        sha256(try Data(contentsOf: file, options: .alwaysMapped))
    }

    public static func sha256(_ data: Data) -> String {
        SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }
}
