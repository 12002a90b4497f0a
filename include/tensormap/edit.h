// Editing a tensormap file: adding, replacing and removing tensors without rewriting the
// bytes of the tensors that stay.
//
//   tensormap::Editor e = tensormap::Editor::open("model.tmap");
//   e.remove("lm_head.weight");
//   e.put({"adapter.weight", tensormap::Dtype::BF16, {64, 4096}}, bytes);  // add or replace
//   tensormap::put(e, "lm_head.bias", torch::zeros({50257}));   // LibTorch layer (save.h)
//   e.commit();
//
// commit() writes a new file beside the old one and renames it over it, as every writer
// does (writer.h): after a crash at any moment the path holds the whole old file or the
// whole new one. The tensors that stay are copied by the kernel with copy_file_range,
// which shares their blocks instead of copying them where the filesystem can (Btrfs, XFS
// with reflink); elsewhere the kernel copies them, still without passing them through
// this process. Their checksums are carried over, not recomputed. New tensors are
// streamed in, so memory stays bounded whatever the sizes. Views and models mapped from
// the old file keep the old file's pages.
//
// Edits of one file run one at a time, across processes and threads: open() waits while
// another Editor of the same file (under any of its names) is open, and the lock is let go
// when commit() ends or the Editor is destroyed, so the second edit reads the first one's
// result and neither update is lost. The lock is a POSIX record lock on a lock file beside
// the file's real path, ".<name>.lock", removed when the lock is let go
// (Boost.Interprocess's file_lock; the kernel frees the lock of a process that dies, whose
// lock file the next edit reuses). Writers that do not edit (save, convert)
// do not take it: a save that replaces the file while an edit is open is lost to the
// edit's rename, as with any read-modify-write. If the opened file shrinks, commit()
// throws Error(Truncated) and writes nothing.
//
// Thread-safety: an Editor is used by one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tensormap/checkpoint.h"
#include "tensormap/export.h"
#include "tensormap/writer.h"

namespace tensormap {

struct EditReport {
  size_t kept = 0;  // tensors copied from the old file
  uint64_t kept_bytes = 0;
  size_t written = 0;  // tensors added or replaced
  uint64_t written_bytes = 0;
  size_t removed = 0;
};

class TENSORMAP_EXPORT Editor {
 public:
  // Waits for the file's edit lock (see above), then opens and validates the tensormap
  // file at `path` (rules 1 to 20, as File::open). Throws what File::open throws;
  // Error(InvalidArgument) for a file of another format (convert it to tensormap first);
  // Error(Io) if the lock file cannot be made beside it; Error(InvalidArgument) if an
  // Editor of the same file is open on this thread (it would wait for itself).
  static Editor open(const std::string& path);
  ~Editor();
  Editor(Editor&&) noexcept;
  Editor& operator=(Editor&&) noexcept;

  // Removes the tensor. Throws Error(NotFound) if neither the file nor an earlier put()
  // has it.
  void remove(std::string_view name);

  // Adds a tensor, or replaces the one of that name (which keeps its place in the file's
  // order; new names go after the others). `data` holds its byte length in bytes and
  // must stay valid until commit() returns. Throws Error(InvalidArgument) for a
  // declaration the format refuses (checked again by commit()).
  void put(TensorSpec spec, const void* data);

  // The same, the Editor holding `owner` (whatever owns `data`) until it is destroyed.
  // (The LibTorch layer's put(editor, name, tensor), save.h, passes the tensor.)
  void put(TensorSpec spec, const void* data, std::shared_ptr<const void> owner);

  // The same with the tensor `name` of another checkpoint (any format), read in 16 MiB
  // pieces at commit(), under `new_name` if not empty. `source` must outlive commit().
  void put(const Checkpoint& source, std::string_view name, std::string new_name = {});

  // Sets (or with an empty value, removes) a metadata key.
  void set_metadata(std::string key, std::string value);

  // Writes the new file and renames it over the old one; the Editor is spent. Throws
  // Error(Io) (full disk, ...) or what reading a source throws; the file is then left
  // as it was.
  EditReport commit(bool sync = true);

 private:
  struct Impl;
  explicit Editor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensormap
