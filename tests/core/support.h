// Helpers shared by the core tests: scratch directories, whole-file I/O, and patching a
// header in place while keeping its checksum right, so a test breaks exactly one rule.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/core.h"

namespace tensormap::testing {

// Built with AddressSanitizer: its allocator, redzones and quarantine distort memory and
// time figures, which the tests that measure them then skip or loosen.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

namespace fs = std::filesystem;

// A fresh directory removed with everything in it when the object dies.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("tensormap-test-" + std::to_string(rd()) + "-" + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  // Every entry of the directory, names only, sorted.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

// The file mapped at `address` in this process, from /proc/self/maps ("" for none).
inline std::string file_mapped_at(const void* address) {
  std::ifstream maps("/proc/self/maps");
  const auto a = reinterpret_cast<uintptr_t>(address);
  for (std::string line; std::getline(maps, line);) {
    unsigned long low = 0, high = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &low, &high) != 2 || a < low || a >= high) continue;
    const size_t slash = line.find('/');
    return slash == std::string::npos ? "" : line.substr(slash);
  }
  return "";
}

// Pages of `path` in the page cache, and all its pages.
inline std::pair<size_t, size_t> cached_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  const size_t size = static_cast<size_t>(::lseek(fd, 0, SEEK_END));
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in_core((size + page - 1) / page);
  ::mincore(map, size, in_core.data());
  ::munmap(map, size);
  ::close(fd);
  size_t cached = 0;
  for (unsigned char c : in_core) cached += c & 1;
  return {cached, in_core.size()};
}

// Asks the kernel to drop `path`'s clean pages from the page cache (a file written with
// fsync has none dirty); whether it did is for cached_pages to say.
inline bool evict_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  const bool asked = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0;
  ::close(fd);
  return asked;
}

inline std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), {});
}

inline void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
T get(const std::vector<unsigned char>& b, size_t at) {
  T v;
  std::memcpy(&v, b.data() + at, sizeof v);
  return v;
}

template <typename T>
void put(std::vector<unsigned char>& b, size_t at, T v) {
  std::memcpy(b.data() + at, &v, sizeof v);
}

// Recomputes the header checksum (spec section 6) after a patch.
inline void reseal(std::vector<unsigned char>& b) {
  const uint64_t h = get<uint64_t>(b, 16);
  put<uint64_t>(b, h - 8, XXH3_64bits(b.data(), h - 8));
}

// Writes `tensors` with bytes i*7+j (mod 256) for byte j of tensor i.
inline void write_pattern_file(const std::string& path, const std::vector<TensorSpec>& tensors,
                               WriterOptions options = {}) {
  options.sync = false;
  const auto w = open_writer(path, tensors, options);  // any format
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::vector<unsigned char> data(w->byte_length(i));
    for (size_t j = 0; j < data.size(); ++j) data[j] = static_cast<unsigned char>(i * 7 + j);
    w->write(data.data(), data.size());
  }
  w->commit();
}

// Pss and Rss (bytes) of process `pid`'s mappings of `path`, from /proc/<pid>/smaps:
// the file's own pages, whatever code pages of loaded libraries the process faults in.
inline std::pair<uint64_t, uint64_t> file_mapping_pss_rss(pid_t pid, const std::string& path) {
  std::ifstream smaps("/proc/" + std::to_string(pid) + "/smaps");
  std::string line;
  bool in_file = false;
  uint64_t pss = 0, rss = 0;
  while (std::getline(smaps, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') < line.find(' ')) {
      in_file = line.size() >= path.size() && line.compare(line.size() - path.size(), path.size(), path) == 0;
    } else if (in_file && line.rfind("Pss:", 0) == 0) {
      pss += std::stoull(line.substr(4)) * 1024;
    } else if (in_file && line.rfind("Rss:", 0) == 0) {
      rss += std::stoull(line.substr(4)) * 1024;
    }
  }
  return {pss, rss};
}

// The error kind File::open throws for `path`, or nothing if it opens.
inline std::optional<ErrorKind> open_error(const std::string& path) {
  try {
    File::open(path);
  } catch (const Error& e) {
    return e.kind();
  }
  return std::nullopt;
}

// Whether this kernel keeps files of `dir`'s filesystem in the page cache in 2 MiB folios
// that a mapping maps with one entry each: a file written in aligned 2 MiB pieces is
// mapped and read in, and /proc/self/smaps asked. Where not, `why` says so, for a skip.
inline bool page_cache_has_huge_folios(const std::string& dir, std::string& why) {
  const std::string path = dir + "/huge-folio-probe.bin";
  {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
      why = "cannot write " + path;
      return false;
    }
    std::vector<char> block(2 << 20, 7);
    bool ok = true;
    for (int i = 0; i < 4; ++i)
      ok = ok && ::pwrite(fd, block.data(), block.size(), static_cast<off_t>(i) * (2 << 20)) ==
                     static_cast<ssize_t>(block.size());
    ::close(fd);
    if (!ok) {
      why = "cannot write " + path;
      return false;
    }
  }
  const double share = tensormap::warm_page_cache(path).share_before;
  std::remove(path.c_str());
  if (share >= 0.9) return true;
  const tensormap::HugePageSupport s = tensormap::huge_page_support();
  why = "the page cache of this kernel does not map files of " + dir + " with 2 MiB pages (" +
        std::to_string(static_cast<int>(share * 100)) + "% of a file written in aligned 2 MiB pieces; " +
        "transparent huge pages: " + (s.thp_mode.empty() ? std::string("absent") : s.thp_mode) +
        "; large folios need e.g. XFS or ext4 on a recent kernel)";
  return false;
}

}  // namespace tensormap::testing
