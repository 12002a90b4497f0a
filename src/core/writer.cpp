// tensormap::Writer: streams tensor bytes into a temporary file, then moves it into place.
//
// The header depends only on the declarations, so its size and every offset are known
// before any data arrives. Data goes to its final offset with pwrite; padding is never
// written: the file is extended with ftruncate at the end and the gaps read as zeros.
// The header, which holds the checksums, is written last.
#include "tensormap/writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>

#include "header.h"
#include "names.h"
#include "posix_io.h"
#include "tensormap/error.h"

namespace tensormap {

struct Writer::Impl {
  std::string path;
  std::string temp_path;
  int fd = -1;
  std::vector<TensorSpec> tensors;
  WriterOptions options;
  detail::Layout layout;
  std::vector<unsigned char> safetensors_header;  // known up front; tensormap's is not
  std::vector<uint64_t> checksums;
  size_t current = 0;
  uint64_t written = 0;  // bytes of the current tensor received so far
  XXH3_state_t* hash = nullptr;
  bool failed = false;

  ~Impl() {
    discard();
    if (hash) XXH3_freeState(hash);
  }

  void discard() noexcept {
    if (fd >= 0) {
      ::close(fd);
      fd = -1;
    }
    if (!temp_path.empty()) {
      ::unlink(temp_path.c_str());
      temp_path.clear();
    }
  }

  // Skips zero-length tensors so `current` names one that still wants bytes.
  void settle() {
    while (current < tensors.size() && written == layout.byte_lengths[current]) {
      checksums[current] = XXH3_64bits_digest(hash);
      XXH3_64bits_reset(hash);
      ++current;
      written = 0;
    }
  }

  [[noreturn]] void fail_invalid(const std::string& what) {
    throw Error(ErrorKind::InvalidArgument, path + ": " + what);
  }

  void check_usable() {
    if (failed) fail_invalid("the writer failed earlier and was abandoned");
    if (fd < 0) fail_invalid("the writer was already committed or abandoned");
  }
};

namespace {

// A temporary name in the destination's directory that no one else is using.
int create_temp_file(const std::string& path, std::string* temp_path) {
  static std::atomic<uint64_t> counter{0};
  const std::string dir = detail::parent_directory(path);
  const auto slash = path.find_last_of('/');
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  for (int attempt = 0; attempt < 100; ++attempt) {
    const uint64_t salt =
        static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
        (static_cast<uint64_t>(::getpid()) << 32) ^ counter.fetch_add(1);
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp-%012llx",
                  static_cast<unsigned long long>(salt & 0xFFFFFFFFFFFFull));
    *temp_path = dir + "/." + base + suffix;
    const int fd = ::open(temp_path->c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) return fd;
    if (errno != EEXIST) {
      const int err = errno;
      temp_path->clear();
      detail::throw_io(path, "cannot create a temporary file in " + dir, err);
    }
  }
  temp_path->clear();
  detail::throw_io(path, "cannot find a free temporary file name", EEXIST);
}

}  // namespace

