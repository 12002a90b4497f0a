// Range requests with libcurl: see fetcher.h.
#include "remote/fetcher.h"

#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <random>

#include "tensormap/error.h"
#include "tensormap/interrupt.h"

namespace tensormap::detail {
namespace {

// SHA-256 of no bytes: the payload hash of a signed GET.
constexpr const char* kEmptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr size_t kErrorBodyBytes = 1024;

// A new libcurl handle (libcurl started once, the first time).
CURL* new_curl_handle() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) throw Error(ErrorKind::Io, "libcurl cannot start");
  });
  CURL* curl = curl_easy_init();
  if (!curl) throw Error(ErrorKind::Io, "libcurl cannot make a connection handle");
  return curl;
}

// The seconds without a byte after which a request is given up: a whole second at least.
long stall_seconds(const RemoteOptions& o) { return std::max(1L, static_cast<long>(o.timeout_seconds + 0.5)); }

// "bytes A-B/T": A, B and T; T may be "*" (unknown).
struct ContentRange {
  uint64_t first = 0, last = 0;
  std::optional<uint64_t> total;
  bool unsatisfied = false;  // "bytes */T"
};

std::optional<ContentRange> parse_content_range(const std::string& text) {
  ContentRange r;
  if (text.rfind("bytes ", 0) != 0) return std::nullopt;
  const std::string rest = text.substr(6);
  const size_t slash = rest.find('/');
  if (slash == std::string::npos) return std::nullopt;
  const std::string span = rest.substr(0, slash), total = rest.substr(slash + 1);
  auto number = [](const std::string& s) -> std::optional<uint64_t> {
    if (s.empty() || s.size() > 19 || s.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
    return std::stoull(s);
  };
  if (total != "*") {
    r.total = number(total);
    if (!r.total) return std::nullopt;
  }
  if (span == "*") {
    r.unsatisfied = true;
    return r;
  }
  const size_t dash = span.find('-');
  if (dash == std::string::npos) return std::nullopt;
  const auto first = number(span.substr(0, dash)), last = number(span.substr(dash + 1));
  if (!first || !last || *last < *first) return std::nullopt;
  r.first = *first;
  r.last = *last;
  return r;
}

std::string version_change(const ObjectVersion& first, const ObjectVersion& now) {
  if (!first.etag.empty() && now.etag != first.etag) {
    return "the object changed while it was read (ETag " + first.etag + ", now " +
           (now.etag.empty() ? std::string("none") : now.etag) + ")";
  }
  if (!first.last_modified.empty() && now.last_modified != first.last_modified) {
    return "the object changed while it was read (Last-Modified " + first.last_modified + ", now " +
           (now.last_modified.empty() ? std::string("none") : now.last_modified) + ")";
  }
  return "";
}

// One response, as its headers and body arrive.
struct Answer {
  long status = 0;
  std::string content_range;
  std::optional<uint64_t> content_length;
  ObjectVersion version;
  unsigned char* dest = nullptr;  // where a 206's body goes (capacity bytes)
  uint64_t capacity = 0;
  std::vector<unsigned char>* whole = nullptr;  // where first() takes a 200's body, up to capacity
  uint64_t received = 0;
  std::string error_body;  // the start of a body that is not data: the server's error document
  std::string overflow;    // why the body was cut off
  const std::atomic<bool>* cancel = nullptr;
  char detail[CURL_ERROR_SIZE] = {};  // libcurl's own words for a failure
  // A chunk's answer (Fetcher::work): what its headers must say before a byte of its body
  // is written (otherwise none is: header_failure), and who is told, after each piece of
  // the body, how many bytes are in place.
  struct Expected {
    uint64_t first, last, total;
    const ObjectVersion* version;
  };
  std::optional<Expected> expected;
  bool accepted = false;
  std::function<void(uint64_t)> landed;
};

// libcurl's words for failure `rc` of the request `a` describes.
std::string curl_detail(CURLcode rc, const Answer& a) {
  return a.detail[0] ? std::string(a.detail) : std::string(curl_easy_strerror(rc));
}

// A failure, and whether another try may go otherwise.
struct Failure {
  ErrorKind kind;
  std::string message;
  bool transient = false;
  bool cancelled = false;
};

// What is wrong with the headers of `a`, a 206, against its `expected`: another version
// of the object, another range, another size; or nothing.
std::optional<Failure> header_failure(const Answer& a) {
  const Answer::Expected& e = *a.expected;
  const std::string changed = version_change(*e.version, a.version);
  if (!changed.empty()) return Failure{ErrorKind::RemoteChanged, changed};
  const auto range = parse_content_range(a.content_range);
  if (!range || range->unsatisfied || range->first != e.first || range->last != e.last) {
    return Failure{ErrorKind::RemoteProtocol,
                   "a 206 answer for another range (Content-Range: " + a.content_range + ")"};
  }
  if (range->total && *range->total != e.total) {
    return Failure{ErrorKind::RemoteChanged, "the object changed while it was read (its size was " +
                                                 std::to_string(e.total) + ", now " + std::to_string(*range->total) +
                                                 ")"};
  }
  return std::nullopt;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return out;
}

size_t on_header(char* data, size_t size, size_t count, void* user) {
  auto& a = *static_cast<Answer*>(user);
  const size_t length = size * count;
  std::string_view line(data, length);
  while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.remove_suffix(1);
  if (line.rfind("HTTP/", 0) == 0) {  // a new response (after a redirect, or a 100 Continue)
    a.content_range.clear();
    a.content_length.reset();
    a.version = {};
    const size_t space = line.find(' ');
    a.status =
        space == std::string_view::npos ? 0 : std::strtol(std::string(line.substr(space + 1, 3)).c_str(), nullptr, 10);
    return length;
  }
  const size_t colon = line.find(':');
  if (colon == std::string_view::npos) return length;
  const std::string name = lower(line.substr(0, colon));
  std::string_view value = line.substr(colon + 1);
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
  if (name == "content-range") {
    a.content_range = value;
  } else if (name == "content-length") {
    const std::string digits(value);
    if (!digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos && digits.size() < 20) {
      a.content_length = std::stoull(digits);
    }
  } else if (name == "etag") {
    a.version.etag = value;
  } else if (name == "last-modified") {
    a.version.last_modified = value;
  }
  return length;
}

size_t on_body(char* data, size_t size, size_t count, void* user) {
  auto& a = *static_cast<Answer*>(user);
  const size_t length = size * count;
  if (a.status == 206 && a.dest) {
    if (a.expected && !a.accepted) {
      if (header_failure(a)) return 0;  // a wrong answer: nothing written, judged after
      a.accepted = true;
    }
    if (length > a.capacity - a.received) {
      a.overflow = "the server sent more bytes than the range asked for";
      return 0;
    }
    std::memcpy(a.dest + a.received, data, length);
    a.received += length;
    if (a.landed) a.landed(a.received);
    return length;
  }
  if (a.status == 200 && a.whole) {  // first(): the whole object, which must fit the head
    if (length > a.capacity - a.received) return 0;
    a.whole->insert(a.whole->end(), data, data + length);
    a.received += length;
    return length;
  }
  if (a.status == 200) return 0;  // the whole object where a range was asked: stop at once
  if (a.error_body.size() < kErrorBodyBytes)
    a.error_body.append(data, std::min(length, kErrorBodyBytes - a.error_body.size()));
  return length;
}

int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  const auto& a = *static_cast<const Answer*>(user);
  return a.cancel && a.cancel->load() ? 1 : 0;
}

