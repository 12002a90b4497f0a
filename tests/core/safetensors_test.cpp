// safetensors: files written by the reference implementation read correctly; each
// validation rule of spec/SAFETENSORS.md is broken by one test; the writer's files pass
// the same rules, with every tensor aligned to its element size.
#include <gtest/gtest.h>

#include "support.h"

namespace tensormap::testing {
namespace {

const std::string kFixtures = TENSORMAP_FIXTURES_DIR "/safetensors/";

// A safetensors file: the header length, the JSON header, the data.
std::vector<unsigned char> safetensors_bytes(const std::string& json, const std::string& data = "") {
  std::vector<unsigned char> out(8);
  put<uint64_t>(out, 0, json.size());
  out.insert(out.end(), json.begin(), json.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::optional<ErrorKind> open_bytes(const std::vector<unsigned char>& bytes) {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  write_bytes(path, bytes);
  return open_error(path);
}

template <typename T>
std::vector<T> values(const File& f, const TensorEntry& e) {
  std::vector<T> out(e.byte_length / sizeof(T));
  std::memcpy(out.data(), f.bytes(e).data, e.byte_length);  // may be unaligned in the file
  return out;
}

// --- files from the reference implementation -------------------------------------------

TEST(SafetensorsFixtures, EverySampleHoldsMinusThreeToTwoAndItsMetadata) {
  for (const char* name : {"B", "H", "I", "b", "d", "e", "f", "h", "i"}) {
    const File f = File::open(kFixtures + "sample_" + name + ".safetensors");
    EXPECT_EQ(f.format(), Format::Safetensors);
    EXPECT_FALSE(f.has_checksums());
    ASSERT_EQ(f.tensors().size(), 1u) << name;
    EXPECT_EQ(f.metadata_value("test"), std::string_view("a"));
    const TensorEntry& e = f.at(name);
    EXPECT_EQ(e.rank, 1);
    EXPECT_EQ(e.dims[0], 6u);
    f.verify();  // nothing to check beyond open, and it says so by not throwing
  }
  const File i = File::open(kFixtures + "sample_i.safetensors");
  EXPECT_EQ(values<int32_t>(i, i.at("i")), (std::vector<int32_t>{-3, -2, -1, 0, 1, 2}));
  const File d = File::open(kFixtures + "sample_d.safetensors");
  EXPECT_EQ(values<double>(d, d.at("d")), (std::vector<double>{-3, -2, -1, 0, 1, 2}));
  const File big = File::open(kFixtures + "sample_B.safetensors");
  EXPECT_EQ(values<uint8_t>(big, big.at("B")), (std::vector<uint8_t>{253, 254, 255, 0, 1, 2}));
}

TEST(SafetensorsFixtures, OverallSampleHasAMisalignedF64AndReadsIt) {
  const File f = File::open(kFixtures + "sample_overall.safetensors");
  EXPECT_EQ(f.tensors().size(), 9u);
  const TensorEntry& d = f.at("d");
  EXPECT_NE(d.offset % 8, 0u) << "the fixture is known to be misaligned";
  EXPECT_EQ(values<double>(f, d), (std::vector<double>{-3, -2, -1, 0, 1, 2}));
  EXPECT_EQ(values<int16_t>(f, f.at("h")), (std::vector<int16_t>{-3, -2, -1, 0, 1, 2}));
}

TEST(SafetensorsFixtures, CppGeneratedModelHasItsTwoMatrices) {
  const File f = File::open(kFixtures + "cpp_gen_model.safetensors");
  EXPECT_EQ(f.at("weight1").dims[0], 8u);
  EXPECT_EQ(f.at("weight2").byte_length, 16u * 16 * 8);
  EXPECT_TRUE(f.metadata().empty());
}

TEST(SafetensorsFixtures, AbuseAttemptIsRejected) {
  EXPECT_EQ(open_error(kFixtures + "abuse_attempt_1.safetensors"), ErrorKind::SafetensorsHeaderPastEnd);
}

// --- one test per rule, in the reference's order --------------------------------------

TEST(SafetensorsRules, Rule1_FewerThan8BytesIsTooSmall) {
  // Too short to be recognised as safetensors at all: the tensormap rules answer.
  EXPECT_EQ(open_bytes({1, 2, 3}), ErrorKind::FileTooSmall);
  TempDir dir;
  write_bytes(dir.file("x"), {1, 2, 3});
  const std::string message = [&] {
    try {
      File::open(dir.file("x"));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  EXPECT_NE(message.find("3 bytes"), std::string::npos) << message;
}

TEST(SafetensorsRules, Rule2_HeaderLengthAbove1e8IsHeaderTooLarge) {
  auto bytes = safetensors_bytes("{}");
  put<uint64_t>(bytes, 0, 100'000'001);
  EXPECT_EQ(open_bytes(bytes), ErrorKind::SafetensorsHeaderTooLarge);
}

TEST(SafetensorsRules, Rule3_HeaderPastTheEndIsHeaderPastEnd) {
  auto bytes = safetensors_bytes("{}");
  put<uint64_t>(bytes, 0, 3);
  EXPECT_EQ(open_bytes(bytes), ErrorKind::SafetensorsHeaderPastEnd);
}

TEST(SafetensorsRules, Rule4_HeaderNotUtf8IsHeaderNotUtf8) {
  EXPECT_EQ(open_bytes(safetensors_bytes("{\"\xff\":1}")), ErrorKind::SafetensorsHeaderNotUtf8);
}

TEST(SafetensorsRules, Rule5_EverythingThatIsNotTheSafetensorsShapeIsBadJson) {
  const char* headers[] = {
      "{",                                                                   // not JSON
      "{} []",                                                               // trailing text
      R"({"a": 1})",                                                         // not an object
      R"({"a": {"dtype": "F32", "shape": [1]}})",                            // no data_offsets
      R"({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}})",    // unknown dtype
      R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})",   // negative dim
      R"({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})",  // fraction
      R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",       // one offset
      R"({"__metadata__": {"k": 1}})",                                       // metadata not string
      R"({"__metadata__": []})",
      R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
          "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",                      // duplicate name
      R"({"a": {"dtype": "U8", "dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})",       // field twice
      R"({"__metadata__": {"k": "v", "k": "w"}})",                                            // metadata key twice
      R"({"__metadata__": {}, "__metadata__": {}})",                                          // metadata twice
      R"({"a": {"dtype": "U8", "shape": [1,1,1,1,1,1,1,1,4], "data_offsets": [0, 4]}})",      // rank 9
      R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 4]}})",                   // three offsets
      R"({"a": {"dtype": "U8", "shape": [[4]], "data_offsets": [0, 4]}})",                    // nested shape
      R"({"a": {"dtype": ["U8"], "shape": [4], "data_offsets": [0, 4]}})",                    // dtype not a string
      R"({"a": {"dtype": "U8", "shape": 4, "data_offsets": [0, 4]}})",                        // shape not an array
      R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 18446744073709551616]}})",   // > u64
      R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "x": [1, {"y": 2}]},)",  // cut
  };
  for (const char* h : headers) {
    EXPECT_EQ(open_bytes(safetensors_bytes(h, "xxxx")), ErrorKind::SafetensorsBadJson) << h;
  }
}

