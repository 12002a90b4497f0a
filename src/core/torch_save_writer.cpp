// Writes torch.save archives without LibTorch: a zip of stored records (zip.h) through an
// AtomicFile, in the layout torch.save makes: archive/data.pkl, archive/byteorder, one
// record per tensor (archive/data/<index>, its data 64-byte aligned), archive/version.
// The pickle is known from the declarations alone, so it is written first; it is the
// protocol-2 subset torch.load expects:
//   OrderedDict(name -> torch._utils._rebuild_tensor_v2(
//       persistent ('storage', torch.<T>Storage, key, 'cpu', numel), 0, size, stride, False, OrderedDict()))
// and, for the dtypes that have no typed storage class (U16, U32, U64, F8), as torch 2.x
// writes them (torch 1.x cannot read these):
//   torch._utils._rebuild_tensor_v3(
//       persistent ('storage', torch.storage.UntypedStorage, key, 'cpu', bytes), 0, size, stride, False,
//       OrderedDict(), torch.<dtype>)
#include "tensormap/torch_save.h"

#include <memory>

#include "names.h"
#include "posix_io.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "torch_names.h"
#include "write_cursor.h"
#include "zip.h"

namespace tensormap {
namespace {

// Pickle opcodes, protocol 2.
class PickleOut {
 public:
  void op(char c) { out_ += c; }
  void global(const std::string& module, const std::string& name) { out_ += "c" + module + "\n" + name + "\n"; }
  void string(const std::string& s) {
    out_ += 'X';
    u32(static_cast<uint32_t>(s.size()));
    out_ += s;
  }
  void integer(int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) {
      out_ += 'J';
      u32(static_cast<uint32_t>(static_cast<int32_t>(v)));
    } else {
      out_ += static_cast<char>(0x8a);  // LONG1, 8 bytes little-endian
      out_ += static_cast<char>(8);
      for (int i = 0; i < 8; ++i) out_ += static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xFF);
    }
  }
  void int_tuple(const std::vector<int64_t>& values) {
    op('(');
    for (int64_t v : values) integer(v);
    op('t');
  }
  const std::string& text() const { return out_; }

 private:
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_ += static_cast<char>((v >> (8 * i)) & 0xFF);
  }
  std::string out_;
};

// An alias (aliases[i]) is a second tensor over its target's storage record, as
// torch.save writes tied weights.
std::string pickle_state_dict(const std::vector<TensorSpec>& tensors, const std::vector<std::optional<size_t>>& aliases) {
  PickleOut p;
  p.op(static_cast<char>(0x80));
  p.op(2);  // PROTO 2
  p.global("collections", "OrderedDict");
  p.op(')');
  p.op('R');
  p.op('(');
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorSpec& t = tensors[i];
    std::vector<int64_t> sizes(t.shape.begin(), t.shape.end()), strides(sizes.size());
    int64_t stride = 1, numel = 1;
    for (size_t d = sizes.size(); d-- > 0;) {
      strides[d] = stride;
      stride *= sizes[d];
    }
    for (int64_t s : sizes) numel *= s;
    const bool typed = detail::storage_class_of(t.dtype) != nullptr;
    p.string(t.name);
    p.global("torch._utils", typed ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3");
    p.op('(');
    p.op('(');
    p.string("storage");
    p.global(typed ? "torch" : "torch.storage", typed ? detail::storage_class_of(t.dtype) : "UntypedStorage");
    p.string(std::to_string(aliases[i].value_or(i)));
    p.string("cpu");
    p.integer(typed ? numel : numel * dtype_size(t.dtype));  // an untyped storage counts bytes
    p.op('t');
    p.op('Q');  // BINPERSID
    p.integer(0);
    p.int_tuple(sizes);
    p.int_tuple(strides);
    p.op(static_cast<char>(0x89));  // False: requires_grad
    p.global("collections", "OrderedDict");
    p.op(')');
    p.op('R');  // backward hooks
    if (!typed) p.global("torch", detail::torch_name_of(t.dtype));
    p.op('t');
    p.op('R');
  }
  p.op('u');  // SETITEMS
  p.op('.');
  return p.text();
}

}  // namespace

