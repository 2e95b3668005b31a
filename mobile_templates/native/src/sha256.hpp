// SHA-256 (FIPS 180-4) of a file, as lowercase hex. Self-contained so the client needs no crypto library.
#pragma once

#include <string>

namespace tbsm {

// Hex digest of the file at `path`; throws std::runtime_error if it cannot be read.
std::string sha256_file(const std::string& path);
// Hex digest of a byte string (used by the self-test).
std::string sha256_hex(const std::string& bytes);

}  // namespace tbsm
