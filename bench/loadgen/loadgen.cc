// loadgen: a small, cheap gRPC load generator for bench/loadbench.py.
//
// It sends PRE-SERIALISED unary requests, read from a file of length-prefixed protobuf bytes
// (4-byte little-endian length, then the message), through grpc::GenericStub, so it needs no
// generated C++ code and each call can carry a different request body (h2load repeats one
// body, which would make every Reserve after the first an idempotent replay).
//
// One thread drives one completion queue and keeps --concurrency calls outstanding, spread
// round-robin over --channels channels, each its own TCP connection (a distinct channel
// argument plus a local subchannel pool), so SO_REUSEPORT spreads them over server workers.
//
// Phases: warm-up (--warmup s, counted apart), the measured window (--duration s), then a
// drain of the calls still outstanding (counted apart). By default every request in the file
// is sent at most once; when the file runs out the generator stops issuing and reports
// "exhausted": true. --cycle allows wrapping around (only for idempotent no-op requests, e.g.
// health checks). --once sends the whole file once, for pre-loading (exhaustion is expected).
//
// Output: one JSON object on stdout: answers counted by grpc status code (warm-up, window,
// drain), non-OK answers by code and message, latency percentiles of the window, RPS, and the
// generator's own CPU (getrusage). On stderr, "loadgen: window-start" and
// "loadgen: window-end" mark the measured window, so the driver can sample server CPU there.
//
// Every loop is bounded: issuing stops at the end of the window, every call has a deadline,
// and after deadline + 5 s any call still outstanding is cancelled.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>
#include <sys/time.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kCodes = 17;  // grpc::StatusCode 0..16
const char* const kCodeNames[kCodes] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

struct Args {
  std::string target;
  std::string method;
  std::string requests;
  int concurrency = 16;
  int channels = 8;
  double duration = 4.0;
  double warmup = 1.0;
  int deadline_ms = 2000;
  bool cycle = false;
  bool once = false;
  double connect_timeout = 10.0;
};

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "loadgen: " << why << "\n"
            << "usage: loadgen --target HOST:PORT --method /pkg.Service/Method --requests FILE\n"
            << "               [--concurrency N] [--channels N] [--duration S] [--warmup S]\n"
            << "               [--deadline-ms MS] [--cycle | --once]\n";
  std::exit(2);
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Usage("missing value for " + k);
      return argv[++i];
    };
    if (k == "--target") {
      a.target = value();
    } else if (k == "--method") {
      a.method = value();
    } else if (k == "--requests") {
      a.requests = value();
    } else if (k == "--concurrency") {
      a.concurrency = std::atoi(value().c_str());
    } else if (k == "--channels") {
      a.channels = std::atoi(value().c_str());
    } else if (k == "--duration") {
      a.duration = std::atof(value().c_str());
    } else if (k == "--warmup") {
      a.warmup = std::atof(value().c_str());
    } else if (k == "--deadline-ms") {
      a.deadline_ms = std::atoi(value().c_str());
    } else if (k == "--cycle") {
      a.cycle = true;
    } else if (k == "--once") {
      a.once = true;
    } else {
      Usage("unknown argument " + k);
    }
  }
  if (a.target.empty() || a.method.empty() || a.requests.empty()) {
    Usage("--target, --method and --requests are required");
  }
  if (a.concurrency < 1 || a.concurrency > 100000) Usage("--concurrency must be 1..100000");
  if (a.channels < 1 || a.channels > 1024) Usage("--channels must be 1..1024");
  if (!(a.duration > 0 && a.duration <= 3600)) Usage("--duration must be in (0, 3600]");
  if (!(a.warmup >= 0 && a.warmup <= 600)) Usage("--warmup must be in [0, 600]");
  if (a.deadline_ms < 1 || a.deadline_ms > 600000) Usage("--deadline-ms must be 1..600000");
  if (a.cycle && a.once) Usage("--cycle and --once exclude each other");
  return a;
}

// The requests file: 4-byte little-endian length, then that many bytes, repeated.
struct Requests {
  std::string data;
  std::vector<std::pair<uint32_t, uint32_t>> spans;  // (offset, length)
};

