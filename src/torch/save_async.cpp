// Saves in the background (save.h): a child process, forked at the call, writes the
// tensors as they were at that moment, while the caller goes on.
//
// Why a fork: the child's memory is the parent's at the fork, shared page by page until
// one side writes a page, when the kernel copies that page alone. So the call blocks only
// for the fork (its page tables), and the extra memory is the pages the caller writes
// while the save runs: no staging copy of the whole state, as a copy to a CPU buffer
// would make. The child runs only the writer, on contiguous CPU memory (anything else is
// copied before the fork), and ends with _exit: no Python, no LibTorch thread pool, no
// destructors of the parent's objects run in it.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "saving.h"
#include "tensormap/error.h"
#include "tensormap/interrupt.h"
#include "tensormap/save.h"
#include "tensormap/skeleton.h"

namespace tensormap {

// What a background save shares between its handle and the saves that follow it to the
// same path: the child, the pipe its report comes through, and, once reaped, its end.
struct SaveHandle::State {
  std::mutex mutex;
  std::string path;
  pid_t pid = -1;
  int report_fd = -1;  // the read end; the child writes its error here, nothing on success
  bool reaped = false;
  int status = 0;
  std::string report;

  ~State() {
    if (report_fd >= 0) ::close(report_fd);
  }

  // Reads what the report pipe holds now (all of it once the child has ended).
  void drain() {
    char buffer[4096];
    while (true) {
      const ssize_t n = ::read(report_fd, buffer, sizeof buffer);
      if (n > 0) {
        if (report.size() < (size_t{64} << 10)) report.append(buffer, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      return;  // 0: the child has closed it; EAGAIN: nothing more now
    }
  }

  // Whether the child has ended, reaping it (waiting for it with `block`). REQUIRES: mutex.
  bool settle(bool block) {
    if (reaped) return true;
    while (true) {
      const pid_t r = ::waitpid(pid, &status, block ? 0 : WNOHANG);
      if (r == pid) break;
      if (r == 0) {
        drain();  // keep the pipe from filling
        return false;
      }
      if (errno == EINTR) continue;
      status = -1;  // reaped by someone else (a SIGCHLD handler set to ignore): no status
      break;
    }
    reaped = true;
    drain();
    return true;
  }

  // The save's outcome, once settled: nothing, or throws its error.
  void rethrow() const {
    if (status == 0) return;
    if (status != -1 && WIFSIGNALED(status)) {
      throw Error(ErrorKind::Io, path + ": the background save was killed by signal " +
                                     std::to_string(WTERMSIG(status)) +
                                     " before it finished; the destination keeps its old content");
    }
    const size_t newline = report.find('\n');
    if (newline != std::string::npos) {
      if (const auto kind = error_kind_from_name(std::string_view(report).substr(0, newline))) {
        throw Error(*kind, report.substr(newline + 1));
      }
    }
    throw Error(ErrorKind::Io, path + ": the background save failed" +
                                   (status == -1 ? std::string(" (its exit status was lost)")
                                                 : " with exit status " + std::to_string(WEXITSTATUS(status))));
  }
};

namespace {

// The background saves of this process still running, by destination.
std::mutex running_mutex;
std::map<std::string, std::shared_ptr<SaveHandle::State>> running;

// Waits for a background save to `path` started earlier, if one is running: one save at a
// time per path, in the order they were called. Its outcome stays its own handle's.
void wait_for_earlier(const std::string& path) {
  std::shared_ptr<SaveHandle::State> earlier;
  {
    std::lock_guard<std::mutex> lock(running_mutex);
    const auto it = running.find(path);
    if (it == running.end()) return;
    earlier = it->second;
    running.erase(it);
  }
  std::lock_guard<std::mutex> lock(earlier->mutex);
  earlier->settle(true);
}

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

// The child's view of the save: once a tensor is written, the whole pages of its bytes
// that no tensor still to be written reads are given back (MADV_DONTNEED). Such a page,
// if the caller has not written it since the fork, is then the caller's alone, and the
// caller's next write to it takes it over without a copy. So the save holds only the
// pages the caller wrote before they were saved.
class PageReturner final : public detail::SaveObserver {
 public:
  explicit PageReturner(const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i].second;
      if (!t.defined() || t.is_meta() || is_released(t) || !t.device().is_cpu() || !t.is_contiguous() ||
          t.numel() == 0) {
        continue;
      }
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges_.push_back({begin, begin + static_cast<uintptr_t>(t.nbytes()), i});
    }
  }

  void planned(const std::vector<bool>& read) override {
    ranges_.erase(std::remove_if(ranges_.begin(), ranges_.end(),
                                 [&](const Range& r) { return r.index >= read.size() || !read[r.index]; }),
                  ranges_.end());
    std::sort(ranges_.begin(), ranges_.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
    pending_.assign(read.size(), false);
    position_.assign(read.size(), SIZE_MAX);
    max_end_.resize(ranges_.size());
    uintptr_t most = 0;
    for (size_t k = 0; k < ranges_.size(); ++k) {
      pending_[ranges_[k].index] = true;
      position_[ranges_[k].index] = k;
      most = std::max(most, ranges_[k].end);
      max_end_[k] = most;
    }
  }

  void written(size_t i) override {
    if (i >= position_.size() || position_[i] == SIZE_MAX) return;
    pending_[i] = false;
    const Range& r = ranges_[position_[i]];
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t lo = (r.begin + page - 1) / page * page, hi = r.end / page * page;
    if (lo >= hi) return;
    // The pages of tensors still to be written that overlap this one stay.
    std::vector<std::pair<uintptr_t, uintptr_t>> kept;
    size_t k = static_cast<size_t>(std::lower_bound(ranges_.begin(), ranges_.end(), r.end,
                                                    [](const Range& a, uintptr_t v) { return a.begin < v; }) -
                                   ranges_.begin());
    while (k > 0 && max_end_[k - 1] > r.begin) {
      const Range& other = ranges_[--k];
      if (pending_[other.index] && other.end > r.begin) {
        kept.emplace_back(other.begin / page * page, (other.end + page - 1) / page * page);
      }
    }
    std::sort(kept.begin(), kept.end());
    uintptr_t at = lo;
    for (const auto& [begin, end] : kept) {
      if (begin > at) give_back(at, std::min(begin, hi));
      at = std::max(at, end);
      if (at >= hi) return;
    }
    give_back(at, hi);
  }

 private:
  struct Range {
    uintptr_t begin, end;
    size_t index;
  };

  static void give_back(uintptr_t begin, uintptr_t end) {
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);  // advisory
  }

  std::vector<Range> ranges_;       // of the tensors read, by address
  std::vector<uintptr_t> max_end_;  // the furthest end of ranges_[0..k]
  std::vector<bool> pending_;       // by tensor: read, and not yet written
  std::vector<size_t> position_;    // by tensor: its place in ranges_, or SIZE_MAX
};

// The child: writes the file and ends, reporting an error as "Kind\nmessage".
[[noreturn]] void run_child(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
                            const SaveOptions& options, int report_fd) {
  // A Ctrl-C meant for the caller (sent to its whole process group) does not stop the
  // save; the caller's interrupt check (Python's) must not run here.
  ::signal(SIGINT, SIG_IGN);
  InterruptCheckScope no_check(nullptr);
  // Nor does it hold the caller's descriptors (a pipe a parent reads to its end, a
  // socket): the save opens what it writes itself.
  if (report_fd > 3) ::close_range(3, static_cast<unsigned>(report_fd) - 1, 0);
  ::close_range(static_cast<unsigned>(report_fd) + 1, ~0U, 0);
  int code = 0;
  try {
    PageReturner returner(tensors);
    detail::save_observed(tensors, path, options, &returner);
  } catch (const Error& e) {
    write_all(report_fd, std::string(error_kind_name(e.kind())) + "\n" + e.what());
    code = 1;
  } catch (const std::exception& e) {  // a c10::Error: its first line, not its backtrace
    const std::string what = e.what();
    write_all(report_fd, std::string("LibTorch\n") + path + ": " + what.substr(0, what.find('\n')));
    code = 1;
  } catch (...) {
    code = 2;
  }
  ::_exit(code);
}

}  // namespace

SaveHandle::SaveHandle(std::shared_ptr<State> state) : state_(std::move(state)) {}
SaveHandle::SaveHandle(SaveHandle&&) noexcept = default;
SaveHandle& SaveHandle::operator=(SaveHandle&& other) noexcept {
  if (this != &other) {
    finish_quietly();
    state_ = std::move(other.state_);
  }
  return *this;
}

SaveHandle::~SaveHandle() { finish_quietly(); }

void SaveHandle::finish_quietly() noexcept {
  if (!state_) return;
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->settle(true);
}

void SaveHandle::wait() {
  if (!state_) return;
  std::shared_ptr<State> state = std::move(state_);
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->settle(true);
  }
  {
    std::lock_guard<std::mutex> lock(running_mutex);
    const auto it = running.find(state->path);
    if (it != running.end() && it->second == state) running.erase(it);
  }
  state->rethrow();
}

