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
// Security (issue 13): --tls-ca FILE turns TLS on (the server's certificate checked against
// that CA; --tls-server-name NAME checks it against NAME instead of the target's host);
// --tls-cert FILE --tls-key FILE add a client certificate (mTLS). --metadata KEY=VALUE
// (repeatable) sends that header with every call, e.g. "authorization=Bearer <token>".
//
// Every loop is bounded: issuing stops at the end of the window, every call has a deadline,
// and after deadline + 5 s any call still outstanding is cancelled.
//
// Many orders per call (issue 10). Both modes count every ORDER's outcome by decoding the
// answers with a minimal protobuf wire reader (no generated code needed):
//
//   --batch   unary calls whose request repeats the orders in field 1 and whose answer repeats
//             one result per order in field 1, each a oneof 1 = reserved (ReserveResponse) |
//             2 = error (google.rpc.Status): ReserveBatch. A call that fails as a whole counts
//             each of its orders with the call's status.
//   --stream  bidirectional calls (--streams S, spread round-robin over the channels), each
//             writing messages of the file (ReserveStreamRequest: field 1 is a correlation id,
//             distinct in the file) while at most --window K of its messages are unanswered,
//             and reading answers (ReserveStreamResponse: 1 = correlation id, oneof
//             2 = reserved | 3 = error (google.rpc.Status)) matched by correlation id. Latency
//             is per message, from its write to its answer. When issuing stops, each stream
//             half-closes and its answers are drained; a stream that ends with messages still
//             unanswered counts each with the stream's status (UNKNOWN when that status is OK,
//             which would be a server bug). The stream's deadline is warm-up + duration +
//             --deadline-ms; stragglers are cancelled as in the unary mode.
//
// Both add an "orders" object to the output: outcomes per order by code (warm-up, window,
// drain), orders answered per second of the window, errors by "CODE: message" and by
// "CODE/REASON" (ErrorInfo.reason), and anomalies: answers marked replayed (every order id is
// meant to be new), malformed answers, answers matching no unanswered message, and batch
// answers whose result count differs from the orders sent. In --stream mode the top-level
// counts and latencies are per message (one message = one order) and "streams" holds the
// streams' own final statuses.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>
#include <sys/time.h>

#include <algorithm>
#include <cctype>
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
#include <string_view>
#include <unordered_map>
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
  bool batch = false;   // unary calls of many orders: decode per-order results
  bool stream = false;  // bidirectional streams of one order per message
  int streams = 0;      // --stream: how many (0: min(channels, concurrency))
  int window = 0;       // --stream: unanswered messages per stream (0: concurrency / streams)
  std::string tls_ca, tls_cert, tls_key, tls_server_name;  // files (PEM) / a name: TLS
  std::vector<std::pair<std::string, std::string>> metadata;  // sent with every call
  bool Tls() const { return !tls_ca.empty() || !tls_cert.empty() || !tls_server_name.empty(); }
};

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "loadgen: " << why << "\n"
            << "usage: loadgen --target HOST:PORT --method /pkg.Service/Method --requests FILE\n"
            << "               [--concurrency N] [--channels N] [--duration S] [--warmup S]\n"
            << "               [--deadline-ms MS] [--cycle | --once] [--batch]\n"
            << "       loadgen --stream --target HOST:PORT --method /pkg.Service/Method\n"
            << "               --requests FILE [--concurrency N] [--streams S] [--window K]\n"
            << "               [--channels N] [--duration S] [--warmup S] [--deadline-ms MS]\n"
            << "       either: [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]\n"
            << "               [--tls-server-name NAME] [--metadata KEY=VALUE]...\n";
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
    } else if (k == "--batch") {
      a.batch = true;
    } else if (k == "--stream") {
      a.stream = true;
    } else if (k == "--streams") {
      a.streams = std::atoi(value().c_str());
    } else if (k == "--window") {
      a.window = std::atoi(value().c_str());
    } else if (k == "--tls-ca") {
      a.tls_ca = value();
    } else if (k == "--tls-cert") {
      a.tls_cert = value();
    } else if (k == "--tls-key") {
      a.tls_key = value();
    } else if (k == "--tls-server-name") {
      a.tls_server_name = value();
    } else if (k == "--metadata") {
      const std::string kv = value();
      const size_t eq = kv.find('=');
      if (eq == 0 || eq == std::string::npos) Usage("--metadata wants KEY=VALUE, got " + kv);
      std::string key = kv.substr(0, eq);
      for (char& ch : key) ch = char(std::tolower(static_cast<unsigned char>(ch)));
      a.metadata.emplace_back(key, kv.substr(eq + 1));
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
  if (a.batch && a.stream) Usage("--batch and --stream exclude each other");
  if (a.stream && (a.cycle || a.once)) Usage("--stream sends each message once: no --cycle/--once");
  if (a.batch && a.cycle) Usage("--batch sends each order once: no --cycle");
  if (!a.stream && (a.streams != 0 || a.window != 0)) Usage("--streams/--window need --stream");
  if (a.streams < 0 || a.streams > 10000) Usage("--streams must be 1..10000");
  if (a.window < 0 || a.window > 100000) Usage("--window must be 1..100000");
  if (a.tls_cert.empty() != a.tls_key.empty()) Usage("--tls-cert and --tls-key go together");
  if (a.stream) {
    if (a.streams == 0) a.streams = std::min(a.channels, a.concurrency);
    if (a.window == 0) a.window = (a.concurrency + a.streams - 1) / a.streams;
  }
  return a;
}

