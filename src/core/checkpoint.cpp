// tensormap::Checkpoint over one file or a sharded checkpoint; the torch.save archive's
// source is in torch_save_reader.cpp.
#include "tensormap/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>

#include "format/names.h"
#include "io/mapping.h"
#include "remote/remote_object.h"
#include "source.h"
#include "tensormap/error.h"
#include "tensormap/remote.h"
#include "tensormap/sharded.h"

namespace tensormap {
namespace detail {
namespace {

constexpr size_t kHeadBytes = 72;

TensorInfo info_of(const TensorEntry& e) {
  // Validation guarantees every dimension is below 2^63.
  return {e.dtype, std::vector<int64_t>(e.dims.begin(), e.dims.begin() + e.rank), e.byte_length};
}

// Copies elements [start, start + length) along `dim` of a contiguous tensor of `file`
// into `dest` with pread: one read when they are one contiguous range, one per row
// otherwise. Sizes come from a validated entry, so none of these products overflows.
void read_part(const File& file, const TensorEntry& e, int64_t dim, int64_t start, int64_t length, void* dest) {
  uint64_t outer = 1, inner = dtype_size(e.dtype);
  for (int64_t d = 0; d < dim; ++d) outer *= e.dims[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(dim) + 1; d < e.rank; ++d) inner *= e.dims[d];
  const uint64_t first = static_cast<uint64_t>(start) * inner, bytes = static_cast<uint64_t>(length) * inner;
  if (outer == 1 || length == 0) {
    file.read(e, first, dest, bytes);
    return;
  }
  file.read_rows(e, first, e.dims[static_cast<size_t>(dim)] * inner, bytes, outer, dest);
}

TensorPlacement placement_of(const File& file, const TensorEntry& e) {
  std::vector<int64_t> strides(e.rank);
  int64_t stride = 1;
  for (size_t d = e.rank; d-- > 0;) {
    strides[d] = stride;
    stride *= static_cast<int64_t>(e.dims[d]);
  }
  return {file.cow_data(e), e.byte_length, 0, std::move(strides), file.keep_alive(), &file, &e};
}

struct FileSource final : Source {
  explicit FileSource(File f) : file(std::move(f)) {
    path = file.path();
    names.reserve(file.tensors().size());
    for (const auto& e : file.tensors()) names.emplace_back(e.name);
    index_names();
  }
  CheckpointFormat format() const override {
    return file.format() == Format::Safetensors ? CheckpointFormat::Safetensors : CheckpointFormat::Tensormap;
  }
  const TensorEntry& entry(size_t i) const { return file.tensors()[i]; }
  TensorInfo info(size_t i) const override { return info_of(entry(i)); }
  void read(size_t i, void* dest) const override { file.read(entry(i), 0, dest, entry(i).byte_length); }
  bool read_range(size_t i, uint64_t offset, uint64_t size, void* dest) const override {
    file.read(entry(i), offset, dest, size);
    return true;
  }
  void read_checked(size_t i, void* dest) const override { file.read_checked(entry(i), dest); }
  void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const override {
    read_part(file, entry(i), dim, start, length, dest);
  }
  void evict(size_t i) const override { file.evict(entry(i)); }
  double cached_fraction(size_t i) const override { return file.cached_fraction(entry(i)); }
  void drop_cache(size_t i) const override { file.drop_cache(entry(i)); }
  TensorPlacement placement(size_t i) const override { return placement_of(file, entry(i)); }
  std::optional<size_t> alias_of(size_t i) const override { return entry(i).alias_of; }  // same order
  std::vector<std::pair<std::string, std::string>> metadata() const override {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [k, v] : file.metadata()) out.emplace_back(k, v);
    return out;
  }
  std::vector<File> files() const override { return {file}; }
  File file;
};

// A sharded checkpoint: the index names every tensor; a shard is opened the first time
// one of its tensors is asked for (by `open`: a local file, or an object beside the
// index's URL), and checked against the index then. Everything else goes to the shard's
// own source.
// A tensor in parts (ShardIndex::Parts), once its files are opened and checked: each
// part's source, its place there, and where it begins along the split dimension.
struct Assembled {
  TensorInfo info;
  int64_t dim = 0;
  uint64_t outer = 1;  // elements before dim, and bytes of one element of dim
  uint64_t inner = 0;
  struct Piece {
    const Source* source;
    size_t position;
    int64_t start, length;  // along dim
  };
  std::vector<Piece> pieces;
};

// Copies `block`, whose shape is `dest`'s but `length` along the split dimension, into
// `dest` at `at` along it: `outer` runs of `length * inner` bytes, `total * inner` apart.
void place(unsigned char* dest, const unsigned char* block, uint64_t outer, uint64_t inner, int64_t total, int64_t at,
           int64_t length) {
  const uint64_t run = static_cast<uint64_t>(length) * inner, stride = static_cast<uint64_t>(total) * inner;
  for (uint64_t o = 0; o < outer; ++o)
    std::memcpy(dest + o * stride + static_cast<uint64_t>(at) * inner, block + o * run, run);
}

struct ShardedSource final : Source {
  ShardedSource(ShardIndex i, ShardOpener o)
      : index(std::move(i)), open(std::move(o)), shards(index.shard_files().size()) {
    path = index.path();
    for (const auto& [name, shard] : index.weight_map()) names.push_back(name);
    for (const auto& p : index.parts()) names.push_back(p.name);
    index_names();
    once = std::vector<std::once_flag>(shards.size());
    assembled = std::vector<std::optional<Assembled>>(index.parts().size());
    assembled_once = std::vector<std::once_flag>(index.parts().size());
  }

