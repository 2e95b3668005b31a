import Compression
import CryptoKit
import Foundation

/// Applies a bundle patch (`tbsm-sdk build --delta-from OLD`; docs/bundle-format.md, Patches): the
/// old bundle + the patch = the new bundle, byte for byte, so an app downloads a few KB instead of
/// the whole bundle. (Kotlin: BundlePatch.kt, the same steps and checks.)
///
/// Atomic: the new bundle is written to `.<dir>.patch-new` beside the bundle, every file's sha256 is
/// checked (manifest.json against the header's new_manifest_sha256, the files it lists against it,
/// any other file, i.e. the signature, against the header's own sha256) and only then swapped in with
/// `FileManager.replaceItemAt` (one atomic exchange on APFS); a bad patch throws `TbsmError.bundle`
/// and leaves the old bundle as it was. Call `recover` before opening the bundle: it puts back a
/// bundle a killed swap left at `.<dir>.patch-old` (Kotlin's two-rename swap) and drops leftovers.
public enum BundlePatch {
    public static let patchFormatVersion = 2
    private static let copy: UInt8 = 1
    private static let insert: UInt8 = 2
    private static let maxOpsBytes: Int64 = 256 << 20 // a patch of a few-hundred-KB bundle is far smaller

    /// Patches `bundleDir` in place with `patch` (the bytes of a `.patch` file); returns the new manifest.
    @discardableResult
    public static func apply(_ bundleDir: URL, _ patch: Data) throws -> BundleManifest {
        try recover(bundleDir)
        let bytes = [UInt8](patch)
        guard let newline = bytes.firstIndex(of: 0x0A) else { throw TbsmError.bundle("not a bundle patch (no header line)") }
        let header: JSONObject
        do {
            header = try JSONObject(data: Data(bytes[0..<newline]))
        } catch {
            throw TbsmError.bundle("bundle patch header is not JSON: \(error)")
        }
        let version = try header.int("patch_format_version")
        if version != patchFormatVersion {
            throw TbsmError.bundle("unsupported patch_format_version \(version) (this SDK reads \(patchFormatVersion))")
        }
        let have = sha256(try Data(contentsOf: bundleDir.appendingPathComponent("manifest.json")))
        let wanted = try header.string("old_manifest_sha256")
        if have != wanted { throw TbsmError.bundle("the patch is for the bundle with manifest sha256 \(wanted), not \(have)") }
        let ops = try inflate(Array(bytes[(newline + 1)...]), size: header.long("ops_size"))

        let fm = FileManager.default
        let staging = sibling(bundleDir, "patch-new")
        try? fm.removeItem(at: staging)
        try fm.createDirectory(at: staging, withIntermediateDirectories: false)
        do {
            var pos = 0
            var unchecked: [String] = [] // no sha256 in the header: the new manifest must cover them
            for entry in try header.objects("files") {
                let name = try entry.string("name")
                if name.range(of: "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", options: .regularExpression) == nil {
                    throw TbsmError.bundle("patch file name \(name) is not a plain file name")
                }
                let oldURL = bundleDir.appendingPathComponent(name)
                let old = fm.fileExists(atPath: oldURL.path) ? [UInt8](try Data(contentsOf: oldURL)) : []
                let (data, next) = try rebuild(old, ops, start: pos, size: entry.long("size"), name: name)
                pos = next
                if entry.values["sha256"] == nil {
                    if name != "manifest.json" { unchecked.append(name) }
                } else if sha256(data) != (try entry.string("sha256")) {
                    throw TbsmError.bundle("patched \(name): sha256 differs from the patch's")
                }
                try data.write(to: staging.appendingPathComponent(name))
            }
            if pos != ops.count { throw TbsmError.bundle("\(ops.count - pos) op stream bytes left after the last file") }
            let manifestData = try Data(contentsOf: staging.appendingPathComponent("manifest.json"))
            if sha256(manifestData) != (try header.string("new_manifest_sha256")) {
                throw TbsmError.bundle("patched manifest.json differs from the patch's new_manifest_sha256")
            }
            let manifest = try BundleManifest.load(staging) // the sha256 of every file the new manifest lists
            if let name = unchecked.first(where: { manifest.files[$0] == nil }) {
                throw TbsmError.bundle("patched \(name): no sha256 in the patch and not listed in the new manifest")
            }
            _ = try fm.replaceItemAt(bundleDir, withItemAt: staging)
            return manifest
        } catch {
            try? fm.removeItem(at: staging)
            if let tbsm = error as? TbsmError { throw tbsm }
            throw TbsmError.bundle("bundle patch: \(error)")
        }
    }

