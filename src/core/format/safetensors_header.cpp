// Validation of safetensors files, rule by rule in the order of the reference
// implementation (spec/SAFETENSORS.md), and encoding of their headers for the writer.
#include <nlohmann/json.hpp>

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

constexpr const char* kMetadataKey = "__metadata__";
constexpr std::string_view kOffsetsField = "\"data_offsets\"";

std::string num(uint64_t v) { return std::to_string(v); }

// One pass of nlohmann's SAX parser over the header, checking rule 5 as the events come
// and filling `out` directly: no DOM is built. (A DOM of a million entries cost 7 us and
// ~250 bytes per entry, and a second pass was needed to see repeated names, which the DOM
// silently drops.) The first broken rule throws Error(SafetensorsBadJson) naming the tensor.
//
// While parsing, each entry's `offset` holds its begin and `byte_length` its end, both
// relative to the data, as written in data_offsets; rules 6 to 8 then make them absolute.
class HeaderReader final : public nlohmann::json_sax<nlohmann::json> {
 public:
  HeaderReader(ParsedHeader& out, const std::string& path) : out_(out), path_(path) {}

  bool start_object(std::size_t) override {
    switch (state_) {
      case State::BeforeRoot: state_ = State::RootKey; return true;
      case State::RootValue:
        if (in_metadata_) {
          state_ = State::MetadataKey;
        } else {
          entry_ = TensorEntry{};
          entry_.name = name_;
          seen_ = 0;
          offset_count_ = 0;
          state_ = State::FieldKey;
        }
        return true;
      case State::Skip: ++skip_depth_; return true;
      default: return wrong_value();
    }
  }

  bool end_object() override {
    switch (state_) {
      case State::FieldKey:
        if (seen_ != (kDtype | kShape | kOffsets) || offset_count_ != 2) {
          bad(label() + " needs a string dtype, an array shape and two data_offsets");
        }
        out_.tensors.push_back(entry_);
        state_ = State::RootKey;
        return true;
      case State::MetadataKey: state_ = State::RootKey; return true;
      case State::RootKey: state_ = State::AfterRoot; return true;
      case State::Skip: return leave_skipped();
      default: return true;  // unreachable: the parser pairs brackets
    }
  }

  bool start_array(std::size_t) override {
    switch (state_) {
      case State::FieldValue:
        if (field_ == kShape) {
          state_ = State::Shape;
          return true;
        }
        if (field_ == kOffsets) {
          state_ = State::Offsets;
          return true;
        }
        return wrong_value();
      case State::Skip: ++skip_depth_; return true;
      default: return wrong_value();
    }
  }

  bool end_array() override {
    switch (state_) {
      case State::Shape: state_ = State::FieldKey; return true;
      case State::Offsets:
        if (offset_count_ != 2) bad(label() + " needs a string dtype, an array shape and two data_offsets");
        state_ = State::FieldKey;
        return true;
      case State::Skip: return leave_skipped();
      default: return true;  // unreachable: the parser pairs brackets
    }
  }

  bool key(string_t& k) override {
    switch (state_) {
      case State::RootKey:
        if (k == kMetadataKey) {
          if (metadata_seen_) bad("__metadata__ appears twice in the header");
          metadata_seen_ = in_metadata_ = true;
        } else {
          in_metadata_ = false;
          out_.owned.push_back(k);
          name_ = out_.owned.back();
          if (!out_.index.emplace(name_, static_cast<uint32_t>(out_.tensors.size())).second) {
            bad("tensor name " + detail::quoted(name_) + " appears twice in the header");
          }
        }
        state_ = State::RootValue;
        return true;
      case State::FieldKey: {
        const unsigned field = k == "dtype" ? kDtype : k == "shape" ? kShape : k == "data_offsets" ? kOffsets : 0;
        if (field == 0) {  // fields the format does not define are ignored, as the reference does
          state_ = State::Skip;
          skip_depth_ = 0;
          return true;
        }
        if (seen_ & field) bad(label() + " has the field " + detail::quoted(k) + " twice");
        seen_ |= field;
        field_ = field;
        state_ = State::FieldValue;
        return true;
      }
      case State::MetadataKey:
        out_.owned.push_back(k);
        meta_key_ = out_.owned.back();
        if (!metadata_keys_.insert(meta_key_).second) bad("metadata key " + detail::quoted(k) + " appears twice");
        state_ = State::MetadataValue;
        return true;
      default: return true;  // keys inside a skipped value
    }
  }

