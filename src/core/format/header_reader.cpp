// The tensormap header as a reader checks it: validate_header is the whole of
// spec/FORMAT.md section 9 (rules 1 to 20), checked in the spec's order, stage by stage;
// each rule carries its number in a comment. Each stage takes what the earlier ones found
// and returns what it found: the preamble, the tensor records, the metadata records.
// The writer's side is header_writer.cpp.
#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "format/header.h"
#include "format/names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "util/bytes.h"

namespace tensormap::detail {
namespace {

namespace fmt = tensormap::format;

bool all_zero(const unsigned char* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

std::string num(uint64_t v) { return std::to_string(v); }

// Errors naming the file.
class Failure {
 public:
  explicit Failure(const std::string& path) : path_(path) {}
  Error operator()(ErrorKind kind, const std::string& what) const { return Error(kind, path_ + ": " + what); }

 private:
  const std::string& path_;
};

// What the preamble says (rules 1 to 9).
struct Preamble {
  uint16_t major = 0, minor = 0;
  uint64_t alignment = 0;
  uint64_t header_size = 0;
  uint64_t tensor_count = 0, metadata_count = 0;
  bool check_reserved = true;  // the minor is one this reader implements (section 10)
  bool aliases = false;        // major 2 with the aliases feature
};

Preamble read_preamble(const unsigned char* base, uint64_t file_size, const Failure& fail) {
  Preamble p;
  // Rule 1.
  if (file_size < fmt::kMinHeaderSize) {
    throw fail(ErrorKind::FileTooSmall, "file is " + num(file_size) +
                                            " bytes, smaller than the smallest tensormap file (" +
                                            num(fmt::kMinHeaderSize) + " bytes)");
  }
  // Rule 2.
  if (std::memcmp(base, fmt::kMagic, sizeof fmt::kMagic) != 0) {
    throw fail(ErrorKind::BadMagic,
               "neither a tensormap file (its first 8 bytes are not the "
               "magic 89 54 4D 41 50 0D 0A 1A) nor a safetensors file");
  }
  // Rule 3.
  p.major = load_le<uint16_t>(base + 8);
  p.minor = load_le<uint16_t>(base + 10);
  if (p.major < fmt::kMajorVersion || p.major > fmt::kMaxMajorVersion) {
    throw fail(ErrorKind::UnsupportedVersion, "format version " + num(p.major) + "." + num(p.minor) +
                                                  " is not supported; this reader reads major versions 1 and 2");
  }
  // Rule 4.
  p.alignment = load_le<uint32_t>(base + 12);
  if (!fmt::is_valid_alignment(p.alignment)) {
    throw fail(ErrorKind::BadAlignment,
               "alignment " + num(p.alignment) + " is not a power of two between 64 and 1048576");
  }
  // Rule 5.
  const uint64_t h = load_le<uint64_t>(base + 16);
  if (h < fmt::kMinHeaderSize || h > fmt::kMaxHeaderSize || h % 8 != 0) {
    throw fail(ErrorKind::BadHeaderSize, "header size " + num(h) + " is not a multiple of 8 between " +
                                             num(fmt::kMinHeaderSize) + " and " + num(fmt::kMaxHeaderSize));
  }
  p.header_size = h;
  // Rule 6.
  if (h > file_size) {
    throw fail(ErrorKind::Truncated,
               "header is " + num(h) + " bytes but the file is only " + num(file_size) + " bytes long");
  }
  // Rule 7.
  const uint64_t stored = load_le<uint64_t>(base + h - fmt::kChecksumSize);
  const uint64_t computed = header_checksum(base, h);
  if (stored != computed) {
    throw fail(ErrorKind::HeaderChecksumMismatch, "header checksum is " + hex64(stored) + " but the header hashes to " +
                                                      hex64(computed) + " (the header is corrupted)");
  }
  // Rule 8. With both counts capped first, 40*T + 16*M cannot overflow.
  p.tensor_count = load_le<uint64_t>(base + 24);
  p.metadata_count = load_le<uint64_t>(base + 32);
  if (p.tensor_count > fmt::kMaxTensorCount || p.metadata_count > fmt::kMaxMetadataCount ||
      fmt::kMinTensorRecordSize * p.tensor_count + fmt::kMinMetadataRecordSize * p.metadata_count >
          h - fmt::kMinHeaderSize) {
    throw fail(ErrorKind::TooManyEntries, "header claims " + num(p.tensor_count) + " tensors and " +
                                              num(p.metadata_count) + " metadata pairs, more than its " + num(h) +
                                              " bytes can hold (limits " + num(fmt::kMaxTensorCount) + " and " +
                                              num(fmt::kMaxMetadataCount) + ")");
  }
  // Rule 9, and the condition for rule 11's reserved fields (section 10). In major 2 the
  // field is `features`: a bit this reader does not know means a file it cannot read.
  p.check_reserved = p.minor <= fmt::kMinorVersion;
  const uint64_t field = load_le<uint64_t>(base + 40);
  if (p.major == 1 && p.check_reserved && field != 0) {
    throw fail(ErrorKind::NonZeroReserved, "reserved preamble field at offset 40 is not zero");
  }
  if (p.major == 2) {
    if ((field & ~fmt::kKnownFeatures) != 0) {
      throw fail(ErrorKind::UnsupportedVersion, "the file needs features " + hex64(field & ~fmt::kKnownFeatures) +
                                                    " (format " + num(p.major) + "." + num(p.minor) +
                                                    "), which this reader does not implement; it knows aliases (0x1)");
    }
    p.aliases = (field & fmt::kFeatureAliases) != 0;
  }
  return p;
}

// The records between the preamble and the header's checksum, one after another. The one
// place that checks rule 10: each record, its fixed part and then its whole length, lies
// before the checksum.
class RecordCursor {
 public:
  RecordCursor(const unsigned char* base, uint64_t header_size, const Failure& fail)
      : base_(base), end_(header_size - fmt::kChecksumSize), fail_(fail) {}

  uint64_t position() const { return pos_; }
  uint64_t end() const { return end_; }

  // The next record, whose first `fixed` bytes give its whole size through `size_of`;
  // `what` names it ("tensor record #3"). Its size goes to `size`; the cursor stays on it
  // until advance().
  template <typename SizeOf>
  const unsigned char* next(uint64_t fixed, SizeOf size_of, const std::string& what, uint64_t& size) const {
    // Rule 10.
    if (end_ - pos_ < fixed) {
      throw fail_(ErrorKind::MalformedHeader, label(what) + " runs past the end of the header (" + num(end_) + ")");
    }
    const unsigned char* r = base_ + pos_;
    size = size_of(r);
    if (size > end_ - pos_) {
      throw fail_(
          ErrorKind::MalformedHeader,
          label(what) + " is " + num(size) + " bytes long and runs past the end of the header (" + num(end_) + ")");
    }
    return r;
  }
  void advance(uint64_t size) { pos_ += size; }
  // "tensor record #3 at offset 176".
  std::string label(const std::string& what) const { return what + " at offset " + num(pos_); }

 private:
  const unsigned char* base_;
  uint64_t end_;
  uint64_t pos_ = fmt::kPreambleSize;
  const Failure& fail_;
};

// What the tensor records say (rules 10 to 17), and where the data ends.
struct TensorRecords {
  std::vector<TensorEntry> tensors;
  uint64_t data_end = 0;                 // the padded end of the last tensor with bytes (rule 17)
  std::optional<size_t> first_past_end;  // the first tensor whose bytes pass the file's end (rule 20)
};

class TensorRecordReader {
 public:
  TensorRecordReader(uint64_t file_size, const Preamble& preamble, RecordCursor& records, const Failure& fail)
      : file_size_(file_size), p_(preamble), records_(records), fail_(fail) {}

  TensorRecords read() {
    out_.tensors.reserve(p_.tensor_count);
    out_.data_end = *fmt::round_up(p_.header_size, p_.alignment);  // h <= 2^30: cannot overflow
    for (uint64_t i = 0; i < p_.tensor_count; ++i) read_record(i);
    return std::move(out_);
  }

 private:
  void read_record(uint64_t i) {
    uint64_t size = 0;
    const unsigned char* r = records_.next(
        fmt::kTensorRecordFixedSize,
        [](const unsigned char* f) { return fmt::tensor_record_size(f[5], load_le<uint32_t>(f)); },
        "tensor record #" + num(i), size);
    const uint32_t name_length = load_le<uint32_t>(r);
    const uint8_t code = r[4];
    const uint8_t rank = r[5];
    TensorEntry e{};
    e.name = std::string_view(reinterpret_cast<const char*>(r + 32 + 8 * rank), name_length);
    const auto label = [&] { return "tensor " + detail::quoted(e.name) + " (record #" + num(i) + ")"; };
    // Rule 11. With the aliases feature, bit 0 of the field is the alias flag.
    const uint64_t name_end = 32 + 8 * uint64_t{rank} + name_length;
    const uint16_t flags = load_le<uint16_t>(r + 6);
    const bool alias = p_.aliases && (flags & fmt::kFlagAlias) != 0;
    const uint16_t reserved = p_.aliases ? static_cast<uint16_t>(flags & ~fmt::kFlagAlias) : flags;
    if ((p_.check_reserved && reserved != 0) || !all_zero(r + name_end, size - name_end)) {
      throw fail_(ErrorKind::NonZeroReserved, label() + " has a non-zero reserved field or padding byte");
    }
    // Rule 12.
    const auto dtype = dtype_from_code(code);
    if (!dtype) {
      std::string why = label() + " has unknown dtype code " + num(code);
      if (!p_.check_reserved) {
        why += " (the file is format " + num(p_.major) + "." + num(p_.minor) + ", newer than this reader's " +
               num(p_.major) + "." + num(fmt::kMinorVersion) + ")";
      }
      throw fail_(ErrorKind::UnknownDtype, why);
    }
    e.dtype = *dtype;
    // Rule 13.
    if (rank > fmt::kMaxRank) throw fail_(ErrorKind::BadRank, label() + " has rank " + num(rank) + ", more than 8");
    e.rank = rank;
    for (unsigned d = 0; d < rank; ++d) e.dims[d] = load_le<uint64_t>(r + 32 + 8 * d);
    // Rule 14.
    if (auto problem = name_problem(e.name); !problem.empty()) {
      throw fail_(ErrorKind::BadName, "name of " + label() + " " + problem);
    }
    // Rule 15.
    const auto expected = fmt::tensor_byte_length(e.dims.data(), rank, dtype_size(e.dtype));
    if (!expected) throw fail_(ErrorKind::ShapeOverflow, label() + ": its shape holds 2^63 bytes or more");
    // Rule 16.
    e.offset = load_le<uint64_t>(r + 8);
    e.byte_length = load_le<uint64_t>(r + 16);
    e.checksum = load_le<uint64_t>(r + 24);
    if (e.byte_length != *expected) {
      throw fail_(ErrorKind::LengthMismatch, label() + " has byte length " + num(e.byte_length) +
                                                 " but its shape and dtype make " + num(*expected));
    }
    // Rule 17. An alias has no bytes of its own: it names those of an earlier record.
    if (alias) {
      check_alias(e, label());
    } else {
      place(e, label());
    }
    out_.tensors.push_back(e);
    records_.advance(size);
  }

  // Rule 17 for a record with bytes of its own: they start where the canonical layout
  // puts them.
  void place(const TensorEntry& e, const std::string& label) {
    if (e.offset != out_.data_end) {
      throw fail_(ErrorKind::BadOffset, label + " starts at offset " + num(e.offset) +
                                            " but the canonical layout puts it at " + num(out_.data_end));
    }
    // offset < 2^63 and byte_length < 2^63, so the sum fits; its padded end may not.
    const auto next = fmt::round_up(e.offset + e.byte_length, p_.alignment);
    if (!next) throw fail_(ErrorKind::Truncated, label + " ends past 2^63 bytes, beyond any file");
    if (!out_.first_past_end && e.offset + e.byte_length > file_size_) out_.first_past_end = out_.tensors.size();
    if (e.byte_length > 0) by_offset_.emplace(e.offset, static_cast<uint32_t>(out_.tensors.size()));
    out_.data_end = *next;
  }

  // Rule 17 for an alias: an earlier record with bytes of its own starts at its offset
  // (at most one can: they do not overlap) and has its dtype, shape and checksum.
  void check_alias(TensorEntry& e, const std::string& label) const {
    if (e.byte_length == 0) {
      throw fail_(ErrorKind::BadAlias, label + " is an alias of no bytes; an empty tensor is stored as itself");
    }
    const auto found = by_offset_.find(e.offset);
    if (found == by_offset_.end()) {
      throw fail_(ErrorKind::BadAlias,
                  label + " is an alias of offset " + num(e.offset) + ", where no earlier tensor's bytes start");
    }
    const TensorEntry& target = out_.tensors[found->second];
    const bool same_shape =
        target.rank == e.rank && std::equal(e.dims.begin(), e.dims.begin() + e.rank, target.dims.begin());
    if (target.dtype != e.dtype || !same_shape || target.checksum != e.checksum) {
      throw fail_(ErrorKind::BadAlias, label + " is an alias of tensor " + detail::quoted(target.name) +
                                           " but differs from it in " +
                                           (target.dtype != e.dtype ? "dtype"
                                            : !same_shape           ? "shape"
                                                                    : "checksum"));
    }
    e.alias_of = found->second;
  }

  uint64_t file_size_;
  const Preamble& p_;
  RecordCursor& records_;
  const Failure& fail_;
  TensorRecords out_;
  std::unordered_map<uint64_t, uint32_t> by_offset_;  // start of each record's own bytes -> its index
};

// The metadata records (rules 10, 11 and 14).
std::vector<std::pair<std::string_view, std::string_view>> read_metadata(const Preamble& p, RecordCursor& records,
                                                                         const Failure& fail) {
  std::vector<std::pair<std::string_view, std::string_view>> metadata;
  metadata.reserve(p.metadata_count);
  for (uint64_t j = 0; j < p.metadata_count; ++j) {
    const std::string what = "metadata record #" + num(j);
    uint64_t size = 0;
    const unsigned char* r = records.next(
        fmt::kMetadataRecordFixedSize,
        [](const unsigned char* f) {
          return fmt::metadata_record_size(load_le<uint32_t>(f), load_le<uint32_t>(f + 4));
        },
        what, size);
    const uint64_t key_length = load_le<uint32_t>(r);
    const uint64_t value_length = load_le<uint32_t>(r + 4);
    const auto* chars = reinterpret_cast<const char*>(r + 8);
    const std::string_view key(chars, key_length);
    const std::string_view value(chars + key_length, value_length);
    // Rule 11.
    const uint64_t used = 8 + key_length + value_length;
    if (!all_zero(r + used, size - used)) {
      throw fail(ErrorKind::NonZeroReserved, records.label(what) + " has a non-zero padding byte");
    }
    // Rule 14.
    if (auto problem = name_problem(key); !problem.empty()) {
      throw fail(ErrorKind::BadName,
                 "metadata key " + detail::quoted(key) + " (" + records.label(what) + ") " + problem);
    }
    if (auto problem = value_problem(value); !problem.empty()) {
      throw fail(ErrorKind::BadName,
                 "metadata value of key " + detail::quoted(key) + " (" + records.label(what) + ") " + problem);
    }
    metadata.emplace_back(key, value);
    records.advance(size);
  }
  return metadata;
}

// Rule 18.
void check_header_end(const RecordCursor& records, const Failure& fail) {
  if (records.position() != records.end()) {
    throw fail(ErrorKind::MalformedHeader, "header has " + num(records.end() - records.position()) +
                                               " unused bytes between its last record (ending at " +
                                               num(records.position()) + ") and its checksum");
  }
}

// Rule 19: names and keys are unique; the index of the names into `out`.
void check_unique(ParsedHeader& out, const Failure& fail) {
  out.index.reserve(out.tensors.size());
  for (uint32_t i = 0; i < out.tensors.size(); ++i) {
    const auto [it, inserted] = out.index.emplace(out.tensors[i].name, i);
    if (!inserted) {
      throw fail(ErrorKind::DuplicateName, "tensor name " + detail::quoted(out.tensors[i].name) +
                                               " appears twice (records #" + num(it->second) + " and #" + num(i) + ")");
    }
  }
  std::unordered_set<std::string_view> keys;
  keys.reserve(out.metadata.size());
  for (const auto& [key, value] : out.metadata) {
    if (!keys.insert(key).second) {
      throw fail(ErrorKind::DuplicateName, "metadata key " + detail::quoted(key) + " appears twice");
    }
  }
}

// Rule 20.
void check_file_end(const std::vector<TensorEntry>& tensors, std::optional<size_t> first_past_end, uint64_t data_end,
                    uint64_t file_size, const Failure& fail) {
  if (first_past_end) {
    const TensorEntry& e = tensors[*first_past_end];
    throw fail(ErrorKind::Truncated, "tensor " + detail::quoted(e.name) + " ends at " + num(e.offset + e.byte_length) +
                                         ", past the end of the file (" + num(file_size) + ")");
  }
  if (file_size < data_end) {
    throw fail(ErrorKind::Truncated,
               "file is " + num(file_size) + " bytes but its last tensor's padding ends at " + num(data_end));
  }
  if (file_size > data_end) {
    throw fail(ErrorKind::TrailingBytes, "file has " + num(file_size - data_end) +
                                             " bytes after the padded end of its last tensor (" + num(data_end) + ")");
  }
}

}  // namespace

ParsedHeader validate_header(const unsigned char* base, uint64_t file_size, const std::string& path) {
  const Failure fail(path);
  const Preamble preamble = read_preamble(base, file_size, fail);  // rules 1 to 9
  RecordCursor records(base, preamble.header_size, fail);
  TensorRecords tensors = TensorRecordReader(file_size, preamble, records, fail).read();  // rules 10 to 17
  ParsedHeader out;
  out.metadata = read_metadata(preamble, records, fail);  // rules 10, 11 and 14
  check_header_end(records, fail);                        // rule 18
  out.major = preamble.major;
  out.minor = preamble.minor;
  out.alignment = preamble.alignment;
  out.header_size = preamble.header_size;
  out.tensors = std::move(tensors.tensors);
  check_unique(out, fail);                                                                 // rule 19
  check_file_end(out.tensors, tensors.first_past_end, tensors.data_end, file_size, fail);  // rule 20
  return out;
}

}  // namespace tensormap::detail
