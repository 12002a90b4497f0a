// Scale-out: slices, tensor-parallel loading, pages shared between processes, and
// distributed loading over c10d (ProcessGroupGloo on loopback, FileStore and TCPStore).
// Multi-process tests fork their ranks; CTest runs every test in its own process.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>

#include "../core/support.h"
#include "tensormap/distributed.h"
#include "tensormap/tensormap.h"

namespace tensormap::testing {
namespace {

// A Megatron-style block for `world` ranks: `up` is column-parallel (its weight and bias
// split along dim 0), `down` row-parallel (its weight split along dim 1, its bias
// replicated), `norm` replicated. world = 1 is the whole model.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t d, int64_t h, int64_t world)
      : up(register_module("up", torch::nn::Linear(d, h / world))),
        down(register_module("down", torch::nn::Linear(h / world, d))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))) {}
  torch::nn::Linear up;
  torch::nn::Linear down;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(Block);

torch::nn::ModuleList tp_model(int64_t layers, int64_t d, int64_t h, int64_t world) {
  torch::nn::ModuleList list;
  for (int64_t i = 0; i < layers; ++i) list->push_back(Block(d, h, world));
  return list;
}

const std::vector<std::pair<std::string, int64_t>> kSplits = {{"*.up.*", 0}, {"*.down.weight", 1}};

// The tensor `name` of the whole model, cut as rank `rank` of `world` should hold it,
// computed with torch's own narrow from the full tensor.
at::Tensor expected_part(const StateDict& full, const std::string& name, int64_t rank, int64_t world) {
  at::Tensor t = full.at(name);
  ParallelPlan plan{rank, world, kSplits};
  if (const auto dim = plan.split_dim(name)) {
    const int64_t len = t.size(*dim) / world;
    t = t.narrow(*dim, rank * len, len);
  }
  return t;
}

// Checks every tensor of `model` against the whole checkpoint; "" when all match.
std::string compare_parts(const torch::nn::Module& model, const StateDict& full, int64_t rank, int64_t world) {
  std::ostringstream out;
  for (const auto& [name, t] : named_state(model)) {
    if (is_released(t)) {
      out << name << " still released; ";
    } else if (!t.equal(expected_part(full, name, rank, world).to(t.scalar_type()))) {
      out << name << " differs; ";
    }
  }
  return out.str();
}

// Rss (bytes) of the mapping of this process that holds `address`, from /proc/self/smaps.
uint64_t rss_of_mapping_at(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto a = reinterpret_cast<uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    uintptr_t low = 0, high = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> low >> dash >> high && dash == '-') {
      inside = a >= low && a < high;
    } else if (inside && line.rfind("Rss:", 0) == 0) {
      return std::stoull(line.substr(4)) * 1024;
    }
  }
  return 0;
}

// RssAnon + RssFile of this process, in bytes.
uint64_t resident() {
  const ProcessMemory m = read_process_memory();
  return m.rss_anon + m.rss_file;
}

// Reads the whole file, so that every page of it is in the page cache.
void warm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buffer(1 << 20);
  while (in.read(buffer.data(), static_cast<std::streamsize>(buffer.size())) || in.gcount() > 0) {}
}

void write_full_model(const std::string& path, int64_t layers, int64_t d, int64_t h, Format format = Format::Tensormap,
                      bool sync = false) {
  torch::manual_seed(7);
  SaveOptions options;
  options.format = format;
  options.sync = sync;
  save(*tp_model(layers, d, h, 1), path, options);
}

// --- slices ------------------------------------------------------------------------------

TEST(Slice, AlongDimZeroIsAZeroCopyViewOfTheMapping) {
  TempDir dir;
  const std::string path = dir.file("m.tmap");
  save({{"w", torch::arange(48, torch::kFloat).reshape({8, 6})}}, path, {4096, {}, false});
  const File file = File::open(path);
  const StateDict state(file);
  const at::Tensor part = state.slice("w", 0, 2, 3);
  EXPECT_EQ(part.sizes(), (std::vector<int64_t>{3, 6}));
  const auto* base = reinterpret_cast<const char*>(file.cow_data(file.at("w")));
  EXPECT_EQ(static_cast<const char*>(part.data_ptr()), base + 2 * 6 * 4) << "not a view";
  EXPECT_TRUE(part.equal(torch::arange(12, 30, torch::kFloat).reshape({3, 6})));
}

// slice() along every dimension equals narrow(), and read() of the slice copies the same
// bytes, in every format.
TEST(Slice, AlongOtherDimsEqualsNarrowInEveryFormat) {
  const at::Tensor full = torch::arange(4 * 6 * 5, torch::kInt).reshape({4, 6, 5});
  for (Format format : {Format::Tensormap, Format::Safetensors, Format::TorchSave}) {
    TempDir dir;
    const std::string path = dir.file("m.bin");
    SaveOptions options;
    options.format = format;
    options.sync = false;
    save({{"t", full}, {"v", torch::arange(10, torch::kDouble)}}, path, options);
    const StateDict state = StateDict::open(path);
    for (int64_t dim : {0, 1, 2, -1}) {
      for (auto [start, length] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 3}, {2, 0}}) {
        const at::Tensor part = state.slice("t", dim, start, length);
        EXPECT_TRUE(part.is_contiguous());
        EXPECT_TRUE(part.equal(full.narrow(dim, start, length)))
            << format_name(state.format()) << " dim " << dim << " start " << start << " length " << length;
        // read(): the same bytes, into memory the caller owns.
        at::Tensor out = torch::full(part.sizes(), -1, torch::kInt);
        state.read("t", dim, start, length, out.data_ptr());
        EXPECT_TRUE(out.equal(part)) << format_name(state.format()) << " read, dim " << dim << " start " << start;
      }
    }
    EXPECT_TRUE(state.slice("v", 0, 4, 6).equal(torch::arange(4, 10, torch::kDouble)));
  }
}

