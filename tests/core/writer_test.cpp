// The writer: declarations are validated, bytes are checked, and a write either lands
// completely or leaves the destination exactly as it was, with no temporary file behind.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <future>
#include <random>
#include <set>
#include <thread>

#include "../../src/core/io/path_lock.h"
#include "../../src/core/io/posix_io.h"
#include "support.h"

namespace tensormap::testing {
namespace {

// Set by the ctest run that repeats the writer tests with named temporary files, the
// fallback for filesystems without O_TMPFILE.
bool named_temporaries() {
  const char* v = std::getenv("TENSORMAP_NAMED_TEMPORARIES");
  return v != nullptr && v[0] == '1';
}

std::optional<ErrorKind> construct_error(const std::vector<TensorSpec>& specs, WriterOptions options = {}) {
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
  EXPECT_EQ(construct_error({{"a", Dtype::U8, {1}}, {"a", Dtype::F32, {1}}}), ErrorKind::InvalidArgument);
}

TEST(WriterDeclarations, RejectsRankAboveEightAndOverflowingShapes) {
  EXPECT_EQ(construct_error({{"a", Dtype::U8, std::vector<uint64_t>(9, 1)}}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({{"a", Dtype::F64, {uint64_t{1} << 40, uint64_t{1} << 30}}}), ErrorKind::InvalidArgument);
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

TensorSpec alias(std::string name, Dtype dtype, std::vector<uint64_t> shape, std::string of) {
  TensorSpec t{std::move(name), dtype, std::move(shape)};
  t.alias_of = std::move(of);
  return t;
}

TEST(WriterDeclarations, AnAliasMustNameAnEarlierNonEmptyTensorOfItsDtypeAndShape) {
  const TensorSpec a{"a", Dtype::F32, {2, 3}};
  EXPECT_EQ(construct_error({a, alias("t", Dtype::F32, {2, 3}, "a")}), std::nullopt);
  EXPECT_EQ(construct_error({alias("t", Dtype::F32, {2, 3}, "a"), a}), ErrorKind::InvalidArgument);  // later
  EXPECT_EQ(construct_error({a, alias("t", Dtype::F32, {2, 3}, "t")}), ErrorKind::InvalidArgument);  // itself
  EXPECT_EQ(construct_error({a, alias("t", Dtype::F32, {2, 3}, "nope")}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({a, alias("t", Dtype::F32, {3, 2}, "a")}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({a, alias("t", Dtype::I32, {2, 3}, "a")}), ErrorKind::InvalidArgument);
  EXPECT_EQ(construct_error({{"e", Dtype::F32, {0}}, alias("t", Dtype::F32, {0}, "e")}), ErrorKind::InvalidArgument);
  // An alias of an alias names the first tensor's bytes.
  EXPECT_EQ(construct_error({a, alias("t", Dtype::F32, {2, 3}, "a"), alias("u", Dtype::F32, {2, 3}, "t")}),
            std::nullopt);
  // Formats that cannot say "these bytes again" refuse aliases instead of writing them twice.
  WriterOptions safetensors;
  safetensors.format = Format::Safetensors;
  EXPECT_FALSE(supports_aliases(safetensors));
  EXPECT_EQ(construct_error({a, alias("t", Dtype::F32, {2, 3}, "a")}, safetensors), ErrorKind::InvalidArgument);
  WriterOptions sharded;
  sharded.shard_size = 1 << 20;
  EXPECT_FALSE(supports_aliases(sharded));
  TempDir dir;
  EXPECT_THROW(open_writer(dir.file("m.tmap.index.json"), {a, alias("t", Dtype::F32, {2, 3}, "a")}, sharded), Error);
  EXPECT_TRUE(supports_aliases(WriterOptions{}));
}

TEST(WriterAliases, TiedTensorsAreStoredOnceInTensormapAndTorchSaveAndReadBackTied) {
  TempDir dir;
  const std::vector<TensorSpec> specs = {
      {"emb", Dtype::F32, {256, 64}}, {"mid", Dtype::U8, {3}}, alias("head", Dtype::F32, {256, 64}, "emb")};
  for (const Format format : {Format::Tensormap, Format::TorchSave}) {
    WriterOptions options;
    options.format = format;
    const std::string path = dir.file(std::string("tied-") + format_name(format));
    write_pattern_file(path, specs, options);  // head receives no bytes
    const Checkpoint c = Checkpoint::open(path);
    EXPECT_EQ(c.alias_of("head"), std::optional<std::string>("emb")) << format_name(format);
    EXPECT_EQ(c.alias_of("emb"), std::nullopt);
    std::vector<unsigned char> emb(c.info("emb").byte_length), head(c.info("head").byte_length);
    c.read("emb", emb.data());
    c.read("head", head.data());
    EXPECT_EQ(emb, head);
    EXPECT_LT(std::filesystem::file_size(path), 2 * emb.size()) << "the bytes are stored once";
  }
  // Without an alias the file stays format 1.0, which every reader reads.
  write_pattern_file(dir.file("plain.tmap"), {specs[0], specs[1]});
  EXPECT_EQ(File::open(dir.file("plain.tmap")).major_version(), 1);
  // Converted where aliases exist they stay; to safetensors each name gets its bytes.
  convert(dir.file("tied-tensormap"), dir.file("again.pt"));
  EXPECT_EQ(Checkpoint::open(dir.file("again.pt")).alias_of("head"), std::optional<std::string>("emb"));
  convert(dir.file("tied-torch.save"), dir.file("again.tmap"));
  EXPECT_EQ(File::open(dir.file("again.tmap")).at("head").alias_of, std::optional<uint32_t>(0));
  convert(dir.file("again.tmap"), dir.file("two.safetensors"));
  const File st = File::open(dir.file("two.safetensors"));
  EXPECT_NE(st.at("head").offset, st.at("emb").offset);
  EXPECT_EQ(std::memcmp(st.bytes(st.at("head")).data, st.bytes(st.at("emb")).data, st.at("emb").byte_length), 0);
  convert(dir.file("two.safetensors"), dir.file("untied.tmap"));
  EXPECT_EQ(File::open(dir.file("untied.tmap")).major_version(), 1);
}

TEST(Editor, AnAliasStaysOneWhileItsTargetStaysAndKeepsItsBytesOtherwise) {
  TempDir dir;
  const std::string path = dir.file("tied.tmap");
  write_pattern_file(path, {{"emb", Dtype::U8, {64}}, alias("head", Dtype::U8, {64}, "emb"), {"x", Dtype::U8, {4}}});
  const auto emb = [&] {
    const File f = File::open(path);
    const ByteView v = f.bytes(f.at("emb"));
    return std::vector<std::byte>(v.data, v.data + v.size);
  }();
  {
    Editor editor = Editor::open(path);
    editor.remove("x");
    editor.commit();
    EXPECT_EQ(File::open(path).at("head").alias_of, std::optional<uint32_t>(0));
  }
  {
    Editor editor = Editor::open(path);
    editor.remove("emb");
    editor.commit();
    const File f = File::open(path);
    EXPECT_EQ(f.major_version(), 1);
    EXPECT_FALSE(f.at("head").alias_of.has_value());
    const ByteView head = f.bytes(f.at("head"));
    EXPECT_EQ(std::vector<std::byte>(head.data, head.data + head.size), emb);
    EXPECT_NO_THROW(f.verify());
  }
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
    EXPECT_NE(std::string(e.what()).find("'a' takes 4 more bytes, got 5"), std::string::npos) << e.what();
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
    // Named while writing only where it must be; otherwise nameless until commit.
    EXPECT_EQ(dir.entries().size(), named_temporaries() ? 2u : 1u);
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
    EXPECT_NE(std::string(e.what()).find("'more' received 2 of its 4 bytes"), std::string::npos) << e.what();
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
      Writer w(path, {{"a", Dtype::U8, {big.size()}}, {"b", Dtype::U8, {big.size()}}, {"c", Dtype::U8, {big.size()}}},
               {});
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

// --- Editor: add, replace and remove tensors of a file ------------------------------------

std::vector<unsigned char> tensor_bytes(const File& f, std::string_view name) {
  const auto v = f.bytes(f.at(name));
  return {reinterpret_cast<const unsigned char*>(v.data), reinterpret_cast<const unsigned char*>(v.data) + v.size};
}

TEST(Editor, AddsReplacesAndRemovesAndKeepsTheOtherTensorsBytesAndChecksums) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  WriterOptions options;
  options.alignment = 256;
  options.metadata = {{"epoch", "3"}, {"drop", "me"}};
  write_pattern_file(
      path, {{"a", Dtype::U8, {100}}, {"b", Dtype::F32, {4, 5}}, {"c", Dtype::I16, {7}}, {"empty", Dtype::F32, {0, 3}}},
      options);
  const File old = File::open(path);
  const auto a_before = tensor_bytes(old, "a"), c_before = tensor_bytes(old, "c");
  const std::string other = dir.file("other.safetensors");
  write_pattern_file(other, {{"x", Dtype::BF16, {3}}}, WriterOptions{4096, {}, false, Format::Safetensors});
  const Checkpoint source = Checkpoint::open(other);

  Editor e = Editor::open(path);
  const std::vector<float> b_new(6, 2.5f);
  e.put({"b", Dtype::F32, {2, 3}}, b_new.data());  // replaced, with a new shape
  e.remove("c");
  e.put(source, "x", "added.x");
  e.set_metadata("epoch", "4");
  e.set_metadata("drop", "");
  EXPECT_THROW(e.remove("nope"), Error);
  const EditReport r = e.commit(/*sync=*/false);
  EXPECT_EQ(r.kept, 2u);  // a and empty
  EXPECT_EQ(r.kept_bytes, 100u);
  EXPECT_EQ(r.written, 2u);
  EXPECT_EQ(r.removed, 1u);

  const File f = File::open(path);
  f.verify();  // every checksum matches, the kept ones carried over
  std::vector<std::string> names;
  for (const auto& t : f.tensors()) names.emplace_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"a", "b", "empty", "added.x"})) << "file order, new last";
  EXPECT_EQ(f.alignment(), 256u);
  EXPECT_EQ(tensor_bytes(f, "a"), a_before);
  EXPECT_EQ(f.at("a").checksum, old.at("a").checksum);
  EXPECT_EQ(f.at("b").rank, 2);
  std::vector<unsigned char> b_bytes(24);
  std::memcpy(b_bytes.data(), b_new.data(), 24);
  EXPECT_EQ(tensor_bytes(f, "b"), b_bytes);
  EXPECT_EQ(f.at("added.x").dtype, Dtype::BF16);
  EXPECT_EQ(tensor_bytes(f, "added.x"), (std::vector<unsigned char>{0, 1, 2, 3, 4, 5}));
  ASSERT_EQ(f.metadata().size(), 1u);
  EXPECT_EQ(f.metadata()[0].first, "epoch");
  EXPECT_EQ(f.metadata()[0].second, "4");
  // The old mapping still holds the old file.
  EXPECT_EQ(tensor_bytes(old, "c"), c_before);
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model.tmap", "other.safetensors"}));
  EXPECT_THROW(e.commit(), Error) << "an Editor commits once";
}

TEST(Editor, AFailedCommitLeavesTheFileAsItWasAndNoTemporary) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {100}}});
  const auto before = read_bytes(path);
  Editor e = Editor::open(path);
  const unsigned char data[4] = {};
  e.put({"", Dtype::U8, {4}}, data);  // a name the format refuses
  EXPECT_THROW(e.commit(), Error);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
}

