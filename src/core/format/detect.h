// Recognising a checkpoint's format from its first bytes: one pure function, traced to the
// spec (detect.cpp lists the facts, in the order they are tried). Internal to the core.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tensormap::detail {

// What the first bytes of a file say it is.
enum class Detected { Tensormap, Safetensors, ShardIndex, TorchSave };
// `head`: the file's first bytes (up to 72); `file_size`: its whole size.
Detected detect(const unsigned char* head, size_t head_size, uint64_t file_size);

}  // namespace tensormap::detail
