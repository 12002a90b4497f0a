// tensormap::File: a private, copy-on-write mapping of a validated tensormap file.
#include "tensormap/file.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include "format/detect.h"
#include "format/header.h"
#include "format/names.h"
#include "io/mapping.h"
#include "io/posix_io.h"
#include "remote/remote_object.h"
#include "tensormap/format.h"
#include "tensormap/interrupt.h"
#include "tensormap/remote.h"
#include "util/bytes.h"

namespace tensormap {

// A file is mapped (a local file), or read by ranges (a file at a URL: no mapping, and
// its header is kept in `header_bytes`). Every read goes through `source`.
struct File::Impl {
  explicit Impl(std::shared_ptr<const detail::Mapping> m)
      : mapping(m), source(m), base(mapping->base()), size(mapping->size()) {}
  explicit Impl(std::shared_ptr<const detail::RemoteObject> r)
      : source(r), remote(std::move(r)), size(remote->size()) {}
  std::shared_ptr<const detail::Mapping> mapping;  // null for a file at a URL
  std::shared_ptr<const detail::ByteSource> source;
  std::shared_ptr<const detail::RemoteObject> remote;
  unsigned char* base = nullptr;
  uint64_t size;
  std::vector<unsigned char> header_bytes;
  detail::ParsedHeader header;

