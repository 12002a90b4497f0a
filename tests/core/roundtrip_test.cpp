// Round trips through the writer and the reader: what goes in comes out, bit for bit.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "support.h"

namespace tensormap::testing {
namespace {

std::vector<unsigned char> pattern(uint64_t size, unsigned seed) {
  std::vector<unsigned char> v(size);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<unsigned char>(rng());
  return v;
}

TEST(RoundTrip, EveryDtypeKeepsItsBytesShapeAndName) {
  TempDir dir;
  const std::string path = dir.file("all.tmap");
  std::vector<TensorSpec> specs;
  std::vector<std::vector<unsigned char>> data;
  for (Dtype d : kAllDtypes) {
    specs.push_back({"t." + std::string(dtype_name(d)), d, {3, 5}});
    data.push_back(pattern(15u * dtype_size(d), static_cast<unsigned>(d)));
  }
  {
    Writer w(path, specs, {});
    for (const auto& bytes : data) w.write_tensor(bytes.data(), bytes.size());
    w.commit();
  }
  const File f = File::open(path);
  ASSERT_EQ(f.tensors().size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorEntry& e = f.at(specs[i].name);
    EXPECT_EQ(e.dtype, specs[i].dtype);
    ASSERT_EQ(e.rank, 2);
    EXPECT_EQ(e.dims[0], 3u);
    EXPECT_EQ(e.dims[1], 5u);
    const ByteView b = f.bytes(e);
    ASSERT_EQ(b.size, data[i].size());
    EXPECT_EQ(std::memcmp(b.data, data[i].data(), b.size), 0) << specs[i].name;
  }
  f.verify();
}

TEST(RoundTrip, DtypeTableMatchesTheSpec) {
  EXPECT_EQ(static_cast<int>(Dtype::BOOL), 1);
  EXPECT_EQ(static_cast<int>(Dtype::F8_E5M2), 17);
  EXPECT_EQ(dtype_size(Dtype::C128), 16);
  EXPECT_EQ(dtype_size(Dtype::BF16), 2);
  EXPECT_EQ(dtype_name(Dtype::F8_E4M3), "F8_E4M3");
  EXPECT_EQ(dtype_from_name("BF16"), Dtype::BF16);
  EXPECT_FALSE(dtype_from_name("bf16"));
  EXPECT_FALSE(dtype_from_code(0));
  EXPECT_FALSE(dtype_from_code(18));
  for (Dtype d : kAllDtypes) EXPECT_EQ(dtype_from_name(dtype_name(d)), d);
}

TEST(RoundTrip, RankZeroTensorHoldsOneElement) {
  TempDir dir;
  const std::string path = dir.file("scalar.tmap");
  const double value = 3.25;
  {
    Writer w(path, {{"scalar", Dtype::F64, {}}}, {});
    w.write_tensor(&value, sizeof value);
    w.commit();
  }
  const File f = File::open(path);
  const TensorEntry& e = f.at("scalar");
  EXPECT_EQ(e.rank, 0);
  EXPECT_EQ(e.element_count(), 1u);
  double back;
  std::memcpy(&back, f.bytes(e).data, sizeof back);
  EXPECT_EQ(back, value);
}

TEST(RoundTrip, ZeroSizedTensorsTakeNoSpace) {
  TempDir dir;
  const std::string path = dir.file("empty.tmap");
  const uint32_t x = 0xDEADBEEF;
  {
    Writer w(path, {{"a", Dtype::F32, {0}}, {"b", Dtype::I64, {4, 0, 3}}, {"c", Dtype::U32, {1}}}, {});
    EXPECT_EQ(w.current_tensor(), 2u) << "empty tensors are passed over";
    w.write_tensor(&x, sizeof x);
    w.commit();
  }
  const File f = File::open(path);
  EXPECT_EQ(f.at("a").byte_length, 0u);
  EXPECT_EQ(f.at("b").byte_length, 0u);
  EXPECT_EQ(f.at("a").offset, f.at("c").offset);
  EXPECT_EQ(f.at("b").element_count(), 0u);
  uint32_t back;
  std::memcpy(&back, f.bytes(f.at("c")).data, 4);
  EXPECT_EQ(back, x);
  f.verify();
}

TEST(RoundTrip, FileWithNoTensorsIsValid) {
  TempDir dir;
  const std::string path = dir.file("none.tmap");
  Writer w(path, {}, {});
  w.commit();
  const File f = File::open(path);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(f.file_size(), 4096u);  // round_up(56, 4096)
}

TEST(RoundTrip, TenThousandSmallTensorsAllFoundByName) {
  TempDir dir;
  const std::string path = dir.file("many.tmap");
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 10000; ++i) specs.push_back({"layer." + std::to_string(i) + ".w", Dtype::I32, {1}});
  {
    Writer w(path, specs, {64, {}, false});
    for (int32_t i = 0; i < 10000; ++i) w.write_tensor(&i, sizeof i);
    w.commit();
  }
  const File f = File::open(path);
  ASSERT_EQ(f.tensors().size(), 10000u);
  for (int32_t i = 0; i < 10000; ++i) {
    const TensorEntry* e = f.find("layer." + std::to_string(i) + ".w");
    ASSERT_NE(e, nullptr);
    int32_t v;
    std::memcpy(&v, f.bytes(*e).data, 4);
    ASSERT_EQ(v, i);
    ASSERT_EQ(e->offset % 64, 0u);
  }
  EXPECT_EQ(f.find("layer.10000.w"), nullptr);
  f.verify();
}

TEST(RoundTrip, MetadataPairsComeBackInOrder) {
  TempDir dir;
  const std::string path = dir.file("meta.tmap");
  WriterOptions options;
  options.metadata = {{"format", "pt"}, {"empty", ""}, {"ünïcode ключ", "値"}};
  {
    Writer w(path, {}, options);
    w.commit();
  }
  const File f = File::open(path);
  ASSERT_EQ(f.metadata().size(), 3u);
  EXPECT_EQ(f.metadata()[0].first, "format");
  EXPECT_EQ(f.metadata()[0].second, "pt");
  EXPECT_EQ(f.metadata_value("empty"), std::string_view(""));
  EXPECT_EQ(f.metadata_value("ünïcode ключ"), std::string_view("値"));
  EXPECT_FALSE(f.metadata_value("missing"));
}

TEST(RoundTrip, EveryTensorStartsOnTheAlignment) {
  for (uint64_t alignment : {64u, 256u, 4096u, 65536u, 1048576u}) {
    TempDir dir;
    const std::string path = dir.file("aligned.tmap");
    write_pattern_file(path, {{"x", Dtype::U8, {3}}, {"y", Dtype::F64, {7}}, {"z", Dtype::U8, {1}}},
                       {alignment, {}, false});
    const File f = File::open(path);
    EXPECT_EQ(f.alignment(), alignment);
    for (const auto& e : f.tensors()) EXPECT_EQ(e.offset % alignment, 0u) << alignment;
    EXPECT_EQ(f.file_size() % alignment, 0u);
    f.verify();
  }
}

TEST(RoundTrip, DefaultAlignmentIsOnePage) {
  TempDir dir;
  const std::string path = dir.file("default.tmap");
  write_pattern_file(path, {{"x", Dtype::U8, {3}}, {"y", Dtype::U8, {5000}}});
  const File f = File::open(path);
  EXPECT_EQ(f.alignment(), 4096u);
  EXPECT_EQ(f.at("x").offset, 4096u);
  EXPECT_EQ(f.at("y").offset, 8192u);
  EXPECT_EQ(f.file_size(), 16384u);
}

TEST(RoundTrip, ChunkedWritesEqualOneWrite) {
  TempDir dir;
  const auto data = pattern(10000, 1);
  const std::string one = dir.file("one.tmap");
  const std::string chunked = dir.file("chunked.tmap");
  const std::vector<TensorSpec> specs = {{"a", Dtype::U8, {10000}}};
  {
    Writer w(one, specs, {});
    w.write_tensor(data.data(), data.size());
    w.commit();
  }
  {
    Writer w(chunked, specs, {});
    for (size_t at = 0; at < data.size(); at += 777) {
      w.write(data.data() + at, std::min<size_t>(777, data.size() - at));
    }
    w.commit();
  }
  EXPECT_EQ(read_bytes(one), read_bytes(chunked));
}

TEST(RoundTrip, SpecExampleHasTheDocumentedLayout) {
  // spec/FORMAT.md section 13.
  TempDir dir;
  const std::string path = dir.file("example.tmap");
  const float w[2] = {1.0f, 2.0f};
  {
    Writer writer(path, {{"w", Dtype::F32, {2}}}, {64, {{"k", "v"}}, false});
    writer.write_tensor(w, sizeof w);
    writer.commit();
  }
  const auto b = read_bytes(path);
  ASSERT_EQ(b.size(), 192u);
  EXPECT_EQ(get<uint64_t>(b, 16), 120u);      // H
  EXPECT_EQ(get<uint64_t>(b, 48 + 8), 128u);  // offset of w
  const unsigned char tensor[8] = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40};
  EXPECT_EQ(std::memcmp(b.data() + 128, tensor, 8), 0);
  EXPECT_EQ(get<uint64_t>(b, 48 + 24), XXH3_64bits(tensor, 8));
  EXPECT_EQ(b[104], 'k');
  EXPECT_EQ(b[105], 'v');
}

