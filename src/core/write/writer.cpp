// tensormap::Writer: streams tensor bytes into a temporary file, then moves it into place.
// Also the public face every writer class shares (FormatWriter).
//
// The header depends only on the declarations, so its size and every offset are known
// before any data arrives. Data goes to its final offset with pwrite; padding is never
// written: the file is extended with ftruncate at the end and the gaps read as zeros.
// The header, which holds the checksums, is written last.
#include "tensormap/writer.h"

#include <future>
#include <system_error>
#include <thread>

#include "io/posix_io.h"
#include "remote/s3_upload.h"
#include "tensormap/error.h"
#include "tensormap/remote.h"
#include "write/file_writer.h"

namespace tensormap {

TensorWriter::~TensorWriter() = default;

FormatWriter::FormatWriter(std::unique_ptr<detail::WriterCore> core) : core_(std::move(core)) {}
FormatWriter::~FormatWriter() {
  if (core_) core_->abandon();
}
FormatWriter::FormatWriter(FormatWriter&&) noexcept = default;
FormatWriter& FormatWriter::operator=(FormatWriter&& other) noexcept {
  if (this != &other) {
    if (core_) core_->abandon();
    core_ = std::move(other.core_);
  }
  return *this;
}

size_t FormatWriter::tensor_count() const { return core_->cursor().size(); }
uint64_t FormatWriter::byte_length(size_t index) const { return core_->cursor().byte_lengths().at(index); }
size_t FormatWriter::current_tensor() const { return core_->cursor().current(); }
void FormatWriter::write(const void* data, size_t size) { core_->write(data, size); }
void FormatWriter::write_tensor(const void* data, size_t size) { core_->write_tensor(data, size); }
void FormatWriter::commit() { core_->commit(); }
void FormatWriter::abandon() noexcept { core_->abandon(); }

Writer::Writer(std::string path, std::vector<TensorSpec> tensors, WriterOptions options)
    : FormatWriter(std::make_unique<detail::FileWriterCore>(std::move(path), std::move(tensors), std::move(options))) {}

namespace detail {

FileWriterCore::FileWriterCore(std::string path, std::vector<TensorSpec> tensors, WriterOptions options)
    : FileWriterCore(path, std::move(tensors), std::move(options), [&path]() -> std::unique_ptr<Output> {
        if (is_url(path)) return std::make_unique<S3Upload>(path, RemoteOptions::from_environment());
        return std::make_unique<AtomicFile>(path);
      }) {}

FileWriterCore::FileWriterCore(std::string path, std::vector<TensorSpec> tensors, WriterOptions options,
                               const std::function<std::unique_ptr<Output>()>& make_output)
    : WriterCore(std::move(path), tensors, options.format == Format::Tensormap) {
  if (options.format == Format::TorchSave) {
    throw Error(ErrorKind::InvalidArgument, this->path() + ": torch.save archives are written by TorchSaveWriter");
  }
  const auto& lengths = cursor().byte_lengths();
  layout_ = options.format == Format::Safetensors
                ? plan_safetensors_layout(tensors, lengths, options, this->path(), &safetensors_header_)
                : plan_layout(tensors, lengths, cursor().aliases(), options, this->path());
  tensors_ = std::move(tensors);
  options_ = std::move(options);
  checksums_.assign(tensors_.size(), 0);
  hash_.reset(XXH3_createState());
  if (!hash_ || XXH3_64bits_reset(hash_.get()) != XXH_OK) {
    throw Error(ErrorKind::Io, this->path() + ": cannot allocate a hash state");
  }
  output_ = make_output();
  output_->plan(layout_.file_size, layout_.header_size);
  start();
}

FileWriterCore::~FileWriterCore() = default;

void FileWriterCore::put(const void* data, size_t size, size_t tensor, uint64_t at) {
  // A large piece is hashed on a second thread while this one writes it: the copy into
  // the page cache and the hash each read the same bytes, and one need not wait for the
  // other (where a second core is free, the hash costs no time: some 20% of a save).
  static const bool two_cores = std::thread::hardware_concurrency() > 1;
  std::future<void> hashed;
  if (two_cores && size >= kHashAside) {
    try {
      hashed = std::async(std::launch::async, [&] { XXH3_64bits_update(hash_.get(), data, size); });
    } catch (const std::system_error&) {  // no thread to be had: hash here, after the write
    }
  }
  output_->pwrite(data, size, layout_.offsets[tensor] + at);  // on a throw, ~future joins the hash
  if (hashed.valid()) {
    hashed.get();
  } else {
    XXH3_64bits_update(hash_.get(), data, size);
  }
}

void FileWriterCore::tensor_done(size_t tensor) {
  checksums_[tensor] = XXH3_64bits_digest(hash_.get());
  XXH3_64bits_reset(hash_.get());
}

void FileWriterCore::copy_tensor(int fd, uint64_t offset, uint64_t size, uint64_t checksum, const std::string& what) {
  check_open();
  cursor().check_whole(size);
  if (size == 0) return;
  const size_t i = cursor().current();
  guarded([&] {
    output_->copy_from(fd, offset, size, layout_.offsets[i], what);
    advance(size);             // records the hash of no bytes ...
    checksums_[i] = checksum;  // ... which the source's checksum replaces
  });
}

void FileWriterCore::seal() {
  const auto header = options_.format == Format::Safetensors ? safetensors_header_
                                                             : encode_header(tensors_, options_, layout_, checksums_);
  output_->pwrite(header.data(), header.size(), 0);
  output_->truncate(layout_.file_size);  // padding is never written: the gaps read as zeros
  output_->finish(options_.sync);
}

void FileWriterCore::publish() {
  output_->publish(options_.sync);
  output_.reset();
}

void FileWriterCore::discard() noexcept {
  if (output_) output_->discard();
  output_.reset();
}

}  // namespace detail
}  // namespace tensormap
