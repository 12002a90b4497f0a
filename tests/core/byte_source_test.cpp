// The seams in front of the OS. ByteSource: readers that take one read the same from
// memory as from a file, and a source that fails or shrinks under them gives an Error,
// never a crash or wrong bytes. Output: a writer whose destination fails at any write is
// abandoned and publishes nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../../src/core/io/byte_source.h"
#include "../../src/core/io/mapping.h"
#include "../../src/core/source.h"
#include "../../src/core/torch_save/zip.h"
#include "../../src/core/write/file_writer.h"
#include "support.h"
#include "tensormap/core.h"

namespace tensormap {
namespace {

using testing::read_bytes;

const std::string kTorchFixtures = TENSORMAP_FIXTURES_DIR "/torch_save/";

std::shared_ptr<const detail::MemoryBytes> in_memory(const std::string& path) {
  return std::make_shared<const detail::MemoryBytes>(path, read_bytes(path));
}

// A source that serves another's bytes until `budget` bytes have been read, then fails
// every read with `kind`: a connection that drops, a file that shrinks.
class FailingSource final : public detail::ByteSource {
 public:
  FailingSource(std::shared_ptr<const ByteSource> inner, uint64_t budget, ErrorKind kind)
      : inner_(std::move(inner)), budget_(budget), kind_(kind) {}
  const std::string& name() const override { return inner_->name(); }
  uint64_t size() const override { return inner_->size(); }
  void read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const override {
    if (size > budget_) throw Error(kind_, name() + ": " + what + ": injected failure");
    budget_ -= size;
    inner_->read(offset, dest, size, what);
  }

 private:
  std::shared_ptr<const ByteSource> inner_;
  mutable uint64_t budget_;
  ErrorKind kind_;
};

std::vector<unsigned char> bytes_of(const detail::Source& source, size_t i) {
  std::vector<unsigned char> out(static_cast<size_t>(source.info(i).byte_length));
  source.read(i, out.data());
  return out;
}

TEST(ByteSource, MemoryBytesRefusesARangePastTheEnd) {
  const detail::MemoryBytes bytes("mem", {1, 2, 3});
  unsigned char out[4] = {};
  bytes.read(1, out, 2, "two bytes");
  EXPECT_EQ(out[0], 2);
  EXPECT_EQ(out[1], 3);
  try {
    bytes.read(2, out, 2, "the tail");
    FAIL() << "read past the end";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Truncated);
    EXPECT_NE(std::string(e.what()).find("mem: the tail ends at 4"), std::string::npos) << e.what();
  }
}

TEST(ByteSource, ATorchSaveArchiveReadsTheSameFromMemoryAsFromItsFile) {
  for (const char* name : {"state_dict.pt", "nested.pt", "shared_views.pt", "all_dtypes.pt"}) {
    const std::string path = kTorchFixtures + name;
    const auto from_file = detail::open_torch_save(std::make_shared<const detail::Mapping>(path));
    const auto from_memory = detail::open_torch_save(in_memory(path));
    ASSERT_EQ(from_memory->names, from_file->names) << name;
    EXPECT_EQ(read_zip_directory(*in_memory(path)).size(), read_zip_directory(detail::Mapping(path)).size());
    for (size_t i = 0; i < from_file->size(); ++i) {
      EXPECT_EQ(bytes_of(*from_memory, i), bytes_of(*from_file, i)) << name << " " << from_file->names[i];
      EXPECT_EQ(from_memory->alias_of(i), from_file->alias_of(i));
    }
    // Placement needs a mapping: refused, not a dangling pointer.
    try {
      (void)from_memory->placement(0);
      FAIL() << "placement of bytes in memory";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
      EXPECT_NE(std::string(e.what()).find("not a local file"), std::string::npos) << e.what();
    }
  }
}

TEST(ByteSource, AReadThatFailsAtAnyPointGivesThatErrorAndNothingElse) {
  const std::string path = kTorchFixtures + "state_dict.pt";
  const auto whole = in_memory(path);
  const auto reference = detail::open_torch_save(whole);
  for (const ErrorKind kind : {ErrorKind::Io, ErrorKind::Truncated}) {
    int failed = 0;
    for (uint64_t budget = 0; budget < whole->size(); budget += 97) {
      auto failing = std::make_shared<const FailingSource>(whole, budget, kind);
      try {
        const auto source = detail::open_torch_save(failing);
        for (size_t i = 0; i < source->size(); ++i) {
          EXPECT_EQ(bytes_of(*source, i), bytes_of(*reference, i)) << "budget " << budget;  // right bytes, or an error
        }
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), kind) << e.what();
        EXPECT_NE(std::string(e.what()).find("injected failure"), std::string::npos) << e.what();
        ++failed;
      }
    }
    EXPECT_GT(failed, 0);
  }
}

}  // namespace
}  // namespace tensormap

