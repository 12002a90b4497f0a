// A file descriptor owned by one object and closed with it. Internal to the core.
#pragma once

#include <unistd.h>

#include <utility>

namespace tensormap::detail {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing.
  int release() { return std::exchange(fd_, -1); }
  // Closes the descriptor held (its error ignored: for paths where nothing was written or
  // the error is already being reported) and holds `fd` instead.
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  // Closes and reports close's own result: 0, or -1 with errno set. Where data was
  // written, a failed close can be the first report of a failed write.
  int close() { return fd_ < 0 ? 0 : ::close(release()); }

 private:
  int fd_ = -1;
};

}  // namespace tensormap::detail