  // The tensor in parts that tensor i is, or nothing for a tensor kept whole in one shard.
  const Assembled* parts_of(size_t i) const {
    if (i < index.weight_map().size()) return nullptr;
    const size_t k = i - index.weight_map().size();
    std::call_once(assembled_once[k], [&] { assembled[k] = assemble(index.parts()[k]); });
    return &*assembled[k];
  }

  Assembled assemble(const ShardIndex::Parts& p) const {
    auto invalid = [&](const std::string& what) {
      return Error(ErrorKind::ShardIndexInvalid, index.path() + ": tensor " + quoted(p.name) + ": " + what);
    };
    Assembled a;
    a.dim = p.dim;
    int64_t along = 0;
    for (size_t n = 0; n < p.files.size(); ++n) {
      const std::string& file = index.shard_files()[p.files[n]];
      const Source& f = shard(p.files[n]);
      const auto position = f.find(p.name);
      if (!position) throw invalid("its part " + std::to_string(n) + " is not in " + quoted(file));
      const TensorInfo part = f.info(*position);
      if (n == 0) a.info.dtype = part.dtype;
      bool fits = part.dtype == a.info.dtype && part.shape.size() == p.shape.size();
      for (size_t d = 0; fits && d < p.shape.size(); ++d) {
        fits = static_cast<int64_t>(d) == p.dim || part.shape[d] == p.shape[d];
      }
      if (!fits) {
        throw invalid("its part in " + quoted(file) + " (" + std::string(dtype_name(part.dtype)) + ", " +
                      std::to_string(part.shape.size()) + " dimensions) is not a part of a " +
                      std::string(dtype_name(a.info.dtype)) + " tensor of " + std::to_string(p.shape.size()) +
                      " dimensions split along dimension " + std::to_string(p.dim));
      }
      const int64_t length = part.shape[static_cast<size_t>(p.dim)];
      a.pieces.push_back({&f, *position, along, length});
      along += length;
    }
    if (along != p.shape[static_cast<size_t>(p.dim)]) {
      throw invalid("its parts add up to " + std::to_string(along) + " along dimension " + std::to_string(p.dim) +
                    ", not " + std::to_string(p.shape[static_cast<size_t>(p.dim)]));
    }
    a.info.shape = p.shape;
    a.inner = dtype_size(a.info.dtype);
    for (int64_t d = 0; d < p.dim; ++d) a.outer *= static_cast<uint64_t>(p.shape[static_cast<size_t>(d)]);
    for (size_t d = static_cast<size_t>(p.dim) + 1; d < p.shape.size(); ++d) {
      a.inner *= static_cast<uint64_t>(p.shape[d]);
    }
    // Below 2^62 elements (the index's bound), times at most 8 bytes.
    a.info.byte_length = a.outer * static_cast<uint64_t>(along) * a.inner;
    return a;
  }

