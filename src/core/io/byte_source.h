// The seam between the readers and where a checkpoint's bytes come from. Internal to the
// core.
//
// A reader that needs only to read ranges (the zip directory of a torch.save archive,
// format detection, a shard index, the tensors of a torch.save archive) takes a
// ByteSource: a local file (Mapping), bytes in memory (MemoryBytes: tests and fuzz
// targets), or any other store that can read a range at an offset. The tensormap and
// safetensors readers, which hand out views into the bytes, take a Mapping itself.
//
// A new source implements name(), size() and read(); read() throws the two errors every
// reader already handles: Error(Truncated) where the bytes end before the range does
// (the source shrank since it was opened), Error(Io) where they cannot be read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tensormap::detail {

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // The path or address the bytes come from, for messages.
  virtual const std::string& name() const = 0;
  // The number of bytes, fixed when the source was opened.
  virtual uint64_t size() const = 0;
  // Copies [offset, offset + size) into `dest`. `what` names the bytes for the message of
  // an error. REQUIRES: the range lies within size().
  virtual void read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const = 0;
};

// Bytes held in memory.
class MemoryBytes final : public ByteSource {
 public:
  MemoryBytes(std::string name, std::vector<unsigned char> bytes) : name_(std::move(name)), bytes_(std::move(bytes)) {}
  const std::string& name() const override { return name_; }
  uint64_t size() const override { return bytes_.size(); }
  void read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const override;

 private:
  std::string name_;
  std::vector<unsigned char> bytes_;
};

// `source`'s first bytes, up to `limit` (fewer where it is shorter).
std::vector<unsigned char> read_head(const ByteSource& source, uint64_t limit);

}  // namespace tensormap::detail
