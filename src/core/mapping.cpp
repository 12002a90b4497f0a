// A private, copy-on-write mapping of a whole file.
#include "mapping.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <vector>

#include "posix_io.h"
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



Mapping::Mapping(const std::string& path) : path_(path) {
  // One descriptor for everything: the checks, the mapping and every pread see the same
  // file even if the path is replaced meanwhile (as every tensormap writer replaces it).
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) throw_io(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    throw_io(path, "cannot stat", err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd_);
    throw Error(ErrorKind::Io, path + (S_ISDIR(st.st_mode) ? ": is a directory, not a file" : ": is not a regular file"));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) return;  // nothing to map; readers report the file as too small
  // MAP_NORESERVE: no commit charge for the size, only for pages written (see mapping.h).
  void* base = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd_, 0);
  if (base == MAP_FAILED && errno == ENOMEM) {
    // Strict accounting charges a private writable mapping its whole size; a read-only
    // one costs nothing, and serves every reader but copy-on-write views.
    base = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_PRIVATE | MAP_NORESERVE, fd_, 0);
    writable_ = false;
  }
  if (base == MAP_FAILED) {
    const int err = errno;
    ::close(fd_);
    throw_io(path, "cannot map the file", err);
  }
  base_ = static_cast<unsigned char*>(base);
}

Mapping::~Mapping() {
  if (base_) ::munmap(base_, static_cast<size_t>(size_));
  if (fd_ >= 0) ::close(fd_);
}

unsigned char* Mapping::cow_base() const {
  if (writable_) return base_;
  throw Error(ErrorKind::Io,
              path_ + ": the system accounts memory strictly (vm.overcommit_memory = 2) and refused a copy-on-write "
                      "mapping of this " + std::to_string(size_) + "-byte file, larger than what it may still commit "
                      "(CommitLimit in /proc/meminfo); the file opened read-only, so it can be inspected, verified, "
                      "converted and loaded in copy mode (LoadMode::Copy, which needs the memory), but not mapped into "
                      "writable tensors. Map mode needs vm.overcommit_memory 0 or 1, or more swap");
}

void Mapping::read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const {
  auto* out = static_cast<unsigned char*>(dest);
  uint64_t done = 0;
  while (done < size) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(size - done, uint64_t{1} << 30));
    const ssize_t n = ::pread(fd_, out + done, chunk, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io(path_, "reading " + what + " failed", errno);
    }
    if (n == 0) {
      struct stat st {};
      const uint64_t now = ::fstat(fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
      throw Error(ErrorKind::Truncated, path_ + ": " + what + " ends at " + std::to_string(offset + size) +
                                            " but the file shrank to " + std::to_string(now) +
                                            " bytes while it was open");
    }
    done += static_cast<uint64_t>(n);
  }
}

void Mapping::set_read_ahead(bool on) const {
  (void)::posix_fadvise(fd_, 0, 0, on ? POSIX_FADV_NORMAL : POSIX_FADV_RANDOM);
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
  // The kernel maps a large page-cache folio with one fault only where it lies within one
  // page table, so the address is chosen congruent to the file offset modulo the 2 MiB a
  // page table spans: reserve that much more, map inside it, give the rest back.
  constexpr uint64_t kTableSpan = uint64_t{2} << 20;
  const size_t reserved = static_cast<size_t>(length + kTableSpan);
  void* reserve = ::mmap(nullptr, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) throw_io(path_, "cannot reserve addresses to map " + what, errno);
  const auto low = reinterpret_cast<uint64_t>(reserve);
  const uint64_t at = low + ((begin % kTableSpan) + kTableSpan - (low % kTableSpan)) % kTableSpan;
  void* start = ::mmap(reinterpret_cast<void*>(at), static_cast<size_t>(length), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd_, static_cast<off_t>(begin));
  if (start == MAP_FAILED) {
    const int err = errno;
    ::munmap(reserve, reserved);
    throw_io(path_, "cannot map " + what, err);
  }
  if (at > low) ::munmap(reserve, static_cast<size_t>(at - low));
  const uint64_t tail = at + length;
  if (low + reserved > tail) ::munmap(reinterpret_cast<void*>(tail), static_cast<size_t>(low + reserved - tail));
  return std::shared_ptr<void>(static_cast<unsigned char*>(start) + (offset - begin),
                               [start, length](void*) { ::munmap(start, static_cast<size_t>(length)); });
}

void Mapping::prefetch(uint64_t begin, uint64_t end) const {
  const uint64_t page = page_size();
  begin &= ~(page - 1);
  if (end > begin && base_) ::madvise(base_ + begin, end - begin, MADV_WILLNEED);
}

const char* fault_prone_filesystem_type(uint64_t magic) {
  // The magic numbers of linux/magic.h and of the filesystems' own sources.
  switch (magic) {
    case 0x6969: return "NFS";
    case 0x517B: case 0xFF534D42: case 0xFE534D42: return "SMB/CIFS";
    case 0x65735546: return "FUSE";  // sshfs, s3fs, gcsfuse, virtiofs, GlusterFS...
    case 0x01021997: return "9p";
    case 0x00C36400: return "Ceph";
    case 0x5346414F: case 0x6B414653: return "AFS";
    case 0x73757245: return "Coda";
    case 0x0BD00BD0: return "Lustre";
    case 0x01161970: return "GFS2";
    case 0x7461636F: return "OCFS2";
    case 0x20030528: return "OrangeFS";
    default: return nullptr;
  }
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
  if (end > begin) (void)::posix_fadvise(fd_, static_cast<off_t>(begin), static_cast<off_t>(end - begin), POSIX_FADV_DONTNEED);
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
