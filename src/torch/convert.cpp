// tensormap::convert: any readable checkpoint into any writable format, tensor by tensor.
#include "tensormap/convert.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <memory>

#include "tensormap/error.h"
#include "tensormap/sharded.h"
#include "tensormap/tensor.h"
#include "tensormap/torch_save.h"
#include "tensormap/writer.h"

namespace tensormap {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}


// Streams every tensor into `writer` (Writer, ShardedWriter or TorchSaveWriter).
// Each tensor is read (with pread, for files) into one buffer the size of the largest
// input tensor, reused throughout: extra memory is that buffer, plus one converted tensor
// when a dtype changes.
template <typename AnyWriter>
uint64_t stream(const StateDict& source, const std::vector<TensorSpec>& specs, AnyWriter& writer,
                const ConvertOptions& options) {
  uint64_t total = 0, done = 0, largest = 0;
  std::vector<StateDict::Info> infos;
  for (size_t i = 0; i < specs.size(); ++i) {
    total += writer.byte_length(i);
    infos.push_back(source.info(specs[i].name));
    largest = std::max(largest, infos.back().byte_length);
  }
  std::unique_ptr<unsigned char[]> buffer(new unsigned char[std::max<uint64_t>(largest, 1)]);
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::string& name = specs[i].name;
    const StateDict::Info& info = infos[i];
    source.read(name, buffer.get());  // bit-identical bytes, whatever the dtype
    if (specs[i].dtype == info.dtype) {
      if (info.byte_length > 0) writer.write_tensor(buffer.get(), info.byte_length);
    } else {
      const at::Tensor in = at::from_blob(buffer.get(), info.shape, at::TensorOptions().dtype(*to_scalar_type(info.dtype)));
      const at::Tensor out = in.to(*to_scalar_type(specs[i].dtype)).contiguous();
      if (out.nbytes() > 0) writer.write_tensor(out.data_ptr(), out.nbytes());
    }
    source.release(name);  // for a torch.save source: its pages go back
    done += writer.byte_length(i);
    if (options.progress) options.progress(done, total, name);
  }
  return total;
}

}  // namespace

ConvertResult convert(const std::string& in, const std::string& out, const ConvertOptions& options) {
  if (options.float_dtype && !is_floating_point(*options.float_dtype)) {
    throw Error(ErrorKind::InvalidArgument, "convert: the float dtype must be F16, BF16, F32 or F64");
  }
  const bool sharded = options.shard_size > 0;
  if (sharded && !ends_with(out, ".index.json")) {
    throw Error(ErrorKind::InvalidArgument, out + ": a sharded output must be an index such as model.safetensors.index.json");
  }
  const std::string file_name = sharded ? out.substr(0, out.size() - 11) : out;
  ConvertResult result{Format::Tensormap};
  if (options.format) {
    result.format = *options.format;
  } else if (ends_with(file_name, ".safetensors")) {
    result.format = Format::Safetensors;
  } else if (ends_with(file_name, ".pt") || ends_with(file_name, ".pth")) {
    result.format = Format::TorchSave;
  }
  if (result.format == Format::TorchSave && sharded) {
    throw Error(ErrorKind::InvalidArgument, out + ": torch.save archives are not sharded");
  }

  const StateDict source = StateDict::open(in);
  std::vector<TensorSpec> specs;
  for (const std::string& name : source.keys()) {
    const StateDict::Info info = source.info(name);
    const Dtype dtype = options.float_dtype && is_floating_point(info.dtype) ? *options.float_dtype : info.dtype;
    specs.push_back({name, dtype, {info.shape.begin(), info.shape.end()}});
  }
  result.tensors = specs.size();
  WriterOptions writer_options;
  writer_options.format = result.format;
  writer_options.alignment = options.alignment;
  writer_options.metadata = source.metadata();
  writer_options.sync = options.sync;
  if (result.format == Format::TorchSave) {
    TorchSaveWriter writer(out, specs, options.sync);
    result.bytes = stream(source, specs, writer, options);
    writer.commit();
  } else if (sharded) {
    ShardedWriter writer(out, specs, options.shard_size, writer_options);
    result.bytes = stream(source, specs, writer, options);
    writer.commit();
    result.shards = writer.shard_count();
  } else {
    Writer writer(out, specs, writer_options);
    result.bytes = stream(source, specs, writer, options);
    writer.commit();
  }
  return result;
}

}  // namespace tensormap
