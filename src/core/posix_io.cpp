// Checked POSIX I/O for the writer.
#include "posix_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
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
  AtomicFile file(path);
  file.append(bytes.data(), bytes.size());
  file.finish(sync);
  file.rename_into_place(sync);
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  static std::atomic<uint64_t> counter{0};
  const std::string dir = parent_directory(path_);
  const auto slash = path_.find_last_of('/');
  const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
  for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
    const uint64_t salt =
        static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
        (static_cast<uint64_t>(::getpid()) << 32) ^ counter.fetch_add(1);
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp-%012llx", static_cast<unsigned long long>(salt & 0xFFFFFFFFFFFFull));
    temp_path_ = dir + "/." + base + suffix;
    fd_ = ::open(temp_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && errno != EEXIST) {
      const int err = errno;
      temp_path_.clear();
      throw_io(path_, "cannot create a temporary file in " + dir, err);
    }
  }
  if (fd_ < 0) {
    temp_path_.clear();
    throw_io(path_, "cannot find a free temporary file name", EEXIST);
  }
  // Keep the permission bits of the file we replace; a new file gets 0666 & ~umask.
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::fchmod(fd_, st.st_mode & 07777) != 0) {
    const int err = errno;
    discard();
    throw_io(path_, "cannot copy permissions to the temporary file", err);
  }
}

AtomicFile::~AtomicFile() { discard(); }

void AtomicFile::pwrite(const void* data, size_t size, uint64_t offset) {
  try {
    pwrite_all(fd_, data, size, offset, temp_path_);
  } catch (...) {
    discard();
    throw;
  }
}

void AtomicFile::append(const void* data, size_t size) {
  pwrite(data, size, appended_);
  appended_ += size;
}

void AtomicFile::truncate(uint64_t size) {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    discard();
    throw_io(temp_path_, "cannot set the length to " + std::to_string(size) + " bytes", err);
  }
}

void AtomicFile::finish(bool sync) {
  if (sync && ::fsync(fd_) != 0) {
    const int err = errno;
    discard();
    throw_io(temp_path_, "fsync failed", err);
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    discard();
    throw_io(temp_path_, "close failed", err);
  }
}

void AtomicFile::rename_into_place(bool sync) {
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    discard();
    throw_io(path_, "cannot rename the temporary file into place", err);
  }
  temp_path_.clear();  // it is the destination now
  // The new file is in place; only its directory entry may not be durable yet.
  if (sync) sync_parent_directory(path_);
}

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!temp_path_.empty()) {
    ::unlink(temp_path_.c_str());
    temp_path_.clear();
  }
}

}  // namespace tensormap::detail
