// The subcommands of the tensormap command line. Internal to the CLI.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "tensormap/checkpoint.h"

namespace tensormap::cli {

// A request the command line cannot carry out as asked: exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ConvertArguments {
  std::string format;  // "" decides by the output's extension
  uint64_t alignment = 4096;
  std::string dtype;       // "" keeps every dtype
  std::string shard_size;  // "" writes one file
};

int inspect(const std::string& path, bool json);
int verify(const std::string& path);
int convert(const std::string& in, const std::string& out, const ConvertArguments& options, bool progress);
int diff(const std::string& a, const std::string& b);
// inspect of sharded checkpoints and torch.save archives.
int inspect_state(const Checkpoint& checkpoint, bool json);

// The first line of a message (LibTorch errors carry a backtrace after it).
std::string first_line(const std::string& message);

}  // namespace tensormap::cli
