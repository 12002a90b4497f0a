// The one implementation of the TensorWriter contract (writer.h), and the hooks through
// which each format plugs into it. Internal to the core.
//
// WriterCore owns what every writer shares: the declarations and how far the bytes have
// come (WriteCursor), the failure state, and the order of the steps. A format supplies:
//   put(data, size, tensor, at)   the next `size` bytes of `tensor`, `at` bytes into it;
//   tensor_done(tensor)           the tensor received all its bytes (empty ones too);
//   seal()                        everything but publishing: trailers, sync;
//   publish()                     the destination changes, atomically;
//   discard()                     forget everything; the destination is as it was.
// Each hook that throws abandons the writer (discard() runs, later calls are refused).
//
// Where a format plugs in (writer.cpp: tensormap and safetensors files;
// torch_save_writer.cpp; sharded.cpp), and the public classes (Writer, TorchSaveWriter,
// ShardedWriter) are FormatWriters over one of them. A new destination (an object
// store) is a new Output (output.h) under the same core; a new format, a new core.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tensormap/writer.h"
#include "write/write_cursor.h"

namespace tensormap::detail {

class WriterCore {
 public:
  // `aliases`: whether the format stores TensorSpec::alias_of.
  WriterCore(std::string path, const std::vector<TensorSpec>& tensors, bool aliases);
  virtual ~WriterCore();
  WriterCore(const WriterCore&) = delete;
  WriterCore& operator=(const WriterCore&) = delete;

  const std::string& path() const { return cursor_.path(); }
  const WriteCursor& cursor() const { return cursor_; }

  // The contract's steps (writer.h), in terms of the hooks.
  void write(const void* data, size_t size);
  void write_tensor(const void* data, size_t size);
  // seal() then publish(); a sharded checkpoint seals every shard before it publishes any.
  void commit();
  void seal_all();     // the first half of commit()
  void publish_all();  // the second half
  void abandon() noexcept;

 protected:
  // Moves past the tensors that are already complete (leading empty ones): the end of a
  // format's constructor calls this once its own state is ready.
  void start();
  // Runs `step`; if it throws, the writer is abandoned and the error goes on.
  template <typename Step>
  void guarded(Step step) {
    try {
      step();
    } catch (...) {
      abandon();
      failed_ = true;
      throw;
    }
  }
  // Throws Error(InvalidArgument) once the writer failed, was committed or abandoned.
  void check_open() const;
  // Records `size` more bytes of the current tensor (calling tensor_done for each that
  // completes). For hooks of their own that write bytes another way (a kernel copy).
  void advance(size_t size);

  virtual void put(const void* data, size_t size, size_t tensor, uint64_t at) = 0;
  virtual void tensor_done(size_t) {}
  virtual void seal() = 0;
  virtual void publish() = 0;
  virtual void discard() noexcept = 0;

 private:
  WriteCursor cursor_;
  enum class State { Open, Sealed, Done } state_ = State::Open;
  bool failed_ = false;
};

}  // namespace tensormap::detail