  // The mapping; a file at a URL has none to give `what` from.
  const detail::Mapping& mapped(const std::string& what) const {
    if (!mapping) {
      throw Error(ErrorKind::InvalidArgument,
                  source->name() + ": " + what +
                      " needs the file mapped, and a file at a URL is read, not mapped: read it (File::read), or "
                      "load in copy mode (LoadMode::Auto does)");
    }
    return *mapping;
  }
};

File::File(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

File File::open(const std::string& path) {
  if (is_url(path)) {
    return detail::open_file(std::make_shared<const detail::RemoteObject>(
        std::make_shared<const detail::Fetcher>(RemoteOptions::from_environment()), path));
  }
  return detail::open_file(std::make_shared<const detail::Mapping>(path));
}

File detail::open_file(std::shared_ptr<const Mapping> mapping) {
  auto impl = std::make_shared<File::Impl>(std::move(mapping));
  const Mapping& m = *impl->mapping;
  if (detect(m.base(), static_cast<size_t>(std::min<uint64_t>(m.size(), 64)), m.size()) == Detected::Safetensors) {
    impl->header = validate_safetensors(impl->base, impl->size, m.path());
  } else {
    impl->header = validate_header(impl->base, impl->size, m.path());
  }
  return File(std::move(impl));
}

// The header is fetched whole (one request more where it is larger than the first
// request's bytes) and validated as a mapped file's is: the rules read only the header.
File detail::open_file(std::shared_ptr<const RemoteObject> object) {
  auto impl = std::make_shared<File::Impl>(std::move(object));
  const RemoteObject& r = *impl->remote;
  const auto& head = r.head();
  const bool safetensors = detect(head.data(), std::min<size_t>(head.size(), 64), r.size()) == Detected::Safetensors;
  uint64_t wanted = head.size();
  if (safetensors && head.size() >= 8) {
    wanted = std::min(r.size(), 8 + std::min(load_le<uint64_t>(head.data()), kMaxSafetensorsHeader));
  } else if (!safetensors && head.size() >= 24) {
    wanted = std::min(r.size(), std::min(load_le<uint64_t>(head.data() + 16), format::kMaxHeaderSize));
  }
  impl->header_bytes.resize(static_cast<size_t>(std::max<uint64_t>(wanted, head.size())));
  r.read(0, impl->header_bytes.data(), impl->header_bytes.size(), "the header");
  impl->header = safetensors ? validate_safetensors(impl->header_bytes.data(), r.size(), r.name())
                             : validate_header(impl->header_bytes.data(), r.size(), r.name());
  return File(std::move(impl));
}

const std::string& File::path() const { return impl_->source->name(); }
Format File::format() const { return impl_->header.format; }
bool File::has_checksums() const { return impl_->header.format == Format::Tensormap; }
uint16_t File::major_version() const { return impl_->header.major; }
uint16_t File::minor_version() const { return impl_->header.minor; }
uint64_t File::alignment() const { return impl_->header.alignment; }
uint64_t File::header_size() const { return impl_->header.header_size; }
uint64_t File::file_size() const { return impl_->size; }
const std::vector<TensorEntry>& File::tensors() const { return impl_->header.tensors; }

const TensorEntry* File::find(std::string_view name) const {
  const auto it = impl_->header.index.find(name);
  return it == impl_->header.index.end() ? nullptr : &impl_->header.tensors[it->second];
}

const TensorEntry& File::at(std::string_view name) const {
  if (const TensorEntry* e = find(name)) return *e;
  throw Error(ErrorKind::NotFound, path() + ": no tensor named " + detail::quoted(name) + " (the file has " +
                                       std::to_string(impl_->header.tensors.size()) + " tensors)");
}

const std::vector<std::pair<std::string_view, std::string_view>>& File::metadata() const {
  return impl_->header.metadata;
}

std::optional<std::string_view> File::metadata_value(std::string_view key) const {
  for (const auto& [k, v] : impl_->header.metadata) {
    if (k == key) return v;
  }
  return std::nullopt;
}

ByteView File::bytes(const TensorEntry& entry) const {
  impl_->mapped("File::bytes");
  return {reinterpret_cast<const std::byte*>(impl_->base + entry.offset), entry.byte_length};
}

void* File::cow_data(const TensorEntry& entry) const {
  return impl_->mapped("a view of tensor " + detail::quoted(entry.name)).cow_base() + entry.offset;
}

std::shared_ptr<void> File::map_region(const TensorEntry& entry, uint64_t offset, uint64_t size) const {
  if (offset > entry.byte_length || size > entry.byte_length - offset) {
    throw Error(ErrorKind::InvalidArgument, path() + ": region past the end of tensor " + detail::quoted(entry.name));
  }
  return impl_->mapped("File::map_region")
      .map_range(entry.offset + offset, size, "tensor " + detail::quoted(entry.name));
}

std::shared_ptr<const void> File::keep_alive() const { return impl_; }

void File::read(const TensorEntry& entry, uint64_t offset, void* dest, uint64_t size) const {
  if (offset > entry.byte_length || size > entry.byte_length - offset) {
    throw Error(ErrorKind::InvalidArgument, path() + ": read past the end of tensor " + detail::quoted(entry.name));
  }
  impl_->source->read(entry.offset + offset, dest, size, "tensor " + detail::quoted(entry.name));
}

Error File::corrupted(const TensorEntry& entry, uint64_t computed) const {
  return Error(ErrorKind::ChecksumMismatch, path() + ": tensor " + detail::quoted(entry.name) +
                                                " is corrupted: its bytes hash to " + detail::hex64(computed) +
                                                " but the header records " + detail::hex64(entry.checksum));
}

namespace {

// Hashes the bytes of `dest` a second thread has read so far, on this thread, while that
// thread goes on reading: the checksum of a large tensor costs a second core's time, not
// the load's. `read_upto` grows as pieces land; `failed` stops the hashing early.
class PipelinedHash {
 public:
  PipelinedHash(const unsigned char* data, uint64_t size, const std::string& path) : data_(data), size_(size) {
    if (!state_) throw Error(ErrorKind::Io, path + ": cannot allocate a hash state");
    XXH3_64bits_reset(state_.get());
    worker_ = std::thread([this] { run(); });
  }
  ~PipelinedHash() { stop(); }
  PipelinedHash(const PipelinedHash&) = delete;
  PipelinedHash& operator=(const PipelinedHash&) = delete;

  // Bytes [0, upto) of the tensor are in place.
  void landed(uint64_t upto) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      read_upto_ = upto;
    }
    more_.notify_one();
  }
  // Waits for the hash of all `size` bytes.
  uint64_t digest() {
    worker_.join();
    return XXH3_64bits_digest(state_.get());
  }
  // Stops the hashing (a read failed); safe to call twice.
  void stop() noexcept {
    if (!worker_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopped_ = true;
    }
    more_.notify_one();
    worker_.join();
  }

 private:
  void run() {
    uint64_t hashed = 0;
    while (hashed < size_) {
      uint64_t upto;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        more_.wait(lock, [&] { return stopped_ || read_upto_ > hashed; });
        if (stopped_) return;
        upto = read_upto_;
      }
      XXH3_64bits_update(state_.get(), data_ + hashed, static_cast<size_t>(upto - hashed));
      hashed = upto;
    }
  }

