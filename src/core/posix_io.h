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

// The directory part of `path` ("." when there is none).
std::string parent_directory(const std::string& path);

}  // namespace tensormap::detail
