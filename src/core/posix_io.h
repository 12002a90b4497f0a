// Thin, checked wrappers over the POSIX calls the writer needs. Internal to the core.
// Each throws Error(Io) naming the path and the system's reason.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tensormap::detail {

// "<path>: <what>: <strerror(errno)>" as an Io error.
[[noreturn]] void throw_io(const std::string& path, const std::string& what, int err);

// Writes all `size` bytes at `offset`, retrying short writes and EINTR.
void pwrite_all(int fd, const void* data, size_t size, uint64_t offset, const std::string& path);

// fsync on the directory holding `path`.
void sync_parent_directory(const std::string& path);

// Writes `bytes` to `path` atomically: a temporary file beside it, fsync (if `sync`),
// rename, directory fsync. On failure `path` is unchanged and no temporary file remains.
void write_file_atomically(const std::string& path, const std::string& bytes, bool sync);

// A new file written under a temporary name beside `path` and moved over it only on
// commit: the destination is always either its old content or the complete new one.
// The destination's permission bits are kept when it exists. Destroyed without commit
// (or after a failure), the temporary file is removed.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }
  bool open() const { return fd_ >= 0; }

  void pwrite(const void* data, size_t size, uint64_t offset);
  // Appends after everything append() wrote so far.
  void append(const void* data, size_t size);
  // Sets the file's length (the gaps read as zeros).
  void truncate(uint64_t size);
  // fsync (if `sync`) and close: after this, only rename_into_place() remains.
  void finish(bool sync);
  // Renames the finished temporary file over the destination, then fsyncs the directory.
  void rename_into_place(bool sync);
  // Removes the temporary file. Safe to call more than once.
  void discard() noexcept;

 private:
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  uint64_t appended_ = 0;
};

// The directory part of `path` ("." when there is none).
std::string parent_directory(const std::string& path);

}  // namespace tensormap::detail