namespace tensormap {
namespace {

// An Output that keeps bytes in memory and refuses every write after `budget` bytes, as a
// disk that fills up; it records whether it was published or discarded.
struct Recorded {
  std::vector<unsigned char> bytes;
  bool published = false, discarded = false;
};
class FillingOutput final : public detail::Output {
 public:
  FillingOutput(uint64_t budget, Recorded& record) : budget_(budget), record_(record) {}
  const std::string& path() const override { return path_; }
  void pwrite(const void* data, size_t size, uint64_t offset) override {
    if (size > budget_) throw Error(ErrorKind::Io, path_ + ": write failed: No space left on device (injected)");
    budget_ -= size;
    if (record_.bytes.size() < offset + size) record_.bytes.resize(offset + size);
    std::memcpy(record_.bytes.data() + offset, data, size);
  }
  void append(const void* data, size_t size) override { pwrite(data, size, appended_), appended_ += size; }
  void truncate(uint64_t size) override { record_.bytes.resize(size); }
  void finish(bool) override {}
  void publish(bool) override { record_.published = true; }
  void discard() noexcept override { record_.discarded = true; }

 private:
  std::string path_ = "mem://model.tmap";
  uint64_t budget_;
  uint64_t appended_ = 0;
  Recorded& record_;
};

TEST(OutputSeam, AFullDiskAtAnyWriteAbandonsTheWriterAndPublishesNothing) {
  const std::vector<TensorSpec> specs = {{"a", Dtype::F32, {300}}, {"b", Dtype::U8, {5000}}, {"c", Dtype::I64, {7}}};
  std::vector<std::vector<unsigned char>> data;
  for (const auto& spec : specs) {
    uint64_t n = dtype_size(spec.dtype);
    for (uint64_t d : spec.shape) n *= d;
    data.emplace_back(static_cast<size_t>(n));
    for (size_t i = 0; i < data.back().size(); ++i) data.back()[i] = static_cast<unsigned char>(i * 7 + n);
  }
  int failures = 0;
  for (uint64_t budget = 0; budget < 8000; budget += 501) {
    Recorded record;
    detail::FileWriterCore writer("mem://model.tmap", specs, {},
                                  [&] { return std::make_unique<FillingOutput>(budget, record); });
    try {
      for (const auto& bytes : data) writer.write(bytes.data(), bytes.size());
      writer.commit();
      EXPECT_TRUE(record.published);
      // What was published reads back as the tensors written.
      testing::TempDir dir;
      testing::write_bytes(dir.file("x.tmap"), record.bytes);
      const Checkpoint c = Checkpoint::open(dir.file("x.tmap"));
      for (size_t i = 0; i < specs.size(); ++i) {
        std::vector<unsigned char> back(data[i].size());
        c.read(specs[i].name, back.data());
        EXPECT_EQ(back, data[i]) << specs[i].name;
      }
    } catch (const Error& e) {
      ++failures;
      EXPECT_EQ(e.kind(), ErrorKind::Io) << e.what();
      EXPECT_FALSE(record.published) << budget;
      EXPECT_TRUE(record.discarded) << budget;
      // Everything after the failure is refused, with the reason.
      try {
        writer.write(data[0].data(), 1);
        FAIL() << "a write after the failure";
      } catch (const Error& later) {
        EXPECT_NE(std::string(later.what()).find("failed earlier"), std::string::npos) << later.what();
      }
    }
  }
  EXPECT_GT(failures, 5);
}

}  // namespace
}  // namespace tensormap
