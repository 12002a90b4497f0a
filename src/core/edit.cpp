// tensormap::Editor: a new file whose kept tensors are copied by the kernel from the old
// one (copy_file_range, reflinks where the filesystem shares blocks), whose new tensors are
// streamed in, renamed over the old file by the ordinary file writer (file_writer.h).
#include "tensormap/edit.h"

#include <algorithm>
#include <unordered_map>
#include <utility>

#include "format/names.h"
#include "io/mapping.h"
#include "io/path_lock.h"
#include "io/posix_io.h"
#include "tensormap/error.h"
#include "tensormap/file.h"
#include "write/file_writer.h"

namespace tensormap {

struct Editor::Impl {
  enum class Kind { Keep, Bytes, Source };
  struct Entry {
    Entry(TensorSpec s, Kind k) : spec(std::move(s)), kind(k) {}
    TensorSpec spec;
    Kind kind;
    const TensorEntry* old = nullptr;    // Keep
    const void* data = nullptr;          // Bytes
    std::shared_ptr<const void> owner;   // Bytes: keeps `data` alive, if given
    const Checkpoint* source = nullptr;  // Source
    std::string source_name;
  };

  Impl(std::unique_ptr<detail::PathLock> l, std::shared_ptr<const detail::Mapping> m, File f)
      : lock(std::move(l)), mapping(std::move(m)), file(std::move(f)) {}

  std::unique_ptr<detail::PathLock> lock;  // held from open to the end of commit (or destruction)
  std::shared_ptr<const detail::Mapping> mapping;
  File file;
  std::vector<Entry> entries;  // in the new file's order
  std::vector<std::pair<std::string, std::string>> metadata;
  size_t removed = 0;
  bool spent = false;

  const std::string& path() const { return file.path(); }

  void check_usable() const {
    if (spent) throw Error(ErrorKind::InvalidArgument, path() + ": this Editor was already committed");
  }

  std::vector<Entry>::iterator find(std::string_view name) {
    return std::find_if(entries.begin(), entries.end(), [&](const Entry& e) { return e.spec.name == name; });
  }

