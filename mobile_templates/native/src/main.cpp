// tbsm_rank: command-line reference client for TBSM bundles.
//
//   tbsm_rank BUNDLE_DIR --golden
//       replays every case and every refresh case of golden.json; one JSON line per case, then a
//       summary line. Exit status 1 when a case is off by more than its tolerance.
//   tbsm_rank BUNDLE_DIR --events history.json --candidates 1,2,3 [--request-time UNIX_SECONDS]
//       ranks global item ids for the history (EventHistory JSON); one JSON line per item, best first.
//   tbsm_rank BUNDLE_DIR --refresh history.json [--runs N]
//       runs the refresh loop once on the history's last events and prints the new user state and
//       the loss of each step; with --runs N, also times N whole refresh updates (median, p99, us).
//   --state FILE    the refreshed state kept for this bundle (ignored when it was written for another
//                   bundle); --events ranks with it and --refresh starts from it and writes the new
//                   state to it atomically. Without it, the manifest's user_state.
//   tbsm_rank BUNDLE_DIR --bench N
//       times N calls of forward for 1 and for 1000 candidates (median and p99, microseconds).
//   --threads all   lets ExecuTorch use its thread pool (default: one thread, the caller's).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <executorch/extension/threadpool/threadpool_guard.h>

#include <nlohmann/json.hpp>

#include "tbsm.hpp"

namespace {

using nlohmann::json;

struct Options {
  std::string bundle;
  std::string mode;  // golden | events | refresh | bench
  std::string events_path;
  std::string state_path;
  int refresh_runs = 0;
  std::vector<int64_t> candidates;
  int64_t request_time = 0;
  bool has_request_time = false;
  int bench_runs = 0;
  bool all_threads = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "error: %s\nusage: tbsm_rank BUNDLE_DIR (--golden | --events FILE --candidates ID,ID,... "
               "[--request-time T] | --refresh FILE [--runs N] | --bench N) [--state FILE] [--threads 1|all]\n",
               why);
  std::exit(2);
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string token = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (token.empty()) usage("empty id in --candidates");
    char* end = nullptr;
    long long id = std::strtoll(token.c_str(), &end, 10);
    if (*end != '\0' || id < 0) usage("--candidates takes non-negative integer ids");
    ids.push_back(id);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return ids;
}

Options parse_args(int argc, char** argv) {
  Options o;
  if (argc < 3) usage("missing arguments");
  o.bundle = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    if (a == "--golden") {
      o.mode = "golden";
    } else if (a == "--events") {
      o.mode = "events";
      o.events_path = next();
    } else if (a == "--refresh") {
      o.mode = "refresh";
      o.events_path = next();
    } else if (a == "--runs") {
      o.refresh_runs = std::atoi(next().c_str());
      if (o.refresh_runs < 1) usage("--runs takes a positive run count");
    } else if (a == "--state") {
      o.state_path = next();
    } else if (a == "--candidates") {
      o.candidates = parse_ids(next());
    } else if (a == "--request-time") {
      o.request_time = std::strtoll(next().c_str(), nullptr, 10);
      o.has_request_time = true;
    } else if (a == "--bench") {
      o.mode = "bench";
      o.bench_runs = std::atoi(next().c_str());
      if (o.bench_runs < 1) usage("--bench takes a positive run count");
    } else if (a == "--threads") {
      std::string v = next();
      if (v != "1" && v != "all") usage("--threads takes 1 or all");
      o.all_threads = v == "all";
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  if (o.mode.empty()) usage("choose --golden, --events, --refresh or --bench");
  if (o.mode == "events" && o.candidates.empty()) usage("--events needs --candidates");
  return o;
}

std::string floats_json(const std::vector<float>& v) {
  std::string out = "[";
  char buf[32];
  for (size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.9g", i ? "," : "", static_cast<double>(v[i]));
    out += buf;
  }
  return out + "]";
}

tbsm::History history_for(const tbsm::Bundle& bundle, const json& doc) {
  tbsm::History h = tbsm::parse_history(doc);
  if (bundle.manifest().user_id != tbsm::kNoUser && h.user_id != bundle.manifest().user_id) {
    throw std::runtime_error("history user_id " + std::to_string(h.user_id) + " is not the bundle's user_id " +
                             std::to_string(bundle.manifest().user_id));
  }
  return h;
}

std::vector<float> floats(const json& values) {
  std::vector<float> out;
  for (double v : values.get<std::vector<double>>()) out.push_back(static_cast<float>(v));
  return out;
}

double max_abs_diff(const std::vector<float>& got, const std::vector<double>& expected) {
  double diff = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    double d = std::fabs(static_cast<double>(got[i]) - expected[i]);
    if (!(d <= diff)) diff = d;  // also catches NaN
  }
  return diff;
}

