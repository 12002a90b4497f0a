// tensormap-demo: the main job. Builds a model (about 1 GiB by default), saves it with
// tensormap and with torch::save, then loads it in a fresh process per strategy and
// prints wall time and memory for each:
//
//   tensormap map    skeleton construction + map-mode load (zero-copy)
//   tensormap copy   skeleton construction + copy-mode load (owned memory)
//   torch::load      normal construction + torch::load of a LibTorch archive
//   copy into built  normal construction + tensormap copy-mode load into it
//
// After each load it runs one full forward pass (the moment a lazy load actually reads
// the weights) and reports memory again, so a mapping that touched nothing is never
// mistaken for a finished load.
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "tensormap/tensormap.h"

namespace {

constexpr int64_t kWidth = 768;  // model width; each block holds 4.7 M parameters

// A transformer-style MLP block: Linear(d, 4d), GELU, Linear(4d, d), residual, LayerNorm.
struct MlpBlockImpl : torch::nn::Module {
  MlpBlockImpl()
      : up(register_module("up", torch::nn::Linear(kWidth, 4 * kWidth))),
        down(register_module("down", torch::nn::Linear(4 * kWidth, kWidth))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kWidth})))) {}
  torch::Tensor forward(torch::Tensor x) { return norm(x + down(torch::gelu(up(x)))); }
  torch::nn::Linear up, down;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(MlpBlock);

torch::nn::Sequential make_model(int64_t blocks) {
  torch::nn::Sequential model;
  for (int64_t i = 0; i < blocks; ++i) model->push_back(MlpBlock());
  return model;
}

int64_t blocks_for(double size_mib) {
  const double block_bytes = 4.0 * (2 * kWidth * 4 * kWidth + 4 * kWidth + kWidth + 2 * kWidth);
  return std::max<int64_t>(1, static_cast<int64_t>(size_mib * 1048576.0 / block_bytes + 0.5));
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double mib(uint64_t bytes) { return static_cast<double>(bytes) / 1048576.0; }

// One child run: prints "key=value" pairs on one line for the parent to collect.
int run_child(const std::string& strategy, const std::string& dir, int64_t blocks) {
  const std::string tmap = dir + "/model.tmap";
  const std::string archive = dir + "/model.pt";
  std::map<std::string, double> out;
  torch::manual_seed(0);

  if (strategy == "save") {
    double t0 = now_ms();
    auto model = make_model(blocks);
    out["build_ms"] = now_ms() - t0;
    tensormap::reset_peak_memory();
    t0 = now_ms();
    tensormap::save(*model, tmap);
    out["load_ms"] = now_ms() - t0;  // the "load" column holds the save time here
    out["hwm_after_load"] = mib(tensormap::read_process_memory().vm_hwm);
    t0 = now_ms();
    torch::save(model, archive);
    out["torch_save_ms"] = now_ms() - t0;
    out["tensors"] = static_cast<double>(tensormap::named_state(*model).size());
    out["file_mib"] = mib(std::filesystem::file_size(tmap));
  } else {
    torch::nn::Sequential model{nullptr};
    double t0 = now_ms();
    if (strategy == "map" || strategy == "copy") {
      model = tensormap::build_skeleton([&] { return make_model(blocks); });
    } else {
      model = make_model(blocks);
    }
    out["build_ms"] = now_ms() - t0;
    t0 = now_ms();
    if (strategy == "map") {
      tensormap::load(*model, tmap);
    } else if (strategy == "copy" || strategy == "copy_into_built") {
      tensormap::LoadOptions copy;
      copy.mode = tensormap::LoadMode::Copy;
      tensormap::load(*model, tmap, copy);
    } else if (strategy == "torch_load") {
      torch::load(model, archive);
    } else {
      std::fprintf(stderr, "unknown strategy %s\n", strategy.c_str());
      return 2;
    }
    out["load_ms"] = now_ms() - t0;
    auto m = tensormap::read_process_memory();
    out["hwm_after_load"] = mib(m.vm_hwm);
    out["anon_after_load"] = mib(m.rss_anon);
    out["file_after_load"] = mib(m.rss_file);
    torch::NoGradGuard no_grad;
    t0 = now_ms();
    const auto y = model->forward(torch::ones({1, kWidth}));
    out["forward_ms"] = now_ms() - t0;
    out["checksum"] = y.sum().item<double>();
    m = tensormap::read_process_memory();
    out["hwm_after_forward"] = mib(m.vm_hwm);
    out["anon_after_forward"] = mib(m.rss_anon);
    out["file_after_forward"] = mib(m.rss_file);
  }
  for (const auto& [k, v] : out) std::printf("%s=%.6g ", k.c_str(), v);
  std::printf("\n");
  return 0;
}

std::map<std::string, double> spawn(const std::string& self, const std::string& strategy, const std::string& dir,
                                    int64_t blocks) {
  const std::string command =
      "'" + self + "' --child " + strategy + " --dir '" + dir + "' --blocks " + std::to_string(blocks);
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) throw std::runtime_error("cannot start " + command);
  std::string text;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, pipe)) text.append(buf, n);
  const int status = ::pclose(pipe);
  if (status != 0) throw std::runtime_error("run '" + strategy + "' failed (status " + std::to_string(status) + ")");
  std::map<std::string, double> out;
  std::istringstream in(text);
  std::string item;
  while (in >> item) {
    const auto eq = item.find('=');
    if (eq != std::string::npos) out[item.substr(0, eq)] = std::stod(item.substr(eq + 1));
  }
  return out;
}

