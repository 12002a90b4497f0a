// Recognising a checkpoint's format from its first bytes: the one place that does it.
//
// The facts, in the order they are tried (spec/FORMAT.md section 13):
//  1. tensormap: the 8-byte magic.
//  2. safetensors: the first 8 bytes, as a little-endian length n, leave the header
//     inside the file (8 + n <= size) and the header opens with '{' (after JSON white
//     space). A JSON text or a zip cannot pass: their first 8 bytes as a length exceed
//     2^60, larger than any file.
//  3. torch.save: a zip local header signature, "PK\3\4".
//  4. a shard index: a JSON object, '{' after white space.
//  5. a broken safetensors file ('{' at byte 8 but a length past the end), so that its
//     own rules report what is wrong; else tensormap, whose rules do.
#include <cstring>

#include "format/detect.h"
#include "tensormap/format.h"
#include "util/bytes.h"

namespace tensormap::detail {
namespace {

bool is_json_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// True if `head` holds '{' at `from`, after JSON white space only.
bool opens_object(const unsigned char* head, size_t size, size_t from) {
  for (size_t i = from; i < size; ++i) {
    if (head[i] == '{') return true;
    if (!is_json_space(head[i])) return false;
  }
  return false;
}

}  // namespace

Detected detect(const unsigned char* head, size_t size, uint64_t file_size) {
  if (size >= sizeof format::kMagic && std::memcmp(head, format::kMagic, sizeof format::kMagic) == 0) {
    return Detected::Tensormap;
  }
  const bool object_after_length = size > 8 && opens_object(head, size, 8);
  if (object_after_length) {
    const uint64_t n = load_le<uint64_t>(head);
    if (n <= file_size - 8) return Detected::Safetensors;
  }
  if (size >= 4 && load_le<uint32_t>(head) == 0x04034b50) return Detected::TorchSave;
  if (opens_object(head, size, 0)) return Detected::ShardIndex;
  return object_after_length ? Detected::Safetensors : Detected::Tensormap;
}

}  // namespace tensormap::detail
