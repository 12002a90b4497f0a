// Deterministic memory checks of the LibTorch layer. CTest runs every test in its own
// process, so the figures of one test are not disturbed by another. Margins are stated
// where they are used.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "../../src/core/format/header.h"
#include "../core/support.h"
#include "tensormap/tensormap.h"

namespace tensormap::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class Memory : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kSanitized) GTEST_SKIP() << "memory figures are not meaningful under AddressSanitizer";
  }
};

// 16 x Linear(2048, 2048): 16 weights of 16 MiB and 16 biases, 256 MiB in all.
torch::nn::Sequential big_model() {
  torch::nn::Sequential seq;
  for (int i = 0; i < 16; ++i) seq->push_back(torch::nn::Linear(2048, 2048));
  return seq;
}

uint64_t growth(uint64_t before, uint64_t after) { return after > before ? after - before : 0; }

// Saves a 256 MiB checkpoint. The model that wrote it is gone when this returns, and its
// memory with it (large allocations are unmapped on free).
void write_big_checkpoint(const std::string& path) {
  torch::manual_seed(0);
  save(*big_model(), path, {4096, {}, false});
}

TEST_F(Memory, MapLoadOfA256MiBCheckpointGrowsRssAnonByLessThan16MiB) {
  TempDir dir;
  const std::string path = dir.file("big.tmap");
  write_big_checkpoint(path);
  auto model = build_skeleton(big_model);
  const auto before = read_process_memory();
  load(*model, path);
  const auto loaded = read_process_memory();
  EXPECT_LT(growth(before.rss_anon, loaded.rss_anon), 16 * kMiB);
  // Touching every weight reads the file into the page cache: RssFile, not RssAnon.
  double total = 0;
  for (const auto& p : model->parameters()) total += p.sum().item<double>();
  (void)total;
  const auto touched = read_process_memory();
  EXPECT_LT(growth(before.rss_anon, touched.rss_anon), 16 * kMiB);
  EXPECT_GT(growth(before.rss_file, touched.rss_file), 200 * kMiB) << "the weights were read";
}

TEST_F(Memory, SkeletonOfA1GiBModelTakesLessThan16MiBResident) {
  const auto before = read_process_memory();
  auto model = build_skeleton([] {
    torch::nn::Sequential seq;  // 16 x Linear(4096, 4096) = 1 GiB of weights
    for (int i = 0; i < 16; ++i) seq->push_back(torch::nn::Linear(4096, 4096));
    return seq;
  });
  const auto after = read_process_memory();
  EXPECT_LT(growth(before.rss_anon, after.rss_anon), 16 * kMiB);
  EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), 16 * kMiB);
  EXPECT_EQ(model->parameters().size(), 32u);
}

// Large checkpoints are BF16: a skeleton built in F32 is given that dtype with Module::to,
// which on a skeleton allocates nothing, and the file is then mapped into it.
TEST_F(Memory, A1GiBBF16CheckpointMapsIntoABF16SkeletonWithUnder16MiBOfRssAnon) {
  TempDir dir;
  const std::string path = dir.file("bf16.tmap");
  constexpr int kLayers = 32;  // 32 x Linear(4096, 4096) in BF16: 1 GiB of weights
  torch::manual_seed(0);
  const auto x = torch::randn({2, 4096}).to(torch::kBFloat16);
  at::Tensor expected;
  {
    torch::nn::Sequential original;
    for (int i = 0; i < kLayers; ++i) {
      torch::nn::Linear layer(4096, 4096);
      layer->to(torch::kBFloat16);  // one layer at a time: F32 never holds the whole model
      original->push_back(layer);
    }
    expected = original->forward(x);
    save(*original, path);
  }
  ASSERT_GE(std::filesystem::file_size(path), uint64_t{1} << 30);
  const auto before = read_process_memory();
  auto model = build_skeleton([] {
    torch::nn::Sequential seq;
    for (int i = 0; i < kLayers; ++i) seq->push_back(torch::nn::Linear(4096, 4096));
    return seq;
  });
  model->to(torch::kBFloat16);
  const auto converted = read_process_memory();
  load(*model, path);
  const auto loaded = read_process_memory();
  EXPECT_LT(growth(before.rss_anon, converted.rss_anon), 16 * kMiB) << "to() on a skeleton";
  EXPECT_LT(growth(before.rss_anon, loaded.rss_anon), 16 * kMiB);
  EXPECT_EQ(model->parameters().front().scalar_type(), at::kBFloat16);
  EXPECT_TRUE(torch::equal(model->forward(x), expected)) << "the original model's output";
}

