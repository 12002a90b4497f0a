// Validation of safetensors files, rule by rule in the order of the reference
// implementation (spec/SAFETENSORS.md), and encoding of their headers for the writer.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <optional>
#include <unordered_set>

#include "bytes.h"
#include "header.h"
#include "names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"

namespace tensormap::detail {

namespace {

constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

std::string num(uint64_t v) { return std::to_string(v); }

}  // namespace

bool looks_like_safetensors(const unsigned char* base, uint64_t size) {
  // u64 header length, then a JSON object (possibly after JSON white space).
  for (uint64_t i = 8; i < size && i < 8 + 64; ++i) {
    const unsigned char c = base[i];
    if (c == '{') return true;
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return false;
  }
  return false;
}

namespace {

// SAX handler that only remembers the first top-level key seen twice.
struct TopLevelDuplicates : nlohmann::json_sax<nlohmann::json> {
  int depth = 0;
  std::unordered_set<std::string> seen;
  std::optional<std::string> repeated;

  bool key(string_t& k) override {
    if (depth == 1 && !repeated && !seen.insert(k).second) repeated = k;
    return true;
  }
  bool start_object(std::size_t) override { return ++depth, true; }
  bool end_object() override { return --depth, true; }
  bool start_array(std::size_t) override { return ++depth, true; }
  bool end_array() override { return --depth, true; }
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  // Malformed text: stop here; the DOM parse that follows reports the error.
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }
};

}  // namespace

