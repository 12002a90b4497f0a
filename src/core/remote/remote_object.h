// An object at a URL, read by ranges: the ByteSource of remote checkpoints. Internal to
// the core.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/byte_source.h"
#include "remote/fetcher.h"
#include "remote/url.h"

namespace tensormap::detail {

class RemoteObject final : public ByteSource {
 public:
  // The first request: the object's size, version and first `head_bytes` bytes, which
  // later reads inside them are served from. Throws an Error of the Remote group.
  RemoteObject(std::shared_ptr<const Fetcher> fetcher, const std::string& url, uint64_t head_bytes = 64 << 10);

  const std::string& name() const override { return target_.shown; }
  uint64_t size() const override { return first_.size; }
  void read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const override;
  // read(), handing the bytes to `follow` in order as they land (Fetcher::Follower).
  void read(uint64_t offset, void* dest, uint64_t size, const std::string& what, const Fetcher::Follower& follow) const;

  // Many ranges of the object at once (the rows of a slice), over the connections.
  void read_ranges(const std::vector<Fetcher::Range>& ranges, const std::string& what) const;

  const std::vector<unsigned char>& head() const { return first_.head; }
  const Fetcher& fetcher() const { return *fetcher_; }
  const std::shared_ptr<const Fetcher>& shared_fetcher() const { return fetcher_; }

 private:
  // Throws Error(Truncated) where [offset, offset + size) runs past the object.
  void check_range(uint64_t offset, uint64_t size, const std::string& what) const;

  std::shared_ptr<const Fetcher> fetcher_;
  RemoteTarget target_;
  FirstResponse first_;
};

struct Source;
// The checkpoint at `url`, in any format; its shards, if it is an index, share `fetcher`.
std::shared_ptr<const Source> open_remote(const std::string& url, std::shared_ptr<const Fetcher> fetcher);

}  // namespace tensormap::detail