TEST_F(Memory, CopyLoadIntoAnAllocatedModelPeaksBelowLargestTensorPlus16MiB) {
  TempDir dir;
  const std::string path = dir.file("big.tmap");
  write_big_checkpoint(path);
  auto model = big_model();  // allocated and initialised: 256 MiB resident
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.zero_();
  }
  ASSERT_TRUE(reset_peak_memory()) << "this kernel does not allow resetting VmHWM";
  const auto before = read_process_memory();
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  load(*model, path, copy);
  const auto after = read_process_memory();
  const uint64_t largest = 2048 * 2048 * 4;
  EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), largest + 16 * kMiB);
  EXPECT_LT(growth(before.rss_file, after.rss_file), 16 * kMiB)
      << "the mapped pages of each tensor are given back after its copy";
  const auto sd = StateDict::open(path);
  EXPECT_TRUE(torch::equal(model[0]->as<torch::nn::Linear>()->weight, sd["0.weight"]));
}

TEST_F(Memory, CopyLoadIntoAReleasedModelEndsAtOneCopy) {
  TempDir dir;
  const std::string path = dir.file("big.tmap");
  write_big_checkpoint(path);
  auto model = build_skeleton(big_model);
  ASSERT_TRUE(reset_peak_memory());
  const auto before = read_process_memory();
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  load(*model, path, copy);
  const auto after = read_process_memory();
  // One copy of the weights (256 MiB) plus at most one tensor's mapped pages.
  EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), 256 * kMiB + 16 * kMiB + 16 * kMiB);
  EXPECT_GT(growth(before.rss_anon, after.rss_anon), 200 * kMiB) << "the weights are owned";
}

TEST_F(Memory, SaveStreamsWithBoundedExtraMemory) {
  TempDir dir;
  auto model = big_model();
  ASSERT_TRUE(reset_peak_memory());
  const auto before = read_process_memory();
  save(*model, dir.file("big.tmap"), {4096, {}, false});
  const auto after = read_process_memory();
  EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), 16 * kMiB);
}

TEST_F(Memory, ConvertingA256MiBCheckpointPeaksBelowLargestTensorPlus16MiB) {
  TempDir dir;
  const std::string path = dir.file("big.tmap");
  write_big_checkpoint(path);
  ASSERT_TRUE(reset_peak_memory());
  const auto before = read_process_memory();
  ConvertOptions options;
  options.sync = false;
  const ConvertResult r = convert(path, dir.file("big.safetensors"), options);
  const auto after = read_process_memory();
  EXPECT_EQ(r.tensors, 32u);
  const uint64_t largest = 2048 * 2048 * 4;
  EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), largest + 16 * kMiB)
      << "input pages are given back tensor by tensor; output goes to the page cache";
}

// One F32 tensor of 1 GiB, written in 16 MiB pieces (the test's own memory stays small):
// element k is k mod 1000003, exact in F32 and in BF16 up to rounding.
constexpr int64_t kGiBElements = int64_t{1} << 28;
float pattern(int64_t k) { return static_cast<float>(k % 1000003); }

void write_one_gib_tensor(const std::string& path) {
  Writer w(path, {{"huge", Dtype::F32, {uint64_t{1} << 14, uint64_t{1} << 14}}}, {4096, {}, false});
  std::vector<float> piece(int64_t{1} << 22);
  for (int64_t at = 0; at < kGiBElements; at += static_cast<int64_t>(piece.size())) {
    for (size_t j = 0; j < piece.size(); ++j) piece[j] = pattern(at + static_cast<int64_t>(j));
    w.write(piece.data(), piece.size() * sizeof(float));
  }
  w.commit();
}

