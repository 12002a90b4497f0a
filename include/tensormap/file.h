// tensormap::File: an opened, validated checkpoint file, mapped copy-on-write.
//
// File::open opens the file once and maps that descriptor privately (MAP_PRIVATE),
// recognises its format by its content (a tensormap file, or a safetensors file) and
// checks every rule of that format before it returns (spec/FORMAT.md rules 1 to 20;
// spec/SAFETENSORS.md), so any File that exists describes a well-formed file. Opening reads only the header: its cost
// depends on the number of tensors, not on the size of their data. Tensor bytes are read
// by the operating system only when a page is first touched.
//
// Thread-safety: a File is immutable after open. All const methods may be called from
// many threads at once. Copies of a File share one mapping, which lives until the last
// copy, and the last holder of keep_alive(), is gone.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/error.h"
#include "tensormap/export.h"
#include "tensormap/format.h"
#include "tensormap/page_cache.h"
#include "tensormap/tensor_entry.h"

namespace tensormap {

class File;
namespace detail {
class Mapping;
class RemoteObject;
File open_file(std::shared_ptr<const Mapping> mapping);
File open_file(std::shared_ptr<const RemoteObject> object);
}  // namespace detail

class TENSORMAP_EXPORT File {
 public:
  // Maps and validates `path`. Throws Error with the kind of the first broken rule, or
  // Io if the file cannot be opened or mapped.
  static File open(const std::string& path);

  const std::string& path() const;
  Format format() const;
  // Whether tensors carry checksums (tensormap files do, safetensors files do not).
  bool has_checksums() const;
  // Version and alignment of a tensormap file; 0 for safetensors.
  uint16_t major_version() const;
  uint16_t minor_version() const;
  uint64_t alignment() const;
  // Bytes before the first tensor's data region (for safetensors: 8 + JSON length).
  uint64_t header_size() const;
  uint64_t file_size() const;

  // Every tensor, in table (and file) order.
  const std::vector<TensorEntry>& tensors() const;

  // The tensor of this name, or nullptr. O(1) on average.
  const TensorEntry* find(std::string_view name) const;

  // The tensor of this name. Throws Error(NotFound) naming the file and the name.
  const TensorEntry& at(std::string_view name) const;

  // Metadata pairs in file order. Views point into the mapping.
  const std::vector<std::pair<std::string_view, std::string_view>>& metadata() const;

  // The value of a metadata key, or nothing.
  std::optional<std::string_view> metadata_value(std::string_view key) const;

  // The tensor's bytes, read-only.
  ByteView bytes(const TensorEntry& entry) const;

  // The tensor's bytes in the private mapping, writable: a write copies the touched page
  // into this process and never reaches the file. Opening commits no memory for the
  // file's size, so files larger than memory open and map (pages stream through the page
  // cache); only written pages cost memory. Under strict overcommit accounting
  // (vm.overcommit_memory = 2) a file larger than the commit limit is mapped read-only:
  // every other method works, and this one throws Error(Io) saying so (use copy mode).
  // REQUIRES: entry belongs to this File.
  void* cow_data(const TensorEntry& entry) const;

  // [offset, offset + size) of the tensor in a private, copy-on-write mapping of its own,
  // apart from the mapping of the whole file: the returned pointer is the first byte, and
  // the mapping lives as long as the pointer (not the File). Touching it can put into
  // this process's resident set only the range's own pages, where a touch of the whole
  // file's mapping maps the whole page-cache folio around it (up to 2 MiB on Linux 6.x),
  // neighbours' bytes included. One mapping (VMA) per call, of the vm.max_map_count the
  // kernel allows a process. Throws Error(InvalidArgument) for a range past the tensor,
  // Error(Io) if the kernel refuses.
  std::shared_ptr<void> map_region(const TensorEntry& entry, uint64_t offset, uint64_t size) const;