TEST(Editor, AFileThatShrankSinceItWasOpenedIsTruncatedNotSigbusAndNothingIsLeft) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {100000}}, {"b", Dtype::U8, {10}}});
  Editor e = Editor::open(path);
  e.remove("b");
  ASSERT_EQ(::truncate(path.c_str(), 8192), 0);  // another process cuts the file short
  try {
    e.commit(false);
    FAIL() << "the edit copied bytes that are gone";
  } catch (const Error& err) {
    EXPECT_EQ(err.kind(), ErrorKind::Truncated) << err.what();
    EXPECT_NE(std::string(err.what()).find("'a'"), std::string::npos) << err.what();
  }
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
}

TEST(Editor, RefusesFilesOfOtherFormatsAndNamesTheFile) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_pattern_file(path, {{"a", Dtype::U8, {10}}}, WriterOptions{4096, {}, false, Format::Safetensors});
  try {
    Editor::open(path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

// The bytes that stay never pass through the process: removing a small tensor from a
// file with a 512 MiB one grows the peak by far less than that tensor.
// --- Editor: one edit of a file at a time (Boost.Interprocess file_lock, path_lock.h) --

std::string metadata_of(const std::string& path, const std::string& key) {
  const File file = File::open(path);  // metadata() views the file's bytes
  for (const auto& [k, v] : file.metadata()) {
    if (k == key) return std::string(v);
  }
  return "";
}

// Opens an Editor of `path`, then says so on `ready` (a pipe's write end) and waits `hold`
// before setting `key` and committing. The end of a forked child: exits 0 or 1.
[[noreturn]] void edit_in_child(const std::string& path, int ready, std::chrono::milliseconds hold,
                                const std::string& key) {
  int status = 1;
  try {
    Editor editor = Editor::open(path);
    if (ready >= 0 && ::write(ready, "x", 1) != 1) ::_exit(1);
    std::this_thread::sleep_for(hold);
    editor.set_metadata(key, "done");
    editor.commit(/*sync=*/false);
    status = 0;
  } catch (...) {}
  ::_exit(status);
}

// Forks a child running edit_in_child(path, ..., hold, key) and returns its pid once it
// holds the file open for editing; -1 if it never said so.
pid_t fork_editor_holding_the_file(const std::string& path, std::chrono::milliseconds hold, const std::string& key) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) edit_in_child(path, fds[1], hold, key);
  char c;
  const bool opened = ::read(fds[0], &c, 1) == 1;
  ::close(fds[0]);
  ::close(fds[1]);
  return opened ? pid : -1;
}