// A whole (PEM) file, or exit 2 naming it.
std::string ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Usage(std::string("cannot read ") + what + " " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// Plaintext, or TLS with the --tls-* files (a client certificate when --tls-cert is given).
std::shared_ptr<grpc::ChannelCredentials> Credentials(const Args& a) {
  if (!a.Tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  if (!a.tls_ca.empty()) o.pem_root_certs = ReadFile(a.tls_ca, "--tls-ca");
  if (!a.tls_cert.empty()) {
    o.pem_cert_chain = ReadFile(a.tls_cert, "--tls-cert");
    o.pem_private_key = ReadFile(a.tls_key, "--tls-key");
  }
  return grpc::SslCredentials(o);
}

void AddMetadata(const Args& a, grpc::ClientContext& ctx) {
  for (const auto& [k, v] : a.metadata) ctx.AddMetadata(k, v);
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
  void Add(int code, uint64_t n = 1) {
    by_code[size_t(code)] += n;
    total += n;
  }
};

Counts Sum(const Counts& a, const Counts& b, const Counts& c) {
  Counts out;
  for (int i = 0; i < kCodes; ++i) {
    out.by_code[size_t(i)] = a.by_code[size_t(i)] + b.by_code[size_t(i)] + c.by_code[size_t(i)];
  }
  out.total = a.total + b.total + c.total;
  return out;
}

constexpr int kUnknown = 2;  // grpc::StatusCode::UNKNOWN

// Count `key` in a tally of at most 32 distinct keys (the rest under `overflow`).
void Tally(std::map<std::string, uint64_t>& m, const std::string& key,
           const std::string& overflow, uint64_t n = 1) {
  if (m.size() >= 32 && m.count(key) == 0) {
    m[overflow] += n;
  } else {
    m[key] += n;
  }
}

// "CODE: message", the message cut to 80 characters: how non-OK answers are keyed.
std::string CodeKey(int code, const std::string& message) {
  return std::string(kCodeNames[code]) + ": " + message.substr(0, 80);
}

// -- a minimal protobuf wire reader: just what the answers of --batch / --stream need -------
class Wire {
 public:
  explicit Wire(std::string_view b) : p_(b.data()), end_(b.data() + b.size()) {}

  // The next field: number, wire type, and its value (varint) or its bytes (length-delimited).
  // False at the end of the input, or when it is malformed (then bad() is true).
  bool Next(uint32_t* field, uint32_t* type, uint64_t* varint, std::string_view* bytes) {
    if (p_ >= end_) return false;
    uint64_t key = 0;
    if (!Varint(&key)) return Fail();
    *field = uint32_t(key >> 3);
    *type = uint32_t(key & 7);
    *varint = 0;
    *bytes = {};
    switch (*type) {
      case 0:
        return Varint(varint) || Fail();
      case 1:
        return Skip(8);
      case 2: {
        uint64_t len = 0;
        if (!Varint(&len) || len > uint64_t(end_ - p_)) return Fail();
        *bytes = std::string_view(p_, size_t(len));
        p_ += len;
        return true;
      }
      case 5:
        return Skip(4);
      default:
        return Fail();
    }
  }
  bool bad() const { return bad_; }

 private:
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && p_ < end_; shift += 7) {
      const auto byte = uint8_t(*p_++);
      *v |= uint64_t(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }
  bool Skip(size_t n) {
    if (size_t(end_ - p_) < n) return Fail();
    p_ += n;
    return true;
  }
  bool Fail() {
    bad_ = true;
    p_ = end_;
    return false;
  }
  const char* p_;
  const char* end_;
  bool bad_ = false;
};

// One order's outcome, decoded from a result oneof.
struct Outcome {
  int code = 0;         // 0: reserved; else the google.rpc.Status code
  std::string message;  // google.rpc.Status.message
  std::string reason;   // its ErrorInfo.reason, if any
  bool replayed = false;
};

// ReserveResponse: 2 = replayed.
bool DecodeReserved(std::string_view b, Outcome* o) {
  Wire w(b);
  uint32_t f, t;
  uint64_t v;
  std::string_view bytes;
  while (w.Next(&f, &t, &v, &bytes)) {
    if (f == 2 && t == 0) o->replayed = v != 0;
  }
  return !w.bad();
}

// google.rpc.Status: 1 = code, 2 = message, 3 = details (Any: 1 = type_url, 2 = value);
// ErrorInfo: 1 = reason.
bool DecodeStatus(std::string_view b, Outcome* o) {
  Wire w(b);
  uint32_t f, t;
  uint64_t v;
  std::string_view bytes;
  o->code = 0;
  while (w.Next(&f, &t, &v, &bytes)) {
    if (f == 1 && t == 0) {
      o->code = int(std::min<uint64_t>(v, kCodes - 1));
    } else if (f == 2 && t == 2) {
      o->message.assign(bytes);
    } else if (f == 3 && t == 2) {
      Wire any(bytes);
      std::string_view type_url, value;
      while (any.Next(&f, &t, &v, &bytes)) {
        if (f == 1 && t == 2) type_url = bytes;
        if (f == 2 && t == 2) value = bytes;
      }
      const std::string_view suffix = "/google.rpc.ErrorInfo";
      if (type_url.size() >= suffix.size() &&
          type_url.substr(type_url.size() - suffix.size()) == suffix) {
        Wire info(value);
        while (info.Next(&f, &t, &v, &bytes)) {
          if (f == 1 && t == 2) o->reason.assign(bytes);
        }
      }
    }
  }
  // An error must carry a non-OK code.
  return !w.bad() && o->code != 0;
}

// A message holding the result oneof (reserved_field | error_field) and, when `correlation` is
// given, a correlation id in field 1. False (and o->code UNKNOWN) when there is no valid result.
bool DecodeResult(std::string_view b, uint32_t reserved_field, uint32_t error_field,
                  std::string_view* correlation, Outcome* o) {
  Wire w(b);
  uint32_t f, t;
  uint64_t v;
  std::string_view bytes;
  bool good = false;
  while (w.Next(&f, &t, &v, &bytes)) {
    if (t != 2) continue;
    if (correlation != nullptr && f == 1) {
      *correlation = bytes;
    } else if (f == reserved_field) {
      *o = Outcome{};
      good = DecodeReserved(bytes, o);
    } else if (f == error_field) {
      *o = Outcome{};
      good = DecodeStatus(bytes, o);
    }
  }
  if (w.bad() || !good) {
    *o = Outcome{};
    o->code = kUnknown;
    o->message = "malformed answer (loadgen could not decode it)";
    return false;
  }
  return true;
}

std::string Flatten(const grpc::ByteBuffer& buf) {
  grpc::Slice slice;
  if (!buf.DumpToSingleSlice(&slice).ok()) return {};
  return std::string(reinterpret_cast<const char*>(slice.begin()), slice.size());
}

// Outcomes per order (--batch, --stream).
struct OrderStats {
  Counts warm, measured, drain;
  uint64_t sent = 0;
  uint64_t replayed = 0;          // answers marked replayed: every order id is meant to be new
  uint64_t malformed = 0;         // answers loadgen could not decode
  uint64_t unmatched = 0;         // --stream: answers whose correlation id is not outstanding
  uint64_t unanswered = 0;        // --stream: messages still unanswered when their stream ended
  uint64_t count_mismatch = 0;    // --batch: OK answers with another number of results
  std::map<std::string, uint64_t> messages;  // non-OK outcomes by "CODE: message"
  std::map<std::string, uint64_t> reasons;   // non-OK outcomes by "CODE/REASON"

  void Count(Counts& phase, const Outcome& o) {
    phase.Add(o.code);
    if (o.replayed) ++replayed;
    if (o.code == 0) return;
    Tally(messages, CodeKey(o.code, o.message),
          std::string(kCodeNames[o.code]) + ": (other messages)");
    Tally(reasons, std::string(kCodeNames[o.code]) + "/" + (o.reason.empty() ? "-" : o.reason),
          std::string(kCodeNames[o.code]) + "/(other reasons)");
  }
  // n orders that got no answer of their own: they take the call's (stream's) status.
  void CountFailed(Counts& phase, int code, const std::string& message, uint64_t n) {
    if (n == 0) return;
    phase.Add(code, n);
    Tally(messages, CodeKey(code, message), std::string(kCodeNames[code]) + ": (other messages)",
          n);
    Tally(reasons, std::string(kCodeNames[code]) + "/(no answer of its own)",
          std::string(kCodeNames[code]) + "/(other reasons)", n);
  }
};

struct Call {
  uint32_t orders = 0;  // --batch: orders in the request
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

std::string MapJson(const std::map<std::string, uint64_t>& m) {
  std::string out = "{";
  bool first = true;
  for (const auto& [key, count] : m) {
    if (!first) out += ", ";
    first = false;
    out += JsonString(key) + ": " + std::to_string(count);
  }
  return out + "}";
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

std::string OrdersJson(const OrderStats& o, double window_s) {
  const Counts all = Sum(o.warm, o.measured, o.drain);
  char rates[96];
  std::snprintf(rates, sizeof rates, "\"per_s\": %.2f, \"ok_per_s\": %.2f",
                double(o.measured.total) / window_s, double(o.measured.by_code[0]) / window_s);
  return "{\"sent\": " + std::to_string(o.sent) + ", \"measured\": {\"total\": " +
         std::to_string(o.measured.total) + ", \"by_code\": " + CountsJson(o.measured) + ", " +
         rates + "}, \"warmup\": {\"total\": " + std::to_string(o.warm.total) +
         ", \"by_code\": " + CountsJson(o.warm) + "}, \"drain\": {\"total\": " +
         std::to_string(o.drain.total) + ", \"by_code\": " + CountsJson(o.drain) +
         "}, \"all\": {\"total\": " + std::to_string(all.total) + ", \"by_code\": " +
         CountsJson(all) + "}, \"replayed\": " + std::to_string(o.replayed) +
         ", \"malformed\": " + std::to_string(o.malformed) +
         ", \"unmatched\": " + std::to_string(o.unmatched) +
         ", \"unanswered\": " + std::to_string(o.unanswered) +
         ", \"result_count_mismatch\": " + std::to_string(o.count_mismatch) +
         ", \"error_messages\": " + MapJson(o.messages) + ", \"by_reason\": " +
         MapJson(o.reasons) + "}";
}

// --batch: each of the call's orders, from the answer's results (or the call's status).
void CountBatchAnswer(const Call& call, int code, Counts& phase, OrderStats& o) {
  if (code != 0) {
    o.CountFailed(phase, code, call.status.error_message(), call.orders);
    return;
  }
  const std::string body = Flatten(call.reply);
  Wire w(body);
  uint32_t f, t, n = 0;
  uint64_t v;
  std::string_view bytes;
  while (w.Next(&f, &t, &v, &bytes)) {
    if (f != 1 || t != 2) continue;
    Outcome oc;
    if (!DecodeResult(bytes, 1, 2, nullptr, &oc)) ++o.malformed;
    o.Count(phase, oc);
    ++n;
  }
  if (w.bad()) ++o.malformed;
  if (n != call.orders) {
    ++o.count_mismatch;
    if (n < call.orders) {
      o.CountFailed(phase, kUnknown, "result missing from the batch answer", call.orders - n);
    }
  }
}

// Orders per request of a --batch file: the request's field-1 entries.
std::vector<uint32_t> CountOrders(const Requests& reqs) {
  std::vector<uint32_t> out;
  out.reserve(reqs.spans.size());
  for (const auto& [off, len] : reqs.spans) {
    Wire w(std::string_view(reqs.data.data() + off, len));
    uint32_t f, t, n = 0;
    uint64_t v;
    std::string_view bytes;
    while (w.Next(&f, &t, &v, &bytes)) n += (f == 1 && t == 2) ? 1 : 0;
    if (w.bad()) Usage("--batch: request " + std::to_string(out.size()) + " is not a message");
    out.push_back(n);
  }
  return out;
}

// -- --stream ---------------------------------------------------------------------------------
struct Stream;

// A completion-queue tag: which operation of which stream completed.
struct Op {
  enum Kind { kStart, kWrite, kRead, kWritesDone, kFinish };
  Stream* stream;
  Kind kind;
};

// One bidirectional call: at most one write and one read in flight at a time (gRPC's rule).
struct Stream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> rw;
  grpc::ByteBuffer out, in;
  grpc::Status status;
  Op start{this, Op::kStart}, write{this, Op::kWrite}, read{this, Op::kRead},
      writes_done{this, Op::kWritesDone}, finish{this, Op::kFinish};
  bool started = false, writing = false, half_closed = false, broken = false, finished = false;
  // Correlation id (a view into the requests file) -> when its message was written.
  std::unordered_map<std::string_view, Clock::time_point> unanswered;
};

// Correlation id (field 1) of every message of a --stream file; each must be distinct.
std::vector<std::string_view> CorrelationIds(const Requests& reqs) {
  std::vector<std::string_view> out;
  out.reserve(reqs.spans.size());
  std::unordered_set<std::string_view> seen;
  seen.reserve(reqs.spans.size());
  for (const auto& [off, len] : reqs.spans) {
    Wire w(std::string_view(reqs.data.data() + off, len));
    uint32_t f, t;
    uint64_t v;
    std::string_view bytes, id;
    while (w.Next(&f, &t, &v, &bytes)) {
      if (f == 1 && t == 2) id = bytes;
    }
    const std::string at = "--stream: message " + std::to_string(out.size());
    if (w.bad()) Usage(at + " is not a message");
    if (id.empty()) Usage(at + " has no correlation id (field 1)");
    if (!seen.insert(id).second) Usage(at + " repeats correlation id " + std::string(id));
    out.push_back(id);
  }
  return out;
}

int RunStream(const Args& args, const Requests& reqs,
              std::vector<std::unique_ptr<grpc::GenericStub>>& stubs, const Cpu& cpu_start) {
  const std::vector<std::string_view> ids = CorrelationIds(reqs);
  const size_t n_reqs = reqs.spans.size();
  const size_t window = size_t(args.window);
  grpc::CompletionQueue cq;
  const auto deadline = std::chrono::milliseconds(args.deadline_ms);

  const auto t0 = Clock::now();
  const auto warm_end = t0 + std::chrono::microseconds(int64_t(args.warmup * 1e6));
  const auto window_end = warm_end + std::chrono::microseconds(int64_t(args.duration * 1e6));
  const auto hard_stop = window_end + deadline + std::chrono::seconds(5);
  const auto give_up = hard_stop + std::chrono::seconds(5);
  // A stream lives through warm-up, window and drain: its deadline covers all three.
  const auto stream_deadline = std::chrono::system_clock::now() + (window_end - t0) + deadline;

  OrderStats orders;   // per message: one message is one order
  Counts stream_end;   // the streams' own final statuses
  std::map<std::string, uint64_t> stream_messages;
  std::vector<uint32_t> latencies_us;
  latencies_us.reserve(1 << 20);
  uint64_t max_latency_us = 0;
  size_t next_req = 0;
  uint64_t unanswered_total = 0;  // written, not yet answered, over all streams
  int64_t tags = 0;               // operations in flight on the queue
  int open = 0;                   // streams not finished
  bool issuing = true, exhausted = false, close_all = false;
  bool window_started = false, window_ended = false, cancelled_stragglers = false;
  Clock::time_point window_t0 = warm_end, window_t1 = window_end;
  Cpu cpu_w0 = cpu_start, cpu_w1 = cpu_start;

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
  auto phase = [&]() -> Counts& {
    return !window_started ? orders.warm : (!window_ended ? orders.measured : orders.drain);
  };

  // Write the stream's next message if its window has room, or half-close once issuing ends.
  auto write_or_close = [&](Stream& s) {
    if (!s.started || s.writing || s.half_closed || s.broken || s.finished) return;
    if (issuing && next_req >= n_reqs) {
      issuing = false;
      exhausted = true;
      close_all = true;  // the other streams half-close too (from the main loop)
    }
    if (issuing) {
      if (s.unanswered.size() >= window) return;
      const size_t idx = next_req++;
      const auto& span = reqs.spans[idx];
      grpc::Slice slice(reqs.data.data() + span.first, span.second);
      s.out = grpc::ByteBuffer(&slice, 1);
      s.unanswered.emplace(ids[idx], Clock::now());
      ++unanswered_total;
      ++orders.sent;
      s.writing = true;
      ++tags;
      s.rw->Write(s.out, &s.write);
    } else {
      s.half_closed = true;
      ++tags;
      s.rw->WritesDone(&s.writes_done);
    }
  };

  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < args.streams; ++i) {
    auto s = std::make_unique<Stream>();
    s->ctx.set_deadline(stream_deadline);
    AddMetadata(args, s->ctx);
    s->rw = stubs[size_t(i) % stubs.size()]->PrepareCall(&s->ctx, args.method, &cq);
    ++tags;
    s->rw->StartCall(&s->start);
    ++open;
    streams.push_back(std::move(s));
  }
  if (args.warmup <= 0) mark_window_start(t0);

  while (tags > 0) {
    const auto now = Clock::now();
    if (!window_started && now >= warm_end) mark_window_start(now);
    if (!window_ended && now >= window_end) {
      mark_window_end(now);
      issuing = false;
      close_all = true;
    }
    if (close_all) {
      close_all = false;
      for (auto& s : streams) write_or_close(*s);
    }
    if (!cancelled_stragglers && now >= hard_stop) {
      cancelled_stragglers = true;
      for (auto& s : streams) {
        if (!s->finished) s->ctx.TryCancel();
      }
    }
    if (now >= give_up) {
      std::cerr << "loadgen: " << open << " streams never finished; giving up\n";
      break;
    }
    Clock::time_point wake = give_up;
    if (!window_started) wake = std::min(wake, warm_end);
    if (!window_ended) wake = std::min(wake, window_end);
    if (!cancelled_stragglers) wake = std::min(wake, hard_stop);
    void* tag = nullptr;
    bool ok = false;
    const auto wait = std::max(Clock::duration::zero(), wake - Clock::now());
    const auto st = cq.AsyncNext(
        &tag, &ok,
        std::chrono::system_clock::now() +
            std::chrono::duration_cast<std::chrono::system_clock::duration>(wait));
    if (st == grpc::CompletionQueue::SHUTDOWN) break;
    if (st == grpc::CompletionQueue::TIMEOUT) continue;
    --tags;
    const Op& op = *static_cast<Op*>(tag);
    Stream& s = *op.stream;
    const auto done = Clock::now();
    switch (op.kind) {
      case Op::kStart:
        s.started = true;
        if (!ok) s.broken = true;  // the read fails too, then Finish says why
        ++tags;
        s.rw->Read(&s.in, &s.read);
        write_or_close(s);
        break;
      case Op::kWrite:
        s.writing = false;
        if (!ok) s.broken = true;  // the stream is over: its unanswered take its status
        write_or_close(s);
        break;
      case Op::kWritesDone:
        break;
      case Op::kRead: {
        if (!ok) {  // no more answers: the stream's status
          ++tags;
          s.rw->Finish(&s.status, &s.finish);
          break;
        }
        const std::string body = Flatten(s.in);
        std::string_view id;
        Outcome oc;
        if (!DecodeResult(body, 2, 3, &id, &oc)) ++orders.malformed;
        const auto it = s.unanswered.find(id);
        if (it == s.unanswered.end()) {
          ++orders.unmatched;  // not counted as an order: it answers none we sent
        } else {
          orders.Count(phase(), oc);
          if (window_started && !window_ended) {
            const auto us = uint64_t(
                std::chrono::duration_cast<std::chrono::microseconds>(done - it->second).count());
            latencies_us.push_back(uint32_t(std::min<uint64_t>(us, UINT32_MAX)));
            max_latency_us = std::max(max_latency_us, us);
          }
          s.unanswered.erase(it);
          --unanswered_total;
        }
        ++tags;
        s.rw->Read(&s.in, &s.read);
        write_or_close(s);
        break;
      }
      case Op::kFinish: {
        s.finished = true;
        --open;
        const int code = std::clamp(int(s.status.error_code()), 0, kCodes - 1);
        stream_end.Add(code);
        if (code != 0) {
          Tally(stream_messages, CodeKey(code, s.status.error_message()),
                std::string(kCodeNames[code]) + ": (other messages)");
        }
        if (!s.unanswered.empty()) {
          const uint64_t n = s.unanswered.size();
          orders.unanswered += n;
          unanswered_total -= n;
          if (code == 0) {
            orders.CountFailed(phase(), kUnknown, "stream ended OK with messages unanswered", n);
          } else {
            orders.CountFailed(phase(), code, s.status.error_message(), n);
          }
          s.unanswered.clear();
        }
        break;
      }
    }
    // Ran out of messages inside the window: the window ends with the last answer.
    if (exhausted && unanswered_total == 0 && window_started && !window_ended) {
      mark_window_end(done);
    }
  }
  const auto t_end = Clock::now();
  if (!window_started) mark_window_start(t_end);
  if (!window_ended) mark_window_end(t_end);
  const Cpu cpu_end = CpuNow();

  std::sort(latencies_us.begin(), latencies_us.end());
  const double window_s = std::max(1e-9, Seconds(window_t1 - window_t0));
  const double w_user = cpu_w1.user - cpu_w0.user, w_sys = cpu_w1.sys - cpu_w0.sys;
  const Counts all = Sum(orders.warm, orders.measured, orders.drain);
  const Counts& measured = orders.measured;

  std::printf(
      "{\"target\": %s, \"method\": %s, \"mode\": \"stream\", \"concurrency\": %d, "
      "\"streams\": %d, \"window\": %d, \"channels\": %zu, \"deadline_ms\": %d, "
      "\"requests_in_file\": %zu, \"sent\": %" PRIu64
      ", \"exhausted\": %s, \"cycle\": false, \"once\": false, \"never_completed\": %d, "
      "\"window_s\": %.6f, \"measured\": {\"total\": %" PRIu64
      ", \"by_code\": %s, \"rps\": %.2f, \"ok_rps\": %.2f, "
      "\"latency_ms\": {\"samples\": %zu, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
      "\"max\": %.3f}, \"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f, \"cpu_pct\": %.2f}, "
      "\"warmup\": {\"total\": %" PRIu64 ", \"by_code\": %s}, "
      "\"drain\": {\"total\": %" PRIu64 ", \"by_code\": %s}, "
      "\"all\": {\"total\": %" PRIu64 ", \"by_code\": %s, \"wall_s\": %.4f, "
      "\"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f}, \"error_messages\": %s, "
      "\"streams_end\": {\"opened\": %d, \"by_code\": %s, \"error_messages\": %s}, "
      "\"orders\": %s}\n",
      JsonString(args.target).c_str(), JsonString(args.method).c_str(),
      args.streams * args.window, args.streams, args.window, stubs.size(), args.deadline_ms,
      n_reqs, orders.sent, exhausted ? "true" : "false", open, window_s, measured.total,
      CountsJson(measured).c_str(), double(measured.total) / window_s,
      double(measured.by_code[0]) / window_s, latencies_us.size(),
      PercentileMs(latencies_us, 0.50), PercentileMs(latencies_us, 0.90),
      PercentileMs(latencies_us, 0.99), double(max_latency_us) / 1000.0, w_user, w_sys,
      100.0 * (w_user + w_sys) / window_s, orders.warm.total, CountsJson(orders.warm).c_str(),
      orders.drain.total, CountsJson(orders.drain).c_str(), all.total, CountsJson(all).c_str(),
      Seconds(t_end - t0), cpu_end.user - cpu_start.user, cpu_end.sys - cpu_start.sys,
      MapJson(orders.messages).c_str(), args.streams, CountsJson(stream_end).c_str(),
      MapJson(stream_messages).c_str(), OrdersJson(orders, window_s).c_str());
  std::fflush(stdout);
  // Streams that never finished still reference the queue: leave without destructors.
  if (open > 0 || tags > 0) std::_Exit(4);
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  return 0;
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
  // --stream: no more channels than streams (an idle connection would only cost).
  const int n_channels = args.stream ? std::min(args.channels, args.streams) : args.channels;
  const auto creds = Credentials(args);
  for (int i = 0; i < n_channels; ++i) {
    grpc::ChannelArguments ca;
    ca.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    ca.SetInt("stockhold.loadgen.channel", i);
    ca.SetMaxReceiveMessageSize(64 * 1024 * 1024);
    if (!args.tls_server_name.empty()) ca.SetSslTargetNameOverride(args.tls_server_name);
    auto ch = grpc::CreateCustomChannel(args.target, creds, ca);
    const auto connect_by = std::chrono::system_clock::now() +
                            std::chrono::milliseconds(int64_t(args.connect_timeout * 1000));
    if (!ch->WaitForConnected(connect_by)) {
      std::cerr << "loadgen: channel " << i << " could not connect to " << args.target << "\n";
      return 3;
    }
    stubs.push_back(std::make_unique<grpc::GenericStub>(ch));
    channels.push_back(std::move(ch));
  }
  if (args.stream) return RunStream(args, reqs, stubs, cpu_start);
  const std::vector<uint32_t> orders_per_req =
      args.batch ? CountOrders(reqs) : std::vector<uint32_t>{};
  OrderStats orders;

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
    const size_t idx = next_req++;
    const auto& span = reqs.spans[idx];
    auto* call = new Call;
    if (args.batch) {
      call->orders = orders_per_req[idx];
      orders.sent += call->orders;
    }
    call->start = Clock::now();
    call->ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    AddMetadata(args, call->ctx);
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
    if (args.batch) {
      Counts& phase =
          !window_started ? orders.warm : (!window_ended ? orders.measured : orders.drain);
      CountBatchAnswer(*call, code, phase, orders);
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
      "\"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f}, \"error_messages\": %s%s}\n",
      JsonString(args.target).c_str(), JsonString(args.method).c_str(), args.concurrency,
      args.channels, args.deadline_ms, n_reqs, sent, exhausted ? "true" : "false",
      args.cycle ? "true" : "false", args.once ? "true" : "false", outstanding, window_s,
      measured.total, CountsJson(measured).c_str(), double(measured.total) / window_s,
      double(measured.by_code[0]) / window_s, latencies_us.size(),
      PercentileMs(latencies_us, 0.50), PercentileMs(latencies_us, 0.90),
      PercentileMs(latencies_us, 0.99), double(max_latency_us) / 1000.0, w_user, w_sys,
      100.0 * (w_user + w_sys) / window_s, warm.total, CountsJson(warm).c_str(), drain.total,
      CountsJson(drain).c_str(), all.total, CountsJson(all).c_str(), Seconds(t_end - t0),
      cpu_end.user - cpu_start.user, cpu_end.sys - cpu_start.sys, errors.c_str(),
      args.batch ? (", \"orders\": " + OrdersJson(orders, window_s)).c_str() : "");
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
