// tensormap convert and tensormap diff: the subcommands that need LibTorch.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <set>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "tensormap/convert.h"
#include "tensormap/tensormap.h"

namespace tensormap::cli {
namespace {

// A one-line progress bar on stderr, redrawn in place.
class Progress {
 public:
  Progress(bool enabled, uint64_t total) : enabled_(enabled), total_(total ? total : 1) {}
  void update(uint64_t done, std::string_view name) {
    if (!enabled_) return;
    const int width = 30;
    const int filled = static_cast<int>(width * static_cast<double>(done) / static_cast<double>(total_));
    std::fprintf(stderr, "\r[%-*s] %3d%% %-40.40s", width, std::string(static_cast<size_t>(filled), '#').c_str(),
                 static_cast<int>(100.0 * static_cast<double>(done) / static_cast<double>(total_)),
                 std::string(name).c_str());
    std::fflush(stderr);
  }
  ~Progress() {
    if (enabled_) std::fprintf(stderr, "\n");
  }

 private:
  bool enabled_;
  uint64_t total_;
};

std::string shape_text(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t d = 0; d < shape.size(); ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + "]";
}


}  // namespace

std::string first_line(const std::string& message) { return message.substr(0, message.find('\n')); }

uint64_t parse_size(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    throw UsageError("--shard-size " + text + ": expected a size such as 500M or 2G");
  }
  const std::string unit = text.substr(used);
  double scale = 1;
  if (unit == "K" || unit == "KiB") scale = 1024.0;
  else if (unit == "M" || unit == "MiB") scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB") scale = 1024.0 * 1024 * 1024;
  else if (!unit.empty() && unit != "B") throw UsageError("--shard-size " + text + ": unknown unit '" + unit + "'");
  if (!(value > 0)) throw UsageError("--shard-size " + text + ": must be positive");
  return static_cast<uint64_t>(value * scale);
}

int convert(const std::string& in, const std::string& out, const ConvertArguments& options,
            bool progress) {
  tensormap::ConvertOptions convert_options;
  if (!options.dtype.empty()) {
    convert_options.float_dtype = dtype_from_name(options.dtype);
    if (!convert_options.float_dtype || !is_floating_point(*convert_options.float_dtype)) {
      throw UsageError("--dtype " + options.dtype + ": expected one of F16, BF16, F32, F64");
    }
  }
  if (!options.shard_size.empty()) {
    convert_options.shard_size = parse_size(options.shard_size);
    if (out.size() < 11 || out.compare(out.size() - 11, 11, ".index.json") != 0) {
      throw UsageError("--shard-size: OUT must be an index such as model.safetensors.index.json");
    }
  }
  if (options.format == "tensormap") convert_options.format = Format::Tensormap;
  if (options.format == "safetensors") convert_options.format = Format::Safetensors;
  if (options.format == "torch.save") convert_options.format = Format::TorchSave;
  convert_options.alignment = options.alignment;
  std::unique_ptr<Progress> bar;
  if (progress) {
    convert_options.progress = [&](uint64_t done, uint64_t total, std::string_view name) {
      if (!bar) bar = std::make_unique<Progress>(true, total);
      bar->update(done, name);
    };
  }
  const ConvertResult r = tensormap::convert(in, out, convert_options);
  bar.reset();
  std::cout << in << " -> " << out << ": " << r.tensors << " tensors";
  if (r.shards) std::cout << " in " << r.shards << " " << format_name(r.format) << " shards\n";
  else std::cout << ", " << format_name(r.format) << "\n";
  return 0;
}

