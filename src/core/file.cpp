// tensormap::File: a private, copy-on-write mapping of a validated tensormap file.
#include "tensormap/file.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <boost/interprocess/file_mapping.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <cerrno>
#include <cstring>

#include "header.h"
#include "names.h"
#include "posix_io.h"
#include "tensormap/format.h"

namespace tensormap {

namespace bip = boost::interprocess;

struct File::Impl {
  std::string path;
  bip::mapped_region region;
  unsigned char* base = nullptr;
  uint64_t size = 0;
  detail::ParsedHeader header;
};

uint64_t TensorEntry::element_count() const {
  uint64_t n = 1;
  for (unsigned d = 0; d < rank; ++d) n *= dims[d];  // validated: cannot overflow
  return n;
}

File::File(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

File File::open(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) detail::throw_io(path, "cannot open", errno);
  if (S_ISDIR(st.st_mode)) throw Error(ErrorKind::Io, path + ": is a directory, not a file");
  if (!S_ISREG(st.st_mode)) throw Error(ErrorKind::Io, path + ": is not a regular file");
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < format::kMinHeaderSize) {
    // Validation reports it; an empty file cannot even be mapped.
    std::vector<unsigned char> small(format::kMinHeaderSize, 0);
    detail::validate_header(small.data(), size, path);
  }

  auto impl = std::make_shared<Impl>();
  impl->path = path;
  try {
    bip::file_mapping file(path.c_str(), bip::read_only);
    impl->region = bip::mapped_region(file, bip::copy_on_write, 0, static_cast<size_t>(size));
  } catch (const bip::interprocess_exception& e) {
    throw Error(ErrorKind::Io, path + ": cannot map the file: " + e.what());
  }
  impl->base = static_cast<unsigned char*>(impl->region.get_address());
  impl->size = size;
  impl->header = detail::validate_header(impl->base, size, path);
  return File(std::move(impl));
}

const std::string& File::path() const { return impl_->path; }
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
  throw Error(ErrorKind::NotFound,
              impl_->path + ": no tensor named " + detail::quoted(name) + " (the file has " +
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
  return {reinterpret_cast<const std::byte*>(impl_->base + entry.offset), entry.byte_length};
}

void* File::cow_data(const TensorEntry& entry) const { return impl_->base + entry.offset; }

std::shared_ptr<const void> File::keep_alive() const { return impl_; }

namespace {

uint64_t page_size() {
  static const auto size = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

// The whole pages of [begin, end) that belong to no other tensor: when the alignment is
// smaller than a page, neighbours may share the first and last page.
std::pair<uint64_t, uint64_t> own_pages(uint64_t begin, uint64_t end, uint64_t alignment,
                                        uint64_t file_size) {
  const uint64_t page = page_size();
  if (alignment >= page) {
    return {begin, std::min(file_size, (end + page - 1) & ~(page - 1))};
  }
  return {(begin + page - 1) & ~(page - 1), end & ~(page - 1)};
}

}  // namespace

void File::prefetch(const TensorEntry& entry) const {
  const uint64_t page = page_size();
  const uint64_t begin = entry.offset & ~(page - 1);
  const uint64_t end = entry.offset + entry.byte_length;
  if (end > begin) ::madvise(impl_->base + begin, end - begin, MADV_WILLNEED);  // advisory
}

void File::release_pages(const TensorEntry& entry) const {
  const auto [begin, end] = own_pages(entry.offset, entry.offset + entry.byte_length,
                                      impl_->header.alignment, impl_->size);
  if (end <= begin) return;
  if (::madvise(impl_->base + begin, end - begin, MADV_DONTNEED) != 0) {
    detail::throw_io(impl_->path, "madvise(MADV_DONTNEED) on tensor " +
                                      detail::quoted(entry.name) + " failed", errno);
  }
}

namespace {

// Offset of the first non-zero byte in [p, p + n), or n.
uint64_t first_non_zero(const unsigned char* p, uint64_t n) {
  static const unsigned char kZeros[4096] = {};
  uint64_t i = 0;
  while (i < n) {
    const uint64_t chunk = std::min<uint64_t>(n - i, sizeof kZeros);
    if (std::memcmp(p + i, kZeros, chunk) != 0) {
      for (uint64_t j = 0; j < chunk; ++j) {
        if (p[i + j] != 0) return i + j;
      }
    }
    i += chunk;
  }
  return n;
}

}  // namespace

std::vector<Error> File::find_corruption() const {
  std::vector<Error> problems;
  const auto& h = impl_->header;
  const unsigned char* base = impl_->base;
  auto check_padding = [&](uint64_t begin, uint64_t end, const std::string& after) {
    const uint64_t at = first_non_zero(base + begin, end - begin);
    if (at != end - begin) {
      problems.emplace_back(ErrorKind::NonZeroPadding,
                            impl_->path + ": padding after " + after + " has a non-zero byte at offset " +
                                std::to_string(begin + at));
    }
  };
  check_padding(h.header_size, *format::round_up(h.header_size, h.alignment), "the header");
  for (const TensorEntry& e : h.tensors) {
    const uint64_t computed = XXH3_64bits(base + e.offset, e.byte_length);
    if (computed != e.checksum) {
      problems.emplace_back(ErrorKind::ChecksumMismatch,
                            impl_->path + ": tensor " + detail::quoted(e.name) +
                                " is corrupted: its bytes hash to " + detail::hex64(computed) +
                                " but the header records " + detail::hex64(e.checksum));
    }
    const uint64_t end = e.offset + e.byte_length;
    check_padding(end, *format::round_up(end, h.alignment), "tensor " + detail::quoted(e.name));
  }
  return problems;
}

void File::verify() const {
  auto problems = find_corruption();
  if (!problems.empty()) throw problems.front();
}

}  // namespace tensormap
