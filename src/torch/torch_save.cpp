// Reading torch.save archives zero-copy.
//
// A torch.save file is a zip: archive/data.pkl (a pickle) and one record per storage,
// archive/data/<key>, stored uncompressed. LibTorch's PyTorchStreamReader finds records;
// a restricted unpickler of our own (pickle.h) rebuilds the tensors, each storage a
// DataPtr into our private mapping instead of a copy, so no tensor byte is read here.
//
// The unpickler only knows the globals needed for tensors and containers; any other class
// is refused, so nothing in the file is executed. The result must be a dict of tensors,
// possibly nested; nested keys are joined with '.'. Each record's zip header is checked:
// it must be stored (not compressed) and its storage must fit inside it.
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <unordered_map>

#include "../core/mapping.h"
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
    return {from_scalar_type(t.scalar_type()), t.sizes().vec(), static_cast<uint64_t>(t.nbytes())};
  }
  at::Tensor tensor(size_t i) const override { return tensors[i]; }
  at::Tensor raw_bytes(size_t i) const override {
    const at::Tensor t = tensors[i].contiguous();
    return t.view({-1}).view(at::kByte).clone();  // a contiguous copy of this tensor only
  }
  std::vector<at::Tensor> tensors;
};

void collect(const PickleValue& value, const std::string& prefix, TorchSaveSource& out,
             const std::string& path, int depth) {
  auto unsupported = [&](const std::string& what) {
    return Error(ErrorKind::UnsupportedArchive,
                 path + ": '" + (prefix.empty() ? std::string("<root>") : prefix) + "' " + what +
                     "; only dicts of tensors (possibly nested) are read");
  };
  if (depth > 64) throw unsupported("nests dicts more than 64 deep");
  if (value.kind == PickleValue::Kind::Tensor) {
    if (prefix.empty()) throw unsupported("is a single tensor, not a dict of tensors");
    out.names.push_back(prefix);
    out.tensors.push_back(value.tensor);
    return;
  }
  if (value.kind != PickleValue::Kind::Dict) {
    static const char* kinds[] = {"None", "a bool", "an int", "a float", "a string", "a tuple",
                                  "a list", "a dict", "a class", "a storage", "a tensor"};
    throw unsupported(std::string("holds ") + kinds[static_cast<int>(value.kind)] + ", not a tensor");
  }
  for (const auto& [key, item] : value.entries) {
    if (key->kind != PickleValue::Kind::String) throw unsupported("is a dict with a key that is not a string");
    collect(*item, prefix.empty() ? key->text : prefix + "." + key->text, out, path, depth + 1);
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
    collect(*document->root, "", *source, path, 0);
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(ErrorKind::UnsupportedArchive,
                path + ": not a readable torch.save archive: " + e.what_without_backtrace());
  }
  std::unordered_map<std::string_view, size_t> seen;
  for (const auto& name : source->names) {
    if (!seen.emplace(name, 0).second) {
      throw Error(ErrorKind::UnsupportedArchive, path + ": the name '" + name + "' occurs twice after nesting");
    }
  }
  source->index_names();
  return source;
}

}  // namespace tensormap::detail
