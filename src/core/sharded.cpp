// Sharded checkpoints: the index JSON, and a writer that splits tensors across shards.
#include "tensormap/sharded.h"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <unordered_map>

#include "format/names.h"
#include "io/posix_io.h"
#include "io/temporaries.h"
#include "remote/remote_object.h"
#include "remote/s3_upload.h"
#include "source.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "tensormap/remote.h"
#include "util/bytes.h"
#include "write/file_writer.h"

namespace tensormap {
namespace {

// A shard must be a plain file name beside the index: no directories, no way out.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

// The shard names of the index at `path` if one is there, for the writer that replaces
// it. An unreadable or invalid file names none.
std::set<std::string> shards_named_by(const std::string& path) {
  try {
    const ShardIndex old = is_url(path)
                               ? detail::read_shard_index(detail::RemoteObject(
                                     std::make_shared<const detail::Fetcher>(RemoteOptions::from_environment()), path))
                               : ShardIndex::open(path);
    return {old.shard_files().begin(), old.shard_files().end()};
  } catch (const Error&) {
    return {};
  }
}

}  // namespace

std::string ShardIndex::shard_path(uint32_t i) const {
  return detail::parent_directory(path_) + "/" + shard_files_.at(i);
}

ShardIndex ShardIndex::open(const std::string& path) {
  auto invalid = [&](const std::string& what) { return Error(ErrorKind::ShardIndexInvalid, path + ": " + what); };
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::throw_io(path, "cannot open", errno);
  in.seekg(0, std::ios::end);
  const auto size = static_cast<uint64_t>(in.tellg());
  if (size > kMaxShardIndexBytes)
    throw invalid("index is " + std::to_string(size) + " bytes, more than an index can be");
  in.seekg(0);
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  return parse(text, path);
}

ShardIndex ShardIndex::parse(std::string_view text, const std::string& path) {
  auto invalid = [&](const std::string& what) { return Error(ErrorKind::ShardIndexInvalid, path + ": " + what); };
  nlohmann::ordered_json json;
  try {
    json = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw invalid(std::string("not valid JSON: ") + e.what());
  }
  if (!json.is_object()) throw invalid("not a JSON object");
  const auto map = json.find("weight_map");
  if (map == json.end() || !map->is_object()) throw invalid("has no \"weight_map\" object");

  ShardIndex index;
  index.path_ = path;
  std::unordered_map<std::string, uint32_t> shard_numbers;
  for (const auto& [name, file] : map->items()) {
    if (!file.is_string()) throw invalid("weight_map entry " + detail::quoted(name) + " is not a file name");
    const std::string shard = file.get<std::string>();
    if (!is_plain_file_name(shard)) {
      throw invalid("shard " + detail::quoted(shard) + " of tensor " + detail::quoted(name) +
                    " is not a plain file name beside the index");
    }
    const auto [it, added] = shard_numbers.emplace(shard, static_cast<uint32_t>(index.shard_files_.size()));
    if (added) index.shard_files_.push_back(shard);
    index.weight_map_.emplace_back(name, it->second);
  }
  if (const auto parts = json.find("parts"); parts != json.end()) {
    if (!parts->is_object()) throw invalid("\"parts\" is not an object");
    std::set<std::string> whole;
    for (const auto& [name, shard] : index.weight_map_) whole.insert(name);
    for (const auto& [name, entry] : parts->items()) {
      const std::string label = "parts of " + detail::quoted(name);
      if (whole.count(name)) throw invalid(label + ": the tensor is in the weight_map too");
      if (!entry.is_object()) throw invalid(label + " is not an object");
      const auto dim = entry.find("dim"), shape = entry.find("shape"), files = entry.find("files");
      if (shape == entry.end() || !shape->is_array() || shape->size() > format::kMaxRank) {
        throw invalid(label + ": \"shape\" is not an array of at most " + std::to_string(format::kMaxRank) + " sizes");
      }
      ShardIndex::Parts p;
      p.name = name;
      uint64_t elements = 1;
      for (const auto& size : *shape) {
        if (!size.is_number_unsigned() || size.get<uint64_t>() >= (uint64_t{1} << 62)) {
          throw invalid(label + ": a size of \"shape\" is not a whole number below 2^62");
        }
        const auto product = detail::checked_mul(elements, size.get<uint64_t>());
        if (!product || *product >= (uint64_t{1} << 62)) throw invalid(label + ": the shape has 2^62 elements or more");
        elements = *product;
        p.shape.push_back(static_cast<int64_t>(size.get<uint64_t>()));
      }
      if (dim == entry.end() || !dim->is_number_unsigned() || dim->get<uint64_t>() >= p.shape.size()) {
        throw invalid(label + ": \"dim\" is not a dimension of its shape");
      }
      p.dim = static_cast<int64_t>(dim->get<uint64_t>());
      if (files == entry.end() || !files->is_array() || files->empty() ||
          files->size() > static_cast<uint64_t>(std::max<int64_t>(1, p.shape[static_cast<size_t>(p.dim)]))) {
        throw invalid(label + ": \"files\" is not a list of 1 to " +
                      std::to_string(std::max<int64_t>(1, p.shape[static_cast<size_t>(p.dim)])) + " file names");
      }
      std::set<std::string> seen;
      for (const auto& file : *files) {
        if (!file.is_string() || !is_plain_file_name(file.get<std::string>()) ||
            !seen.insert(file.get<std::string>()).second) {
          throw invalid(label + ": its files must be distinct plain file names beside the index");
        }
        const auto [it, added] =
            shard_numbers.emplace(file.get<std::string>(), static_cast<uint32_t>(index.shard_files_.size()));
        if (added) index.shard_files_.push_back(file.get<std::string>());
        p.files.push_back(it->second);
      }
      index.parts_.push_back(std::move(p));
    }
  }
  if (const auto meta = json.find("metadata"); meta != json.end() && meta->is_object()) {
    if (const auto total = meta->find("total_size"); total != meta->end() && total->is_number_unsigned()) {
      index.total_size_ = total->get<uint64_t>();
    }
  }
  return index;
}

// ---------------------------------------------------------------------------------------

namespace detail {
namespace {

// The shards, each a FileWriterCore, behind one cursor over all tensors; the index last.
class ShardedCore final : public WriterCore {
 public:
  ShardedCore(std::string index_path, std::vector<TensorSpec> tensors, uint64_t max_shard_bytes,
              const WriterOptions& options);
  size_t shard_count() const { return shards_.size(); }