  bool string(string_t& s) override {
    if (state_ == State::FieldValue && field_ == kDtype) {
      const auto dtype = dtype_from_name(s);
      if (!dtype) bad(label() + " has unknown dtype " + detail::quoted(s));
      entry_.dtype = *dtype;
      state_ = State::FieldKey;
      return true;
    }
    if (state_ == State::MetadataValue) {
      out_.owned.push_back(s);
      out_.metadata.emplace_back(meta_key_, out_.owned.back());
      state_ = State::MetadataKey;
      return true;
    }
    return scalar();
  }

  bool number_unsigned(number_unsigned_t v) override {
    if (state_ == State::Shape) {
      if (entry_.rank == format::kMaxRank) bad(label() + " has rank above 8; tensormap reads at most 8");
      entry_.dims[entry_.rank++] = v;
      return true;
    }
    if (state_ == State::Offsets) {
      if (offset_count_ == 2) bad(label() + " needs a string dtype, an array shape and two data_offsets");
      (offset_count_++ == 0 ? entry_.offset : entry_.byte_length) = v;
      return true;
    }
    return scalar();
  }

  bool number_integer(number_integer_t) override { return scalar(); }
  bool number_float(number_float_t, const string_t&) override { return scalar(); }
  bool boolean(bool) override { return scalar(); }
  bool null() override { return scalar(); }
  bool binary(binary_t&) override { return scalar(); }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    bad(std::string("header is not valid JSON: ") + e.what());
  }

 private:
  enum class State {
    BeforeRoot,
    RootKey,
    RootValue,
    FieldKey,
    FieldValue,
    Shape,
    Offsets,
    MetadataKey,
    MetadataValue,
    Skip,
    AfterRoot
  };
  static constexpr unsigned kDtype = 1, kShape = 2, kOffsets = 4;

  [[noreturn]] void bad(const std::string& what) const {
    throw Error(ErrorKind::SafetensorsBadJson, path_ + ": " + what);
  }

  std::string label() const { return "tensor " + detail::quoted(name_); }

  // A scalar: inside an ignored field's value, or that value itself; anywhere else, wrong.
  bool scalar() {
    if (state_ != State::Skip) return wrong_value();
    if (skip_depth_ == 0) state_ = State::FieldKey;
    return true;
  }

  bool leave_skipped() {
    if (--skip_depth_ == 0) state_ = State::FieldKey;
    return true;
  }

  // Says what was expected where a value of the wrong kind came.
  [[noreturn]] bool wrong_value() const {
    switch (state_) {
      case State::BeforeRoot: bad("header is not a JSON object");
      case State::RootValue:
        if (in_metadata_) bad("__metadata__ is not an object");
        bad(label() + " is not an object");
      case State::Shape: bad(label() + " has a dimension that is not a non-negative integer");
      case State::Offsets: bad(label() + " has a data offset that is not a non-negative integer");
      case State::MetadataValue: bad("metadata value of " + detail::quoted(meta_key_) + " is not a string");
      default: bad(label() + " needs a string dtype, an array shape and two data_offsets");
    }
  }

  ParsedHeader& out_;
  const std::string& path_;
  State state_ = State::BeforeRoot;
  std::string_view name_;      // the tensor being read
  std::string_view meta_key_;  // the metadata key whose value comes next
  TensorEntry entry_{};
  unsigned seen_ = 0;   // fields of the tensor seen so far
  unsigned field_ = 0;  // the field whose value comes next
  unsigned offset_count_ = 0;
  unsigned skip_depth_ = 0;  // nesting inside an ignored field's value
  bool in_metadata_ = false;
  bool metadata_seen_ = false;
  std::unordered_set<std::string_view> metadata_keys_;
};

}  // namespace

