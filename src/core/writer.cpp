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
#include "tensormap/sharded.h"
#include "tensormap/torch_save.h"
#include "write_cursor.h"

namespace tensormap {

TensorWriter::~TensorWriter() = default;

bool supports_aliases(const WriterOptions& options) {
  return options.shard_size == 0 && (options.format == Format::Tensormap || options.format == Format::TorchSave);
}

std::unique_ptr<TensorWriter> open_writer(std::string path, std::vector<TensorSpec> tensors, WriterOptions options) {
  if (options.shard_size > 0) {
    if (options.format == Format::TorchSave) {
      throw Error(ErrorKind::InvalidArgument, path + ": torch.save archives are not sharded");
    }
    const uint64_t shard_size = options.shard_size;
    return std::make_unique<ShardedWriter>(std::move(path), std::move(tensors), shard_size, std::move(options));
  }
  if (options.format == Format::TorchSave) {
    return std::make_unique<TorchSaveWriter>(std::move(path), std::move(tensors), std::move(options));
  }
  return std::make_unique<Writer>(std::move(path), std::move(tensors), std::move(options));
}

struct Writer::Impl {
  Impl(std::string p, const std::vector<TensorSpec>& tensors, bool aliases)
      : path(std::move(p)), cursor(path, tensors, aliases) {}
  std::string path;
  detail::WriteCursor cursor;  // checks the declarations and the order of writes
  std::unique_ptr<detail::AtomicFile> file;  // null once committed or abandoned
  std::vector<TensorSpec> tensors;
  WriterOptions options;
  detail::Layout layout;
  std::vector<unsigned char> safetensors_header;  // known up front; tensormap's is not
  std::vector<uint64_t> checksums;
  XXH3_state_t* hash = nullptr;
  bool failed = false;
  bool finished = false;

  ~Impl() {
    if (hash) XXH3_freeState(hash);
  }

  // Records `size` bytes of the current tensor; each tensor that completes gets its
  // checksum (zero-length ones included).
  void advance(size_t size) {
    cursor.advance(size, [&](size_t done) {
      checksums[done] = XXH3_64bits_digest(hash);
      XXH3_64bits_reset(hash);
    });
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
    : impl_(std::make_unique<Impl>(std::move(path), tensors, options.format == Format::Tensormap)) {
  Impl& w = *impl_;
  if (options.format == Format::TorchSave) {
    throw Error(ErrorKind::InvalidArgument, w.path + ": torch.save archives are written by TorchSaveWriter");
  }
  const auto& lengths = w.cursor.byte_lengths();
  w.layout = options.format == Format::Safetensors
                 ? detail::plan_safetensors_layout(tensors, lengths, options, w.path, &w.safetensors_header)
                 : detail::plan_layout(tensors, lengths, w.cursor.aliases(), options, w.path);
  w.tensors = std::move(tensors);
  w.options = std::move(options);
  w.checksums.assign(w.tensors.size(), 0);
  w.hash = XXH3_createState();
  if (!w.hash || XXH3_64bits_reset(w.hash) != XXH_OK) {
    throw Error(ErrorKind::Io, w.path + ": cannot allocate a hash state");
  }
  w.file = std::make_unique<detail::AtomicFile>(w.path);
  w.advance(0);
}

Writer::~Writer() = default;
Writer::Writer(Writer&&) noexcept = default;
Writer& Writer::operator=(Writer&&) noexcept = default;

size_t Writer::tensor_count() const { return impl_->tensors.size(); }
uint64_t Writer::byte_length(size_t index) const { return impl_->cursor.byte_lengths().at(index); }
size_t Writer::current_tensor() const { return impl_->cursor.current(); }

void Writer::write(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_writable();
  w.cursor.check_write(size);
  if (size == 0) return;
  const size_t i = w.cursor.current();
  w.guarded([&] { w.file->pwrite(data, size, w.layout.offsets[i] + w.cursor.written()); });
  XXH3_64bits_update(w.hash, data, size);
  w.advance(size);
}

void Writer::write_tensor(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_writable();
  w.cursor.check_whole(size);
  write(data, size);
}

void Writer::copy_tensor(int fd, uint64_t offset, uint64_t size, uint64_t checksum, const std::string& what) {
  Impl& w = *impl_;
  w.check_writable();
  w.cursor.check_whole(size);
  if (size == 0) return;
  const size_t i = w.cursor.current();
  w.guarded([&] { w.file->copy_from(fd, offset, size, w.layout.offsets[i], what); });
  w.advance(size);  // records the hash of no bytes ...
  w.checksums[i] = checksum;  // ... which the source's checksum replaces
}

void Writer::finish() {
  Impl& w = *impl_;
  w.check_writable();
  w.cursor.check_complete();
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