ParsedHeader validate_safetensors(const unsigned char* base, uint64_t file_size,
                                  const std::string& path) {
  auto fail = [&](ErrorKind kind, const std::string& what) {
    return Error(kind, path + ": " + what);
  };
  ParsedHeader out;
  out.format = Format::Safetensors;
  // Rule 1.
  if (file_size < 8) {
    throw fail(ErrorKind::SafetensorsTooSmall,
               "file is " + num(file_size) + " bytes, too small for a safetensors header length");
  }
  // Rule 2.
  const uint64_t n = load_le<uint64_t>(base);
  if (n > kMaxSafetensorsHeader) {
    throw fail(ErrorKind::SafetensorsHeaderTooLarge,
               "header length " + num(n) + " is above the limit of " + num(kMaxSafetensorsHeader));
  }
  // Rule 3 (n <= 1e8, so 8 + n cannot overflow).
  if (8 + n > file_size) {
    throw fail(ErrorKind::SafetensorsHeaderPastEnd, "header of " + num(n) +
                                                        " bytes runs past the end of the file (" +
                                                        num(file_size) + " bytes)");
  }
  out.header_size = 8 + n;
  // Rule 4.
  const std::string_view text(reinterpret_cast<const char*>(base + 8), n);
  if (!is_valid_utf8(text)) throw fail(ErrorKind::SafetensorsHeaderNotUtf8, "header is not valid UTF-8");

  // Rule 5: a JSON object of {name: {dtype, shape, data_offsets}} and "__metadata__".
  auto bad_json = [&](const std::string& what) { return fail(ErrorKind::SafetensorsBadJson, what); };
  // Two passes: a SAX pass that finds repeated top-level names (nlohmann keeps only the
  // last one silently), then the DOM parse. A parse callback would do both at once, but
  // nlohmann then scans the whole top-level object after each member: quadratic, and a
  // million-entry header took minutes.
  nlohmann::json header;
  try {
    TopLevelDuplicates duplicates;
    const bool well_formed = nlohmann::json::sax_parse(text.begin(), text.end(), &duplicates);
    if (well_formed && duplicates.repeated) {
      throw bad_json("tensor name " + detail::quoted(*duplicates.repeated) + " appears twice in the header");
    }
    header = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw bad_json(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad_json("header is not a JSON object");

  struct Raw {
    std::string name;
    Dtype dtype;
    std::vector<uint64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Raw> raws;
  raws.reserve(header.size());
  for (auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) throw bad_json("__metadata__ is not an object");
      for (auto& [k, v] : value.items()) {
        if (!v.is_string()) throw bad_json("metadata value of " + detail::quoted(k) + " is not a string");
        out.owned.push_back(k);
        const std::string& key = out.owned.back();
        out.owned.push_back(v.get<std::string>());
        out.metadata.emplace_back(key, out.owned.back());
      }
      continue;
    }
    const std::string label = "tensor " + detail::quoted(name);
    if (!value.is_object()) throw bad_json(label + " is not an object");
    const auto dtype_it = value.find("dtype");
    const auto shape_it = value.find("shape");
    const auto offsets_it = value.find("data_offsets");
    if (dtype_it == value.end() || !dtype_it->is_string() || shape_it == value.end() ||
        !shape_it->is_array() || offsets_it == value.end() || !offsets_it->is_array() ||
        offsets_it->size() != 2) {
      throw bad_json(label + " needs a string dtype, an array shape and two data_offsets");
    }
    const auto dtype = dtype_from_name(dtype_it->get<std::string>());
    if (!dtype) throw bad_json(label + " has unknown dtype " + detail::quoted(dtype_it->get<std::string>()));
    Raw raw{name, *dtype, {}, 0, 0};
    if (shape_it->size() > format::kMaxRank) {
      throw bad_json(label + " has rank " + num(shape_it->size()) + "; tensormap reads at most 8");
    }
    for (const auto& d : *shape_it) {
      if (!d.is_number_unsigned()) throw bad_json(label + " has a dimension that is not a non-negative integer");
      raw.shape.push_back(d.get<uint64_t>());
    }
    for (int i = 0; i < 2; ++i) {
      if (!(*offsets_it)[i].is_number_unsigned()) throw bad_json(label + " has a data offset that is not a non-negative integer");
    }
    raw.begin = (*offsets_it)[0].get<uint64_t>();
    raw.end = (*offsets_it)[1].get<uint64_t>();
    raws.push_back(std::move(raw));
  }

  // Rules 6 to 8, tensor by tensor in the order of their data.
  std::stable_sort(raws.begin(), raws.end(), [](const Raw& a, const Raw& b) { return a.begin < b.begin; });
  uint64_t cursor = 0;
  out.tensors.reserve(raws.size());
  for (Raw& raw : raws) {
    const std::string label = "tensor " + detail::quoted(raw.name);
    if (raw.begin != cursor || raw.end < raw.begin) {
      throw fail(ErrorKind::SafetensorsBadOffsets,
                 label + " has data_offsets [" + num(raw.begin) + ", " + num(raw.end) + "] but must start at " +
                     num(cursor) + (raw.begin < cursor ? " (it overlaps the previous tensor)" : " (there is a hole before it)"));
    }
    const auto expected = format::tensor_byte_length(raw.shape.data(), static_cast<unsigned>(raw.shape.size()),
                                                     dtype_size(raw.dtype));
    if (!expected) throw fail(ErrorKind::SafetensorsOverflow, label + ": its shape holds 2^63 bytes or more");
    if (raw.end - raw.begin != *expected) {
      throw fail(ErrorKind::SafetensorsSizeMismatch, label + " spans " + num(raw.end - raw.begin) +
                                                         " bytes but its shape and dtype make " + num(*expected));
    }
    cursor = raw.end;
    out.owned.push_back(std::move(raw.name));
    TensorEntry e{};
    e.name = out.owned.back();
    e.dtype = raw.dtype;
    e.rank = static_cast<uint8_t>(raw.shape.size());
    std::copy(raw.shape.begin(), raw.shape.end(), e.dims.begin());
    e.offset = 8 + n + raw.begin;
    e.byte_length = raw.end - raw.begin;
    out.tensors.push_back(e);
  }
  // Rule 9.
  if (8 + n + cursor != file_size) {
    throw fail(ErrorKind::SafetensorsBufferMismatch,
               "tensors end at " + num(8 + n + cursor) + " but the file is " + num(file_size) + " bytes" +
                   (8 + n + cursor > file_size ? " (truncated)" : " (trailing bytes)"));
  }
  out.index.reserve(out.tensors.size());
  for (uint32_t i = 0; i < out.tensors.size(); ++i) out.index.emplace(out.tensors[i].name, i);
  return out;
}

Layout plan_safetensors_layout(const std::vector<TensorSpec>& tensors, const WriterOptions& options,
                               const std::string& path, std::vector<unsigned char>* header) {
  auto invalid = [&](const std::string& what) { return Error(ErrorKind::InvalidArgument, path + ": " + what); };
  Layout layout;
  std::unordered_set<std::string_view> names;
  for (const auto& t : tensors) {
    if (!is_valid_utf8(t.name)) throw invalid("tensor name " + detail::quoted(t.name) + " is not valid UTF-8");
    if (t.name == kMetadataKey) throw invalid("a tensor cannot be named __metadata__");
    if (!names.insert(t.name).second) throw invalid("tensor " + detail::quoted(t.name) + " is declared twice");
    if (!dtype_from_code(static_cast<uint8_t>(t.dtype))) throw invalid("tensor " + detail::quoted(t.name) + ": unknown dtype");
    if (t.shape.size() > format::kMaxRank) throw invalid("tensor " + detail::quoted(t.name) + " has rank above 8");
    const auto length = format::tensor_byte_length(t.shape.data(), static_cast<unsigned>(t.shape.size()),
                                                   dtype_size(t.dtype));
    if (!length) throw invalid("tensor " + detail::quoted(t.name) + ": shape is too large (2^63 bytes or more)");
    layout.byte_lengths.push_back(*length);
  }
  for (const auto& [k, v] : options.metadata) {
    if (!is_valid_utf8(k) || !is_valid_utf8(v)) throw invalid("metadata " + detail::quoted(k) + " is not valid UTF-8");
  }
  // Largest elements first: with power-of-two sizes, every tensor is then aligned to its
  // element size from the (page-aligned) start of the data.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return dtype_size(tensors[a].dtype) > dtype_size(tensors[b].dtype);
  });
  std::vector<uint64_t> relative(tensors.size());
  uint64_t cursor = 0;
  for (size_t i : order) {
    relative[i] = cursor;
    const auto next = checked_add(cursor, layout.byte_lengths[i]);
    if (!next || *next > format::kMaxFileOffset) throw invalid("tensors add up to more than 2^63 bytes");
    cursor = *next;
  }
  // The JSON text is assembled entry by entry (nlohmann::ordered_json's operator[] is a
  // linear search, which made a million tensors take minutes); every key and value is
  // still serialised, and so escaped, by nlohmann::json.
  std::string text = "{";
  auto append_member = [&](const std::string& key, const nlohmann::ordered_json& value) {
    if (text.size() > 1) text += ',';
    text += nlohmann::json(key).dump();
    text += ':';
    text += value.dump();
  };
  if (!options.metadata.empty()) {
    std::unordered_set<std::string_view> keys;
    std::string meta = "{";
    for (const auto& [k, v] : options.metadata) {
      if (!keys.insert(k).second) throw invalid("metadata key " + detail::quoted(k) + " is given twice");
      if (meta.size() > 1) meta += ',';
      meta += nlohmann::json(k).dump() + ':' + nlohmann::json(v).dump();
    }
    meta += '}';
    if (text.size() > 1) text += ',';
    text += nlohmann::json(std::string(kMetadataKey)).dump() + ':' + meta;
  }
  for (size_t i : order) {
    const auto& t = tensors[i];
    append_member(t.name, {{"dtype", std::string(dtype_name(t.dtype))},
                           {"shape", t.shape},
                           {"data_offsets", {relative[i], relative[i] + layout.byte_lengths[i]}}});
    if (text.size() > kMaxSafetensorsHeader) throw invalid("safetensors header would exceed 100,000,000 bytes");
  }
  text += '}';
  const uint64_t data_start = *format::round_up(8 + text.size(), 4096);
  text.append(data_start - 8 - text.size(), ' ');
  if (text.size() > kMaxSafetensorsHeader) throw invalid("safetensors header would exceed 100,000,000 bytes");
  header->assign(8 + text.size(), 0);
  store_le<uint64_t>(header->data(), text.size());
  std::memcpy(header->data() + 8, text.data(), text.size());
  layout.header_size = data_start;
  for (size_t i = 0; i < tensors.size(); ++i) layout.offsets.push_back(data_start + relative[i]);
  layout.file_size = data_start + cursor;
  return layout;
}

}  // namespace tensormap::detail
