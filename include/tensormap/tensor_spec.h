// What a save declares before any byte is written: each tensor (TensorSpec) and how the
// checkpoint is written (WriterOptions). The writers are in writer.h.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/format.h"

namespace tensormap {

struct TensorSpec {
  std::string name;
  Dtype dtype;
  std::vector<uint64_t> shape;
  // Another name for the bytes of a tensor declared earlier (a tied weight), which must
  // have this dtype and shape and not be empty: the bytes are stored once and this
  // tensor receives none (byte_length() is 0). Only writers for which supports_aliases()
  // holds take aliases; a tensormap file that has one is format 2.0 (spec/FORMAT.md).
  std::optional<std::string> alias_of = std::nullopt;
};

struct WriterOptions {
  // Tensormap only: every tensor starts on a multiple of this (a power of two, 64 to 1 MiB).
  uint64_t alignment = 4096;
  // String-to-string metadata; keys must be unique.
  std::vector<std::pair<std::string, std::string>> metadata;
  // fsync the file and its directory before and after the rename. Turning it off trades
  // durability against a power cut for speed; atomicity against crashes stays.
  bool sync = true;
  // Tensormap; Safetensors: a file any safetensors reader accepts, its tensors laid out
  // by element size (largest first) so that each is aligned to it, its JSON header padded
  // with spaces so that the data starts on a 4096-byte boundary; TorchSave: an archive
  // Python's torch.load reads (torch_save.h).
  Format format = Format::Tensormap;
  // open_writer() only: > 0 writes a sharded checkpoint whose shards hold at most this
  // many bytes of tensor data each (sharded.h); the path is then the index.
  uint64_t shard_size = 0;
};

}  // namespace tensormap
