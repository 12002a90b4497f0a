// Reading torch.save archives without LibTorch.
//
// A torch.save file is a zip: <dir>/data.pkl (a pickle) and one record per storage,
// <dir>/data/<key>, stored uncompressed. The central directory (zip.h) gives every
// record's place; the restricted unpickler (torch_pickle.h) describes every tensor; no tensor
// byte is read here. Every tensor reachable from the root through dicts, lists and tuples
// is named by its path with '.' between keys (a training checkpoint's
// {"model": {"fc.weight": ...}, "optimizer": {"state": {0: {"exp_avg": ...}}}} gives
// "model.fc.weight" and "optimizer.state.0.exp_avg"); any other value (an epoch, a
// learning rate, an object of the training script) is skipped and listed by skipped().
// Reads go through the archive's ByteSource: for a local file, pread on the descriptor it
// was opened with (Mapping::read):
// a file that shrinks meanwhile gives Error(Truncated), never SIGBUS.
#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>
#include <unordered_map>

#include "format/names.h"
#include "io/mapping.h"
#include "source.h"
#include "tensormap/error.h"
#include "torch_save/torch_pickle.h"
#include "torch_save/zip.h"

namespace tensormap::detail {
namespace {

constexpr uint64_t kMaxPickleBytes = uint64_t{1} << 30;

struct TorchTensor {
  TensorDescription desc;
  uint64_t storage_offset;  // of the storage's first byte in the file
  uint64_t storage_bytes;
  uint64_t byte_length;
};

bool is_contiguous(const TensorDescription& t) {
  int64_t expected = 1;
  for (size_t d = t.sizes.size(); d-- > 0;) {
    if (t.sizes[d] != 1 && t.strides[d] != expected) return false;
    expected *= t.sizes[d];
  }
  return true;
}

// Copies the elements of a strided tensor, in row-major order, from `src` (element 0 of
// the tensor) to `dest`. The unpickler checked that every element lies in the storage.
void gather(const unsigned char* src, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
            size_t element, unsigned char* dest) {
  const size_t rank = sizes.size();
  std::vector<int64_t> index(rank, 0);
  uint64_t numel = 1;
  for (int64_t s : sizes) numel *= static_cast<uint64_t>(s);
  for (uint64_t n = 0; n < numel; ++n) {
    uint64_t at = 0;
    for (size_t d = 0; d < rank; ++d) at += static_cast<uint64_t>(index[d] * strides[d]);
    std::memcpy(dest + n * element, src + at * element, element);
    for (size_t d = rank; d-- > 0;) {
      if (++index[d] < sizes[d]) break;
      index[d] = 0;
    }
  }
}

struct TorchSaveSource final : Source {
  CheckpointFormat format() const override { return CheckpointFormat::TorchSave; }
  TensorInfo info(size_t i) const override {
    const TorchTensor& t = tensors[i];
    return {t.desc.dtype, t.desc.sizes, t.byte_length};
  }
  std::vector<std::pair<std::string, std::string>> skipped() const override { return skipped_values; }