ParsedHeader validate_safetensors(const unsigned char* base, uint64_t file_size, const std::string& path) {
  auto fail = [&](ErrorKind kind, const std::string& what) { return Error(kind, path + ": " + what); };
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
    throw fail(ErrorKind::SafetensorsHeaderPastEnd,
               "header of " + num(n) + " bytes runs past the end of the file (" + num(file_size) + " bytes)");
  }
  out.header_size = 8 + n;
  // Rule 4.
  const std::string_view text(reinterpret_cast<const char*>(base + 8), n);
  if (!is_valid_utf8(text)) throw fail(ErrorKind::SafetensorsHeaderNotUtf8, "header is not valid UTF-8");

  // Rule 5: a JSON object of {name: {dtype, shape, data_offsets}} and "__metadata__".
  // Reserve for as many tensors as the text names "data_offsets" fields: growing the table
  // and the index one by one cost a third of the time of a million-entry header.
  size_t fields = 0;
  for (size_t at = text.find(kOffsetsField); at != std::string_view::npos; at = text.find(kOffsetsField, at + 1)) {
    ++fields;
  }
  out.tensors.reserve(fields);
  out.index.reserve(fields);
  // nlohmann's lexer takes a NUL byte for the end of the input and would ignore the rest;
  // JSON allows no NUL outside strings and no raw control character inside them, so the
  // reference (serde_json) refuses it wherever it is.
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) {
    throw fail(ErrorKind::SafetensorsBadJson,
               "header is not valid JSON: a NUL byte at byte " + num(8 + nul) + " of the file");
  }
  HeaderReader reader(out, path);
  nlohmann::json::sax_parse(text.begin(), text.end(), &reader);

  // Rules 6 to 8, tensor by tensor in the order of their data (writers usually list the
  // tensors in that order already; then nothing moves and the index stays as it is). The
  // order is by (begin, end), as the reference sorts: an empty tensor at the offset where
  // another starts comes first and is legal wherever the header lists it.
  auto by_range = [](const TensorEntry& a, const TensorEntry& b) {
    return a.offset != b.offset ? a.offset < b.offset : a.byte_length < b.byte_length;
  };
  if (!std::is_sorted(out.tensors.begin(), out.tensors.end(), by_range)) {
    std::stable_sort(out.tensors.begin(), out.tensors.end(), by_range);
    for (uint32_t i = 0; i < out.tensors.size(); ++i) out.index.find(out.tensors[i].name)->second = i;
  }
  uint64_t cursor = 0;
  for (TensorEntry& e : out.tensors) {
    const uint64_t begin = e.offset, end = e.byte_length;
    auto label = [&] { return "tensor " + detail::quoted(e.name); };
    if (begin != cursor || end < begin) {
      throw fail(ErrorKind::SafetensorsBadOffsets,
                 label() + " has data_offsets [" + num(begin) + ", " + num(end) + "] but must start at " + num(cursor) +
                     (begin < cursor ? " (it overlaps the previous tensor)" : " (there is a hole before it)"));
    }
    const auto expected = format::tensor_byte_length(e.dims.data(), e.rank, dtype_size(e.dtype));
    if (!expected) throw fail(ErrorKind::SafetensorsOverflow, label() + ": its shape holds 2^63 bytes or more");
    if (end - begin != *expected) {
      throw fail(ErrorKind::SafetensorsSizeMismatch,
                 label() + " spans " + num(end - begin) + " bytes but its shape and dtype make " + num(*expected));
    }
    cursor = end;
    e.offset = 8 + n + begin;
    e.byte_length = end - begin;
  }
  // Rule 9.
  if (8 + n + cursor != file_size) {
    throw fail(ErrorKind::SafetensorsBufferMismatch,
               "tensors end at " + num(8 + n + cursor) + " but the file is " + num(file_size) + " bytes" +
                   (8 + n + cursor > file_size ? " (truncated)" : " (trailing bytes)"));
  }
  return out;
}

Layout plan_safetensors_layout(const std::vector<TensorSpec>& tensors, const std::vector<uint64_t>& byte_lengths,
                               const WriterOptions& options, const std::string& path,
                               std::vector<unsigned char>* header) {
  auto invalid = [&](const std::string& what) { return Error(ErrorKind::InvalidArgument, path + ": " + what); };
  Layout layout;
  layout.byte_lengths = byte_lengths;
  for (const auto& t : tensors) {
    if (!is_valid_utf8(t.name)) throw invalid("tensor name " + detail::quoted(t.name) + " is not valid UTF-8");
    if (t.name == kMetadataKey) throw invalid("a tensor cannot be named __metadata__");
    if (t.shape.size() > format::kMaxRank) throw invalid("tensor " + detail::quoted(t.name) + " has rank above 8");
  }
  for (const auto& [k, v] : options.metadata) {
    if (!is_valid_utf8(k) || !is_valid_utf8(v)) throw invalid("metadata " + detail::quoted(k) + " is not valid UTF-8");
  }
  // Largest elements first: with power-of-two sizes, every tensor is then aligned to its
  // element size from the (page-aligned) start of the data.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return dtype_size(tensors[a].dtype) > dtype_size(tensors[b].dtype); });
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