int diff(const std::string& a_path, const std::string& b_path) {
  const StateDict a = StateDict::open(a_path);
  const StateDict b = StateDict::open(b_path);
  int differences = 0;
  for (const std::string& name : a.keys()) {
    if (!b.contains(name)) {
      std::cout << "only in A: " << name << "\n";
      ++differences;
    }
  }
  for (const std::string& name : b.keys()) {
    if (!a.contains(name)) {
      std::cout << "only in B: " << name << "\n";
      ++differences;
    }
  }
  for (const std::string& name : a.keys()) {
    if (!b.contains(name)) continue;
    const StateDict::Info ia = a.info(name);
    const StateDict::Info ib = b.info(name);
    std::string line;
    if (ia.shape != ib.shape) {
      line = "shape " + shape_text({ia.shape.begin(), ia.shape.end()}) + " -> " +
             shape_text({ib.shape.begin(), ib.shape.end()});
    } else {
      if (ia.dtype != ib.dtype) line = "dtype " + std::string(dtype_name(ia.dtype)) + " -> " + std::string(dtype_name(ib.dtype));
      const bool same_bytes = ia.dtype == ib.dtype && torch::equal(a.raw_bytes(name), b.raw_bytes(name));
      if (!same_bytes) {
        double max_abs = std::nan("");
        if (to_scalar_type(ia.dtype) && to_scalar_type(ib.dtype)) {
          const auto va = a.at(name).to(at::kDouble);
          const auto vb = b.at(name).to(at::kDouble);
          max_abs = va.numel() ? (va - vb).abs().max().item<double>() : 0.0;
        }
        if (!(max_abs == 0.0 && line.empty())) {
          char buf[64];
          std::snprintf(buf, sizeof buf, "max abs difference %.6g", max_abs);
          line += (line.empty() ? "" : ", ") + std::string(buf);
        }
      }
    }
    if (!line.empty()) {
      std::cout << "changed: " << name << ": " << line << "\n";
      ++differences;
    }
    a.release(name);
    b.release(name);
  }
  if (differences == 0) {
    std::cout << "no differences (" << a.size() << " tensors)\n";
    return 0;
  }
  std::cout << differences << " difference" << (differences == 1 ? "" : "s") << "\n";
  return 1;
}

bool is_single_file(const std::string& path) {
  // StateDict::open is the one place that recognises formats by content.
  const std::string format = StateDict::open(path).format();
  return format == format_name(Format::Tensormap) || format == format_name(Format::Safetensors);
}

// inspect and verify of the checkpoints that are not one tensormap or safetensors file.
int inspect_state(const std::string& path, bool json) {
  const StateDict sd = StateDict::open(path);
  nlohmann::ordered_json out;
  out["format"] = sd.format();
  out["metadata"] = nlohmann::ordered_json::object();
  for (const auto& [k, v] : sd.metadata()) out["metadata"][k] = v;
  out["tensors"] = nlohmann::ordered_json::array();
  uint64_t data = 0;
  for (const std::string& name : sd.keys()) {
    const StateDict::Info info = sd.info(name);
    out["tensors"].push_back({{"name", name}, {"dtype", std::string(dtype_name(info.dtype))},
                              {"shape", info.shape}, {"byte_length", info.byte_length}});
    data += info.byte_length;
  }
  const auto skipped = sd.skipped();
  if (!skipped.empty()) {
    out["skipped"] = nlohmann::ordered_json::array();
    for (const auto& [where, what] : skipped) out["skipped"].push_back({{"name", where}, {"value", what}});
  }
  if (json) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << path << ": " << sd.format() << ", " << sd.size() << " tensors, " << data << " bytes of data\n";
  for (const auto& t : out["tensors"]) {
    std::cout << "  " << t["name"].get<std::string>() << "  " << t["dtype"].get<std::string>() << "  "
              << t["shape"].dump() << "  " << t["byte_length"].get<uint64_t>() << "\n";
  }
  if (!skipped.empty()) {
    std::cout << skipped.size() << " values that are not tensors were skipped:\n";
    for (const auto& [where, what] : skipped) std::cout << "  " << where << ": " << what << "\n";
  }
  return 0;
}

int verify_state(const std::string& path) {
  const StateDict sd = StateDict::open(path);  // validates the index or the archive
  if (sd.format().rfind("sharded", 0) == 0) {
    const ShardIndex index = ShardIndex::open(path);
    int bad = 0;
    for (uint32_t s = 0; s < index.shard_files().size(); ++s) {
      const File shard = File::open(index.shard_path(s));
      for (const Error& e : shard.find_corruption()) {
        std::cerr << "tensormap: " << error_kind_name(e.kind()) << ": " << e.what() << "\n";
        ++bad;
      }
    }
    for (const std::string& name : sd.keys()) sd.info(name);  // every name is in its shard
    if (bad) return 1;
    std::cout << path << ": ok, " << sd.size() << " tensors in " << index.shard_files().size() << " shards\n";
    return 0;
  }
  for (const std::string& name : sd.keys()) sd.info(name);
  std::cout << path << ": ok, " << sd.size() << " tensors (" << sd.format()
            << " has no checksums, so only its structure was validated)\n";
  return 0;
}

}  // namespace tensormap::cli
