// Deterministic memory checks of the LibTorch layer. CTest runs every test in its own
// process, so the figures of one test are not disturbed by another. Margins are stated
// where they are used.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "../core/support.h"
#include "tensormap/tensormap.h"

namespace tensormap::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;  // ASan's allocator and quarantine distort RSS figures
#else
constexpr bool kSanitized = false;
#endif

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

}  // namespace
}  // namespace tensormap::testing
