// The end-to-end benchmark harness: one measurement per process.
//
// bench/run_suite.py drives it; each call below runs in a fresh process, so that one
// strategy's memory never counts against another's. Every `run` prints one JSON object.
//
//   tensormap_harness make     --dir D --mib N        checkpoints of an N MiB model, 4 formats
//   tensormap_harness run      --dir D --mib N --strategy S [--cold]
//   tensormap_harness memcpy   --mib N                memcpy bandwidth, 2 threads
//   tensormap_harness seqread  --file F [--cold]      sequential pread bandwidth
//   tensormap_harness evict    --file F               drop F from the page cache (for bench/peers.py)
//   tensormap_harness seqwrite --dir D --mib N        write + fsync bandwidth
//   tensormap_harness save     --dir D --mib N --strategy tensormap|torch
//   tensormap_harness hold     --dir D --mib N        map-load, fault in, wait for stdin
//   tensormap_harness tp       --dir D --mib N --ranks R --mode map|copy [--source 0]
//   tensormap_harness part     --dir D --mib N --ranks R --rank K --mode map|copy [--url U] [--resident] [--no-verify]
//   tensormap_harness forward  --dir D --mib N --strategy S [--cold] [--passes 5] [--file F]
//                              build, load, first forward pass, steady-state passes
//   tensormap_harness huge     --dir D [--ratio 1.25]  a model larger than memory: cold
//                              sequential read against map-load + one forward pass
//                              rank K's part alone, in one process, with no process group
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tensormap/distributed.h"
#include "tensormap/tensormap.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// The benchmark model: Megatron-style blocks of d=2048, h=4096 (64 MiB each in F32):
// `up` column-parallel, `down` row-parallel, a replicated LayerNorm. world = 1: whole.
constexpr int64_t kD = 2048, kH = 4096;
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t world)
      : up(register_module("up", torch::nn::Linear(kD, kH / world))),
        down(register_module("down", torch::nn::Linear(kH / world, kD))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kD})))) {}
  torch::nn::Linear up, down;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(Block);

int64_t layers_for(int64_t mib) { return std::max<int64_t>(1, mib / 64); }

torch::nn::ModuleList make_model(int64_t mib, int64_t world = 1) {
  torch::nn::ModuleList list;
  for (int64_t i = 0; i < layers_for(mib); ++i) list->push_back(Block(world));
  return list;
}

const std::vector<std::pair<std::string, int64_t>> kSplits = {{"*.up.*", 0}, {"*.down.weight", 1}};

std::string file_of(const std::string& dir, int64_t mib, const std::string& ext) {
  return dir + "/model-" + std::to_string(mib) + "." + ext;
}

struct Args {
  std::map<std::string, std::string> values;
  std::string get(const std::string& key, const std::string& fallback = "") const {
    auto it = values.find(key);
    return it == values.end() ? fallback : it->second;
  }
  bool has(const std::string& key) const { return values.count(key) > 0; }
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 2; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0) continue;
    k = k.substr(2);
    if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
      a.values[k] = argv[++i];
    } else {
      a.values[k] = "1";
    }
  }
  return a;
}

// --- JSON output: a flat object of numbers and strings -----------------------------------
struct Json {
  std::ostringstream out;
  bool first = true;
  Json& num(const std::string& k, double v) {
    out << (first ? "{" : ", ") << '"' << k << "\": " << v;
    first = false;
    return *this;
  }
  Json& str(const std::string& k, const std::string& v) {
    out << (first ? "{" : ", ") << '"' << k << "\": \"";
    for (char c : v) {
      if (c == '"' || c == '\\') out << '\\';
      out << (static_cast<unsigned char>(c) < 0x20 ? ' ' : c);
    }
    out << '"';
    first = false;
    return *this;
  }
  Json& memory(const std::string& prefix, const tensormap::ProcessMemory& m) {
    const double mib = 1048576.0;
    return num(prefix + "_hwm_mib", m.vm_hwm / mib)
        .num(prefix + "_anon_mib", m.rss_anon / mib)
        .num(prefix + "_file_mib", m.rss_file / mib)
        .num(prefix + "_pss_mib", m.pss / mib);
  }
  void print() {
    out << (first ? "{}" : "}");
    std::cout << out.str() << std::endl;
  }
};

