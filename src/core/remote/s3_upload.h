// A new object in S3, written as a multipart upload: the Output of saves to s3:// URLs.
// Internal to the core.
//
// The object is cut into parts of `part_bytes` (at least 5 MiB, S3's least, and more
// where the object would need over 10,000 parts). A part is uploaded as soon as the writer
// has moved past it, on `connections` threads (from the first part to finish()), while
// the writer goes on; the parts that
// hold the first `written_last` bytes (the header, written last) wait for finish(). At most
// twice `connections` parts wait for a thread: beyond that, pwrite waits, so memory stays
// bounded by (2 x connections + 2) parts plus the held ones. Writes must come in order of
// offset, as the tensormap and safetensors writers make them (a torch.save archive's are
// not: it patches each record's header after its data).
//
// Nothing is visible until publish(), which completes the upload: S3 then shows the whole
// new object in place of the old one, in one step. discard(), a failure, or destruction
// before publish aborts the upload, leaving the old object and no upload behind.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "io/output.h"
#include "remote/fetcher.h"
#include "remote/url.h"
#include "tensormap/remote.h"

namespace tensormap::detail {

// Puts `bytes` as the object at the s3:// `url` in one request: it appears whole or not
// at all (a shard index, small). Throws an Error of the Remote group.
void put_object(const std::string& url, const std::string& bytes, const RemoteOptions& options);
// Deletes the object at the s3:// `url`; false where S3 refused or could not be reached.
bool delete_object(const std::string& url, const RemoteOptions& options) noexcept;

class S3Upload final : public Output {
 public:
  // Begins the upload (CreateMultipartUpload). Throws Error(InvalidArgument) for a URL
  // that is not s3://, and an Error of the Remote group where S3 refuses.
  S3Upload(const std::string& url, RemoteOptions options);
  ~S3Upload() override;

  const std::string& path() const override { return target_.shown; }
  void plan(uint64_t size, uint64_t written_last) override;
  void pwrite(const void* data, size_t size, uint64_t offset) override;
  void append(const void* data, size_t size) override { pwrite(data, size, appended_); }
  void truncate(uint64_t size) override;
  void finish(bool sync) override;
  void publish(bool sync) override;
  void discard() noexcept override;

 private:
  void upload_below(uint64_t part);
  void queue(uint64_t part);
  void work();
  void rethrow_failure();
  bool held(uint64_t part) const { return part * part_bytes_ < written_last_; }

  RemoteTarget target_;
  RemoteOptions options_;
  uint64_t part_bytes_;
  std::string upload_id_;
  HttpSender sender_;  // the calls of this thread: create, complete, abort
  uint64_t written_last_ = 0;
  uint64_t size_ = 0;                                    // the end of the furthest write, or the truncated length
  uint64_t appended_ = 0;                                // where append() writes
  uint64_t next_ = 0;                                    // every part below it, but the held ones, is queued
  std::map<uint64_t, std::vector<unsigned char>> open_;  // parts being written
  bool finished_ = false, published_ = false, aborted_ = false;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::pair<uint64_t, std::vector<unsigned char>>> waiting_;  // parts for the threads
  size_t in_flight_ = 0;
  std::map<uint64_t, std::string> etags_;  // by part number
  std::exception_ptr failure_;
  std::atomic<bool> cancel_{false};
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace tensormap::detail