  // Elements [start, start + length) along the split dimension, from each part that holds
  // some: straight into `dest` where a part's are one run of it (a split along the first
  // dimension, or one part), through a buffer of that part's share otherwise. `checked`:
  // whole parts are checked against their checksums as they are read.
  static void read_along(const Assembled& a, int64_t start, int64_t length, unsigned char* dest, bool checked) {
    std::vector<unsigned char> buffer;
    for (const auto& piece : a.pieces) {
      const int64_t from = std::max(start, piece.start), to = std::min(start + length, piece.start + piece.length);
      if (from >= to) continue;
      const bool whole = from == piece.start && to == piece.start + piece.length;
      const bool direct = a.outer == 1 || (from == start && to == start + length);
      unsigned char* out = dest + (direct ? static_cast<uint64_t>(from - start) * a.inner : 0);
      if (!direct) {
        buffer.resize(static_cast<size_t>(a.outer * static_cast<uint64_t>(to - from) * a.inner));
        out = buffer.data();
      }
      if (whole && checked) {
        piece.source->read_checked(piece.position, out);
      } else if (whole) {
        piece.source->read(piece.position, out);
      } else {
        piece.source->read_slice(piece.position, a.dim, from - piece.start, to - from, out);
      }
      if (!direct) place(dest, out, a.outer, a.inner, length, from - start, to - from);
    }
  }

  const Source& shard(uint32_t s) const {
    std::call_once(once[s], [&] { shards[s] = open(index, s); });
    return *shards[s];
  }
  // The shard of tensor i and the tensor's position in it.
  std::pair<const Source*, size_t> locate(size_t i) const {
    const uint32_t s = index.weight_map()[i].second;
    const Source& f = shard(s);
    const auto position = f.find(names[i]);
    if (!position) {
      throw Error(ErrorKind::ShardIndexInvalid, index.path() + ": tensor " + quoted(names[i]) + " is mapped to shard " +
                                                    quoted(index.shard_files()[s]) + ", which does not contain it");
    }
    return {&f, *position};
  }