  // Reads tensor `t` (possibly a view) with pread: at once where it is contiguous,
  // otherwise the span of the storage it reaches, then gathered.
  void read_tensor(const TensorDescription& t, uint64_t storage_offset, void* dest, uint64_t byte_length) const {
    if (byte_length == 0) return;
    const size_t element = dtype_size(t.dtype);
    const uint64_t first = storage_offset + t.offset * element;
    const std::string what = "tensor storage " + quoted(t.key);
    if (is_contiguous(t)) {
      bytes->read(first, dest, byte_length, what);
      return;
    }
    uint64_t span = 1;
    for (size_t d = 0; d < t.sizes.size(); ++d) span += static_cast<uint64_t>((t.sizes[d] - 1) * t.strides[d]);
    std::vector<unsigned char> buffer(span * element);
    bytes->read(first, buffer.data(), buffer.size(), what);
    gather(buffer.data(), t.sizes, t.strides, element, static_cast<unsigned char*>(dest));
  }
  void read(size_t i, void* dest) const override {
    read_tensor(tensors[i].desc, tensors[i].storage_offset, dest, tensors[i].byte_length);
  }
  bool read_range(size_t i, uint64_t offset, uint64_t size, void* dest) const override {
    const TorchTensor& t = tensors[i];
    if (!is_contiguous(t.desc)) return false;
    if (size > 0) {
      bytes->read(t.storage_offset + t.desc.offset * dtype_size(t.desc.dtype) + offset, dest, size,
                  "tensor storage " + quoted(t.desc.key));
    }
    return true;
  }
  void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const override {
    TensorDescription part = tensors[i].desc;  // the slice is a narrower view
    const auto d = static_cast<size_t>(dim);
    part.offset += static_cast<uint64_t>(start * part.strides[d]);
    part.sizes[d] = length;
    uint64_t bytes = dtype_size(part.dtype);
    for (int64_t s : part.sizes) bytes *= static_cast<uint64_t>(s);
    if (length == 0) return;
    read_tensor(part, tensors[i].storage_offset, dest, bytes);
  }
  void evict(size_t i) const override {
    if (!file) return;
    const TorchTensor& t = tensors[i];
    file->release(t.storage_offset, t.storage_offset + t.storage_bytes, "tensor storage " + quoted(t.desc.key));
  }
  double cached_fraction(size_t i) const override {
    if (!file) return 0.0;
    const TorchTensor& t = tensors[i];
    return file->cached_fraction(t.storage_offset, t.storage_offset + t.storage_bytes);
  }
  void drop_cache(size_t i) const override {
    if (!file) return;
    const TorchTensor& t = tensors[i];
    file->drop_cache(t.storage_offset, t.storage_offset + t.storage_bytes);
  }
  TensorPlacement placement(size_t i) const override {
    const TorchTensor& t = tensors[i];
    if (!file) {
      throw Error(ErrorKind::InvalidArgument,
                  path + ": tensor " + quoted(names[i]) +
                      " cannot be mapped: the archive is not a local file; read or copy it");
    }
    return {file->cow_base() + t.storage_offset, t.storage_bytes, t.desc.offset, t.desc.strides, file};
  }
  std::optional<size_t> alias_of(size_t i) const override { return aliases[i]; }

  std::shared_ptr<const ByteSource> bytes;  // where every read goes
  std::shared_ptr<const Mapping> file;      // the same bytes where they are a mapped file, else null
  std::vector<TorchTensor> tensors;
  std::vector<std::optional<size_t>> aliases;  // the first earlier tensor that is the very same view
  std::vector<std::pair<std::string, std::string>> skipped_values;
};

std::string describe(const PickleValue& value) {
  using Kind = PickleValue::Kind;
  switch (value.kind) {
    case Kind::None: return "None";
    case Kind::Bool: return value.boolean ? "True" : "False";
    case Kind::Int: return "the int " + std::to_string(value.integer);
    case Kind::Float: return "a float";
    case Kind::String: return "a string";
    case Kind::Global: return "the global " + quoted(value.text());
    case Kind::Opaque:
      return value.unstored_tensor ? quoted(value.text()) + ", a dtype tensormap does not store"
                                   : "an object made by " + quoted(value.text()) + " (not executed)";
    case Kind::Storage: return "a storage";
    default: return "a container";
  }
}

// Adds every tensor reachable from `value` under `prefix`, and the values that are not
// tensors to `skipped`.
// A pickle may reference one value from many places (the memo): 64 levels of a dict
// holding the next one twice name 2^64 paths in a few hundred bytes. A checkpoint is a
// tree but for a few shared values (tied weights), so visits are bounded by a small
// multiple of the values the pickle made, and every path built and entry kept is charged
// to the pickle's budget, as the values were. A tensor's path is its name, at most
// format::kMaxNameLength bytes; a skipped value's longer path is cut to that length.
struct Collector {
  const std::string& path;
  PickleBudget& budget;
  uint64_t max_visits;                                                    // 1024 + 8 per value made
  std::vector<std::pair<std::string, const TensorDescription*>> tensors;  // into the document
  std::vector<std::pair<std::string, std::string>> skipped;
  uint64_t visits = 0;