// --- page cache -----------------------------------------------------------------------------

void sync_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// The fraction of the file's pages in the page cache, measured with mincore.
double cached_fraction(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return 1;
  const auto size = static_cast<size_t>(::lseek(fd, 0, SEEK_END));
  double cached = 0;
  if (size > 0) {
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> in_core((size + page - 1) / page);
    ::mincore(map, size, in_core.data());
    ::munmap(map, size);
    size_t n = 0;
    for (unsigned char c : in_core) n += c & 1;
    cached = static_cast<double>(n) / static_cast<double>(in_core.size());
  }
  ::close(fd);
  return cached;
}

// Drops the file's clean pages from the page cache; returns the fraction still cached
// afterwards.
double evict(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return 1;
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  return cached_fraction(path);
}

// One byte per 4 KiB page, in order, on one thread: the naive full touch.
double touch_naive(const torch::nn::Module& module) {
  volatile unsigned char sink = 0;
  for (const auto& [name, t] : tensormap::named_state(module)) {
    const auto* p = static_cast<const unsigned char*>(t.data_ptr());
    for (size_t i = 0; i < t.nbytes(); i += 4096) sink = sink + p[i];
  }
  return sink;
}

// --- make -----------------------------------------------------------------------------------

int cmd_make(const Args& a) {
  const std::string dir = a.get("dir");
  const int64_t mib = std::stoll(a.get("mib"));
  fs::create_directories(dir);
  const std::string tmap = file_of(dir, mib, "tmap");
  if (!fs::exists(tmap)) {
    // Deterministic, cheap weights: a scaled ramp, written tensor by tensor.
    auto model = tensormap::build_skeleton([&] { return make_model(mib); });
    std::vector<tensormap::TensorSpec> specs;
    for (const auto& [name, t] : tensormap::named_state(*model)) {
      specs.push_back({name, tensormap::Dtype::F32, std::vector<uint64_t>(t.sizes().begin(), t.sizes().end())});
    }
    tensormap::Writer writer(tmap, specs, {});
    std::vector<float> buffer;
    for (size_t i = 0; i < specs.size(); ++i) {
      buffer.resize(writer.byte_length(i) / 4);
      for (size_t j = 0; j < buffer.size(); ++j) buffer[j] = static_cast<float>((j + i) % 251) * 1e-3f;
      writer.write_tensor(buffer.data(), buffer.size() * 4);
    }
    writer.commit();
  }
  for (const auto& [ext, format] : std::vector<std::pair<std::string, tensormap::Format>>{
           {"safetensors", tensormap::Format::Safetensors}, {"pt", tensormap::Format::TorchSave}}) {
    const std::string out = file_of(dir, mib, ext);
    if (fs::exists(out)) continue;
    tensormap::ConvertOptions options;
    options.format = format;
    tensormap::convert(tmap, out, options);
  }
  const std::string archive = file_of(dir, mib, "archive");
  if (!fs::exists(archive)) {
    auto model = tensormap::build_skeleton([&] { return make_model(mib); });
    tensormap::load(*model, tmap);
    torch::save(model, archive);
    sync_file(archive);
  }
  return 0;
}

// --- run: one loading strategy ----------------------------------------------------------------

