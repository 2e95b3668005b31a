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

/// The user's most recent events, oldest first, at most `capacity` (the manifest's max_history, or what
/// the refresh program reads: `BundleManifest.historyCapacity`).
/// An event older than the last one is rejected: the model reads the history as a time series.
public final class HistoryBuffer {
    public let userId: Int64?
    public let capacity: Int
    private var items: [Event] = []

    public init(userId: Int64?, capacity: Int) {
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

    /// An independent copy: changes go to the copy first and replace the original once saved.
    public func copy() -> HistoryBuffer {
        let other = HistoryBuffer(userId: userId, capacity: capacity)
        other.items = items
        return other
    }

    /// The EventHistory JSON document (events.schema.json).
    public func toJson() throws -> Data {
        let events: [[String: Any]] = items.map { e in
            ["item_id": e.itemId, "category_id": e.categoryId, "behavior": e.behavior, "timestamp": e.timestamp]
        }
        let document: [String: Any] = ["user_id": userId.map { $0 as Any } ?? NSNull(), "events": events]
        return try JSONSerialization.data(withJSONObject: document)
    }

    /// Parses an EventHistory document; throws when invalid.
    public static func fromJson(_ data: Data, capacity: Int) throws -> HistoryBuffer {
        let json = try JSONObject(data: data)
        let buffer = try HistoryBuffer(userId: json.values["user_id"] is NSNull ? nil : json.long("user_id"), capacity: capacity)
        // "events" may be absent (the schema's default is an empty list).
        for event in try eventsFromJson(json.values["events"] == nil ? [] : json.objects("events")) { _ = buffer.add(event) }
        return buffer
    }

    /// Events of the events schema, oldest first; throws when invalid.
    static func eventsFromJson(_ objects: [JSONObject]) throws -> [Event] {
        var events: [Event] = []
        for (i, e) in objects.enumerated() {
            let event = try Event(itemId: e.long("item_id"), categoryId: e.long("category_id"), behavior: e.string("behavior"), timestamp: e.long("timestamp"))
            if let last = events.last, event.timestamp < last.timestamp { throw TbsmError.invalidArgument("events[\(i)] is older than events[\(i - 1)]") }
            events.append(event)
        }
        return events
    }
}

/// The history file exists but cannot be read now (an I/O error, or data protection before the first
/// unlock after a reboot): nothing was reset or moved; open again later. (Kotlin: the same name.)
public struct HistoryUnavailableException: Error, CustomStringConvertible {
    public let message: String
    public let underlying: Error?

    public init(_ message: String, underlying: Error? = nil) {
        self.message = message
        self.underlying = underlying
    }

    public var description: String { message }
}

/// The history kept in one JSON file, shared by every `TbsmRecommender` of the process that uses that
/// file: `open` returns the same instance for the same canonical path, so two screens (or two scenes)
/// add to one history instead of overwriting each other's.
///
/// Every change is saved first (`Data.write(options: .atomic)`: a uniquely named temporary file, fsync,
/// rename over the old one; protected until the first unlock on iOS) and applied in memory only once
/// the save has succeeded: a failed save throws and changes nothing.
///
/// With a refresh program, the store also keeps the user state refreshed from this history
/// (`RefreshedState`, in `<history>.state.json` beside it) and holds maxHistory + window events.
public final class HistoryStore {
    public let file: URL
    private let key: String
    private let manifest: BundleManifest
    private var buffer: HistoryBuffer
    private var refreshed: RefreshedState?
    private let lock = NSLock()
    /// Open recommenders using this store; guarded by `registryLock`.
    private var users = 0

    /// One store per canonical history path, for the whole process.
    private static var registry: [String: HistoryStore] = [:]
    /// Recursive: `load` runs under it and calls `onProblem`, which may itself open a recommender.
    private static let registryLock = NSRecursiveLock()

    private init(file: URL, key: String, manifest: BundleManifest, buffer: HistoryBuffer, refreshed: RefreshedState?) {
        self.file = file
        self.key = key
        self.manifest = manifest
        self.buffer = buffer
        self.refreshed = refreshed
    }

    public var stateFile: URL { RefreshedState.fileFor(file) }

    public var userId: Int64? {
        lock.lock()
        defer { lock.unlock() }
        return buffer.userId
    }

    public func events() -> [Event] {
        lock.lock()
        defer { lock.unlock() }
        return buffer.events()
    }

    /// The state to rank with: the one refreshed for this bundle, else the manifest's user_state.
    public func userState() -> [Float] {
        lock.lock()
        defer { lock.unlock() }
        return refreshed?.userState ?? manifest.userState
    }

    /// Saves the history with `event` appended, then keeps it. False (nothing saved or recorded) when
    /// `event` is older than the last event; an error from the save leaves the history as it was.
    @discardableResult
    public func record(_ event: Event) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        let next = buffer.copy()
        if !next.add(event) { return false }
        try HistoryStore.save(file, next)
        buffer = next
        return true
    }

    /// Saves an empty history, then keeps it; the state learned from the old one goes too (`resetUserState`).
    public func clear() throws {
        lock.lock()
        defer { lock.unlock() }
        let next = HistoryBuffer(userId: buffer.userId, capacity: buffer.capacity)
        try HistoryStore.save(file, next)
        buffer = next
        try deleteState()
    }

