// Writes torch.save archives: LibTorch's PyTorchStreamWriter makes the zip, fed through
// an AtomicFile; the pickle is written here, in the protocol-2 subset torch.load expects:
//   OrderedDict(name -> torch._utils._rebuild_tensor_v2(
//       persistent ('storage', torch.<T>Storage, key, 'cpu', numel), 0, size, stride, False, OrderedDict()))
// and, for the dtypes that have no typed storage class (U16, U32, U64, F8), as torch 2.x
// writes them (torch 1.x cannot read these):
//   torch._utils._rebuild_tensor_v3(
//       persistent ('storage', torch.storage.UntypedStorage, key, 'cpu', bytes), 0, size, stride, False,
//       OrderedDict(), torch.<dtype>)
#include "tensormap/torch_save.h"

#include <caffe2/serialize/inline_container.h>

#include <unordered_set>

#include "../core/posix_io.h"
#include "tensormap/error.h"
#include "tensormap/format.h"

namespace tensormap {
namespace {

const char* storage_class(Dtype dtype) {
  switch (dtype) {
    case Dtype::BOOL: return "BoolStorage";
    case Dtype::U8: return "ByteStorage";
    case Dtype::I8: return "CharStorage";
    case Dtype::I16: return "ShortStorage";
    case Dtype::I32: return "IntStorage";
    case Dtype::I64: return "LongStorage";
    case Dtype::F16: return "HalfStorage";
    case Dtype::BF16: return "BFloat16Storage";
    case Dtype::F32: return "FloatStorage";
    case Dtype::F64: return "DoubleStorage";
    case Dtype::C64: return "ComplexFloatStorage";
    case Dtype::C128: return "ComplexDoubleStorage";
    default: return nullptr;
  }
}

// The torch 2.x dtype of the dtypes written with _rebuild_tensor_v3.
const char* torch2_dtype(Dtype dtype) {
  switch (dtype) {
    case Dtype::U16: return "uint16";
    case Dtype::U32: return "uint32";
    case Dtype::U64: return "uint64";
    case Dtype::F8_E4M3: return "float8_e4m3fn";
    case Dtype::F8_E5M2: return "float8_e5m2";
    default: return nullptr;
  }
}

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

std::string pickle_state_dict(const std::vector<TensorSpec>& tensors) {
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
    const bool typed = storage_class(t.dtype) != nullptr;
    p.string(t.name);
    p.global("torch._utils", typed ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3");
    p.op('(');
    p.op('(');
    p.string("storage");
    p.global(typed ? "torch" : "torch.storage", typed ? storage_class(t.dtype) : "UntypedStorage");
    p.string(std::to_string(i));
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
    if (!typed) p.global("torch", torch2_dtype(t.dtype));
    p.op('t');
    p.op('R');
  }
  p.op('u');  // SETITEMS
  p.op('.');
  return p.text();
}

}  // namespace

struct TorchSaveWriter::Impl {
  std::string path;
  std::vector<TensorSpec> tensors;
  std::vector<uint64_t> byte_lengths;
  bool sync = true;
  bool abandoned = false;
  size_t current = 0;
  std::unique_ptr<detail::AtomicFile> file;
  std::unique_ptr<caffe2::serialize::PyTorchStreamWriter> zip;

  ~Impl() {
    abandoned = true;  // the zip writer finalises in its destructor; let those bytes go nowhere
    zip.reset();
    file.reset();
  }
};

TorchSaveWriter::TorchSaveWriter(std::string path, std::vector<TensorSpec> tensors, bool sync)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.path = std::move(path);
  w.sync = sync;
  std::unordered_set<std::string> names;
  for (const auto& t : tensors) {
    if (!storage_class(t.dtype) && !torch2_dtype(t.dtype)) {
      throw Error(ErrorKind::UnsupportedDtype, w.path + ": tensor '" + t.name + "' has dtype " +
                                                   std::string(dtype_name(t.dtype)) +
                                                   ", which a torch.save archive cannot hold");
    }
    if (!names.insert(t.name).second) {
      throw Error(ErrorKind::InvalidArgument, w.path + ": tensor '" + t.name + "' is declared twice");
    }
    const auto n = format::tensor_byte_length(t.shape.data(), static_cast<unsigned>(t.shape.size()), dtype_size(t.dtype));
    if (!n) throw Error(ErrorKind::InvalidArgument, w.path + ": tensor '" + t.name + "' is too large");
    w.byte_lengths.push_back(*n);
  }
  w.tensors = std::move(tensors);
  w.file = std::make_unique<detail::AtomicFile>(w.path);
  Impl* self = &w;
  w.zip = std::make_unique<caffe2::serialize::PyTorchStreamWriter>([self](const void* data, size_t n) -> size_t {
    if (self->abandoned || !self->file || !self->file->open()) return n;
    try {
      self->file->append(data, n);
      return n;
    } catch (const Error&) {
      self->abandoned = true;
      return 0;  // the zip writer reports the failure
    }
  });
}

TorchSaveWriter::~TorchSaveWriter() = default;

size_t TorchSaveWriter::tensor_count() const { return impl_->tensors.size(); }
uint64_t TorchSaveWriter::byte_length(size_t index) const { return impl_->byte_lengths.at(index); }

void TorchSaveWriter::write_tensor(const void* data, size_t size) {
  Impl& w = *impl_;
  if (!w.zip || w.abandoned) throw Error(ErrorKind::InvalidArgument, w.path + ": the writer was committed or failed");
  try {
    // Empty tensors are written on the caller's behalf, as Writer passes over them.
    while (size > 0 && w.current < w.tensors.size() && w.byte_lengths[w.current] == 0) {
      w.zip->writeRecord("data/" + std::to_string(w.current), nullptr, 0);
      ++w.current;
    }
    if (w.current == w.tensors.size() || size != w.byte_lengths[w.current]) {
      throw Error(ErrorKind::InvalidArgument, w.path + ": write_tensor wants exactly the next whole tensor");
    }
    w.zip->writeRecord("data/" + std::to_string(w.current), data, size);
  } catch (const c10::Error& e) {
    w.abandoned = true;
    throw Error(ErrorKind::Io, w.path + ": writing tensor '" + w.tensors[w.current].name + "' failed: " +
                                   e.what_without_backtrace());
  }
  ++w.current;
}

void TorchSaveWriter::commit() {
  Impl& w = *impl_;
  try {
    while (w.current < w.tensors.size() && w.byte_lengths[w.current] == 0) {
      w.zip->writeRecord("data/" + std::to_string(w.current++), nullptr, 0);
    }
  } catch (const c10::Error& e) {
    w.abandoned = true;
    throw Error(ErrorKind::Io, w.path + ": writing an empty tensor failed: " + e.what_without_backtrace());
  }
  if (w.current != w.tensors.size()) {
    throw Error(ErrorKind::InvalidArgument, w.path + ": tensor '" + w.tensors[w.current].name + "' was not written");
  }
  try {
    const std::string pickle = pickle_state_dict(w.tensors);
    w.zip->writeRecord("data.pkl", pickle.data(), pickle.size());
    w.zip->writeRecord("byteorder", "little", 6);
    w.zip->writeEndOfFile();
  } catch (const c10::Error& e) {
    w.abandoned = true;
    throw Error(ErrorKind::Io, w.path + ": finishing the archive failed: " + e.what_without_backtrace());
  }
  if (w.abandoned) throw Error(ErrorKind::Io, w.path + ": a write failed; nothing was committed");
  w.file->finish(w.sync);
  w.file->rename_into_place(w.sync);
  w.zip.reset();
}

}  // namespace tensormap
