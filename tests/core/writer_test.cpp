// The writer: declarations are validated, bytes are checked, and a write either lands
// completely or leaves the destination exactly as it was, with no temporary file behind.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <random>

#include "support.h"

namespace tensormap::testing {
namespace {

std::optional<ErrorKind> construct_error(const std::vector<TensorSpec>& specs,
                                         WriterOptions options = {}) {
  TempDir dir;
  try {
    Writer w(dir.file("x.tmap"), specs, options);
  } catch (const Error& e) {
    return e.kind();
  }
  return std::nullopt;
}

TEST(WriterDeclarations, RejectsNamesTheReaderWouldReject) {
  EXPECT_EQ(construct_error({{"", Dtype::U8, {1}}}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({{std::string(4097, 'n'), Dtype::U8, {1}}}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({{std::string(4096, 'n'), Dtype::U8, {1}}}), std::nullopt);
  EXPECT_EQ(construct_error({{"bad\xff", Dtype::U8, {1}}}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({{std::string("nul\0x", 5), Dtype::U8, {1}}}), ErrorKind::InvalidArgument);
}

TEST(WriterDeclarations, RejectsDuplicateNames) {
  EXPECT_EQ(construct_error({{"a", Dtype::U8, {1}}, {"a", Dtype::F32, {1}}}),
            ErrorKind::InvalidArgument);
}

TEST(WriterDeclarations, RejectsRankAboveEightAndOverflowingShapes) {
  EXPECT_EQ(construct_error({{"a", Dtype::U8, std::vector<uint64_t>(9, 1)}}),
            ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({{"a", Dtype::F64, {uint64_t{1} << 40, uint64_t{1} << 30}}}),
            ErrorKind::InvalidArgument);
}

TEST(WriterDeclarations, RejectsBadAlignments) {
  for (uint64_t a : {0u, 32u, 100u, 2u << 20}) {
    EXPECT_EQ(construct_error({}, {a, {}, true}), ErrorKind::InvalidArgument) << a;
  }
}

TEST(WriterDeclarations, RejectsBadOrRepeatedMetadataKeys) {
  EXPECT_EQ(construct_error({}, {4096, {{"k", "1"}, {"k", "2"}}, true}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({}, {4096, {{"", "1"}}, true}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({}, {4096, {{"k", "\xc0"}}, true}), ErrorKind::InvalidArgument);
}

TEST(WriterDeclarations, RejectsUnknownDtypeCode) {
  EXPECT_EQ(construct_error({{"a", static_cast<Dtype>(99), {1}}}), ErrorKind::InvalidArgument);
}

TEST(WriterBytes, RefusesBytesPastTheCurrentTensor) {
  TempDir dir;
  Writer w(dir.file("x.tmap"), {{"a", Dtype::U8, {4}}}, {});
  const unsigned char data[8] = {};
  try {
    w.write(data, 5);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'a' takes 4 more bytes, got 5"), std::string::npos)
        << e.what();
  }
  w.write(data, 4);
  EXPECT_THROW(w.write(data, 1), Error);
}

TEST(WriterBytes, WriteTensorWantsTheWholeTensor) {
  TempDir dir;
  Writer w(dir.file("x.tmap"), {{"a", Dtype::U8, {4}}}, {});
  const unsigned char data[4] = {};
  EXPECT_THROW(w.write_tensor(data, 3), Error);
  w.write(data, 1);
  EXPECT_THROW(w.write_tensor(data, 4), Error);
}

TEST(WriterAtomicity, DestroyingBeforeCommitKeepsTheOldFileAndLeavesNoTemp) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"old", Dtype::U8, {10}}});
  const auto before = read_bytes(path);
  {
    Writer w(path, {{"new", Dtype::U8, {4}}, {"more", Dtype::U8, {4}}}, {});
    const unsigned char data[4] = {1, 2, 3, 4};
    w.write(data, 4);
    EXPECT_EQ(dir.entries().size(), 2u) << "the temp file exists while writing";
  }
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
}

TEST(WriterAtomicity, CommitWithAMissingTensorFailsAndKeepsTheOldFile) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"old", Dtype::U8, {10}}});
  const auto before = read_bytes(path);
  Writer w(path, {{"new", Dtype::U8, {4}}, {"more", Dtype::U8, {4}}}, {});
  const unsigned char data[4] = {1, 2, 3, 4};
  w.write(data, 4);
  w.write(data, 2);
  try {
    w.commit();
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'more' received 2 of its 4 bytes"), std::string::npos)
        << e.what();
  }
  w.abandon();
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
}

