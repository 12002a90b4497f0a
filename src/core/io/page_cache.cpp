// The page cache under mapped checkpoints: see tensormap/page_cache.h, and the mapping
// helpers shared with Mapping (page_cache_detail.h).
#include "tensormap/page_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "io/page_cache_detail.h"
#include "io/posix_io.h"
#include "io/unique_fd.h"
#include "tensormap/error.h"

namespace tensormap {

uint64_t page_size() {
  static const auto size = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

bool own_mappings_fit(size_t count) {
  long max_maps = 65530;  // the kernel's default
  if (FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r")) {
    if (std::fscanf(f, "%ld", &max_maps) != 1) max_maps = 65530;
    std::fclose(f);
  }
  return count <= static_cast<size_t>(std::max(0L, max_maps)) / 4;
}

std::string fault_prone_filesystem(const std::string& path) {
  struct statfs fs {};
  if (::statfs(path.c_str(), &fs) != 0) return "";
  const char* name = detail::fault_prone_filesystem_type(static_cast<uint64_t>(static_cast<uint32_t>(fs.f_type)));
  return name ? name : "";
}

}  // namespace tensormap

namespace tensormap::detail {

// A page table spans 2 MiB: the size of the largest page-cache folio, mapped with one
// entry only where the mapping's address is congruent to the file offset modulo it.
constexpr uint64_t kTableSpan = uint64_t{2} << 20;

void* map_aligned(int fd, uint64_t begin, uint64_t length, int prot) {
  const size_t reserved = static_cast<size_t>(length + kTableSpan);
  void* reserve = ::mmap(nullptr, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) return MAP_FAILED;
  const auto low = reinterpret_cast<uint64_t>(reserve);
  const uint64_t at = low + ((begin % kTableSpan) + kTableSpan - (low % kTableSpan)) % kTableSpan;
  void* start = ::mmap(reinterpret_cast<void*>(at), static_cast<size_t>(length), prot,
                       MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, static_cast<off_t>(begin));
  if (start == MAP_FAILED) {
    const int err = errno;
    ::munmap(reserve, reserved);
    errno = err;
    return MAP_FAILED;
  }
  if (at > low) ::munmap(reserve, static_cast<size_t>(at - low));
  const uint64_t tail = at + length;
  if (low + reserved > tail) ::munmap(reinterpret_cast<void*>(tail), static_cast<size_t>(low + reserved - tail));
  return start;
}

bool advise_huge_pages(void* begin, uint64_t length) {
  // Advisory: EINVAL where the kernel has no transparent huge pages; the mapping then
  // works at 4 KiB as before. Pages read in later come in 2 MiB folios where the
  // filesystem's page cache has large folios.
  if (length < kTableSpan) return false;
  return ::madvise(begin, static_cast<size_t>(length), MADV_HUGEPAGE) == 0;
}

namespace {

struct SmapsSum {
  uint64_t rss_kib = 0, pmd_kib = 0;
};

// Rss and FilePmdMapped summed over the mappings in /proc/self/smaps that `select` takes
// (given the mapping's start address and its path field, "" for none).
template <class Select>
SmapsSum sum_smaps(Select select) {
  SmapsSum sum;
  FILE* f = std::fopen("/proc/self/smaps", "r");
  if (!f) return sum;
  char line[4096 + 256];
  bool inside = false;
  while (std::fgets(line, sizeof line, f)) {
    unsigned long long low = 0, high = 0;
    int name_at = 0;
    if (std::sscanf(line, "%llx-%llx %*s %*s %*s %*s %n", &low, &high, &name_at) == 2 && name_at > 0) {
      std::string name = line + name_at;
      while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
      inside = select(static_cast<uint64_t>(low), name);
    } else if (inside && std::strncmp(line, "Rss:", 4) == 0) {
      sum.rss_kib += std::strtoull(line + 4, nullptr, 10);
    } else if (inside && std::strncmp(line, "FilePmdMapped:", 14) == 0) {
      sum.pmd_kib += std::strtoull(line + 14, nullptr, 10);
    }
  }
  std::fclose(f);
  return sum;
}

}  // namespace

const char* fault_prone_filesystem_type(uint64_t magic) {
  // The magic numbers of linux/magic.h and of the filesystems' own sources.
  switch (magic) {
    case 0x6969: return "NFS";
    case 0x517B:
    case 0xFF534D42:
    case 0xFE534D42: return "SMB/CIFS";
    case 0x65735546: return "FUSE";  // sshfs, s3fs, gcsfuse, virtiofs, GlusterFS...
    case 0x01021997: return "9p";
    case 0x00C36400: return "Ceph";
    case 0x5346414F:
    case 0x6B414653: return "AFS";
    case 0x73757245: return "Coda";
    case 0x0BD00BD0: return "Lustre";
    case 0x01161970: return "GFS2";
    case 0x7461636F: return "OCFS2";
    case 0x20030528: return "OrangeFS";
    default: return nullptr;
  }
}

}  // namespace tensormap::detail

namespace tensormap {

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 5.19; older C libraries lack the name
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif

HugePageSupport huge_page_support() {
  static const HugePageSupport support = [] {
    HugePageSupport s;
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
      char text[128] = {};
      if (std::fgets(text, sizeof text, f)) {
        const char* open = std::strchr(text, '[');
        const char* close = open ? std::strchr(open, ']') : nullptr;
        if (open && close) s.thp_mode.assign(open + 1, close);
      }
      std::fclose(f);
    }
    // A 2 MiB private read-only mapping of any regular file takes the advice or not; a
    // file shorter than that still gives the answer (nothing is read).
    const detail::UniqueFd fd(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
    if (fd) {
      void* map = ::mmap(nullptr, 4 << 20, PROT_READ, MAP_PRIVATE | MAP_NORESERVE, fd.get(), 0);
      if (map != MAP_FAILED) {
        auto* aligned =
            reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(map) + (2 << 20) - 1) & ~uintptr_t{(2 << 20) - 1});
        s.madvise_hugepage = ::madvise(aligned, 2 << 20, MADV_HUGEPAGE) == 0;
        // EINVAL: no collapse of file pages; anything else (EAGAIN, ENOMEM, EFAULT past
        // the end of a small file) means the kernel knows the call for this mapping.
        s.collapse = s.madvise_hugepage && (::madvise(aligned, 2 << 20, MADV_COLLAPSE) == 0 || errno != EINVAL);
        ::munmap(map, 4 << 20);
      }
    }
    return s;
  }();
  return support;
}

