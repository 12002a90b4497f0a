// Thin, checked wrappers over the POSIX calls the writer needs. Internal to the core.
// Each throws Error(Io) naming the path and the system's reason.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "io/output.h"
#include "io/unique_fd.h"

namespace tensormap::detail {

// The piece in which the core streams a tensor from a checkpoint into a writer (convert,
// Editor): memory beyond it stays constant whatever the tensor's size.
constexpr uint64_t kStreamPieceBytes = uint64_t{16} << 20;

// "<path>: <what>: <strerror(errno)>" as an Io error.
[[noreturn]] void throw_io(const std::string& path, const std::string& what, int err);

// Writes all `size` bytes at `offset`, retrying short writes and EINTR.
void pwrite_all(int fd, const void* data, size_t size, uint64_t offset, const std::string& path);

// The file a write to `path` replaces: `path` itself or, where `path` is a symbolic link,
// the file it finally points to (a relative target read from the link's directory), which
// need not exist yet. Writers replace that file, in its own directory, and the links stay
// links (a "latest.tmap -> step-1000.tmap" link, a Hugging Face cache's snapshot link).
// Throws Error(Io) for more than 40 links in a row, as the kernel does.
std::string write_target(const std::string& path);

// fsync on the directory holding `path`.
void sync_parent_directory(const std::string& path);

// Writes `bytes` to `path` atomically: a temporary file beside it, fsync (if `sync`),
// rename, directory fsync. On failure `path` is unchanged and no temporary file remains.
void write_file_atomically(const std::string& path, const std::string& bytes, bool sync);

// A new file written beside `path` and moved over it only on commit: the destination is
// always either its old content or the complete new one. The destination's permission
// bits are kept when it exists.
//
// Where the filesystem supports O_TMPFILE (ext4, XFS, Btrfs, tmpfs, ...) the file has no
// name until commit, so a process killed by any signal, kill -9 included, leaves nothing:
// the kernel frees a nameless file with its last descriptor. Commit links it under a
// temporary name and renames that over the destination. Elsewhere it is written under a
// temporary name from the start, locked with flock while it is written; each new
// AtomicFile for the same destination removes the temporaries whose writer is gone
// (unlocked and untouched for a minute). Named temporaries are also listed for
// remove_temporary_files() (tensormap/writer.h), which a signal handler may call.
// Destroyed without commit (or after a failure), the temporary file is removed.
//
// Writes reach the file in whole, aligned 2 MiB blocks wherever they can: the page cache
// gives a write a folio no larger than the write and its alignment allow, and only a
// 2 MiB folio can later be mapped with one page-table entry (see spec/FORMAT.md, "Huge
// pages"). So the block a write starts or ends inside is staged in memory (one 2 MiB
// buffer) until a later write moves past it, and the aligned middle of a large write goes
// straight to the file. Nothing staged can be read back before finish(); the file's bytes
// are exactly those written, gaps reading as zeros, as with plain pwrite.
class AtomicFile final : public Output {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile() override;
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  const std::string& path() const override { return path_; }

  void pwrite(const void* data, size_t size, uint64_t offset) override;
  // Copies [src_offset, src_offset + size) of the file open as `src_fd` to `offset`, in
  // the kernel with copy_file_range (which shares the blocks where the filesystem can:
  // Btrfs, XFS with reflink, NFS 4.2 server-side copy), else through a 1 MiB buffer with
  // pread and pwrite. A source shorter than the range gives Error(Truncated) naming
  // `what`; a failed write, Error(Io).
  void copy_from(int src_fd, uint64_t src_offset, uint64_t size, uint64_t offset, const std::string& what) override;
  // Appends after everything append() wrote so far.
  void append(const void* data, size_t size) override;
  // Sets the file's length (the gaps read as zeros).
  void truncate(uint64_t size) override;
  // fsync (if `sync`) and close: after this, only rename_into_place() remains.
  void finish(bool sync) override;
  // Renames the finished temporary file over the destination, then fsyncs the directory.
  void rename_into_place(bool sync);
  void publish(bool sync) override { rename_into_place(sync); }
  // Removes the temporary file. Safe to call more than once.
  void discard() noexcept override;

 private:
  void create_named();
  void link_named();  // gives the nameless file its temporary name
  void stage(const unsigned char* data, size_t size, uint64_t offset);
  // Writes the staged block out: all 2 MiB (its tail as zeros) when the file is known to
  // go on past it, else only the bytes staged. Nothing is staged afterwards.
  void flush_staged(bool whole);

  static constexpr uint64_t kBlock = uint64_t{2} << 20;
  std::vector<unsigned char> block_;  // the staged block, kBlock bytes once used
  uint64_t block_start_ = 0;          // its offset in the file, a multiple of kBlock
  uint64_t block_fill_ = 0;           // bytes of it that hold content (0: none staged)
  bool staged_ = false;
  uint64_t written_end_ = 0;  // the end of everything written or staged so far
  bool take_temp_name(const std::function<bool(const std::string&)>& make);

  std::string path_;
  std::string temp_path_;  // empty while the file has no name
  UniqueFd fd_;
  int registry_slot_ = -1;  // where remove_temporary_files() finds temp_path_
  bool nameless_ = false;
  bool finished_ = false;
  uint64_t appended_ = 0;
};

// The directory part of `path` ("." when there is none), and the part after it.
std::string parent_directory(const std::string& path);
std::string base_name(const std::string& path);

}  // namespace tensormap::detail