void usage() {
  std::printf(
      "usage: tensormap-demo [--size-mib N] [--dir DIR] [--keep]\n"
      "  --size-mib N  model size in MiB (default 1024)\n"
      "  --dir DIR     where the checkpoints go (default: a new folder under /tmp)\n"
      "  --keep        keep the checkpoints afterwards\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string child, dir;
  double size_mib = 1024;
  int64_t blocks = 0;
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage();
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--child")
      child = next();
    else if (a == "--dir")
      dir = next();
    else if (a == "--blocks")
      blocks = std::stoll(next());
    else if (a == "--size-mib")
      size_mib = std::stod(next());
    else if (a == "--keep")
      keep = true;
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  try {
    if (!child.empty()) return run_child(child, dir, blocks);

    blocks = blocks_for(size_mib);
    const bool own_dir = dir.empty();
    if (own_dir)
      dir = (std::filesystem::temp_directory_path() / ("tensormap-demo-" + std::to_string(::getpid()))).string();
    std::filesystem::create_directories(dir);
    const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();

    std::printf("tensormap demo: %lld blocks of width %lld, checkpoints in %s\n", static_cast<long long>(blocks),
                static_cast<long long>(kWidth), dir.c_str());
    const auto saved = spawn(self, "save", dir, blocks);
    std::printf("model: %.0f tensors, %.1f MiB; built in %.0f ms\n", saved.at("tensors"), saved.at("file_mib"),
                saved.at("build_ms"));
    std::printf("save: tensormap %.0f ms (peak %.0f MiB, model included), torch::save %.0f ms\n\n", saved.at("load_ms"),
                saved.at("hwm_after_load"), saved.at("torch_save_ms"));

    struct Row {
      const char* label;
      const char* strategy;
    };
    const Row rows[] = {{"tensormap map", "map"},
                        {"tensormap copy", "copy"},
                        {"torch::load", "torch_load"},
                        {"copy into built", "copy_into_built"}};
    std::printf("| %-16s | %9s | %9s | %9s | %10s | %9s | %11s | %11s | %16s | %18s |\n", "strategy", "build ms",
                "load ms", "total ms", "forward ms", "VmHWM MiB", "RssAnon MiB", "RssFile MiB", "RssAnon fwd MiB",
                "RssFile fwd MiB");
    std::printf(
        "|------------------|-----------|-----------|-----------|------------|-----------|-------------|-------------|------------------|--------------------|\n");
    double reference = 0;
    bool agree = true;
    for (const Row& row : rows) {
      const auto r = spawn(self, row.strategy, dir, blocks);
      if (row.strategy == std::string("map")) reference = r.at("checksum");
      agree = agree && r.at("checksum") == reference;
      std::printf("| %-16s | %9.1f | %9.1f | %9.1f | %10.1f | %9.0f | %11.0f | %11.0f | %16.0f | %18.0f |\n", row.label,
                  r.at("build_ms"), r.at("load_ms"), r.at("build_ms") + r.at("load_ms"), r.at("forward_ms"),
                  r.at("hwm_after_forward"), r.at("anon_after_load"), r.at("file_after_load"),
                  r.at("anon_after_forward"), r.at("file_after_forward"));
    }
    std::printf(
        "\nVmHWM is the process peak up to the end of the forward pass. Every strategy "
        "%s on the model's output.\n",
        agree ? "agrees" : "DOES NOT AGREE");
    if (own_dir && !keep) std::filesystem::remove_all(dir);
    return agree ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tensormap-demo: %s\n", e.what());
    return 1;
  }
}