TEST(SafetensorsRules, Rule5_ErrorsNameTheTensorAndWhatIsWrong) {
  auto message_of = [](const char* header) {
    TempDir dir;
    write_bytes(dir.file("x.safetensors"), safetensors_bytes(header, "xxxx"));
    try {
      File::open(dir.file("x.safetensors"));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(opened)");
  };
  const std::pair<const char*, const char*> cases[] = {
      {R"({"w": {"dtype": "F32", "shape": [1, -2], "data_offsets": [0, 4]}})",
       "tensor 'w' has a dimension that is not a non-negative integer"},
      {R"({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}})", "tensor 'w' has unknown dtype 'Q4'"},
      {R"({"w": {"shape": [1], "shape": [1]}})", "tensor 'w' has the field 'shape' twice"},
      {R"({"w": {"dtype": "U8", "shape": [4]}})",
       "tensor 'w' needs a string dtype, an array shape and two data_offsets"},
      {R"({"w": 3})", "tensor 'w' is not an object"},
      {R"({"__metadata__": {"k": 1}})", "metadata value of 'k' is not a string"},
      {R"({"__metadata__": {"k": "v", "k": "v"}})", "metadata key 'k' appears twice"},
      {R"({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "w": 1})", "tensor name 'w' appears twice"},
      {R"({"w": {)", "header is not valid JSON"},
  };
  for (const auto& [header, expected] : cases) {
    const std::string message = message_of(header);
    EXPECT_NE(message.find(expected), std::string::npos) << header << "\n  gave: " << message;
    EXPECT_NE(message.find("x.safetensors: "), std::string::npos) << message;
  }
}

// Fields the format does not define are skipped whatever their value, as the reference
// does; tensors listed out of data order are found by name at their own bytes.
TEST(SafetensorsRules, UnknownFieldsAreIgnoredAndTheOrderOfTheJsonDoesNotMatter) {
  const char* h = R"({"b": {"note": {"deep": [1, [2, {"x": null}]], "t": true}, "dtype": "U8",
                            "shape": [2], "data_offsets": [2, 4], "extra": "s"},
                      "__metadata__": {"format": "pt"},
                      "a": {"data_offsets": [0, 2], "shape": [2], "dtype": "U8", "n": -1.5}})";
  TempDir dir;
  write_bytes(dir.file("x.safetensors"), safetensors_bytes(h, "ABCD"));
  const File f = File::open(dir.file("x.safetensors"));
  ASSERT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.tensors()[0].name, "a");  // data order
  const TensorEntry& a = f.at("a");
  const TensorEntry& b = f.at("b");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.bytes(a).data), 2), "AB");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.bytes(b).data), 2), "CD");
  EXPECT_EQ(b.rank, 1);
  EXPECT_EQ(b.dims[0], 2u);
  ASSERT_EQ(f.metadata().size(), 1u);
  EXPECT_EQ(f.metadata()[0].first, "format");
  EXPECT_EQ(f.metadata()[0].second, "pt");
}

