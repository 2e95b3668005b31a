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
        // sdk_builder.formats.encode_ids of these ids: 1-, 2- and 9-byte varints, up to the largest int64.
        let ids: [Int64] = [5, 127, 128, 300, 16383, 16384, 1 << 62, Int64.max]
        XCTAssertEqual(try IdShard.decodeIds("BXoBrAHTfQGAgP///////z///////////z8="), ids)
        XCTAssertEqual(try IdShard.decodeIds(""), [])
    }

    func testBrokenIdEncodingsFailNamingTheField() {
        let broken = [
            ("AQ!=", "not base64"), ("AQE", "not base64"), ("gA==", "truncated varint"), ("AQA=", "repeats"),
            ("//////////9/AQ==", "exceeds int64"), ("gICAgICAgICAAQ==", "longer than 9 bytes"),
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
