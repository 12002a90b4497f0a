// The memory figures of this process as Linux reports them, for tests, benchmarks and
// the main job. Torch-free.
//
// RssAnon is private memory (heap, and pages of a private mapping that were written);
// RssFile is file pages mapped and touched (shared with the page cache, reclaimable);
// VmHWM is the peak resident size since start or since the last reset_peak().
//
// Thread-safety: each call reads /proc afresh; safe from any thread.
#pragma once

#include <cstdint>

#include "tensormap/export.h"

namespace tensormap {

struct ProcessMemory {
  uint64_t vm_hwm = 0;  // bytes
  uint64_t vm_rss = 0;
  uint64_t rss_anon = 0;
  uint64_t rss_file = 0;
  uint64_t pss = 0;  // proportional set size, from /proc/self/smaps_rollup
};

// Reads /proc/self/status and /proc/self/smaps_rollup. Missing fields stay 0.
TENSORMAP_EXPORT ProcessMemory read_process_memory();

// Resets VmHWM to the current RSS (writes 5 to /proc/self/clear_refs). Returns false
// where the kernel does not allow it.
TENSORMAP_EXPORT bool reset_peak_memory();

// The machine's memory (MemTotal in /proc/meminfo), in bytes; 0 where it cannot be read.
TENSORMAP_EXPORT uint64_t total_memory();

}  // namespace tensormap
