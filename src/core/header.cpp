// The tensormap header: planned and encoded by the writer, validated by the reader.
//
// validate_header is the whole of spec/FORMAT.md section 9 (rules 1 to 20) in one
// function, checked in the spec's order; each rule carries its number in a comment.
#include "header.h"

#include <xxhash.h>

#include <cstdio>
#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "bytes.h"
#include "names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"

namespace tensormap::detail {
namespace fmt = tensormap::format;

std::string hex64(uint64_t value) {
  char buf[19];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(value));
  return buf;
}

uint64_t header_checksum(const unsigned char* header, uint64_t header_size) {
  return XXH3_64bits(header, header_size - fmt::kChecksumSize);
}

// ---------------------------------------------------------------------------------------
// Writing

Layout plan_layout(const std::vector<TensorSpec>& tensors, const std::vector<uint64_t>& byte_lengths,
                   const std::vector<std::optional<size_t>>& aliases, const WriterOptions& options,
                   const std::string& path) {
  auto invalid = [&](const std::string& what) {
    return Error(ErrorKind::InvalidArgument, path + ": " + what);
  };
  if (!fmt::is_valid_alignment(options.alignment)) {
    throw invalid("alignment " + std::to_string(options.alignment) +
                  " is not a power of two between 64 and 1048576");
  }
  if (tensors.size() > fmt::kMaxTensorCount) {
    throw invalid(std::to_string(tensors.size()) + " tensors, more than the limit of " +
                  std::to_string(fmt::kMaxTensorCount));
  }
  if (options.metadata.size() > fmt::kMaxMetadataCount) {
    throw invalid(std::to_string(options.metadata.size()) +
                  " metadata pairs, more than the limit of " +
                  std::to_string(fmt::kMaxMetadataCount));
  }

  Layout layout;
  layout.byte_lengths = byte_lengths;
  layout.aliases = aliases;
  uint64_t header_size = fmt::kMinHeaderSize;
  for (const auto& t : tensors) {
    auto label = [&] { return "tensor " + detail::quoted(t.name); };
    if (auto problem = name_problem(t.name); !problem.empty()) {
      throw invalid(label() + ": name " + problem);
    }
    if (t.shape.size() > fmt::kMaxRank) {
      throw invalid(label() + " has rank " + std::to_string(t.shape.size()) +
                    ", more than the limit of 8");
    }
    header_size += fmt::tensor_record_size(static_cast<unsigned>(t.shape.size()), t.name.size());
  }

  std::unordered_set<std::string_view> keys;
  for (const auto& [key, value] : options.metadata) {
    if (auto problem = name_problem(key); !problem.empty()) {
      throw invalid("metadata key " + detail::quoted(key) + " " + problem);
    }
    if (auto problem = value_problem(value); !problem.empty()) {
      throw invalid("metadata value of " + detail::quoted(key) + " " + problem);
    }
    if (!keys.insert(key).second) throw invalid("metadata key " + detail::quoted(key) + " is given twice");
    if (value.size() > fmt::kMaxHeaderSize) {
      throw invalid("metadata value of " + detail::quoted(key) + " is larger than the header limit");
    }
    header_size += fmt::metadata_record_size(key.size(), value.size());
    if (header_size > fmt::kMaxHeaderSize) break;  // reported just below
  }
  if (header_size > fmt::kMaxHeaderSize) {
    throw invalid("header would be larger than the limit of " +
                  std::to_string(fmt::kMaxHeaderSize) + " bytes");
  }
  layout.header_size = header_size;

  uint64_t cursor = *fmt::round_up(header_size, options.alignment);
  layout.offsets.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (const auto target = aliases[i]) {  // stored once, at its target's place
      layout.offsets.push_back(layout.offsets[*target]);
      layout.byte_lengths[i] = layout.byte_lengths[*target];
      continue;
    }
    layout.offsets.push_back(cursor);
    const auto end = checked_add(cursor, layout.byte_lengths[i]);
    const auto next = end ? fmt::round_up(*end, options.alignment) : std::nullopt;
    if (!next) throw invalid("tensors add up to more than 2^63 bytes");
    cursor = *next;
  }
  layout.file_size = cursor;
  return layout;
}