TEST(Slice, OutOfRangeRequestsAreClearErrors) {
  TempDir dir;
  const std::string path = dir.file("m.tmap");
  save({{"w", torch::zeros({4, 6})}, {"s", torch::zeros({})}}, path, {4096, {}, false});
  const StateDict state = StateDict::open(path);
  auto kind_of = [&](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'"), std::string::npos) << e.what();
      return e.kind();
    }
    return ErrorKind::Io;  // "no error": the assertions below fail
  };
  EXPECT_EQ(kind_of([&] { state.slice("w", 2, 0, 1); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.slice("w", -3, 0, 1); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.slice("w", 1, 4, 3); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.slice("w", 0, -1, 1); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.slice("w", 0, 0, 5); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.slice("s", 0, 0, 1); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.slice("nope", 0, 0, 1); }), ErrorKind::NotFound);
  float sink[24];  // read() checks exactly as slice() does
  EXPECT_EQ(kind_of([&] { state.read("w", 2, 0, 1, sink); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.read("w", 1, 4, 3, sink); }), ErrorKind::InvalidArgument);
  EXPECT_EQ(kind_of([&] { state.read("nope", 0, 0, 1, sink); }), ErrorKind::NotFound);
}

// --- tensor-parallel load ----------------------------------------------------------------

TEST(ParallelPlan, PatternsMatchLikeGlobsAndTheFirstMatchWins) {
  EXPECT_TRUE(matches_pattern("*.up.*", "3.up.weight"));
  EXPECT_TRUE(matches_pattern("*", ""));
  EXPECT_TRUE(matches_pattern("a*b*c", "a.x.b.y.b.c"));
  EXPECT_FALSE(matches_pattern("*.up.*", "3.down.weight"));
  EXPECT_FALSE(matches_pattern("a*b", "a.b.c"));
  EXPECT_TRUE(matches_pattern("exact", "exact"));
  ParallelPlan plan{0, 2, {{"*.weight", 1}, {"*", 0}}};
  EXPECT_EQ(plan.split_dim("x.weight"), 1);
  EXPECT_EQ(plan.split_dim("x.bias"), 0);
  EXPECT_EQ(ParallelPlan{}.split_dim("x"), std::nullopt);
}

TEST(ParallelLoad, EveryRankGetsExactlyItsPartInMapAndCopyMode) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 2, 16, 64);
  const StateDict full = StateDict::open(path);
  constexpr int64_t kWorld = 4;
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    for (int64_t rank = 0; rank < kWorld; ++rank) {
      auto model = build_skeleton([] { return tp_model(2, 16, 64, kWorld); });
      LoadOptions options;
      options.mode = mode;
      options.parallel = ParallelPlan{rank, kWorld, kSplits};
      const File file = File::open(path);
      const LoadReport report = load(*model, StateDict(file), options);
      EXPECT_EQ(report.loaded.size(), 12u);
      EXPECT_EQ(compare_parts(*model, full, rank, kWorld), "") << "rank " << rank;
      // In map mode a dim-0 part is a view of the file, in a mapping of its own (not the
      // whole file's); a dim-1 part is an owned copy; in copy mode everything is owned.
      const auto params = model->named_parameters();
      const auto* up_ptr = static_cast<const char*>(params["0.up.weight"].data_ptr());
      EXPECT_EQ(file_mapped_at(up_ptr), mode == LoadMode::Map ? path : "");
      const TensorEntry& up = file.at("0.up.weight");
      const auto* up_base = static_cast<const char*>(file.cow_data(up));
      EXPECT_FALSE(up_ptr >= up_base && up_ptr < up_base + up.byte_length) << "in the whole file's mapping";
      EXPECT_EQ(file_mapped_at(params["0.down.weight"].data_ptr()), "");
      EXPECT_EQ(file_mapped_at(params["0.norm.weight"].data_ptr()), mode == LoadMode::Map ? path : "");
    }
  }
  // A rank's forward pieces add up to the whole model's output (row-parallel sum).
  auto whole = build_skeleton([] { return tp_model(1, 16, 64, 1); });
  LoadOptions lenient;
  lenient.strict = false;  // the whole checkpoint has 2 layers, this model 1
  load(*whole, StateDict::open(path), lenient);
  const at::Tensor x = torch::randn({3, 16});
  auto block = whole[0]->as<BlockImpl>();
  const at::Tensor expected = block->down(torch::relu(block->up(x)));
  at::Tensor sum = torch::zeros_like(expected);
  for (int64_t rank = 0; rank < kWorld; ++rank) {
    auto part = build_skeleton([] { return tp_model(1, 16, 64, kWorld); });
    LoadOptions options;
    options.parallel = ParallelPlan{rank, kWorld, kSplits};
    options.strict = false;  // the whole checkpoint has 2 layers, this model 1
    load(*part, path, options);
    auto b = part[0]->as<BlockImpl>();
    sum += torch::nn::functional::linear(torch::relu(b->up(x)), b->down->weight);
  }
  EXPECT_TRUE(torch::allclose(sum + block->down->bias, expected, 1e-5, 1e-5));
}

TEST(ParallelLoad, UnevenSplitsBadRanksAndWrongShapesAreRefusedAndNothingIsLoaded) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 1, 16, 64);
  auto expect_error = [&](const ParallelPlan& plan, int64_t world_of_model, ErrorKind kind, const std::string& needle) {
    auto model = build_skeleton([&] { return tp_model(1, 16, 64, world_of_model); });
    LoadOptions options;
    options.parallel = plan;
    try {
      load(*model, path, options);
      ADD_FAILURE() << "loaded";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), kind) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    for (const auto& [name, t] : named_state(*model)) EXPECT_TRUE(is_released(t)) << name;
  };
  // 64 does not split into 3 equal parts (the model is built for 4, so shapes differ too).
  expect_error({0, 3, kSplits}, 4, ErrorKind::ModelMismatch, "does not split into 3 equal parts");
  expect_error({4, 4, kSplits}, 4, ErrorKind::InvalidArgument, "rank 4 of world size 4");
  expect_error({0, 2, kSplits}, 4, ErrorKind::ModelMismatch,
               "shape [16, 16] in the model, [32, 16] expected for rank 0 of 2 (dim 0 of [64, 16] split in 2)");
  expect_error({0, 4, {{"*.up.*", 2}}}, 4, ErrorKind::ModelMismatch, "splits dimension 2");
}

