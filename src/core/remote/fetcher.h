// Range requests over HTTP(S), with libcurl: checked, retried, and many at once. Internal
// to the core.
//
// A Fetcher owns `connections` threads, each with a connection of its own that it keeps
// open between requests. Fetcher::read splits a range into chunks, hands them to those
// threads, and waits: each chunk is written by libcurl straight into its place in the
// destination once its answer's headers are checked (206, the Content-Range asked for,
// the object's ETag and Last-Modified as first seen), so no byte of a wrong answer is
// written; then its length is checked. What fails and may pass is retried with backoff,
// from the first byte that has not arrived; what is left is thrown as an Error of the
// Remote group, after every chunk of the call has stopped writing.
//
// A reader that follows the bytes in order (a checksum) is handed them as they land, by
// the thread that landed them, while they are still in that core's cache. So that most
// bytes land in order, a free connection takes the next chunk of a read none is serving
// before another chunk of a read being served: with as many reads in flight as
// connections, each read's chunks come one after another.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "remote/url.h"
#include "tensormap/error.h"
#include "tensormap/remote.h"

namespace tensormap::detail {

// What identifies the version of an object: a response for another version means the
// object changed.
struct ObjectVersion {
  std::string etag;
  std::string last_modified;
};

// An object as its first response described it.
struct FirstResponse {
  uint64_t size = 0;
  ObjectVersion version;
  std::vector<unsigned char> head;  // its first bytes: min(size, the head asked for)
};

// The text of the first <tag>...</tag> in `xml` (an S3 reply), or "".
std::string xml_element(const std::string& xml, const std::string& tag);
// "HTTP 503 SlowDown": a status, and the S3 error code of its body where it has one.
std::string status_text(long status, const std::string& body);
// The Remote kind of an HTTP status that is not a success: 404 RemoteNotFound, 401 and 403
// RemoteAccessDenied, 412 RemoteChanged, 429 and 503 RemoteThrottled, any other
// RemoteProtocol.
ErrorKind status_kind(long status);

// A reply to HttpSender::send: its status, its body (an S3 XML document) and its ETag.
struct HttpReply {
  long status = 0;
  std::string body;
  std::string etag;
};

// Requests other than range reads, on a connection of its own: S3's multipart calls.
class HttpSender {
 public:
  HttpSender();
  ~HttpSender();
  HttpSender(const HttpSender&) = delete;
  HttpSender& operator=(const HttpSender&) = delete;

  // `method` (POST, PUT, DELETE) on the target's URL with `query` after a '?', carrying
  // `size` bytes of `body`, signed as reads are. A failed connection, 5xx, 429 and 503
  // are tried again, `options.retries` times with backoff; where no reply came at all,
  // throws an Error of the Remote group naming `what`. Any other reply is returned.
  // `cancel` stops a transfer and the waits between tries.
  HttpReply send(const RemoteTarget& target, const RemoteOptions& options, const std::string& method,
                 const std::string& query, const void* body, size_t size, const std::string& what,
                 const std::atomic<bool>* cancel = nullptr);

 private:
  void* curl_;
};

class Fetcher {
 public:
  explicit Fetcher(RemoteOptions options);
  ~Fetcher();
  Fetcher(const Fetcher&) = delete;
  Fetcher& operator=(const Fetcher&) = delete;

  const RemoteOptions& options() const { return options_; }

  // The object's size and version, and its first `head_bytes` bytes, in one request.
  FirstResponse first(const RemoteTarget& target, uint64_t head_bytes) const;

  // Takes the bytes of a read in order, each once, as they land in the destination:
  // `data` points there. Called on the fetcher's threads, never two calls at once, and
  // not after read() returns or throws; it must not throw.
  using Follower = std::function<void(const unsigned char* data, uint64_t size)>;

  // Bytes [offset, offset + size) of the object into `dest`, in chunks over the
  // connections, handed to `follow` (if any) as they land. `what` names the bytes in
  // messages. Checks for an interrupt (tensormap/interrupt.h) while it waits.
  void read(const RemoteTarget& target, const ObjectVersion& version, uint64_t object_size, uint64_t offset,
            uint64_t size, unsigned char* dest, const Follower& follow, const std::string& what) const;

  // Many ranges at once (the rows of a slice), each in chunks, all over the connections;
  // `follow` takes the bytes of the ranges in their order.
  struct Range {
    uint64_t offset;
    uint64_t size;
    unsigned char* dest;
  };
  void read_ranges(const RemoteTarget& target, const ObjectVersion& version, uint64_t object_size,
                   const std::vector<Range>& ranges, const Follower& follow, const std::string& what) const;

 private:
  struct Batch;
  struct Connection;
  void work(Connection& connection);

  RemoteOptions options_;
  mutable std::mutex mutex_;
  mutable std::condition_variable ready_;
  mutable std::deque<Batch*> queued_;  // reads with chunks no connection has taken yet, in order
  bool stopping_ = false;
  std::vector<std::thread> threads_;
  std::unique_ptr<Connection> own_;  // for first(), on the caller's thread
  mutable std::mutex own_mutex_;
};

}  // namespace tensormap::detail
