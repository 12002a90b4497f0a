// Checked POSIX I/O for the writer.
#include "io/posix_io.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string_view>
#include <vector>

#include "io/temporaries.h"
#include "tensormap/error.h"
#include "tensormap/interrupt.h"

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
      throw_io(path, "write of " + std::to_string(chunk) + " bytes at offset " + std::to_string(offset) + " failed",
               errno);
    }
    if (n == 0) throw_io(path, "write made no progress", EIO);
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string parent_directory(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string write_target(const std::string& path) {
  std::string current = path;
  for (int links = 0; links <= 40; ++links) {
    struct stat st {};
    if (::lstat(current.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return current;
    std::string target(static_cast<size_t>(st.st_size) + 1, '\0');
    ssize_t n;
    while ((n = ::readlink(current.c_str(), target.data(), target.size())) >= static_cast<ssize_t>(target.size())) {
      target.resize(target.size() * 2);  // the link changed since lstat
    }
    if (n < 0) throw_io(current, "cannot read the symbolic link", errno);
    target.resize(static_cast<size_t>(n));
    current = target.front() == '/' ? target : parent_directory(current) + "/" + target;
  }
  throw_io(path, "cannot write through it", ELOOP);
}

void sync_parent_directory(const std::string& path) {
  const std::string dir = parent_directory(path);
  const UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) throw_io(dir, "cannot open directory to sync it", errno);
  if (::fsync(fd.get()) != 0) throw_io(dir, "fsync of directory failed", errno);
}

void write_file_atomically(const std::string& path, const std::string& bytes, bool sync) {
  AtomicFile file(path);
  file.append(bytes.data(), bytes.size());
  file.finish(sync);
  file.rename_into_place(sync);
}

AtomicFile::AtomicFile(std::string path) : path_(write_target(path)) {
  const std::string base = base_name(path_);
  collect_stale_temporaries(parent_directory(path_), [&](std::string_view destination) { return destination == base; });
  const std::string dir = parent_directory(path_);
  if (!named_temporaries_forced()) {
    fd_.reset(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0666));
    if (fd_) {
      nameless_ = true;
    } else if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
      throw_io(path_, "cannot create a temporary file in " + dir, errno);
    }
  }
  if (!fd_) create_named();
  // Keep the permission bits of the file we replace; a new file gets 0666 & ~umask.
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::fchmod(fd_.get(), st.st_mode & 07777) != 0) {
    const int err = errno;
    discard();
    throw_io(path_, "cannot copy permissions to the temporary file", err);
  }
}

// The name is registered before the file is made under it, so that a stop signal that
// lands between the two still finds it; a name not taken after all is unregistered.
bool AtomicFile::take_temp_name(const std::function<bool(const std::string&)>& make) {
  std::string name = temporary_name(path_);
  const int slot = register_temporary(name);
  if (!make(name)) {
    const int err = errno;
    unregister_temporary(slot);
    errno = err;
    return false;
  }
  temp_path_ = std::move(name);
  registry_slot_ = slot;
  return true;
}

