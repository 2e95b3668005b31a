#include "tbsm.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <openssl/evp.h>

namespace tbsm {

using nlohmann::json;

using executorch::extension::from_blob;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;
using executorch::runtime::Error;

int64_t IdShard::row(int64_t global_id) const {
  auto it = std::lower_bound(ids.begin(), ids.end(), global_id);
  if (it != ids.end() && *it == global_id) return first_row + (it - ids.begin());
  return oov_row;
}

const std::vector<std::string>& contract_input_names() {
  static const std::vector<std::string> names = {"hist_items",      "hist_categories", "hist_behaviors",
                                                 "hist_timestamps", "request_time",    "candidates",
                                                 "user_state"};
  return names;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string sha256_file(const std::string& path) {
  const std::string bytes = read_file(path);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &size, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("sha256 of " + path + " failed");
  }
  static const char hex[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < size; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

std::vector<int64_t> decode_ids(const std::string& text) {
  constexpr int kMaxUnits = 3;  // 3 x 23 = 69 bits: every id delta, like every id, fits a non-negative int64
  constexpr int kUnitBits = 23;
  constexpr uint32_t kMore = 1u << kUnitBits;
  std::vector<uint32_t> sextets;
  sextets.reserve(text.size());
  for (size_t at = 0; at < text.size(); ++at) {
    const char c = text[at];
    if (c >= 'A' && c <= 'Z') sextets.push_back(c - 'A');
    else if (c >= 'a' && c <= 'z') sextets.push_back(c - 'a' + 26);
    else if (c >= '0' && c <= '9') sextets.push_back(c - '0' + 52);
    else if (c == '+') sextets.push_back(62);
    else if (c == '/') sextets.push_back(63);
    else throw std::invalid_argument("not base64 (byte " + std::to_string(static_cast<unsigned char>(c)) + " at " +
                                     std::to_string(at) + "; whole units are never padded)");
  }
  if (sextets.size() % 4 != 0) {
    throw std::invalid_argument("truncated unit: " + std::to_string(sextets.size()) +
                                " characters is not a whole number of 4-character units");
  }
  // A big-endian 3-byte unit is exactly 4 base64 characters, the first the most significant.
  std::vector<uint32_t> units(sextets.size() / 4);
  for (size_t u = 0; u < units.size(); ++u) {
    units[u] = sextets[4 * u] << 18 | sextets[4 * u + 1] << 12 | sextets[4 * u + 2] << 6 | sextets[4 * u + 3];
  }
  std::vector<int64_t> ids;
  ids.reserve(std::count_if(units.begin(), units.end(), [](uint32_t u) { return u < kMore; }));
  uint64_t value = 0;
  int groups = 0;
  size_t start = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    if (groups == kMaxUnits) {
      throw std::invalid_argument("value " + std::to_string(ids.size()) + " (at unit " + std::to_string(start) +
                                  ") has more than " + std::to_string(kMaxUnits) + " units: not an int64");
    }
    const uint64_t group = units[u] & (kMore - 1);
    // The last group may hold bits 46..62 only: more would make a value of 2^63 or more.
    if (groups == kMaxUnits - 1 && (group >> (63 - kUnitBits * (kMaxUnits - 1))) != 0) {
      throw std::invalid_argument("id " + std::to_string(ids.size()) + " exceeds int64");
    }
    value |= group << (kUnitBits * groups);
    ++groups;
    if (units[u] & kMore) continue;
    const int64_t previous = ids.empty() ? 0 : ids.back();
    const int64_t delta = static_cast<int64_t>(value);  // < 2^63: checked above
    if (!ids.empty() && delta == 0) {
      throw std::invalid_argument("id " + std::to_string(ids.size()) + " repeats the one before it: ids must be sorted and unique");
    }
    if (delta > INT64_MAX - previous) throw std::invalid_argument("id " + std::to_string(ids.size()) + " exceeds int64");
    ids.push_back(previous + delta);
    value = 0;
    groups = 0;
    start = u + 1;
  }
  if (groups != 0) {
    throw std::invalid_argument("truncated value: its last unit (" + std::to_string(units.size() - 1) +
                                ") says more units follow");
  }
  return ids;
}

static IdShard parse_shard(const json& v, const std::string& table) {
  IdShard s;
  const json& ids = v.at("ids");
  if (!ids.is_string()) throw std::runtime_error("manifest.json " + table + ".ids: not a string (format_version 3 encodes ids)");
  try {
    s.ids = decode_ids(ids.get<std::string>());
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("manifest.json " + table + ".ids: " + e.what());
  }
  s.first_row = v.at("first_row").get<int64_t>();
  s.oov_row = v.at("oov_row").get<int64_t>();
  s.padding_row = v.at("padding_row").get<int64_t>();
  return s;
}

Manifest parse_manifest(const json& doc) {
  Manifest m;
  m.format_version = doc.at("format_version").get<int64_t>();
  if (m.format_version != kFormatVersion) {
    throw std::runtime_error("unsupported bundle format_version " + std::to_string(m.format_version) +
                             " (this client reads " + std::to_string(kFormatVersion) + ")");
  }
  m.user_id = doc.at("user_id").is_null() ? kNoUser : doc.at("user_id").get<int64_t>();
  m.items = parse_shard(doc.at("items"), "items");
  m.categories = parse_shard(doc.at("categories"), "categories");
  m.behaviors = doc.at("behaviors").get<std::map<std::string, int64_t>>();
  const json& program = doc.at("program");
  m.method = program.at("method").get<std::string>();
  m.max_history = program.at("max_history").get<int64_t>();
  m.max_candidates = program.at("max_candidates").get<int64_t>();
  for (const auto& spec : program.at("inputs")) m.input_names.push_back(spec.at("name").get<std::string>());
  if (m.input_names != contract_input_names()) {
    throw std::runtime_error("manifest program.inputs differ from the inputs this client builds");
  }
  m.files = doc.at("files").get<std::map<std::string, std::string>>();
  // float(np.float32) in the JSON: the double read back narrows to that float32 exactly.
  for (double v : doc.at("user_state").get<std::vector<double>>()) m.user_state.push_back(static_cast<float>(v));
  if (m.user_state.empty()) throw std::runtime_error("manifest user_state is empty");
  const auto found = doc.find("refresh");
  if (found != doc.end() && !found->is_null()) {
    const json& refresh = *found;
    RefreshSpec r;
    r.file = refresh.at("file").get<std::string>();
    r.method = refresh.at("method").get<std::string>();
    r.window = refresh.at("window").get<int64_t>();
    r.events = refresh.at("events").get<int64_t>();
    r.every_events = refresh.at("every_events").get<int64_t>();
    r.steps = refresh.at("steps").get<int64_t>();
    r.learning_rate = refresh.at("learning_rate").get<double>();
    r.max_drift = refresh.at("max_drift").get<double>();
    if (r.window < 1 || r.every_events < 1 || r.steps < 1 || !(r.max_drift > 0)) {
      throw std::runtime_error("manifest refresh: window, every_events and steps must be >= 1, max_drift > 0");
    }
    if (r.events != m.max_history + r.window) {
      throw std::runtime_error("manifest refresh: events " + std::to_string(r.events) + " is not max_history + window");
    }
    if (m.files.count(r.file) == 0) throw std::runtime_error("manifest files lists no sha256 for " + r.file);
    m.refresh = r;
  }
  return m;
}

History parse_history(const json& doc) {
  History h;
  h.user_id = doc.at("user_id").is_null() ? kNoUser : doc.at("user_id").get<int64_t>();
  const auto events = doc.find("events");  // may be absent: the schema's default is []
  if (events == doc.end()) return h;
  for (const auto& e : *events) {
    Event ev;
    ev.item_id = e.at("item_id").get<int64_t>();
    ev.category_id = e.at("category_id").get<int64_t>();
    ev.behavior = e.at("behavior").get<std::string>();
    ev.timestamp = e.at("timestamp").get<int64_t>();
    if (ev.item_id < 0 || ev.category_id < 0 || ev.timestamp < 0) {
      throw std::runtime_error("history ids and timestamps must be >= 0");
    }
    if (!h.events.empty() && ev.timestamp < h.events.back().timestamp) {
      throw std::runtime_error("history events must be oldest first: timestamp " + std::to_string(ev.timestamp) +
                               " follows " + std::to_string(h.events.back().timestamp));
    }
    h.events.push_back(ev);
  }
  return h;
}

// The last `t` events as local rows, oldest first, left-padded (padding rows, behaviour 0, timestamp 0).
static RefreshEvents encode_events(const Manifest& m, const History& h, size_t t) {
  RefreshEvents out;
  out.items.assign(t, m.items.padding_row);
  out.categories.assign(t, m.categories.padding_row);
  out.behaviors.assign(t, 0);
  out.timestamps.assign(t, 0);
  const size_t n = std::min(t, h.events.size());
  const size_t skip = h.events.size() - n;  // keep the most recent t events
  for (size_t k = 0; k < n; ++k) {
    const Event& e = h.events[skip + k];
    const size_t slot = t - n + k;
    auto code = m.behaviors.find(e.behavior);
    if (code == m.behaviors.end()) throw std::runtime_error("unknown behavior \"" + e.behavior + "\"");
    out.items[slot] = m.items.row(e.item_id);
    out.categories[slot] = m.categories.row(e.category_id);
    out.behaviors[slot] = code->second;
    out.timestamps[slot] = e.timestamp;
  }
  return out;
}

Inputs build_inputs(const Manifest& m, const History& h, int64_t request_time,
                    const std::vector<int64_t>& candidate_ids, const std::vector<float>& user_state) {
  if (candidate_ids.empty() || static_cast<int64_t>(candidate_ids.size()) > m.max_candidates) {
    throw std::runtime_error("candidates: need 1.." + std::to_string(m.max_candidates) + ", got " +
                             std::to_string(candidate_ids.size()));
  }
  if (user_state.size() != m.user_state.size()) {
    throw std::runtime_error("user_state: need " + std::to_string(m.user_state.size()) + " values, got " +
                             std::to_string(user_state.size()));
  }
  RefreshEvents history = encode_events(m, h, static_cast<size_t>(m.max_history));
  Inputs in;
  in.hist_items = std::move(history.items);
  in.hist_categories = std::move(history.categories);
  in.hist_behaviors = std::move(history.behaviors);
  in.hist_timestamps = std::move(history.timestamps);
  in.request_time = {request_time};
  in.candidates.reserve(candidate_ids.size());
  for (int64_t id : candidate_ids) in.candidates.push_back(m.items.row(id));
  in.user_state = user_state;
  return in;
}

RefreshEvents build_refresh_events(const Manifest& m, const History& h) {
  if (!m.refresh) throw std::runtime_error("the bundle has no refresh program (manifest refresh is null)");
  return encode_events(m, h, static_cast<size_t>(m.refresh->events));
}

void refresh_step(const RefreshSpec& spec, const std::vector<float>& shipped, const std::vector<float>& gradient,
                  std::vector<float>& state) {
  const float learning_rate = static_cast<float>(spec.learning_rate);
  std::vector<float> drift(state.size());
  double squares = 0.0;
  for (size_t i = 0; i < state.size(); ++i) {
    state[i] = state[i] - learning_rate * gradient[i];
    drift[i] = state[i] - shipped[i];
    squares += static_cast<double>(drift[i]) * static_cast<double>(drift[i]);
  }
  const double norm = std::sqrt(squares);
  if (norm > spec.max_drift) {
    const float scale = static_cast<float>(spec.max_drift / norm);
    for (size_t i = 0; i < state.size(); ++i) state[i] = shipped[i] + drift[i] * scale;
  }
}

std::optional<RefreshedState> read_refreshed_state(const std::string& path, const std::string& manifest_sha256,
                                                   size_t state_size) {
  std::ifstream probe(path);
  if (!probe) return std::nullopt;
  const json doc = json::parse(read_file(path));
  RefreshedState s;
  s.manifest_sha256 = doc.at("manifest_sha256").get<std::string>();
  if (s.manifest_sha256 != manifest_sha256) return std::nullopt;  // refreshed for another bundle
  for (double v : doc.at("user_state").get<std::vector<double>>()) s.user_state.push_back(static_cast<float>(v));
  if (s.user_state.size() != state_size) {
    throw std::runtime_error(path + ": user_state has " + std::to_string(s.user_state.size()) + " values, the bundle " +
                             std::to_string(state_size));
  }
  s.through_timestamp = doc.at("through_timestamp").get<int64_t>();
  s.through_count = doc.at("through_count").get<int64_t>();
  return s;
}

void write_refreshed_state(const std::string& path, const RefreshedState& state) {
  std::string values = "[";
  char buf[32];
  for (size_t i = 0; i < state.user_state.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.9g", i ? "," : "", static_cast<double>(state.user_state[i]));
    values += buf;
  }
  values += "]";
  const std::string text = "{\"manifest_sha256\":" + json(state.manifest_sha256).dump() + ",\"user_state\":" + values +
                           ",\"through_timestamp\":" + std::to_string(state.through_timestamp) +
                           ",\"through_count\":" + std::to_string(state.through_count) + "}";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot replace " + path);
  }
}

static void verify_files(const std::string& dir, const Manifest& m) {
  if (m.files.count("model.pte") == 0) {
    throw std::runtime_error("manifest files lists no sha256 for model.pte");
  }
  for (const auto& [name, expected] : m.files) {
    if (name.find('/') != std::string::npos || name == "..") throw std::runtime_error("bad file name " + name);
    const std::string actual = sha256_file(dir + "/" + name);
    if (actual != expected) {
      throw std::runtime_error("sha256 mismatch for " + name + ": manifest " + expected + ", file " + actual);
    }
  }
}

static std::unique_ptr<executorch::extension::module::Module> load_module(const std::string& path,
                                                                          const std::string& method) {
  using executorch::extension::module::Module;
  auto module = std::make_unique<Module>(path, Module::LoadMode::File);
  const Error err = module->load_method(method);
  if (err != Error::Ok) {
    throw std::runtime_error("cannot load method " + method + " of " + path + " (ExecuTorch error " +
                             std::to_string(static_cast<int>(err)) + ")");
  }
  return module;
}

Bundle::Bundle(const std::string& dir) : dir_(dir) {
  const std::string manifest_path = dir + "/manifest.json";
  manifest_ = parse_manifest(json::parse(read_file(manifest_path)));
  manifest_sha256_ = sha256_file(manifest_path);
  verify_files(dir, manifest_);
  module_ = load_module(dir + "/model.pte", manifest_.method);
  if (manifest_.refresh) refresh_module_ = load_module(dir + "/" + manifest_.refresh->file, manifest_.refresh->method);
}

Bundle::~Bundle() = default;

std::vector<float> Bundle::score(Inputs& in) {
  using executorch::aten::ScalarType;
  auto tensor = [](std::vector<int64_t>& v) {
    return from_blob(v.data(), {static_cast<executorch::aten::SizesType>(v.size())}, ScalarType::Long);
  };
  TensorPtr tensors[] = {tensor(in.hist_items),      tensor(in.hist_categories), tensor(in.hist_behaviors),
                         tensor(in.hist_timestamps), tensor(in.request_time),    tensor(in.candidates),
                         from_blob(in.user_state.data(),
                                   {static_cast<executorch::aten::SizesType>(in.user_state.size())},
                                   ScalarType::Float)};
  std::vector<EValue> args;
  args.reserve(7);
  for (auto& t : tensors) args.emplace_back(*t);
  auto result = module_->execute(manifest_.method, args);
  if (!result.ok()) {
    throw std::runtime_error("forward failed (ExecuTorch error " + std::to_string(static_cast<int>(result.error())) +
                             ")");
  }
  const auto& out = result->at(0).toTensor();
  if (out.scalar_type() != ScalarType::Float || static_cast<size_t>(out.numel()) != in.candidates.size()) {
    throw std::runtime_error("model output is not float32[N]");
  }
  const float* p = out.const_data_ptr<float>();
  return std::vector<float>(p, p + out.numel());
}

std::vector<float> Bundle::refresh_gradient(std::vector<float> state, RefreshEvents& events, float* loss) {
  using executorch::aten::ScalarType;
  if (!refresh_module_) throw std::runtime_error("the bundle has no refresh program (manifest refresh is null)");
  auto tensor = [](std::vector<int64_t>& v) {
    return from_blob(v.data(), {static_cast<executorch::aten::SizesType>(v.size())}, ScalarType::Long);
  };
  TensorPtr tensors[] = {
      from_blob(state.data(), {static_cast<executorch::aten::SizesType>(state.size())}, ScalarType::Float),
      tensor(events.items), tensor(events.categories), tensor(events.behaviors), tensor(events.timestamps)};
  std::vector<EValue> args;
  args.reserve(5);
  for (auto& t : tensors) args.emplace_back(*t);
  const std::string& method = manifest_.refresh->method;
  auto result = refresh_module_->execute(method, args);
  if (!result.ok()) {
    throw std::runtime_error("refresh " + method + " failed (ExecuTorch error " +
                             std::to_string(static_cast<int>(result.error())) + ")");
  }
  if (result->size() < 2) throw std::runtime_error("refresh program returned fewer than 2 outputs");
  const auto& loss_out = result->at(0).toTensor();
  const auto& grad = result->at(1).toTensor();
  if (grad.scalar_type() != ScalarType::Float || static_cast<size_t>(grad.numel()) != state.size()) {
    throw std::runtime_error("refresh output 1 is not float32[S]");
  }
  if (loss != nullptr) *loss = loss_out.const_data_ptr<float>()[0];
  const float* p = grad.const_data_ptr<float>();
  return std::vector<float>(p, p + grad.numel());
}

std::vector<float> Bundle::refresh(std::vector<float> state, const History& history) {
  RefreshEvents events = build_refresh_events(manifest_, history);
  if (state.size() != manifest_.user_state.size()) throw std::runtime_error("refresh: state has the wrong size");
  for (int64_t step = 0; step < manifest_.refresh->steps; ++step) {
    const std::vector<float> gradient = refresh_gradient(state, events);
    refresh_step(*manifest_.refresh, manifest_.user_state, gradient, state);
  }
  return state;
}

std::vector<Scored> Bundle::rank(const History& history, const std::vector<int64_t>& candidate_ids,
                                 int64_t request_time, const std::vector<float>& user_state) {
  Inputs in = build_inputs(manifest_, history, request_time, candidate_ids, user_state);
  std::vector<float> scores = score(in);
  std::vector<Scored> ranked;
  ranked.reserve(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) ranked.push_back({candidate_ids[i], scores[i]});
  std::stable_sort(ranked.begin(), ranked.end(), [](const Scored& a, const Scored& b) { return a.score > b.score; });
  return ranked;
}

}  // namespace tbsm
