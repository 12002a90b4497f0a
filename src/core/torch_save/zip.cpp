// The zip container of torch.save archives: see zip.h.
#include "torch_save/zip.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>

#include "format/names.h"
#include "io/byte_source.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "util/bytes.h"

namespace tensormap::detail {
namespace {

constexpr uint32_t kLocalSignature = 0x04034b50;
constexpr uint32_t kCentralSignature = 0x02014b50;
constexpr uint32_t kEndSignature = 0x06054b50;
constexpr uint32_t kEnd64Signature = 0x06064b50;
constexpr uint32_t kLocator64Signature = 0x07064b50;
constexpr uint64_t kLocalSize = 30, kCentralSize = 46, kEndSize = 22, kEnd64Size = 56, kLocator64Size = 20;
constexpr uint16_t kZip64ExtraId = 0x0001;
constexpr uint16_t kPaddingExtraId = 0x4246;  // as torch.save pads its records
constexpr uint32_t kMax32 = 0xFFFFFFFF;
constexpr uint16_t kMax16 = 0xFFFF;

// The archive's bytes, read through the source, and checked.
class Reader {
 public:
  explicit Reader(const ByteSource& m) : m_(m) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(ErrorKind::UnsupportedArchive, m_.name() + ": not a readable zip archive: " + what);
  }
  std::vector<unsigned char> read(uint64_t offset, uint64_t size, const char* what) const {
    const auto end = checked_add(offset, size);
    if (!end || *end > m_.size()) {
      fail(std::string(what) + " at offset " + std::to_string(offset) + " (" + std::to_string(size) +
           " bytes) passes the end of the " + std::to_string(m_.size()) + "-byte file");
    }
    std::vector<unsigned char> out(size);
    m_.read(offset, out.data(), size, what);
    return out;
  }
  uint64_t size() const { return m_.size(); }

 private:
  const ByteSource& m_;
};

struct Directory {
  uint64_t count, offset, size;
};

// The end of central directory record (and its Zip64 form where the numbers need it).
Directory find_directory(const Reader& r) {
  if (r.size() < kEndSize) r.fail("the file is " + std::to_string(r.size()) + " bytes, too small for a zip end record");
  // The end record is the last 22 bytes unless a comment (< 64 KiB) follows it.
  const uint64_t tail_size = std::min<uint64_t>(r.size(), kEndSize + kMax16);
  const uint64_t tail_start = r.size() - tail_size;
  const auto tail = r.read(tail_start, tail_size, "the end of the archive");
  for (uint64_t i = tail_size - kEndSize + 1; i-- > 0;) {
    const unsigned char* e = tail.data() + i;
    if (load_le<uint32_t>(e) != kEndSignature || i + kEndSize + load_le<uint16_t>(e + 20) != tail_size) continue;
    if (load_le<uint16_t>(e + 4) != 0 || load_le<uint16_t>(e + 6) != 0) r.fail("it spans several disks");
    Directory d{load_le<uint16_t>(e + 10), load_le<uint32_t>(e + 16), load_le<uint32_t>(e + 12)};
    const uint64_t end_at = tail_start + i;
    if (d.count == kMax16 || d.offset == kMax32 || d.size == kMax32) {
      if (end_at < kLocator64Size) r.fail("a Zip64 end record without its locator");
      const auto locator = r.read(end_at - kLocator64Size, kLocator64Size, "the Zip64 locator");
      if (load_le<uint32_t>(locator.data()) != kLocator64Signature) r.fail("a Zip64 end record without its locator");
      const uint64_t at = load_le<uint64_t>(locator.data() + 8);
      const auto end64 = r.read(at, kEnd64Size, "the Zip64 end record");
      if (load_le<uint32_t>(end64.data()) != kEnd64Signature) r.fail("the Zip64 locator points at no Zip64 end record");
      d = {load_le<uint64_t>(end64.data() + 32), load_le<uint64_t>(end64.data() + 48),
           load_le<uint64_t>(end64.data() + 40)};
    }
    const auto dir_end = checked_add(d.offset, d.size);
    if (!dir_end || *dir_end > end_at) r.fail("its central directory passes its end record");
    if (d.count > d.size / kCentralSize) {
      r.fail(std::to_string(d.count) + " records cannot fit a central directory of " + std::to_string(d.size) +
             " bytes");
    }
    return d;
  }
  r.fail("no end of central directory record");
}

}  // namespace