// Converting a checkpoint whose one tensor is 1 GiB, to BF16 safetensors and to torch.save
// unchanged, streams it: the peak grows by tens of MiB, not by the tensor (it once grew by
// 1 GiB, 1.5 GiB to BF16).
TEST_F(Memory, ConvertingA1GiBTensorPeaksUnder48MiBWhateverTheDtype) {
  TempDir dir;
  const std::string path = dir.file("huge.tmap");
  write_one_gib_tensor(path);
  for (const char* out : {"huge.safetensors", "huge.pt"}) {
    ASSERT_TRUE(reset_peak_memory());
    const auto before = read_process_memory();
    ConvertOptions options;
    options.sync = false;
    if (std::string(out) == "huge.safetensors") options.float_dtype = Dtype::BF16;
    convert(path, dir.file(out), options);
    const auto after = read_process_memory();
    std::printf("convert of a 1 GiB tensor to %s: peak grew by %.1f MiB\n", out,
                static_cast<double>(growth(before.vm_hwm, after.vm_hwm)) / kMiB);
    EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), 48 * kMiB) << out;
    const Checkpoint c = Checkpoint::open(dir.file(out));
    const int64_t row = (int64_t{1} << 14) - 1;  // the last row: the end of the last piece
    at::Tensor last = torch::empty({1, int64_t{1} << 14}, options.float_dtype ? torch::kBFloat16 : torch::kFloat32);
    c.read("huge", 0, row, 1, last.data_ptr());
    const at::Tensor expected =
        (torch::arange(row << 14, (row + 1) << 14, torch::kInt64) % 1000003).to(last.scalar_type()).view({1, -1});
    EXPECT_TRUE(torch::equal(last, expected)) << out;
    std::filesystem::remove(dir.file(out));
  }
}

// Saving a 1 GiB tensor that is not contiguous (a transposed matrix) copies it in pieces:
// the peak grows by tens of MiB, not by a contiguous copy of the tensor.
TEST_F(Memory, SavingANonContiguous1GiBTensorPeaksUnder48MiB) {
  TempDir dir;
  const at::Tensor matrix = torch::arange(kGiBElements, torch::kFloat32).view({int64_t{1} << 14, int64_t{1} << 14});
  const at::Tensor transposed = matrix.t();
  ASSERT_FALSE(transposed.is_contiguous());
  ASSERT_TRUE(reset_peak_memory());
  const auto before = read_process_memory();
  save({{"t", transposed}}, dir.file("t.tmap"), {4096, {}, false});
  const auto after = read_process_memory();
  std::printf("save of a transposed 1 GiB tensor: peak grew by %.1f MiB\n",
              static_cast<double>(growth(before.vm_hwm, after.vm_hwm)) / kMiB);
  EXPECT_LT(growth(before.vm_hwm, after.vm_hwm), 48 * kMiB);
  const auto sd = StateDict::open(dir.file("t.tmap"));
  EXPECT_TRUE(torch::equal(sd["t"], transposed));
}

// --- the page cache after a copy-mode load ------------------------------------------------

// 16 x Linear(4096, 4096), zeros: 1 GiB, written in pieces and synced, so that the page
// cache can then give its pages back.
torch::nn::Sequential gib_model() {
  torch::nn::Sequential seq;
  for (int i = 0; i < 16; ++i) seq->push_back(torch::nn::Linear(4096, 4096));
  return seq;
}