// A view in a mapping of its own (ViewMapping::Own) is the same data as a view of the
// whole file's mapping, lies outside that mapping, is copy-on-write, and touching it makes
// only its own pages resident: its mapping's Rss is the part (and its edge pages), and
// the whole file's mapping gains nothing.
TEST(Slice, OwnMappingViewsHoldOnlyTheirOwnPages) {
  TempDir dir;
  const std::string path = dir.file("m.tmap");
  torch::manual_seed(3);
  const at::Tensor w = torch::randn({4096, 2048});  // 32 MiB
  save({{"a", torch::ones({100})}, {"w", w}, {"z", torch::ones({100})}}, path, {4096, {}, false});
  warm(path);
  const File file = File::open(path);
  const StateDict state(file);
  const auto* base = static_cast<const char*>(file.cow_data(file.at("w")));
  const uint64_t whole_before = rss_of_mapping_at(base);
  const at::Tensor part = state.slice("w", 0, 1024, 1024, ViewMapping::Own);  // rank 1 of 4: 8 MiB
  const auto* ptr = static_cast<const char*>(part.data_ptr());
  EXPECT_FALSE(ptr >= base && ptr < base + file.at("w").byte_length) << "in the whole file's mapping";
  EXPECT_EQ(file_mapped_at(ptr), path);
  EXPECT_TRUE(part.equal(w.narrow(0, 1024, 1024)));
  const uint64_t own = rss_of_mapping_at(ptr);
  std::printf("own mapping: touching an 8 MiB part made %.3f MiB of it resident\n", own / 1048576.0);
  EXPECT_GE(own, part.nbytes()) << "the part was not touched";
  EXPECT_LE(own, part.nbytes() + 2 * 4096) << "pages outside the part became resident";
  EXPECT_EQ(rss_of_mapping_at(base), whole_before) << "the whole file's mapping was touched";
  // Copy-on-write: a write stays in this process.
  part[0][0] = 12345.0f;
  EXPECT_EQ(state.at("w")[1024][0].item<float>(), w[1024][0].item<float>());
  EXPECT_TRUE(StateDict::open(path).at("w").equal(w));
  // Whole tensors, and sources without a file of their own, give the same values.
  EXPECT_TRUE(state.at("z", ViewMapping::Own).equal(torch::ones({100})));
  EXPECT_EQ(file_mapped_at(state.at("z", ViewMapping::Own).data_ptr()), path);
  const std::string archive = dir.file("m.pt");
  SaveOptions torch_save;
  torch_save.format = Format::TorchSave;
  torch_save.sync = false;
  save({{"w", w}}, archive, torch_save);
  const StateDict pt = StateDict::open(archive);
  EXPECT_TRUE(pt.slice("w", 0, 8, 8, ViewMapping::Own).equal(w.narrow(0, 8, 8)));
  EXPECT_TRUE(pt.at("w", ViewMapping::Own).equal(w));
}

// A rank reads its share of the file and not the rest: with the file evicted from the
// page cache first (and mincore confirming it), loading rank 1 of 4 and touching every
// weight brings in about a quarter of the file's pages. Margin: kernel read-around.
TEST(ParallelLoad, ARankReadsOnlyItsShareOfTheFile) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 4, 1024, 4096, Format::Tensormap, /*sync=*/true);  // 128 MiB
  ASSERT_TRUE(evict_page_cache(path));
  const auto [before, total] = cached_pages(path);
  if (before > total / 50) GTEST_SKIP() << "cannot evict the file from the page cache here";
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    evict_page_cache(path);
    auto model = build_skeleton([] { return tp_model(4, 1024, 4096, 4); });
    LoadOptions options;
    options.mode = mode;
    options.parallel = ParallelPlan{1, 4, kSplits};
    options.drop_read_pages = false;  // what was read stays cached, to be counted
    load(*model, path, options);
    double total_sum = 0;
    for (const auto& p : model->parameters()) total_sum += p.sum().item<double>();
    (void)total_sum;
    const auto [after, pages] = cached_pages(path);
    std::printf("%s: %zu of %zu pages cached after loading rank 1 of 4\n", mode == LoadMode::Map ? "map" : "copy",
                after, pages);
    EXPECT_LT(after, pages / 4 + pages / 10) << "read more than its share";
    EXPECT_GT(after, pages / 4 - pages / 50) << "did not read its share";
  }
}

// --- prefault -----------------------------------------------------------------------------

// prefault() brings every mapped weight into the process at once, from the page cache,
// without copying: RssFile grows by the weights, RssAnon does not, values are unchanged.
// A 32 MiB model written to `path`, then loaded from it in map mode.
torch::nn::ModuleList mapped_model(const std::string& path) {
  write_full_model(path, 2, 1024, 2048);
  auto model = build_skeleton([] { return tp_model(2, 1024, 2048, 1); });
  load(*model, path);
  return model;
}

// Every weight of mapped_model(path) is in (RssFile grew by them since `before`), none was
// copied (RssAnon did not), and the values are the file's.
void expect_faulted_in_uncopied(const torch::nn::Module& model, const std::string& path, const ProcessMemory& before) {
  const auto after = read_process_memory();
  EXPECT_GT(after.rss_file, before.rss_file + (30u << 20)) << "the weights were not faulted in";
#if !defined(__SANITIZE_ADDRESS__)
  EXPECT_LT(after.rss_anon, before.rss_anon + (4u << 20)) << "prefault copied pages";
#endif
  EXPECT_EQ(compare_parts(model, StateDict::open(path), 0, 1), "");
}

TEST(Prefault, FaultsInEveryMappedWeightWithoutCopyingThem) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  auto model = mapped_model(path);
  const auto before = read_process_memory();
  prefault(*model, 2);
  expect_faulted_in_uncopied(*model, path, before);
}