int cmd_run(const Args& a) {
  const std::string dir = a.get("dir"), strategy = a.get("strategy");
  const int64_t mib = std::stoll(a.get("mib"));
  const bool cold = a.has("cold");
  const std::map<std::string, std::string> file_for = {
      {"tensormap-map", "tmap"},           {"tensormap-map-naive-touch", "tmap"},
      {"tensormap-copy", "tmap"},          {"tensormap-copy-keep-cache", "tmap"},
      {"tensormap-copy-verified", "tmap"}, {"tensormap-copy-huge", "tmap"},
      {"safetensors-map", "safetensors"},  {"torchsave-map", "pt"},
      {"torch-load", "archive"},           {"torch-pickle-load", "pt"},
      {"seed-load-then-rebind", "archive"}};
  if (!file_for.count(strategy)) {
    std::cerr << "unknown strategy " << strategy << "\n";
    return 2;
  }
  const std::string path = file_of(dir, mib, file_for.at(strategy));
  const double cached = cold ? evict(path) : -1;
  Json out;
  out.str("strategy", strategy).num("mib", static_cast<double>(mib)).str("cache", cold ? "cold" : "warm");
  if (cold) out.num("cached_fraction_before", cached);
  out.num("tensors", static_cast<double>(layers_for(mib) * 6));
  tensormap::reset_peak_memory();
  const auto base = tensormap::read_process_memory();
  out.memory("base", base);

  torch::nn::ModuleList model{nullptr};
  const bool constructs = strategy == "torch-load" || strategy == "torch-pickle-load";
  auto t0 = Clock::now();
  if (constructs) {
    model = make_model(mib);
  } else if (strategy == "seed-load-then-rebind") {
    // The seed's "meta" model: constructed without initialising, so its (untouched)
    // storage costs nothing until each parameter is given the loaded one.
    tensormap::SkeletonScope scope;
    model = make_model(mib);
  } else {
    model = tensormap::build_skeleton([&] { return make_model(mib); });
  }
  out.num("build_ms", ms_since(t0));

  t0 = Clock::now();
  std::string note;
  try {
    if (strategy.rfind("tensormap-copy", 0) == 0) {
      tensormap::LoadOptions o;
      o.mode = tensormap::LoadMode::Copy;
      o.drop_read_pages = strategy != "tensormap-copy-keep-cache";  // copy mode before issue 15
      o.verify_checksums = strategy == "tensormap-copy-verified";   // explicit, whatever the default
      o.huge_pages = strategy == "tensormap-copy-huge";             // off by default
      tensormap::load(*model, path, o);
    } else if (strategy == "torch-load") {
      torch::load(model, path);
    } else if (strategy == "torch-pickle-load") {
      std::ifstream in(path, std::ios::binary);
      std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
      const c10::IValue value = torch::pickle_load(bytes);
      torch::NoGradGuard no_grad;
      const auto dict = value.toGenericDict();
      for (auto& [name, target] : tensormap::named_state(*model)) target.copy_(dict.at(name).toTensor());
    } else if (strategy == "seed-load-then-rebind") {
      // The whole state dict in memory, then each parameter of the storage-less model
      // rebound to it: the archive is read into one module holding every tensor.
      torch::serialize::InputArchive archive;
      archive.load_from(path);
      torch::NoGradGuard no_grad;
      for (auto& [name, target] : tensormap::named_state(*model)) {
        std::vector<torch::serialize::InputArchive> levels;
        levels.reserve(8);
        torch::serialize::InputArchive* level = &archive;
        std::string rest = name;
        for (size_t dot; (dot = rest.find('.')) != std::string::npos; rest = rest.substr(dot + 1)) {
          levels.emplace_back();
          if (!level->try_read(rest.substr(0, dot), levels.back())) throw std::runtime_error("no " + name);
          level = &levels.back();
        }
        at::Tensor value;
        level->read(rest, value);
        target.set_(value);  // the parameter takes the loaded storage as its own (set_data
                             // refuses a released tensor: LibTorch compares dispatch keys)
      }
    } else {
      tensormap::load(*model, path);
    }
  } catch (const std::exception& e) {
    note = e.what();
    note = note.substr(0, note.find('\n'));
  }
  out.num("load_ms", ms_since(t0));
  out.memory("loaded", tensormap::read_process_memory());
  out.num("cached_fraction_after", cached_fraction(path));  // of the file, system-wide
  if (!note.empty()) {
    out.str("error", note);
    out.print();
    return 0;
  }
  // A mapped model is only loaded once its pages are in: the strategy's own way of
  // faulting them in (nothing to do for strategies that copied).
  t0 = Clock::now();
  if (strategy == "tensormap-map-naive-touch") {
    touch_naive(*model);
  } else if (strategy.find("-map") != std::string::npos) {
    tensormap::prefault(*model, 2);
  }
  out.num("touch_ms", ms_since(t0));
  out.memory("touched", tensormap::read_process_memory());
  // The same first use for every strategy, C++ and Python (bench/peers.py): one full read
  // of every weight, a sum. Its value, equal across strategies, proves the same weights.
  torch::NoGradGuard no_grad;
  t0 = Clock::now();
  double sum = 0;
  for (const auto& [name, t] : tensormap::named_state(*model)) sum += t.sum().item<double>();
  out.num("use_ms", ms_since(t0));
  out.memory("used", tensormap::read_process_memory());
  out.num("check", sum);
  out.print();
  return 0;
}