  void put(Entry entry) {
    check_usable();
    auto it = find(entry.spec.name);
    if (it == entries.end()) {
      entries.push_back(std::move(entry));
    } else {
      *it = std::move(entry);
    }
  }
};

Editor::Editor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Editor::~Editor() = default;
Editor::Editor(Editor&&) noexcept = default;
Editor& Editor::operator=(Editor&&) noexcept = default;

Editor Editor::open(const std::string& path) {
  // Locked before reading: a concurrent edit of the same file finishes first, and this
  // one reads its result instead of overwriting it.
  auto lock = std::make_unique<detail::PathLock>(path);
  auto mapping = std::make_shared<const detail::Mapping>(path);
  File file = detail::open_file(mapping);
  if (file.format() != Format::Tensormap) {
    throw Error(ErrorKind::InvalidArgument, path + ": only tensormap files can be edited, this is a " +
                                                format_name(file.format()) +
                                                " file (tensormap convert it to a .tmap first)");
  }
  auto impl = std::make_unique<Impl>(std::move(lock), mapping, file);
  for (const TensorEntry& t : impl->file.tensors()) {
    Impl::Entry e({std::string(t.name), t.dtype, {t.dims.begin(), t.dims.begin() + t.rank}}, Impl::Kind::Keep);
    e.old = &t;
    impl->entries.push_back(std::move(e));
  }
  for (const auto& [k, v] : impl->file.metadata()) impl->metadata.emplace_back(std::string(k), std::string(v));
  return Editor(std::move(impl));
}

void Editor::remove(std::string_view name) {
  Impl& e = *impl_;
  e.check_usable();
  auto it = e.find(name);
  if (it == e.entries.end()) {
    throw Error(ErrorKind::NotFound, e.path() + ": no tensor named " + detail::quoted(name) + " to remove");
  }
  if (e.file.find(name)) ++e.removed;
  e.entries.erase(it);
}

void Editor::put(TensorSpec spec, const void* data) { put(std::move(spec), data, nullptr); }

void Editor::put(TensorSpec spec, const void* data, std::shared_ptr<const void> owner) {
  Impl::Entry entry(std::move(spec), Impl::Kind::Bytes);
  entry.data = data;
  entry.owner = std::move(owner);
  impl_->put(std::move(entry));
}

void Editor::put(const Checkpoint& source, std::string_view name, std::string new_name) {
  const TensorInfo info = source.info(name);  // Error(NotFound) naming the source
  Impl::Entry entry({new_name.empty() ? std::string(name) : std::move(new_name), info.dtype, {}}, Impl::Kind::Source);
  for (int64_t d : info.shape) entry.spec.shape.push_back(static_cast<uint64_t>(d));
  entry.source = &source;
  entry.source_name = std::string(name);
  impl_->put(std::move(entry));
}

void Editor::set_metadata(std::string key, std::string value) {
  Impl& e = *impl_;
  e.check_usable();
  auto it = std::find_if(e.metadata.begin(), e.metadata.end(), [&](const auto& kv) { return kv.first == key; });
  if (value.empty()) {
    if (it != e.metadata.end()) e.metadata.erase(it);
  } else if (it != e.metadata.end()) {
    it->second = std::move(value);
  } else {
    e.metadata.emplace_back(std::move(key), std::move(value));
  }
}

EditReport Editor::commit(bool sync) {
  Impl& e = *impl_;
  e.check_usable();
  e.spent = true;
  struct Unlock {  // whatever happens, a spent Editor lets the next edit of the file go on
    Impl& e;
    ~Unlock() { e.lock.reset(); }
  } unlock{e};
  // An alias stays one while its target is kept unchanged before it; otherwise (its
  // target removed or replaced) it keeps its bytes, copied from the old file.
  std::vector<TensorSpec> specs;
  std::unordered_map<const TensorEntry*, size_t> kept;
  for (const auto& entry : e.entries) {
    specs.push_back(entry.spec);
    if (entry.kind != Impl::Kind::Keep) continue;
    if (entry.old->alias_of) {
      const TensorEntry* target = &e.file.tensors()[*entry.old->alias_of];
      if (kept.count(target)) specs.back().alias_of = std::string(target->name);
    } else {
      kept.emplace(entry.old, specs.size() - 1);
    }
  }
  WriterOptions options;
  options.alignment = e.file.alignment();
  options.metadata = e.metadata;
  options.sync = sync;
  detail::FileWriterCore writer(e.path(), std::move(specs), std::move(options));
  EditReport report;
  report.removed = e.removed;
  std::vector<unsigned char> buffer;
  for (size_t i = 0; i < e.entries.size(); ++i) {
    const Impl::Entry& entry = e.entries[i];
    const uint64_t length = writer.cursor().byte_lengths()[i];
    switch (entry.kind) {
      case Impl::Kind::Keep:
        if (length > 0) {  // the writer passes over empty tensors by itself
          writer.copy_tensor(e.mapping->descriptor(), entry.old->offset, length, entry.old->checksum,
                             "tensor " + detail::quoted(entry.spec.name));
        }
        ++report.kept;
        report.kept_bytes += length;
        break;
      case Impl::Kind::Bytes:
        if (length > 0) writer.write_tensor(entry.data, length);
        ++report.written;
        report.written_bytes += length;
        break;
      case Impl::Kind::Source:
        if (length > 0) {
          if (buffer.empty()) buffer.resize(detail::kStreamPieceBytes);
          entry.source->read_chunks(entry.source_name, buffer.data(), buffer.size(),
                                    [&](const void* data, uint64_t size) { writer.write(data, size); });
        }
        ++report.written;
        report.written_bytes += length;
        break;
    }
  }
  writer.commit();
  return report;
}

}  // namespace tensormap