  const unsigned char* data_;
  uint64_t size_;
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> state_{XXH3_createState(), XXH3_freeState};
  std::mutex mutex_;
  std::condition_variable more_;
  uint64_t read_upto_ = 0;
  bool stopped_ = false;
  std::thread worker_;
};

}  // namespace

void File::read_checked(const TensorEntry& entry, void* dest) const {
  if (!has_checksums()) {
    read(entry, 0, dest, entry.byte_length);
    return;
  }
  const std::string label = "tensor " + detail::quoted(entry.name);
  auto* out = static_cast<unsigned char*>(dest);
  if (impl_->remote) {  // hashed in order as the bytes land, by the threads that land them
    std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> state(XXH3_createState(), XXH3_freeState);
    if (!state) throw Error(ErrorKind::Io, path() + ": cannot allocate a hash state");
    XXH3_64bits_reset(state.get());
    uint64_t hashed = 0;
    impl_->remote->read(entry.offset, out, entry.byte_length, label, [&](const unsigned char* data, uint64_t n) {
      XXH3_64bits_update(state.get(), data, static_cast<size_t>(n));
      hashed += n;
    });
    if (hashed != entry.byte_length) {  // never: every byte has landed once the read returns
      throw Error(ErrorKind::Io, path() + ": tensor " + detail::quoted(entry.name) + ": only " +
                                     std::to_string(hashed) + " of its " + std::to_string(entry.byte_length) +
                                     " bytes were hashed");
    }
    const uint64_t computed = XXH3_64bits_digest(state.get());
    if (computed != entry.checksum) throw corrupted(entry, computed);
    return;
  }
  // A large tensor: read on this thread, hashed on another as the pieces land.
  constexpr uint64_t kPipelined = 8 << 20, kLanding = 1 << 20;
  if (entry.byte_length >= kPipelined && std::thread::hardware_concurrency() > 1) {
    PipelinedHash hash(out, entry.byte_length, path());
    for (uint64_t at = 0; at < entry.byte_length; at += kLanding) {
      const uint64_t n = std::min(kLanding, entry.byte_length - at);
      impl_->source->read(entry.offset + at, out + at, n, label);  // a failure stops the hash first
      hash.landed(at + n);
    }
    const uint64_t computed = hash.digest();
    if (computed != entry.checksum) throw corrupted(entry, computed);
    return;
  }
  constexpr uint64_t kPiece = 256 << 10;  // hashed while still in the CPU's cache
  XXH3_state_t* state = XXH3_createState();
  if (!state) throw Error(ErrorKind::Io, path() + ": cannot allocate a hash state");
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> owner(state, XXH3_freeState);
  XXH3_64bits_reset(state);
  for (uint64_t at = 0; at < entry.byte_length; at += kPiece) {
    const uint64_t n = std::min(kPiece, entry.byte_length - at);
    impl_->source->read(entry.offset + at, out + at, n, label);
    XXH3_64bits_update(state, out + at, n);
  }
  const uint64_t computed = XXH3_64bits_digest(state);
  if (computed != entry.checksum) throw corrupted(entry, computed);
}

void File::read_rows(const TensorEntry& entry, uint64_t offset, uint64_t stride, uint64_t row_bytes, uint64_t rows,
                     void* dest) const {
  if (rows == 0 || row_bytes == 0) return;
  const auto last = detail::checked_mul(rows - 1, stride);
  const auto start = last ? detail::checked_add(offset, *last) : std::nullopt;
  const auto end = start ? detail::checked_add(*start, row_bytes) : std::nullopt;
  if (!end || *end > entry.byte_length || row_bytes > stride) {
    throw Error(ErrorKind::InvalidArgument, path() + ": rows run past the end of tensor " + detail::quoted(entry.name));
  }
  // Read-ahead would pull the gaps between rows into the page cache too: off meanwhile,
  // and back on however the reads end.
  struct ReadAheadOff {
    const detail::Mapping* mapping;
    ~ReadAheadOff() {
      if (mapping) mapping->set_read_ahead(true);
    }
  } guard{stride - row_bytes >= detail::page_size() ? impl_->mapping.get() : nullptr};
  if (guard.mapping) guard.mapping->set_read_ahead(false);
  const std::string what = "tensor " + detail::quoted(entry.name);  // once, not per row
  auto* out = static_cast<unsigned char*>(dest);
  if (impl_->remote) {  // every row at once, over the connections
    std::vector<detail::Fetcher::Range> ranges;
    ranges.reserve(static_cast<size_t>(rows));
    for (uint64_t r = 0; r < rows; ++r)
      ranges.push_back({entry.offset + offset + r * stride, row_bytes, out + r * row_bytes});
    impl_->remote->read_ranges(ranges, what);
    return;
  }
  for (uint64_t r = 0; r < rows; ++r) {
    impl_->source->read(entry.offset + offset + r * stride, out + r * row_bytes, row_bytes, what);
  }
}

