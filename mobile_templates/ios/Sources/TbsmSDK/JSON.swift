import Foundation

/// Typed reads from a JSON object parsed with JSONSerialization; a missing or mistyped key throws,
/// naming the key. (Kotlin: org.json's getLong / getString / getJSONObject / getJSONArray.)
struct JSONObject {
    let values: [String: Any]

    init(_ values: [String: Any]) {
        self.values = values
    }

    init(data: Data) throws {
        guard let values = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw TbsmError.bundle("expected a JSON object")
        }
        self.values = values
    }

    private func typed<T>(_ key: String, _ type: T.Type) throws -> T {
        guard let value = values[key] else { throw TbsmError.bundle("missing JSON key \"\(key)\"") }
        guard let typedValue = value as? T else { throw TbsmError.bundle("JSON key \"\(key)\" is not a \(T.self)") }
        return typedValue
    }

    func long(_ key: String) throws -> Int64 { try typed(key, NSNumber.self).int64Value }

    func int(_ key: String) throws -> Int { try typed(key, NSNumber.self).intValue }

    func double(_ key: String) throws -> Double { try typed(key, NSNumber.self).doubleValue }

    func string(_ key: String) throws -> String { try typed(key, String.self) }

    func object(_ key: String) throws -> JSONObject { try JSONObject(typed(key, [String: Any].self)) }

    func objects(_ key: String) throws -> [JSONObject] { try typed(key, [[String: Any]].self).map { JSONObject($0) } }

    func longs(_ key: String) throws -> [Int64] { try typed(key, [NSNumber].self).map { $0.int64Value } }

    func doubles(_ key: String) throws -> [Double] { try typed(key, [NSNumber].self).map { $0.doubleValue } }

    func longMap(_ key: String) throws -> [String: Int64] { try typed(key, [String: NSNumber].self).mapValues { $0.int64Value } }

    func stringMap(_ key: String) throws -> [String: String] { try typed(key, [String: String].self) }
}
