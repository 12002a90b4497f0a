// A private, copy-on-write mapping of a whole file.
#include "io/mapping.h"

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
#include "tensormap/error.h"

namespace tensormap::detail {

Mapping::Mapping(const std::string& path) : path_(path) {
  // One descriptor for everything: the checks, the mapping and every pread see the same
  // file even if the path is replaced meanwhile (as every tensormap writer replaces it).
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
  fd_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd_) throw_io(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) throw_io(path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) {
    throw Error(ErrorKind::Io,
                path + (S_ISDIR(st.st_mode) ? ": is a directory, not a file" : ": is not a regular file"));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) return;  // nothing to map; readers report the file as too small
  // MAP_NORESERVE: no commit charge for the size, only for pages written (see mapping.h).
  // At a 2 MiB-aligned address, so that 2 MiB folios of the page cache map with one entry.
  void* base = map_aligned(fd_.get(), 0, size_, PROT_READ | PROT_WRITE);
  if (base == MAP_FAILED && errno == ENOMEM) {
    // Strict accounting charges a private writable mapping its whole size; a read-only
    // one costs nothing, and serves every reader but copy-on-write views.
    base = map_aligned(fd_.get(), 0, size_, PROT_READ);
    writable_ = false;
  }
  if (base == MAP_FAILED) throw_io(path, "cannot map the file", errno);
  base_ = static_cast<unsigned char*>(base);
  huge_ = advise_huge_pages(base_, size_);
}

Mapping::~Mapping() {
  if (base_) ::munmap(base_, static_cast<size_t>(size_));
}

unsigned char* Mapping::cow_base() const {
  if (writable_) return base_;
  throw Error(ErrorKind::Io,
              path_ +
                  ": the system accounts memory strictly (vm.overcommit_memory = 2) and refused a copy-on-write "
                  "mapping of this " +
                  std::to_string(size_) +
                  "-byte file, larger than what it may still commit "
                  "(CommitLimit in /proc/meminfo); the file opened read-only, so it can be inspected, verified, "
                  "converted and loaded in copy mode (LoadMode::Copy, which needs the memory), but not mapped into "
                  "writable tensors. Map mode needs vm.overcommit_memory 0 or 1, or more swap");
}

void Mapping::read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const {
  auto* out = static_cast<unsigned char*>(dest);
  uint64_t done = 0;
  while (done < size) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(size - done, uint64_t{1} << 30));
    const ssize_t n = ::pread(fd_.get(), out + done, chunk, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io(path_, "reading " + what + " failed", errno);
    }
    if (n == 0) {
      struct stat st {};
      const uint64_t now = ::fstat(fd_.get(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
      throw Error(ErrorKind::Truncated, path_ + ": " + what + " ends at " + std::to_string(offset + size) +
                                            " but the file shrank to " + std::to_string(now) +
                                            " bytes while it was open");
    }
    done += static_cast<uint64_t>(n);
  }
}

void Mapping::set_read_ahead(bool on) const {
  (void)::posix_fadvise(fd_.get(), 0, 0, on ? POSIX_FADV_NORMAL : POSIX_FADV_RANDOM);
}

std::shared_ptr<void> Mapping::map_range(uint64_t offset, uint64_t size, const std::string& what) const {
  if (offset > size_ || size > size_ - offset) {
    throw Error(ErrorKind::InvalidArgument, path_ + ": " + what + " at [" + std::to_string(offset) + ", +" +
                                                std::to_string(size) + ") runs past the end of the " +
                                                std::to_string(size_) + "-byte file");
  }
  if (size == 0) return std::shared_ptr<void>(base_ + offset, [](void*) {});  // nothing to read there
  const uint64_t begin = offset & ~(page_size() - 1);
  const uint64_t length = offset + size - begin;
  // At an address congruent to the offset modulo 2 MiB, as the whole-file mapping. Not
  // advised MADV_HUGEPAGE: these mappings exist to read no more than their range, and a
  // huge-page fault reads the whole 2 MiB around it.
  void* start = map_aligned(fd_.get(), begin, length, PROT_READ | PROT_WRITE);
  if (start == MAP_FAILED) throw_io(path_, "cannot map " + what, errno);
  return std::shared_ptr<void>(static_cast<unsigned char*>(start) + (offset - begin),
                               [start, length](void*) { ::munmap(start, static_cast<size_t>(length)); });
}

void Mapping::prefetch(uint64_t begin, uint64_t end) const {
  const uint64_t page = page_size();
  begin &= ~(page - 1);
  if (end > begin && base_) ::madvise(base_ + begin, end - begin, MADV_WILLNEED);
}

double Mapping::cached_fraction(uint64_t begin, uint64_t end) const {
  const uint64_t page = page_size();
  begin &= ~(page - 1);
  end = std::min(end, size_);
  if (end <= begin || !base_) return 1.0;
  const uint64_t pages = (end - begin + page - 1) / page;
  std::vector<unsigned char> resident(static_cast<size_t>(pages));
  if (::mincore(base_ + begin, end - begin, resident.data()) != 0) return 0.0;
  uint64_t cached = 0;
  for (unsigned char r : resident) cached += r & 1;
  return static_cast<double>(cached) / static_cast<double>(pages);
}

void Mapping::drop_cache(uint64_t begin, uint64_t end) const {
  // The page cache keeps files in folios of up to 2 MiB, and POSIX_FADV_DONTNEED drops
  // only folios wholly inside the range: a small tensor's folio, which holds the ends of
  // its neighbours too, would stay. So the range grows to 2 MiB boundaries.
  constexpr uint64_t kFolio = 2 << 20;
  begin &= ~(kFolio - 1);
  end = std::min(size_, end > size_ - kFolio ? size_ : (end + kFolio - 1) & ~(kFolio - 1));
  if (end > begin)
    (void)::posix_fadvise(fd_.get(), static_cast<off_t>(begin), static_cast<off_t>(end - begin), POSIX_FADV_DONTNEED);
}

void Mapping::release(uint64_t begin, uint64_t end, const std::string& what) const {
  const uint64_t page = page_size();
  begin = (begin + page - 1) & ~(page - 1);
  // The last partial page is whole if the file ends inside it.
  end = end >= size_ ? ((size_ + page - 1) & ~(page - 1)) : (end & ~(page - 1));
  if (end <= begin || !base_) return;
  if (::madvise(base_ + begin, end - begin, MADV_DONTNEED) != 0) {
    throw_io(path_, "madvise(MADV_DONTNEED) on " + what + " failed", errno);
  }
}

}  // namespace tensormap::detail