// Waits for every child and expects each to have exited with status 0.
void expect_each_exits_0(const std::vector<pid_t>& children) {
  for (pid_t pid : children) {
    int status = 0;
    EXPECT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child " << pid << ", wait status " << status;
  }
}

TEST(EditorLock, TwoProcessesEditingOneFileBothUpdatesSurvive) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {16}}});
  const pid_t first = fork_editor_holding_the_file(path, std::chrono::milliseconds(400), "first");
  ASSERT_GT(first, 0) << "the first edit opened the file";
  // The second edit opens while the first holds the file: without the lock it would read
  // the old file and its rename would drop the first edit's update.
  const pid_t second = ::fork();
  if (second == 0) edit_in_child(path, -1, std::chrono::milliseconds(0), "second");
  expect_each_exits_0({first, second});
  EXPECT_EQ(metadata_of(path, "first"), "done");
  EXPECT_EQ(metadata_of(path, "second"), "done");
}

TEST(EditorLock, EightProcessesEditingAtOnceKeepEveryUpdateAndLeaveNothingBehind) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {16}}});
  std::vector<pid_t> children;
  for (int i = 0; i < 8; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) edit_in_child(path, -1, std::chrono::milliseconds(5), "edit" + std::to_string(i));
    children.push_back(pid);
  }
  expect_each_exits_0(children);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(metadata_of(path, "edit" + std::to_string(i)), "done") << i;
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"}) << "no lock file, no temporary";
}

TEST(EditorLock, TwoThreadsEditingOneFileBothUpdatesSurvive) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {16}}});
  std::promise<void> opened;
  std::thread first([&] {
    Editor editor = Editor::open(path);
    opened.set_value();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    editor.set_metadata("first", "done");
    editor.commit(/*sync=*/false);
  });
  opened.get_future().wait();
  Editor second = Editor::open(path);  // waits for the first thread's commit
  second.set_metadata("second", "done");
  second.commit(/*sync=*/false);
  first.join();
  EXPECT_EQ(metadata_of(path, "first"), "done");
  EXPECT_EQ(metadata_of(path, "second"), "done");
}

TEST(EditorLock, AnEditorDestroyedWithoutCommitLetsTheNextOneOpen) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {16}}});
  { Editor abandoned = Editor::open(path); }
  Editor next = Editor::open(path);
  next.set_metadata("k", "v");
  next.commit(/*sync=*/false);
  EXPECT_EQ(metadata_of(path, "k"), "v");
}

