// Checkpoints at URLs: open_remote finds the format from the first bytes and opens the
// checkpoint through the same RemoteObject (a tensormap or safetensors file: a File read
// by ranges; a shard index, whose shards share the Fetcher; a torch.save archive), and
// RemoteOptions::from_environment.
#include <cerrno>
#include <cstdlib>
#include <memory>

#include "format/detect.h"
#include "format/names.h"
#include "remote/remote_object.h"
#include "source.h"
#include "tensormap/error.h"
#include "tensormap/file.h"
#include "tensormap/remote.h"

namespace tensormap {
namespace detail {
namespace {

unsigned long long environment_number(const char* name, unsigned long long low, unsigned long long high,
                                      unsigned long long otherwise) {
  const char* text = std::getenv(name);
  if (!text || !*text) return otherwise;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || *end != '\0' || text[0] == '-' || value < low || value > high) {
    throw Error(ErrorKind::InvalidArgument, std::string(name) + " is " + quoted_name(text) +
                                                ", not a whole number between " + std::to_string(low) + " and " +
                                                std::to_string(high));
  }
  return value;
}

}  // namespace

std::shared_ptr<const Source> open_remote(const std::string& url, std::shared_ptr<const Fetcher> fetcher) {
  auto object = std::make_shared<const RemoteObject>(fetcher, url);
  switch (detect_opened(*object)) {
    case Detected::TorchSave: return open_torch_save(std::move(object));
    case Detected::ShardIndex: {
      ShardIndex index = read_shard_index(*object);
      return open_sharded(std::move(index), [fetcher, url](const ShardIndex& index, uint32_t s) {
        const std::string shard = sibling_url(url, index.shard_files()[s]);
        return open_file_source(open_file(std::make_shared<const RemoteObject>(fetcher, shard)));
      });
    }
    default: return open_file_source(open_file(std::move(object)));
  }
}

}  // namespace detail

RemoteOptions RemoteOptions::from_environment() {
  RemoteOptions o;
  o.connections =
      static_cast<unsigned>(detail::environment_number("TENSORMAP_REMOTE_CONNECTIONS", 1, 256, o.connections));
  o.chunk_bytes = detail::environment_number("TENSORMAP_REMOTE_CHUNK_BYTES", 4096, uint64_t{1} << 30, o.chunk_bytes);
  o.part_bytes =
      detail::environment_number("TENSORMAP_REMOTE_PART_BYTES", uint64_t{5} << 20, uint64_t{5} << 30, o.part_bytes);
  o.retries = static_cast<unsigned>(detail::environment_number("TENSORMAP_REMOTE_RETRIES", 0, 20, o.retries));
  o.timeout_seconds = static_cast<double>(detail::environment_number(
      "TENSORMAP_REMOTE_TIMEOUT", 1, 3600, static_cast<unsigned long long>(o.timeout_seconds)));
  for (const char* name : {"TENSORMAP_BEARER_TOKEN", "HF_TOKEN"}) {
    if (const char* token = std::getenv(name); token && *token) {
      o.bearer_token = token;
      break;
    }
  }
  for (const char* name : {"TENSORMAP_REMOTE_CA_BUNDLE", "AWS_CA_BUNDLE"}) {
    if (const char* path = std::getenv(name); path && *path) {
      o.ca_bundle = path;
      break;
    }
  }
  return o;
}

}  // namespace tensormap
