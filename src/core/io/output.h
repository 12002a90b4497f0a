// The seam between the writers and where a new checkpoint's bytes go. Internal to the
// core.
//
// An Output is written at any offset, finished (every byte durable, nothing visible yet),
// then published: the destination changes from its old content to the complete new one
// in one step, or not at all. AtomicFile (posix_io.h) is the local file: a temporary file
// renamed over the destination; S3Upload (remote/s3_upload.h) is an S3 multipart upload.
// Another store plugs in by implementing the same steps, with the same promise: discard()
// (or destruction before publish) leaves the destination as it was.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tensormap::detail {

class Output {
 public:
  virtual ~Output() = default;
  // The destination, for messages.
  virtual const std::string& path() const = 0;
  // What the writer knows before its first byte: the output will be `size` bytes, and its
  // first `written_last` bytes (a header that records the checksums) come after all the
  // others. An output that streams its bytes away (an S3 upload) holds those back; a
  // file needs neither.
  virtual void plan(uint64_t size, uint64_t written_last) {
    (void)size;
    (void)written_last;
  }
  // Writes `size` bytes at `offset`. Gaps never written read as zeros.
  virtual void pwrite(const void* data, size_t size, uint64_t offset) = 0;
  // Appends after everything append() wrote so far.
  virtual void append(const void* data, size_t size) = 0;
  // Sets the length (the gaps read as zeros).
  virtual void truncate(uint64_t size) = 0;
  // Copies [src_offset, src_offset + size) of the local file open as `src_fd` to
  // `offset`. This default reads and writes through a 1 MiB buffer; a source shorter than
  // the range gives Error(Truncated) naming `what`.
  virtual void copy_from(int src_fd, uint64_t src_offset, uint64_t size, uint64_t offset, const std::string& what);
  // Makes every byte durable (if `sync`); after this, only publish() remains.
  virtual void finish(bool sync) = 0;
  // Replaces the destination with the finished bytes, atomically.
  virtual void publish(bool sync) = 0;
  // Forgets everything written; the destination stays as it was. Safe to call twice.
  virtual void discard() noexcept = 0;
};

}  // namespace tensormap::detail