int run_golden(tbsm::Bundle& bundle) {
  const json golden = json::parse(tbsm::read_file(bundle.dir() + "/golden.json"));
  const double tolerance = golden.at("tolerance").get<double>();
  double worst = 0.0;
  size_t n_cases = 0, n_failed = 0;
  for (const auto& c : golden.at("cases")) {
    const std::string name = c.at("name").get<std::string>();
    tbsm::History history = history_for(bundle, c.at("history"));
    const auto candidates = c.at("candidates").get<std::vector<int64_t>>();
    const auto expected = c.at("scores").get<std::vector<double>>();
    // Golden scores were computed with the shipped state.
    tbsm::Inputs in = tbsm::build_inputs(bundle.manifest(), history, c.at("request_time").get<int64_t>(), candidates,
                                         bundle.manifest().user_state);
    std::vector<float> scores = bundle.score(in);
    if (expected.size() != scores.size()) throw std::runtime_error("golden case " + name + ": score count differs");
    const double diff = max_abs_diff(scores, expected);
    const bool ok = diff <= tolerance;
    worst = std::max(worst, diff);
    ++n_cases;
    n_failed += ok ? 0 : 1;
    std::printf("{\"case\":%s,\"n\":%zu,\"max_abs_diff\":%.9g,\"ok\":%s,\"scores\":%s}\n",
                json(name).dump().c_str(), scores.size(), diff, ok ? "true" : "false",
                floats_json(scores).c_str());
  }
  // Refresh cases: one whole refresh loop from state_before on the history must give state_after.
  double refresh_worst = 0.0;
  size_t n_refresh = 0;
  const auto refresh_cases = golden.find("refresh_cases");
  if (refresh_cases != golden.end()) {
    for (const auto& c : *refresh_cases) {
      const std::string name = c.at("name").get<std::string>();
      // A refresh case holds the bundle user's events only.
      tbsm::History history = tbsm::parse_history(json{{"user_id", bundle.manifest().user_id}, {"events", c.at("events")}});
      const auto expected = c.at("state_after").get<std::vector<double>>();
      const double case_tolerance = c.at("tolerance").get<double>();
      std::vector<float> state = bundle.refresh(floats(c.at("state_before")), history);
      if (expected.size() != state.size()) throw std::runtime_error("refresh case " + name + ": state size differs");
      const double diff = max_abs_diff(state, expected);
      const bool ok = diff <= case_tolerance;
      refresh_worst = std::max(refresh_worst, diff);
      ++n_refresh;
      n_failed += ok ? 0 : 1;
      std::printf("{\"refresh_case\":%s,\"max_abs_diff\":%.9g,\"tolerance\":%.9g,\"ok\":%s,\"user_state\":%s}\n",
                  json(name).dump().c_str(), diff, case_tolerance, ok ? "true" : "false", floats_json(state).c_str());
    }
  }
  std::printf("{\"summary\":true,\"cases\":%zu,\"refresh_cases\":%zu,\"failed\":%zu,\"max_abs_diff\":%.9g,"
              "\"refresh_max_abs_diff\":%.9g,\"tolerance\":%.9g,\"ok\":%s}\n",
              n_cases, n_refresh, n_failed, worst, refresh_worst, tolerance, n_failed == 0 ? "true" : "false");
  return n_failed == 0 ? 0 : 1;
}

// The state to rank or refresh from: the --state file's when it was written for this bundle.
std::optional<tbsm::RefreshedState> stored_state(const tbsm::Bundle& bundle, const Options& o) {
  if (o.state_path.empty()) return std::nullopt;
  return tbsm::read_refreshed_state(o.state_path, bundle.manifest_sha256(), bundle.manifest().user_state.size());
}