// A write that the system refuses midway (here: the file-size limit) must leave the
// destination intact and remove the temporary file. Run in a child, because the limit
// and the ignored SIGXFSZ are process-wide.
TEST(WriterAtomicity, IoFailureMidwayKeepsTheOldFileAndLeavesNoTemp) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"old", Dtype::U8, {10}}});
  const auto before = read_bytes(path);

  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit limit{1 << 20, 1 << 20};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    std::vector<unsigned char> big(512 * 1024, 7);
    try {
      Writer w(path, {{"a", Dtype::U8, {big.size()}}, {"b", Dtype::U8, {big.size()}},
                      {"c", Dtype::U8, {big.size()}}}, {});
      for (int i = 0; i < 3; ++i) w.write_tensor(big.data(), big.size());
      w.commit();
    } catch (const Error& e) {
      ::_exit(e.kind() == ErrorKind::Io ? 0 : 2);
    }
    ::_exit(1);  // the write should not have succeeded
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: no error at all, 2: wrong error kind";
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
}

TEST(WriterAtomicity, WriterIsUnusableAfterAFailedWrite) {
  TempDir dir;
  Writer w(dir.file("x.tmap"), {{"a", Dtype::U8, {4}}}, {});
  const unsigned char data[4] = {};
  EXPECT_THROW(w.write(data, 5), Error);  // refused before anything was written
  w.write(data, 4);                       // so the writer is still fine
  w.commit();
  EXPECT_THROW(w.commit(), Error) << "a second commit is refused";
}

TEST(WriterAtomicity, ReplacingAMappedFileLeavesTheOldMappingIntact) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {100}}});
  const File old = File::open(path);
  {
    std::vector<unsigned char> other(100, 0xEE);
    Writer w(path, {{"a", Dtype::U8, {100}}}, {});
    w.write_tensor(other.data(), other.size());
    w.commit();
  }
  EXPECT_EQ(static_cast<unsigned char>(old.bytes(old.at("a")).data[5]), 5);
  old.verify();
  const File fresh = File::open(path);
  EXPECT_EQ(static_cast<unsigned char>(fresh.bytes(fresh.at("a")).data[5]), 0xEE);
}

TEST(WriterPermissions, ReplacingAFileKeepsItsMode) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {1}}});
  ASSERT_EQ(::chmod(path.c_str(), 0640), 0);
  write_pattern_file(path, {{"b", Dtype::U8, {1}}});
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
}

TEST(WriterPermissions, NewFileGetsTheUmaskDefault) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  const mode_t old = ::umask(022);
  write_pattern_file(path, {{"a", Dtype::U8, {1}}});
  ::umask(old);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u);
}