int cmd_evict(const Args& a) {
  const double cached = evict(a.get("file"));
  Json().num("cached_fraction_after", cached).print();
  return cached > 0.01 ? 1 : 0;
}

// --- baselines --------------------------------------------------------------------------------

int cmd_memcpy(const Args& a) {
  const size_t bytes = static_cast<size_t>(std::stoll(a.get("mib", "512"))) << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);  // both faulted in
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = Clock::now();
    std::thread other([&] { std::memcpy(dst.data() + bytes / 2, src.data() + bytes / 2, bytes - bytes / 2); });
    std::memcpy(dst.data(), src.data(), bytes / 2);
    other.join();
    best = std::min(best, ms_since(t0));
  }
  // The same copy into fresh memory (never touched before), as any load into new tensors
  // must do: it adds the kernel's cost of faulting pages in.
  double fresh = 1e30;
  for (int round = 0; round < 3; ++round) {
    void* raw = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    auto* out = static_cast<char*>(raw);
    const auto t0 = Clock::now();
    std::thread other([&] { std::memcpy(out + bytes / 2, src.data() + bytes / 2, bytes - bytes / 2); });
    std::memcpy(out, src.data(), bytes / 2);
    other.join();
    fresh = std::min(fresh, ms_since(t0));
    ::munmap(raw, bytes);
  }
  Json()
      .num("memcpy_mib", static_cast<double>(bytes >> 20))
      .num("memcpy_ms", best)
      .num("memcpy_gbps", bytes / best / 1e6)
      .num("fresh_memcpy_gbps", bytes / fresh / 1e6)
      .print();
  return 0;
}

int cmd_seqread(const Args& a) {
  const std::string path = a.get("file");
  const bool cold = a.has("cold");
  const double cached = cold ? evict(path) : -1;
  const int fd = ::open(path.c_str(), O_RDONLY);
  std::vector<char> buffer(8 << 20);
  uint64_t total = 0;
  const auto t0 = Clock::now();
  for (ssize_t n; (n = ::read(fd, buffer.data(), buffer.size())) > 0;) total += static_cast<uint64_t>(n);
  const double ms = ms_since(t0);
  ::close(fd);
  Json j;
  j.str("cache", cold ? "cold" : "warm")
      .num("bytes", static_cast<double>(total))
      .num("ms", ms)
      .num("gbps", total / ms / 1e6);
  if (cold) j.num("cached_fraction_before", cached);
  j.print();
  return 0;
}

int cmd_seqwrite(const Args& a) {
  const size_t bytes = static_cast<size_t>(std::stoll(a.get("mib"))) << 20;
  const std::string path = a.get("dir") + "/seqwrite.bin";
  std::vector<char> buffer(8 << 20, 3);
  const auto t0 = Clock::now();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  for (size_t done = 0; done < bytes; done += buffer.size()) {
    if (::write(fd, buffer.data(), std::min(buffer.size(), bytes - done)) < 0) return 1;
  }
  ::fsync(fd);
  ::close(fd);
  const double ms = ms_since(t0);
  fs::remove(path);
  Json().num("bytes", static_cast<double>(bytes)).num("ms", ms).num("gbps", bytes / ms / 1e6).print();
  return 0;
}

// --- save -----------------------------------------------------------------------------------

int cmd_save(const Args& a) {
  const std::string dir = a.get("dir"), strategy = a.get("strategy");
  const int64_t mib = std::stoll(a.get("mib"));
  auto model = tensormap::build_skeleton([&] { return make_model(mib); });
  tensormap::LoadOptions o;
  o.mode = tensormap::LoadMode::Copy;  // an ordinary model in memory, as after training
  tensormap::load(*model, file_of(dir, mib, "tmap"), o);
  const std::string out_path = dir + "/saved-" + strategy;
  tensormap::reset_peak_memory();
  const auto before = tensormap::read_process_memory();
  const auto t0 = Clock::now();
  if (strategy == "tensormap") {
    tensormap::save(*model, out_path);  // fsyncs the file and its directory
  } else {
    torch::save(model, out_path);
    sync_file(out_path);
  }
  const double ms = ms_since(t0);
  const auto after = tensormap::read_process_memory();
  const auto bytes = static_cast<double>(fs::file_size(out_path));
  fs::remove(out_path);
  Json()
      .str("strategy", strategy)
      .num("mib", static_cast<double>(mib))
      .num("ms", ms)
      .num("gbps", bytes / ms / 1e6)
      .num("extra_peak_mib", (after.vm_hwm > before.vm_rss ? after.vm_hwm - before.vm_rss : 0) / 1048576.0)
      .print();
  return 0;
}