// prefault with verify: every weight is faulted in and checked against the file's XXH3;
// a weight whose bytes in the file were damaged after the save is named.
TEST(Prefault, VerifiedChecksEveryWeightAgainstTheFileAsItFaultsItIn) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  auto model = mapped_model(path);
  const auto before = read_process_memory();
  prefault(*model, StateDict::open(path), {2, true});
  expect_faulted_in_uncopied(*model, path, before);

  // One byte of one weight damaged in the file: a map-mode load does not read it, the
  // verified prefault does.
  const File f = File::open(path);
  const TensorEntry& victim = f.tensors().back();
  const std::string name(victim.name);
  const uint64_t at = victim.offset + victim.byte_length / 2;
  {
    std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(static_cast<std::streamoff>(at));
    char c = 0;
    io.read(&c, 1);
    c = static_cast<char>(c ^ 0x20);
    io.seekp(static_cast<std::streamoff>(at));
    io.write(&c, 1);
  }
  auto again = build_skeleton([] { return tp_model(2, 1024, 2048, 1); });
  const StateDict state = StateDict::open(path);
  load(*again, state);
  prefault(*again, state, {0, false});  // unverified: nothing to see
  try {
    prefault(*again, state, {2, true});
    ADD_FAILURE() << "a damaged weight passed the verified prefault";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::ChecksumMismatch) << e.what();
    EXPECT_NE(std::string(e.what()).find(quoted_name(name)), std::string::npos) << e.what();
  }
}

// A file that shrinks after a map-mode load: prefault reports Error(Truncated) naming a
// tensor past the new end (MADV_POPULATE_READ says EFAULT) instead of dying of SIGBUS.
TEST(Prefault, AFileThatShrankIsTruncatedNotSigbus) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  auto model = mapped_model(path);
  std::filesystem::resize_file(path, 4 << 20);
  try {
    prefault(*model, 2);
    ADD_FAILURE() << "prefault of a shrunk file returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Truncated) << e.what();
    EXPECT_NE(std::string(e.what()).find("tensor '"), std::string::npos) << e.what();
  }
}

// prefault_in_background does the same on a thread of its own: the caller computes
// meanwhile, wait() ends with every weight in, and a file that shrank is reported by
// wait(). The model may go away while the thread runs: its storages live until it ends.
TEST(Prefault, InTheBackgroundFaultsInEverythingAndOutlivesTheModel) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  auto model = mapped_model(path);
  const auto before = read_process_memory();
  auto background = prefault_in_background(*model);
  double sum = 0;
  for (const auto& p : model->parameters()) sum += p.sum().item<double>();  // meanwhile
  background.wait();
  EXPECT_TRUE(background.done());
  expect_faulted_in_uncopied(*model, path, before);
  EXPECT_TRUE(std::isfinite(sum));

  // Started, then the model dropped at once and the handle with it: no fault, no leak.
  for (int i = 0; i < 20; ++i) {
    auto again = mapped_model(dir.file("again.tmap"));
    auto running = prefault_in_background(*again);
    again = nullptr;
  }

  auto shrinking = mapped_model(dir.file("shrinking.tmap"));
  std::filesystem::resize_file(dir.file("shrinking.tmap"), 4 << 20);
  auto failing = prefault_in_background(*shrinking);
  try {
    failing.wait();
    ADD_FAILURE() << "a background prefault of a shrunk file ended well";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Truncated) << e.what();
  }
}

// --- processes ---------------------------------------------------------------------------

// Forks `n` children running `body(i)`; each exits 0 on success. A child that hangs is
// killed by its alarm after `seconds`. Returns one line per failed child ("" if none).
std::string run_children(int n, const std::function<int(int)>& body, unsigned seconds = 120) {
  std::vector<pid_t> pids;
  for (int i = 0; i < n; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::alarm(seconds);
      at::set_num_threads(1);
      int code = 1;
      try {
        code = body(i);
      } catch (const std::exception& e) {
        std::cerr << "child " << i << ": " << e.what() << "\n";
        code = 3;
      }
      std::cout.flush();
      std::cerr.flush();
      ::_exit(code);
    }
    pids.push_back(pid);
  }
  std::ostringstream failures;
  for (int i = 0; i < n; ++i) {
    int status = 0;
    ::waitpid(pids[static_cast<size_t>(i)], &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      failures << "child " << i << ": "
               << (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                       : "exit " + std::to_string(WEXITSTATUS(status)))
               << "; ";
    }
  }
  return failures.str();
}

// Four processes load one 64 MiB checkpoint in map mode and touch every weight; the
// file's pages are mapped by all four but held once: their total Pss for the mapping is
// at most 1.1 x the file, while each maps (Rss) nearly all of it.
TEST(SharedPages, FourProcessesMappingOneCheckpointHoldOneCopy) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 2, 1024, 4096);  // 64 MiB + small tensors
  const uint64_t file_size = File::open(path).file_size();
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  std::vector<pid_t> children;
  for (int i = 0; i < 4; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      at::set_num_threads(1);
      ::alarm(120);
      auto model = build_skeleton([] { return tp_model(2, 1024, 4096, 1); });
      load(*model, path);
      double total = 0;
      for (const auto& p : model->parameters()) total += p.sum().item<double>();
      const char byte = std::isfinite(total) ? 'k' : 'x';
      (void)!::write(ready[1], &byte, 1);
      char wait_for = 0;
      (void)!::read(go[0], &wait_for, 1);
      ::_exit(0);
    }
    children.push_back(pid);
  }
  int ok = 0;
  for (int i = 0; i < 4; ++i) {
    char byte = 0;
    if (::read(ready[0], &byte, 1) == 1 && byte == 'k') ++ok;
  }
  uint64_t total_pss = 0;
  std::vector<uint64_t> rss;
  for (pid_t pid : children) {
    const auto [pss, r] = file_mapping_pss_rss(pid, path);
    total_pss += pss;
    rss.push_back(r);
  }
  const char release[4] = {'g', 'g', 'g', 'g'};
  (void)!::write(go[1], release, 4);
  for (pid_t pid : children) ::waitpid(pid, nullptr, 0);
  ASSERT_EQ(ok, 4) << "a child failed to load";
  std::printf("4 processes: total Pss of the mapping %.1f MiB, file %.1f MiB\n", total_pss / 1048576.0,
              file_size / 1048576.0);
  EXPECT_LE(static_cast<double>(total_pss), 1.1 * static_cast<double>(file_size));
  for (uint64_t r : rss) EXPECT_GE(static_cast<double>(r), 0.9 * static_cast<double>(file_size - 8192));
}