std::vector<ZipRecord> read_zip_directory(const ByteSource& file) {
  const Reader r(file);
  const Directory d = find_directory(r);
  const auto dir = r.read(d.offset, d.size, "the central directory");
  std::vector<ZipRecord> records;
  records.reserve(d.count);
  uint64_t at = 0;
  for (uint64_t n = 0; n < d.count; ++n) {
    if (d.size - at < kCentralSize || load_le<uint32_t>(dir.data() + at) != kCentralSignature) {
      r.fail("central directory record " + std::to_string(n) + " is malformed");
    }
    const unsigned char* c = dir.data() + at;
    const uint16_t flags = load_le<uint16_t>(c + 8);
    ZipRecord rec{{}, 0, load_le<uint32_t>(c + 20), load_le<uint16_t>(c + 10)};
    uint64_t uncompressed = load_le<uint32_t>(c + 24);
    uint64_t local = load_le<uint32_t>(c + 42);
    const uint64_t name_length = load_le<uint16_t>(c + 28), extra_length = load_le<uint16_t>(c + 30),
                   comment_length = load_le<uint16_t>(c + 32);
    if (d.size - at - kCentralSize < name_length + extra_length + comment_length) {
      r.fail("central directory record " + std::to_string(n) + " passes the end of the directory");
    }
    rec.name.assign(reinterpret_cast<const char*>(c + kCentralSize), name_length);
    // Zip64: the 64-bit values of the fields that hold 0xFFFFFFFF, in this order.
    const unsigned char* extra = c + kCentralSize + name_length;
    for (uint64_t e = 0; e + 4 <= extra_length;) {
      const uint16_t id = load_le<uint16_t>(extra + e), length = load_le<uint16_t>(extra + e + 2);
      if (e + 4 + length > extra_length) r.fail("record " + quoted(rec.name) + " has a malformed extra field");
      if (id == kZip64ExtraId) {
        uint64_t field = e + 4;
        const uint64_t field_end = e + 4 + length;
        for (uint64_t* value : {&uncompressed, &rec.size, &local}) {
          if (*value != kMax32) continue;
          if (field + 8 > field_end) r.fail("record " + quoted(rec.name) + " has a short Zip64 field");
          *value = load_le<uint64_t>(extra + field);
          field += 8;
        }
      }
      e += 4 + length;
    }
    if (flags & 1) r.fail("record " + quoted(rec.name) + " is encrypted");
    if (rec.method == 0 && rec.size != uncompressed) {
      r.fail("stored record " + quoted(rec.name) + " has sizes " + std::to_string(rec.size) + " and " +
             std::to_string(uncompressed));
    }
    const auto header = r.read(local, kLocalSize, "a record's local header");
    if (load_le<uint32_t>(header.data()) != kLocalSignature) {
      r.fail("record " + quoted(rec.name) + " has no local header at offset " + std::to_string(local));
    }
    const auto data =
        checked_add(local, kLocalSize + load_le<uint16_t>(header.data() + 26) + load_le<uint16_t>(header.data() + 28));
    const auto data_end = data ? checked_add(*data, rec.size) : std::nullopt;
    if (!data_end || *data_end > r.size()) {
      r.fail("record " + quoted(rec.name) + " of " + std::to_string(rec.size) + " bytes passes the end of the file");
    }
    rec.data_offset = *data;
    records.push_back(std::move(rec));
    at += kCentralSize + name_length + extra_length + comment_length;
  }
  return records;
}

ZipWriter::ZipWriter(Output& file, uint64_t alignment) : file_(file), alignment_(alignment) {}

void ZipWriter::begin_record(const std::string& name) {
  if (open_) throw Error(ErrorKind::InvalidArgument, file_.path() + ": a zip record is still open");
  if (name.size() > kMax16) throw Error(ErrorKind::InvalidArgument, file_.path() + ": zip record name too long");
  // Header, name, then an extra field: Zip64 sizes (filled in at the end) and padding
  // that puts the data on a multiple of the alignment.
  constexpr uint64_t kZip64Extra = 4 + 16;
  const uint64_t before_padding = at_ + kLocalSize + name.size() + kZip64Extra;
  uint64_t padding = (alignment_ - before_padding % alignment_) % alignment_;
  if (padding > 0 && padding < 4) padding += alignment_;  // room for the padding's own header
  std::vector<unsigned char> h(kLocalSize + name.size() + kZip64Extra + padding, 0);
  store_le<uint32_t>(h.data(), kLocalSignature);
  store_le<uint16_t>(h.data() + 4, 45);  // version 4.5: Zip64
  store_le<uint16_t>(h.data() + 26, static_cast<uint16_t>(name.size()));
  store_le<uint16_t>(h.data() + 28, static_cast<uint16_t>(kZip64Extra + padding));
  std::memcpy(h.data() + kLocalSize, name.data(), name.size());
  unsigned char* extra = h.data() + kLocalSize + name.size();
  store_le<uint16_t>(extra, kZip64ExtraId);
  store_le<uint16_t>(extra + 2, 16);
  if (padding) {
    store_le<uint16_t>(extra + kZip64Extra, kPaddingExtraId);
    store_le<uint16_t>(extra + kZip64Extra + 2, static_cast<uint16_t>(padding - 4));
  }
  entries_.push_back({name, at_, 0, static_cast<uint32_t>(crc32(0L, Z_NULL, 0))});
  file_.append(h.data(), h.size());
  at_ += h.size();
  open_ = true;
}