std::vector<unsigned char> encode_header(const std::vector<TensorSpec>& tensors,
                                         const WriterOptions& options, const Layout& layout,
                                         const std::vector<uint64_t>& checksums) {
  std::vector<unsigned char> out(layout.header_size, 0);
  unsigned char* p = out.data();
  std::memcpy(p, fmt::kMagic, sizeof fmt::kMagic);
  // Major 1 unless a feature is used, so that every reader reads what needs no feature.
  const bool aliases = std::any_of(layout.aliases.begin(), layout.aliases.end(),
                                   [](const std::optional<size_t>& a) { return a.has_value(); });
  store_le<uint16_t>(p + 8, aliases ? 2 : fmt::kMajorVersion);
  store_le<uint16_t>(p + 10, fmt::kMinorVersion);
  store_le<uint32_t>(p + 12, static_cast<uint32_t>(options.alignment));
  store_le<uint64_t>(p + 16, layout.header_size);
  store_le<uint64_t>(p + 24, tensors.size());
  store_le<uint64_t>(p + 32, options.metadata.size());
  store_le<uint64_t>(p + 40, aliases ? fmt::kFeatureAliases : 0);  // major 1: reserved, zero

  size_t pos = fmt::kPreambleSize;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const auto rank = static_cast<unsigned>(t.shape.size());
    store_le<uint32_t>(p + pos, static_cast<uint32_t>(t.name.size()));
    p[pos + 4] = static_cast<unsigned char>(t.dtype);
    p[pos + 5] = static_cast<unsigned char>(rank);
    const std::optional<size_t> target = i < layout.aliases.size() ? layout.aliases[i] : std::nullopt;
    store_le<uint16_t>(p + pos + 6, target ? fmt::kFlagAlias : 0);
    store_le<uint64_t>(p + pos + 8, layout.offsets[i]);
    store_le<uint64_t>(p + pos + 16, layout.byte_lengths[i]);
    store_le<uint64_t>(p + pos + 24, checksums[target.value_or(i)]);
    for (unsigned d = 0; d < rank; ++d) store_le<uint64_t>(p + pos + 32 + 8 * d, t.shape[d]);
    std::memcpy(p + pos + 32 + 8 * rank, t.name.data(), t.name.size());
    pos += fmt::tensor_record_size(rank, t.name.size());
  }
  for (const auto& [key, value] : options.metadata) {
    store_le<uint32_t>(p + pos, static_cast<uint32_t>(key.size()));
    store_le<uint32_t>(p + pos + 4, static_cast<uint32_t>(value.size()));
    std::memcpy(p + pos + 8, key.data(), key.size());
    std::memcpy(p + pos + 8 + key.size(), value.data(), value.size());
    pos += fmt::metadata_record_size(key.size(), value.size());
  }
  store_le<uint64_t>(p + pos, header_checksum(p, layout.header_size));
  return out;
}

// ---------------------------------------------------------------------------------------
// Reading

namespace {

bool all_zero(const unsigned char* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

std::string num(uint64_t v) { return std::to_string(v); }

}  // namespace

namespace {

// validate_header, stage by stage: each method checks its rules in the spec's order and
// throws the first that is broken, naming the file, the record and the numbers.
class HeaderValidator {
 public:
  HeaderValidator(const unsigned char* base, uint64_t file_size, const std::string& path)
      : base(base), file_size(file_size), path(path) {}

  ParsedHeader run() {
    check_preamble();    // rules 1 to 9
    read_tensors();      // rules 10 to 17, per tensor record
    read_metadata();     // rules 10, 11 and 14, per metadata record
    check_header_end();  // rule 18
    check_unique();      // rule 19
    check_file_end();    // rule 20
    return std::move(out);
  }

 private:
  Error fail(ErrorKind kind, const std::string& what) const { return Error(kind, path + ": " + what); }

