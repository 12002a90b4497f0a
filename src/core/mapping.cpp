// A private, copy-on-write mapping of a whole file.
#include "mapping.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/interprocess/file_mapping.hpp>
#include <cerrno>

#include "posix_io.h"
#include "tensormap/error.h"

namespace tensormap::detail {

namespace bip = boost::interprocess;

uint64_t page_size() {
  static const auto size = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

Mapping::Mapping(const std::string& path) : path_(path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_io(path, "cannot open", errno);
  if (S_ISDIR(st.st_mode)) throw Error(ErrorKind::Io, path + ": is a directory, not a file");
  if (!S_ISREG(st.st_mode)) throw Error(ErrorKind::Io, path + ": is not a regular file");
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) return;  // nothing to map; readers report the file as too small
  try {
    bip::file_mapping file(path.c_str(), bip::read_only);
    region_ = bip::mapped_region(file, bip::copy_on_write, 0, static_cast<size_t>(size_));
  } catch (const bip::interprocess_exception& e) {
    throw Error(ErrorKind::Io, path + ": cannot map the file: " + e.what());
  }
  base_ = static_cast<unsigned char*>(region_.get_address());
}

void Mapping::prefetch(uint64_t begin, uint64_t end) const {
  const uint64_t page = page_size();
  begin &= ~(page - 1);
  if (end > begin && base_) ::madvise(base_ + begin, end - begin, MADV_WILLNEED);
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