TEST(EditorLock, ASecondEditorOnTheSameThreadIsRefusedNotADeadlock) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {16}}});
  Editor first = Editor::open(path);
  try {
    Editor second = Editor::open(path);
    FAIL() << "a second Editor of an open file was opened on the same thread";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST(EditorLock, ASymlinkAndItsTargetShareOneLockFileBesideTheTarget) {
  TempDir dir;
  const std::string real = dir.file("real.tmap"), link = dir.file("latest.tmap");
  write_pattern_file(real, {{"a", Dtype::U8, {16}}});
  ASSERT_EQ(::symlink(real.c_str(), link.c_str()), 0);
  detail::PathLock lock(link);
  EXPECT_EQ(lock.lock_path(), dir.file(".real.tmap.lock"));
  EXPECT_THROW(detail::PathLock again(real), Error) << "the target's lock is the link's";
}

TEST(EditorLock, AProcessKilledWhileEditingReleasesTheLock) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"a", Dtype::U8, {16}}});
  const pid_t child = fork_editor_holding_the_file(path, std::chrono::hours(1), "never");
  ASSERT_GT(child, 0);
  ::kill(child, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  Editor editor = Editor::open(path);  // the kernel freed the dead process's record lock
  editor.set_metadata("after", "done");
  editor.commit(/*sync=*/false);
  EXPECT_EQ(metadata_of(path, "after"), "done");
  EXPECT_EQ(metadata_of(path, "never"), "");
}

TEST(Editor, KeptTensorsAreCopiedWithBoundedMemory) {
  TempDir dir;
  const std::string path = dir.file("big.tmap");
  const uint64_t big = uint64_t{512} << 20;
  {
    Writer w(path, {{"big", Dtype::U8, {big}}, {"small", Dtype::U8, {16}}}, WriterOptions{4096, {}, false});
    std::vector<unsigned char> chunk(size_t{4} << 20);
    for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<unsigned char>(i * 13);
    for (uint64_t done = 0; done < big; done += chunk.size()) w.write(chunk.data(), chunk.size());
    w.write(chunk.data(), 16);
    w.commit();
  }
  const uint64_t checksum = File::open(path).at("big").checksum;
  (void)reset_peak_memory();  // where allowed: the peak of writing the file is forgotten
  const auto before = read_process_memory();
  Editor e = Editor::open(path);
  e.remove("small");
  e.commit(/*sync=*/false);
  const auto after = read_process_memory();
  const uint64_t growth = after.vm_hwm > before.vm_hwm ? after.vm_hwm - before.vm_hwm : 0;
  EXPECT_LT(growth, uint64_t{16} << 20) << "peak grew by " << (growth >> 20) << " MiB";
  const File f = File::open(path);
  EXPECT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.at("big").checksum, checksum);
  f.verify();
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
    ASSERT_TRUE(now == old_bytes || now == new_bytes)
        << "trial " << trial << ": a torn file of " << now.size() << " bytes";
    (now == old_bytes ? saw_old : saw_new)++;
    File::open(path).verify();
  }
  EXPECT_EQ(saw_old + saw_new, kTrials);
  // A killed writer cannot remove its temporary file; such leftovers are never the destination.
  for (const auto& name : dir.entries()) {
    EXPECT_TRUE(name == "model.tmap" || name.rfind(".model.tmap.tmp-", 0) == 0) << name;
  }
}

void set_age(const std::string& path, time_t seconds) {
  const timespec times[2] = {{::time(nullptr) - seconds, 0}, {::time(nullptr) - seconds, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path;
}

TEST(Temporaries, ASaveRemovesTheTemporariesOfDeadWritersOfItsPathOnly) {
  TempDir dir;
  const std::string dead = dir.file(".model.tmap.tmp-00000000dead");   // old, unlocked
  const std::string live = dir.file(".model.tmap.tmp-0000000011fe");   // old, but locked
  const std::string young = dir.file(".model.tmap.tmp-000000000001");  // unlocked, new
  const std::string other = dir.file(".other.tmap.tmp-00000000dead");  // another path's
  const std::string lookalike = dir.file(".model.tmap.tmp-dead");      // not our name
  for (const auto& p : {dead, live, young, other, lookalike}) write_bytes(p, {1, 2, 3});
  for (const auto& p : {dead, live, other, lookalike}) set_age(p, 3600);
  const int held = ::open(live.c_str(), O_RDONLY);
  ASSERT_GE(held, 0);
  ASSERT_EQ(::flock(held, LOCK_EX), 0);  // as a writer still at work holds it
  write_pattern_file(dir.file("model.tmap"), {{"a", Dtype::U8, {4}}});
  ::close(held);
  EXPECT_EQ(dir.entries(),
            (std::vector<std::string>{".model.tmap.tmp-000000000001", ".model.tmap.tmp-0000000011fe",
                                      ".model.tmap.tmp-dead", ".other.tmap.tmp-00000000dead", "model.tmap"}));
}

TEST(Temporaries, RemoveTemporaryFilesLeavesNoNamedFileAndTheWriterThenFails) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"old", Dtype::U8, {10}}});
  const auto before = read_bytes(path);
  Writer w(path, {{"new", Dtype::U8, {4}}}, {});
  const unsigned char data[4] = {1, 2, 3, 4};
  w.write_tensor(data, 4);
  remove_temporary_files();  // what the CLI's SIGINT handler does
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
  if (named_temporaries()) {
    EXPECT_THROW(w.commit(), Error);  // its file is gone: the rename fails
    EXPECT_EQ(read_bytes(path), before);
  } else {
    w.commit();  // nameless files are not the signal handler's to remove
  }
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
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

// --- interrupting a write (interrupt.h) ------------------------------------------------

struct Stop {};

