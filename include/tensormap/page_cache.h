// The page cache under mapped checkpoints: page size, mapping budget, huge pages, warming
// a file's cache, filesystems where a mapped page can fault, and advice on the pages of a
// range of memory (prefaulting, read-ahead).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "tensormap/export.h"

namespace tensormap {

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

// Advice on the pages wholly inside [begin, begin + size) of this process's memory. Each
// is advisory: where the kernel lacks the call (before 5.14 for the populate ones) it does
// nothing and the pages fault in on first touch, as without it.
// Faults in fresh anonymous memory for writing, in one system call (MADV_POPULATE_WRITE):
// page-by-page first-touch faults cost several times more, markedly so in virtual machines.
TENSORMAP_EXPORT void populate_for_write(void* begin, size_t size);
// Starts reading the file pages behind a mapped range (MADV_WILLNEED).
TENSORMAP_EXPORT void read_ahead(const void* begin, size_t size);
// Faults in a mapped range for reading (MADV_POPULATE_READ), retrying EINTR and EAGAIN:
// 0, or the errno of the failure. EFAULT: part of the range lies past the end of its file
// (which shrank), where a touch would raise SIGBUS. EINVAL: the kernel lacks the call.
TENSORMAP_EXPORT int populate_for_read(const void* begin, size_t size);

// Fresh anonymous memory of `size` bytes for a copy-mode destination, its start on a 2 MiB
// boundary, advised MADV_HUGEPAGE (where the kernel has transparent huge pages in
// `madvise` or `always` mode) and faulted in for writing in one call: the first write into
// fresh memory, the bound of a copy from the page cache, costs less with 2 MiB pages. The
// mapping ends at `size` rounded up to the page size, so the last partial 2 MiB block
// stays in 4 KiB pages and no memory beyond the tensor's is committed. nullptr where the
// mapping is refused (the caller then allocates as usual). Free with free_huge.
TENSORMAP_EXPORT void* allocate_huge(size_t size);
TENSORMAP_EXPORT void free_huge(void* memory, size_t size) noexcept;

}  // namespace tensormap
