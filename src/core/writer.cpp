// tensormap::Writer: streams tensor bytes into a temporary file, then moves it into place.
//
// The header depends only on the declarations, so its size and every offset are known
// before any data arrives. Data goes to its final offset with pwrite; padding is never
// written: the file is extended with ftruncate at the end and the gaps read as zeros.
// The header, which holds the checksums, is written last.
#include "tensormap/writer.h"

#include <xxhash.h>

#include "header.h"
#include "names.h"
#include "posix_io.h"
#include "tensormap/error.h"

namespace tensormap {

struct Writer::Impl {
  std::string path;
  std::unique_ptr<detail::AtomicFile> file;  // null once committed or abandoned
  std::vector<TensorSpec> tensors;
  WriterOptions options;
  detail::Layout layout;
  std::vector<unsigned char> safetensors_header;  // known up front; tensormap's is not
  std::vector<uint64_t> checksums;
  size_t current = 0;
  uint64_t written = 0;  // bytes of the current tensor received so far
  XXH3_state_t* hash = nullptr;
  bool failed = false;
  bool finished = false;

  ~Impl() {
    if (hash) XXH3_freeState(hash);
  }

  // Skips zero-length tensors so `current` names one that still wants bytes.
  void settle() {
    while (current < tensors.size() && written == layout.byte_lengths[current]) {
      checksums[current] = XXH3_64bits_digest(hash);
      XXH3_64bits_reset(hash);
      ++current;
      written = 0;
    }
  }

  [[noreturn]] void fail_invalid(const std::string& what) {
    throw Error(ErrorKind::InvalidArgument, path + ": " + what);
  }

  void check_writable() {
    if (failed) fail_invalid("the writer failed earlier and was abandoned");
    if (!file || finished) fail_invalid("the writer was already committed or abandoned");
  }

  // Runs `step` on the file; on any failure the writer is abandoned.
  template <typename Step>
  void guarded(Step step) {
    try {
      step();
    } catch (...) {
      failed = true;
      file.reset();
      throw;
    }
  }
};

Writer::Writer(std::string path, std::vector<TensorSpec> tensors, WriterOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.path = std::move(path);
  if (options.format == Format::TorchSave) {
    throw Error(ErrorKind::InvalidArgument,
                w.path + ": torch.save archives are written by the LibTorch layer (tensormap::save)");
  }
  w.layout = options.format == Format::Safetensors
                 ? detail::plan_safetensors_layout(tensors, options, w.path, &w.safetensors_header)
                 : detail::plan_layout(tensors, options, w.path);
  w.tensors = std::move(tensors);
  w.options = std::move(options);
  w.checksums.assign(w.tensors.size(), 0);
  w.hash = XXH3_createState();
  if (!w.hash || XXH3_64bits_reset(w.hash) != XXH_OK) {
    throw Error(ErrorKind::Io, w.path + ": cannot allocate a hash state");
  }
  w.file = std::make_unique<detail::AtomicFile>(w.path);
  w.settle();
}

Writer::~Writer() = default;
Writer::Writer(Writer&&) noexcept = default;
Writer& Writer::operator=(Writer&&) noexcept = default;

size_t Writer::tensor_count() const { return impl_->tensors.size(); }
uint64_t Writer::byte_length(size_t index) const { return impl_->layout.byte_lengths.at(index); }
size_t Writer::current_tensor() const { return impl_->current; }

void Writer::write(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_writable();
  if (size == 0) return;
  if (w.current == w.tensors.size()) {
    w.fail_invalid("got " + std::to_string(size) + " bytes after the last tensor was complete");
  }
  const uint64_t room = w.layout.byte_lengths[w.current] - w.written;
  if (size > room) {
    w.fail_invalid("tensor " + detail::quoted(w.tensors[w.current].name) + " takes " +
                   std::to_string(room) + " more bytes, got " + std::to_string(size));
  }
  w.guarded([&] { w.file->pwrite(data, size, w.layout.offsets[w.current] + w.written); });
  XXH3_64bits_update(w.hash, data, size);
  w.written += size;
  w.settle();
}

void Writer::write_tensor(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_writable();
  if (w.current == w.tensors.size()) {
    w.fail_invalid("write_tensor called after every tensor was complete");
  }
  if (w.written != 0 || size != w.layout.byte_lengths[w.current]) {
    w.fail_invalid("tensor " + detail::quoted(w.tensors[w.current].name) + " takes " +
                   std::to_string(w.layout.byte_lengths[w.current]) +
                   " bytes in one piece, got " + std::to_string(size) + " (" +
                   std::to_string(w.written) + " already written)");
  }
  write(data, size);
}

void Writer::finish() {
  Impl& w = *impl_;
  w.check_writable();
  if (w.current != w.tensors.size()) {
    w.fail_invalid("tensor " + detail::quoted(w.tensors[w.current].name) + " received " +
                   std::to_string(w.written) + " of its " +
                   std::to_string(w.layout.byte_lengths[w.current]) +
                   " bytes; nothing was committed");
  }
  w.guarded([&] {
    const auto header = w.options.format == Format::Safetensors
                            ? w.safetensors_header
                            : detail::encode_header(w.tensors, w.options, w.layout, w.checksums);
    w.file->pwrite(header.data(), header.size(), 0);
    w.file->truncate(w.layout.file_size);  // padding is never written: the gaps read as zeros
    w.file->finish(w.options.sync);
  });
  w.finished = true;
}

void Writer::rename_into_place() {
  Impl& w = *impl_;
  if (w.failed || !w.file || !w.finished) {
    w.fail_invalid("rename_into_place needs a finished, not yet renamed writer");
  }
  w.guarded([&] { w.file->rename_into_place(w.options.sync); });
  w.file.reset();
}

void Writer::commit() {
  finish();
  rename_into_place();
}

void Writer::abandon() noexcept { impl_->file.reset(); }

}  // namespace tensormap