TEST(Interrupt, ACheckThatThrowsAbandonsAWriteBetweenPiecesAndKeepsTheOldFile) {
  TempDir dir;
  const std::string path = dir.file("model.tmap");
  write_pattern_file(path, {{"old", Dtype::U8, {8}}});
  const auto old = read_bytes(path);
  int checks = 0;
  {
    InterruptCheckScope scope([&] {
      if (++checks == 3) throw Stop{};  // in the middle of the 64 MiB tensor
    });
    EXPECT_THROW(write_pattern_file(path, {{"big", Dtype::U8, {64u << 20}}}), Stop);
  }
  EXPECT_EQ(checks, 3);
  EXPECT_EQ(read_bytes(path), old);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.tmap"});
  write_pattern_file(path, {{"big", Dtype::U8, {64u << 20}}});  // the scope is gone: no check
  EXPECT_EQ(checks, 3);
}

TEST(Interrupt, ScopesNestAndTheInnerOneIsInForce) {
  std::vector<int> seen;
  InterruptCheckScope outer([&] { seen.push_back(1); });
  {
    InterruptCheckScope inner([&] { seen.push_back(2); });
    detail::check_interrupt();
  }
  detail::check_interrupt();
  EXPECT_EQ(seen, (std::vector<int>{2, 1}));
}

// --- symbolic links: a write replaces the link's target, in its directory; the link stays --

bool is_symlink(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
}

std::string entries_of(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  std::string out;
  for (const auto& n : names) out += n + " ";
  return out;
}

TEST(Symlinks, SavingOverALinkReplacesItsTargetAndKeepsTheLink) {
  TempDir dir;
  write_pattern_file(dir.file("step-1000.tmap"), {{"a", Dtype::U8, {8}}});
  ASSERT_EQ(::symlink("step-1000.tmap", dir.file("latest.tmap").c_str()), 0);  // relative, as users make them
  write_pattern_file(dir.file("latest.tmap"), {{"b", Dtype::U8, {4}}});
  EXPECT_TRUE(is_symlink(dir.file("latest.tmap")));
  EXPECT_TRUE(File::open(dir.file("step-1000.tmap")).find("b"));
  EXPECT_EQ(entries_of(dir.path()), "latest.tmap step-1000.tmap ") << "no temporary, no second file";
}

TEST(Symlinks, TheTargetIsWrittenInItsOwnDirectory) {
  TempDir links, blobs;
  const std::string blob = blobs.file("3f2a9c");
  write_pattern_file(blob, {{"a", Dtype::U8, {8}}}, WriterOptions{64, {}, false, Format::Safetensors});
  ASSERT_EQ(::symlink(blob.c_str(), links.file("model.safetensors").c_str()), 0);  // absolute
  write_pattern_file(links.file("model.safetensors"), {{"c", Dtype::U8, {4}}},
                     WriterOptions{64, {}, false, Format::Safetensors});
  EXPECT_TRUE(is_symlink(links.file("model.safetensors")));
  EXPECT_TRUE(Checkpoint::open(blob).contains("c"));
  EXPECT_EQ(entries_of(blobs.path()), "3f2a9c ");
}

TEST(Symlinks, ALinkToAFileNotYetWrittenCreatesIt) {
  TempDir dir;
  ASSERT_EQ(::symlink("step-2000.tmap", dir.file("latest.tmap").c_str()), 0);  // dangling
  write_pattern_file(dir.file("latest.tmap"), {{"a", Dtype::U8, {8}}});
  EXPECT_TRUE(is_symlink(dir.file("latest.tmap")));
  EXPECT_TRUE(File::open(dir.file("step-2000.tmap")).find("a"));
}

TEST(Symlinks, EditingThroughALinkEditsTheTargetAndKeepsTheLink) {
  TempDir dir;
  write_pattern_file(dir.file("real.tmap"), {{"a", Dtype::U8, {8}}});
  ASSERT_EQ(::symlink("real.tmap", dir.file("link.tmap").c_str()), 0);
  Editor editor = Editor::open(dir.file("link.tmap"));
  editor.set_metadata("x", "y");
  editor.commit(/*sync=*/false);
  EXPECT_TRUE(is_symlink(dir.file("link.tmap")));
  const File real = File::open(dir.file("real.tmap"));
  ASSERT_EQ(real.metadata().size(), 1u);
  EXPECT_EQ(real.metadata()[0].second, "y");
  EXPECT_EQ(entries_of(dir.path()), "link.tmap real.tmap ");
}

TEST(Symlinks, ALoopOfLinksIsAnIoErrorAndWritesNothing) {
  TempDir dir;
  ASSERT_EQ(::symlink("b.tmap", dir.file("a.tmap").c_str()), 0);
  ASSERT_EQ(::symlink("a.tmap", dir.file("b.tmap").c_str()), 0);
  try {
    write_pattern_file(dir.file("a.tmap"), {{"a", Dtype::U8, {8}}});
    FAIL() << "a write through a loop of links succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_NE(std::string(e.what()).find("symbolic links"), std::string::npos) << e.what();
  }
  EXPECT_EQ(entries_of(dir.path()), "a.tmap b.tmap ");
}

TEST(Symlinks, AShardedSaveThroughALinkedIndexPutsItsShardsBesideTheRealIndex) {
  TempDir links, real;
  ASSERT_EQ(::symlink(real.file("model.tmap.index.json").c_str(), links.file("model.tmap.index.json").c_str()), 0);
  std::vector<TensorSpec> specs{{"t0", Dtype::U8, {400}}, {"t1", Dtype::U8, {400}}};
  ShardedWriter w(links.file("model.tmap.index.json"), specs, 500, {4096, {}, false});
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<unsigned char> data(w.byte_length(i), static_cast<unsigned char>(i));
    w.write_tensor(data.data(), data.size());
  }
  w.commit();
  EXPECT_EQ(entries_of(links.path()), "model.tmap.index.json ");
  EXPECT_EQ(entries_of(real.path()), "model-00001-of-00002.tmap model-00002-of-00002.tmap model.tmap.index.json ");
  EXPECT_TRUE(Checkpoint::open(links.file("model.tmap.index.json")).contains("t1"));
}