// The options every request shares: timeouts, protocols, the callbacks that take the
// headers (into `answer`) and the body, and the credentials (SigV4 for S3, with
// `payload_hash` as the body's hash, or a bearer token). Returns `headers` with what was
// added; `signing` must outlive the request.
curl_slist* prepare(CURL* curl, const RemoteTarget& t, const RemoteOptions& o, Answer& answer, curl_write_callback body,
                    void* body_data, const char* payload_hash, curl_slist* headers, std::string& signing) {
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(curl, CURLOPT_TCP_NODELAY, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(o.timeout_seconds * 1000));
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, stall_seconds(o));
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &answer);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, body_data);
  curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &answer);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, answer.detail);
  if (!o.ca_bundle.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, o.ca_bundle.c_str());
  if (t.s3 && !t.access_key.empty()) {
    signing = "aws:amz:" + t.region + ":s3";
    curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, signing.c_str());
    curl_easy_setopt(curl, CURLOPT_USERNAME, t.access_key.c_str());
    curl_easy_setopt(curl, CURLOPT_PASSWORD, t.secret_key.c_str());
    headers = curl_slist_append(headers, (std::string("x-amz-content-sha256: ") + payload_hash).c_str());
    if (!t.session_token.empty()) {
      headers = curl_slist_append(headers, ("x-amz-security-token: " + t.session_token).c_str());
    }
  } else if (!t.s3 && !o.bearer_token.empty()) {
    headers = curl_slist_append(headers, ("Authorization: Bearer " + o.bearer_token).c_str());
  }
  if (headers) curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  return headers;
}

}  // namespace

