// Writing checkpoints: one contract (TensorWriter) for every format, and the writer of
// tensormap and safetensors files (Writer). Sharded checkpoints: sharded.h; torch.save
// archives: torch_save.h; open_writer() picks among them from the options.
//
// The contract: the caller declares every tensor (name, dtype, shape) up front, then
// hands over each tensor's bytes in declaration order, in one piece or in chunks, from
// any pointer. The bytes go straight to the file; a writer's own memory is its header
// (proportional to the number of tensors) and never the data.
//
// Nothing is visible at the destination until commit(): the file is written in the
// destination's directory, synced, renamed over the destination and the directory
// synced. If anything fails, or the writer is destroyed before commit(), the new file is
// removed and the destination is left as it was. The destination's permission bits are
// kept when it already exists.
//
// The new file has no name while it is written where the filesystem supports O_TMPFILE
// (ext4, XFS, Btrfs, tmpfs and most local filesystems): a process that dies in any way,
// kill -9 included, leaves nothing behind. Elsewhere (NFS, FUSE, ...) it is written as
// ".NAME.tmp-XXXXXXXXXXXX" beside the destination; a process that handles signals calls
// remove_temporary_files() in its handler, and a later save to the same path removes
// such files left by writers that died (unlocked and a minute old).
//
// Thread-safety: a writer is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/export.h"
#include "tensormap/format.h"
#include "tensormap/temporaries.h"  // remove_temporary_files(), for the named temporaries above
#include "tensormap/tensor_spec.h"

namespace tensormap {

// The protocol every writer follows (see the top of this header).
class TENSORMAP_EXPORT TensorWriter {
 public:
  virtual ~TensorWriter();

  // Number of declared tensors, and the byte length each must receive.
  virtual size_t tensor_count() const = 0;
  virtual uint64_t byte_length(size_t index) const = 0;

  // Index of the tensor the next write() feeds; tensor_count() once all are complete.
  virtual size_t current_tensor() const = 0;

  // Appends bytes to the current tensor, moving to the next tensor when it is full.
  // Zero-length tensors are passed over automatically. Throws Error(InvalidArgument) if
  // the bytes would run past the current tensor's end, Error(Io) if a write fails (the
  // writer is then abandoned).
  virtual void write(const void* data, size_t size) = 0;

  // Writes one whole tensor. REQUIRES: the current tensor has received no bytes yet and
  // size == byte_length(current_tensor()); Error(InvalidArgument) otherwise.
  virtual void write_tensor(const void* data, size_t size) = 0;

  // Finishes the checkpoint and moves it into place. REQUIRES: every tensor complete.
  // Throws Error(InvalidArgument) if some tensor is incomplete, Error(Io) if a write,
  // sync or rename fails; in both cases the destination is unchanged.
  virtual void commit() = 0;

  // Discards everything written so far. Safe to call more than once.
  virtual void abandon() noexcept = 0;
};

// Whether the writer open_writer() makes for `options` stores aliases (TensorSpec::
// alias_of): an unsharded tensormap file or torch.save archive. Safetensors files have no
// aliases (the reference refuses tensors that share bytes), nor do sharded checkpoints:
// there, write the bytes under each name.
TENSORMAP_EXPORT bool supports_aliases(const WriterOptions& options);

// The writer for options.format, sharded when options.shard_size > 0. Throws what the
// writer's constructor throws, and Error(InvalidArgument) for a sharded torch.save.
TENSORMAP_EXPORT std::unique_ptr<TensorWriter> open_writer(std::string path, std::vector<TensorSpec> tensors,
                                                           WriterOptions options = {});

namespace detail {
class WriterCore;
}

// The one implementation of the contract above, shared by every writer class below: each
// differs only in how it lays out its format (src/core/writer_core.h).
class TENSORMAP_EXPORT FormatWriter : public TensorWriter {
 public:
  ~FormatWriter() override;  // abandons the write unless commit() succeeded
  FormatWriter(FormatWriter&&) noexcept;
  FormatWriter& operator=(FormatWriter&&) noexcept;

  size_t tensor_count() const final;
  uint64_t byte_length(size_t index) const final;
  size_t current_tensor() const final;
  void write(const void* data, size_t size) final;
  void write_tensor(const void* data, size_t size) final;
  void commit() final;
  void abandon() noexcept final;

 protected:
  explicit FormatWriter(std::unique_ptr<detail::WriterCore> core);
  detail::WriterCore& core() const { return *core_; }

 private:
  std::unique_ptr<detail::WriterCore> core_;
};

// A tensormap or safetensors file (options.format).
class TENSORMAP_EXPORT Writer final : public FormatWriter {
 public:
  // Validates the declarations (same rules as a reader applies) and creates the
  // temporary file. Throws Error(InvalidArgument) for a bad declaration, Error(Io) if the
  // temporary file cannot be created.
  Writer(std::string path, std::vector<TensorSpec> tensors, WriterOptions options = {});
};

}  // namespace tensormap