  std::string join(const std::string& prefix, std::string_view key) {
    budget.charge(prefix.size() + 1 + key.size() + sizeof(std::string), path);
    std::string out;
    out.reserve(prefix.size() + 1 + key.size());
    if (!prefix.empty()) out.append(prefix).append(".");
    return out.append(key);
  }

  void skip(const std::string& where, std::string what) {
    std::string name = where.size() > format::kMaxNameLength ? where.substr(0, format::kMaxNameLength) + "..." : where;
    budget.charge(sizeof(skipped[0]) + name.size() + what.size(), path);
    skipped.emplace_back(std::move(name), std::move(what));
  }

  void collect(const PickleValue& value, const std::string& prefix, int depth) {
    using Kind = PickleValue::Kind;
    const std::string here = prefix.empty() ? std::string("<root>") : prefix;
    if (depth > 64) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": " + quoted(here) + " nests containers more than 64 deep");
    }
    if (++visits > max_visits) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": its values are reached by more than " +
                                                     std::to_string(max_visits) +
                                                     " paths (containers shared over and over)");
    }
    const bool container = value.kind == Kind::Dict || value.kind == Kind::List || value.kind == Kind::Tuple;
    if ((value.kind == Kind::Tensor || container) && prefix.size() > format::kMaxNameLength) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": the path " + quoted(prefix) + " is " +
                                                     std::to_string(prefix.size()) + " bytes, more than the " +
                                                     std::to_string(format::kMaxNameLength) + " a name may have");
    }
    switch (value.kind) {
      case Kind::Tensor:
        if (prefix.empty()) {
          throw Error(ErrorKind::UnsupportedArchive,
                      path + ": the archive is a single tensor, not a dict of tensors; it has no name to read it by");
        }
        budget.charge(sizeof(tensors[0]) + prefix.size(), path);
        tensors.emplace_back(prefix, value.tensor);
        return;
      case Kind::Dict:
        for (size_t i = 0; i < value.entry_count(); ++i) {
          const PickleValue& key = value.key(i);
          if (key.kind == Kind::String) {
            collect(value.value(i), join(prefix, key.text()), depth + 1);
          } else if (key.kind == Kind::Int) {  // an optimizer's state, keyed by parameter index
            collect(value.value(i), join(prefix, std::to_string(key.integer)), depth + 1);
          } else {
            skip(join(prefix, "?"), "a dict entry whose key is " + describe(key));
          }
        }
        return;
      case Kind::List:
      case Kind::Tuple: {
        const auto& items = value.items();
        for (size_t i = 0; i < items.size(); ++i) collect(*items[i], join(prefix, std::to_string(i)), depth + 1);
        return;
      }
      default: skip(here, describe(value));
    }
  }
};

// The records of the archive by name, without the archive's top folder ("archive/").
std::unordered_map<std::string, ZipRecord> records_of(const ByteSource& file) {
  std::vector<ZipRecord> all = read_zip_directory(file);
  if (all.empty())
    throw Error(ErrorKind::UnsupportedArchive, file.name() + ": an empty zip archive is not a torch.save file");
  const size_t slash = all.front().name.find('/');
  const std::string top = slash == std::string::npos ? "" : all.front().name.substr(0, slash + 1);
  std::unordered_map<std::string, ZipRecord> records;
  for (ZipRecord& r : all) {
    if (r.name.compare(0, top.size(), top) != 0) continue;
    std::string name = r.name.substr(top.size());
    if (!records.emplace(name, std::move(r)).second) {
      throw Error(ErrorKind::UnsupportedArchive, file.name() + ": record " + quoted(name) + " occurs twice");
    }
  }
  return records;
}

// The bytes of a small record (the pickle, the byte order), read with pread.
std::string small_record(const ByteSource& file, const ZipRecord& r, const std::string& name) {
  if (r.method != 0) {
    throw Error(ErrorKind::UnsupportedArchive, file.name() + ": record " + quoted(name) + " is compressed (method " +
                                                   std::to_string(r.method) + "); torch.save stores records");
  }
  if (r.size > kMaxPickleBytes) {
    throw Error(ErrorKind::UnsupportedArchive, file.name() + ": record " + quoted(name) + " is " +
                                                   std::to_string(r.size) + " bytes, more than tensormap reads");
  }
  std::string out(static_cast<size_t>(r.size), '\0');
  file.read(r.data_offset, out.data(), r.size, "record " + quoted(name));
  return out;
}

}  // namespace

