// tensormap: the command line. It links only the torch-free core (libtensormap), so it
// starts in milliseconds. inspect of single files and verify of any checkpoint live here;
// convert, diff, and inspect of the other formats, in commands.cpp.
//
// Exit codes: 0 success, 1 an invalid or corrupt input or a failed check, 2 a usage
// error. Errors are one line on stderr naming the file and what is wrong.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "tensormap/checkpoint.h"
#include "tensormap/core.h"
#include "tensormap/verify.h"
#include "tensormap/writer.h"

namespace tensormap::cli {
namespace {

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string shape_text(const TensorEntry& e) {
  std::string s = "[";
  for (unsigned d = 0; d < e.rank; ++d) s += (d ? ", " : "") + std::to_string(e.dims[d]);
  return s + "]";
}

// Ctrl-C, kill, a closed terminal: remove what a save has written so far (its destination
// stays as it was), say so, exit 1.
// (Nameless files of the writers need nothing: the kernel frees them with the process.)
// A save to a URL cannot be undone from a signal handler (an S3 upload is aborted by a
// request): there the first signal is only noted, the save's next check for an interrupt
// (between pieces, while it waits) throws Stopped, and the upload is aborted as the
// error unwinds. A second signal stops at once.
volatile sig_atomic_t graceful_stop = 0;
volatile sig_atomic_t pending_signal = 0;

struct Stopped {
  int signal_number;
};

const char* stop_message(int signal_number) {
  return signal_number == SIGINT   ? "tensormap: stopped by SIGINT\n"
         : signal_number == SIGHUP ? "tensormap: stopped by SIGHUP\n"
                                   : "tensormap: stopped by SIGTERM\n";
}

extern "C" void on_stop_signal(int signal_number) {
  if (graceful_stop && !pending_signal) {
    pending_signal = signal_number;
    return;
  }
  tensormap::remove_temporary_files();
  const char* what = stop_message(signal_number);
  [[maybe_unused]] const ssize_t n = ::write(2, what, std::strlen(what));
  ::_exit(1);
}

void handle_signals() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) {
    sigaddset(&action.sa_mask, s);
  }
  for (int s : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(s, &action, nullptr);
  // Past `ulimit -f` a write fails with EFBIG, an Error(Io) like a full disk, instead of
  // killing the process with its file half written.
  ::signal(SIGXFSZ, SIG_IGN);
}

}  // namespace

nlohmann::ordered_json describe(const File& f) {
  nlohmann::ordered_json out;
  const bool tmap = f.format() == Format::Tensormap;
  out["format"] = format_name(f.format());
  out["version"] =
      tmap ? nlohmann::ordered_json(std::to_string(f.major_version()) + "." + std::to_string(f.minor_version()))
           : nlohmann::ordered_json(nullptr);
  out["alignment"] = tmap ? nlohmann::ordered_json(f.alignment()) : nlohmann::ordered_json(nullptr);
  out["header_size"] = f.header_size();
  out["file_size"] = f.file_size();
  out["metadata"] = nlohmann::ordered_json::object();
  for (const auto& [k, v] : f.metadata()) out["metadata"][std::string(k)] = std::string(v);
  out["tensors"] = nlohmann::ordered_json::array();
  for (const TensorEntry& e : f.tensors()) {
    nlohmann::ordered_json t;
    t["name"] = std::string(e.name);
    t["dtype"] = std::string(dtype_name(e.dtype));
    t["shape"] = std::vector<uint64_t>(e.dims.begin(), e.dims.begin() + e.rank);
    t["offset"] = e.offset;
    t["byte_length"] = e.byte_length;
    t["checksum"] = tmap ? nlohmann::ordered_json(hex16(e.checksum)) : nlohmann::ordered_json(nullptr);
    if (e.alias_of) t["alias_of"] = std::string(f.tensors()[*e.alias_of].name);  // spec section 14
    out["tensors"].push_back(std::move(t));
  }
  return out;
}