Writer::Writer(std::string path, std::vector<TensorSpec> tensors, WriterOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.path = std::move(path);
  w.layout = options.format == Format::Safetensors
                 ? detail::plan_safetensors_layout(tensors, options, w.path, &w.safetensors_header)
                 : detail::plan_layout(tensors, options, w.path);
  w.tensors = std::move(tensors);
  w.options = std::move(options);
  w.checksums.assign(w.tensors.size(), 0);
  w.hash = XXH3_createState();
  if (!w.hash || XXH3_64bits_reset(w.hash) != XXH_OK) {
    throw Error(ErrorKind::Io, w.path + ": cannot allocate a hash state");
  }
  w.fd = create_temp_file(w.path, &w.temp_path);
  // Keep the permission bits of the file we replace; a new file gets 0666 & ~umask.
  struct stat st {};
  if (::stat(w.path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    if (::fchmod(w.fd, st.st_mode & 07777) != 0) {
      const int err = errno;
      w.discard();
      detail::throw_io(w.path, "cannot copy permissions to the temporary file", err);
    }
  }
  w.settle();
}

Writer::~Writer() = default;
Writer::Writer(Writer&&) noexcept = default;
Writer& Writer::operator=(Writer&&) noexcept = default;

size_t Writer::tensor_count() const { return impl_->tensors.size(); }
uint64_t Writer::byte_length(size_t index) const { return impl_->layout.byte_lengths.at(index); }
size_t Writer::current_tensor() const { return impl_->current; }

void Writer::write(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_usable();
  if (size == 0) return;
  if (w.current == w.tensors.size()) {
    w.fail_invalid("got " + std::to_string(size) + " bytes after the last tensor was complete");
  }
  const uint64_t room = w.layout.byte_lengths[w.current] - w.written;
  if (size > room) {
    w.fail_invalid("tensor " + detail::quoted(w.tensors[w.current].name) + " takes " +
                   std::to_string(room) + " more bytes, got " + std::to_string(size));
  }
  try {
    detail::pwrite_all(w.fd, data, size, w.layout.offsets[w.current] + w.written, w.temp_path);
  } catch (...) {
    w.failed = true;
    w.discard();
    throw;
  }
  XXH3_64bits_update(w.hash, data, size);
  w.written += size;
  w.settle();
}

void Writer::write_tensor(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_usable();
  if (w.current == w.tensors.size()) {
    w.fail_invalid("write_tensor called after every tensor was complete");
  }
  if (w.written != 0 || size != w.layout.byte_lengths[w.current]) {
    w.fail_invalid("tensor " + detail::quoted(w.tensors[w.current].name) + " takes " +
                   std::to_string(w.layout.byte_lengths[w.current]) +
                   " bytes in one piece, got " + std::to_string(size) + " (" +
                   std::to_string(w.written) + " already written)");
  }
  write(data, size);
}

void Writer::finish() {
  Impl& w = *impl_;
  w.check_usable();
  if (w.current != w.tensors.size()) {
    w.fail_invalid("tensor " + detail::quoted(w.tensors[w.current].name) + " received " +
                   std::to_string(w.written) + " of its " +
                   std::to_string(w.layout.byte_lengths[w.current]) +
                   " bytes; nothing was committed");
  }
  try {
    const auto header = w.options.format == Format::Safetensors
                            ? w.safetensors_header
                            : detail::encode_header(w.tensors, w.options, w.layout, w.checksums);
    detail::pwrite_all(w.fd, header.data(), header.size(), 0, w.temp_path);
    if (::ftruncate(w.fd, static_cast<off_t>(w.layout.file_size)) != 0) {
      detail::throw_io(w.temp_path, "cannot extend to " + std::to_string(w.layout.file_size) +
                                        " bytes", errno);
    }
    if (w.options.sync && ::fsync(w.fd) != 0) detail::throw_io(w.temp_path, "fsync failed", errno);
    const int fd = w.fd;
    w.fd = -1;
    if (::close(fd) != 0) detail::throw_io(w.temp_path, "close failed", errno);
  } catch (...) {
    w.failed = true;
    w.discard();
    throw;
  }
}

void Writer::rename_into_place() {
  Impl& w = *impl_;
  if (w.failed || w.fd >= 0 || w.temp_path.empty()) {
    w.fail_invalid("rename_into_place needs a finished, not yet renamed writer");
  }
  if (::rename(w.temp_path.c_str(), w.path.c_str()) != 0) {
    const int err = errno;
    w.failed = true;
    w.discard();
    detail::throw_io(w.path, "cannot rename the temporary file into place", err);
  }
  w.temp_path.clear();  // it is the destination now
  // The new file is in place; only its directory entry may not be durable yet.
  if (w.options.sync) detail::sync_parent_directory(w.path);
}

void Writer::commit() {
  finish();
  rename_into_place();
}

void Writer::abandon() noexcept { impl_->discard(); }

}  // namespace tensormap