TEST(Symlinks, AHuggingFaceCacheLayoutLoadsThroughItsSnapshotLinks) {
  // snapshots/<revision>/model.safetensors -> ../../blobs/<sha256>
  TempDir cache;
  std::filesystem::create_directories(cache.path() / "blobs");
  std::filesystem::create_directories(cache.path() / "snapshots" / "a1b2c3");
  const std::string blob = (cache.path() / "blobs" / "9e8d7c").string();
  write_pattern_file(blob, {{"w", Dtype::F32, {4}}}, WriterOptions{64, {}, false, Format::Safetensors});
  const std::string snapshot = (cache.path() / "snapshots" / "a1b2c3" / "model.safetensors").string();
  ASSERT_EQ(::symlink("../../blobs/9e8d7c", snapshot.c_str()), 0);
  const Checkpoint via_link = Checkpoint::open(snapshot);
  const Checkpoint direct = Checkpoint::open(blob);
  ASSERT_TRUE(via_link.contains("w"));
  std::vector<unsigned char> a(16), b(16);
  via_link.read("w", a.data());
  direct.read("w", b.data());
  EXPECT_EQ(a, b);
}

// Saves a sharded checkpoint of `count` 400-byte tensors, 2 to a shard, each filled with
// `fill`; returns the index's shard names.
std::vector<std::string> save_shards(const std::string& index_path, size_t count, unsigned char fill,
                                     bool sync = false) {
  std::vector<TensorSpec> specs;
  for (size_t i = 0; i < count; ++i) specs.push_back({"t" + std::to_string(i), Dtype::U8, {400}});
  WriterOptions options;
  options.sync = sync;
  ShardedWriter w(index_path, specs, 800, options);
  const std::vector<unsigned char> data(400, fill);
  for (size_t i = 0; i < count; ++i) w.write_tensor(data.data(), data.size());
  w.commit();
  return ShardIndex::open(index_path).shard_files();
}

TEST(ShardedWriter, ASaveNeverReplacesAShardTheOldIndexNamesAndRemovesTheOldOnes) {
  TempDir dir;
  const std::string index = dir.file("model.tmap.index.json");
  const auto first = save_shards(index, 4, 'A');
  EXPECT_EQ(first, (std::vector<std::string>{"model-00001-of-00002.tmap", "model-00002-of-00002.tmap"}));
  // Same shape again: the usual names are the old index's, so the new set is tagged.
  const auto second = save_shards(index, 4, 'B');
  EXPECT_EQ(second, (std::vector<std::string>{"model-00001-of-00002.b.tmap", "model-00002-of-00002.b.tmap"}));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model-00001-of-00002.b.tmap", "model-00002-of-00002.b.tmap",
                                                     "model.tmap.index.json"}));
  // And back: saves of one shape alternate between the two sets.
  EXPECT_EQ(save_shards(index, 4, 'C'), first);
  // Fewer shards: nothing of the old set stays.
  EXPECT_EQ(save_shards(index, 2, 'D'), std::vector<std::string>{"model-00001-of-00001.tmap"});
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model-00001-of-00001.tmap", "model.tmap.index.json"}));
  const Checkpoint checkpoint = Checkpoint::open(index);
  std::vector<unsigned char> bytes(400);
  checkpoint.read("t1", bytes.data());
  EXPECT_EQ(bytes, std::vector<unsigned char>(400, 'D'));
}

// kill -9 at random moments while a child re-saves a sharded checkpoint, cycling through
// three versions (3 shards of 'A', 3 shards of 'B', 2 shards of 'C'): the index must
// always name a complete set, all old or all new, never a mix.
// Version v of the checkpoint: 6 shards' worth of tensors, or 4 for every third, so that
// the saves re-shard both ways; each tensor filled with 'A' + v % 3.
void save_version(const std::string& index, int v) {
  save_shards(index, v % 3 == 2 ? 4 : 6, static_cast<unsigned char>('A' + v % 3));
}

