// A whole file opened once and mapped privately (copy-on-write) from that descriptor.
// Internal to the core: every reader of every format sits on one of these.
//
// The mapping commits no memory for the file's size (MAP_NORESERVE), so a file larger
// than memory plus swap opens under the kernel's default overcommit heuristic: only the
// pages a process writes cost memory, as anonymous copies. Under strict accounting
// (vm.overcommit_memory = 2) the flag is ignored and a private writable mapping of the
// file is charged its whole size; where that is refused, the file is mapped read-only
// instead, so that everything that reads it still works, and cow_base() says why no
// copy-on-write view can be made.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "io/byte_source.h"
#include "io/page_cache_detail.h"
#include "io/unique_fd.h"
#include "tensormap/page_cache.h"

namespace tensormap::detail {

class Mapping final : public ByteSource {
 public:
  // Maps `path`. Throws Error(Io) for a missing file, a directory, a non-regular file or
  // a failed map. An empty file gives a mapping of size 0 with no address.
  explicit Mapping(const std::string& path);
  ~Mapping() override;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  const std::string& path() const { return path_; }
  const std::string& name() const override { return path_; }
  // The mapping, for reading only.
  unsigned char* base() const { return base_; }
  // The mapping, for views that may be written (copy-on-write). Throws Error(Io) naming
  // the file, the commit limit and what to do instead where strict accounting refused a
  // writable mapping (see the top of this file).
  unsigned char* cow_base() const;
  bool writable() const { return writable_; }
  // Whether the kernel took MADV_HUGEPAGE for the mapping (see advise_huge_pages).
  bool huge() const { return huge_; }
  uint64_t size() const override { return size_; }
  // The one descriptor, for copies made in the kernel (AtomicFile::copy_from).
  int descriptor() const { return fd_.get(); }

  // Copies [offset, offset + size) of the file into `dest` with pread, never through the
  // mapping: a file that shrank since it was opened gives Error(Truncated) naming `what`,
  // where touching the mapping would kill the process with SIGBUS.
  void read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const override;

  // Turns the kernel's read-ahead for read() on or off (POSIX_FADV_RANDOM / NORMAL).
  // Advisory; affects every reader of this Mapping while off.
  void set_read_ahead(bool on) const;

  // A private (copy-on-write) mapping of only the pages that hold [offset, offset + size)
  // of the file, made from the descriptor this Mapping was opened with, so it is the
  // same file even if the path was replaced since. The pointer is the byte at `offset`;
  // the mapping lives until the last copy of it is gone, independently of this Mapping.
  // Throws Error(InvalidArgument) for a range past the end, Error(Io) naming `what` if the
  // kernel refuses.
  std::shared_ptr<void> map_range(uint64_t offset, uint64_t size, const std::string& what) const;

  // MADV_WILLNEED over the pages of [begin, end). Advisory.
  void prefetch(uint64_t begin, uint64_t end) const;

  // The fraction (0 to 1) of the pages of [begin, end) that the page cache holds now
  // (mincore); 1 for an empty range. Advisory: 0 where the kernel will not say.
  double cached_fraction(uint64_t begin, uint64_t end) const;

  // Asks the kernel to drop the file's cached pages of [begin, end), grown to 2 MiB
  // boundaries (the page cache's largest folios; POSIX_FADV_DONTNEED): only clean pages
  // that no process maps go. Advisory.
  void drop_cache(uint64_t begin, uint64_t end) const;

  // MADV_DONTNEED over the whole pages inside [begin, end) (only those: a page partly
  // outside may belong to a neighbour). Throws Error(Io) if the kernel refuses.
  void release(uint64_t begin, uint64_t end, const std::string& what) const;

 private:
  std::string path_;
  unsigned char* base_ = nullptr;
  uint64_t size_ = 0;
  UniqueFd fd_;  // the one descriptor: mapped, read with pread, mapped again by map_range
  bool writable_ = true;
  bool huge_ = false;
};

}  // namespace tensormap::detail