    /// Puts back a bundle a killed swap left aside; drops a half-written new one.
    public static func recover(_ bundleDir: URL) throws {
        let fm = FileManager.default
        let aside = sibling(bundleDir, "patch-old")
        if !fm.fileExists(atPath: bundleDir.path) && fm.fileExists(atPath: aside.path) {
            try fm.moveItem(at: aside, to: bundleDir)
        }
        try? fm.removeItem(at: aside)
        try? fm.removeItem(at: sibling(bundleDir, "patch-new"))
    }

    private static func sibling(_ bundleDir: URL, _ what: String) -> URL {
        bundleDir.deletingLastPathComponent().appendingPathComponent(".\(bundleDir.lastPathComponent).\(what)")
    }

    /// The raw DEFLATE op stream after the header (Compression's ZLIB is raw DEFLATE, RFC 1951):
    /// exactly `size` bytes, or an error.
    private static func inflate(_ body: [UInt8], size: Int64) throws -> [UInt8] {
        if size < 0 || size > maxOpsBytes { throw TbsmError.bundle("patch ops_size \(size) out of range") }
        if body.isEmpty { throw TbsmError.bundle("patch has no op stream after its header") }
        let capacity = Int(size) + 1 // one spare byte: a stream longer than ops_size fills it
        var out = [UInt8](repeating: 0, count: capacity)
        let n = body.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                compression_decode_buffer(dst.baseAddress!, capacity, src.baseAddress!, src.count, nil, COMPRESSION_ZLIB)
            }
        }
        if n != Int(size) { throw TbsmError.bundle("patch op stream does not inflate to its ops_size \(size) bytes") }
        return Array(out[0..<n])
    }

    /// One file from the ops starting at `start`: (its bytes, where the next file's ops start).
    private static func rebuild(_ old: [UInt8], _ ops: [UInt8], start: Int, size: Int64, name: String) throws -> (Data, Int) {
        func u32(_ at: Int) throws -> Int {
            if at + 4 > ops.count { throw TbsmError.bundle("patch op stream ends inside an op (\(name))") }
            return Int(ops[at]) | Int(ops[at + 1]) << 8 | Int(ops[at + 2]) << 16 | Int(ops[at + 3]) << 24
        }
        var out = [UInt8]()
        out.reserveCapacity(Int(size))
        var pos = start
        while out.count < size {
            if pos >= ops.count { throw TbsmError.bundle("patch op stream ends inside \(name)") }
            switch ops[pos] {
            case copy:
                let offset = try u32(pos + 1)
                let length = try u32(pos + 5)
                if offset + length > old.count { throw TbsmError.bundle("patch copies bytes beyond the old \(name)") }
                if Int64(out.count + length) > size { throw TbsmError.bundle("patch ops overrun \(name)") }
                out.append(contentsOf: old[offset..<(offset + length)])
                pos += 9
            case insert:
                let length = try u32(pos + 1)
                if pos + 5 + length > ops.count { throw TbsmError.bundle("patch literal runs past the op stream (\(name))") }
                if Int64(out.count + length) > size { throw TbsmError.bundle("patch ops overrun \(name)") }
                out.append(contentsOf: ops[(pos + 5)..<(pos + 5 + length)])
                pos += 5 + length
            default:
                throw TbsmError.bundle("unknown patch op \(ops[pos]) in \(name)")
            }
        }
        return (Data(out), pos)
    }

    private static func sha256(_ data: Data) -> String {
        SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }
}
