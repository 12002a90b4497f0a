// tensormap convert and tensormap diff, and inspect of the checkpoints that
// are not one file. Like the whole command line, they use only the torch-free core.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "tensormap/checkpoint.h"
#include "tensormap/convert.h"
#include "tensormap/core.h"

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
  if (unit == "K" || unit == "KiB")
    scale = 1024.0;
  else if (unit == "M" || unit == "MiB")
    scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB")
    scale = 1024.0 * 1024 * 1024;
  else if (!unit.empty() && unit != "B")
    throw UsageError("--shard-size " + text + ": unknown unit '" + unit + "'");
  const double bytes = value * scale;
  // NaN and infinity fail the first test; 2^63 bytes is more than any file can hold.
  if (!(bytes >= 1) || !(bytes < 9223372036854775808.0)) {
    throw UsageError("--shard-size " + text + ": expected a size of at least 1 byte and below 2^63 bytes");
  }
  return static_cast<uint64_t>(bytes);
}

int convert(const std::string& in, const std::string& out, const ConvertArguments& options, bool progress) {
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
  if (!options.format.empty()) {
    convert_options.format = format_from_name(options.format);
    if (!convert_options.format) {
      throw UsageError("--format " + options.format + ": expected one of tensormap, safetensors, torch.save");
    }
  }
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
  if (r.shards)
    std::cout << " in " << r.shards << " " << format_name(r.format) << " shards\n";
  else
    std::cout << ", " << format_name(r.format) << "\n";
  return 0;
}

namespace {

// The tensor's bytes, read with pread.
std::unique_ptr<unsigned char[]> bytes_of(const Checkpoint& c, const std::string& name, uint64_t size) {
  std::unique_ptr<unsigned char[]> out(new unsigned char[std::max<uint64_t>(size, 1)]);
  c.read(name, out.get());
  return out;
}

// The largest |a - b| over the elements; NaN if either side has a NaN there, or a dtype
// (complex) has no real value to compare.
double max_abs_difference(Dtype da, const unsigned char* a, Dtype db, const unsigned char* b, uint64_t count) {
  std::vector<double> va(static_cast<size_t>(count)), vb(static_cast<size_t>(count));
  if (!to_f64(da, a, va.data(), count) || !to_f64(db, b, vb.data(), count)) return std::nan("");
  double max = 0.0;
  for (size_t i = 0; i < va.size(); ++i) {
    const double d = std::fabs(va[i] - vb[i]);
    if (std::isnan(d)) return d;
    max = std::max(max, d);
  }
  return max;
}

// How tensor `name` differs between the two checkpoints, or "".
std::string difference(const Checkpoint& a, const Checkpoint& b, const std::string& name) {
  const Checkpoint::Info ia = a.info(name), ib = b.info(name);
  if (ia.shape != ib.shape) {
    return "shape " + shape_text({ia.shape.begin(), ia.shape.end()}) + " -> " +
           shape_text({ib.shape.begin(), ib.shape.end()});
  }
  std::string line;
  if (ia.dtype != ib.dtype)
    line = "dtype " + std::string(dtype_name(ia.dtype)) + " -> " + std::string(dtype_name(ib.dtype));
  const auto bytes_a = bytes_of(a, name, ia.byte_length);
  const auto bytes_b = bytes_of(b, name, ib.byte_length);
  if (ia.dtype == ib.dtype && std::memcmp(bytes_a.get(), bytes_b.get(), ia.byte_length) == 0) return line;
  const double max_abs =
      max_abs_difference(ia.dtype, bytes_a.get(), ib.dtype, bytes_b.get(), ia.byte_length / dtype_size(ia.dtype));
  if (max_abs == 0.0 && line.empty()) return line;  // equal values in other bytes (-0.0 and 0.0)
  char buf[64];
  std::snprintf(buf, sizeof buf, "max abs difference %.6g", max_abs);
  return line + (line.empty() ? "" : ", ") + buf;
}

}  // namespace

int diff(const std::string& a_path, const std::string& b_path) {
  const Checkpoint a = Checkpoint::open(a_path);
  const Checkpoint b = Checkpoint::open(b_path);
  int differences = 0;
  for (const std::string& name : a.keys()) {
    if (!b.contains(name)) {
      std::cout << "only in A: " << printable(name) << "\n";
      ++differences;
    }
  }
  for (const std::string& name : b.keys()) {
    if (!a.contains(name)) {
      std::cout << "only in B: " << printable(name) << "\n";
      ++differences;
    }
  }
  for (const std::string& name : a.keys()) {
    if (!b.contains(name)) continue;
    const std::string line = difference(a, b, name);
    if (!line.empty()) {
      std::cout << "changed: " << printable(name) << ": " << line << "\n";
      ++differences;
    }
    a.evict(name);
    b.evict(name);
  }
  if (differences == 0) {
    std::cout << "no differences (" << a.size() << " tensors)\n";
    return 0;
  }
  std::cout << differences << " difference" << (differences == 1 ? "" : "s") << "\n";
  return 1;
}

// inspect of the checkpoints that are not one tensormap or safetensors file.
int inspect_state(const Checkpoint& sd, bool json) {
  const std::string& path = sd.path();
  nlohmann::ordered_json out;
  out["format"] = format_name(sd.format());
  out["metadata"] = nlohmann::ordered_json::object();
  for (const auto& [k, v] : sd.metadata()) out["metadata"][k] = v;
  out["tensors"] = nlohmann::ordered_json::array();
  uint64_t data = 0;
  for (const std::string& name : sd.keys()) {
    const Checkpoint::Info info = sd.info(name);
    out["tensors"].push_back({{"name", name},
                              {"dtype", std::string(dtype_name(info.dtype))},
                              {"shape", info.shape},
                              {"byte_length", info.byte_length}});
    if (const auto target = sd.alias_of(name)) {
      out["tensors"].back()["alias_of"] = *target;  // the same bytes, stored once
    } else {
      data += info.byte_length;
    }
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
  std::cout << path << ": " << format_name(sd.format()) << ", " << sd.size() << " tensors, " << data
            << " bytes of data\n";
  for (const auto& t : out["tensors"]) {
    std::cout << "  " << printable(t["name"].get<std::string>()) << "  " << t["dtype"].get<std::string>() << "  "
              << t["shape"].dump() << "  " << t["byte_length"].get<uint64_t>()
              << (t.contains("alias_of") ? "  (alias of " + printable(t["alias_of"].get<std::string>()) + ")" : "")
              << "\n";
  }
  if (!skipped.empty()) {
    std::cout << skipped.size() << " values that are not tensors were skipped:\n";
    for (const auto& [where, what] : skipped) std::cout << "  " << printable(where) << ": " << printable(what) << "\n";
  }
  return 0;
}

}  // namespace tensormap::cli