TEST(WriterErrors, MissingDirectoryIsAnIoErrorNamingThePath) {
  TempDir dir;
  try {
    Writer w(dir.file("no/such/dir/x.tmap"), {}, {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_NE(std::string(e.what()).find("no/such/dir"), std::string::npos) << e.what();
  }
}

// kill -9 at random moments while a child process saves over a file, again and again,
// alternating two versions: the destination must always be one of them, complete.
TEST(CrashSafety, KillDashNineDuringSavesLeavesTheOldOrTheNewFileWhole) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  auto version = [](uint64_t size) {
    return std::vector<TensorSpec>{{"a", Dtype::U8, {size}}, {"b", Dtype::U8, {size / 2}}};
  };
  auto save = [&](unsigned char fill, uint64_t size) {
    WriterOptions options;
    options.sync = false;  // a process crash, not a power cut: the page cache survives
    Writer w(path, version(size), options);
    std::vector<unsigned char> data(size, fill);
    w.write(data.data(), size);
    w.write(data.data(), size / 2);
    w.commit();
  };
  save('A', 1 << 20);
  const auto old_bytes = read_bytes(path);
  save('B', 3 << 19);
  const auto new_bytes = read_bytes(path);

  std::mt19937 rng(7);
  constexpr int kTrials = 60;
  int saw_old = 0, saw_new = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (int i = 0;; ++i) save(i % 2 ? 'B' : 'A', i % 2 ? (3 << 19) : (1 << 20));
    }
    ::usleep(std::uniform_int_distribution<unsigned>(0, 30000)(rng));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    const auto now = read_bytes(path);
    ASSERT_TRUE(now == old_bytes || now == new_bytes) << "trial " << trial << ": a torn file of " << now.size() << " bytes";
    (now == old_bytes ? saw_old : saw_new)++;
    File::open(path).verify();
  }
  EXPECT_EQ(saw_old + saw_new, kTrials);
  // A killed writer cannot remove its temporary file; such leftovers are never the destination.
  for (const auto& name : dir.entries()) {
    EXPECT_TRUE(name == "model.tmap" || name.rfind(".model.tmap.tmp-", 0) == 0) << name;
  }
}

TEST(ShardedWriter, SplitsAtTheShardSizeAndWritesAnIndexLast) {
  TempDir dir;
  const std::string index_path = dir.file("model.tmap.index.json");
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 5; ++i) specs.push_back({"t" + std::to_string(i), Dtype::U8, {400}});
  specs.push_back({"big", Dtype::U8, {5000}});  // larger than a shard: a shard of its own
  {
    ShardedWriter w(index_path, specs, 1000, {4096, {}, false});
    EXPECT_EQ(w.shard_count(), 4u);  // [t0 t1] [t2 t3] [t4] [big]
    for (size_t i = 0; i < specs.size(); ++i) {
      std::vector<unsigned char> data(w.byte_length(i), static_cast<unsigned char>(i));
      w.write_tensor(data.data(), data.size());
    }
    EXPECT_FALSE(std::filesystem::exists(index_path)) << "no index before commit";
    w.commit();
  }
  const ShardIndex index = ShardIndex::open(index_path);
  EXPECT_EQ(index.shard_files(), (std::vector<std::string>{"model-00001-of-00004.tmap", "model-00002-of-00004.tmap",
                                                           "model-00003-of-00004.tmap", "model-00004-of-00004.tmap"}));
  EXPECT_EQ(index.total_size(), 7000u);
  EXPECT_EQ(index.weight_map()[5], (std::pair<std::string, uint32_t>{"big", 3}));
  const File last = File::open(index.shard_path(3));
  EXPECT_EQ(static_cast<unsigned char>(last.bytes(last.at("big")).data[0]), 5);
  last.verify();
}

TEST(ShardedWriter, AFailureBeforeCommitLeavesNothingBehind) {
  TempDir dir;
  {
    ShardedWriter w(dir.file("model.tmap.index.json"), {{"a", Dtype::U8, {10}}, {"b", Dtype::U8, {10}}}, 10);
    const unsigned char data[10] = {};
    w.write_tensor(data, 10);
  }  // destroyed before commit
  EXPECT_TRUE(dir.entries().empty());
}

TEST(ShardedWriter, RefusesAnIndexNameWithoutIndexJson) {
  TempDir dir;
  EXPECT_THROW(ShardedWriter(dir.file("model.tmap"), {}, 100), Error);
}

TEST(ShardIndex, RejectsMalformedIndexes) {
  TempDir dir;
  for (const char* json : {"[]", "{}", R"({"weight_map": []})", R"({"weight_map": {"a": 1}})",
                           R"({"weight_map": {"a": "/etc/passwd"}})", R"({"weight_map": {"a": ".."}})", "{"}) {
    write_bytes(dir.file("i.index.json"), std::vector<unsigned char>(json, json + std::strlen(json)));
    try {
      ShardIndex::open(dir.file("i.index.json"));
      ADD_FAILURE() << json;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::ShardIndexInvalid) << json;
    }
  }
}

}  // namespace
}  // namespace tensormap::testing
