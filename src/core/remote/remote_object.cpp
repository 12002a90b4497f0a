// RemoteObject: see remote_object.h.
#include "remote/remote_object.h"

#include <cstring>

#include "tensormap/error.h"

namespace tensormap::detail {

void RemoteObject::check_range(uint64_t offset, uint64_t size, const std::string& what) const {
  if (offset > first_.size || size > first_.size - offset) {
    throw Error(ErrorKind::Truncated, target_.shown + ": " + what + " ends at " + std::to_string(offset + size) +
                                          ", past the end of the object (" + std::to_string(first_.size) + " bytes)");
  }
}

RemoteObject::RemoteObject(std::shared_ptr<const Fetcher> fetcher, const std::string& url, uint64_t head_bytes)
    : fetcher_(std::move(fetcher)), target_(resolve_url(url)), first_(fetcher_->first(target_, head_bytes)) {}

void RemoteObject::read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const {
  read(offset, dest, size, what, nullptr);
}

void RemoteObject::read(uint64_t offset, void* dest, uint64_t size, const std::string& what,
                        const Fetcher::Follower& follow) const {
  check_range(offset, size, what);
  if (size == 0) return;
  auto* out = static_cast<unsigned char*>(dest);
  if (offset + size <= first_.head.size()) {  // already here
    std::memcpy(out, first_.head.data() + offset, static_cast<size_t>(size));
    if (follow) follow(out, size);
    return;
  }
  fetcher_->read(target_, first_.version, first_.size, offset, size, out, follow, what);
}

void RemoteObject::read_ranges(const std::vector<Fetcher::Range>& ranges, const std::string& what) const {
  for (const Fetcher::Range& r : ranges) check_range(r.offset, r.size, what);
  fetcher_->read_ranges(target_, first_.version, first_.size, ranges, nullptr, what);
}

}  // namespace tensormap::detail
