// The named temporary files of unfinished writers (writer.h): where a filesystem has no
// O_TMPFILE (NFS, FUSE, ...), a new file is written as ".NAME.tmp-XXXXXXXXXXXX" beside
// its destination until commit.
#pragma once

#include "tensormap/export.h"

namespace tensormap {

// Removes the named temporary files of this process's unfinished writers.
// Async-signal-safe: for a SIGINT/SIGTERM handler that then calls _exit. The writers
// whose files it removed fail on their next step; nothing else is touched.
TENSORMAP_EXPORT void remove_temporary_files() noexcept;

}  // namespace tensormap