int inspect(const std::string& path, bool json) {
  const Checkpoint checkpoint = Checkpoint::open(path);
  if (is_sharded(checkpoint.format()) || checkpoint.format() == CheckpointFormat::TorchSave) {
    return inspect_state(checkpoint, json);
  }
  const File f = checkpoint.files().front();
  if (json) {
    std::cout << describe(f).dump(2) << "\n";
    return 0;
  }
  uint64_t data = 0;
  size_t aliases = 0;
  for (const auto& e : f.tensors()) {
    if (e.alias_of)
      ++aliases;
    else
      data += e.byte_length;  // an alias's bytes are its target's
  }
  std::cout << path << ": ";
  if (f.format() == Format::Tensormap) {
    std::cout << "tensormap " << f.major_version() << "." << f.minor_version() << ", alignment " << f.alignment();
  } else {
    std::cout << "safetensors (no checksums)";
  }
  std::cout << ", " << f.tensors().size() << " tensors";
  if (aliases > 0) std::cout << " (" << aliases << " of them aliases of another, stored once)";
  std::cout << ", " << human_bytes(data) << " of data, file " << human_bytes(f.file_size()) << "\n";
  if (!f.metadata().empty()) {
    std::cout << "metadata:\n";
    for (const auto& [k, v] : f.metadata()) std::cout << "  " << printable(k) << ": " << printable(v) << "\n";
  }
  size_t name_width = 4, shape_width = 5;
  std::vector<std::string> names;  // as the terminal may show them: a name is untrusted bytes
  for (const auto& e : f.tensors()) {
    names.push_back(printable(e.name));
    name_width = std::max(name_width, names.back().size());
    shape_width = std::max(shape_width, shape_text(e).size());
  }
  std::printf("%-*s  %-7s  %-*s  %14s  %14s  %-16s\n", static_cast<int>(name_width), "name", "dtype",
              static_cast<int>(shape_width), "shape", "offset", "bytes", "checksum");
  for (size_t i = 0; i < f.tensors().size(); ++i) {
    const TensorEntry& e = f.tensors()[i];
    std::printf("%-*s  %-7s  %-*s  %14llu  %14llu  %s\n", static_cast<int>(name_width), names[i].c_str(),
                std::string(dtype_name(e.dtype)).c_str(), static_cast<int>(shape_width), shape_text(e).c_str(),
                static_cast<unsigned long long>(e.offset), static_cast<unsigned long long>(e.byte_length),
                f.has_checksums() ? hex16(e.checksum).c_str() : "-");
    if (e.alias_of) std::printf("    (alias of %s)\n", names[*e.alias_of].c_str());
  }
  return 0;
}

// Presents verify_checkpoint's report: each problem on stderr, or one line saying what
// was checked.
int verify(const std::string& path) {
  const VerifyReport report = verify_checkpoint(path);
  for (const Error& e : report.problems) {
    std::cerr << "tensormap: " << error_kind_name(e.kind()) << ": " << e.what() << "\n";
  }
  if (!report.ok()) return 1;
  std::cout << path << ": ok, " << report.tensors << " tensors";
  if (is_sharded(report.format)) std::cout << " in " << report.files << " shards";
  if (report.checksums) {
    std::cout << ", " << human_bytes(report.bytes) << " verified\n";
  } else {
    std::cout << "; " << format_name(report.format) << " has no checksums, so only its structure was validated\n";
  }
  return 0;
}

// Each file of the checkpoint into the page cache in 2 MiB folios (warm_page_cache).
int warm(const std::vector<std::string>& paths) {
  const HugePageSupport support = huge_page_support();
  for (const std::string& path : paths) {
    std::vector<std::string> files;
    const Checkpoint checkpoint = Checkpoint::open(path);
    if (is_sharded(checkpoint.format())) {
      for (const File& f : checkpoint.files()) files.push_back(f.path());
    } else {
      files.push_back(path);
    }
    for (const std::string& file : files) {
      const WarmReport r = warm_page_cache(file);
      std::printf("%s: %.0f%% cached before; mapped with 2 MiB pages: %.0f%% before, %.0f%% after (%s)\n",
                  printable(file).c_str(), 100 * r.cached_before, 100 * r.share_before, 100 * r.share_after,
                  r.method.c_str());
    }
  }
  if (!support.madvise_hugepage || support.thp_mode == "never") {
    std::printf("note: this kernel maps file pages 4 KiB at a time (transparent huge pages: %s)\n",
                support.thp_mode.empty() ? "absent" : support.thp_mode.c_str());
  }
  return 0;
}

struct EditArguments {
  std::vector<std::string> remove, put, metadata;
};

int edit(const std::string& path, const EditArguments& args) {
  if (args.remove.empty() && args.put.empty() && args.metadata.empty()) {
    throw UsageError("edit: nothing to do: give --remove, --put or --metadata");
  }
  Editor editor = Editor::open(path);
  for (const std::string& name : args.remove) editor.remove(name);
  std::deque<Checkpoint> sources;  // each must outlive commit()
  for (const std::string& source : args.put) {
    sources.push_back(Checkpoint::open(source));
    for (const std::string& name : sources.back().keys()) editor.put(sources.back(), name);
  }
  for (const std::string& pair : args.metadata) {
    const auto eq = pair.find('=');
    if (eq == std::string::npos || eq == 0) throw UsageError("edit: --metadata takes KEY=VALUE, got " + pair);
    editor.set_metadata(pair.substr(0, eq), pair.substr(eq + 1));
  }
  const EditReport r = editor.commit();
  std::cout << path << ": " << r.kept << " tensors kept (" << human_bytes(r.kept_bytes) << ", copied by the kernel), "
            << r.written << " written (" << human_bytes(r.written_bytes) << "), " << r.removed << " removed\n";
  return 0;
}

}  // namespace tensormap::cli

