// Layout arithmetic shared by the reader and the writer.
#include "tensormap/format.h"

#include "util/bytes.h"

namespace tensormap {

const char* format_name(Format format) {
  switch (format) {
    case Format::Tensormap: return "tensormap";
    case Format::Safetensors: return "safetensors";
    case Format::TorchSave: return "torch.save";
  }
  return "unknown";
}

const char* format_name(CheckpointFormat format) {
  switch (format) {
    case CheckpointFormat::Tensormap: return "tensormap";
    case CheckpointFormat::Safetensors: return "safetensors";
    case CheckpointFormat::ShardedTensormap: return "sharded tensormap";
    case CheckpointFormat::ShardedSafetensors: return "sharded safetensors";
    case CheckpointFormat::TorchSave: return "torch.save";
  }
  return "unknown";
}

bool is_sharded(CheckpointFormat format) {
  return format == CheckpointFormat::ShardedTensormap || format == CheckpointFormat::ShardedSafetensors;
}

std::optional<Format> format_from_name(std::string_view name) {
  if (name == "tensormap") return Format::Tensormap;
  if (name == "safetensors") return Format::Safetensors;
  if (name == "torch.save" || name == "torch") return Format::TorchSave;
  return std::nullopt;
}

Format format_for_path(std::string_view path) {
  const auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.substr(path.size() - suffix.size()) == suffix;
  };
  if (ends_with(".index.json")) path.remove_suffix(std::string_view(".index.json").size());
  if (ends_with(".safetensors")) return Format::Safetensors;
  if (ends_with(".pt") || ends_with(".pth")) return Format::TorchSave;
  return Format::Tensormap;
}

}  // namespace tensormap

namespace tensormap::format {

std::optional<uint64_t> tensor_byte_length(const uint64_t* shape, unsigned rank, uint64_t element_size) {
  // Spec rule 15: every dimension below 2^63, and the product of the non-zero ones times
  // the element size below 2^63, in any order. So a zero dimension empties the tensor but
  // excuses no overflow of the others: every shape that passes fits a 64-bit size in
  // whatever order a framework multiplies it (numpy, torch, a left-to-right loop).
  uint64_t total = element_size;
  bool has_zero = false;
  for (unsigned d = 0; d < rank; ++d) {
    if (shape[d] > kMaxFileOffset) return std::nullopt;
    if (shape[d] == 0) {
      has_zero = true;
      continue;
    }
    const auto next = detail::checked_mul(total, shape[d]);
    if (!next || *next > kMaxFileOffset) return std::nullopt;
    total = *next;
  }
  return has_zero ? 0 : total;
}

}  // namespace tensormap::format
