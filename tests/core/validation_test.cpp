// One test (or more) per validation rule of spec/FORMAT.md section 9. Each builds a valid
// file with the writer, breaks exactly one rule by patching bytes at the offsets the spec
// gives, re-seals the header checksum where the rule comes after it, and checks the kind.
#include <gtest/gtest.h>

#include "support.h"

namespace tensormap::testing {
namespace {

// The base file: tensors a (F32 [2]) and b (U8 [3]), metadata {k: v}, alignment 64.
//   [0,48) preamble | [48,96) record a | [96,144) record b | [144,160) metadata k
//   [160,168) checksum, H = 168 | a at 192 (8 bytes) | b at 256 (3 bytes) | size 320
constexpr size_t kRecA = 48, kRecB = 96, kMeta = 144, kH = 168;
constexpr size_t kDataA = 192, kDataB = 256, kSize = 320;

class Validation : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("base.tmap");
    write_pattern_file(path_, {{"a", Dtype::F32, {2}}, {"b", Dtype::U8, {3}}}, {64, {{"k", "v"}}, false});
    bytes_ = read_bytes(path_);
    ASSERT_EQ(bytes_.size(), kSize);
    ASSERT_EQ(get<uint64_t>(bytes_, 16), kH);
    ASSERT_EQ(get<uint64_t>(bytes_, kRecA + 8), kDataA);
    ASSERT_EQ(get<uint64_t>(bytes_, kRecB + 8), kDataB);
    ASSERT_EQ(bytes_[kMeta + 8], 'k');
  }

  // Writes the patched bytes, re-sealed or not, and returns the kind open throws.
  std::optional<ErrorKind> open_patched(bool reseal_header = true) {
    if (reseal_header) reseal(bytes_);
    write_bytes(path_, bytes_);
    return open_error(path_);
  }

