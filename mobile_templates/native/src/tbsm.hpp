// TBSM bundle reader and ranker: the reference for what a mobile client must do with a bundle.
//
// A bundle is a directory with model.pte, manifest.json, events.schema.json, golden.json and, when
// built with --refresh, refresh.pte (sdk_builder/formats.py defines them). This file keeps the
// contract in one place:
//   * refuse a manifest whose format_version is unknown and any file whose sha256 differs;
//   * map a global id to a local row by binary search in the manifest's sorted ids
//     (ids[i] -> i + first_row, absent -> oov_row);
//   * keep the last max_history events, left-pad with padding_row / behaviour 0 / timestamp 0;
//   * call method "forward" with (hist_items, hist_categories, hist_behaviors, hist_timestamps,
//     request_time[1], candidates[N]) as int64 and user_state[S] as float32 (the refreshed state
//     for this bundle when there is one, else manifest.user_state), and read float32 scores[N];
//   * refresh the user state with refresh.pte: `steps` gradient steps on the last W = max_history +
//     window events, each followed by a clip of the drift from the shipped state to max_drift.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace executorch::extension::module {
class Module;
}

namespace tbsm {

constexpr int64_t kFormatVersion = 3;
// user_id null: a cold-start bundle (it ranks any user's history), or the history of a new user.
constexpr int64_t kNoUser = -1;

struct IdShard {
  std::vector<int64_t> ids;  // sorted ascending
  int64_t first_row = 2;
  int64_t oov_row = 1;
  int64_t padding_row = 0;

  int64_t row(int64_t global_id) const;
};

// The manifest's id encoding (sdk_builder/formats.py, IDS_ENCODING): the first id, then each id minus the
// one before it (>= 1), each in 23-bit groups, least significant first, one group a 3-byte big-endian unit
// (group | 0x800000 if more groups follow), in base64 (4 characters a unit, never padded). Throws
// std::invalid_argument with a one-line reason for anything else.
std::vector<int64_t> decode_ids(const std::string& text);

// manifest.refresh: how and when the user state is refreshed on the device.
struct RefreshSpec {
  std::string file;  // a file of manifest.files
  std::string method = "forward";
  int64_t window = 0;        // positives per refresh: the last `window` events
  int64_t events = 0;        // W = max_history + window: how many events the program reads
  int64_t every_events = 0;  // refresh when the history has grown by this many events
  int64_t steps = 0;
  double learning_rate = 0.0;
  double max_drift = 0.0;  // L2 bound of (state - shipped state)
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
  std::vector<float> user_state;             // the shipped state, S = emb_dim + z_dim values
  std::optional<RefreshSpec> refresh;        // absent: the bundle has no refresh.pte
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

// The seven input tensors of the program, in contract order.
struct Inputs {
  std::vector<int64_t> hist_items, hist_categories, hist_behaviors, hist_timestamps;
  std::vector<int64_t> request_time;  // one element
  std::vector<int64_t> candidates;
  std::vector<float> user_state;
};

// Inputs 1-4 of refresh.pte: the last W = manifest.refresh.events (max_history + window) events,
// encoded like the history.
struct RefreshEvents {
  std::vector<int64_t> items, categories, behaviors, timestamps;
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
                    const std::vector<int64_t>& candidate_ids, const std::vector<float>& user_state);
RefreshEvents build_refresh_events(const Manifest& m, const History& h);
// One step of the refresh loop after the gradient: state -= learning_rate * gradient (float32), then
// the drift d = state - shipped is scaled back onto the max_drift ball when |d| (float64 sum) exceeds it.
void refresh_step(const RefreshSpec& spec, const std::vector<float>& shipped, const std::vector<float>& gradient,
                  std::vector<float>& state);

// A refreshed state kept beside the history (formats.RefreshedState), tagged with the sha256 of the
// bundle's manifest.json: a state for another bundle is ignored.
struct RefreshedState {
  std::string manifest_sha256;
  std::vector<float> user_state;
  int64_t through_timestamp = 0;  // the newest event the last refresh trained on
  int64_t through_count = 0;      // how many events of the history had that timestamp then
};
// The state in `path` if it exists and belongs to the bundle whose manifest has `manifest_sha256`.
std::optional<RefreshedState> read_refreshed_state(const std::string& path, const std::string& manifest_sha256,
                                                   size_t state_size);
// Writes `state` to a temporary file beside `path`, then renames it over `path`.
void write_refreshed_state(const std::string& path, const RefreshedState& state);

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
  const std::string& manifest_sha256() const { return manifest_sha256_; }
  // Scores of prepared inputs, one per candidate, in candidate order.
  std::vector<float> score(Inputs& inputs);
  // Maps, scores and sorts by descending score (ties keep candidate order).
  std::vector<Scored> rank(const History& history, const std::vector<int64_t>& candidate_ids,
                           int64_t request_time, const std::vector<float>& user_state);
  // refresh.pte's gradient of the loss with respect to the user state; `loss` receives output 0.
  std::vector<float> refresh_gradient(std::vector<float> state, RefreshEvents& events, float* loss = nullptr);
  // The whole refresh loop (manifest.refresh.steps steps) from `state` on the history's last W events.
  // Throws when the bundle has no refresh program.
  std::vector<float> refresh(std::vector<float> state, const History& history);

 private:
  std::string dir_;
  std::string manifest_sha256_;
  Manifest manifest_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  std::unique_ptr<executorch::extension::module::Module> refresh_module_;
};

}  // namespace tbsm
