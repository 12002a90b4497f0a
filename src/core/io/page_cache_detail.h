// Mapping helpers shared by Mapping (mapping.h) and the page-cache functions
// (tensormap/page_cache.h). Internal to the core; defined in page_cache.cpp.
#pragma once

#include <cstdint>

#include "tensormap/page_cache.h"

namespace tensormap::detail {

// mmap of [begin, begin + length) of `fd` (begin a multiple of the page size) at an
// address congruent to `begin` modulo 2 MiB, the span of one page table, so that 2 MiB
// folios of the page cache map with one entry: a reservation that much larger, the file
// mapped inside it, the rest given back. MAP_FAILED with errno set on failure.
void* map_aligned(int fd, uint64_t begin, uint64_t length, int prot);

// MADV_HUGEPAGE over [begin, begin + length), for mappings of 2 MiB or more: pages read
// in through them later come in 2 MiB page-cache folios, each mapped with one page-table
// entry, where the filesystem's page cache has large folios. False where the kernel
// refused (no transparent huge pages: EINVAL) or the range is smaller; the mapping then
// works 4 KiB at a time, as without the advice.
bool advise_huge_pages(void* begin, uint64_t length);

using tensormap::page_size;

// The name of the fault-prone filesystem (see fault_prone_filesystem) of statfs type
// `magic`, or nullptr.
const char* fault_prone_filesystem_type(uint64_t magic);

}  // namespace tensormap::detail
