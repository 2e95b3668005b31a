// TBSM bundle reader and ranker: the reference for what a mobile client must do with a bundle.
//
// A bundle is a directory with model.pte, manifest.json, events.schema.json and golden.json
// (sdk_builder/formats.py defines them). This file keeps the contract in one place:
//   * refuse a manifest whose format_version is unknown and any file whose sha256 differs;
//   * map a global id to a local row by binary search in the manifest's sorted ids
//     (ids[i] -> i + first_row, absent -> oov_row);
//   * keep the last max_history events, left-pad with padding_row / behaviour 0 / timestamp 0;
//   * call method "forward" with (hist_items, hist_categories, hist_behaviors, hist_timestamps,
//     request_time[1], candidates[N]) as int64 and read float32 scores[N].
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace executorch::extension::module {
class Module;
}

namespace tbsm {

constexpr int64_t kFormatVersion = 2;
// user_id null: a cold-start bundle (it ranks any user's history), or the history of a new user.
constexpr int64_t kNoUser = -1;

struct IdShard {
  std::vector<int64_t> ids;  // sorted ascending
  int64_t first_row = 2;
  int64_t oov_row = 1;
  int64_t padding_row = 0;

  int64_t row(int64_t global_id) const;
};

struct Manifest {
  int64_t format_version = 0;
  int64_t user_id = 0;
  IdShard items;
  IdShard categories;
  std::map<std::string, int64_t> behaviors;  // "pv" -> 1, ...
  std::string method = "forward";
  std::vector<std::string> input_names;
  int64_t max_history = 20;
  int64_t max_candidates = 4096;
  std::map<std::string, std::string> files;  // file name -> sha256 hex
};

struct Event {
  int64_t item_id = 0;
  int64_t category_id = 0;
  std::string behavior;
  int64_t timestamp = 0;
};

struct History {
  int64_t user_id = 0;
  std::vector<Event> events;  // oldest first
};

// The six int64 input tensors of the program, in contract order.
struct Inputs {
  std::vector<int64_t> hist_items, hist_categories, hist_behaviors, hist_timestamps;
  std::vector<int64_t> request_time;  // one element
  std::vector<int64_t> candidates;
};

struct Scored {
  int64_t item_id;
  float score;
};

// The expected input names, in order; a manifest listing others is refused.
const std::vector<std::string>& contract_input_names();

Manifest parse_manifest(const nlohmann::json& doc);
// Parses an EventHistory document; throws if events are not oldest first or a field is missing.
History parse_history(const nlohmann::json& doc);
Inputs build_inputs(const Manifest& m, const History& h, int64_t request_time,
                    const std::vector<int64_t>& candidate_ids);

std::string read_file(const std::string& path);
// Lowercase hex SHA-256 of the file at `path` (OpenSSL EVP); throws if it cannot be read.
std::string sha256_file(const std::string& path);

class Bundle {
 public:
  // Reads manifest.json, refuses an unknown format_version, verifies the sha256 of every file in
  // manifest.files (model.pte must be listed) and loads the method. Throws std::runtime_error.
  explicit Bundle(const std::string& dir);
  ~Bundle();

  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }
  // Scores of prepared inputs, one per candidate, in candidate order.
  std::vector<float> score(Inputs& inputs);
  // Maps, scores and sorts by descending score (ties keep candidate order).
  std::vector<Scored> rank(const History& history, const std::vector<int64_t>& candidate_ids,
                           int64_t request_time);

 private:
  std::string dir_;
  Manifest manifest_;
  std::unique_ptr<executorch::extension::module::Module> module_;
};

}  // namespace tbsm
