// Reading torch.save archives zero-copy.
//
// A torch.save file is a zip: archive/data.pkl (a pickle) and one record per storage,
// archive/data/<key>, stored uncompressed. LibTorch's PyTorchStreamReader finds records;
// a restricted unpickler of our own (pickle.h) rebuilds the tensors, each storage a
// DataPtr into our private mapping instead of a copy, so no tensor byte is read here.
//
// The unpickler only knows the globals needed for tensors and containers; nothing in the
// file is executed. Every tensor reachable from the root through dicts, lists and tuples
// is read, named by its path with '.' between keys (a training checkpoint's
// {"model": {"fc.weight": ...}, "optimizer": {"state": {0: {"exp_avg": ...}}}} gives
// "model.fc.weight" and "optimizer.state.0.exp_avg"); any other value (an epoch, a
// learning rate, an object of the training script) is skipped and listed by skipped().
// Each record's zip header is checked: it must be stored (not compressed) and its storage
// must fit inside it.
#include <caffe2/serialize/inline_container.h>
#include <torch/version.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <unordered_map>

#include "../core/mapping.h"
#include "../core/names.h"
#include "pickle.h"
#include "sources.h"
#include "tensormap/error.h"

namespace tensormap::detail {
namespace {

uint16_t le16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t le32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// Checks that the record whose data starts at `data_offset` is stored uncompressed, from
// its zip local header, which ends right there. (The sizes in that header are 0 when the
// writer used data descriptors, as PyTorch's does; the caller bounds the size.)
void check_stored(const Mapping& m, uint64_t data_offset, const std::string& record) {
  constexpr uint64_t kLocalHeader = 30;
  auto fail = [&](const std::string& what) {
    return Error(ErrorKind::UnsupportedArchive, m.path() + ": record '" + record + "' " + what);
  };
  if (data_offset > m.size() || data_offset < kLocalHeader) throw fail("has no room for its zip header");
  // name (< 64 KiB) and extra field (< 64 KiB) lie between the header and the data.
  const uint64_t lowest = data_offset > kLocalHeader + 2 * 65535 ? data_offset - kLocalHeader - 2 * 65535 : 0;
  for (uint64_t at = data_offset - kLocalHeader;; --at) {
    const unsigned char* h = m.base() + at;
    if (le32(h) == 0x04034b50 && at + kLocalHeader + le16(h + 26) + le16(h + 28) == data_offset) {
      if (const uint16_t method = le16(h + 8); method != 0) {
        throw fail("is compressed (method " + std::to_string(method) + "); only stored records can be mapped");
      }
      return;
    }
    if (at == lowest) break;
  }
  throw fail("has no zip local header before its data");
}

struct TorchSaveSource : StateSource {
  std::string format() const override { return "torch.save"; }
  StateDict::Info info(size_t i) const override {
    const at::Tensor& t = tensors[i];
    return {dtypes[i], t.sizes().vec(), static_cast<uint64_t>(t.nbytes())};
  }
  at::Tensor tensor(size_t i) const override {
    if (!to_scalar_type(dtypes[i])) {
      throw Error(ErrorKind::UnsupportedDtype, path + ": tensor " + detail::quoted(names[i]) + " has dtype " +
                                                   std::string(dtype_name(dtypes[i])) + ", which LibTorch " +
                                                   TORCH_VERSION + " cannot represent; read its raw bytes");
    }
    return tensors[i];
  }
  std::vector<std::pair<std::string, std::string>> skipped_values() const override { return skipped; }
  at::Tensor raw_bytes(size_t i) const override {
    const at::Tensor t = tensors[i].contiguous();
    return t.view({-1}).view(at::kByte).clone();  // a contiguous copy of this tensor only
  }
  std::string path;
  std::vector<at::Tensor> tensors;
  std::vector<Dtype> dtypes;
  std::vector<std::pair<std::string, std::string>> skipped;
};

std::string describe(const PickleValue& value) {
  using Kind = PickleValue::Kind;
  switch (value.kind) {
    case Kind::None: return "None";
    case Kind::Bool: return value.boolean ? "True" : "False";
    case Kind::Int: return "the int " + std::to_string(value.integer);
    case Kind::Float: return "a float";
    case Kind::String: return "a string";
    case Kind::Global: return "the global " + value.what;
    case Kind::Opaque:
      return value.what.rfind("a tensor ", 0) == 0 ? value.what + ", a dtype tensormap does not store"
                                                   : "an object made by " + value.what + " (not executed)";
    case Kind::Storage: return "a storage";
    default: return "a container";
  }
}

// Adds every tensor reachable from `value` under `prefix`, and the values that are not
// tensors to `out.skipped`.
void collect(const PickleValue& value, const std::string& prefix, TorchSaveSource& out, int depth) {
  using Kind = PickleValue::Kind;
  const std::string here = prefix.empty() ? std::string("<root>") : prefix;
  auto join = [&](const std::string& key) { return prefix.empty() ? key : prefix + "." + key; };
  if (depth > 64) {
    throw Error(ErrorKind::UnsupportedArchive, out.path + ": " + detail::quoted(here) + " nests containers more than 64 deep");
  }
  switch (value.kind) {
    case Kind::Tensor:
      if (prefix.empty()) {
        throw Error(ErrorKind::UnsupportedArchive,
                    out.path + ": the archive is a single tensor, not a dict of tensors; it has no name to read it by");
      }
      out.names.push_back(prefix);
      out.tensors.push_back(value.tensor);
      out.dtypes.push_back(value.dtype);
      return;
    case Kind::Dict:
      for (const auto& [key, item] : value.entries) {
        if (key->kind == Kind::String) {
          collect(*item, join(key->text), out, depth + 1);
        } else if (key->kind == Kind::Int) {  // an optimizer's state, keyed by parameter index
          collect(*item, join(std::to_string(key->integer)), out, depth + 1);
        } else {
          out.skipped.emplace_back(join("?"), "a dict entry whose key is " + describe(*key));
        }
      }
      return;
    case Kind::List:
    case Kind::Tuple:
      for (size_t i = 0; i < value.items.size(); ++i) collect(*value.items[i], join(std::to_string(i)), out, depth + 1);
      return;
    default:
      out.skipped.emplace_back(here, describe(value));
  }
}

}  // namespace

bool looks_like_zip(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  unsigned char head[4] = {};
  in.read(reinterpret_cast<char*>(head), 4);
  return in.gcount() == 4 && le32(head) == 0x04034b50;
}

std::shared_ptr<const StateSource> open_torch_save(const std::string& path) {
  auto mapping = std::make_shared<const Mapping>(path);
  auto source = std::make_shared<TorchSaveSource>();
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("data.pkl")) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": a zip archive without data.pkl is not a torch.save file");
    }
    if (reader.hasRecord("byteorder")) {
      const auto [order, order_size] = reader.getRecord("byteorder");
      if (std::string(static_cast<const char*>(order.get()), order_size) != "little") {
        throw Error(ErrorKind::UnsupportedArchive, path + ": the archive was written big-endian");
      }
    }
    const auto [pickle, pickle_size] = reader.getRecord("data.pkl");  // the pickle only
    // Where each storage record starts; a record ends at the latest where the next one
    // starts (or at the end of the file): the bound every storage is checked against.
    std::unordered_map<std::string, uint64_t> offsets;  // one zip lookup per record
    std::vector<uint64_t> starts;
    for (const std::string& name : reader.getAllRecords()) {
      if (name.rfind("data/", 0) == 0) {
        const uint64_t offset = reader.getRecordOffset(name);
        offsets.emplace(name, offset);
        starts.push_back(offset);
      }
    }
    std::sort(starts.begin(), starts.end());
    auto load_storage = [&](const std::string& key, c10::ScalarType type, int64_t numel) {
      const std::string record = "data/" + key;
      const auto found = offsets.find(record);
      if (found == offsets.end()) {
        throw Error(ErrorKind::UnsupportedArchive, path + ": the pickle names record '" + record + "', which is missing");
      }
      const uint64_t offset = found->second;
      check_stored(*mapping, offset, record);
      const auto next = std::upper_bound(starts.begin(), starts.end(), offset);
      const uint64_t size = (next == starts.end() ? mapping->size() : *next) - offset;
      const uint64_t element = c10::elementSize(type);
      if (static_cast<uint64_t>(numel) > size / element) {
        throw Error(ErrorKind::UnsupportedArchive, path + ": storage '" + key + "' of " + std::to_string(numel) +
                                                       " elements does not fit in the " +
                                                       std::to_string(size) + " bytes up to the next record");
      }
      auto* owner = new std::shared_ptr<const Mapping>(mapping);
      at::DataPtr data(mapping->base() + offset, owner,
                       [](void* ctx) { delete static_cast<std::shared_ptr<const Mapping>*>(ctx); },
                       at::Device(at::kCPU));
      return c10::Storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(numel) * element,
                          std::move(data), /*allocator=*/nullptr, /*resizable=*/false);
    };
    const auto document =
        unpickle(static_cast<const unsigned char*>(pickle.get()), pickle_size, load_storage, path);
    source->path = path;
    collect(*document->root, "", *source, 0);
    if (source->names.empty() && !source->skipped.empty()) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": holds no tensor; its root is " +
                                                     (source->skipped.size() == 1 && source->skipped[0].first == "<root>"
                                                          ? source->skipped[0].second
                                                          : std::to_string(source->skipped.size()) + " values that are not tensors"));
    }
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(ErrorKind::UnsupportedArchive,
                path + ": not a readable torch.save archive: " + e.what_without_backtrace());
  }
  std::unordered_map<std::string_view, size_t> seen;
  for (const auto& name : source->names) {
    if (!seen.emplace(name, 0).second) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": the name " + detail::quoted(name) + " occurs twice after nesting");
    }
  }
  source->index_names();
  return source;
}

}  // namespace tensormap::detail