std::string xml_element(const std::string& xml, const std::string& tag) {
  const size_t start = xml.find("<" + tag + ">");
  if (start == std::string::npos) return "";
  const size_t from = start + tag.size() + 2;
  const size_t end = xml.find("</" + tag + ">", from);
  return end == std::string::npos ? "" : xml.substr(from, end - from);
}

std::string status_text(long status, const std::string& body) {
  std::string code = xml_element(body, "Code");
  if (code.size() > 64) code.clear();  // not an S3 error code: not shown
  return "HTTP " + std::to_string(status) + (code.empty() ? "" : " " + code);
}

ErrorKind status_kind(long status) {
  switch (status) {
    case 404: return ErrorKind::RemoteNotFound;
    case 401:
    case 403: return ErrorKind::RemoteAccessDenied;
    case 412: return ErrorKind::RemoteChanged;
    case 429:
    case 503: return ErrorKind::RemoteThrottled;
    default: return ErrorKind::RemoteProtocol;
  }
}

struct Fetcher::Connection {
  Connection() : curl(new_curl_handle()) {}
  ~Connection() { curl_easy_cleanup(curl); }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // One GET of bytes [offset, offset + size): the answer's headers and body in `a`, and
  // what failed on the way, if anything. The status is judged by the caller.
  std::optional<Failure> get(const RemoteTarget& t, const RemoteOptions& o, uint64_t offset, uint64_t size, Answer& a) {
    curl_easy_reset(curl);
    const std::string range = std::to_string(offset) + "-" + std::to_string(offset + size - 1);
    curl_easy_setopt(curl, CURLOPT_URL, t.http_url.c_str());
    curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(curl, CURLOPT_RANGE, range.c_str());
    curl_easy_setopt(curl, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(curl, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(curl, CURLOPT_BUFFERSIZE, 512L * 1024);
    std::string signing;
    curl_slist* headers = prepare(curl, t, o, a, on_body, &a, kEmptyPayloadHash, nullptr, signing);
    const CURLcode rc = curl_easy_perform(curl);
    curl_slist_free_all(headers);
    if (a.cancel && a.cancel->load()) return Failure{ErrorKind::Io, "cancelled", false, true};
    if (!a.overflow.empty()) return Failure{ErrorKind::RemoteProtocol, a.overflow};
    if (rc == CURLE_OK || rc == CURLE_WRITE_ERROR) return std::nullopt;
    const std::string seconds = std::to_string(stall_seconds(o)) + " s";
    switch (rc) {
      case CURLE_COULDNT_RESOLVE_HOST:
      case CURLE_COULDNT_RESOLVE_PROXY:
        return Failure{ErrorKind::RemoteUnreachable,
                       "cannot resolve the host (" + std::string(curl_easy_strerror(rc)) + ")"};
      case CURLE_COULDNT_CONNECT:
        return Failure{ErrorKind::RemoteUnreachable, "cannot connect (" + std::string(curl_easy_strerror(rc)) + ")",
                       true};
      case CURLE_OPERATION_TIMEDOUT:
        return Failure{ErrorKind::RemoteUnreachable,
                       a.status ? "the response stalled: no byte for " + seconds + " after " +
                                      std::to_string(a.received) + " of " + std::to_string(size) + " bytes"
                                : "no answer within " + seconds,
                       true};
      case CURLE_URL_MALFORMAT:
      case CURLE_UNSUPPORTED_PROTOCOL:
        return Failure{ErrorKind::InvalidArgument,
                       "not a URL libcurl can request (" + std::string(curl_easy_strerror(rc)) + ")"};
      case CURLE_PEER_FAILED_VERIFICATION:
        return Failure{ErrorKind::RemoteUnreachable,
                       "the server's TLS certificate is not trusted (" + curl_detail(rc, a) +
                           "); a private CA's certificates can be named with TENSORMAP_REMOTE_CA_BUNDLE"};
      case CURLE_SSL_CACERT_BADFILE:
        return Failure{ErrorKind::InvalidArgument,
                       "cannot use the CA bundle " + quoted_name(o.ca_bundle) + " (" + curl_detail(rc, a) + ")"};
      case CURLE_SSL_CONNECT_ERROR:
        return Failure{ErrorKind::RemoteUnreachable, "TLS failed (" + curl_detail(rc, a) + ")"};
      case CURLE_TOO_MANY_REDIRECTS: return Failure{ErrorKind::RemoteProtocol, "more than 5 redirects"};
      default:
        return Failure{ErrorKind::RemoteUnreachable,
                       "the connection failed after " + std::to_string(a.received) + " of " + std::to_string(size) +
                           " bytes (" + curl_easy_strerror(rc) + ")",
                       true};
    }
  }

  CURL* curl = nullptr;
};

namespace {

// What a status other than 206 means.
Failure status_failure(const RemoteTarget& t, const Answer& a) {
  const std::string status = status_text(a.status, a.error_body);
  const ErrorKind kind = status_kind(a.status);
  switch (a.status) {
    case 200:
      return {kind,
              "the server ignores Range requests (200 where 206 was asked); tensormap reads by ranges: serve the "
              "file with a server that answers them (nginx, Apache, an S3 store; not python -m http.server), or "
              "download it first"};
    case 404: return {kind, "no such object (" + status + ")"};
    case 401:
    case 403:
      return {kind, "access denied (" + status + "), asked with " +
                        (t.s3                                ? t.credentials
                         : t.credentials == "no credentials" ? "no bearer token"
                                                             : t.credentials)};
    case 412: return {kind, "the object changed while it was read (" + status + ")"};
    case 429:
    case 503: return {kind, "the server asks to slow down (" + status + ")", true};
    default:
      if (a.status >= 500) return {kind, "the server failed (" + status + ")", true};
      return {kind, "unexpected answer " + status};
  }
}

// Waits `attempt`'s backoff, 0.1 s doubling up to 3.2 s, with jitter; returns early if
// `cancel` is set.
void back_off(unsigned attempt, const std::atomic<bool>* cancel) {
  thread_local std::mt19937 random(std::random_device{}());
  const double base = 0.1 * static_cast<double>(1u << std::min(attempt, 5u));
  const double wait = base * std::uniform_real_distribution<double>(0.75, 1.25)(random);
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait);
  while (std::chrono::steady_clock::now() < until) {
    if (cancel && cancel->load()) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

std::string tries(unsigned attempt) { return attempt == 0 ? "" : " (" + std::to_string(attempt + 1) + " tries)"; }

}  // namespace

// The chunks of one read() or read_ranges(), and the follower that takes their bytes in
// order.
struct Fetcher::Batch {
  struct Chunk {
    uint64_t offset;  // in the object
    uint64_t size;
    unsigned char* dest;
    uint64_t landed = 0;  // its first bytes in place, which no later try writes again
  };

  // What every chunk reads: where, which version, and its name in messages.
  const RemoteTarget* target = nullptr;
  const ObjectVersion* version = nullptr;
  uint64_t object_size = 0;
  const std::string* what = nullptr;
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<Chunk> chunks;
  size_t pending = 0;  // chunks not finished
  std::exception_ptr error;
  std::atomic<bool> cancel{false};
  const Follower* follow = nullptr;
  size_t next = 0;         // the chunk the follower is at
  uint64_t followed = 0;   // its bytes handed to the follower
  bool following = false;  // a thread is in the follower
  // Under the fetcher's mutex: the chunks connections have taken, in order, and how many
  // connections serve it now.
  size_t taken = 0;
  size_t serving = 0;

  // Chunk `index` has its first `upto` bytes in place. Hands the follower every byte that
  // now follows those it had, on this thread; unless a thread is already at it, which
  // then takes these too.
  void landed(size_t index, uint64_t upto) {
    std::unique_lock<std::mutex> lock(mutex);
    chunks[index].landed = std::max(chunks[index].landed, upto);
    if (!follow || following) return;
    following = true;
    while (next < chunks.size() && !cancel) {
      const Chunk& c = chunks[next];
      if (followed == c.size) {
        ++next;
        followed = 0;
        continue;
      }
      if (c.landed <= followed) break;
      const uint64_t from = followed, to = c.landed;
      lock.unlock();
      std::exception_ptr thrown;
      try {
        (*follow)(c.dest + from, to - from);  // the bytes [from, to) of the chunk: no thread writes them now
      } catch (...) {                         // a follower must not throw: taken as the read's failure all the same
        thrown = std::current_exception();
      }
      lock.lock();
      if (thrown) {
        if (!error) error = thrown;
        cancel = true;
        break;
      }
      followed = to;
    }
    following = false;
    // The waiter waits for this only once every chunk has finished (under the lock: it may
    // free the batch once it sees no work).
    if (pending == 0) changed.notify_all();
  }
};

Fetcher::Fetcher(RemoteOptions options) : options_(std::move(options)) {
  if (options_.connections == 0 || options_.connections > 256) {
    throw Error(ErrorKind::InvalidArgument,
                "remote connections must be between 1 and 256, not " + std::to_string(options_.connections));
  }
  if (options_.chunk_bytes < 4096 || options_.chunk_bytes > (uint64_t{1} << 30)) {
    throw Error(ErrorKind::InvalidArgument,
                "remote chunk_bytes must be between 4096 and 2^30, not " + std::to_string(options_.chunk_bytes));
  }
  if (!(options_.timeout_seconds >= 1 && options_.timeout_seconds <= 3600)) {
    throw Error(ErrorKind::InvalidArgument, "remote timeout_seconds must be between 1 and 3600");
  }
  if (options_.retries > 20) throw Error(ErrorKind::InvalidArgument, "remote retries must be at most 20");
  own_ = std::make_unique<Connection>();
  for (unsigned i = 0; i < options_.connections; ++i) {
    threads_.emplace_back([this] {
      Connection connection;
      work(connection);
    });
  }
}

Fetcher::~Fetcher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  ready_.notify_all();
  for (auto& t : threads_) t.join();
}

FirstResponse Fetcher::first(const RemoteTarget& target, uint64_t head_bytes) const {
  std::lock_guard<std::mutex> lock(own_mutex_);
  for (unsigned attempt = 0;; ++attempt) {
    FirstResponse out;
    out.head.resize(static_cast<size_t>(head_bytes));
    Answer a;
    a.dest = out.head.data();
    a.capacity = head_bytes;
    std::vector<unsigned char> whole;
    a.whole = &whole;
    std::optional<Failure> failure = own_->get(target, options_, 0, head_bytes, a);
    if (!failure) {
      if (a.status == 206) {
        const auto range = parse_content_range(a.content_range);
        if (!range || range->unsatisfied || !range->total || range->first != 0 || range->last >= *range->total ||
            range->last >= head_bytes) {
          failure = Failure{ErrorKind::RemoteProtocol,
                            "a 206 answer whose Content-Range (" + a.content_range + ") is not the range asked for"};
        } else if (range->last + 1 != a.received) {
          failure = Failure{ErrorKind::RemoteProtocol,
                            "a body of " + std::to_string(a.received) + " bytes where " +
                                std::to_string(range->last + 1) + " were asked for",
                            true};
        } else {
          out.size = *range->total;
          out.head.resize(static_cast<size_t>(a.received));
        }
      } else if (a.status == 200) {
        if (!a.content_length || *a.content_length != a.received || a.received > head_bytes) {
          failure = status_failure(target, a);  // ignores Range, on an object larger than the head
        } else {
          out.size = a.received;
          out.head = std::move(whole);
        }
      } else if (a.status == 416) {
        const auto range = parse_content_range(a.content_range);
        if (range && range->unsatisfied && range->total && *range->total == 0) {
          out.size = 0;  // an empty object
          out.head.clear();
        } else {
          failure = Failure{ErrorKind::RemoteProtocol, "HTTP 416 for the first bytes of the object"};
        }
      } else {
        failure = status_failure(target, a);
      }
    }
    if (!failure) {
      out.version = a.version;
      return out;
    }
    if (!failure->transient || attempt >= options_.retries) {
      throw Error(failure->kind, target.shown + ": " + failure->message + tries(attempt));
    }
    back_off(attempt, nullptr);
  }
}

void Fetcher::read(const RemoteTarget& target, const ObjectVersion& version, uint64_t object_size, uint64_t offset,
                   uint64_t size, unsigned char* dest, const Follower& follow, const std::string& what) const {
  read_ranges(target, version, object_size, {Range{offset, size, dest}}, follow, what);
}

void Fetcher::read_ranges(const RemoteTarget& target, const ObjectVersion& version, uint64_t object_size,
                          const std::vector<Range>& ranges, const Follower& follow, const std::string& what) const {
  const uint64_t chunk = options_.chunk_bytes;
  Batch batch;
  batch.target = &target;
  batch.version = &version;
  batch.object_size = object_size;
  batch.what = &what;
  if (follow) batch.follow = &follow;
  for (const Range& r : ranges) {
    for (uint64_t at = 0; at < r.size; at += chunk) {
      batch.chunks.push_back({r.offset + at, std::min(chunk, r.size - at), r.dest + at});
    }
  }
  if (batch.chunks.empty()) return;
  batch.pending = batch.chunks.size();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queued_.push_back(&batch);
  }
  ready_.notify_all();
  std::exception_ptr interrupted;
  std::unique_lock<std::mutex> lock(batch.mutex);
  // Until every chunk has finished or been skipped, and the follower is not running:
  // then nothing writes into dest nor reads it for the follower.
  while (batch.pending > 0 || batch.following) {
    batch.changed.wait_for(lock, std::chrono::milliseconds(50));
    if (!interrupted) {
      lock.unlock();
      try {
        check_interrupt();
      } catch (...) {
        interrupted = std::current_exception();
        batch.cancel = true;
      }
      lock.lock();
    }
  }
  if (interrupted) std::rethrow_exception(interrupted);
  if (batch.error) std::rethrow_exception(batch.error);
}

void Fetcher::work(Connection& connection) {
  while (true) {
    Batch* picked = nullptr;
    size_t index = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      ready_.wait(lock, [&] { return stopping_ || !queued_.empty(); });
      if (queued_.empty()) return;
      // The next chunk of a read no connection serves, if there is one: that read's bytes
      // then land in order, and its follower takes them while they are in this core's cache.
      auto pick = std::find_if(queued_.begin(), queued_.end(), [](const Batch* b) { return b->serving == 0; });
      if (pick == queued_.end()) pick = queued_.begin();
      picked = *pick;
      index = picked->taken++;
      if (picked->taken == picked->chunks.size()) queued_.erase(pick);
      ++picked->serving;
    }
    Batch& batch = *picked;
    Batch::Chunk& chunk = batch.chunks[index];
    std::exception_ptr error;
    if (!batch.cancel) {
      try {
        const RemoteTarget& t = *batch.target;
        const std::string where = t.shown + ": " + *batch.what + ": bytes [" + std::to_string(chunk.offset) + ", " +
                                  std::to_string(chunk.offset + chunk.size) + ")";
        for (unsigned attempt = 0;; ++attempt) {
          // A try after a failure asks for what has not landed: the bytes in place stay.
          uint64_t done = 0;
          {
            std::lock_guard<std::mutex> lock(batch.mutex);
            done = chunk.landed;
          }
          const uint64_t offset = chunk.offset + done, size = chunk.size - done;
          Answer a;
          a.dest = chunk.dest + done;
          a.capacity = size;
          a.cancel = &batch.cancel;
          a.expected = Answer::Expected{offset, offset + size - 1, batch.object_size, batch.version};
          a.landed = [&batch, index, done](uint64_t n) { batch.landed(index, done + n); };
          std::optional<Failure> failure = connection.get(t, options_, offset, size, a);
          if (!failure) failure = a.status == 206 ? header_failure(a) : status_failure(t, a);
          if (!failure && a.received != size) {
            failure = Failure{
                ErrorKind::RemoteProtocol,
                "a body of " + std::to_string(a.received) + " bytes where " + std::to_string(size) + " were asked for",
                true};
          }
          if (!failure) break;
          if (failure->cancelled) throw Error(ErrorKind::Io, where + ": cancelled");
          if (!failure->transient || attempt >= options_.retries) {
            throw Error(failure->kind, where + ": " + failure->message + tries(attempt));
          }
          back_off(attempt, &batch.cancel);
          if (batch.cancel) throw Error(ErrorKind::Io, where + ": cancelled");
        }
      } catch (...) {
        error = std::current_exception();
      }
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --batch.serving;
    }
    std::lock_guard<std::mutex> lock(batch.mutex);
    if (error && !batch.error) {
      batch.error = error;
      batch.cancel = true;
    }
    --batch.pending;
    batch.changed.notify_all();  // under the lock: the waiter may free the batch once it sees 0
  }
}