// A rank holds a quarter of the model, in map and in copy mode, even with the whole file
// in the page cache (as when the other ranks on the machine have read it): rank 1 of 4
// (both of whose edges fall inside tensors) loads a 128 MiB model and touches all of it,
// in a process of its own. Resident growth (RssAnon + RssFile) is within 1 MiB of a
// quarter of the model (replicated tensors: 48 KiB; the rest: edge pages and heap). A
// load of a small model first faults in the code the load runs.
TEST(ParallelLoad, ARankHoldsAQuarterOfTheModelInMapAndCopyMode) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "memory figures are not meaningful under AddressSanitizer";
#endif
  TempDir dir;
  const std::string path = dir.file("full.tmap"), small = dir.file("small.tmap");
  write_full_model(path, 4, 1024, 4096);  // 4 x 32 MiB
  write_full_model(small, 4, 16, 64);
  const uint64_t model_bytes = std::filesystem::file_size(path);
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    warm(path);
    const std::string failures = run_children(1, [&](int) {
      LoadOptions options;
      options.mode = mode;
      options.parallel = ParallelPlan{1, 4, kSplits};
      load(*build_skeleton([] { return tp_model(4, 16, 64, 4); }), small, options);
      auto model = build_skeleton([] { return tp_model(4, 1024, 4096, 4); });
      ::malloc_trim(0);  // free heap pages inherited from the parent would hide new memory
      const uint64_t before = resident();
      load(*model, path, options);
      prefault(*model, 1);
      const uint64_t grown = resident() - before;
      std::printf("%s: rank 1 of 4 holds %.2f MiB of a %.2f MiB model (%.4f)\n", mode == LoadMode::Map ? "map" : "copy",
                  grown / 1048576.0, model_bytes / 1048576.0,
                  static_cast<double>(grown) / static_cast<double>(model_bytes));
      if (!compare_parts(*model, StateDict::open(path), 1, 4).empty()) return 2;
      return grown <= model_bytes / 4 + (1u << 20) && grown + (1u << 20) >= model_bytes / 4 ? 0 : 1;
    });
    EXPECT_EQ(failures, "") << (mode == LoadMode::Map ? "map" : "copy") << " mode (exit 1: not a quarter)";
  }
}

// Past a quarter of vm.max_map_count tensors, a parallel load maps its parts through the
// whole file's mapping rather than one mapping each, so that it cannot run the process
// out of mappings. The limit is faked in one child process: a private mount namespace
// with a file bound over /proc/sys/vm/max_map_count (CAP_SYS_ADMIN; skipped without it).
// The model has 12 tensors: a limit of 48 allows 12 mappings of their own, 44 only 11.
TEST(ParallelLoad, PastAQuarterOfMaxMapCountPartsShareTheWholeFilesMapping) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 2, 16, 64);
  for (const auto& [limit, own] : {std::pair{48, true}, std::pair{44, false}}) {
    const std::string fake = dir.file("max_map_count_" + std::to_string(limit));
    std::ofstream(fake) << limit << "\n";
    const std::string failures = run_children(1, [&, limit = limit, own = own](int) {
      if (::unshare(CLONE_NEWNS) != 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
          ::mount(fake.c_str(), "/proc/sys/vm/max_map_count", nullptr, MS_BIND, nullptr) != 0) {
        return 77;
      }
      long seen = 0;
      std::ifstream("/proc/sys/vm/max_map_count") >> seen;
      if (seen != limit) return 4;
      const File file = File::open(path);
      auto model = build_skeleton([] { return tp_model(2, 16, 64, 4); });
      LoadOptions options;
      options.parallel = ParallelPlan{1, 4, kSplits};
      if (load(*model, StateDict(file), options).loaded.size() != 12) return 2;
      if (!compare_parts(*model, StateDict(file), 1, 4).empty()) return 2;
      const TensorEntry& up = file.at("0.up.weight");
      const auto* up_base = static_cast<const char*>(file.cow_data(up));
      const auto* up_ptr = static_cast<const char*>(model->named_parameters()["0.up.weight"].data_ptr());
      const bool in_whole_mapping = up_ptr >= up_base && up_ptr < up_base + up.byte_length;
      std::printf("vm.max_map_count %d: 0.up.weight in %s\n", limit,
                  in_whole_mapping ? "the whole file's mapping" : "a mapping of its own");
      return in_whole_mapping == !own ? 0 : 1;
    });
    if (failures == "child 0: exit 77; ") {
      GTEST_SKIP() << "cannot bind a file over /proc/sys/vm/max_map_count here";
    }
    EXPECT_EQ(failures, "") << "limit " << limit << " (exit 1: the wrong mapping; 4: the bind did not show)";
  }
}

// --- distributed loading over c10d -------------------------------------------------------

c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                      int world) {
  auto options = c10d::ProcessGroupGloo::Options::create();
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  options->timeout = std::chrono::seconds(60);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
}

#if TENSORMAP_C10D_HAS_BACKEND
// What a LibTorch 2.x user holds (torch.distributed's default group is one): a
// ProcessGroup that dispatches CPU work to a Gloo backend.
c10::intrusive_ptr<c10d::ProcessGroup> wrapped_gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                          int world) {
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo_group(store, rank, world));
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  return group;
}
#endif

// The group a test's ranks load over: a ProcessGroup in every LibTorch (in 2.x one with a
// Gloo backend). The other 2.x spelling, a bare backend, is what gloo_group gives.
c10::intrusive_ptr<c10d::ProcessGroup> process_group(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                     int world) {
#if TENSORMAP_C10D_HAS_BACKEND
  return wrapped_gloo_group(store, rank, world);
#else
  return gloo_group(store, rank, world);
#endif
}

// Runs `body` in `world` child processes, each given its rank and a process group of them
// all over a FileStore at `store` (a path no other job uses); "" when every rank returned 0.
std::string on_ranks(int world, const std::string& store,
                     const std::function<int(int rank, c10d::ProcessGroup& group)>& body) {
  return run_children(world, [&](int rank) {
    auto group = process_group(c10::make_intrusive<c10d::FileStore>(store, world), rank, world);
    return body(rank, *group);
  });
}

