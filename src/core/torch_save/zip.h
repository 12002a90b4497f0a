// The zip container of torch.save archives: a reader of its central directory and a
// writer of stored (uncompressed) records. Internal to the core.
//
// Only what torch.save archives use: stored records (method 0), Zip64 where sizes or
// offsets need it, no encryption, one disk. Every number read is checked against the
// bytes of the file before it is used.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/output.h"

namespace tensormap::detail {

class ByteSource;

struct ZipRecord {
  std::string name;
  uint64_t data_offset;  // where its bytes start in the file
  uint64_t size;         // its stored bytes
  uint16_t method;       // 0: stored
};

// Every record of the archive `file`, in directory order, read through its read().
// Throws Error(UnsupportedArchive) naming the file for anything malformed, a record
// whose bytes pass the end of the file, or an encrypted record.
std::vector<ZipRecord> read_zip_directory(const ByteSource& file);

// Writes a zip of stored records through an Output, each record's data starting on a
// multiple of `alignment` (as torch.save aligns them, 64), CRC-32 computed as the bytes
// go. Records of unknown size are streamed: begin_record(), append(), end_record().
class ZipWriter {
 public:
  ZipWriter(Output& file, uint64_t alignment);
  void begin_record(const std::string& name);
  void append(const void* data, size_t size);
  void end_record();
  void add_record(const std::string& name, const void* data, size_t size);
  // Writes the central directory and its end records. REQUIRES: no record open.
  void finish();

 private:
  struct Entry {
    std::string name;
    uint64_t header_offset;
    uint64_t size;
    uint32_t crc;
  };
  Output& file_;
  uint64_t alignment_;
  uint64_t at_ = 0;  // bytes written so far
  std::vector<Entry> entries_;
  bool open_ = false;
};

}  // namespace tensormap::detail