TEST(SafetensorsRules, Rule6_HolesOverlapsAndBackwardsRangesAreBadOffsets) {
  const char* headers[] = {
      R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}})",  // first not at 0
      R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
          "b": {"dtype": "U8", "shape": [1], "data_offsets": [3, 4]}})",  // hole
      R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
          "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}})",  // overlap
      R"({"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
          "b": {"dtype": "U8", "shape": [0], "data_offsets": [2, 1]}})",  // end before begin
  };
  for (const char* h : headers) {
    EXPECT_EQ(open_bytes(safetensors_bytes(h, "xxxx")), ErrorKind::SafetensorsBadOffsets) << h;
  }
}

TEST(SafetensorsRules, Rule7_OverflowingShapeIsOverflow) {
  EXPECT_EQ(open_bytes(safetensors_bytes(
                R"({"a": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", "12345678")),
            ErrorKind::SafetensorsOverflow);
}

TEST(SafetensorsRules, Rule8_SpanDifferentFromShapeIsSizeMismatch) {
  EXPECT_EQ(open_bytes(safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "1234")),
            ErrorKind::SafetensorsSizeMismatch);
}

TEST(SafetensorsRules, Rule9_TrailingOrMissingDataIsBufferMismatch) {
  const char* h = R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})";
  EXPECT_EQ(open_bytes(safetensors_bytes(h, "1234")), std::nullopt);
  EXPECT_EQ(open_bytes(safetensors_bytes(h, "12345")), ErrorKind::SafetensorsBufferMismatch);
  EXPECT_EQ(open_bytes(safetensors_bytes(h, "123")), ErrorKind::SafetensorsBufferMismatch);
}

TEST(SafetensorsRules, EmptyAndRankZeroTensorsAreLegal) {
  const char* h = R"({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                      "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}})";
  TempDir dir;
  write_bytes(dir.file("x.safetensors"), safetensors_bytes(h, "abcd"));
  const File f = File::open(dir.file("x.safetensors"));
  EXPECT_EQ(f.at("s").rank, 0);
  EXPECT_EQ(f.at("z").byte_length, 0u);
}