void AtomicFile::create_named() {
  for (int attempt = 0; attempt < 100 && !fd_; ++attempt) {
    const bool made = take_temp_name([&](const std::string& name) {
      fd_.reset(::open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
      return fd_.valid();
    });
    if (!made && errno != EEXIST) {
      throw_io(path_, "cannot create a temporary file in " + parent_directory(path_), errno);
    }
  }
  if (!fd_) throw_io(path_, "cannot find a free temporary file name", EEXIST);
  // The lock says "a writer is alive" to collect_stale_temporaries of other processes.
  if (::flock(fd_.get(), LOCK_EX | LOCK_NB) != 0 && errno != ENOLCK && errno != EOPNOTSUPP) {
    const int err = errno;
    discard();
    throw_io(path_, "cannot lock the temporary file", err);
  }
}

void AtomicFile::link_named() {
  // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; /proc/self/fd works for everyone else.
  char proc_path[64];
  std::snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", fd_.get());
  for (int attempt = 0; attempt < 100; ++attempt) {
    const bool linked = take_temp_name([&](const std::string& name) {
      int rc = ::linkat(fd_.get(), "", AT_FDCWD, name.c_str(), AT_EMPTY_PATH);
      if (rc != 0 && (errno == ENOENT || errno == EPERM)) {
        rc = ::linkat(AT_FDCWD, proc_path, AT_FDCWD, name.c_str(), AT_SYMLINK_FOLLOW);
      }
      return rc == 0;
    });
    if (linked) return;
    if (errno != EEXIST) throw_io(path_, "cannot give the temporary file a name", errno);
  }
  throw_io(path_, "cannot find a free temporary file name", EEXIST);
}

AtomicFile::~AtomicFile() { discard(); }

void AtomicFile::pwrite(const void* data, size_t size, uint64_t offset) {
  try {
    // In pieces, so that a long write can be interrupted (interrupt.h) between them.
    const auto* bytes = static_cast<const unsigned char*>(data);
    size_t done = 0;
    do {
      check_interrupt();
      const size_t piece = std::min<size_t>(size - done, kStreamPieceBytes);
      stage(bytes + done, piece, offset + done);
      done += piece;
    } while (done < size);
  } catch (...) {
    discard();
    throw;
  }
}

void AtomicFile::stage(const unsigned char* data, size_t size, uint64_t offset) {
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, uint64_t{size}, &end)) {
    throw Error(ErrorKind::InvalidArgument, path_ + ": a write of " + std::to_string(size) + " bytes at offset " +
                                                std::to_string(offset) + " runs past the largest file offset");
  }
  while (offset < end) {
    if (staged_ && offset < block_start_) {
      // Before the staged block: bytes already out in the file, or a gap below them.
      const uint64_t n = std::min(end, block_start_) - offset;
      pwrite_all(fd_.get(), data, static_cast<size_t>(n), offset, path_);
      data += n;
      offset += n;
    } else if (staged_ && offset < block_start_ + kBlock) {
      const uint64_t n = std::min(end, block_start_ + kBlock) - offset;
      std::memcpy(block_.data() + (offset - block_start_), data, static_cast<size_t>(n));
      block_fill_ = std::max(block_fill_, offset + n - block_start_);
      data += n;
      offset += n;
    } else if (staged_) {
      flush_staged(/*whole=*/true);  // the file goes on past the block: its tail is a gap
    } else if (offset < written_end_ && (offset & ~(kBlock - 1)) + kBlock <= written_end_) {
      // Inside a block already written out (a header filled in last): in place.
      const uint64_t n = std::min(end, (offset & ~(kBlock - 1)) + kBlock) - offset;
      pwrite_all(fd_.get(), data, static_cast<size_t>(n), offset, path_);
      data += n;
      offset += n;
    } else if (offset % kBlock == 0 && end - offset >= kBlock) {
      // Whole blocks, straight to the file.
      const uint64_t n = (end - offset) & ~(kBlock - 1);
      pwrite_all(fd_.get(), data, static_cast<size_t>(n), offset, path_);
      data += n;
      offset += n;
    } else {
      // Start staging the block holding `offset`, with what the file has of it so far.
      block_.resize(static_cast<size_t>(kBlock));
      block_start_ = offset & ~(kBlock - 1);
      std::memset(block_.data(), 0, block_.size());
      block_fill_ = 0;
      if (written_end_ > block_start_) {
        const uint64_t have = written_end_ - block_start_;
        for (uint64_t done = 0; done < have;) {
          const ssize_t n = ::pread(fd_.get(), block_.data() + done, static_cast<size_t>(have - done),
                                    static_cast<off_t>(block_start_ + done));
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) throw_io(path_, "cannot read back the new file", errno);
          if (n == 0) break;  // a gap at the end: zeros
          done += static_cast<uint64_t>(n);
        }
        block_fill_ = have;
      }
      staged_ = true;
    }
    written_end_ = std::max(written_end_, offset);
  }
}