// --- sharing: a process that maps the checkpoint and waits ----------------------------------

int cmd_hold(const Args& a) {
  const std::string dir = a.get("dir");
  const int64_t mib = std::stoll(a.get("mib"));
  auto model = tensormap::build_skeleton([&] { return make_model(mib); });
  tensormap::load(*model, file_of(dir, mib, "tmap"));
  tensormap::prefault(*model, 1);
  std::cout << "ready" << std::endl;
  std::string line;
  std::getline(std::cin, line);
  return 0;
}

// Growth of RssAnon + RssFile (what a rank holds, mapped or owned), in MiB.
double resident_growth_mib(const tensormap::ProcessMemory& before, const tensormap::ProcessMemory& after) {
  return (static_cast<double>(after.rss_anon + after.rss_file) -
          static_cast<double>(before.rss_anon + before.rss_file)) /
         1048576.0;
}

// --- tensor parallelism over c10d -------------------------------------------------------------

int cmd_tp(const Args& a) {
  const std::string dir = a.get("dir");
  const int64_t mib = std::stoll(a.get("mib"));
  const int ranks = std::stoi(a.get("ranks", "4"));
  const bool map = a.get("mode", "map") == "map";
  const int source = std::stoi(a.get("source", "-1"));
  const std::string store = dir + "/store-" + std::to_string(::getpid());
  fs::remove(store);
  std::vector<pid_t> pids;
  int pipes[2];
  if (::pipe(pipes) != 0) return 1;
  for (int rank = 0; rank < ranks; ++rank) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      at::set_num_threads(1);
      auto options = c10d::ProcessGroupGloo::Options::create();
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      c10d::ProcessGroupGloo group(c10::make_intrusive<c10d::FileStore>(store, ranks), rank, ranks, options);
      auto model = tensormap::build_skeleton([&] { return make_model(mib, ranks); });
      tensormap::reset_peak_memory();
      const auto before = tensormap::read_process_memory();
      tensormap::DistributedLoadOptions o;
      o.load.mode = map ? tensormap::LoadMode::Map : tensormap::LoadMode::Copy;
      o.source_rank = source;
      const auto t0 = Clock::now();
      tensormap::load_distributed(*model, file_of(dir, mib, "tmap"), group, kSplits, o);
      tensormap::prefault(*model, 1);
      const double ms = ms_since(t0);
      Json j;
      const auto after = tensormap::read_process_memory();
      j.num("rank", rank)
          .num("load_and_touch_ms", ms)
          .memory("touched", after)
          .num("resident_growth_mib", resident_growth_mib(before, after))
          .num("peak_growth_mib", (static_cast<double>(after.vm_hwm) - static_cast<double>(before.vm_rss)) / 1048576.0);
      j.out << "}";
      const std::string text = j.out.str() + "\n";
      (void)!::write(pipes[1], text.data(), text.size());
      group.barrier()->wait();
      ::_exit(0);
    }
    pids.push_back(pid);
  }
  ::close(pipes[1]);
  std::string all;
  char buffer[4096];
  for (ssize_t n; (n = ::read(pipes[0], buffer, sizeof buffer)) > 0;) all.append(buffer, static_cast<size_t>(n));
  int failed = 0;
  for (pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  fs::remove(store);
  std::cout << all;
  return failed ? 1 : 0;
}

// --- one rank's part, alone ------------------------------------------------------------------

