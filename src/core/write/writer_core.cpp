// The TensorWriter contract, implemented once: see writer_core.h.
#include "write/writer_core.h"

#include "tensormap/error.h"

namespace tensormap::detail {

WriterCore::WriterCore(std::string path, const std::vector<TensorSpec>& tensors, bool aliases)
    : cursor_(std::move(path), tensors, aliases) {}

WriterCore::~WriterCore() = default;

void WriterCore::start() {
  guarded([&] { advance(0); });
}

void WriterCore::check_open() const {
  if (failed_) throw Error(ErrorKind::InvalidArgument, path() + ": the writer failed earlier and was abandoned");
  if (state_ != State::Open) {
    throw Error(ErrorKind::InvalidArgument, path() + ": the writer was already committed or abandoned");
  }
}

void WriterCore::advance(size_t size) {
  cursor_.advance(size, [&](size_t done) { tensor_done(done); });
}

void WriterCore::write(const void* data, size_t size) {
  check_open();
  cursor_.check_write(size);
  if (size == 0) return;
  guarded([&] {
    put(data, size, cursor_.current(), cursor_.written());
    advance(size);
  });
}

void WriterCore::write_tensor(const void* data, size_t size) {
  check_open();
  cursor_.check_whole(size);
  write(data, size);
}

void WriterCore::seal_all() {
  check_open();
  cursor_.check_complete();
  guarded([&] { seal(); });
  state_ = State::Sealed;
}

void WriterCore::publish_all() {
  if (failed_ || state_ != State::Sealed) {
    throw Error(ErrorKind::InvalidArgument, path() + ": publishing needs a sealed writer not yet published");
  }
  guarded([&] { publish(); });
  state_ = State::Done;
}

void WriterCore::commit() {
  seal_all();
  publish_all();
}

void WriterCore::abandon() noexcept {
  if (state_ == State::Done) return;
  discard();
  state_ = State::Done;
}

}  // namespace tensormap::detail