TEST(RoundTrip, Xxh3TestVectorsOfTheSpec) {
  EXPECT_EQ(XXH3_64bits("", 0), 0x2D06800538D394C2ull);
  EXPECT_EQ(XXH3_64bits("abc", 3), 0x78AF5F94892F3950ull);
}

TEST(RoundTrip, ManyThreadsReadOneFileAtOnce) {
  TempDir dir;
  const std::string path = dir.file("threads.tmap");
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 64; ++i) specs.push_back({"t" + std::to_string(i), Dtype::U8, {1000}});
  write_pattern_file(path, specs);
  const File f = File::open(path);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 50; ++round) {
        const int i = (t * 13 + round) % 64;
        const TensorEntry* e = f.find("t" + std::to_string(i));
        const ByteView b = f.bytes(*e);
        for (uint64_t j = 0; j < b.size; ++j) {
          if (static_cast<unsigned char>(b.data[j]) != static_cast<unsigned char>(i * 7 + j)) ++bad;
        }
        if (round % 10 == 0 && !f.find_corruption().empty()) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(RoundTrip, MappingOutlivesTheFileObject) {
  TempDir dir;
  const std::string path = dir.file("alive.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {100}}});
  std::shared_ptr<const void> owner;
  const unsigned char* data = nullptr;
  {
    const File f = File::open(path);
    owner = f.keep_alive();
    data = reinterpret_cast<const unsigned char*>(f.bytes(f.at("a")).data);
  }
  EXPECT_EQ(data[99], static_cast<unsigned char>(99));
}

TEST(RoundTrip, CowWritesNeverReachTheFile) {
  TempDir dir;
  const std::string path = dir.file("cow.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {100}}});
  const auto before = read_bytes(path);
  const File f = File::open(path);
  auto* p = static_cast<unsigned char*>(f.cow_data(f.at("a")));
  p[0] = 0xAB;
  EXPECT_EQ(static_cast<unsigned char>(f.bytes(f.at("a")).data[0]), 0xAB);
  EXPECT_EQ(read_bytes(path), before);
  f.evict(f.at("a"));  // drops the private copy: the file's byte is back
  EXPECT_EQ(p[0], 0);
}

// map_region: a mapping of its own over any range of a tensor, page-aligned or not, with
// the same bytes; copy-on-write; alive after the File is gone; a range past the tensor is
// refused naming the file and the tensor.
TEST(RoundTrip, MapRegionMapsARangeOnItsOwn) {
  TempDir dir;
  const std::string path = dir.file("region.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {10000}}, {"b", Dtype::U8, {3}}});
  const auto before = read_bytes(path);
  std::shared_ptr<void> region;
  {
    const File f = File::open(path);
    const TensorEntry& a = f.at("a");
    const auto* whole = reinterpret_cast<const unsigned char*>(f.bytes(a).data);
    for (auto [offset, size] :
         std::vector<std::pair<uint64_t, uint64_t>>{{0, 10000}, {4095, 2}, {5000, 0}, {9999, 1}}) {
      const std::shared_ptr<void> r = f.map_region(a, offset, size);
      const auto* bytes = static_cast<const unsigned char*>(r.get());
      if (size) {
        EXPECT_NE(bytes, whole + offset) << "not a mapping of its own";
      }
      for (uint64_t i = 0; i < size; ++i) ASSERT_EQ(bytes[i], whole[offset + i]) << offset << "+" << i;
    }
    region = f.map_region(a, 4096, 100);
    static_cast<unsigned char*>(region.get())[0] = 0xEE;  // private: the file and `whole` keep theirs
    EXPECT_NE(whole[4096], 0xEE);
    for (auto [offset, size] : std::vector<std::pair<uint64_t, uint64_t>>{{0, 10001}, {10001, 0}, {9000, UINT64_MAX}}) {
      try {
        f.map_region(a, offset, size);
        ADD_FAILURE() << offset << "+" << size << " was mapped";
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
        EXPECT_NE(std::string(e.what()).find("region.tmap"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("'a'"), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_EQ(static_cast<unsigned char*>(region.get())[0], 0xEE);
  EXPECT_EQ(static_cast<unsigned char*>(region.get())[1], before[File::open(path).at("a").offset + 4097]);
  EXPECT_EQ(read_bytes(path), before);
}

TEST(RoundTrip, UnknownNameIsNotFoundNamingFileAndTensor) {
  TempDir dir;
  const std::string path = dir.file("nf.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {1}}});
  const File f = File::open(path);
  try {
    f.at("fc.weight");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::NotFound);
    EXPECT_NE(std::string(e.what()).find("nf.tmap"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("'fc.weight'"), std::string::npos);
  }
}

}  // namespace
}  // namespace tensormap::testing
