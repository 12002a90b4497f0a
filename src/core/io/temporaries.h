// The named temporary files of unfinished writers (AtomicFile, posix_io.h): their names,
// the registry remove_temporary_files() (tensormap/temporaries.h) empties from a signal
// handler, and the removal of those left by writers that died. Internal to the core.
#pragma once

#include <functional>
#include <string>
#include <string_view>

namespace tensormap::detail {

// A temporary file name beside `path` that no other writer is likely to pick:
// ".NAME.tmp-" and 12 hex digits.
std::string temporary_name(const std::string& path);

// Records `path` for remove_temporary_files(); the slot to unregister it by, or -1 where
// all 64 slots are taken (the file is then still removed by its owner and later saves).
int register_temporary(const std::string& path) noexcept;
void unregister_temporary(int slot) noexcept;

// Named temporaries only (tests, TENSORMAP_NAMED_TEMPORARIES=1): a way to exercise the
// fallback for filesystems without O_TMPFILE on one that has it.
bool named_temporaries_forced();

// Removes the temporary files of stopped writers in `dir` whose destination's file name
// `ours` accepts: unlocked and untouched for a minute. Never throws.
void collect_stale_temporaries(const std::string& dir, const std::function<bool(std::string_view)>& ours) noexcept;

}  // namespace tensormap::detail