TEST(SafetensorsRules, AnEmptyTensorWhereAnotherStartsIsLegalInEitherOrder) {
  // The reference sorts by (begin, end); sorting by begin alone refused the second header.
  const char* headers[] = {
      R"({"e": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]},
          "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
          "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})",
      R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
          "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
          "e": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}})",
  };
  for (const char* h : headers) {
    TempDir dir;
    write_bytes(dir.file("x.safetensors"), safetensors_bytes(h, "abcd"));
    const File f = File::open(dir.file("x.safetensors"));
    EXPECT_EQ(f.at("e").byte_length, 0u) << h;
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.bytes(f.at("b")).data), 2), "cd") << h;
  }
}

TEST(SafetensorsRules, Rule5_ANulByteAnywhereInTheHeaderIsBadJson) {
  // nlohmann's parser stops at a NUL byte; what follows it must not be ignored.
  const std::string good = R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}})";
  const std::string cases[] = {
      good + std::string("\0", 1) + "garbage",
      good + std::string("\0", 1),
      std::string(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b)") + std::string("\0", 1) +
          R"(": 1})",
  };
  for (const auto& h : cases) {
    EXPECT_EQ(open_bytes(safetensors_bytes(h, "xy")), ErrorKind::SafetensorsBadJson) << h.size();
  }
  EXPECT_EQ(open_bytes(safetensors_bytes(good + "  ", "xy")), std::nullopt);  // spaces still pad
}

TEST(SafetensorsRules, TruncationAtEveryLengthFailsOpen) {
  const auto good = read_bytes(kFixtures + "sample_overall.safetensors");
  TempDir dir;
  for (size_t size = 0; size < good.size(); ++size) {
    write_bytes(dir.file("t"), std::vector<unsigned char>(good.begin(), good.begin() + static_cast<long>(size)));
    ASSERT_NE(open_error(dir.file("t")), std::nullopt) << size;
  }
}

// --- the writer ------------------------------------------------------------------------

TEST(SafetensorsWriter, EveryDtypeRoundTripsAlignedToItsElementSize) {
  TempDir dir;
  const std::string path = dir.file("all.safetensors");
  std::vector<TensorSpec> specs;
  for (Dtype d : kAllDtypes) specs.push_back({"t." + std::string(dtype_name(d)), d, {3}});
  WriterOptions options;
  options.format = Format::Safetensors;
  options.metadata = {{"format", "pt"}};
  write_pattern_file(path, specs, options);
  const File f = File::open(path);
  EXPECT_EQ(f.format(), Format::Safetensors);
  EXPECT_EQ(f.header_size() % 4096, 0u) << "data starts on a page";
  EXPECT_EQ(f.metadata_value("format"), std::string_view("pt"));
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorEntry& e = f.at(specs[i].name);
    EXPECT_EQ(e.dtype, specs[i].dtype);
    EXPECT_EQ(e.offset % dtype_size(e.dtype), 0u) << specs[i].name;
    for (uint64_t j = 0; j < e.byte_length; ++j) {
      ASSERT_EQ(static_cast<unsigned char>(f.bytes(e).data[j]), static_cast<unsigned char>(i * 7 + j));
    }
  }
}

TEST(SafetensorsWriter, HeaderIsPlainJsonPaddedWithSpaces) {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  WriterOptions options;
  options.format = Format::Safetensors;
  write_pattern_file(path, {{"w", Dtype::F32, {2}}}, options);
  const auto b = read_bytes(path);
  const uint64_t n = get<uint64_t>(b, 0);
  const std::string header(b.begin() + 8, b.begin() + 8 + static_cast<long>(n));
  EXPECT_EQ(header.rfind(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 0), 0u) << header;
  EXPECT_EQ(header.find_first_not_of(' ', header.find('}', header.rfind(']')) + 2), std::string::npos);
  EXPECT_EQ(b.size(), 4096u + 8);
}

TEST(SafetensorsWriter, RefusesTheReservedNameAndDuplicates) {
  TempDir dir;
  WriterOptions options;
  options.format = Format::Safetensors;
  EXPECT_THROW(Writer(dir.file("x"), {{"__metadata__", Dtype::U8, {1}}}, options), Error);
  EXPECT_THROW(Writer(dir.file("x"), {{"a", Dtype::U8, {1}}, {"a", Dtype::U8, {1}}}, options), Error);
}

}  // namespace
}  // namespace tensormap::testing