  CheckpointFormat format() const override {
    bool safetensors = false;
    if (index.shard_files().empty()) {
      const std::string suffix = ".safetensors.index.json";
      safetensors =
          path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
    } else {
      safetensors = shard(0).format() == CheckpointFormat::Safetensors;
    }
    return safetensors ? CheckpointFormat::ShardedSafetensors : CheckpointFormat::ShardedTensormap;
  }
  TensorInfo info(size_t i) const override {
    if (const Assembled* a = parts_of(i)) return a->info;
    const auto [f, j] = locate(i);
    return f->info(j);
  }
  void read(size_t i, void* dest) const override {
    if (const Assembled* a = parts_of(i)) {
      read_along(*a, 0, a->info.shape[static_cast<size_t>(a->dim)], static_cast<unsigned char*>(dest), false);
      return;
    }
    const auto [f, j] = locate(i);
    f->read(j, dest);
  }
  bool read_range(size_t i, uint64_t offset, uint64_t size, void* dest) const override {
    if (const Assembled* a = parts_of(i)) {
      if (a->outer != 1) return false;  // its bytes are runs of every part in turn
      auto* out = static_cast<unsigned char*>(dest);
      for (const auto& piece : a->pieces) {
        const uint64_t begin = static_cast<uint64_t>(piece.start) * a->inner;
        const uint64_t end = begin + static_cast<uint64_t>(piece.length) * a->inner;
        const uint64_t from = std::max(offset, begin), to = std::min(offset + size, end);
        if (from >= to) continue;
        if (!piece.source->read_range(piece.position, from - begin, to - from, out + (from - offset))) return false;
      }
      return true;
    }
    const auto [f, j] = locate(i);
    return f->read_range(j, offset, size, dest);
  }
  void read_checked(size_t i, void* dest) const override {
    if (const Assembled* a = parts_of(i)) {
      read_along(*a, 0, a->info.shape[static_cast<size_t>(a->dim)], static_cast<unsigned char*>(dest), true);
      return;
    }
    const auto [f, j] = locate(i);
    f->read_checked(j, dest);
  }
  void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const override {
    if (const Assembled* a = parts_of(i)) {
      if (dim == a->dim) {
        read_along(*a, start, length, static_cast<unsigned char*>(dest), false);
        return;
      }
      // Across the split: each part's slice, placed along the split dimension.
      std::vector<int64_t> shape = a->info.shape;
      shape[static_cast<size_t>(dim)] = length;
      uint64_t outer = 1, inner = dtype_size(a->info.dtype);
      for (int64_t d = 0; d < a->dim; ++d) outer *= static_cast<uint64_t>(shape[static_cast<size_t>(d)]);
      for (size_t d = static_cast<size_t>(a->dim) + 1; d < shape.size(); ++d) inner *= static_cast<uint64_t>(shape[d]);
      std::vector<unsigned char> buffer;
      for (const auto& piece : a->pieces) {
        buffer.resize(static_cast<size_t>(outer * static_cast<uint64_t>(piece.length) * inner));
        piece.source->read_slice(piece.position, dim, start, length, buffer.data());
        place(static_cast<unsigned char*>(dest), buffer.data(), outer, inner, shape[static_cast<size_t>(a->dim)],
              piece.start, piece.length);
      }
      return;
    }
    const auto [f, j] = locate(i);
    f->read_slice(j, dim, start, length, dest);
  }
  void evict(size_t i) const override {
    if (const Assembled* a = parts_of(i)) {
      for (const auto& piece : a->pieces) piece.source->evict(piece.position);
      return;
    }
    const auto [f, j] = locate(i);
    f->evict(j);
  }
  double cached_fraction(size_t i) const override {
    if (const Assembled* a = parts_of(i)) {
      double sum = 0;
      for (const auto& piece : a->pieces) sum += piece.source->cached_fraction(piece.position);
      return sum / static_cast<double>(a->pieces.size());
    }
    const auto [f, j] = locate(i);
    return f->cached_fraction(j);
  }
  void drop_cache(size_t i) const override {
    if (const Assembled* a = parts_of(i)) {
      for (const auto& piece : a->pieces) piece.source->drop_cache(piece.position);
      return;
    }
    const auto [f, j] = locate(i);
    f->drop_cache(j);
  }
  // A tensor in parts has no one place: it is read into memory of its own.
  TensorPlacement placement(size_t i) const override {
    if (parts_of(i)) return {nullptr, 0, 0, {}, nullptr, nullptr, nullptr};
    const auto [f, j] = locate(i);
    return f->placement(j);
  }
  std::optional<SlicePlacement> slice_placement(size_t i, int64_t dim, int64_t start, int64_t length) const override {
    const Assembled* a = parts_of(i);
    if (!a || dim != a->dim) return std::nullopt;
    for (const auto& piece : a->pieces) {
      if (start >= piece.start && start + length <= piece.start + piece.length) {
        const TensorPlacement p = piece.source->placement(piece.position);
        if (!p.file) return std::nullopt;
        return SlicePlacement{p.file, p.entry, start - piece.start};
      }
    }
    return std::nullopt;
  }
  // An alias within a shard, by its target's name (which the index maps to that shard).
  std::optional<size_t> alias_of(size_t i) const override {
    if (parts_of(i)) return std::nullopt;
    const auto [f, j] = locate(i);
    const auto inside = f->alias_of(j);
    if (!inside) return std::nullopt;
    const auto target = find(f->names[*inside]);
    return target && *target != i ? target : std::nullopt;
  }
  std::vector<File> files() const override {
    std::vector<File> out;
    for (uint32_t s = 0; s < shards.size(); ++s) {
      for (File& f : shard(s).files()) out.push_back(std::move(f));
    }
    return out;
  }