std::shared_ptr<const Source> open_torch_save(std::shared_ptr<const ByteSource> file) {
  const std::string& path = file->name();
  const auto records = records_of(*file);
  const auto pickle = records.find("data.pkl");
  if (pickle == records.end()) {
    throw Error(ErrorKind::UnsupportedArchive, path + ": a zip archive without data.pkl is not a torch.save file");
  }
  if (const auto order = records.find("byteorder"); order != records.end()) {
    if (small_record(*file, order->second, "byteorder") != "little") {
      throw Error(ErrorKind::UnsupportedArchive, path + ": the archive was written big-endian");
    }
  }
  const std::string text = small_record(*file, pickle->second, "data.pkl");
  auto check_storage = [&](const std::string& key, uint64_t bytes) {
    const auto found = records.find("data/" + key);
    if (found == records.end()) {
      throw Error(ErrorKind::UnsupportedArchive,
                  path + ": the pickle names storage " + quoted(key) + ", which has no record");
    }
    if (found->second.method != 0) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": storage " + quoted(key) + " is compressed (method " +
                                                     std::to_string(found->second.method) +
                                                     "); only stored records can be mapped");
    }
    if (bytes > found->second.size) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": storage " + quoted(key) + " of " + std::to_string(bytes) +
                                                     " bytes does not fit its record of " +
                                                     std::to_string(found->second.size) + " bytes");
    }
  };
  const auto document = unpickle(reinterpret_cast<const unsigned char*>(text.data()), text.size(), check_storage, path);
  Collector collector{path, document->budget, 1024 + 8 * uint64_t{document->size()}, {}, {}};
  collector.collect(*document->root, "", 0);
  auto source = std::make_shared<TorchSaveSource>();
  source->path = path;
  source->file = std::dynamic_pointer_cast<const Mapping>(file);
  source->bytes = std::move(file);
  source->skipped_values = std::move(collector.skipped);
  if (collector.tensors.empty()) {  // torch.save({}) too: a checkpoint with nothing to load
    const auto& s = source->skipped_values;
    throw Error(ErrorKind::UnsupportedArchive, path + ": holds no tensor; its root is " +
                                                   (s.empty() ? std::string("an empty container")
                                                    : s.size() == 1 && s[0].first == "<root>"
                                                        ? s[0].second
                                                        : std::to_string(s.size()) + " values that are not tensors"));
  }
  for (auto& [name, desc] : collector.tensors) {
    const ZipRecord& r = records.at("data/" + desc->key);
    uint64_t bytes = dtype_size(desc->dtype);
    for (int64_t s : desc->sizes) bytes *= static_cast<uint64_t>(s);  // checked by the unpickler
    source->names.push_back(std::move(name));
    source->tensors.push_back({*desc, r.data_offset, r.size, bytes});
  }
  std::unordered_map<std::string_view, size_t> seen;
  for (const auto& name : source->names) {
    if (!seen.emplace(name, 0).second) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": the name " + quoted(name) + " occurs twice after nesting");
    }
  }
  source->index_names();
  // Tied weights: one tensor saved under two names is the same view of one storage.
  std::map<std::tuple<std::string, Dtype, uint64_t, std::vector<int64_t>, std::vector<int64_t>>, size_t> views;
  for (size_t i = 0; i < source->tensors.size(); ++i) {
    const TorchTensor& t = source->tensors[i];
    const auto [first, inserted] =
        views.emplace(std::make_tuple(t.desc.key, t.desc.dtype, t.desc.offset, t.desc.sizes, t.desc.strides), i);
    source->aliases.push_back(inserted || t.byte_length == 0 ? std::nullopt : std::optional<size_t>(first->second));
  }
  return source;
}

}  // namespace tensormap::detail
