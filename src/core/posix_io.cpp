// Checked POSIX I/O for the writer.
#include "posix_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "tensormap/error.h"

namespace tensormap::detail {

void throw_io(const std::string& path, const std::string& what, int err) {
  throw Error(ErrorKind::Io, path + ": " + what + ": " + std::strerror(err));
}

void pwrite_all(int fd, const void* data, size_t size, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (size > 0) {
    const size_t chunk = size < (size_t{1} << 30) ? size : (size_t{1} << 30);
    const ssize_t n = ::pwrite(fd, p, chunk, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io(path, "write of " + std::to_string(chunk) + " bytes at offset " +
                         std::to_string(offset) + " failed", errno);
    }
    if (n == 0) throw_io(path, "write made no progress", EIO);
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

std::string parent_directory(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

void sync_parent_directory(const std::string& path) {
  const std::string dir = parent_directory(path);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_io(dir, "cannot open directory to sync it", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw_io(dir, "fsync of directory failed", err);
}

void write_file_atomically(const std::string& path, const std::string& bytes, bool sync) {
  const std::string temp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw_io(temp, "cannot create", errno);
  bool closed = false;
  try {
    pwrite_all(fd, bytes.data(), bytes.size(), 0, temp);
    if (sync && ::fsync(fd) != 0) throw_io(temp, "fsync failed", errno);
    closed = true;
    if (::close(fd) != 0) throw_io(temp, "close failed", errno);
  } catch (...) {
    if (!closed) ::close(fd);
    ::unlink(temp.c_str());
    throw;
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    throw_io(path, "cannot rename the temporary file into place", err);
  }
  if (sync) sync_parent_directory(path);
}

}  // namespace tensormap::detail
