// swift-tools-version:5.9
import PackageDescription

// The ExecuTorch release that exported model.pte (manifest "versions"); runtime and program must match.
let executorchBranch = "swiftpm-1.5.1"

// Kernel and backend libraries register themselves from static initialisers; the linker's -all_load
// keeps it from dropping them ("Backend XnnpackBackend is not registered", "Missing operator").
// SwiftPM passes these flags to swiftc, which has no -all_load of its own (`swift test` fails with
// "unknown argument"): hand it to the linker with -Xlinker, as ExecuTorch's own Package.swift does.
let forceLoad: [LinkerSetting] = [.unsafeFlags(["-Xlinker", "-all_load"])]

let package = Package(
    name: "TbsmSDK",
    platforms: [.iOS(.v17), .macOS(.v12)],
    products: [
        .library(name: "TbsmSDK", targets: ["TbsmSDK"]),
    ],
    dependencies: [
        .package(url: "https://github.com/pytorch/executorch", branch: executorchBranch),
    ],
    targets: [
        .target(
            name: "TbsmSDK",
            dependencies: [
                .product(name: "executorch", package: "executorch"),
                .product(name: "backend_xnnpack", package: "executorch"),
                // Ops XNNPACK does not take (embedding, gather, where, ...) run on these kernels;
                // the quantized ones serve int8 bundles (quantized_decomposed::embedding_byte).
                .product(name: "kernels_optimized", package: "executorch"),
                .product(name: "kernels_quantized", package: "executorch"),
            ],
            linkerSettings: forceLoad
        ),
        .testTarget(
            name: "TbsmSDKTests",
            dependencies: ["TbsmSDK"],
            resources: [.copy("Resources")],
            linkerSettings: forceLoad
        ),
    ]
)