int cmd_part(const Args& a) {
  const std::string dir = a.get("dir");
  const int64_t mib = std::stoll(a.get("mib"));
  const int64_t ranks = std::stoll(a.get("ranks", "4")), rank = std::stoll(a.get("rank", "1"));
  at::set_num_threads(1);
  // --resident: into a model whose memory exists and was written (its init), as when a
  // running server takes new weights; otherwise a skeleton, whose memory the load makes.
  auto model =
      a.has("resident") ? make_model(mib, ranks) : tensormap::build_skeleton([&] { return make_model(mib, ranks); });
  tensormap::LoadOptions o;
  o.mode = a.get("mode", "map") == "map" ? tensormap::LoadMode::Map : tensormap::LoadMode::Copy;
  if (ranks > 1) o.parallel = tensormap::ParallelPlan{rank, ranks, kSplits};  // one rank of one: the whole model
  if (a.has("url")) o.mode = tensormap::LoadMode::Auto;
  if (a.has("no-verify")) o.verify_checksums = false;  // the cost of the checksums, alone
  tensormap::reset_peak_memory();
  const auto before = tensormap::read_process_memory();
  const auto t0 = Clock::now();
  const std::string url = a.get("url");  // the same checkpoint served over HTTP(S) or S3
  const auto state = tensormap::StateDict::open(url.empty() ? file_of(dir, mib, "tmap") : url);
  const double open_ms = ms_since(t0);
  tensormap::load(*model, state, o);
  const double load_ms = ms_since(t0);
  const auto t1 = Clock::now();
  tensormap::prefault(*model, 1);
  const double touch_ms = ms_since(t1);
  const auto after = tensormap::read_process_memory();
  uint64_t written = 0;  // bytes this process sent to storage (/proc/self/io): a remote load, none
  {
    std::ifstream io("/proc/self/io");
    std::string key;
    uint64_t value = 0;
    while (io >> key >> value) {
      if (key == "write_bytes:") written = value;
    }
  }
  Json()
      .num("rank", static_cast<double>(rank))
      .num("disk_write_bytes", static_cast<double>(written))
      .num("load_ms", load_ms)
      .num("open_ms", open_ms)
      .num("touch_ms", touch_ms)
      .memory("touched", after)
      .num("resident_growth_mib", resident_growth_mib(before, after))
      .print();
  return 0;
}

}  // namespace

// --- forward: time to first output and steady-state compute ----------------------------------

// The share (0 to 1) of `path`'s bytes that this process maps with 2 MiB page-table entries
// (FilePmdMapped in /proc/self/smaps, over every mapping of the file).
double file_pmd_share(const std::string& path) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  double pmd_kib = 0;
  while (std::getline(smaps, line)) {
    const size_t dash = line.find('-'), space = line.find(' ');
    if (dash != std::string::npos && space != std::string::npos && dash < space &&
        line.find_first_not_of("0123456789abcdef") == dash) {
      inside = line.size() >= path.size() && line.compare(line.size() - path.size(), path.size(), path) == 0;
    } else if (inside && line.rfind("FilePmdMapped:", 0) == 0) {
      pmd_kib += std::stod(line.substr(14));
    }
  }
  return pmd_kib * 1024 / static_cast<double>(fs::file_size(path));
}

// The median (the upper one of an even count) of `values`; 0 for none.
double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// One forward pass of the benchmark model at batch 1 (bench/peers.py computes the same).
at::Tensor forward(const torch::nn::ModuleList& model, const at::Tensor& input) {
  at::Tensor y = input;
  for (const auto& m : *model) {
    auto* block = m->as<BlockImpl>();
    y = block->norm(block->down(block->up(y)));
  }
  return y;
}