void ZipWriter::append(const void* data, size_t size) {
  Entry& e = entries_.back();
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t done = 0; done < size;) {  // crc32 takes a uInt length
    const auto n = static_cast<uInt>(std::min<size_t>(size - done, 1u << 30));
    e.crc = static_cast<uint32_t>(crc32(e.crc, p + done, n));
    done += n;
  }
  file_.append(data, size);
  e.size += size;
  at_ += size;
}

void ZipWriter::end_record() {
  const Entry& e = entries_.back();
  unsigned char fields[12];
  store_le<uint32_t>(fields, e.crc);
  store_le<uint32_t>(fields + 4, kMax32);  // sizes: in the Zip64 extra field
  store_le<uint32_t>(fields + 8, kMax32);
  file_.pwrite(fields, sizeof fields, e.header_offset + 14);
  unsigned char sizes[16];
  store_le<uint64_t>(sizes, e.size);
  store_le<uint64_t>(sizes + 8, e.size);
  file_.pwrite(sizes, sizeof sizes, e.header_offset + kLocalSize + e.name.size() + 4);
  open_ = false;
}

void ZipWriter::add_record(const std::string& name, const void* data, size_t size) {
  begin_record(name);
  append(data, size);
  end_record();
}

void ZipWriter::finish() {
  if (open_) throw Error(ErrorKind::InvalidArgument, file_.path() + ": a zip record is still open");
  std::vector<unsigned char> dir;
  for (const Entry& e : entries_) {
    const size_t at = dir.size();
    dir.resize(at + kCentralSize + e.name.size() + 4 + 24);
    unsigned char* c = dir.data() + at;
    store_le<uint32_t>(c, kCentralSignature);
    store_le<uint16_t>(c + 4, 45);
    store_le<uint16_t>(c + 6, 45);
    store_le<uint32_t>(c + 16, e.crc);
    store_le<uint32_t>(c + 20, kMax32);
    store_le<uint32_t>(c + 24, kMax32);
    store_le<uint16_t>(c + 28, static_cast<uint16_t>(e.name.size()));
    store_le<uint16_t>(c + 30, 4 + 24);
    store_le<uint32_t>(c + 42, kMax32);
    std::memcpy(c + kCentralSize, e.name.data(), e.name.size());
    unsigned char* x = c + kCentralSize + e.name.size();
    store_le<uint16_t>(x, kZip64ExtraId);
    store_le<uint16_t>(x + 2, 24);
    store_le<uint64_t>(x + 4, e.size);
    store_le<uint64_t>(x + 12, e.size);
    store_le<uint64_t>(x + 20, e.header_offset);
  }
  const uint64_t dir_offset = at_, dir_size = dir.size(), end64_offset = at_ + dir.size();
  dir.resize(dir.size() + kEnd64Size + kLocator64Size + kEndSize, 0);
  unsigned char* z = dir.data() + dir_size;
  store_le<uint32_t>(z, kEnd64Signature);
  store_le<uint64_t>(z + 4, kEnd64Size - 12);
  store_le<uint16_t>(z + 12, 45);
  store_le<uint16_t>(z + 14, 45);
  store_le<uint64_t>(z + 24, entries_.size());
  store_le<uint64_t>(z + 32, entries_.size());
  store_le<uint64_t>(z + 40, dir_size);
  store_le<uint64_t>(z + 48, dir_offset);
  unsigned char* l = z + kEnd64Size;
  store_le<uint32_t>(l, kLocator64Signature);
  store_le<uint64_t>(l + 8, end64_offset);
  store_le<uint32_t>(l + 16, 1);
  unsigned char* e = l + kLocator64Size;
  store_le<uint32_t>(e, kEndSignature);
  const auto count16 = static_cast<uint16_t>(std::min<uint64_t>(entries_.size(), kMax16));
  store_le<uint16_t>(e + 8, count16);
  store_le<uint16_t>(e + 10, count16);
  store_le<uint32_t>(e + 12, static_cast<uint32_t>(std::min<uint64_t>(dir_size, kMax32)));
  store_le<uint32_t>(e + 16, kMax32);  // the directory's offset: in the Zip64 end record
  file_.append(dir.data(), dir.size());
  at_ += dir.size();
}

}  // namespace tensormap::detail