// A port that was free a moment ago, for a TCPStore.
uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// A TCPStore on loopback whose server is rank 0.
c10::intrusive_ptr<c10d::Store> tcp_store(uint16_t port, int rank, int world) {
  c10d::TCPStoreOptions options;
  options.port = port;
  options.isServer = rank == 0;
  options.numWorkers = world;
#if TORCH_VERSION_MAJOR >= 2
  options.useLibUV = false;  // Debian's LibTorch 2.6 is built without libuv
#endif
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
}

// Rank body shared by the distributed tests: load this rank's part, then check it against
// the whole checkpoint (which the test itself reads, after the load).
template <typename C10dGroup>
int load_and_check(C10dGroup& group, const std::string& path_for_this_rank, const std::string& real_path, int source,
                   LoadMode mode) {
  const int rank = group.getRank(), world = group.getSize();
  auto model = build_skeleton([&] { return tp_model(2, 16, 64, world); });
  DistributedLoadOptions options;
  options.source_rank = source;
  options.load.mode = mode;
  const LoadReport report = load_distributed(*model, path_for_this_rank, group, kSplits, options);
  const std::string wrong = compare_parts(*model, StateDict::open(real_path), rank, world);
  if (!wrong.empty() || report.loaded.size() != 12) {
    std::cerr << "rank " << rank << ": " << wrong << " loaded " << report.loaded.size() << "\n";
    return 2;
  }
  return 0;
}

TEST(Distributed, FourRanksReadTheirOwnPartsFromSharedStorageOverAFileStore) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 2, 16, 64);
  const std::string store = dir.file("store");
  EXPECT_EQ(
      on_ranks(4, store,
               [&](int, c10d::ProcessGroup& group) { return load_and_check(group, path, path, -1, LoadMode::Map); }),
      "");
}

// Only rank 0 can read the checkpoint (the others are given a path that does not exist):
// it sends each rank its parts over the process group and broadcasts the rest.
TEST(Distributed, OnlyRankZeroHasTheFileAndSendsTheOthersTheirPartsOverATcpStore) {
  for (int world : {2, 4}) {
    TempDir dir;
    const std::string path = dir.file("full.safetensors");
    write_full_model(path, 2, 16, 64, Format::Safetensors);
    const uint16_t port = free_port();
    EXPECT_EQ(run_children(world,
                           [&](int rank) {
                             auto store = tcp_store(port, rank, world);
                             auto group = gloo_group(store, rank, world);
                             return load_and_check(*group, rank == 0 ? path : dir.file("absent"), path, 0,
                                                   rank == 0 ? LoadMode::Map : LoadMode::Copy);
                           }),
              "")
        << "world " << world;
  }
}

// --- distributed saves -------------------------------------------------------------------

// The rank files of the checkpoint "ckpt" in `dir`, in rank order (each rank names its
// file with an id of its own, so the names sort by id first).
std::vector<std::string> rank_files(const TempDir& dir) {
  std::vector<std::string> files;
  for (const std::string& e : dir.entries()) {
    if (e.rfind("ckpt", 0) == 0 && e.find("-rank") != std::string::npos) files.push_back(e);
  }
  std::sort(files.begin(), files.end(), [](const std::string& a, const std::string& b) {
    return a.substr(a.find("-rank")) < b.substr(b.find("-rank"));
  });
  return files;
}

// Saved from 2 ranks (each holding its part of a reference model), twice: the second save
// replaces the first, whose files go. The result reads as the whole model, and loads at
// 1, 2 and 4 ranks, bit-identical to the reference.
TEST(DistributedSave, SavedAtTwoRanksLoadsWholeAndAtOneTwoAndFourRanks) {
  TempDir dir;
  const std::string full = dir.file("full.tmap");
  write_full_model(full, 2, 16, 64);
  const std::string index = dir.file("ckpt.tmap.index.json");
  for (int round = 0; round < 2; ++round) {
    const std::string store = dir.file("store-save-" + std::to_string(round));
    EXPECT_EQ(on_ranks(2, store,
                       [&](int, c10d::ProcessGroup& group) {
                         auto model = build_skeleton([&] { return tp_model(2, 16, 64, 2); });
                         load_distributed(*model, full, group, kSplits);
                         save_distributed(*model, index, group, kSplits);
                         return 0;
                       }),
              "")
        << "round " << round;
  }
  size_t files = 0;
  for (const std::string& e : dir.entries()) files += e.rfind("ckpt", 0) == 0;
  EXPECT_EQ(files, 3u) << "the index and the second save's two rank files";
  const std::vector<std::string> ranks = rank_files(dir);
  ASSERT_EQ(ranks.size(), 2u);
  EXPECT_NE(ranks[0].find("-rank00000-of-00002.tmap"), std::string::npos) << ranks[0];
  EXPECT_NE(ranks[1].find("-rank00001-of-00002.tmap"), std::string::npos) << ranks[1];

  const StateDict whole = StateDict::open(index), reference = StateDict::open(full);
  EXPECT_EQ(whole.keys().size(), reference.keys().size());
  for (const std::string& name : reference.keys()) {
    EXPECT_TRUE(whole.at(name).equal(reference.at(name))) << name;
  }
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    auto one = build_skeleton([] { return tp_model(2, 16, 64, 1); });
    LoadOptions options;
    options.mode = mode;
    load(*one, index, options);
    EXPECT_EQ(compare_parts(*one, reference, 0, 1), "");
  }
  for (int world : {2, 4}) {
    const std::string store = dir.file("store-load-" + std::to_string(world));
    EXPECT_EQ(on_ranks(world, store,
                       [&](int rank, c10d::ProcessGroup& group) {
                         const int wrong = load_and_check(group, index, full, -1, LoadMode::Map);
                         if (wrong) return wrong;
                         // A rank's part of a tensor split along dim 0 lies in one file:
                         // in map mode, a view of that file's mapping.
                         auto model = build_skeleton([&] { return tp_model(2, 16, 64, world); });
                         load_distributed(*model, index, group, kSplits);
                         const auto& up = model->ptr(0)->as<Block>()->up->weight;
                         const std::string mapped = file_mapped_at(up.data_ptr());
                         const std::string want = "-rank0000" + std::to_string(rank * 2 / world) + "-of-00002";
                         return mapped.find(want) != std::string::npos ? 0 : 3;
                       }),
              "")
        << "world " << world;
  }
}