namespace {

struct SendState {
  Answer answer;  // headers: status and ETag
  std::string body;
};

size_t on_reply_body(char* data, size_t size, size_t count, void* user) {
  auto& s = *static_cast<SendState*>(user);
  const size_t length = size * count;
  if (s.body.size() < (size_t{1} << 20)) s.body.append(data, std::min(length, (size_t{1} << 20) - s.body.size()));
  return length;
}

}  // namespace

HttpSender::HttpSender() : curl_(new_curl_handle()) {}

HttpSender::~HttpSender() { curl_easy_cleanup(static_cast<CURL*>(curl_)); }

HttpReply HttpSender::send(const RemoteTarget& t, const RemoteOptions& o, const std::string& method,
                           const std::string& query, const void* body, size_t size, const std::string& what,
                           const std::atomic<bool>* cancel) {
  auto* curl = static_cast<CURL*>(curl_);
  const std::string url = t.http_url + (query.empty() ? "" : "?" + query);
  for (unsigned attempt = 0;; ++attempt) {
    SendState s;
    s.answer.cancel = cancel;
    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method.c_str());
    if (method != "DELETE") {
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, size ? body : "");
      curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(size));
    }
    // Not libcurl's default for a body (a form), which a server may parse and refuse.
    curl_slist* headers = curl_slist_append(nullptr, "Expect:");
    headers = curl_slist_append(headers, "Content-Type: application/octet-stream");
    std::string signing;
    headers = prepare(curl, t, o, s.answer, on_reply_body, &s, "UNSIGNED-PAYLOAD", headers, signing);
    const CURLcode rc = curl_easy_perform(curl);
    curl_slist_free_all(headers);
    if (cancel && cancel->load()) throw Error(ErrorKind::Io, t.shown + ": " + what + ": cancelled");
    std::optional<Failure> failure;
    if (rc != CURLE_OK) {
      const bool lasting = rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_COULDNT_RESOLVE_PROXY ||
                           rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE;
      failure = Failure{ErrorKind::RemoteUnreachable,
                        std::string(rc == CURLE_COULDNT_CONNECT ? "cannot connect" : "the request failed") + " (" +
                            curl_detail(rc, s.answer) + ")",
                        !lasting};
    } else if (s.answer.status >= 500 || s.answer.status == 429) {
      s.answer.error_body = s.body.substr(0, kErrorBodyBytes);
      failure = status_failure(t, s.answer);
      failure->transient = true;
    }
    if (!failure) {
      HttpReply reply;
      reply.status = s.answer.status;
      reply.body = std::move(s.body);
      reply.etag = s.answer.version.etag;
      return reply;
    }
    if (attempt >= o.retries)
      throw Error(failure->kind, t.shown + ": " + what + ": " + failure->message + tries(attempt));
    back_off(attempt, cancel);
  }
}

}  // namespace tensormap::detail