// The page-cache operations: nothing to do for a file at a URL, none of whose bytes are
// cached here.
void File::prefetch(const TensorEntry& entry) const {
  if (impl_->mapping) impl_->mapping->prefetch(entry.offset, entry.offset + entry.byte_length);
}

double File::cached_fraction(const TensorEntry& entry) const {
  return impl_->mapping ? impl_->mapping->cached_fraction(entry.offset, entry.offset + entry.byte_length) : 0.0;
}

void File::drop_cache(const TensorEntry& entry) const {
  if (impl_->mapping) impl_->mapping->drop_cache(entry.offset, entry.offset + entry.byte_length);
}

void File::evict(const TensorEntry& entry) const {
  if (!impl_->mapping) return;
  // A tensormap tensor owns its padding, so its region runs to the padded end.
  const uint64_t end = entry.offset + entry.byte_length;
  const uint64_t region_end =
      impl_->header.format == Format::Tensormap ? *format::round_up(end, impl_->header.alignment) : end;
  impl_->mapping->release(entry.offset, region_end, "tensor " + detail::quoted(entry.name));
}

std::vector<Error> File::find_corruption() const {
  std::vector<Error> problems;
  if (!has_checksums()) return problems;  // safetensors: open() checked everything there is
  const auto& h = impl_->header;
  const detail::ByteSource& m = *impl_->source;
  // A file at a URL is read in pieces that keep every connection busy.
  const uint64_t kChunk =
      impl_->remote ? impl_->remote->fetcher().options().connections * impl_->remote->fetcher().options().chunk_bytes
                    : uint64_t{4} << 20;
  std::vector<unsigned char> buffer(kChunk);
  // Reads [begin, end) in chunks with pread; `sink` sees each chunk.
  auto scan = [&](uint64_t begin, uint64_t end, const std::string& what, auto&& sink) {
    for (uint64_t at = begin; at < end; at += kChunk) {
      detail::check_interrupt();
      const uint64_t n = std::min(kChunk, end - at);
      m.read(at, buffer.data(), n, what);
      sink(buffer.data(), n, at);
    }
  };
  auto check_padding = [&](uint64_t begin, uint64_t end, const std::string& after) {
    bool reported = false;
    scan(begin, end, "the padding after " + after, [&](const unsigned char* p, uint64_t n, uint64_t at) {
      for (uint64_t i = 0; i < n && !reported; ++i) {
        if (p[i] != 0) {
          problems.emplace_back(
              ErrorKind::NonZeroPadding,
              m.name() + ": padding after " + after + " has a non-zero byte at offset " + std::to_string(at + i));
          reported = true;
        }
      }
    });
  };
  check_padding(h.header_size, *format::round_up(h.header_size, h.alignment), "the header");
  XXH3_state_t* state = XXH3_createState();
  if (!state) throw Error(ErrorKind::Io, m.name() + ": cannot allocate a hash state");
  try {
    for (const TensorEntry& e : h.tensors) {
      if (e.alias_of) continue;  // its bytes, checksum and padding are its target's (rule 17)
      const std::string label = "tensor " + detail::quoted(e.name);
      XXH3_64bits_reset(state);
      scan(e.offset, e.offset + e.byte_length, label,
           [&](const unsigned char* p, uint64_t n, uint64_t) { XXH3_64bits_update(state, p, n); });
      const uint64_t computed = XXH3_64bits_digest(state);
      if (computed != e.checksum) {
        problems.push_back(corrupted(e, computed));
      }
      const uint64_t end = e.offset + e.byte_length;
      check_padding(end, *format::round_up(end, h.alignment), label);
    }
  } catch (...) {
    XXH3_freeState(state);
    throw;
  }
  XXH3_freeState(state);
  return problems;
}

void File::verify() const {
  auto problems = find_corruption();
  if (!problems.empty()) throw problems.front();
}

}  // namespace tensormap