  void check_preamble() {
  // Rule 1.
  if (file_size < fmt::kMinHeaderSize) {
    throw fail(ErrorKind::FileTooSmall, "file is " + num(file_size) +
                                            " bytes, smaller than the smallest tensormap file (" +
                                            num(fmt::kMinHeaderSize) + " bytes)");
  }
  // Rule 2.
  if (std::memcmp(base, fmt::kMagic, sizeof fmt::kMagic) != 0) {
    throw fail(ErrorKind::BadMagic, "neither a tensormap file (its first 8 bytes are not the "
                                    "magic 89 54 4D 41 50 0D 0A 1A) nor a safetensors file");
  }
  // Rule 3.
  out.major = load_le<uint16_t>(base + 8);
  out.minor = load_le<uint16_t>(base + 10);
  if (out.major < fmt::kMajorVersion || out.major > fmt::kMaxMajorVersion) {
    throw fail(ErrorKind::UnsupportedVersion,
               "format version " + num(out.major) + "." + num(out.minor) +
                   " is not supported; this reader reads major versions 1 and 2");
  }
  // Rule 4.
  out.alignment = load_le<uint32_t>(base + 12);
  if (!fmt::is_valid_alignment(out.alignment)) {
    throw fail(ErrorKind::BadAlignment, "alignment " + num(out.alignment) +
                                            " is not a power of two between 64 and 1048576");
  }
  // Rule 5.
  h = load_le<uint64_t>(base + 16);
  if (h < fmt::kMinHeaderSize || h > fmt::kMaxHeaderSize || h % 8 != 0) {
    throw fail(ErrorKind::BadHeaderSize,
               "header size " + num(h) + " is not a multiple of 8 between " +
                   num(fmt::kMinHeaderSize) + " and " + num(fmt::kMaxHeaderSize));
  }
  out.header_size = h;
  // Rule 6.
  if (h > file_size) {
    throw fail(ErrorKind::Truncated, "header is " + num(h) + " bytes but the file is only " +
                                         num(file_size) + " bytes long");
  }
  // Rule 7.
  const uint64_t stored = load_le<uint64_t>(base + h - fmt::kChecksumSize);
  const uint64_t computed = header_checksum(base, h);
  if (stored != computed) {
    throw fail(ErrorKind::HeaderChecksumMismatch,
               "header checksum is " + hex64(stored) + " but the header hashes to " +
                   hex64(computed) + " (the header is corrupted)");
  }
  // Rule 8. With both counts capped first, 40*T + 16*M cannot overflow.
  t_count = load_le<uint64_t>(base + 24);
  m_count = load_le<uint64_t>(base + 32);
  if (t_count > fmt::kMaxTensorCount || m_count > fmt::kMaxMetadataCount ||
      fmt::kMinTensorRecordSize * t_count + fmt::kMinMetadataRecordSize * m_count >
          h - fmt::kMinHeaderSize) {
    throw fail(ErrorKind::TooManyEntries,
               "header claims " + num(t_count) + " tensors and " + num(m_count) +
                   " metadata pairs, more than its " + num(h) + " bytes can hold (limits " +
                   num(fmt::kMaxTensorCount) + " and " + num(fmt::kMaxMetadataCount) + ")");
  }
  // Rule 9, and the condition for rule 11's reserved fields (section 10). In major 2 the
  // field is `features`: a bit this reader does not know means a file it cannot read.
  check_reserved = out.minor <= fmt::kMinorVersion;
  const uint64_t field = load_le<uint64_t>(base + 40);
  if (out.major == 1 && check_reserved && field != 0) {
    throw fail(ErrorKind::NonZeroReserved, "reserved preamble field at offset 40 is not zero");
  }
  if (out.major == 2) {
    if ((field & ~fmt::kKnownFeatures) != 0) {
      throw fail(ErrorKind::UnsupportedVersion,
                 "the file needs features " + hex64(field & ~fmt::kKnownFeatures) +
                     " (format " + num(out.major) + "." + num(out.minor) +
                     "), which this reader does not implement; it knows aliases (0x1)");
    }
    aliases = (field & fmt::kFeatureAliases) != 0;
  }

    end = h - fmt::kChecksumSize;
    pos = fmt::kPreambleSize;
    cursor = *fmt::round_up(h, out.alignment);  // h <= 2^30: cannot overflow
  }