  // Owns the mapping: hold it to keep cow_data()/bytes() pointers valid after every
  // File copy is gone (for example in a tensor's deleter).
  std::shared_ptr<const void> keep_alive() const;

  // Copies `size` bytes of the tensor, from `offset` within it, into `dest` with pread,
  // not through the mapping. If another process shrank the file since it was opened, this
  // throws Error(Truncated) where a read through the mapping (bytes(), cow_data(), and so
  // every zero-copy view) would kill the process with SIGBUS. Copy-mode loads, verify()
  // and conversions read this way; use it, or copy mode, for files that may change.
  // REQUIRES: offset + size <= entry.byte_length.
  void read(const TensorEntry& entry, uint64_t offset, void* dest, uint64_t size) const;

  // read() of the whole tensor, checked as it is read: each 256 KiB piece is hashed right
  // after its pread, while it is in the CPU's cache, and the XXH3-64 compared with the
  // record at the end. Throws Error(ChecksumMismatch) naming the file, the tensor and
  // both hashes (dest then holds the corrupt bytes), and what read() throws. A safetensors
  // file has no checksums: this is read().
  void read_checked(const TensorEntry& entry, void* dest) const;

  // Copies `rows` runs of `row_bytes` bytes, the first at `offset` within the tensor and
  // each `stride` bytes after the previous, into `dest` back to back, with pread as read()
  // does: a slice of a tensor along a dimension other than 0. Where the gaps between rows
  // span pages, the kernel's read-ahead is off during the call, so that only the rows'
  // pages enter the page cache. Throws Error(InvalidArgument) if a row runs past the
  // tensor or row_bytes > stride, Error(Truncated) as read() does.
  void read_rows(const TensorEntry& entry, uint64_t offset, uint64_t stride, uint64_t row_bytes, uint64_t rows,
                 void* dest) const;

  // Asks the kernel to read the tensor's pages ahead (MADV_WILLNEED). Advisory.
  void prefetch(const TensorEntry& entry) const;

  // Evicts the tensor's pages from this process (MADV_DONTNEED). Clean pages are simply
  // dropped from this process; a page that was written through cow_data() loses that
  // write and reads the file again. Pages shared with another tensor are kept.
  // An alias's pages are its target's: evicting one evicts both.
  // REQUIRES: no one relies on writes made through cow_data() for this tensor.
  void evict(const TensorEntry& entry) const;

  // The fraction (0 to 1) of the tensor's pages the page cache holds now (mincore).
  double cached_fraction(const TensorEntry& entry) const;

  // Asks the kernel to drop the tensor's pages from the page cache (POSIX_FADV_DONTNEED),
  // after evict(), and those of the 2 MiB blocks of the file around it (the page cache
  // keeps large folios whole): only clean pages that no process maps go, so other
  // processes' map-mode views are untouched; a later read comes from the disk again.
  // Advisory.
  void drop_cache(const TensorEntry& entry) const;

  // Checks rules 21 and 22 of the spec: every padding byte is zero and every tensor's
  // XXH3-64 matches its record. Reads with pread (see read()), so a file truncated
  // meanwhile gives Error(Truncated), not SIGBUS. Throws Error(NonZeroPadding or ChecksumMismatch) naming
  // the first bad tensor. A safetensors file has neither, and open() checked all it has.
  void verify() const;

  // Like verify(), but checks everything and returns one Error per bad tensor or padding
  // region, in file order; empty when the file is sound.
  std::vector<Error> find_corruption() const;

 private:
  struct Impl;
  friend File detail::open_file(std::shared_ptr<const detail::Mapping> mapping);
  friend File detail::open_file(std::shared_ptr<const detail::RemoteObject> object);
  explicit File(std::shared_ptr<const Impl> impl);
  // Error(ChecksumMismatch): the tensor's bytes hash to `computed`, not to its record.
  Error corrupted(const TensorEntry& entry, uint64_t computed) const;
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tensormap
