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
}