double huge_mapped_share(const std::string& path) {
  char resolved[PATH_MAX];
  const std::string name = ::realpath(path.c_str(), resolved) ? std::string(resolved) : path;
  const auto sum = detail::sum_smaps([&](uint64_t, const std::string& mapped) { return mapped == name; });
  return sum.rss_kib == 0 ? 0.0 : static_cast<double>(sum.pmd_kib) / static_cast<double>(sum.rss_kib);
}

namespace {

// The share of [base, base + size) mapped with 2 MiB entries, of the file's size.
double mapped_share(const void* base, uint64_t size) {
  const auto at = reinterpret_cast<uint64_t>(base);
  const auto sum = detail::sum_smaps([&](uint64_t low, const std::string&) { return low >= at && low < at + size; });
  return size == 0 ? 1.0 : std::min(1.0, static_cast<double>(sum.pmd_kib) * 1024.0 / static_cast<double>(size));
}

// Faults in every page of the mapping for reading: MADV_POPULATE_READ, or one read a page
// on kernels before 5.14. A page past the end of a file that shrank meanwhile gives EFAULT
// rather than SIGBUS with the former; the latter is only reached on old kernels.
bool populate(unsigned char* base, uint64_t size) {
  int rc;
  do {
    rc = ::madvise(base, static_cast<size_t>(size), MADV_POPULATE_READ);
  } while (rc != 0 && (errno == EINTR || errno == EAGAIN));
  if (rc == 0) return true;
  if (errno != EINVAL) return false;
  volatile unsigned char sink = 0;
  for (uint64_t i = 0; i < size; i += page_size()) sink = sink + base[i];
  return true;
}

}  // namespace