struct TorchSaveWriter::Impl {
  Impl(std::string p, const std::vector<TensorSpec>& tensors) : path(std::move(p)), cursor(path, tensors, /*aliases=*/true) {}
  std::string path;
  detail::WriteCursor cursor;
  std::vector<TensorSpec> tensors;
  bool sync = true;
  std::unique_ptr<detail::AtomicFile> file;  // null once committed or abandoned
  std::unique_ptr<detail::ZipWriter> zip;
  bool failed = false;

  static std::string record(size_t i) { return "archive/data/" + std::to_string(i); }

  void check_writable() const {
    if (failed) throw Error(ErrorKind::InvalidArgument, path + ": the writer failed earlier and was abandoned");
    if (!file) throw Error(ErrorKind::InvalidArgument, path + ": the writer was already committed or abandoned");
  }
  // Runs `step` on the file; on any failure the writer is abandoned.
  template <typename Step>
  void guarded(Step step) {
    try {
      step();
    } catch (...) {
      failed = true;
      zip.reset();
      file.reset();
      throw;
    }
  }
  // Records `size` bytes of the current tensor; each tensor that completes closes its
  // record (a zero-length one opens it first).
  void advance(size_t size) {
    cursor.advance(size, [&](size_t done) {
      if (cursor.aliases()[done]) return;  // no record: it shares its target's
      if (cursor.byte_lengths()[done] == 0) zip->begin_record(record(done));
      zip->end_record();
    });
  }
};

TorchSaveWriter::TorchSaveWriter(std::string path, std::vector<TensorSpec> tensors, WriterOptions options)
    : impl_(std::make_unique<Impl>(std::move(path), tensors)) {
  Impl& w = *impl_;
  w.tensors = std::move(tensors);
  w.sync = options.sync;
  w.file = std::make_unique<detail::AtomicFile>(w.path);
  w.zip = std::make_unique<detail::ZipWriter>(*w.file, 64);
  w.guarded([&] {
    const std::string pickle = pickle_state_dict(w.tensors, w.cursor.aliases());
    w.zip->add_record("archive/data.pkl", pickle.data(), pickle.size());
    w.zip->add_record("archive/byteorder", "little", 6);
    w.advance(0);
  });
}

TorchSaveWriter::~TorchSaveWriter() = default;

size_t TorchSaveWriter::tensor_count() const { return impl_->tensors.size(); }
uint64_t TorchSaveWriter::byte_length(size_t index) const { return impl_->cursor.byte_lengths().at(index); }
size_t TorchSaveWriter::current_tensor() const { return impl_->cursor.current(); }

void TorchSaveWriter::write(const void* data, size_t size) {
  Impl& w = *impl_;
  w.check_writable();
  w.cursor.check_write(size);
  if (size == 0) return;
  w.guarded([&] {
    if (w.cursor.written() == 0) w.zip->begin_record(Impl::record(w.cursor.current()));
    w.zip->append(data, size);
    w.advance(size);
  });
}

void TorchSaveWriter::write_tensor(const void* data, size_t size) {
  impl_->check_writable();
  impl_->cursor.check_whole(size);
  write(data, size);
}

void TorchSaveWriter::commit() {
  Impl& w = *impl_;
  w.check_writable();
  w.cursor.check_complete();
  w.guarded([&] {
    w.zip->add_record("archive/version", "3\n", 2);
    w.zip->finish();
    w.file->finish(w.sync);
    w.file->rename_into_place(w.sync);
  });
  w.zip.reset();
  w.file.reset();
}

void TorchSaveWriter::abandon() noexcept {
  impl_->zip.reset();
  impl_->file.reset();
}

}  // namespace tensormap
