#include "tbsm.hpp"

#include <algorithm>
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
                                                 "hist_timestamps", "request_time",    "candidates"};
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

static IdShard parse_shard(const json& v) {
  IdShard s;
  s.ids = v.at("ids").get<std::vector<int64_t>>();
  s.first_row = v.at("first_row").get<int64_t>();
  s.oov_row = v.at("oov_row").get<int64_t>();
  s.padding_row = v.at("padding_row").get<int64_t>();
  if (!std::is_sorted(s.ids.begin(), s.ids.end())) throw std::runtime_error("manifest ids are not sorted");
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
  m.items = parse_shard(doc.at("items"));
  m.categories = parse_shard(doc.at("categories"));
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

Inputs build_inputs(const Manifest& m, const History& h, int64_t request_time,
                    const std::vector<int64_t>& candidate_ids) {
  if (candidate_ids.empty() || static_cast<int64_t>(candidate_ids.size()) > m.max_candidates) {
    throw std::runtime_error("candidates: need 1.." + std::to_string(m.max_candidates) + ", got " +
                             std::to_string(candidate_ids.size()));
  }
  const size_t t = static_cast<size_t>(m.max_history);
  Inputs in;
  in.hist_items.assign(t, m.items.padding_row);
  in.hist_categories.assign(t, m.categories.padding_row);
  in.hist_behaviors.assign(t, 0);
  in.hist_timestamps.assign(t, 0);
  const size_t n = std::min(t, h.events.size());
  const size_t skip = h.events.size() - n;  // keep the most recent max_history events
  for (size_t k = 0; k < n; ++k) {
    const Event& e = h.events[skip + k];
    const size_t slot = t - n + k;
    auto code = m.behaviors.find(e.behavior);
    if (code == m.behaviors.end()) throw std::runtime_error("unknown behavior \"" + e.behavior + "\"");
    in.hist_items[slot] = m.items.row(e.item_id);
    in.hist_categories[slot] = m.categories.row(e.category_id);
    in.hist_behaviors[slot] = code->second;
    in.hist_timestamps[slot] = e.timestamp;
  }
  in.request_time = {request_time};
  in.candidates.reserve(candidate_ids.size());
  for (int64_t id : candidate_ids) in.candidates.push_back(m.items.row(id));
  return in;
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

Bundle::Bundle(const std::string& dir) : dir_(dir) {
  manifest_ = parse_manifest(json::parse(read_file(dir + "/manifest.json")));
  verify_files(dir, manifest_);
  module_ = std::make_unique<executorch::extension::module::Module>(
      dir + "/model.pte", executorch::extension::module::Module::LoadMode::File);
  const Error err = module_->load_method(manifest_.method);
  if (err != Error::Ok) {
    throw std::runtime_error("cannot load method " + manifest_.method + " of model.pte (ExecuTorch error " +
                             std::to_string(static_cast<int>(err)) + ")");
  }
}

Bundle::~Bundle() = default;

std::vector<float> Bundle::score(Inputs& in) {
  using executorch::aten::ScalarType;
  auto tensor = [](std::vector<int64_t>& v) {
    return from_blob(v.data(), {static_cast<executorch::aten::SizesType>(v.size())}, ScalarType::Long);
  };
  TensorPtr tensors[] = {tensor(in.hist_items),      tensor(in.hist_categories), tensor(in.hist_behaviors),
                         tensor(in.hist_timestamps), tensor(in.request_time),    tensor(in.candidates)};
  std::vector<EValue> args;
  args.reserve(6);
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

std::vector<Scored> Bundle::rank(const History& history, const std::vector<int64_t>& candidate_ids,
                                 int64_t request_time) {
  Inputs in = build_inputs(manifest_, history, request_time, candidate_ids);
  std::vector<float> scores = score(in);
  std::vector<Scored> ranked;
  ranked.reserve(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) ranked.push_back({candidate_ids[i], scores[i]});
  std::stable_sort(ranked.begin(), ranked.end(), [](const Scored& a, const Scored& b) { return a.score > b.score; });
  return ranked;
}

}  // namespace tbsm
