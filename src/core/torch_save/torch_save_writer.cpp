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

#include "format/names.h"
#include "io/posix_io.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "tensormap/remote.h"
#include "torch_save/torch_names.h"
#include "torch_save/zip.h"
#include "write/writer_core.h"

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
std::string pickle_state_dict(const std::vector<TensorSpec>& tensors,
                              const std::vector<std::optional<size_t>>& aliases) {
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

namespace detail {
namespace {

// A torch.save archive through the writer core: the pickle and byte order first, then one
// zip record per tensor that is not an alias, then the version and the zip directory.
class TorchSaveCore final : public WriterCore {
 public:
  TorchSaveCore(std::string path, std::vector<TensorSpec> tensors, const WriterOptions& options)
      : WriterCore(std::move(path), tensors, /*aliases=*/true), sync_(options.sync) {
    if (is_url(this->path())) {  // a zip patches each record's header after its data: no stream
      throw Error(ErrorKind::InvalidArgument, this->path() +
                                                  ": torch.save archives are written to local files only; save "
                                                  "tensormap or safetensors to a URL");
    }
    output_ = std::make_unique<AtomicFile>(this->path());
    zip_ = std::make_unique<ZipWriter>(*output_, 64);
    guarded([&] {
      const std::string pickle = pickle_state_dict(tensors, cursor().aliases());
      zip_->add_record("archive/data.pkl", pickle.data(), pickle.size());
      zip_->add_record("archive/byteorder", "little", 6);
    });
    start();
  }

 private:
  static std::string record(size_t i) { return "archive/data/" + std::to_string(i); }

  void put(const void* data, size_t size, size_t tensor, uint64_t at) override {
    if (at == 0) zip_->begin_record(record(tensor));
    zip_->append(data, size);
  }
  // Closes the tensor's record (a zero-length one opens it first); an alias has none: it
  // shares its target's.
  void tensor_done(size_t tensor) override {
    if (cursor().aliases()[tensor]) return;
    if (cursor().byte_lengths()[tensor] == 0) zip_->begin_record(record(tensor));
    zip_->end_record();
  }
  void seal() override {
    zip_->add_record("archive/version", "3\n", 2);
    zip_->finish();
    output_->finish(sync_);
  }
  void publish() override {
    output_->publish(sync_);
    zip_.reset();
    output_.reset();
  }
  void discard() noexcept override {
    zip_.reset();
    if (output_) output_->discard();
    output_.reset();
  }

  bool sync_;
  std::unique_ptr<Output> output_;  // null once published or discarded
  std::unique_ptr<ZipWriter> zip_;
};

}  // namespace
}  // namespace detail

TorchSaveWriter::TorchSaveWriter(std::string path, std::vector<TensorSpec> tensors, WriterOptions options)
    : FormatWriter(std::make_unique<detail::TorchSaveCore>(std::move(path), std::move(tensors), options)) {}

}  // namespace tensormap