// In the background: training writes every weight right after the call; the checkpoint,
// committed by the collective wait(), holds the values of the call.
TEST(DistributedSave, InTheBackgroundItHoldsTheValuesOfTheCall) {
  TempDir dir;
  const std::string full = dir.file("full.tmap");
  write_full_model(full, 2, 16, 64);
  const std::string index = dir.file("ckpt.tmap.index.json");
  const std::string store = dir.file("store");
  EXPECT_EQ(on_ranks(2, store,
                     [&](int, c10d::ProcessGroup& group) {
                       auto model = build_skeleton([&] { return tp_model(2, 16, 64, 2); });
                       DistributedLoadOptions copy;  // owned memory, as training holds
                       copy.load.mode = LoadMode::Copy;
                       load_distributed(*model, full, group, kSplits, copy);
                       DistributedSaveHandle pending = save_distributed_async(*model, index, group, kSplits);
                       {
                         torch::NoGradGuard no_grad;
                         for (auto& p : model->parameters()) p.add_(1.0f);
                       }
                       pending.wait();
                       return pending.done() ? 0 : 2;
                     }),
            "");
  const StateDict saved = StateDict::open(index), reference = StateDict::open(full);
  for (const std::string& name : reference.keys()) EXPECT_TRUE(saved.at(name).equal(reference.at(name))) << name;
}

// A background save that cannot start on one rank (here rank 1 may open no descriptor,
// so its save gets no pipe for its child): the call returns on both ranks, and wait()
// throws that rank's error on both; nothing is committed.
TEST(DistributedSave, InTheBackgroundAFailureToStartOnOneRankIsThrownAtWaitOnEveryRank) {
#if defined(__SANITIZE_ADDRESS__)
  // The sanitizers' runtime needs descriptors of its own (UBSan probes memory through a
  // pipe before it trusts a vptr): a rank out of descriptors fails in it, not in the save.
  GTEST_SKIP() << "a rank without descriptors breaks the sanitizers' runtime";
#endif
  TempDir dir;
  const std::string index = dir.file("ckpt.tmap.index.json");
  const std::string store = dir.file("store");
  EXPECT_EQ(on_ranks(2, store,
                     [&](int rank, c10d::ProcessGroup& group) {
                       auto model = tp_model(2, 16, 64, 2);
                       if (rank == 1) {
                         const int lowest_free = ::dup(0);
                         ::close(lowest_free);
                         struct rlimit limit {};
                         ::getrlimit(RLIMIT_NOFILE, &limit);
                         limit.rlim_cur = static_cast<rlim_t>(lowest_free);
                         if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) return 4;
                       }
                       DistributedSaveHandle pending;
                       try {
                         pending = save_distributed_async(*model, index, group, kSplits);
                       } catch (const Error&) {
                         return 3;  // at the call: the other rank would wait alone
                       }
                       try {
                         pending.wait();
                       } catch (const Error& e) {
                         const bool named = std::string(e.what()).rfind("rank 1 of 2: ", 0) == 0;
                         return e.kind() == ErrorKind::Io && named ? 0 : 2;
                       }
                       return 1;
                     }),
            "");
  for (const std::string& e : dir.entries()) EXPECT_EQ(e.find(".index.json"), std::string::npos) << e;
}

// A checkpoint saved at 2 ranks, loaded as rank 1 of 4: with the rank files evicted from
// the page cache (mincore confirming it), the load brings in about a quarter of their
// pages, from rank 0's file, where its rows and columns lie. Margin: read-around.
TEST(DistributedSave, ARankOfAnotherWorldSizeReadsOnlyItsShareOfTheRankFiles) {
  TempDir dir;
  const std::string full = dir.file("full.tmap");
  write_full_model(full, 4, 1024, 4096);  // 128 MiB
  const std::string index = dir.file("ckpt.tmap.index.json");
  const std::string store = dir.file("store");
  ASSERT_EQ(on_ranks(2, store,
                     [&](int, c10d::ProcessGroup& group) {
                       auto model = build_skeleton([] { return tp_model(4, 1024, 4096, 2); });
                       load_distributed(*model, full, group, kSplits);
                       save_distributed(*model, index, group, kSplits);  // durable: evictable
                       return 0;
                     }),
            "");
  std::vector<std::string> ranks;
  for (const std::string& e : rank_files(dir)) ranks.push_back(dir.file(e));
  ASSERT_EQ(ranks.size(), 2u);
  auto evict_and_count = [&](bool evict) {
    std::vector<size_t> cached;
    size_t pages = 0;
    for (const std::string& f : ranks) {
      if (evict) evict_page_cache(f);
      const auto [in, total] = cached_pages(f);
      cached.push_back(in);
      pages += total;
    }
    return std::make_pair(cached, pages);
  };
  const auto [before, pages] = evict_and_count(true);
  if (before[0] + before[1] > pages / 50) GTEST_SKIP() << "cannot evict the rank files from the page cache here";
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    evict_and_count(true);
    auto model = build_skeleton([] { return tp_model(4, 1024, 4096, 4); });
    LoadOptions options;
    options.mode = mode;
    options.parallel = ParallelPlan{1, 4, kSplits};
    options.drop_read_pages = false;  // what was read stays cached, to be counted
    load(*model, index, options);
    EXPECT_EQ(compare_parts(*model, StateDict::open(full), 1, 4), "");
    const auto [after, all] = evict_and_count(false);
    std::printf("%s: %zu + %zu of %zu pages cached after loading rank 1 of 4\n", mode == LoadMode::Map ? "map" : "copy",
                after[0], after[1], all);
    EXPECT_LT(after[0] + after[1], all / 4 + all / 10) << "read more than its share";
    EXPECT_GT(after[0] + after[1], all / 4 - all / 50) << "did not read its share";
    // Rank 1's file holds none of its part, only replicated tensors of 4 KiB, each read
    // with the device's read-ahead (up to 8 MiB here): a fraction of the file, not its parts.
    EXPECT_LT(after[1], all / 8) << "read rank 1's parts, which hold none of its part";
  }
}

