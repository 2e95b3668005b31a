import Foundation

/// One interaction (events.schema.json: Event). `behavior` is a key of the manifest's behaviors.
public struct Event: Equatable {
    public let itemId: Int64
    public let categoryId: Int64
    public let behavior: String
    public let timestamp: Int64

    public init(itemId: Int64, categoryId: Int64, behavior: String, timestamp: Int64) {
        self.itemId = itemId
        self.categoryId = categoryId
        self.behavior = behavior
        self.timestamp = timestamp
    }
}

/// The user's most recent events, oldest first, at most `capacity` (the manifest's max_history).
/// An event older than the last one is rejected: the model reads the history as a time series.
public final class HistoryBuffer {
    public let userId: Int64
    public let capacity: Int
    private var items: [Event] = []

    public init(userId: Int64, capacity: Int) {
        self.userId = userId
        self.capacity = capacity
    }

    public var size: Int { items.count }

    public func events() -> [Event] { items }

    /// Appends `event`, dropping the oldest when full. False (nothing recorded) if it is older than the last.
    public func add(_ event: Event) -> Bool {
        if let last = items.last, event.timestamp < last.timestamp { return false }
        items.append(event)
        while items.count > capacity { items.removeFirst() }
        return true
    }

    public func clear() { items.removeAll() }

    /// The EventHistory JSON document (events.schema.json).
    public func toJson() throws -> Data {
        let events: [[String: Any]] = items.map { e in
            ["item_id": e.itemId, "category_id": e.categoryId, "behavior": e.behavior, "timestamp": e.timestamp]
        }
        let document: [String: Any] = ["user_id": userId, "events": events]
        return try JSONSerialization.data(withJSONObject: document)
    }

    /// Parses an EventHistory document; throws when invalid.
    public static func fromJson(_ data: Data, capacity: Int) throws -> HistoryBuffer {
        let json = try JSONObject(data: data)
        let buffer = try HistoryBuffer(userId: json.long("user_id"), capacity: capacity)
        // "events" may be absent (the schema's default is an empty list).
        let events = try json.values["events"] == nil ? [] : json.objects("events")
        for (i, e) in events.enumerated() {
            let event = try Event(itemId: e.long("item_id"), categoryId: e.long("category_id"), behavior: e.string("behavior"), timestamp: e.long("timestamp"))
            if !buffer.add(event) { throw TbsmError.invalidArgument("events[\(i)] is older than events[\(i - 1)]") }
        }
        return buffer
    }
}

/// Keeps a `HistoryBuffer` in a JSON file so the history survives restarts.
public enum HistoryStore {
    /// The history in `file`, or an empty one when there is none. A corrupt file, or one written for
    /// another user, is moved aside to `<file>.corrupt`, reported through `onProblem`, and replaced by
    /// an empty history.
    public static func load(_ file: URL, _ manifest: BundleManifest, _ onProblem: (String) -> Void) -> HistoryBuffer {
        let empty = HistoryBuffer(userId: manifest.userId, capacity: manifest.maxHistory)
        if !FileManager.default.fileExists(atPath: file.path) { return empty }
        var problem = ""
        do {
            let buffer = try HistoryBuffer.fromJson(Data(contentsOf: file), capacity: manifest.maxHistory)
            let unknown = buffer.events().map { $0.behavior }.filter { manifest.behaviors[$0] == nil }
            if buffer.userId != manifest.userId {
                problem = "history is for user \(buffer.userId), the bundle for \(manifest.userId)"
            } else if !unknown.isEmpty {
                problem = "history has unknown behaviors \(unknown)"
            } else {
                return buffer
            }
        } catch {
            problem = "history file is corrupt: \(error)"
        }
        let aside = URL(fileURLWithPath: file.path + ".corrupt")
        try? FileManager.default.removeItem(at: aside)
        try? FileManager.default.moveItem(at: file, to: aside)
        onProblem(problem)
        return empty
    }

    /// Writes atomically (a temporary file renamed over the old one).
    public static func save(_ file: URL, _ history: HistoryBuffer) throws {
        try FileManager.default.createDirectory(at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
        try history.toJson().write(to: file, options: .atomic)
    }
}
