// The tensormap header as the writer makes it: the layout planned from the declarations
// (checked against every rule a reader applies), then the header's bytes encoded. The
// reader's side is header_reader.cpp.
#include "format/header.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <unordered_set>

#include "format/names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "util/bytes.h"

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

Layout plan_layout(const std::vector<TensorSpec>& tensors, const std::vector<uint64_t>& byte_lengths,
                   const std::vector<std::optional<size_t>>& aliases, const WriterOptions& options,
                   const std::string& path) {
  auto invalid = [&](const std::string& what) { return Error(ErrorKind::InvalidArgument, path + ": " + what); };
  if (!fmt::is_valid_alignment(options.alignment)) {
    throw invalid("alignment " + std::to_string(options.alignment) + " is not a power of two between 64 and 1048576");
  }
  if (tensors.size() > fmt::kMaxTensorCount) {
    throw invalid(std::to_string(tensors.size()) + " tensors, more than the limit of " +
                  std::to_string(fmt::kMaxTensorCount));
  }
  if (options.metadata.size() > fmt::kMaxMetadataCount) {
    throw invalid(std::to_string(options.metadata.size()) + " metadata pairs, more than the limit of " +
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
      throw invalid(label() + " has rank " + std::to_string(t.shape.size()) + ", more than the limit of 8");
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
    throw invalid("header would be larger than the limit of " + std::to_string(fmt::kMaxHeaderSize) + " bytes");
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

std::vector<unsigned char> encode_header(const std::vector<TensorSpec>& tensors, const WriterOptions& options,
                                         const Layout& layout, const std::vector<uint64_t>& checksums) {
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

}  // namespace tensormap::detail