void AtomicFile::flush_staged(bool whole) {
  if (!staged_) return;
  staged_ = false;
  const uint64_t n = whole ? kBlock : block_fill_;
  if (n > 0) pwrite_all(fd_.get(), block_.data(), static_cast<size_t>(n), block_start_, path_);
  written_end_ = std::max(written_end_, block_start_ + n);
}

void AtomicFile::copy_from(int src_fd, uint64_t src_offset, uint64_t size, uint64_t offset, const std::string& what) {
  try {
    flush_staged(/*whole=*/false);
    written_end_ = std::max(written_end_, offset + size);
    bool in_kernel = true;
    std::vector<unsigned char> buffer;
    while (size > 0) {
      check_interrupt();
      const size_t chunk = size < kStreamPieceBytes ? static_cast<size_t>(size) : kStreamPieceBytes;
      ssize_t n = -1;
      if (in_kernel) {
        auto in = static_cast<off_t>(src_offset);
        auto out = static_cast<off_t>(offset);
        n = ::copy_file_range(src_fd, &in, fd_.get(), &out, chunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP || errno == EBADF ||
                      errno == EPERM)) {
          in_kernel = false;  // not across these filesystems or files: copy it ourselves
          continue;
        }
        if (n < 0) throw_io(path_, "copy of " + what + " failed", errno);
      } else {
        if (buffer.empty()) buffer.resize(size_t{1} << 20);
        const size_t piece = chunk < buffer.size() ? chunk : buffer.size();
        n = ::pread(src_fd, buffer.data(), piece, static_cast<off_t>(src_offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_io(path_, "read of " + what + " failed", errno);
        if (n > 0) pwrite_all(fd_.get(), buffer.data(), static_cast<size_t>(n), offset, path_);
      }
      if (n == 0) {
        throw Error(ErrorKind::Truncated,
                    path_ + ": the source of " + what + " ended " + std::to_string(size) + " bytes early (it shrank)");
      }
      src_offset += static_cast<uint64_t>(n);
      offset += static_cast<uint64_t>(n);
      size -= static_cast<uint64_t>(n);
    }
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
  try {
    flush_staged(/*whole=*/false);
  } catch (...) {
    discard();
    throw;
  }
  written_end_ = size;
  if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) {
    const int err = errno;
    discard();
    throw_io(path_, "cannot set the length of the new file to " + std::to_string(size) + " bytes", err);
  }
}

void AtomicFile::finish(bool sync) {
  try {
    flush_staged(/*whole=*/false);
  } catch (...) {
    discard();
    throw;
  }
  if (sync && ::fsync(fd_.get()) != 0) {
    const int err = errno;
    discard();
    throw_io(path_, "fsync of the new file failed", err);
  }
  finished_ = true;
  if (nameless_) return;  // the descriptor names it until rename_into_place
  if (fd_.close() != 0) {
    const int err = errno;
    discard();
    throw_io(path_, "close of the new file failed", err);
  }
}

void AtomicFile::rename_into_place(bool sync) {
  try {
    if (nameless_) {
      link_named();
      if (fd_.close() != 0) throw_io(path_, "close of the new file failed", errno);
    }
    if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
      throw_io(path_, "cannot rename the temporary file into place", errno);
    }
  } catch (...) {
    discard();
    throw;
  }
  unregister_temporary(registry_slot_);
  registry_slot_ = -1;
  temp_path_.clear();  // it is the destination now
  // The new file is in place; only its directory entry may not be durable yet.
  if (sync) sync_parent_directory(path_);
}

void AtomicFile::discard() noexcept {
  fd_.reset();
  if (!temp_path_.empty()) {
    ::unlink(temp_path_.c_str());
    unregister_temporary(registry_slot_);
    registry_slot_ = -1;
    temp_path_.clear();
  }
}

}  // namespace tensormap::detail
