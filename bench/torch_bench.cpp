// Micro-benchmarks of the LibTorch layer: skeleton construction, and map-mode binding
// against model size (fixed tensor count) and against tensor count.
#include <benchmark/benchmark.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include "tensormap/tensormap.h"

namespace {

// layers x Linear(width, width): 2 * layers tensors.
torch::nn::Sequential linear_stack(int64_t layers, int64_t width) {
  torch::nn::Sequential seq;
  for (int64_t i = 0; i < layers; ++i) seq->push_back(torch::nn::Linear(width, width));
  return seq;
}

// The checkpoint of linear_stack(layers, width), written with the core writer (zeros),
// so that making a 1 GiB file does not cost a 1 GiB random initialisation.
std::string checkpoint(int64_t layers, int64_t width) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("tensormap-torchbench-" + std::to_string(::getpid()) + "-" +
                                                 std::to_string(layers) + "x" + std::to_string(width) + ".tmap"))
          .string();
  if (std::filesystem::exists(path)) return path;
  std::vector<tensormap::TensorSpec> specs;
  const auto w = static_cast<uint64_t>(width);
  for (int64_t i = 0; i < layers; ++i) {
    specs.push_back({std::to_string(i) + ".weight", tensormap::Dtype::F32, {w, w}});
    specs.push_back({std::to_string(i) + ".bias", tensormap::Dtype::F32, {w}});
  }
  tensormap::WriterOptions options;
  options.sync = false;
  tensormap::Writer writer(path, specs, options);
  std::vector<char> zeros(w * w * 4, 0);
  for (size_t i = 0; i < specs.size(); ++i) writer.write_tensor(zeros.data(), writer.byte_length(i));
  writer.commit();
  return path;
}

void map_load(benchmark::State& state, int64_t layers, int64_t width) {
  const std::string path = checkpoint(layers, width);
  auto model = tensormap::build_skeleton([&] { return linear_stack(layers, width); });
  for (auto _ : state) {
    tensormap::load(*model, path);
    state.PauseTiming();
    tensormap::release(*model);
    state.ResumeTiming();
  }
  state.counters["tensors"] = static_cast<double>(2 * layers);
  state.counters["model_MiB"] = static_cast<double>(std::filesystem::file_size(path)) / (1 << 20);
}

// 300 tensors, growing size: the time must not grow with the bytes.
void BM_MapLoad_300Tensors_BySize(benchmark::State& state) {
  const double mib = static_cast<double>(state.range(0));
  const auto width = static_cast<int64_t>(std::sqrt(mib * (1 << 20) / (150 * 4.0)));
  map_load(state, 150, width);
}
BENCHMARK(BM_MapLoad_300Tensors_BySize)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);

void BM_MapLoad_ByTensorCount(benchmark::State& state) { map_load(state, state.range(0) / 2, 16); }
BENCHMARK(BM_MapLoad_ByTensorCount)->Arg(100)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);

// The same 300 tensors (256 MiB) in each format: tensormap, safetensors, torch.save.
void BM_MapLoad_256MiB_ByFormat(benchmark::State& state) {
  static const char* kNames[] = {"tensormap", "safetensors", "torch.save"};
  const int64_t width = static_cast<int64_t>(std::sqrt(256.0 * (1 << 20) / (150 * 4.0)));
  std::string path = checkpoint(150, width);
  if (state.range(0) > 0) {
    const std::string other = path + (state.range(0) == 1 ? ".safetensors" : ".pt");
    if (!std::filesystem::exists(other)) {
      tensormap::ConvertOptions options;
      options.sync = false;
      tensormap::convert(path, other, options);
    }
    path = other;
  }
  auto model = tensormap::build_skeleton([&] { return linear_stack(150, width); });
  for (auto _ : state) {
    tensormap::load(*model, path);
    state.PauseTiming();
    tensormap::release(*model);
    state.ResumeTiming();
  }
  state.SetLabel(kNames[state.range(0)]);
}
BENCHMARK(BM_MapLoad_256MiB_ByFormat)->DenseRange(0, 2)->Unit(benchmark::kMillisecond);

// Conversion (tensormap -> safetensors) against a plain copy of the same file, both
// without fsync, in the same run; the extra peak memory of the conversion as a counter.
void BM_Convert_ToSafetensors(benchmark::State& state) {
  const int64_t mib = state.range(0);
  const int64_t width = static_cast<int64_t>(std::sqrt(static_cast<double>(mib) * (1 << 20) / (150 * 4.0)));
  const std::string in = checkpoint(150, width);
  const std::string out = in + ".out.safetensors";
  double peak_extra = 0;
  for (auto _ : state) {
    tensormap::reset_peak_memory();
    const uint64_t before = tensormap::read_process_memory().vm_rss;
    tensormap::ConvertOptions options;
    options.sync = false;
    tensormap::convert(in, out, options);
    const uint64_t hwm = tensormap::read_process_memory().vm_hwm;
    peak_extra = std::max(peak_extra, static_cast<double>(hwm - std::min(hwm, before)) / (1 << 20));
  }
  std::filesystem::remove(out);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(std::filesystem::file_size(in)));
  state.counters["peak_extra_MiB"] = peak_extra;
}
BENCHMARK(BM_Convert_ToSafetensors)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_PlainFileCopy(benchmark::State& state) {
  const int64_t mib = state.range(0);
  const int64_t width = static_cast<int64_t>(std::sqrt(static_cast<double>(mib) * (1 << 20) / (150 * 4.0)));
  const std::string in = checkpoint(150, width);
  const std::string out = in + ".copy";
  std::vector<char> buffer(1 << 20);
  for (auto _ : state) {
    FILE* src = std::fopen(in.c_str(), "rb");
    FILE* dst = std::fopen(out.c_str(), "wb");
    size_t n;
    while ((n = std::fread(buffer.data(), 1, buffer.size(), src)) > 0) std::fwrite(buffer.data(), 1, n, dst);
    std::fclose(src);
    std::fclose(dst);
  }
  std::filesystem::remove(out);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(std::filesystem::file_size(in)));
}
BENCHMARK(BM_PlainFileCopy)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_SkeletonBuild_1GiB(benchmark::State& state) {
  for (auto _ : state) {
    auto model = tensormap::build_skeleton([] { return linear_stack(16, 4096); });
    benchmark::DoNotOptimize(model.ptr().get());
  }
}
BENCHMARK(BM_SkeletonBuild_1GiB)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  const std::string prefix = "tensormap-torchbench-" + std::to_string(::getpid());  // and derived files
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path())) {
    if (e.path().filename().string().rfind(prefix, 0) == 0) std::filesystem::remove(e.path());
  }
  return 0;
}