 private:
  void put(const void* data, size_t size, size_t tensor, uint64_t) override {
    shards_[shard_of_[tensor]]->write(data, size);
  }
  void seal() override {
    for (auto& shard : shards_) shard->seal_all();  // all data durable under temporary names
  }
  void publish() override;
  void discard() noexcept override {
    for (auto& shard : shards_) shard->abandon();
  }

  std::string index_path_;
  std::vector<TensorSpec> tensors_;
  std::vector<uint32_t> shard_of_;  // tensor -> shard
  std::vector<std::string> shard_names_;
  std::vector<std::unique_ptr<FileWriterCore>> shards_;  // one per shard, each writing a temporary file
  std::set<std::string> old_shards_;                     // named by the index this one replaces
  bool sync_ = true;
  uint64_t total_ = 0;
};

ShardedCore::ShardedCore(std::string index_path, std::vector<TensorSpec> tensors, uint64_t max_shard_bytes,
                         const WriterOptions& options)
    : WriterCore(write_target(index_path), tensors, /*aliases=*/false),
      index_path_(path()) {  // shards beside the real index
  const std::string suffix = ".index.json";
  const std::string base = base_name(index_path);
  if (base.size() <= suffix.size() || base.compare(base.size() - suffix.size(), suffix.size(), suffix) != 0) {
    throw Error(ErrorKind::InvalidArgument,
                index_path + ": a shard index must be named like model.safetensors.index.json");
  }
  if (max_shard_bytes == 0) throw Error(ErrorKind::InvalidArgument, index_path + ": the shard size must be positive");
  // model.safetensors.index.json -> stem "model", extension ".safetensors"
  const std::string file = base.substr(0, base.size() - suffix.size());
  const auto dot = file.find_last_of('.');
  const std::string stem = dot == std::string::npos ? file : file.substr(0, dot);
  const std::string extension = dot == std::string::npos ? "" : file.substr(dot);

  if (options.format == Format::TorchSave) {
    throw Error(ErrorKind::InvalidArgument, index_path + ": torch.save archives are not sharded");
  }
  // Assign tensors to shards in order, starting a new shard when the next tensor would
  // not fit. Each shard's writer validates its own declarations.
  sync_ = options.sync;
  const std::vector<uint64_t>& byte_lengths = cursor().byte_lengths();
  std::vector<std::vector<TensorSpec>> groups;
  uint64_t in_group = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (groups.empty() || (in_group > 0 && in_group + byte_lengths[i] > max_shard_bytes)) {
      groups.emplace_back();
      in_group = 0;
    }
    groups.back().push_back(tensors[i]);
    shard_of_.push_back(static_cast<uint32_t>(groups.size() - 1));
    in_group += byte_lengths[i];
    total_ += byte_lengths[i];
  }
  if (groups.empty()) groups.emplace_back();  // an empty checkpoint still has one shard
  // The new shards must not replace any file the index being replaced names: until the
  // new index is in place, the old one must still find all of its shards. So when the
  // usual names are taken, the shards get a generation tag: model-00001-of-00002.b.tmap.
  old_shards_ = shards_named_by(index_path);
  for (const char* tag : {"", ".b", ".c"}) {
    shard_names_.clear();
    bool taken = false;
    for (size_t s = 0; s < groups.size(); ++s) {
      char numbers[48];  // room for two 20-digit counts
      std::snprintf(numbers, sizeof numbers, "-%05zu-of-%05zu", s + 1, groups.size());
      shard_names_.push_back(stem + numbers + tag + extension);
      taken = taken || old_shards_.count(shard_names_.back()) > 0;
    }
    if (!taken) break;
  }
  const std::string dir = parent_directory(index_path_);  // the real index's directory
  // Shards of earlier saves that died between naming a shard and its rename, whatever
  // their shard count or tag (each shard's writer collects only its own name's).
  if (!is_url(dir))
    collect_stale_temporaries(dir, [&](std::string_view shard) {
      return shard.size() > stem.size() + extension.size() && shard.substr(0, stem.size() + 1) == stem + "-" &&
             shard.substr(shard.size() - extension.size()) == extension &&
             shard.find("-of-", stem.size()) != std::string_view::npos;
    });
  for (size_t s = 0; s < groups.size(); ++s) {
    shards_.push_back(std::make_unique<FileWriterCore>(dir + "/" + shard_names_[s], std::move(groups[s]), options));
  }
  tensors_ = std::move(tensors);
  start();
}

void ShardedCore::publish() {
  // Names no file of the old checkpoint has: a crash from here on leaves the old index
  // with all its shards, and at worst unreferenced new shards beside it.
  for (auto& shard : shards_) shard->publish_all();
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total_}};
  index["weight_map"] = nlohmann::ordered_json::object();
  for (size_t i = 0; i < tensors_.size(); ++i) index["weight_map"][tensors_[i].name] = shard_names_[shard_of_[i]];
  if (is_url(index_path_)) {  // S3: an object appears whole, in one step
    detail::put_object(index_path_, index.dump(2) + "\n", RemoteOptions::from_environment());
  } else {
    write_file_atomically(index_path_, index.dump(2) + "\n", sync_);  // the switch
  }
  // The old shards are nobody's now. A crash before this leaves them as files no index
  // names; the next save of this path will not reuse their names either way.
  const std::string dir = parent_directory(index_path_);
  for (const std::string& old : old_shards_) {
    if (std::find(shard_names_.begin(), shard_names_.end(), old) == shard_names_.end()) {
      if (is_url(dir)) {
        detail::delete_object(dir + "/" + old, RemoteOptions::from_environment());
      } else {
        ::unlink((dir + "/" + old).c_str());
      }
    }
  }
}

}  // namespace
}  // namespace detail