  void read_tensors() {
  out.tensors.reserve(t_count);
  for (uint64_t i = 0; i < t_count; ++i) {
    auto record = [&] { return "tensor record #" + num(i) + " at offset " + num(pos); };
    // Rule 10.
    if (end - pos < fmt::kTensorRecordFixedSize) {
      throw fail(ErrorKind::MalformedHeader, record() + " runs past the end of the header (" +
                                                 num(end) + ")");
    }
    const unsigned char* r = base + pos;
    const uint32_t name_length = load_le<uint32_t>(r);
    const uint8_t code = r[4];
    const uint8_t rank = r[5];
    const uint64_t size = fmt::tensor_record_size(rank, name_length);
    if (size > end - pos) {
      throw fail(ErrorKind::MalformedHeader, record() + " is " + num(size) +
                                                 " bytes long and runs past the end of the "
                                                 "header (" + num(end) + ")");
    }
    TensorEntry e{};
    e.name = std::string_view(reinterpret_cast<const char*>(r + 32 + 8 * rank), name_length);
    auto label = [&] { return "tensor " + detail::quoted(e.name) + " (record #" + num(i) + ")"; };
    // Rule 11. With the aliases feature, bit 0 of the field is the alias flag.
    const uint64_t name_end = 32 + 8 * uint64_t{rank} + name_length;
    const uint16_t flags = load_le<uint16_t>(r + 6);
    const bool alias = aliases && (flags & fmt::kFlagAlias) != 0;
    const uint16_t reserved = aliases ? static_cast<uint16_t>(flags & ~fmt::kFlagAlias) : flags;
    if ((check_reserved && reserved != 0) || !all_zero(r + name_end, size - name_end)) {
      throw fail(ErrorKind::NonZeroReserved,
                 label() + " has a non-zero reserved field or padding byte");
    }
    // Rule 12.
    const auto dtype = dtype_from_code(code);
    if (!dtype) {
      std::string why = label() + " has unknown dtype code " + num(code);
      if (!check_reserved) {
        why += " (the file is format " + num(out.major) + "." + num(out.minor) +
               ", newer than this reader's " + num(out.major) + "." + num(fmt::kMinorVersion) + ")";
      }
      throw fail(ErrorKind::UnknownDtype, why);
    }
    e.dtype = *dtype;
    // Rule 13.
    if (rank > fmt::kMaxRank) {
      throw fail(ErrorKind::BadRank, label() + " has rank " + num(rank) + ", more than 8");
    }
    e.rank = rank;
    for (unsigned d = 0; d < rank; ++d) e.dims[d] = load_le<uint64_t>(r + 32 + 8 * d);
    // Rule 14.
    if (auto problem = name_problem(e.name); !problem.empty()) {
      throw fail(ErrorKind::BadName, "name of " + label() + " " + problem);
    }
    // Rule 15.
    const auto expected = fmt::tensor_byte_length(e.dims.data(), rank, dtype_size(e.dtype));
    if (!expected) {
      throw fail(ErrorKind::ShapeOverflow, label() + ": its shape holds 2^63 bytes or more");
    }
    // Rule 16.
    e.offset = load_le<uint64_t>(r + 8);
    e.byte_length = load_le<uint64_t>(r + 16);
    e.checksum = load_le<uint64_t>(r + 24);
    if (e.byte_length != *expected) {
      throw fail(ErrorKind::LengthMismatch, label() + " has byte length " + num(e.byte_length) +
                                                 " but its shape and dtype make " +
                                                 num(*expected));
    }
    // Rule 17. An alias has no bytes of its own: it names those of an earlier record.
    if (alias) {
      check_alias(e, label());
      out.tensors.push_back(e);
      pos += size;
      continue;
    }
    if (e.offset != cursor) {
      throw fail(ErrorKind::BadOffset, label() + " starts at offset " + num(e.offset) +
                                           " but the canonical layout puts it at " +
                                           num(cursor));
    }
    // offset < 2^63 and byte_length < 2^63, so the sum fits; its padded end may not.
    const auto next = fmt::round_up(e.offset + e.byte_length, out.alignment);
    if (!next) {
      throw fail(ErrorKind::Truncated, label() + " ends past 2^63 bytes, beyond any file");
    }
    if (!first_past_end && e.offset + e.byte_length > file_size) first_past_end = out.tensors.size();
    if (e.byte_length > 0) by_offset.emplace(e.offset, static_cast<uint32_t>(out.tensors.size()));
    cursor = *next;
    out.tensors.push_back(e);
    pos += size;
  }

  }

  // Rule 17 for an alias: an earlier record with bytes of its own starts at its offset
  // (at most one can: they do not overlap) and has its dtype, shape and checksum.
  void check_alias(TensorEntry& e, const std::string& label) const {
    if (e.byte_length == 0) {
      throw fail(ErrorKind::BadAlias, label + " is an alias of no bytes; an empty tensor is stored as itself");
    }
    const auto found = by_offset.find(e.offset);
    if (found == by_offset.end()) {
      throw fail(ErrorKind::BadAlias, label + " is an alias of offset " + num(e.offset) +
                                          ", where no earlier tensor's bytes start");
    }
    const TensorEntry& target = out.tensors[found->second];
    const bool same_shape = target.rank == e.rank && std::equal(e.dims.begin(), e.dims.begin() + e.rank, target.dims.begin());
    if (target.dtype != e.dtype || !same_shape || target.checksum != e.checksum) {
      throw fail(ErrorKind::BadAlias, label + " is an alias of tensor " + detail::quoted(target.name) +
                                          " but differs from it in " +
                                          (target.dtype != e.dtype ? "dtype" : !same_shape ? "shape" : "checksum"));
    }
    e.alias_of = found->second;
  }

