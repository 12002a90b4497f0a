// Micro-benchmarks of the torch-free core: open+validate against the tensor count and the
// data size, name lookup, and verify throughput.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "tensormap/core.h"

namespace {

std::string scratch(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("tensormap-bench-" + std::to_string(::getpid()) + "-" + name))
      .string();
}

std::string tensor_name(int64_t i) {
  return "model.layers." + std::to_string(i / 16) + ".mlp.proj_" + std::to_string(i % 16) + ".weight";
}

// A file of `count` tensors of `elements` F32 each; made once per argument set.
std::string make_file(int64_t count, int64_t elements) {
  const std::string path = scratch(std::to_string(count) + "x" + std::to_string(elements) + ".tmap");
  if (std::filesystem::exists(path)) return path;
  std::vector<tensormap::TensorSpec> specs;
  for (int64_t i = 0; i < count; ++i) {
    specs.push_back({tensor_name(i), tensormap::Dtype::F32, {static_cast<uint64_t>(elements)}});
  }
  std::vector<float> data(static_cast<size_t>(elements), 0.5f);
  tensormap::WriterOptions options;
  options.sync = false;
  tensormap::Writer w(path, specs, options);
  for (int64_t i = 0; i < count; ++i) w.write_tensor(data.data(), data.size() * sizeof(float));
  w.commit();
  return path;
}

void BM_OpenValidate_ByTensorCount(benchmark::State& state) {
  const std::string path = make_file(state.range(0), 1);
  for (auto _ : state) {
    auto f = tensormap::File::open(path);
    benchmark::DoNotOptimize(f.tensors().data());
  }
  state.counters["tensors"] = static_cast<double>(state.range(0));
}
BENCHMARK(BM_OpenValidate_ByTensorCount)->RangeMultiplier(10)->Range(1, 100000)->Unit(benchmark::kMillisecond);

// Same 64 tensors, growing data: open must not grow with it.
void BM_OpenValidate_ByDataSize(benchmark::State& state) {
  const int64_t mib = state.range(0);
  const std::string path = make_file(64, mib * (1 << 20) / 64 / 4);
  for (auto _ : state) {
    auto f = tensormap::File::open(path);
    benchmark::DoNotOptimize(f.tensors().data());
  }
  state.counters["data_MiB"] = static_cast<double>(mib);
}
BENCHMARK(BM_OpenValidate_ByDataSize)->Arg(1)->Arg(64)->Arg(1024)->Unit(benchmark::kMicrosecond);

void BM_FindByName(benchmark::State& state) {
  const int64_t count = state.range(0);
  const auto f = tensormap::File::open(make_file(count, 1));
  std::vector<std::string> names;
  for (int64_t i = 0; i < 1024; ++i) names.push_back(tensor_name((i * 7919) % count));
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(f.find(names[i++ & 1023]));
  }
}
BENCHMARK(BM_FindByName)->Arg(100)->Arg(100000);

void BM_VerifyThroughput(benchmark::State& state) {
  const auto f = tensormap::File::open(make_file(64, (256 << 20) / 64 / 4));
  for (auto _ : state) f.verify();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(f.file_size()));
}
BENCHMARK(BM_VerifyThroughput)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  for (const auto& entry : std::filesystem::directory_iterator(std::filesystem::temp_directory_path())) {
    if (entry.path().filename().string().rfind("tensormap-bench-" + std::to_string(::getpid()), 0) == 0) {
      std::filesystem::remove(entry.path());
    }
  }
  return 0;
}
