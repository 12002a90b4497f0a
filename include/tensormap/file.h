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

namespace tensormap {

class File;
namespace detail {
class Mapping;
File open_file(std::shared_ptr<const Mapping> mapping);
}  // namespace detail

// The system's page size: what mappings and evictions round to.
TENSORMAP_EXPORT uint64_t page_size();

// Whether `count` mappings of their own (File::map_region, ViewMapping::Own) fit the
// budget of one process: a quarter of the kernel's limit, vm.max_map_count, read afresh at
// each call (a sysctl can change while a process runs; reading it costs microseconds).
TENSORMAP_EXPORT bool own_mappings_fit(size_t count);

// Huge pages for mapped checkpoints (spec/FORMAT.md, "Huge pages"; README, "Map mode at
// full speed"). Every file tensormap maps is advised MADV_HUGEPAGE, so that pages read in
// through the mapping arrive in 2 MiB page-cache folios, each mapped with one page-table
// entry (FilePmdMapped in /proc/<pid>/smaps): faster faults, fewer TLB misses. Writers
// write whole aligned 2 MiB blocks, so a file written by tensormap is cached that way too.
// A file cached in small folios by another writer (cp, a download) is mapped 4 KiB at a
// time until it leaves the cache or warm_page_cache() re-reads it.
struct TENSORMAP_EXPORT HugePageSupport {
  bool madvise_hugepage = false;  // the kernel takes MADV_HUGEPAGE on a file mapping
  bool collapse = false;          // and MADV_COLLAPSE (5.19+, with READ_ONLY_THP_FOR_FS)
  std::string thp_mode;           // /sys/kernel/mm/transparent_hugepage/enabled: "always",
                                  // "madvise", "never", or "" where the kernel has no THP
};
// What this kernel offers, probed once (a small mapping of /proc/self/exe) and remembered.
TENSORMAP_EXPORT HugePageSupport huge_page_support();

// The share (0 to 1) of the pages of `path` that this process has mapped and resident which
// are mapped with 2 MiB page-table entries, from /proc/self/smaps (every mapping of the
// file, by its path as the kernel shows it); 0 where none is resident.
TENSORMAP_EXPORT double huge_mapped_share(const std::string& path);

struct TENSORMAP_EXPORT WarmReport {
  double share_before = 0;  // of the file's bytes, PMD-mappable from the page cache
  double share_after = 0;
  double cached_before = 0;  // of the file's pages, in the page cache (mincore)
  std::string method;        // "already", "collapse", "reread" or "none: <why>"
};
// Brings `path` into the page cache in 2 MiB folios, for every process that maps it later:
// the remedy for a checkpoint copied or downloaded (written in small pieces) and still
// cached that way. Maps the file with MADV_HUGEPAGE and populates it; where the share of
// huge mappings stays under 90%, tries MADV_COLLAPSE and, where the kernel cannot collapse
// file pages, writes out the file's dirty pages (fdatasync), drops its pages that no
// process maps (POSIX_FADV_DONTNEED) and reads them again: one read of the file from the
// disk. Never changes the file's bytes.
// Throws Error(Io) where the file cannot be opened or mapped.
TENSORMAP_EXPORT WarmReport warm_page_cache(const std::string& path);

// The kind of filesystem `path` lies on ("NFS", "SMB/CIFS", "FUSE", "9p", ...) if a mapped
// page there can fault with SIGBUS or stall when the server or daemon does, from statfs;
// "" for a local filesystem (and where statfs fails: the open that follows will say why).
// LoadMode::Auto copies from the former and maps the latter.
TENSORMAP_EXPORT std::string fault_prone_filesystem(const std::string& path);

// "tensormap", "safetensors" or "torch.save".
TENSORMAP_EXPORT const char* format_name(Format format);

// One tensor of the file. The name stays valid as long as the File (or anything holding
// keep_alive()) lives. Safetensors tensors have no checksum (0) and may start at an
// offset that is not a multiple of their element size.
struct TENSORMAP_EXPORT TensorEntry {
  std::string_view name;
  Dtype dtype;
  uint8_t rank;
  std::array<uint64_t, 8> dims;  // only the first `rank` are meaningful
  uint64_t offset;               // absolute offset in the file
  uint64_t byte_length;
  uint64_t checksum;             // XXH3-64 of the bytes
  // An alias (format major 2): the index in tensors() of the earlier tensor whose bytes
  // these are, with the same dtype, shape, offset, length and checksum. Nothing for a
  // tensor with bytes of its own (always, in major 1 and safetensors files).
  std::optional<uint32_t> alias_of;

  // Number of elements: product of the dimensions (1 for rank 0).
  uint64_t element_count() const;
};

// The bytes of one tensor inside the mapping.
struct ByteView {
  const std::byte* data;
  uint64_t size;
};

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
  void read_rows(const TensorEntry& entry, uint64_t offset, uint64_t stride, uint64_t row_bytes,
                 uint64_t rows, void* dest) const;

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
  explicit File(std::shared_ptr<const Impl> impl);
  // Error(ChecksumMismatch): the tensor's bytes hash to `computed`, not to its record.
  Error corrupted(const TensorEntry& entry, uint64_t computed) const;
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tensormap
