// PathLock: Boost.Interprocess's file_lock on a lock file beside the checkpoint, behind a
// per-process flag of the same lock file (path_lock.h says why both).
#include "io/path_lock.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/interprocess/errors.hpp>
#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/sync/file_lock.hpp>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>

#include "io/posix_io.h"
#include "io/unique_fd.h"
#include "tensormap/error.h"

namespace tensormap::detail {
namespace {

// The lock file of `path`: ".<name>.lock" beside its real path.
std::string lock_file_of(const std::string& path) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) {
    const int err = errno;
    if (err == ENOENT) throw Error(ErrorKind::NotFound, path + ": no such file to lock");
    throw_io(path, "cannot resolve the path to lock it", err);
  }
  const std::string real(resolved);
  const size_t slash = real.rfind('/');
  return real.substr(0, slash + 1) + "." + real.substr(slash + 1) + ".lock";
}

// Which lock files a PathLock of this process holds. A flag and a condition variable
// rather than a mutex per file: a PathLock may be released by another thread than the one
// that took it.
class ProcessLocks {
 public:
  static ProcessLocks& instance() {
    static ProcessLocks* locks = new ProcessLocks;  // never destroyed: used from any thread at exit
    return *locks;
  }

  // Blocks while another PathLock of this process holds `lock_path`, then holds it.
  // Throws Error(InvalidArgument) where this thread holds it already: waiting would never end.
  void acquire(const std::string& lock_path, const std::string& path) {
    std::unique_lock<std::mutex> guard(mutex_);
    const auto held = held_.find(lock_path);
    if (held != held_.end() && held->second == std::this_thread::get_id()) {
      throw Error(ErrorKind::InvalidArgument,
                  path + ": this thread already holds its lock (" + lock_path +
                      "): an Editor of this file is open here; commit or destroy it before opening another");
    }
    released_.wait(guard, [&] { return held_.count(lock_path) == 0; });
    held_.emplace(lock_path, std::this_thread::get_id());
  }

  void release(const std::string& lock_path) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      held_.erase(lock_path);
    }
    released_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  std::map<std::string, std::thread::id> held_;  // by the thread that took it
};

}  // namespace

struct PathLock::Held {
  Held(std::string path, UniqueFd descriptor, boost::interprocess::file_lock lock)
      : lock_path(std::move(path)), fd(std::move(descriptor)), across_processes(std::move(lock)) {}

  std::string lock_path;
  UniqueFd fd;  // our own descriptor of the lock file: what identifies the file locked
  boost::interprocess::file_lock across_processes;
};

namespace {

// Locks the lock file at `lock_path` across processes. A holder removes the lock file as
// it lets go, so a waiter may get the lock of a file that has no name any more: it checks
// that the name still gives the file it locked, and otherwise starts again on the new one.
std::unique_ptr<PathLock::Held> lock_across_processes(const std::string& lock_path, const std::string& path) {
  for (int attempt = 0; attempt < 10000; ++attempt) {
    UniqueFd fd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!fd) throw_io(lock_path, "cannot create the lock file of " + path, errno);
    boost::interprocess::file_lock lock;
    try {
      boost::interprocess::file_lock opened(lock_path.c_str());  // Boost opens by name only
      opened.lock();
      lock.swap(opened);
    } catch (const boost::interprocess::interprocess_exception& e) {
      if (e.get_error_code() == boost::interprocess::not_found_error) continue;  // removed meanwhile
      throw Error(ErrorKind::Io, lock_path + ": cannot lock it for " + path + ": " + e.what());
    }
    // Boost opened the name after `fd` did: if the name still gives fd's file, so did its
    // open (a file once unlinked never gets its name back).
    struct stat held {
    }, named{};
    if (::fstat(fd.get(), &held) == 0 && ::stat(lock_path.c_str(), &named) == 0 && held.st_ino == named.st_ino &&
        held.st_dev == named.st_dev) {
      return std::make_unique<PathLock::Held>(lock_path, std::move(fd), std::move(lock));
    }
    // The previous holder removed this one: lock the file now under the name (fd closes).
  }
  throw Error(ErrorKind::Io, lock_path + ": could not lock it for " + path +
                                 " after 10000 attempts: "
                                 "other processes keep replacing it");
}

}  // namespace

PathLock::PathLock(const std::string& path) {
  const std::string lock_path = lock_file_of(path);
  ProcessLocks& locks = ProcessLocks::instance();
  locks.acquire(lock_path, path);
  try {
    held_ = lock_across_processes(lock_path, path);
  } catch (...) {
    locks.release(lock_path);
    throw;
  }
}

PathLock::~PathLock() {
  const std::string lock_path = held_->lock_path;
  ::unlink(lock_path.c_str());  // while still locked: no leftover, and waiters start again
  held_.reset();                // unlocks and closes it: other processes may go on
  ProcessLocks::instance().release(lock_path);
}

const std::string& PathLock::lock_path() const { return held_->lock_path; }

}  // namespace tensormap::detail