int run_refresh(tbsm::Bundle& bundle, const Options& o) {
  tbsm::History history = history_for(bundle, json::parse(tbsm::read_file(o.events_path)));
  const auto stored = stored_state(bundle, o);
  const std::vector<float> start = stored ? stored->user_state : bundle.manifest().user_state;
  const tbsm::RefreshSpec& spec = *bundle.manifest().refresh;
  // The loop of Bundle::refresh, step by step here to print each step's loss.
  tbsm::RefreshEvents events = tbsm::build_refresh_events(bundle.manifest(), history);
  std::vector<float> state = start;
  std::vector<float> losses;
  for (int64_t step = 0; step < spec.steps; ++step) {
    float loss = 0.0f;
    const std::vector<float> gradient = bundle.refresh_gradient(state, events, &loss);
    losses.push_back(loss);
    tbsm::refresh_step(spec, bundle.manifest().user_state, gradient, state);
  }
  if (!o.state_path.empty()) {
    tbsm::RefreshedState out{bundle.manifest_sha256(), state, 0, 0};
    for (const tbsm::Event& e : history.events) {  // the marker of the newest event trained on
      out.through_count = e.timestamp == out.through_timestamp ? out.through_count + 1 : 1;
      out.through_timestamp = e.timestamp;
    }
    tbsm::write_refreshed_state(o.state_path, out);
  }
  std::printf("{\"refresh\":true,\"steps\":%lld,\"window\":%lld,\"losses\":%s,\"user_state\":%s}\n",
              static_cast<long long>(spec.steps), static_cast<long long>(spec.window), floats_json(losses).c_str(),
              floats_json(state).c_str());
  if (o.refresh_runs > 0) {
    for (int i = 0; i < 3; ++i) bundle.refresh(start, history);  // warm-up
    std::vector<double> us;
    for (int i = 0; i < o.refresh_runs; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      bundle.refresh(start, history);  // what a phone runs every every_events events
      auto t1 = std::chrono::steady_clock::now();
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(us.begin(), us.end());
    auto at = [&](double q) { return us[std::min(us.size() - 1, static_cast<size_t>(q * (us.size() - 1) + 0.5))]; };
    std::printf("{\"bench\":true,\"refresh_update\":true,\"runs\":%d,\"steps\":%lld,\"threads\":%d,"
                "\"median_us\":%.1f,\"p99_us\":%.1f,\"min_us\":%.1f}\n",
                o.refresh_runs, static_cast<long long>(spec.steps), o.all_threads ? 0 : 1, at(0.5), at(0.99), us.front());
  }
  return 0;
}

int run_events(tbsm::Bundle& bundle, const Options& o) {
  tbsm::History history = history_for(bundle, json::parse(tbsm::read_file(o.events_path)));
  const int64_t now = o.has_request_time ? o.request_time : static_cast<int64_t>(std::time(nullptr));
  const auto stored = stored_state(bundle, o);
  const std::vector<float>& state = stored ? stored->user_state : bundle.manifest().user_state;
  size_t rank = 0;
  for (const tbsm::Scored& s : bundle.rank(history, o.candidates, now, state)) {
    std::printf("{\"rank\":%zu,\"item_id\":%lld,\"score\":%.9g}\n", ++rank, static_cast<long long>(s.item_id),
                static_cast<double>(s.score));
  }
  return 0;
}

int process_threads() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  }
  return -1;
}

int run_bench(tbsm::Bundle& bundle, const Options& o) {
  tbsm::History history;
  history.user_id = bundle.manifest().user_id;
  try {  // the longest golden history, when there is one: a full history is the realistic case
    const json golden = json::parse(tbsm::read_file(bundle.dir() + "/golden.json"));
    for (const auto& c : golden.at("cases")) {
      tbsm::History h = tbsm::parse_history(c.at("history"));
      if (h.events.size() > history.events.size()) history = h;
    }
  } catch (const std::exception&) {
  }
  const auto& ids = bundle.manifest().items.ids;
  const int64_t now = history.events.empty() ? 1700000000 : history.events.back().timestamp + 60;
  for (size_t n : {size_t{1}, size_t{1000}}) {
    std::vector<int64_t> candidates;
    for (size_t i = 0; i < n; ++i) candidates.push_back(ids.empty() ? 0 : ids[i % ids.size()]);
    tbsm::Inputs in = tbsm::build_inputs(bundle.manifest(), history, now, candidates, bundle.manifest().user_state);
    for (int i = 0; i < 20; ++i) bundle.score(in);  // warm-up
    std::vector<double> us;
    us.reserve(static_cast<size_t>(o.bench_runs));
    const std::clock_t cpu0 = std::clock();
    const auto wall0 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.bench_runs; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      bundle.score(in);
      auto t1 = std::chrono::steady_clock::now();
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    // Process CPU time over wall time: ~1 when one thread works, more when a pool helps.
    const double cpu_s = static_cast<double>(std::clock() - cpu0) / CLOCKS_PER_SEC;
    const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    std::sort(us.begin(), us.end());
    auto at = [&](double q) { return us[std::min(us.size() - 1, static_cast<size_t>(q * (us.size() - 1) + 0.5))]; };
    std::printf("{\"bench\":true,\"candidates\":%zu,\"history\":%zu,\"runs\":%d,\"threads\":%d,"
                "\"process_threads\":%d,\"cpu_per_wall\":%.2f,\"median_us\":%.1f,\"p99_us\":%.1f,\"min_us\":%.1f}\n",
                n, history.events.size(), o.bench_runs, o.all_threads ? 0 : 1, process_threads(), cpu_s / wall_s, at(0.5),
                at(0.99), us.front());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  // One thread unless asked: the guard keeps XNNPACK and the kernels off the shared pool (thread local,
  // and everything here runs on this thread).
  executorch::extension::threadpool::NoThreadPoolGuard::set_enabled(!o.all_threads);
  try {
    tbsm::Bundle bundle(o.bundle);
    if (o.mode == "golden") return run_golden(bundle);
    if (o.mode == "events") return run_events(bundle, o);
    if (o.mode == "refresh") {
      if (!bundle.manifest().refresh) throw std::runtime_error("the bundle has no refresh program (manifest refresh is null)");
      return run_refresh(bundle, o);
    }
    return run_bench(bundle, o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