  void read_metadata() {
  out.metadata.reserve(m_count);
  for (uint64_t j = 0; j < m_count; ++j) {
    auto record = [&] { return "metadata record #" + num(j) + " at offset " + num(pos); };
    // Rule 10.
    if (end - pos < fmt::kMetadataRecordFixedSize) {
      throw fail(ErrorKind::MalformedHeader, record() + " runs past the end of the header (" +
                                                 num(end) + ")");
    }
    const unsigned char* r = base + pos;
    const uint64_t key_length = load_le<uint32_t>(r);
    const uint64_t value_length = load_le<uint32_t>(r + 4);
    const uint64_t size = fmt::metadata_record_size(key_length, value_length);
    if (size > end - pos) {
      throw fail(ErrorKind::MalformedHeader, record() + " is " + num(size) +
                                                 " bytes long and runs past the end of the "
                                                 "header (" + num(end) + ")");
    }
    const auto* chars = reinterpret_cast<const char*>(r + 8);
    std::string_view key(chars, key_length);
    std::string_view value(chars + key_length, value_length);
    // Rule 11.
    const uint64_t used = 8 + key_length + value_length;
    if (!all_zero(r + used, size - used)) {
      throw fail(ErrorKind::NonZeroReserved, record() + " has a non-zero padding byte");
    }
    // Rule 14.
    if (auto problem = name_problem(key); !problem.empty()) {
      throw fail(ErrorKind::BadName, "metadata key " + detail::quoted(key) + " (" + record() + ") " + problem);
    }
    if (auto problem = value_problem(value); !problem.empty()) {
      throw fail(ErrorKind::BadName,
                 "metadata value of key " + detail::quoted(key) + " (" + record() + ") " + problem);
    }
    out.metadata.emplace_back(key, value);
    pos += size;
  }
  }

  void check_header_end() const {
  // Rule 18.
  if (pos != end) {
    throw fail(ErrorKind::MalformedHeader, "header has " + num(end - pos) +
                                               " unused bytes between its last record (ending at " +
                                               num(pos) + ") and its checksum");
  }
  }

  void check_unique() {
  // Rule 19.
  out.index.reserve(out.tensors.size());
  for (uint32_t i = 0; i < out.tensors.size(); ++i) {
    const auto [it, inserted] = out.index.emplace(out.tensors[i].name, i);
    if (!inserted) {
      throw fail(ErrorKind::DuplicateName, "tensor name " + detail::quoted(out.tensors[i].name) +
                                               " appears twice (records #" + num(it->second) +
                                               " and #" + num(i) + ")");
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

  void check_file_end() const {
  // Rule 20.
  if (first_past_end) {
    const TensorEntry& e = out.tensors[*first_past_end];
    throw fail(ErrorKind::Truncated, "tensor " + detail::quoted(e.name) + " ends at " +
                                         num(e.offset + e.byte_length) +
                                         ", past the end of the file (" + num(file_size) + ")");
  }
  if (file_size < cursor) {
    throw fail(ErrorKind::Truncated, "file is " + num(file_size) +
                                         " bytes but its last tensor's padding ends at " +
                                         num(cursor));
  }
  if (file_size > cursor) {
    throw fail(ErrorKind::TrailingBytes, "file has " + num(file_size - cursor) +
                                             " bytes after the padded end of its last tensor (" +
                                             num(cursor) + ")");
  }
  }

  const unsigned char* base;
  uint64_t file_size;
  const std::string& path;
  ParsedHeader out;
  uint64_t h = 0, t_count = 0, m_count = 0;
  bool check_reserved = true;
  bool aliases = false;  // major 2 with the aliases feature
  std::unordered_map<uint64_t, uint32_t> by_offset;  // start of each record's own bytes -> its index
  uint64_t end = 0;     // of the records: where the header's checksum starts
  uint64_t pos = 0;     // the next record
  uint64_t cursor = 0;  // where the next tensor's data must start (rule 17)
  std::optional<size_t> first_past_end;  // the first tensor whose data passes the file's end
};

}  // namespace

ParsedHeader validate_header(const unsigned char* base, uint64_t file_size, const std::string& path) {
  return HeaderValidator(base, file_size, path).run();
}

}  // namespace tensormap::detail
