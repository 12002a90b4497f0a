// What every Output can do with its own steps: see output.h.
#include "io/output.h"

#include <unistd.h>

#include <cerrno>
#include <vector>

#include "io/posix_io.h"
#include "tensormap/error.h"
#include "tensormap/interrupt.h"

namespace tensormap::detail {

void Output::copy_from(int src_fd, uint64_t src_offset, uint64_t size, uint64_t offset, const std::string& what) {
  std::vector<unsigned char> buffer(static_cast<size_t>(std::min<uint64_t>(size, uint64_t{1} << 20)));
  while (size > 0) {
    check_interrupt();
    const size_t piece = static_cast<size_t>(std::min<uint64_t>(size, buffer.size()));
    const ssize_t n = ::pread(src_fd, buffer.data(), piece, static_cast<off_t>(src_offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_io(path(), "read of " + what + " failed", errno);
    if (n == 0) {
      throw Error(ErrorKind::Truncated,
                  path() + ": the source of " + what + " ended " + std::to_string(size) + " bytes early (it shrank)");
    }
    pwrite(buffer.data(), static_cast<size_t>(n), offset);
    src_offset += static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
    size -= static_cast<uint64_t>(n);
  }
}

}  // namespace tensormap::detail