  ShardIndex index;
  ShardOpener open;
  mutable std::vector<std::shared_ptr<const Source>> shards;
  mutable std::vector<std::once_flag> once;
  mutable std::vector<std::optional<Assembled>> assembled;  // by ShardIndex::parts() number
  mutable std::vector<std::once_flag> assembled_once;
};

}  // namespace

std::shared_ptr<const Source> open_sharded(ShardIndex index, ShardOpener open) {
  return std::make_shared<ShardedSource>(std::move(index), std::move(open));
}

std::shared_ptr<const Source> open_file_source(File file) { return std::make_shared<FileSource>(std::move(file)); }

}  // namespace detail

namespace detail {

Detected detect_opened(const ByteSource& bytes) {
  const auto head = read_head(bytes, kHeadBytes);
  return detect(head.data(), head.size(), bytes.size());
}

// The whole of a shard index, bounded before it is read.
ShardIndex read_shard_index(const ByteSource& bytes) {
  if (bytes.size() > kMaxShardIndexBytes) {
    throw Error(ErrorKind::ShardIndexInvalid,
                bytes.name() + ": index is " + std::to_string(bytes.size()) + " bytes, more than an index can be");
  }
  std::string text(static_cast<size_t>(bytes.size()), '\0');
  bytes.read(0, text.data(), text.size(), "the index");
  return ShardIndex::parse(text, bytes.name());
}

}  // namespace detail

CheckpointFormat detect_format(const std::string& path) {
  if (is_url(path)) return Checkpoint::open(path).format();
  switch (detail::detect_opened(detail::Mapping(path))) {
    case detail::Detected::Safetensors: return CheckpointFormat::Safetensors;
    case detail::Detected::TorchSave: return CheckpointFormat::TorchSave;
    case detail::Detected::ShardIndex: return Checkpoint::open(path).format();  // from the first shard
    default: return CheckpointFormat::Tensormap;
  }
}

Checkpoint Checkpoint::open(const std::string& path) {
  if (is_url(path)) return open(path, RemoteOptions::from_environment());
  auto mapping = std::make_shared<const detail::Mapping>(path);
  switch (detail::detect_opened(*mapping)) {
    case detail::Detected::TorchSave: return Checkpoint(detail::open_torch_save(std::move(mapping)));
    case detail::Detected::ShardIndex:
      return Checkpoint(
          detail::open_sharded(detail::read_shard_index(*mapping), [](const ShardIndex& index, uint32_t s) {
            return detail::open_file_source(File::open(index.shard_path(s)));
          }));
    default: return Checkpoint(detail::open_file(std::move(mapping)));
  }
}

Checkpoint Checkpoint::open(const std::string& url, const RemoteOptions& options) {
  if (!is_url(url)) {
    throw Error(ErrorKind::InvalidArgument, url + ": remote options are for http://, https:// and s3:// URLs");
  }
  return Checkpoint(detail::open_remote(url, std::make_shared<const detail::Fetcher>(options)));
}

Checkpoint::Checkpoint(File file) : source_(std::make_shared<detail::FileSource>(std::move(file))) {}
Checkpoint::Checkpoint(std::shared_ptr<const detail::Source> source) : source_(std::move(source)) {}

const std::string& Checkpoint::path() const { return source_->path; }
CheckpointFormat Checkpoint::format() const { return source_->format(); }
size_t Checkpoint::size() const { return source_->size(); }
bool Checkpoint::empty() const { return source_->size() == 0; }
bool Checkpoint::contains(std::string_view name) const { return source_->find(name).has_value(); }
const std::vector<std::string>& Checkpoint::keys() const { return source_->names; }
std::vector<std::pair<std::string, std::string>> Checkpoint::metadata() const { return source_->metadata(); }
std::vector<std::pair<std::string, std::string>> Checkpoint::skipped() const { return source_->skipped(); }
std::vector<File> Checkpoint::files() const { return source_->files(); }

size_t Checkpoint::index_of(std::string_view name) const {
  if (const auto i = source_->find(name)) return *i;
  throw Error(ErrorKind::NotFound, source_->path + ": no tensor named " + detail::quoted(name) + " in this " +
                                       format_name(source_->format()) + " checkpoint (" +
                                       std::to_string(source_->size()) + " tensors)");
}