Requests LoadRequests(const std::string& path) {
  Requests r;
  std::ifstream in(path, std::ios::binary);
  if (!in) Usage("cannot open " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  r.data = buf.str();
  if (r.data.size() >= (1ull << 32)) Usage("requests file too large (>= 4 GiB)");
  size_t pos = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(r.data.data());
  while (pos < r.data.size()) {
    if (pos + 4 > r.data.size()) Usage("truncated length prefix in " + path);
    uint32_t len = uint32_t(p[pos]) | (uint32_t(p[pos + 1]) << 8) | (uint32_t(p[pos + 2]) << 16) |
                   (uint32_t(p[pos + 3]) << 24);
    pos += 4;
    if (pos + len > r.data.size()) Usage("truncated request in " + path);
    r.spans.emplace_back(uint32_t(pos), len);
    pos += len;
  }
  if (r.spans.empty()) Usage("no requests in " + path);
  return r;
}

struct Cpu {
  double user = 0, sys = 0;
};

Cpu CpuNow() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  Cpu c;
  c.user = double(ru.ru_utime.tv_sec) + double(ru.ru_utime.tv_usec) / 1e6;
  c.sys = double(ru.ru_stime.tv_sec) + double(ru.ru_stime.tv_usec) / 1e6;
  return c;
}

struct Counts {
  std::array<uint64_t, kCodes> by_code{};
  uint64_t total = 0;
  void Add(int code) {
    by_code[size_t(code)]++;
    total++;
  }
};

struct Call {
  grpc::ClientContext ctx;
  grpc::ByteBuffer reply;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<grpc::ByteBuffer>> reader;
  Clock::time_point start;
};

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += char(ch);
    } else if (ch < 0x20) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\u%04x", ch);
      out += esc;
    } else {
      out += char(ch);
    }
  }
  return out + "\"";
}