TEST(CrashSafety, KillDashNineDuringShardedSavesLeavesAWholeOldOrNewCheckpoint) {
  TempDir dir;
  const std::string index = dir.file("model.tmap.index.json");
  // How long one save takes here (sanitizers and a loaded machine slow it several-fold),
  // so that the kills land inside saves rather than always after many of them.
  const auto t0 = std::chrono::steady_clock::now();
  for (int v = 0; v < 3; ++v) save_version(index, v);
  const auto one_save =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0) / 3;
  save_version(index, 0);
  std::mt19937 rng(11);
  constexpr int kTrials = 60;
  std::set<int> seen;
  int version = 0;  // of the checkpoint on disk
  for (int trial = 0; trial < kTrials; ++trial) {
    // The child saves versions version+1, version+2, ... and reports each once committed;
    // the parent lets trial % 3 of them complete, then kills within the next save.
    int progress[2];
    ASSERT_EQ(::pipe(progress), 0);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(progress[0]);
      for (int v = version + 1;; ++v) {
        save_version(index, v);
        if (::write(progress[1], &v, sizeof v) != sizeof v) ::_exit(1);
      }
    }
    ::close(progress[1]);
    int committed = version;
    for (int k = 0; k < trial % 3; ++k)
      ASSERT_EQ(::read(progress[0], &committed, sizeof committed), ssize_t{sizeof committed});
    ::usleep(std::uniform_int_distribution<unsigned>(0, static_cast<unsigned>(one_save.count()))(rng));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    for (int v = 0; ::read(progress[0], &v, sizeof v) == ssize_t{sizeof v};) committed = v;
    ::close(progress[0]);
    // On disk: the last version reported, or the one after it if the kill fell between
    // its index rename and its report. Never a mix.
    const Checkpoint checkpoint = Checkpoint::open(index);
    std::vector<unsigned char> bytes(400);
    checkpoint.read("t0", bytes.data());
    const int on_disk = bytes[0] - 'A' == committed % 3 ? committed : committed + 1;
    ASSERT_EQ(bytes[0], 'A' + on_disk % 3) << "trial " << trial << ": last committed version " << committed;
    ASSERT_EQ(checkpoint.size(), on_disk % 3 == 2 ? 4u : 6u) << "trial " << trial;
    for (const std::string& name : checkpoint.keys()) {
      checkpoint.read(name, bytes.data());
      ASSERT_EQ(bytes, std::vector<unsigned char>(400, 'A' + on_disk % 3))
          << "trial " << trial << ": " << name << " is of another save";
    }
    for (const File& shard : checkpoint.files()) EXPECT_NO_THROW(shard.verify());
    seen.insert(on_disk % 3);
    version = on_disk;
  }
  // Each trial let 0, 1 or 2 saves complete, so every kind of version is met.
  EXPECT_EQ(seen.size(), 3u);
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

TEST(ShardIndex, RejectsMalformedParts) {
  TempDir dir;
  const char* bad[] = {
      R"({"weight_map": {}, "parts": []})",
      R"({"weight_map": {"w": "a.tmap"}, "parts": {"w": {"dim": 0, "shape": [2], "files": ["a.tmap"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 1, "shape": [2], "files": ["a.tmap"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [-2], "files": ["a.tmap"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [4611686018427387904], "files": ["a.tmap"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [65536, 65536, 65536, 65536], "files": ["a"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [1,1,1,1,1,1,1,1,1], "files": ["a.tmap"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [2], "files": []}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [2], "files": ["a", "b", "c"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [2], "files": ["a", "a"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"dim": 0, "shape": [2], "files": ["../a"]}}})",
      R"({"weight_map": {}, "parts": {"w": {"shape": [2], "files": ["a"]}}})",
      R"({"weight_map": {}, "parts": {"w": [0, [2], ["a"]]}})",
  };
  for (const char* json : bad) {
    try {
      ShardIndex::parse(json, dir.file("i.index.json"));
      ADD_FAILURE() << json;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::ShardIndexInvalid) << json;
    }
  }
  const ShardIndex ok = ShardIndex::parse(
      R"({"weight_map": {"b": "x.tmap"}, "parts": {"w": {"dim": 1, "shape": [3, 4], "files": ["y.tmap", "x.tmap"]}}})",
      dir.file("i.index.json"));
  ASSERT_EQ(ok.parts().size(), 1u);
  EXPECT_EQ(ok.parts()[0].dim, 1);
  EXPECT_EQ(ok.parts()[0].shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(ok.shard_files(), (std::vector<std::string>{"x.tmap", "y.tmap"}));
  EXPECT_EQ(ok.parts()[0].files, (std::vector<uint32_t>{1, 0}));
}

// Parts that do not make the tensor the index says are refused by name when it is read.
TEST(ShardIndex, PartsThatDoNotFitTheirTensorAreRefusedWhenRead) {
  TempDir dir;
  write_pattern_file(dir.file("a.tmap"), {{"w", Dtype::F32, {2}}});
  write_pattern_file(dir.file("b.tmap"), {{"w", Dtype::F32, {3}}, {"v", Dtype::F32, {2}}});
  const auto index = [&](const std::string& parts) {
    const std::string json = R"({"weight_map": {}, "parts": {)" + parts + "}}";
    write_bytes(dir.file("i.tmap.index.json"), std::vector<unsigned char>(json.begin(), json.end()));
    return Checkpoint::open(dir.file("i.tmap.index.json"));
  };
  const Checkpoint fits = index(R"("w": {"dim": 0, "shape": [5], "files": ["a.tmap", "b.tmap"]})");
  std::vector<unsigned char> out(20), expected;
  fits.read("w", out.data());
  for (int j = 0; j < 8; ++j) expected.push_back(static_cast<unsigned char>(j));   // a.tmap's part
  for (int j = 0; j < 12; ++j) expected.push_back(static_cast<unsigned char>(j));  // then b.tmap's
  EXPECT_EQ(out, expected);
  for (const std::string& parts : {std::string(R"("w": {"dim": 0, "shape": [6], "files": ["a.tmap", "b.tmap"]})"),
                                   std::string(R"("v": {"dim": 0, "shape": [4], "files": ["a.tmap", "b.tmap"]})"),
                                   std::string(R"("w": {"dim": 0, "shape": [5, 1], "files": ["a.tmap", "b.tmap"]})")}) {
    const Checkpoint c = index(parts);
    try {
      c.info(c.keys().front());
      ADD_FAILURE() << parts;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::ShardIndexInvalid) << parts;
      EXPECT_NE(std::string(e.what()).find("tensor '"), std::string::npos) << e.what();
    }
  }
}