int main(int argc, char** argv) {
  using namespace tensormap::cli;
  CLI::App app{
      "tensormap: inspect, verify, convert and compare tensor checkpoints.\n"
      "Exit codes: 0 success, 1 invalid or corrupt input or failed check, 2 usage error."};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Help for every subcommand");

  std::string path, out_path, other;
  bool json = false;
  ConvertArguments convert_options;

  auto* inspect_cmd = app.add_subcommand("inspect",
                                         "Show a checkpoint's header: format, version, "
                                         "alignment, metadata, and every tensor's name, "
                                         "dtype, shape, offset, bytes and checksum");
  inspect_cmd
      ->add_option("FILE", path,
                   "A tensormap or safetensors file, a shard index (*.index.json) or a "
                   "torch.save archive")
      ->required();
  inspect_cmd->add_flag("--json", json, "Print the description as JSON (the schema of spec/CLI.md)");

  auto* verify_cmd =
      app.add_subcommand("verify", "Validate the whole file and every tensor checksum; names each bad tensor");
  verify_cmd->add_option("FILE", path, "The checkpoint")->required();

  auto* convert_cmd =
      app.add_subcommand("convert", "Rewrite a checkpoint, tensor by tensor, with constant extra memory");
  convert_cmd->add_option("IN", path, "The checkpoint to read")->required();
  convert_cmd->add_option("OUT", out_path, "The file to write (replaced atomically)")->required();
  convert_cmd->add_option("--format", convert_options.format,
                          "Format of OUT: tensormap, safetensors or torch.save (default: from OUT's "
                          "extension: .safetensors, .pt or .pth, else tensormap)");
  convert_cmd
      ->add_option("--alignment", convert_options.alignment,
                   "Alignment of every tensor in a tensormap OUT (power of two, 64 to 1048576)")
      ->default_val(4096);
  convert_cmd->add_option("--dtype", convert_options.dtype,
                          "Convert floating-point tensors to this dtype (F16, BF16, F32, F64)");
  convert_cmd->add_option("--shard-size", convert_options.shard_size,
                          "Split OUT into shards of at most SIZE of tensor data (e.g. 500M, 2G); OUT is "
                          "then the index, e.g. model.safetensors.index.json");

  auto* diff_cmd = app.add_subcommand("diff", "Compare two checkpoints tensor by tensor; exits 1 when they differ");
  diff_cmd->add_option("A", path, "First checkpoint")->required();
  diff_cmd->add_option("B", other, "Second checkpoint")->required();

  std::vector<std::string> warm_paths;
  auto* warm_cmd =
      app.add_subcommand("warm",
                         "Bring checkpoints into the page cache in 2 MiB folios, so that every process maps "
                         "them with huge pages: for files copied or downloaded in small pieces (cp, curl) and "
                         "still cached that way; re-reads such a file once from the disk");
  warm_cmd->add_option("FILE", warm_paths, "Checkpoints (a shard index warms every shard)")->required();

  EditArguments edit_options;
  auto* edit_cmd = app.add_subcommand("edit",
                                      "Remove, add or replace tensors of a tensormap file; the tensors that stay are "
                                      "copied by the kernel (shared blocks where the filesystem can), never rewritten");
  edit_cmd->add_option("FILE", path, "The tensormap file to change (replaced atomically)")->required();
  edit_cmd->add_option("--remove", edit_options.remove, "Remove this tensor (repeatable)");
  edit_cmd->add_option("--put", edit_options.put,
                       "Add every tensor of this checkpoint (any format), replacing those of the same "
                       "name, after the removals (repeatable)");
  edit_cmd->add_option("--metadata", edit_options.metadata,
                       "Set KEY=VALUE in the metadata; an empty VALUE removes KEY (repeatable)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "tensormap: " << e.what() << " (see tensormap --help)\n";
    return 2;
  }

  handle_signals();
  graceful_stop = *convert_cmd && tensormap::is_url(out_path);
  const tensormap::InterruptCheckScope stop_check([] {
    if (pending_signal) throw Stopped{pending_signal};
  });
  try {
    if (*inspect_cmd) return inspect(path, json);
    if (*verify_cmd) return verify(path);
    if (*convert_cmd) return convert(path, out_path, convert_options, ::isatty(2) != 0);
    if (*diff_cmd) return diff(path, other);
    if (*edit_cmd) return edit(path, edit_options);
    if (*warm_cmd) return warm(warm_paths);
  } catch (const UsageError& e) {
    std::cerr << "tensormap: " << e.what() << "\n";
    return 2;
  } catch (const Stopped& s) {
    std::cerr << stop_message(s.signal_number);
    return 1;
  } catch (const tensormap::Error& e) {
    std::cerr << "tensormap: " << tensormap::error_kind_name(e.kind()) << ": " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tensormap: " << first_line(e.what()) << "\n";
    return 1;
  }
  return 2;
}