  std::string open_message() {
    write_bytes(path_, bytes_);
    try {
      File::open(path_);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }

  std::optional<ErrorKind> verify_patched() {
    write_bytes(path_, bytes_);
    const File f = File::open(path_);
    try {
      f.verify();
    } catch (const Error& e) {
      return e.kind();
    }
    return std::nullopt;
  }

  TempDir dir_;
  std::string path_;
  std::vector<unsigned char> bytes_;
};

TEST_F(Validation, BaseFileIsValid) {
  EXPECT_EQ(open_patched(false), std::nullopt);
  EXPECT_EQ(verify_patched(), std::nullopt);
}

// Rule 1.
TEST_F(Validation, Rule01_FileSmallerThan56BytesIsFileTooSmall) {
  bytes_.resize(55);
  EXPECT_EQ(open_patched(false), ErrorKind::FileTooSmall);
  bytes_.clear();
  EXPECT_EQ(open_patched(false), ErrorKind::FileTooSmall);
}

// Rule 2.
TEST_F(Validation, Rule02_WrongMagicIsBadMagic) {
  bytes_[1] = 'X';
  EXPECT_EQ(open_patched(false), ErrorKind::BadMagic);
}

// Rule 3.
TEST_F(Validation, Rule03_OtherMajorVersionIsUnsupported) {
  put<uint16_t>(bytes_, 8, 3);
  EXPECT_EQ(open_patched(), ErrorKind::UnsupportedVersion);
  put<uint16_t>(bytes_, 8, 2);  // major 2 without features reads as major 1
  EXPECT_EQ(open_patched(), std::nullopt);
  put<uint16_t>(bytes_, 8, 0);
  EXPECT_EQ(open_patched(), ErrorKind::UnsupportedVersion);
}

// Rule 4.
TEST_F(Validation, Rule04_AlignmentThatIsZeroOddSmallOrHugeIsBadAlignment) {
  for (uint32_t a : {0u, 32u, 96u, 4095u, 2u << 20, 0x80000000u}) {
    put<uint32_t>(bytes_, 12, a);
    EXPECT_EQ(open_patched(), ErrorKind::BadAlignment) << a;
  }
}

// Rule 5.
TEST_F(Validation, Rule05_HeaderSizeOutOfRangeOrUnalignedIsBadHeaderSize) {
  for (uint64_t h : {uint64_t{0}, uint64_t{48}, uint64_t{170}, (uint64_t{1} << 30) + 8, ~uint64_t{0}}) {
    put<uint64_t>(bytes_, 16, h);
    EXPECT_EQ(open_patched(false), ErrorKind::BadHeaderSize) << h;
  }
}

// Rule 6.
TEST_F(Validation, Rule06_HeaderLongerThanTheFileIsTruncated) {
  bytes_.resize(100);
  EXPECT_EQ(open_patched(false), ErrorKind::Truncated);
}

// Rule 7.
TEST_F(Validation, Rule07_ChangedHeaderByteIsHeaderChecksumMismatch) {
  bytes_[kRecA + 32 + 8] = 'z';  // rename a to z without re-sealing
  EXPECT_EQ(open_patched(false), ErrorKind::HeaderChecksumMismatch);
}

TEST_F(Validation, Rule07_EverySingleBitFlipInTheHeaderFailsOpen) {
  const auto good = bytes_;
  for (size_t bit = 0; bit < kH * 8; ++bit) {
    bytes_ = good;
    bytes_[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
    ASSERT_NE(open_patched(false), std::nullopt) << "bit " << bit;
  }
}

// Rule 8.
TEST_F(Validation, Rule08_CountsLargerThanTheHeaderCanHoldAreTooManyEntries) {
  put<uint64_t>(bytes_, 24, 3);  // 3 * 40 + 16 > 168 - 56
  EXPECT_EQ(open_patched(), ErrorKind::TooManyEntries);
}

TEST_F(Validation, Rule08_CountsOverTheLimitsAreTooManyEntries) {
  put<uint64_t>(bytes_, 24, (uint64_t{1} << 24) + 1);
  EXPECT_EQ(open_patched(), ErrorKind::TooManyEntries);
  put<uint64_t>(bytes_, 24, 2);
  put<uint64_t>(bytes_, 32, ~uint64_t{0});
  EXPECT_EQ(open_patched(), ErrorKind::TooManyEntries);
}

// Rule 9.
TEST_F(Validation, Rule09_NonZeroReservedPreambleFieldIsNonZeroReserved) {
  put<uint64_t>(bytes_, 40, 1);
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
}

TEST_F(Validation, Rule09_NewerMinorVersionMayUseReservedFields) {
  put<uint16_t>(bytes_, 10, 7);
  put<uint64_t>(bytes_, 40, 1);
  put<uint16_t>(bytes_, kRecA + 6, 5);
  EXPECT_EQ(open_patched(), std::nullopt);
  EXPECT_EQ(File::open(path_).minor_version(), 7);
}

// Rule 10.
TEST_F(Validation, Rule10_RecordRunningPastTheHeaderIsMalformedHeader) {
  put<uint32_t>(bytes_, kRecB, 100);  // b's name would run past H - 8
  EXPECT_EQ(open_patched(), ErrorKind::MalformedHeader);
}

TEST_F(Validation, Rule10_MetadataRecordRunningPastTheHeaderIsMalformedHeader) {
  put<uint32_t>(bytes_, kMeta + 4, 1000);
  EXPECT_EQ(open_patched(), ErrorKind::MalformedHeader);
}

// Rule 11.
TEST_F(Validation, Rule11_NonZeroRecordReservedFieldIsNonZeroReserved) {
  put<uint16_t>(bytes_, kRecA + 6, 1);
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
}

TEST_F(Validation, Rule11_NonZeroNamePaddingIsNonZeroReserved) {
  bytes_[kRecA + 41] = 1;
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
}

TEST_F(Validation, Rule11_NonZeroMetadataPaddingIsNonZeroReserved) {
  bytes_[kMeta + 10] = 1;
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
}

// Rule 12.
TEST_F(Validation, Rule12_UnknownDtypeCodeIsUnknownDtype) {
  for (unsigned char code : {0, 18, 255}) {
    bytes_[kRecA + 4] = code;
    EXPECT_EQ(open_patched(), ErrorKind::UnknownDtype) << int(code);
  }
}

TEST_F(Validation, Rule12_UnknownDtypeInNewerMinorSaysSo) {
  put<uint16_t>(bytes_, 10, 3);
  bytes_[kRecA + 4] = 40;
  reseal(bytes_);
  const std::string message = open_message();
  EXPECT_NE(message.find("unknown dtype code 40"), std::string::npos) << message;
  EXPECT_NE(message.find("newer than this reader"), std::string::npos) << message;
}

// Rule 13.
TEST(ValidationRank, Rule13_RankAboveEightIsBadRank) {
  TempDir dir;
  const std::string path = dir.file("rank.tmap");
  // One record of rank 8 with an 8-byte name: 32 + 64 + 8 = 104 bytes. As rank 9 with a
  // name of length 0 it still fits exactly, so only the rank rule is broken.
  write_pattern_file(path, {{"abcdefgh", Dtype::U8, {1, 1, 1, 1, 1, 1, 1, 1}}}, {64, {}, false});
  auto b = read_bytes(path);
  b[48 + 5] = 9;
  put<uint32_t>(b, 48, 0);
  reseal(b);
  write_bytes(path, b);
  EXPECT_EQ(open_error(path), ErrorKind::BadRank);
}

// Rule 14.
class ValidationNames : public ::testing::Test {
 protected:
  // One tensor named "abcd" (record at 48, name at 48 + 40) and metadata {"wxyz": "1234"}.
  void SetUp() override {
    path_ = dir_.file("names.tmap");
    write_pattern_file(path_, {{"abcd", Dtype::U8, {1}}}, {64, {{"wxyz", "1234"}}, false});
    bytes_ = read_bytes(path_);
  }
  std::optional<ErrorKind> with_name(std::initializer_list<unsigned char> name, size_t at) {
    auto b = bytes_;
    std::copy(name.begin(), name.end(), b.begin() + static_cast<long>(at));
    reseal(b);
    write_bytes(path_, b);
    return open_error(path_);
  }
  static constexpr size_t kName = 88, kKey = 96 + 8, kValue = 96 + 12;
  TempDir dir_;
  std::string path_;
  std::vector<unsigned char> bytes_;
};

TEST_F(ValidationNames, Rule14_ValidUtf8NameIsAccepted) {
  EXPECT_EQ(with_name({0xC3, 0xA9, 'x', 'y'}, kName), std::nullopt);    // "éxy"
  EXPECT_EQ(with_name({0xF0, 0x9F, 0x98, 0x80}, kName), std::nullopt);  // U+1F600
}

TEST_F(ValidationNames, Rule14_InvalidUtf8NameIsBadName) {
  EXPECT_EQ(with_name({0xFF, 'b', 'c', 'd'}, kName), ErrorKind::BadName);
  EXPECT_EQ(with_name({0x80, 'b', 'c', 'd'}, kName), ErrorKind::BadName);  // lone continuation
  EXPECT_EQ(with_name({'a', 'b', 'c', 0xC3}, kName), ErrorKind::BadName);  // cut sequence
}

TEST_F(ValidationNames, Rule14_OverlongSurrogateAndTooHighCodePointsAreBadName) {
  EXPECT_EQ(with_name({0xC0, 0x80, 'c', 'd'}, kName), ErrorKind::BadName);
  EXPECT_EQ(with_name({0xED, 0xA0, 0x80, 'd'}, kName), ErrorKind::BadName);
  EXPECT_EQ(with_name({0xF4, 0x90, 0x80, 0x80}, kName), ErrorKind::BadName);
}

TEST_F(ValidationNames, Rule14_NulInNameIsBadName) {
  EXPECT_EQ(with_name({'a', 0, 'c', 'd'}, kName), ErrorKind::BadName);
}

TEST_F(ValidationNames, Rule14_InvalidMetadataKeyOrValueIsBadName) {
  EXPECT_EQ(with_name({0xFE}, kKey), ErrorKind::BadName);
  EXPECT_EQ(with_name({0xC0}, kValue), ErrorKind::BadName);
}

// Rule 15.
TEST_F(Validation, Rule15_ShapeWhoseBytesOverflowIsShapeOverflow) {
  put<uint64_t>(bytes_, kRecA + 32, uint64_t{1} << 62);  // F32: 2^64 bytes
  EXPECT_EQ(open_patched(), ErrorKind::ShapeOverflow);
}

TEST_F(Validation, Rule15_DimensionOf2To63IsShapeOverflowEvenBesideAZero) {
  TempDir dir;
  const std::string path = dir.file("zero.tmap");
  write_pattern_file(path, {{"z", Dtype::U8, {0, 5}}}, {64, {}, false});
  auto b = read_bytes(path);
  put<uint64_t>(b, 48 + 40, uint64_t{1} << 63);
  reseal(b);
  write_bytes(path, b);
  EXPECT_EQ(open_error(path), ErrorKind::ShapeOverflow);
}

// The product of the non-zero dimensions must fit, in any order: a zero dimension empties
// a tensor but excuses no overflow, so every valid shape fits any framework's size type.
TEST_F(Validation, Rule15_AZeroDimensionExcusesNoOverflowInAnyOrder) {
  TempDir dir;
  const std::string path = dir.file("zero.tmap");
  for (const auto& dims :
       {std::vector<uint64_t>{0, uint64_t{1} << 62, 4}, std::vector<uint64_t>{uint64_t{1} << 62, 4, 0}}) {
    write_pattern_file(path, {{"z", Dtype::U8, {0, 1, 1}}}, {64, {}, false});
    auto b = read_bytes(path);
    for (size_t d = 0; d < 3; ++d) put<uint64_t>(b, 48 + 32 + 8 * d, dims[d]);
    reseal(b);
    write_bytes(path, b);
    EXPECT_EQ(open_error(path), ErrorKind::ShapeOverflow) << dims[0] << " " << dims[1] << " " << dims[2];
  }
  write_pattern_file(path, {{"z", Dtype::F32, {uint64_t{1} << 40, 0, uint64_t{1} << 20}}}, {64, {}, false});
  EXPECT_EQ(File::open(path).at("z").byte_length, 0u);  // 2^60 * 4 bytes would fit: valid
}

// Rule 16.
TEST_F(Validation, Rule16_ByteLengthDisagreeingWithShapeIsLengthMismatch) {
  put<uint64_t>(bytes_, kRecA + 16, 9);
  EXPECT_EQ(open_patched(), ErrorKind::LengthMismatch);
}

// Rule 17.
TEST_F(Validation, Rule17_HoleBeforeATensorIsBadOffset) {
  put<uint64_t>(bytes_, kRecB + 8, kDataB + 64);
  EXPECT_EQ(open_patched(), ErrorKind::BadOffset);
}

TEST_F(Validation, Rule17_OverlappingTensorIsBadOffset) {
  put<uint64_t>(bytes_, kRecB + 8, kDataA);
  EXPECT_EQ(open_patched(), ErrorKind::BadOffset);
}

TEST_F(Validation, Rule17_FirstTensorNotRightAfterTheHeaderIsBadOffset) {
  put<uint64_t>(bytes_, kRecA + 8, 0);
  EXPECT_EQ(open_patched(), ErrorKind::BadOffset);
}

// Format 2.0, aliases (spec section 3.1): a (F32 [2]), t an alias of a, b (U8 [3]).
//   [48,96) record a | [96,144) record t | [144,192) record b | [192,208) metadata k
//   [208,216) checksum, H = 216 | a (and t) at 256 | b at 320 | size 384
class Aliases : public ::testing::Test {
 protected:
  static constexpr size_t kRecA = 48, kRecT = 96, kRecB = 144;
  void SetUp() override {
    path_ = dir_.file("tied.tmap");
    TensorSpec t{"t", Dtype::F32, {2}};
    t.alias_of = "a";
    write_pattern_file(path_, {{"a", Dtype::F32, {2}}, t, {"b", Dtype::U8, {3}}}, {64, {{"k", "v"}}, false});
    bytes_ = read_bytes(path_);
    ASSERT_EQ(bytes_.size(), 384u);
  }
  std::optional<ErrorKind> open_patched() {
    reseal(bytes_);
    write_bytes(path_, bytes_);
    return open_error(path_);
  }
  TempDir dir_;
  std::string path_;
  std::vector<unsigned char> bytes_;
};

TEST_F(Aliases, AnAliasIsFormat2WithTheAliasesFeatureAndNamesItsTargetsBytes) {
  EXPECT_EQ(get<uint16_t>(bytes_, 8), 2);          // major
  EXPECT_EQ(get<uint64_t>(bytes_, 40), 1u);        // features: aliases
  EXPECT_EQ(get<uint16_t>(bytes_, kRecT + 6), 1);  // flags: alias
  EXPECT_EQ(get<uint16_t>(bytes_, kRecA + 6), 0);
  const File f = File::open(path_);
  EXPECT_EQ(f.major_version(), 2);
  const TensorEntry& a = f.at("a");
  const TensorEntry& t = f.at("t");
  EXPECT_FALSE(a.alias_of.has_value());
  ASSERT_EQ(t.alias_of, std::optional<uint32_t>(0));
  EXPECT_EQ(t.offset, a.offset);
  EXPECT_EQ(t.checksum, a.checksum);
  EXPECT_EQ(f.bytes(t).data, f.bytes(a).data);
  EXPECT_NO_THROW(f.verify());
  const Checkpoint c = Checkpoint::open(path_);
  EXPECT_EQ(c.alias_of("t"), std::optional<std::string>("a"));
  EXPECT_EQ(c.alias_of("b"), std::nullopt);
}

TEST_F(Aliases, Rule03And09_AMajorOrAFeatureThisReaderDoesNotKnowIsUnsupported) {
  put<uint16_t>(bytes_, 8, 3);
  EXPECT_EQ(open_patched(), ErrorKind::UnsupportedVersion);
  put<uint16_t>(bytes_, 8, 2);
  put<uint64_t>(bytes_, 40, 3);  // aliases and an unknown feature
  EXPECT_EQ(open_patched(), ErrorKind::UnsupportedVersion);
  put<uint16_t>(bytes_, 10, 9);  // whatever the minor: a feature cannot be skipped
  EXPECT_EQ(open_patched(), ErrorKind::UnsupportedVersion);
}

TEST_F(Aliases, Rule11_AnAliasFlagWithoutTheFeatureOrInMajor1IsNonZeroReserved) {
  put<uint64_t>(bytes_, 40, 0);  // major 2 without the aliases feature
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
  put<uint16_t>(bytes_, 8, 1);  // a reader of 1.0 reads the flag as a reserved field
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
  put<uint16_t>(bytes_, 8, 2);
  put<uint64_t>(bytes_, 40, 1);
  put<uint16_t>(bytes_, kRecT + 6, 3);  // an unknown flag bit beside the alias flag
  EXPECT_EQ(open_patched(), ErrorKind::NonZeroReserved);
  put<uint16_t>(bytes_, 10, 1);  // ... is read as zero in a newer minor
  EXPECT_EQ(open_patched(), std::nullopt);
}

TEST_F(Aliases, Rule17_AnAliasOfNothingOfALaterRecordOrOfADifferentTensorIsBadAlias) {
  const auto original = bytes_;
  put<uint64_t>(bytes_, kRecT + 8, 264);  // inside a, where no tensor starts
  EXPECT_EQ(open_patched(), ErrorKind::BadAlias);
  bytes_ = original;
  put<uint64_t>(bytes_, kRecT + 8, 320);  // b's offset: b comes later (and is U8)
  EXPECT_EQ(open_patched(), ErrorKind::BadAlias);
  bytes_ = original;
  put<uint64_t>(bytes_, kRecT + 24, get<uint64_t>(bytes_, kRecT + 24) ^ 1);  // checksum differs
  EXPECT_EQ(open_patched(), ErrorKind::BadAlias);
  bytes_ = original;
  bytes_[kRecT + 4] = static_cast<unsigned char>(Dtype::I32);  // dtype differs
  EXPECT_EQ(open_patched(), ErrorKind::BadAlias);
  bytes_ = original;
  put<uint64_t>(bytes_, kRecT + 32, 0);  // shape [0], length 0: an empty alias
  put<uint64_t>(bytes_, kRecT + 16, 0);
  EXPECT_EQ(open_patched(), ErrorKind::BadAlias);
  bytes_ = original;
  put<uint16_t>(bytes_, kRecA + 6, 1);  // the first record an alias: nothing before it
  EXPECT_EQ(open_patched(), ErrorKind::BadAlias);
  bytes_ = original;
  put<uint16_t>(bytes_, kRecT + 6, 0);  // t no alias: then it must have bytes of its own
  EXPECT_EQ(open_patched(), ErrorKind::BadOffset);
}

// Rule 18.
TEST_F(Validation, Rule18_UnusedBytesBeforeTheChecksumAreMalformedHeader) {
  put<uint64_t>(bytes_, 32, 0);  // drop the metadata record from the count
  EXPECT_EQ(open_patched(), ErrorKind::MalformedHeader);
}

// Rule 19.
TEST_F(Validation, Rule19_RepeatedTensorNameIsDuplicateName) {
  bytes_[kRecB + 40] = 'a';
  EXPECT_EQ(open_patched(), ErrorKind::DuplicateName);
}

TEST(ValidationDuplicates, Rule19_RepeatedMetadataKeyIsDuplicateName) {
  TempDir dir;
  const std::string path = dir.file("dupmeta.tmap");
  write_pattern_file(path, {}, {64, {{"k1", "x"}, {"k2", "y"}}, false});
  auto b = read_bytes(path);
  ASSERT_EQ(b[48 + 8 + 1], '1');
  b[64 + 8 + 1] = '1';
  reseal(b);
  write_bytes(path, b);
  EXPECT_EQ(open_error(path), ErrorKind::DuplicateName);
}

// Rule 20.
TEST_F(Validation, Rule20_FileEndingInsideATensorIsTruncatedNamingIt) {
  bytes_.resize(196);
  const std::string message = open_message();
  EXPECT_EQ(open_patched(false), ErrorKind::Truncated);
  EXPECT_NE(message.find("base.tmap: tensor 'a' ends at 200, past the end of the file (196)"), std::string::npos)
      << message;
}

TEST_F(Validation, Rule20_FileEndingInsideTheLastPaddingIsTruncated) {
  bytes_.resize(kSize - 1);
  EXPECT_EQ(open_patched(false), ErrorKind::Truncated);
}

TEST_F(Validation, Rule20_BytesAfterTheLastPaddingAreTrailingBytes) {
  bytes_.push_back(0);
  EXPECT_EQ(open_patched(false), ErrorKind::TrailingBytes);
}

TEST_F(Validation, TruncationAtEveryLengthFailsOpen) {
  const auto good = bytes_;
  for (size_t size = 0; size < kSize; ++size) {
    bytes_.assign(good.begin(), good.begin() + static_cast<long>(size));
    ASSERT_NE(open_patched(false), std::nullopt) << size;
  }
}

// Rule 21.
TEST_F(Validation, Rule21_NonZeroByteInTensorPaddingIsFoundByVerify) {
  bytes_[kDataA + 8] = 1;
  EXPECT_EQ(verify_patched(), ErrorKind::NonZeroPadding);
}

TEST_F(Validation, Rule21_NonZeroByteAfterTheHeaderIsFoundByVerify) {
  bytes_[kH + 3] = 1;
  EXPECT_EQ(verify_patched(), ErrorKind::NonZeroPadding);
}

// Rule 22.
TEST_F(Validation, Rule22_FlippedDataBitIsChecksumMismatchNamingTheTensor) {
  bytes_[kDataB + 1] ^= 0x10;
  write_bytes(path_, bytes_);
  const File f = File::open(path_);  // open reads no data: it still succeeds
  try {
    f.verify();
    FAIL() << "verify accepted a corrupted tensor";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::ChecksumMismatch);
    EXPECT_NE(std::string(e.what()).find("tensor 'b'"), std::string::npos) << e.what();
  }
}

TEST_F(Validation, Rule22_EveryBitFlipInTensorDataIsFound) {
  const auto good = bytes_;
  for (size_t at : {kDataA, kDataA + 7, kDataB, kDataB + 2}) {
    for (int bit = 0; bit < 8; ++bit) {
      bytes_ = good;
      bytes_[at] ^= static_cast<unsigned char>(1 << bit);
      write_bytes(path_, bytes_);
      const auto problems = File::open(path_).find_corruption();
      ASSERT_EQ(problems.size(), 1u) << at << ":" << bit;
      EXPECT_EQ(problems[0].kind(), ErrorKind::ChecksumMismatch);
    }
  }
}

TEST_F(Validation, FindCorruptionListsEveryBadTensor) {
  bytes_[kDataA] ^= 1;
  bytes_[kDataB] ^= 1;
  write_bytes(path_, bytes_);
  EXPECT_EQ(File::open(path_).find_corruption().size(), 2u);
}

// Hostile input in general.
TEST(ValidationHostile, RandomBytesNeverCrashOpen) {
  TempDir dir;
  const std::string path = dir.file("random.bin");
  std::mt19937_64 rng(42);
  for (int round = 0; round < 300; ++round) {
    std::vector<unsigned char> b(56 + rng() % 2000);
    for (auto& x : b) x = static_cast<unsigned char>(rng());
    if (round % 2 == 0) std::memcpy(b.data(), format::kMagic, 8);  // get past rule 2
    if (round % 4 == 0) {
      put<uint16_t>(b, 8, 1);
      put<uint32_t>(b, 12, 64);
      put<uint64_t>(b, 16, std::min<uint64_t>(b.size(), 56 + 8 * (rng() % 200)) & ~7ull);
      reseal(b);  // get past rule 7, into the record parser
    }
    write_bytes(path, b);
    EXPECT_NE(open_error(path), std::nullopt);
  }
}

TEST(ValidationHostile, MissingFileAndDirectoryAreIoErrors) {
  TempDir dir;
  EXPECT_EQ(open_error(dir.file("absent.tmap")), ErrorKind::Io);
  EXPECT_EQ(open_error(dir.path().string()), ErrorKind::Io);
}

}  // namespace
}  // namespace tensormap::testing