// In the foreground the models agree before anything is written; in the background the
// call makes no collective, so wait() finds the mismatch, and each rank removes its file.
TEST(DistributedSave, ModelsThatDifferAcrossRanksAreRefusedOnEveryRankAndLeaveNoFile) {
  for (const bool background : {false, true}) {
    TempDir dir;
    const std::string index = dir.file("ckpt.tmap.index.json");
    EXPECT_EQ(on_ranks(2, dir.file("store"),
                       [&](int rank, c10d::ProcessGroup& group) {
                         auto model = tp_model(2, 16, rank == 0 ? 64 : 32, 2);  // rank 1: another shape
                         try {
                           if (background) {
                             DistributedSaveHandle pending = save_distributed_async(*model, index, group, kSplits);
                             pending.wait();
                           } else {
                             save_distributed(*model, index, group, kSplits);
                           }
                         } catch (const Error& e) {
                           const bool named = std::string(e.what()).find("differ at tensor") != std::string::npos;
                           return e.kind() == ErrorKind::ModelMismatch && named ? 0 : 2;
                         }
                         return 1;
                       }),
              "")
        << (background ? "background" : "foreground");
    for (const std::string& e : dir.entries()) EXPECT_EQ(e.rfind("ckpt", 0), std::string::npos) << e;
  }
}

// While a background save of a checkpoint is in flight, another save of it (whose commit
// would remove the files of the first, not yet in the index) is refused on every rank;
// after wait() it goes ahead, and the checkpoint is the second save's.
TEST(DistributedSave, ASecondSaveOfACheckpointInFlightIsRefusedUntilWait) {
  TempDir dir;
  const std::string index = dir.file("ckpt.tmap.index.json");
  EXPECT_EQ(on_ranks(2, dir.file("store"),
                     [&](int, c10d::ProcessGroup& group) {
                       auto model = tp_model(2, 16, 64, 2);
                       DistributedSaveHandle first = save_distributed_async(*model, index, group, kSplits);
                       for (const bool background : {false, true}) {
                         try {
                           if (background) {
                             save_distributed_async(*model, index, group, kSplits).wait();
                           } else {
                             save_distributed(*model, index, group, kSplits);
                           }
                           return 1;
                         } catch (const Error& e) {
                           const bool said = std::string(e.what()).find("in flight") != std::string::npos;
                           if (e.kind() != ErrorKind::InvalidArgument || !said) return 2;
                         }
                       }
                       first.wait();
                       {
                         torch::NoGradGuard no_grad;
                         for (auto& p : model->parameters()) p.fill_(3.0f);
                       }
                       save_distributed(*model, index, group, kSplits);
                       return 0;
                     }),
            "");
  const StateDict saved = StateDict::open(index);
  for (const std::string& name : saved.keys()) EXPECT_TRUE(saved.at(name).eq(3.0f).all().item<bool>()) << name;
  EXPECT_EQ(rank_files(dir).size(), 2u) << "the second save's files, and no other";
}

// Copy mode converts dtypes for a rank's parts too: a checkpoint in F64 loads into F32
// models, by each rank on its own and through a source rank that sends the others theirs.
TEST(Distributed, PartsAreConvertedToTheModelsDtypeInCopyMode) {
  TempDir dir;
  const std::string path = dir.file("full64.tmap");
  torch::manual_seed(7);
  auto whole = tp_model(2, 16, 64, 1);
  whole->to(torch::kDouble);
  save(*whole, path, {4096, {}, false});
  for (int64_t rank = 0; rank < 4; ++rank) {
    auto model = build_skeleton([] { return tp_model(2, 16, 64, 4); });
    LoadOptions options;
    options.mode = LoadMode::Copy;
    options.parallel = ParallelPlan{rank, 4, kSplits};
    load(*model, path, options);
    EXPECT_EQ(model->parameters()[0].scalar_type(), torch::kFloat);
    EXPECT_EQ(compare_parts(*model, StateDict::open(path), rank, 4), "") << "rank " << rank;
  }
  const std::string store = dir.file("store");
  EXPECT_EQ(run_children(2,
                         [&](int rank) {
                           auto group = gloo_group(c10::make_intrusive<c10d::FileStore>(store, 2), rank, 2);
                           return load_and_check(*group, rank == 0 ? path : dir.file("absent"), path, 0,
                                                 LoadMode::Copy);
                         }),
            "");
}

// A problem found by one rank fails every rank with the same error; nobody hangs.
TEST(Distributed, AMismatchOnOneRankFailsEveryRankWithItsMessage) {
  TempDir dir;
  const std::string path = dir.file("full.tmap");
  write_full_model(path, 2, 16, 64);
  for (int source : {-1, 0}) {
    const std::string store = dir.file("store" + std::to_string(source + 1));
    EXPECT_EQ(run_children(2,
                           [&](int rank) {
                             auto group = gloo_group(c10::make_intrusive<c10d::FileStore>(store, 2), rank, 2);
                             // Rank 1 builds its model for 4 ranks: its shapes do not match.
                             auto model = build_skeleton([&] { return tp_model(2, 16, 64, rank == 1 ? 4 : 2); });
                             DistributedLoadOptions options;
                             options.source_rank = source;
                             try {
                               load_distributed(*model, path, *group, kSplits, options);
                             } catch (const Error& e) {
                               const std::string what = e.what();
                               const bool right = e.kind() == ErrorKind::ModelMismatch &&
                                                  what.find("rank 1 of 2") != std::string::npos &&
                                                  what.find("0.up.weight") != std::string::npos;
                               if (!right) std::cerr << "rank " << rank << ": " << what << "\n";
                               for (const auto& [name, t] : named_state(*model)) {
                                 if (!is_released(t)) return 4;  // something was loaded
                               }
                               return right ? 0 : 2;
                             }
                             return 1;
                           }),
              "")
        << "source " << source;
  }
}

}  // namespace
}  // namespace tensormap::testing