TensorInfo Checkpoint::info(std::string_view name) const { return source_->info(index_of(name)); }
std::optional<std::string> Checkpoint::alias_of(std::string_view name) const {
  const auto target = source_->alias_of(index_of(name));
  return target ? std::optional<std::string>(source_->names[*target]) : std::nullopt;
}
void Checkpoint::read(std::string_view name, void* dest) const { source_->read(index_of(name), dest); }
void Checkpoint::read_chunks(std::string_view name, void* buffer, uint64_t buffer_size,
                             const std::function<void(const void*, uint64_t)>& consume) const {
  const size_t i = index_of(name);
  const Info info = source_->info(i);
  const uint64_t element = dtype_size(info.dtype), length = info.byte_length;
  const uint64_t piece = buffer_size - buffer_size % element;  // whole elements
  if (piece == 0) {
    throw Error(ErrorKind::InvalidArgument, source_->path + ": read_chunks of " + detail::quoted(name) +
                                                ": a buffer of " + std::to_string(buffer_size) +
                                                " bytes cannot hold one " + std::string(dtype_name(info.dtype)) +
                                                " element");
  }
  auto* chunk = static_cast<unsigned char*>(buffer);
  if (length <= piece) {
    source_->read(i, chunk);
    if (length > 0) consume(chunk, length);
    return;
  }
  if (source_->read_range(i, 0, piece, chunk)) {
    consume(chunk, piece);
    for (uint64_t at = piece; at < length; at += piece) {
      const uint64_t size = std::min(piece, length - at);
      source_->read_range(i, at, size, chunk);
      consume(chunk, size);
    }
    return;
  }
  std::vector<unsigned char> whole(static_cast<size_t>(length));  // a strided torch.save view
  source_->read(i, whole.data());
  for (uint64_t at = 0; at < length; at += piece) consume(whole.data() + at, std::min(piece, length - at));
}

void Checkpoint::read_checked(std::string_view name, void* dest) const { source_->read_checked(index_of(name), dest); }
void Checkpoint::evict(std::string_view name) const { source_->evict(index_of(name)); }
double Checkpoint::cached_fraction(std::string_view name) const { return source_->cached_fraction(index_of(name)); }
void Checkpoint::drop_cache(std::string_view name) const { source_->drop_cache(index_of(name)); }
TensorPlacement Checkpoint::placement(std::string_view name) const { return source_->placement(index_of(name)); }

std::optional<SlicePlacement> Checkpoint::slice_placement(std::string_view name, int64_t dim, int64_t start,
                                                          int64_t length) const {
  return source_->slice_placement(index_of(name), dim, start, length);
}

void Checkpoint::read(std::string_view name, int64_t dim, int64_t start, int64_t length, void* dest) const {
  dim = checked_slice(name, dim, start, length);
  const size_t i = index_of(name);
  if (start == 0 && length == source_->info(i).shape[static_cast<size_t>(dim)]) {  // all of it: one range
    source_->read(i, dest);
    return;
  }
  source_->read_slice(i, dim, start, length, dest);
}

int64_t Checkpoint::checked_slice(std::string_view name, int64_t dim, int64_t start, int64_t length) const {
  const Info info = source_->info(index_of(name));
  const auto rank = static_cast<int64_t>(info.shape.size());
  auto refuse = [&](const std::string& why) {
    return Error(ErrorKind::InvalidArgument,
                 source_->path + ": cannot slice tensor " + detail::quoted(name) + ": " + why);
  };
  if (dim < -rank || dim >= rank || rank == 0) {
    throw refuse("dimension " + std::to_string(dim) + " is out of range for rank " + std::to_string(rank));
  }
  if (dim < 0) dim += rank;
  const int64_t size = info.shape[static_cast<size_t>(dim)];
  if (start < 0 || length < 0 || start > size || length > size - start) {
    throw refuse("elements [" + std::to_string(start) + ", " + std::to_string(start) + " + " + std::to_string(length) +
                 ") are not within dimension " + std::to_string(dim) + " of size " + std::to_string(size));
  }
  return dim;
}

}  // namespace tensormap