WarmReport warm_page_cache(const std::string& path) {
  WarmReport report;
  const detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd) detail::throw_io(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) detail::throw_io(path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) {
    throw Error(ErrorKind::Io,
                path + (S_ISDIR(st.st_mode) ? ": is a directory, not a file" : ": is not a regular file"));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  auto map = [&] {
    void* base = size == 0 ? nullptr : detail::map_aligned(fd.get(), 0, size, PROT_READ);
    if (base == MAP_FAILED) detail::throw_io(path, "cannot map the file", errno);
    if (base) detail::advise_huge_pages(base, size);
    return static_cast<unsigned char*>(base);
  };
  unsigned char* base = map();
  if (!base) {
    report.share_before = report.share_after = report.cached_before = 1;
    report.method = "none: the file is empty";
    return report;
  }
  {
    const uint64_t pages = (size + page_size() - 1) / page_size();
    std::vector<unsigned char> resident(static_cast<size_t>(pages));
    uint64_t cached = 0;
    if (::mincore(base, static_cast<size_t>(size), resident.data()) == 0) {
      for (unsigned char r : resident) cached += r & 1;
    }
    report.cached_before = static_cast<double>(cached) / static_cast<double>(pages);
  }
  auto finish = [&](const std::string& method) {
    report.method = method;
    ::munmap(base, static_cast<size_t>(size));
    return report;
  };
  if (!populate(base, size)) {
    const int err = errno;
    ::munmap(base, static_cast<size_t>(size));
    detail::throw_io(path, "cannot read the file in", err);
  }
  // Whole 2 MiB blocks only: the file's last, partial one is never mapped with one entry.
  const uint64_t whole = size & ~((uint64_t{2} << 20) - 1);
  const double full = whole == 0 ? 1.0 : static_cast<double>(whole) / static_cast<double>(size);
  report.share_before = report.share_after = mapped_share(base, size);
  if (report.share_before >= 0.9 * full) return finish("already");
  const HugePageSupport support = huge_page_support();
  if (!support.madvise_hugepage || support.thp_mode == "never" || support.thp_mode.empty()) {
    return finish("none: the kernel maps no file page with 2 MiB entries (transparent huge pages: " +
                  (support.thp_mode.empty() ? std::string("absent") : support.thp_mode) + ")");
  }
  if (::madvise(base, static_cast<size_t>(size), MADV_COLLAPSE) == 0) {
    populate(base, size);
    report.share_after = mapped_share(base, size);
    if (report.share_after >= 0.9 * full) return finish("collapse");
  }
  // Read again: drop the clean pages no process maps (ours first), then fault them in
  // through the advised mapping, in 2 MiB folios.
  ::munmap(base, static_cast<size_t>(size));
  (void)::fdatasync(fd.get());  // dirty pages are not dropped: written out first
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  base = map();
  populate(base, size);
  report.share_after = mapped_share(base, size);
  return finish("reread");
}

}  // namespace tensormap

namespace tensormap {

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace {

// The whole pages inside [begin, begin + size), as [first, last).
std::pair<uintptr_t, uintptr_t> whole_pages(const void* begin, size_t size) {
  const uintptr_t page = page_size();
  const auto at = reinterpret_cast<uintptr_t>(begin);
  return {(at + page - 1) & ~(page - 1), (at + size) & ~(page - 1)};
}

}  // namespace

void populate_for_write(void* begin, size_t size) {
  const auto [first, last] = whole_pages(begin, size);
  // Advisory: on kernels before 5.14 it fails with EINVAL and the first touch faults instead.
  if (last > first) (void)::madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
}

void read_ahead(const void* begin, size_t size) {
  const uintptr_t page = page_size();
  const auto first = reinterpret_cast<uintptr_t>(begin) & ~(page - 1);
  const auto last = reinterpret_cast<uintptr_t>(begin) + size;
  if (last > first) (void)::madvise(reinterpret_cast<void*>(first), last - first, MADV_WILLNEED);
}

int populate_for_read(const void* begin, size_t size) {
  if (size == 0) return 0;
  int rc;
  do {
    rc = ::madvise(const_cast<void*>(begin), size, MADV_POPULATE_READ);
  } while (rc != 0 && (errno == EINTR || errno == EAGAIN));
  return rc == 0 ? 0 : errno;
}

void* allocate_huge(size_t size) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t page = static_cast<size_t>(page_size());
  if (size == 0) return nullptr;
  const size_t length = (size + page - 1) & ~(page - 1);
  // A reservation one huge page longer, cut down to a 2 MiB-aligned start.
  void* reserve = ::mmap(nullptr, length + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (reserve == MAP_FAILED) return nullptr;
  const auto low = reinterpret_cast<uintptr_t>(reserve);
  const uintptr_t start = (low + kHuge - 1) & ~uintptr_t{kHuge - 1};
  if (start > low) ::munmap(reserve, start - low);
  const uintptr_t end = low + length + kHuge;
  if (end > start + length) ::munmap(reinterpret_cast<void*>(start + length), end - (start + length));
  void* memory = reinterpret_cast<void*>(start);
  (void)::madvise(memory, length, MADV_HUGEPAGE);  // advisory: EINVAL without THP
  populate_for_write(memory, length);
  return memory;
}

void free_huge(void* memory, size_t size) noexcept {
  if (!memory || size == 0) return;
  const size_t page = static_cast<size_t>(page_size());
  ::munmap(memory, (size + page - 1) & ~(page - 1));
}

}  // namespace tensormap
