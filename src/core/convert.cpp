// tensormap::convert: any readable checkpoint into any writable format, tensor by tensor,
// without LibTorch.
#include "tensormap/convert.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "io/posix_io.h"
#include "tensormap/checkpoint.h"
#include "tensormap/error.h"
#include "tensormap/sharded.h"
#include "tensormap/writer.h"

namespace tensormap {
namespace {

// Streams every tensor into `writer` in pieces of at most kStreamPieceBytes: extra memory is one
// such buffer, plus one of converted values when a dtype changes (the piece read is then
// small enough for its converted values to fit too), whatever the sizes of the tensors.
uint64_t stream(const Checkpoint& source, const std::vector<TensorSpec>& specs, TensorWriter& writer,
                const ConvertOptions& options) {
  uint64_t total = 0, done = 0;
  for (size_t i = 0; i < specs.size(); ++i) total += writer.byte_length(i);
  std::unique_ptr<unsigned char[]> buffer(new unsigned char[detail::kStreamPieceBytes]);
  std::unique_ptr<unsigned char[]> converted;  // allocated at the first dtype change
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::string& name = specs[i].name;
    if (specs[i].alias_of) {  // stored once, with its target
      if (options.progress) options.progress(done, total, name);
      continue;
    }
    const Dtype from = source.info(name).dtype, to = specs[i].dtype;
    uint64_t piece = detail::kStreamPieceBytes;
    if (from != to) {
      if (!converted) converted.reset(new unsigned char[detail::kStreamPieceBytes]);
      if (dtype_size(to) > dtype_size(from)) piece = detail::kStreamPieceBytes / (dtype_size(to) / dtype_size(from));
    }
    source.read_chunks(name, buffer.get(), piece, [&](const void* data, uint64_t size) {
      if (from == to) {
        writer.write(data, size);  // bit-identical bytes, whatever the dtype
        done += size;
      } else {
        const uint64_t count = size / dtype_size(from);
        convert_floats(from, data, to, converted.get(), count);
        writer.write(converted.get(), count * dtype_size(to));
        done += count * dtype_size(to);
      }
      if (options.progress) options.progress(done, total, name);
    });
    source.evict(name);  // the input's pages go back
    if (writer.byte_length(i) == 0 && options.progress) options.progress(done, total, name);
  }
  return total;
}

}  // namespace

ConvertResult convert(const std::string& in, const std::string& out, const ConvertOptions& options) {
  if (options.float_dtype && !is_floating_point(*options.float_dtype)) {
    throw Error(ErrorKind::InvalidArgument, "convert: the float dtype must be F16, BF16, F32 or F64");
  }
  const bool sharded = options.shard_size > 0;
  if (sharded && (out.size() < 11 || out.compare(out.size() - 11, 11, ".index.json") != 0)) {
    throw Error(ErrorKind::InvalidArgument,
                out + ": a sharded output must be an index such as model.safetensors.index.json");
  }
  ConvertResult result{options.format ? *options.format : format_for_path(out)};
  if (result.format == Format::TorchSave && sharded) {
    throw Error(ErrorKind::InvalidArgument, out + ": torch.save archives are not sharded");
  }

  const Checkpoint source = Checkpoint::open(in);
  WriterOptions writer_options;
  writer_options.format = result.format;
  writer_options.alignment = options.alignment;
  writer_options.metadata = source.metadata();
  writer_options.sync = options.sync;
  writer_options.shard_size = options.shard_size;
  // Tied tensors stay stored once where the output can say so, and are written under
  // each name where it cannot (safetensors, sharded checkpoints).
  const bool aliases = supports_aliases(writer_options);
  std::vector<TensorSpec> specs;
  for (const std::string& name : source.keys()) {
    const TensorInfo info = source.info(name);
    const Dtype dtype = options.float_dtype && is_floating_point(info.dtype) ? *options.float_dtype : info.dtype;
    specs.push_back(
        {name, dtype, {info.shape.begin(), info.shape.end()}, aliases ? source.alias_of(name) : std::nullopt});
  }
  result.tensors = specs.size();
  const std::unique_ptr<TensorWriter> writer = open_writer(out, specs, writer_options);
  result.bytes = stream(source, specs, *writer, options);
  writer->commit();
  if (const auto* shards = dynamic_cast<const ShardedWriter*>(writer.get())) result.shards = shards->shard_count();
  return result;
}

}  // namespace tensormap