namespace {

constexpr std::string_view kDistributedSuffix = ".tmap.index.json";

// "<stem>" of "<dir>/<stem>.tmap.index.json".
std::string distributed_stem(const std::string& index_path) {
  const std::string name = index_path.substr(index_path.find_last_of('/') + 1);
  if (name.size() <= kDistributedSuffix.size() ||
      name.compare(name.size() - kDistributedSuffix.size(), kDistributedSuffix.size(), kDistributedSuffix) != 0) {
    throw Error(ErrorKind::InvalidArgument,
                index_path + ": a distributed checkpoint's index must be named <name>.tmap.index.json");
  }
  return name.substr(0, name.size() - kDistributedSuffix.size());
}

bool all_of_class(std::string_view text, bool (*in)(char)) {
  return std::all_of(text.begin(), text.end(), [&](char c) { return in(c); });
}

// Whether `file` is a rank's file of some save of the index whose stem is `stem`:
// "<stem>-<16 hex>-rank<5 digits>-of-<5 digits>.tmap".
bool is_rank_file_of(const std::string& file, const std::string& stem) {
  const std::string_view f(file);
  constexpr size_t kTail = 16 + 5 + 5 + 4 + 5 + 5;  // -<id>-rank<r>-of-<n>.tmap
  if (f.size() != stem.size() + 1 + kTail || f.substr(0, stem.size()) != stem) return false;
  const std::string_view rest = f.substr(stem.size());
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  return rest[0] == '-' && all_of_class(rest.substr(1, 16), hex) && rest.substr(17, 5) == "-rank" &&
         all_of_class(rest.substr(22, 5), digit) && rest.substr(27, 4) == "-of-" &&
         all_of_class(rest.substr(31, 5), digit) && rest.substr(36) == ".tmap";
}

}  // namespace