    /// Runs the refresh loop when the history has grown by every_events events since the last refresh
    /// (since the bundle was installed, the first time), saves the new state, then keeps it. True when it
    /// ran. A failure (the program, the save) throws and leaves the state as it was.
    @discardableResult
    public func refreshIfDue(_ refresh: Refresh) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard let spec = manifest.refresh else { return false }
        let events = buffer.events()
        if RefreshLoop.eventsSince(events, refreshed) < spec.everyEvents { return false }
        let start = refreshed?.userState ?? manifest.userState
        let state = try RefreshLoop.run(spec, manifest.userState, start, InputBuilder.refreshEvents(manifest, events), refresh)
        let next = RefreshedState.after(manifest, state, events)
        try RefreshedState.save(stateFile, next)
        refreshed = next
        return true
    }

    /// Deletes the refreshed state: ranking goes back to the shipped user_state.
    public func resetUserState() throws {
        lock.lock()
        defer { lock.unlock() }
        try deleteState()
    }

    private func deleteState() throws {
        if FileManager.default.fileExists(atPath: stateFile.path) { try FileManager.default.removeItem(at: stateFile) }
        refreshed = nil
    }

    /// Gives back one `open`; the last release forgets the instance (the next open reads the file again).
    public func release() {
        HistoryStore.registryLock.lock()
        defer { HistoryStore.registryLock.unlock() }
        users -= 1
        if users <= 0 && HistoryStore.registry[key] === self { HistoryStore.registry[key] = nil }
    }

    /// The store of `file` for `manifest`'s user: the instance already open for that file, or a new one
    /// with the history read from it (`load`) and the refreshed state beside it (`RefreshedState.load`).
    /// Each open needs one `release`. Throws `HistoryUnavailableException` when a file exists but cannot
    /// be read, and `TbsmError.illegalState` when the file is open for another bundle.
    public static func open(_ file: URL, _ manifest: BundleManifest, _ onProblem: (String) -> Void) throws -> HistoryStore {
        // Canonical path: the directory made to exist, then "." / ".." and symlinks resolved.
        let dir = file.deletingLastPathComponent()
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let canonical = dir.standardizedFileURL.resolvingSymlinksInPath().appendingPathComponent(file.lastPathComponent)
        let key = canonical.path
        registryLock.lock()
        defer { registryLock.unlock() }
        let store: HistoryStore
        if let existing = registry[key] {
            store = existing
        } else {
            let history = try load(canonical, manifest, onProblem)
            let state: RefreshedState?
            do {
                state = try RefreshedState.load(RefreshedState.fileFor(canonical), manifest, onProblem)
            } catch {
                throw HistoryUnavailableException("cannot read the refreshed state of \(canonical.path): \(error)", underlying: error)
            }
            store = HistoryStore(file: canonical, key: key, manifest: manifest, buffer: history, refreshed: state)
            registry[key] = store
        }
        if (manifest.userId != nil && store.buffer.userId != manifest.userId) || store.manifest.sha256 != manifest.sha256 || store.buffer.capacity != manifest.historyCapacity {
            throw TbsmError.illegalState(
                "\(file.path) is already open for user \(store.buffer.userId) with another bundle " +
                    "(manifest sha256 \(store.manifest.sha256.prefix(12))), not \(manifest.sha256.prefix(12)): close that recommender first"
            )
        }
        store.users += 1
        return store
    }

    /// The history in `file`:
    /// - no file: an empty history (a new user);
    /// - a file that exists but cannot be read: `HistoryUnavailableException`, nothing is touched;
    /// - a file that is read but is not a valid history for this bundle (bad JSON, events out of order,
    ///   another user, unknown behaviours): moved aside to `<file>.corrupt`, reported through
    ///   `onProblem`, replaced by an empty history.
    public static func load(_ file: URL, _ manifest: BundleManifest, _ onProblem: (String) -> Void) throws -> HistoryBuffer {
        let empty = HistoryBuffer(userId: manifest.userId, capacity: manifest.historyCapacity)
        let data: Data
        do {
            data = try Data(contentsOf: file)
        } catch {
            if !FileManager.default.fileExists(atPath: file.path) { return empty }
            throw HistoryUnavailableException("cannot read the history file \(file.path): \(error)", underlying: error)
        }
        var problem = ""
        do {
            let buffer = try HistoryBuffer.fromJson(data, capacity: manifest.historyCapacity)
            let unknown = buffer.events().map { $0.behavior }.filter { manifest.behaviors[$0] == nil }
            if manifest.userId != nil && buffer.userId != manifest.userId {
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
        let moved = (try? FileManager.default.moveItem(at: file, to: aside)) != nil
        onProblem(moved ? "\(problem) (moved to \(aside.lastPathComponent))" : "\(problem) (could not move it to \(aside.lastPathComponent))")
        return empty
    }

    /// Replaces `file` with `history` atomically: Foundation writes a uniquely named temporary file,
    /// fsyncs it and renames it over `file`. On iOS the file stays readable from the first unlock after
    /// a reboot until the next reboot (background launches included).
    public static func save(_ file: URL, _ history: HistoryBuffer) throws {
        try replaceAtomically(file, history.toJson())
    }
}

/// Replaces `file` with `data` atomically (the history and the refreshed user state alike).
func replaceAtomically(_ file: URL, _ data: Data) throws {
    try FileManager.default.createDirectory(at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
    #if os(macOS)
    let options: Data.WritingOptions = [.atomic]
    #else
    let options: Data.WritingOptions = [.atomic, .completeFileProtectionUntilFirstUserAuthentication]
    #endif
    try data.write(to: file, options: options)
}
