// tensormap convert and tensormap diff: the subcommands that need LibTorch.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <set>

#include "commands.h"
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

bool is_floating(Dtype d) {
  return d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F32 || d == Dtype::F64;
}

}  // namespace

std::string first_line(const std::string& message) { return message.substr(0, message.find('\n')); }

int convert(const std::string& in, const std::string& out, const ConvertOptions& options,
            bool progress) {
  if (!options.shard_size.empty()) {
    throw UsageError("--shard-size: sharded checkpoints are not supported yet");
  }
  std::optional<Dtype> target;
  if (!options.dtype.empty()) {
    target = dtype_from_name(options.dtype);
    if (!target || !is_floating(*target)) {
      throw UsageError("--dtype " + options.dtype + ": expected one of F16, BF16, F32, F64");
    }
  }
  const File source = File::open(in);
  std::vector<TensorSpec> specs;
  uint64_t total = 0;
  for (const TensorEntry& e : source.tensors()) {
    const Dtype dtype = target && is_floating(e.dtype) ? *target : e.dtype;
    specs.push_back({std::string(e.name), dtype, {e.dims.begin(), e.dims.begin() + e.rank}});
    total += e.byte_length;
  }
  WriterOptions writer_options;
  const bool to_safetensors =
      options.format == "safetensors" ||
      (options.format.empty() && out.size() >= 12 && out.compare(out.size() - 12, 12, ".safetensors") == 0);
  writer_options.format = to_safetensors ? Format::Safetensors : Format::Tensormap;
  writer_options.alignment = options.alignment;
  for (const auto& [k, v] : source.metadata()) writer_options.metadata.emplace_back(k, v);
  Writer writer(out, specs, writer_options);
  Progress bar(progress, total);
  uint64_t done = 0;
  for (size_t i = 0; i < source.tensors().size(); ++i) {
    const TensorEntry& e = source.tensors()[i];
    if (specs[i].dtype == e.dtype) {
      const ByteView bytes = source.bytes(e);
      if (bytes.size > 0) writer.write_tensor(bytes.data, bytes.size);
    } else {
      const at::Tensor converted = tensor_view(source, e).to(*to_scalar_type(specs[i].dtype)).contiguous();
      if (converted.nbytes() > 0) writer.write_tensor(converted.data_ptr(), converted.nbytes());
    }
    source.release_pages(e);  // constant memory: this tensor's input pages go back
    done += e.byte_length;
    bar.update(done, e.name);
  }
  writer.commit();
  std::cout << in << " -> " << out << ": " << specs.size() << " tensors, "
            << format_name(writer_options.format) << "\n";
  return 0;
}

int diff(const std::string& a_path, const std::string& b_path) {
  const File a = File::open(a_path);
  const File b = File::open(b_path);
  int differences = 0;
  for (const TensorEntry& e : a.tensors()) {
    if (!b.find(e.name)) {
      std::cout << "only in A: " << e.name << "\n";
      ++differences;
    }
  }
  for (const TensorEntry& e : b.tensors()) {
    if (!a.find(e.name)) {
      std::cout << "only in B: " << e.name << "\n";
      ++differences;
    }
  }
  for (const TensorEntry& ea : a.tensors()) {
    const TensorEntry* eb = b.find(ea.name);
    if (!eb) continue;
    const std::vector<uint64_t> shape_a(ea.dims.begin(), ea.dims.begin() + ea.rank);
    const std::vector<uint64_t> shape_b(eb->dims.begin(), eb->dims.begin() + eb->rank);
    std::string line;
    if (shape_a != shape_b) {
      line = "shape " + shape_text(shape_a) + " -> " + shape_text(shape_b);
    } else {
      if (ea.dtype != eb->dtype) {
        line = "dtype " + std::string(dtype_name(ea.dtype)) + " -> " + std::string(dtype_name(eb->dtype));
      }
      const bool same_bytes = ea.dtype == eb->dtype && ea.checksum == eb->checksum &&
                              ea.byte_length == eb->byte_length;
      if (!same_bytes) {
        double max_abs = std::nan("");
        if (to_scalar_type(ea.dtype) && to_scalar_type(eb->dtype)) {
          const auto va = tensor_view(a, ea).to(at::kDouble);
          const auto vb = tensor_view(b, *eb).to(at::kDouble);
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
      std::cout << "changed: " << ea.name << ": " << line << "\n";
      ++differences;
    }
  }
  if (differences == 0) {
    std::cout << "no differences (" << a.tensors().size() << " tensors)\n";
    return 0;
  }
  std::cout << differences << " difference" << (differences == 1 ? "" : "s") << "\n";
  return 1;
}

}  // namespace tensormap::cli