std::string CountsJson(const Counts& c) {
  std::string out = "{";
  bool first = true;
  for (int i = 0; i < kCodes; ++i) {
    if (c.by_code[size_t(i)] == 0) continue;
    if (!first) out += ", ";
    first = false;
    out += JsonString(kCodeNames[i]) + ": " + std::to_string(c.by_code[size_t(i)]);
  }
  return out + "}";
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Nearest-rank percentile of sorted samples (microseconds) -> milliseconds.
double PercentileMs(const std::vector<uint32_t>& sorted, double q) {
  if (sorted.empty()) return 0.0;
  size_t rank = size_t(q * double(sorted.size()));
  if (rank >= sorted.size()) rank = sorted.size() - 1;
  return double(sorted[rank]) / 1000.0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  const Requests reqs = LoadRequests(args.requests);
  const Cpu cpu_start = CpuNow();

  // Separate channels, separate connections: a local subchannel pool per channel and a
  // distinct (otherwise meaningless) channel argument each.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < args.channels; ++i) {
    grpc::ChannelArguments ca;
    ca.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    ca.SetInt("stockhold.loadgen.channel", i);
    ca.SetMaxReceiveMessageSize(64 * 1024 * 1024);
    auto ch = grpc::CreateCustomChannel(args.target, grpc::InsecureChannelCredentials(), ca);
    const auto connect_by = std::chrono::system_clock::now() +
                            std::chrono::milliseconds(int64_t(args.connect_timeout * 1000));
    if (!ch->WaitForConnected(connect_by)) {
      std::cerr << "loadgen: channel " << i << " could not connect to " << args.target << "\n";
      return 3;
    }
    stubs.push_back(std::make_unique<grpc::GenericStub>(ch));
    channels.push_back(std::move(ch));
  }

  grpc::CompletionQueue cq;
  const auto deadline = std::chrono::milliseconds(args.deadline_ms);
  const size_t n_reqs = reqs.spans.size();
  size_t next_req = 0;     // index of the next request to send
  uint64_t sent = 0;       // calls started
  size_t next_chan = 0;
  int outstanding = 0;
  bool issuing = true;
  bool exhausted = false;
  std::unordered_set<Call*> live;  // for cancelling stragglers
  live.reserve(size_t(args.concurrency) * 2);

  const auto t0 = Clock::now();
  const auto warm_end = t0 + std::chrono::microseconds(int64_t(args.warmup * 1e6));
  const auto window_end = warm_end + std::chrono::microseconds(int64_t(args.duration * 1e6));
  // Past this, cancel whatever is still outstanding; past hard_stop + 5 s, give up waiting.
  const auto hard_stop = window_end + deadline + std::chrono::seconds(5);
  const auto give_up = hard_stop + std::chrono::seconds(5);

  Counts warm, measured, drain;
  std::vector<uint32_t> latencies_us;
  latencies_us.reserve(1 << 20);
  bool window_started = false, window_ended = false, cancelled_stragglers = false;
  Clock::time_point window_t0 = warm_end, window_t1 = window_end;
  Cpu cpu_w0 = cpu_start, cpu_w1 = cpu_start;
  uint64_t max_latency_us = 0;

  auto issue = [&]() {
    if (!issuing) return;
    if (next_req >= n_reqs) {
      if (args.cycle) {
        next_req = 0;
      } else {
        issuing = false;
        exhausted = true;
        return;
      }
    }
    const auto& span = reqs.spans[next_req++];
    auto* call = new Call;
    call->start = Clock::now();
    call->ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    grpc::Slice slice(reqs.data.data() + span.first, span.second);
    grpc::ByteBuffer request(&slice, 1);
    call->reader = stubs[next_chan]->PrepareUnaryCall(&call->ctx, args.method, request, &cq);
    next_chan = (next_chan + 1) % stubs.size();
    call->reader->StartCall();
    call->reader->Finish(&call->reply, &call->status, call);
    live.insert(call);
    ++outstanding;
    ++sent;
  };

  auto mark_window_start = [&](Clock::time_point t) {
    window_started = true;
    window_t0 = t;
    cpu_w0 = CpuNow();
    std::cerr << "loadgen: window-start" << std::endl;
  };
  auto mark_window_end = [&](Clock::time_point t) {
    window_ended = true;
    window_t1 = t;
    cpu_w1 = CpuNow();
    std::cerr << "loadgen: window-end" << std::endl;
  };

  if (args.warmup <= 0) mark_window_start(t0);
  for (int i = 0; i < args.concurrency; ++i) issue();

  // Non-OK answers by "CODE: message" (messages cut to 80 chars; at most 32 distinct).
  std::map<std::string, uint64_t> error_messages;
  while (outstanding > 0) {
    const auto now = Clock::now();
    if (!window_started && now >= warm_end) mark_window_start(now);
    if (!window_ended && now >= window_end) {
      mark_window_end(now);
      issuing = false;
    }
    if (!cancelled_stragglers && now >= hard_stop) {
      cancelled_stragglers = true;
      for (Call* c : live) c->ctx.TryCancel();
    }
    if (now >= give_up) {
      std::cerr << "loadgen: " << outstanding << " calls never completed; giving up\n";
      break;
    }
    Clock::time_point wake = give_up;
    if (!window_started) wake = std::min(wake, warm_end);
    if (!window_ended) wake = std::min(wake, window_end);
    if (!cancelled_stragglers) wake = std::min(wake, hard_stop);
    void* tag = nullptr;
    bool ok = false;
    // The completion queue takes system_clock deadlines; phases run on the steady clock.
    const auto wait = std::max(Clock::duration::zero(), wake - Clock::now());
    const auto st = cq.AsyncNext(
        &tag, &ok,
        std::chrono::system_clock::now() +
            std::chrono::duration_cast<std::chrono::system_clock::duration>(wait));
    if (st == grpc::CompletionQueue::SHUTDOWN) break;
    if (st == grpc::CompletionQueue::TIMEOUT) continue;
    auto* call = static_cast<Call*>(tag);
    const auto done = Clock::now();
    const int code = std::clamp(int(call->status.error_code()), 0, kCodes - 1);
    if (code != 0) {
      std::string key = std::string(kCodeNames[code]) + ": " +
                        call->status.error_message().substr(0, 80);
      if (error_messages.size() >= 32 && error_messages.count(key) == 0) {
        key = std::string(kCodeNames[code]) + ": (other messages)";
      }
      error_messages[key]++;
    }
    if (!window_started) {
      warm.Add(code);
    } else if (!window_ended) {
      measured.Add(code);
      const auto us = uint64_t(std::chrono::duration_cast<std::chrono::microseconds>(
                                   done - call->start).count());
      latencies_us.push_back(uint32_t(std::min<uint64_t>(us, UINT32_MAX)));
      max_latency_us = std::max(max_latency_us, us);
    } else {
      drain.Add(code);
    }
    live.erase(call);
    delete call;
    --outstanding;
    issue();
    // Ran out of requests inside the window: the window ends with the last completion.
    if (exhausted && outstanding == 0 && window_started && !window_ended) mark_window_end(done);
  }
  const auto t_end = Clock::now();
  if (!window_started) mark_window_start(t_end);
  if (!window_ended) mark_window_end(t_end);
  const Cpu cpu_end = CpuNow();

  std::sort(latencies_us.begin(), latencies_us.end());
  const double window_s = std::max(1e-9, Seconds(window_t1 - window_t0));
  const double w_user = cpu_w1.user - cpu_w0.user, w_sys = cpu_w1.sys - cpu_w0.sys;
  Counts all;
  for (int i = 0; i < kCodes; ++i) {
    all.by_code[size_t(i)] =
        warm.by_code[size_t(i)] + measured.by_code[size_t(i)] + drain.by_code[size_t(i)];
  }
  all.total = warm.total + measured.total + drain.total;

  std::string errors = "{";
  bool first = true;
  for (const auto& [key, count] : error_messages) {
    if (!first) errors += ", ";
    first = false;
    errors += JsonString(key) + ": " + std::to_string(count);
  }
  errors += "}";

  std::printf(
      "{\"target\": %s, \"method\": %s, \"concurrency\": %d, \"channels\": %d, "
      "\"deadline_ms\": %d, \"requests_in_file\": %zu, \"sent\": %" PRIu64
      ", \"exhausted\": %s, \"cycle\": %s, \"once\": %s, \"never_completed\": %d, "
      "\"window_s\": %.6f, \"measured\": {\"total\": %" PRIu64
      ", \"by_code\": %s, \"rps\": %.2f, \"ok_rps\": %.2f, "
      "\"latency_ms\": {\"samples\": %zu, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
      "\"max\": %.3f}, \"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f, \"cpu_pct\": %.2f}, "
      "\"warmup\": {\"total\": %" PRIu64 ", \"by_code\": %s}, "
      "\"drain\": {\"total\": %" PRIu64 ", \"by_code\": %s}, "
      "\"all\": {\"total\": %" PRIu64 ", \"by_code\": %s, \"wall_s\": %.4f, "
      "\"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f}, \"error_messages\": %s}\n",
      JsonString(args.target).c_str(), JsonString(args.method).c_str(), args.concurrency,
      args.channels, args.deadline_ms, n_reqs, sent, exhausted ? "true" : "false",
      args.cycle ? "true" : "false", args.once ? "true" : "false", outstanding, window_s,
      measured.total, CountsJson(measured).c_str(), double(measured.total) / window_s,
      double(measured.by_code[0]) / window_s, latencies_us.size(),
      PercentileMs(latencies_us, 0.50), PercentileMs(latencies_us, 0.90),
      PercentileMs(latencies_us, 0.99), double(max_latency_us) / 1000.0, w_user, w_sys,
      100.0 * (w_user + w_sys) / window_s, warm.total, CountsJson(warm).c_str(), drain.total,
      CountsJson(drain).c_str(), all.total, CountsJson(all).c_str(), Seconds(t_end - t0),
      cpu_end.user - cpu_start.user, cpu_end.sys - cpu_start.sys, errors.c_str());
  std::fflush(stdout);
  // Calls that never completed still reference the queue: leave without destructors.
  if (outstanding > 0) std::_Exit(4);
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  return 0;
}
