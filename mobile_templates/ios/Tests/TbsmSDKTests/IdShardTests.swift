import XCTest
@testable import TbsmSDK

final class IdShardTests: XCTestCase {
    private let shard = IdShard(ids: [10, 20, 30], firstRow: 2, oovRow: 1, paddingRow: 0)

    func testKnownIdsMapToTheirRow() {
        XCTAssertEqual(shard.row(10), 2)
        XCTAssertEqual(shard.row(20), 3)
        XCTAssertEqual(shard.row(30), 4)
    }

    func testUnknownIdsMapToTheOovRow() {
        for id: Int64 in [0, 5, 15, 25, 31, Int64.max] { XCTAssertEqual(shard.row(id), 1) }
    }

    func testRealManifestMapsEveryIdToItsIndex() throws {
        let manifest = try BundleManifest.load(TestBundles.realBundle())
        for (i, id) in manifest.items.ids.enumerated() { XCTAssertEqual(manifest.items.row(id), Int64(i) + manifest.items.firstRow) }
        for (i, id) in manifest.categories.ids.enumerated() { XCTAssertEqual(manifest.categories.row(id), Int64(i) + manifest.categories.firstRow) }
    }

    func testDecodesTheManifestIdEncoding() throws {
        // sdk_builder.formats.encode_ids of these ids: differences of 1, 2 and 3 units (2^23 - 1 the largest
        // of one unit, 2^23 the smallest of two), up to the largest int64.
        let ids: [Int64] = [5, 6, 300, 300 + (1 << 23) - 1, 300 + (1 << 24) - 1, (1 << 46) + 7, 1 << 62, Int64.max]
        XCTAssertEqual(try IdShard.decodeIds("AAAFAAABAAEmf///gAAAAAAB//7cf//9///5////AP/+////////AP//"), ids)
        XCTAssertEqual(try IdShard.decodeIds(""), [])
    }

    func testBrokenIdEncodingsFailNamingTheField() {
        let broken = [
            ("AAA!", "not base64"), ("AAA=", "not base64"), ("AAAAAA", "truncated unit"), ("gAAA", "truncated value"),
            ("AAABAAAA", "repeats"), ("gAAAgAAAgAAAAAAA", "more than 3 units"), ("////////AgAA", "exceeds int64"),
            ("////////Af//AAAB", "exceeds int64"),
        ]
        for (text, reason) in broken {
            let shard = JSONObject(["ids": text, "first_row": 2, "oov_row": 1, "padding_row": 0])
            XCTAssertThrowsError(try IdShard.parse(shard, table: "items")) { error in
                let message = "\(error)"
                XCTAssertTrue(message.hasPrefix("manifest.json items.ids: ") && message.contains(reason) && !message.contains("\n"), message)
            }
        }
    }
}
