// Which writer a save gets: the top of the writers (writer.h).
#include "tensormap/error.h"
#include "tensormap/sharded.h"
#include "tensormap/torch_save.h"
#include "tensormap/writer.h"

namespace tensormap {

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

}  // namespace tensormap