// AtomicFile stages the 2 MiB block a write starts or ends in and writes aligned blocks
// whole (so that the page cache holds the file in 2 MiB folios). Whatever the pattern of
// writes (forward with gaps, back into blocks written out or staged, large and tiny,
// kernel copies, truncation), the file must end up exactly as with plain pwrite calls.
TEST(WriterBlocks, StagedWritesGiveExactlyTheBytesOfPlainWrites) {
  TempDir dir;
  const std::string source_path = dir.file("source.bin");
  std::vector<unsigned char> source(12 << 20);
  std::mt19937_64 rng(20261205);
  for (auto& b : source) b = static_cast<unsigned char>(rng());
  {
    std::ofstream out(source_path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(source.data()), static_cast<std::streamsize>(source.size()));
  }
  const int source_fd = ::open(source_path.c_str(), O_RDONLY);
  ASSERT_GE(source_fd, 0);
  constexpr uint64_t kMiB = 1 << 20;
  for (int round = 0; round < 24; ++round) {
    const std::string path = dir.file("staged-" + std::to_string(round) + ".bin");
    std::vector<unsigned char> expected;
    auto put = [&](uint64_t offset, uint64_t size, const unsigned char* data) {
      if (expected.size() < offset + size) expected.resize(static_cast<size_t>(offset + size), 0);
      std::memcpy(expected.data() + offset, data, static_cast<size_t>(size));
    };
    detail::AtomicFile file(path);
    uint64_t cursor = rng() % (3 * kMiB);
    for (int step = 0; step < 24; ++step) {
      const int kind = static_cast<int>(rng() % 10);
      // Sizes from a byte to several blocks, aligned or not.
      const uint64_t size = kind < 3   ? 1 + rng() % 4096
                            : kind < 6 ? 1 + rng() % (3 * kMiB)
                                       : (1 + rng() % 3) * 2 * kMiB;
      uint64_t offset = cursor;
      if (kind == 6) offset = (cursor + 2 * kMiB - 1) & ~(2 * kMiB - 1);     // aligned
      if (kind == 7 && !expected.empty()) offset = rng() % expected.size();  // back
      if (kind == 8) offset = cursor + rng() % (5 * kMiB);                   // a gap
      const uint64_t from = rng() % (source.size() - size);
      if (kind == 9) {
        file.copy_from(source_fd, from, size, offset, "a range");
      } else {
        file.pwrite(source.data() + from, static_cast<size_t>(size), offset);
      }
      put(offset, size, source.data() + from);
      cursor = std::max(cursor, offset + size);
      if (rng() % 15 == 0) {
        const uint64_t length = rng() % (expected.size() + 3 * kMiB);
        file.truncate(length);
        expected.resize(static_cast<size_t>(length), 0);
        cursor = std::min(cursor, length);
      }
    }
    file.finish(false);
    file.rename_into_place(false);
    std::vector<unsigned char> got(static_cast<size_t>(std::filesystem::file_size(path)));
    std::ifstream in(path, std::ios::binary);
    in.read(reinterpret_cast<char*>(got.data()), static_cast<std::streamsize>(got.size()));
    ASSERT_EQ(got.size(), expected.size()) << "round " << round;
    const auto diff = std::mismatch(got.begin(), got.end(), expected.begin());
    ASSERT_TRUE(diff.first == got.end()) << "round " << round << ": first wrong byte at " << (diff.first - got.begin());
  }
  ::close(source_fd);
}

// A file the Writer writes in small pieces lies in the page cache in 2 MiB folios, each
// mapped with one page-table entry; a file written in 64 KiB pieces (as cp or a download
// does) is mapped 4 KiB at a time until warm_page_cache re-reads it.
TEST(HugePages, AWrittenFileMapsIn2MiBPagesAndACopiedOneAfterWarm) {
  TempDir dir;
  std::string why;
  if (!page_cache_has_huge_folios(dir.path().string(), why)) GTEST_SKIP() << why;
  constexpr uint64_t kTensor = (3 << 20) + 1234;  // odd sizes: no write is aligned by chance
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 8; ++i) specs.push_back({"t" + std::to_string(i), Dtype::U8, {kTensor}});
  std::vector<unsigned char> bytes(kTensor);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(i * 31);
  const std::string written = dir.file("written.tmap");
  {
    Writer w(written, specs, {});
    for (size_t t = 0; t < specs.size(); ++t) {
      for (uint64_t at = 0; at < kTensor; at += 100 << 10)
        w.write(bytes.data() + at, std::min<uint64_t>(100 << 10, kTensor - at));
    }
    w.commit();
  }
  const WarmReport mapped = warm_page_cache(written);
  EXPECT_GE(mapped.share_before, 0.85) << "the Writer's file is cached in small folios";
  EXPECT_EQ(mapped.method, "already");

  // The same bytes copied in 64 KiB pieces.
  const std::string copied = dir.file("copied.tmap");
  {
    std::ifstream in(written, std::ios::binary);
    std::ofstream out(copied, std::ios::binary);
    std::vector<char> piece(64 << 10);
    while (in.read(piece.data(), static_cast<std::streamsize>(piece.size())) || in.gcount() > 0) {
      out.write(piece.data(), in.gcount());
      out.flush();
    }
  }
  const WarmReport warmed = warm_page_cache(copied);
  EXPECT_LT(warmed.share_before, 0.5) << "64 KiB writes gave 2 MiB folios: the case is not exercised";
  EXPECT_GE(warmed.share_after, 0.85) << warmed.method;
  EXPECT_TRUE(warmed.method == "reread" || warmed.method == "collapse") << warmed.method;
  EXPECT_EQ(warm_page_cache(copied).method, "already");
  // Never a changed byte.
  const Checkpoint a = Checkpoint::open(written), b = Checkpoint::open(copied);
  EXPECT_TRUE(b.files().front().find_corruption().empty());
  EXPECT_EQ(a.keys(), b.keys());
}

}  // namespace
}  // namespace tensormap::testing