void write_gib_checkpoint(const std::string& path) {
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 16; ++i) {
    specs.push_back({std::to_string(i) + ".weight", Dtype::F32, {4096, 4096}});
    specs.push_back({std::to_string(i) + ".bias", Dtype::F32, {4096}});
  }
  Writer w(path, specs, {4096, {}, true});
  const std::vector<float> zeros(4096 * 256, 0.5f);
  while (w.current_tensor() < w.tensor_count()) {
    const uint64_t left = w.byte_length(w.current_tensor());
    w.write(zeros.data(), std::min<uint64_t>(left, zeros.size() * sizeof(float)));
  }
  w.commit();
}

// The fraction of the file's pages in the page cache.
double cached(const std::string& path) {
  const auto [in_cache, pages] = cached_pages(path);
  return static_cast<double>(in_cache) / static_cast<double>(pages);
}

// A cold copy-mode load of 1 GiB leaves under 5% of the file in the page cache: the
// process's owned copy is the one copy in memory. A warm file stays cached, and
// drop_read_pages = false keeps what it read (the test can tell the difference).
TEST_F(Memory, ACopyLoadLeavesNoCopyInThePageCache) {
  TempDir dir;
  const std::string path = dir.file("gib.tmap");
  write_gib_checkpoint(path);
  evict_page_cache(path);
  if (cached(path) > 0.02) GTEST_SKIP() << "cannot evict the file from the page cache here";
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  {
    auto model = build_skeleton(gib_model);
    load(*model, path, copy);
    std::printf("cold copy-mode load of 1 GiB: %.1f%% of the file cached after\n", 100 * cached(path));
    EXPECT_LT(cached(path), 0.05);
    EXPECT_EQ(model[15]->as<torch::nn::Linear>()->weight[4095][4095].item<float>(), 0.5f);
  }
  {  // warm: everything cached before stays
    const File f = File::open(path);
    f.verify();  // reads every byte
    ASSERT_GT(cached(path), 0.95);
    auto model = build_skeleton(gib_model);
    load(*model, path, copy);
    EXPECT_GT(cached(path), 0.95) << "a warm file's pages were dropped";
  }
  {  // kept on request
    evict_page_cache(path);
    auto model = build_skeleton(gib_model);
    LoadOptions keep = copy;
    keep.drop_read_pages = false;
    load(*model, path, keep);
    EXPECT_GT(cached(path), 0.90) << "drop_read_pages = false dropped pages";
  }
}

// --- checkpoints larger than memory ---------------------------------------------------

// A valid tensormap file of `layers` F32 [width, width] tensors named as a Sequential of
// bias-free Linear layers names them, every byte zero, written sparse: the header, then a
// hole to the end. It takes no disk, and every read of it comes from the page cache.
void write_sparse_checkpoint(const std::string& path, int layers, int64_t width) {
  const uint64_t bytes = static_cast<uint64_t>(width * width) * 4;
  std::vector<TensorSpec> specs;
  for (int i = 0; i < layers; ++i) {
    specs.push_back({std::to_string(i) + ".weight", Dtype::F32, {uint64_t(width), uint64_t(width)}});
  }
  WriterOptions options;
  const detail::Layout layout = detail::plan_layout(specs, std::vector<uint64_t>(specs.size(), bytes),
                                                    std::vector<std::optional<size_t>>(specs.size()), options, path);
  std::vector<unsigned char> zeros(16 << 20, 0);
  XXH3_state_t* hash = XXH3_createState();
  XXH3_64bits_reset(hash);
  for (uint64_t done = 0; done < bytes; done += zeros.size()) XXH3_64bits_update(hash, zeros.data(), zeros.size());
  const std::vector<uint64_t> checksums(specs.size(), XXH3_64bits_digest(hash));
  XXH3_freeState(hash);
  const auto header = detail::encode_header(specs, options, layout, checksums);
  const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, header.data(), header.size(), 0), static_cast<ssize_t>(header.size()));
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(layout.file_size)), 0);
  ::close(fd);
}