// Build, load, one forward pass (the first output), then `passes` more (the steady state).
// tensormap-map-prefault adds the library's own full prefault before the first pass;
// tensormap-map-background starts it on a thread of its own as the first pass begins.
int cmd_forward(const Args& a) {
  const std::string dir = a.get("dir"), strategy = a.get("strategy");
  const int64_t mib = std::stoll(a.get("mib"));
  const int passes = std::stoi(a.get("passes", "5"));
  const bool cold = a.has("cold");
  const std::map<std::string, std::string> file_for = {{"tensormap-map", "tmap"},
                                                       {"tensormap-map-prefault", "tmap"},
                                                       {"tensormap-map-background", "tmap"},
                                                       {"tensormap-copy", "tmap"},
                                                       {"tensormap-copy-keep-cache", "tmap"},
                                                       {"safetensors-map", "safetensors"},
                                                       {"torchsave-map", "pt"},
                                                       {"torch-load", "archive"}};
  if (!file_for.count(strategy)) {
    std::cerr << "unknown strategy " << strategy << "\n";
    return 2;
  }
  // --file: another copy of the strategy's file (the suite's cp of the .tmap).
  const std::string path =
      fs::absolute(a.get("file", file_of(dir, mib, file_for.at(strategy)))).lexically_normal().string();
  const double cached = cold ? evict(path) : -1;
  Json out;
  out.str("strategy", strategy).num("mib", static_cast<double>(mib)).str("cache", cold ? "cold" : "warm");
  if (cold) out.num("cached_fraction_before", cached);
  torch::NoGradGuard no_grad;
  const at::Tensor input = torch::ones({1, kD});
  tensormap::reset_peak_memory();
  auto t0 = Clock::now();
  torch::nn::ModuleList model =
      strategy == "torch-load" ? make_model(mib) : tensormap::build_skeleton([&] { return make_model(mib); });
  out.num("build_ms", ms_since(t0));
  t0 = Clock::now();
  if (strategy == "torch-load") {
    torch::load(model, path);
  } else {
    tensormap::LoadOptions o;
    const bool copy = strategy.rfind("tensormap-copy", 0) == 0;
    o.mode = copy ? tensormap::LoadMode::Copy : tensormap::LoadMode::Map;
    o.drop_read_pages = strategy != "tensormap-copy-keep-cache";
    tensormap::load(*model, path, o);
    if (strategy == "tensormap-map-prefault") tensormap::prefault(*model);
  }
  out.num("load_ms", ms_since(t0));
  out.memory("loaded", tensormap::read_process_memory());
  t0 = Clock::now();
  std::optional<tensormap::BackgroundPrefault> background;
  if (strategy == "tensormap-map-background") background = tensormap::prefault_in_background(*model);
  const double first = forward(model, input).sum().item<double>();
  out.num("first_forward_ms", ms_since(t0));
  if (background) background->wait();
  std::vector<double> times;
  for (int i = 0; i < passes; ++i) {
    t0 = Clock::now();
    const double again = forward(model, input).sum().item<double>();
    times.push_back(ms_since(t0));
    if (again != first) throw std::runtime_error("the forward pass is not deterministic");
  }
  out.num("steady_forward_ms", median(times));
  out.num("file_pmd_share", file_pmd_share(path));
  out.memory("used", tensormap::read_process_memory());
  out.num("check", first);
  // --paired N (map strategies): the same weights copied into owned memory in this process,
  // then N passes of each, alternating which goes first, so that the VM's drifts of speed
  // (tens of percent between seconds here) fall on both alike: the median of the per-pair
  // ratios mapped / owned.
  const int paired = std::stoi(a.get("paired", "0"));
  if (paired > 0 && strategy.find("-map") != std::string::npos) {
    auto owned = tensormap::build_skeleton([&] { return make_model(mib); });
    const auto mapped_tensors = model->named_parameters();
    const auto mapped_buffers = model->named_buffers();
    tensormap::materialize(
        *owned,
        [&](const std::string& name, at::Tensor& t) {
          t.copy_(mapped_tensors.contains(name) ? mapped_tensors[name] : mapped_buffers[name]);
        },
        [](const std::string&, torch::nn::Module&) {});  // no rule: zeros, then the copy
    std::vector<double> ratios, mapped_ms, owned_ms;
    for (int i = 0; i < paired; ++i) {
      double m = 0, o = 0;
      for (int k = 0; k < 2; ++k) {
        const bool mapped_turn = (i + k) % 2 == 0;
        t0 = Clock::now();
        const double value = forward(mapped_turn ? model : owned, input).sum().item<double>();
        (mapped_turn ? m : o) = ms_since(t0);
        if (value != first) throw std::runtime_error("the owned copy computes another output");
      }
      mapped_ms.push_back(m);
      owned_ms.push_back(o);
      ratios.push_back(m / o);
    }
    out.num("paired_mapped_ms", median(mapped_ms))
        .num("paired_owned_ms", median(owned_ms))
        .num("paired_x_owned", median(ratios));
  }
  out.print();
  return 0;
}

// --- a model larger than memory --------------------------------------------------------------

// Layers of Linear(8192, 8192) without bias, 256 MiB each, as many as `ratio` x memory.
torch::nn::Sequential huge_model(int layers) {
  torch::nn::Sequential seq;
  for (int i = 0; i < layers; ++i) seq->push_back(torch::nn::Linear(torch::nn::LinearOptions(8192, 8192).bias(false)));
  return seq;
}