std::string distributed_file_name(const std::string& index_path, const std::string& id, int rank, int world) {
  const std::string stem = distributed_stem(index_path);
  char tail[64];
  std::snprintf(tail, sizeof tail, "-rank%05d-of-%05d.tmap", rank, world);
  return stem + "-" + id + tail;
}

void publish_distributed_index(const std::string& index_path, const DistributedIndex& index, bool sync) {
  const std::string stem = distributed_stem(index_path);
  nlohmann::ordered_json json;
  json["metadata"] = {{"total_size", index.total_size}, {"format", "tensormap distributed"}};
  json["weight_map"] = nlohmann::ordered_json::object();
  std::set<std::string> named;
  for (const auto& [name, file] : index.whole) {
    json["weight_map"][name] = file;
    named.insert(file);
  }
  json["parts"] = nlohmann::ordered_json::object();
  for (const auto& s : index.split) {
    json["parts"][s.name] = {{"dim", s.dim}, {"shape", s.shape}, {"files", s.files}};
    named.insert(s.files.begin(), s.files.end());
  }
  // The commit: until it is in place, the old index names the old files, all still there.
  detail::write_file_atomically(index_path, json.dump(1) + "\n", sync);
  const std::string dir = detail::parent_directory(index_path);
  if (DIR* d = ::opendir(dir.c_str())) {
    std::vector<std::string> stale;
    while (const dirent* e = ::readdir(d)) {
      const std::string file = e->d_name;
      if (is_rank_file_of(file, stem) && !named.count(file)) stale.push_back(file);
    }
    ::closedir(d);
    for (const std::string& file : stale) ::unlink((dir + "/" + file).c_str());
  }
}

ShardedWriter::ShardedWriter(std::string index_path, std::vector<TensorSpec> tensors, uint64_t max_shard_bytes,
                             WriterOptions options)
    : FormatWriter(
          std::make_unique<detail::ShardedCore>(std::move(index_path), std::move(tensors), max_shard_bytes, options)) {}

size_t ShardedWriter::shard_count() const { return static_cast<const detail::ShardedCore&>(core()).shard_count(); }

}  // namespace tensormap