// A checkpoint 1.25x the machine's memory (sparse: no disk is spent) opens, verifies and
// map-loads, and a forward pass runs through every layer: the kernel pages the weights
// in and out of the page cache, and the process's own memory stays at what LibTorch
// needs. Opening once failed with "cannot map the file: Cannot allocate memory": a
// private writable mapping larger than memory and swap is refused by the overcommit
// heuristic unless it is MAP_NORESERVE. Run alone (ctest's larger_than_memory.*, serial):
// it streams more than the machine's memory through the page cache.
TEST(LargerThanMemory, ACheckpoint125PercentOfMemoryOpensVerifiesAndRunsAForwardPassInMapMode) {
  if (!std::getenv("TENSORMAP_LARGER_THAN_MEMORY")) {
    GTEST_SKIP() << "run by ctest as larger_than_memory.sparse_checkpoint_map_load, alone";
  }
  constexpr int64_t kWidth = 8192;  // 256 MiB a layer
  const uint64_t layer_bytes = uint64_t{kWidth * kWidth} * 4, memory = tensormap::total_memory();
  ASSERT_GT(memory, 0u);
  const int layers = static_cast<int>((memory + memory / 4) / layer_bytes + 1);
  TempDir dir;
  const std::string path = dir.file("larger-than-memory.tmap");
  write_sparse_checkpoint(path, layers, kWidth);
  const auto start = std::chrono::steady_clock::now();
  const File file = File::open(path);
  ASSERT_GT(file.file_size(), memory + memory / 4);
  EXPECT_EQ(file.tensors().size(), static_cast<size_t>(layers));
  const auto problems = file.find_corruption();  // every byte, read with pread
  EXPECT_TRUE(problems.empty()) << problems.front().what();
  const auto verified = std::chrono::steady_clock::now();

  auto model = build_skeleton([&] {
    torch::nn::Sequential seq;
    for (int i = 0; i < layers; ++i)
      seq->push_back(torch::nn::Linear(torch::nn::LinearOptions(kWidth, kWidth).bias(false)));
    return seq;
  });
  const auto before = read_process_memory();
  LoadOptions options;
  options.mode = LoadMode::Map;
  const LoadReport report = load(*model, path, options);
  EXPECT_TRUE(report.complete()) << report.summary();
  torch::NoGradGuard no_grad;
  const at::Tensor out = model->forward(torch::ones({1, kWidth}));
  EXPECT_TRUE(torch::equal(out, torch::zeros({1, kWidth})));
  const auto after = read_process_memory();
  const auto done = std::chrono::steady_clock::now();
  if (!kSanitized) {
    EXPECT_LT(growth(before.rss_anon, after.rss_anon), 256 * kMiB) << "the weights stay file pages";
  }
  const auto seconds = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  std::printf(
      "%d layers, %.1f GiB (MemTotal %.1f GiB): open + verify %.1f s, load + forward %.1f s, "
      "RssAnon +%.0f MiB\n",
      layers, double(file.file_size()) / (1 << 30), double(memory) / (1 << 30), seconds(start, verified),
      seconds(verified, done), double(growth(before.rss_anon, after.rss_anon)) / kMiB);
}

// After save() and a map-mode load, the weights are mapped with 2 MiB page-table entries
// (FilePmdMapped), where the kernel's page cache has 2 MiB folios for the filesystem.
TEST_F(Memory, ASavedCheckpointMapLoadsWith2MiBPages) {
  TempDir dir;
  std::string why;
  if (!page_cache_has_huge_folios(dir.path().string(), why)) GTEST_SKIP() << why;
  const std::string path = dir.file("big.tmap");
  write_big_checkpoint(path);
  auto model = build_skeleton(big_model);
  load(*model, path);
  prefault(*model);
  EXPECT_GE(huge_mapped_share(path), 0.9);
  // The same through torch.save and safetensors files that tensormap wrote.
  for (const std::string ext : {"pt", "safetensors"}) {
    const std::string other = dir.file("big." + ext);
    convert(path, other);
    auto again = build_skeleton(big_model);
    load(*again, other);
    prefault(*again);
    EXPECT_GE(huge_mapped_share(other), 0.9) << ext;
  }
}

}  // namespace
}  // namespace tensormap::testing