bool SaveHandle::done() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->settle(false);
}

int SaveHandle::pid() const { return state_ ? static_cast<int>(state_->pid) : -1; }

SaveHandle save_async(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
                      const SaveOptions& options) {
  wait_for_earlier(path);
  // The child writes from contiguous CPU memory only: anything else is copied now (it
  // counts in the call's time and memory). A released tensor is refused by the save.
  std::vector<std::pair<std::string, at::Tensor>> ready;
  ready.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.defined() ? tensor.detach() : tensor;
    if (t.defined() && !is_released(t) && !t.is_meta()) {  // those the save refuses, in the child
      if (t.is_conj()) t = t.resolve_conj();
      if (t.is_neg()) t = t.resolve_neg();
      if (!t.device().is_cpu() || !t.is_contiguous()) t = t.to(at::kCPU).contiguous();
    }
    ready.emplace_back(name, std::move(t));
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    throw Error(ErrorKind::Io, path + ": cannot start a background save: pipe: " + std::strerror(errno));
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    throw Error(ErrorKind::Io, path + ": cannot start a background save: fork: " + std::strerror(err));
  }
  if (pid == 0) {
    ::close(fds[0]);
    run_child(ready, path, options, fds[1]);
  }
  ::close(fds[1]);
  ::fcntl(fds[0], F_SETFL, O_NONBLOCK);
  auto state = std::make_shared<SaveHandle::State>();
  state->path = path;
  state->pid = pid;
  state->report_fd = fds[0];
  {
    std::lock_guard<std::mutex> lock(running_mutex);
    running[path] = state;
  }
  return SaveHandle(std::move(state));
}

SaveHandle save_async(const torch::nn::Module& module, const std::string& path, const SaveOptions& options) {
  return save_async(named_state(module), path, options);
}

}  // namespace tensormap
