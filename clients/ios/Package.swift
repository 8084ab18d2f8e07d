// swift-tools-version:5.9
// The iOS heartbeat collector as a Swift package. Not built here (no Swift toolchain on this
// machine): see README.md beside this file.
import PackageDescription

let package = Package(
    name: "BlockRemoteCollector",
    platforms: [.iOS(.v15)],
    products: [
        .library(name: "BlockRemoteCollector", targets: ["BlockRemoteCollector"]),
    ],
    targets: [
        .target(name: "BlockRemoteCollector", path: "BlockRemoteCollector"),
    ]
)