int cmd_huge(const Args& a) {
  const std::string dir = a.get("dir");
  const double ratio = std::stod(a.get("ratio", "1.25"));
  const uint64_t memory = tensormap::total_memory(), layer = uint64_t{8192} * 8192 * 4;
  const int layers = static_cast<int>(static_cast<double>(memory) * ratio / static_cast<double>(layer)) + 1;
  fs::create_directories(dir);
  const std::string path = dir + "/huge-" + std::to_string(layers) + ".tmap";
  if (!fs::exists(path)) {  // real data on the disk, not a sparse file: small values, so the pass stays finite
    std::vector<tensormap::TensorSpec> specs;
    for (int i = 0; i < layers; ++i)
      specs.push_back({std::to_string(i) + ".weight", tensormap::Dtype::F32, {8192, 8192}});
    tensormap::Writer writer(path, specs, {});
    std::vector<float> buffer(8192 * 8192);
    for (int i = 0; i < layers; ++i) {
      for (size_t j = 0; j < buffer.size(); ++j) buffer[j] = static_cast<float>((j * 7 + i) % 13) * 1e-5f;
      writer.write_tensor(buffer.data(), buffer.size() * 4);
    }
    writer.commit();
  }
  Json j;
  j.num("layers", layers)
      .num("file_gib", static_cast<double>(fs::file_size(path)) / (1 << 30))
      .num("memory_gib", static_cast<double>(memory) / (1 << 30));
  // The baseline: the whole file read once, sequentially, from the disk.
  j.num("cached_before_read", evict(path));
  auto t0 = Clock::now();
  {
    const int fd = ::open(path.c_str(), O_RDONLY);
    std::vector<char> buffer(8 << 20);
    while (::read(fd, buffer.data(), buffer.size()) > 0) {}
    ::close(fd);
  }
  const double read_ms = ms_since(t0);
  j.num("cold_seqread_ms", read_ms);
  // Build without weights, map-load, one forward pass through every layer, from cold.
  j.num("cached_before_load", evict(path));
  const auto before = tensormap::read_process_memory();
  t0 = Clock::now();
  auto model = tensormap::build_skeleton([&] { return huge_model(layers); });
  tensormap::LoadOptions options;
  options.mode = tensormap::LoadMode::Map;
  tensormap::load(*model, path, options);
  const double load_ms = ms_since(t0);
  torch::NoGradGuard no_grad;
  const at::Tensor out = model->forward(torch::ones({1, 8192}));
  const double forward_ms = ms_since(t0) - load_ms;
  const auto after = tensormap::read_process_memory();
  j.num("build_and_map_load_ms", load_ms)
      .num("first_forward_ms", forward_ms)
      .num("forward_over_seqread", (load_ms + forward_ms) / read_ms)
      .num("rss_anon_growth_mib",
           (static_cast<double>(after.rss_anon) - static_cast<double>(before.rss_anon)) / 1048576.0)
      .num("output_sum", out.sum().item<double>());
  j.memory("after", after);
  j.print();
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr
        << "usage: tensormap_harness make|run|forward|memcpy|seqread|evict|seqwrite|save|hold|tp|part|huge [--options]\n";
    return 2;
  }
  const std::string cmd = argv[1];
  const Args a = parse(argc, argv);
  try {
    if (cmd == "make") return cmd_make(a);
    if (cmd == "run") return cmd_run(a);
    if (cmd == "memcpy") return cmd_memcpy(a);
    if (cmd == "seqread") return cmd_seqread(a);
    if (cmd == "evict") return cmd_evict(a);
    if (cmd == "seqwrite") return cmd_seqwrite(a);
    if (cmd == "save") return cmd_save(a);
    if (cmd == "hold") return cmd_hold(a);
    if (cmd == "tp") return cmd_tp(a);
    if (cmd == "part") return cmd_part(a);
    if (cmd == "huge") return cmd_huge(a);
    if (cmd == "forward") return cmd_forward(a);
  } catch (const std::exception& e) {
    std::cerr << cmd << ": " << e.what() << "\n";
    return 1;
  }
  std::cerr << "unknown command " << cmd << "\n";
  return 2;
}
