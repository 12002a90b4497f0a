// An exclusive lock on a checkpoint's path, across processes and threads: what makes two
// concurrent read-modify-write updates of one file (tensormap edit) run one after the
// other instead of losing one. Internal to the core.
//
// The lock is held on a lock file beside the checkpoint's real path (symbolic links
// resolved, so every name of one file shares one lock): ".<name>.lock". The checkpoint
// itself cannot carry it, since a commit renames a new file over it. The holder removes
// the lock file as it lets go, so nothing is left behind; a waiter that then gets the
// lock of the removed file sees that the name no longer gives it and locks the new one.
// (A process killed while holding it leaves the file, which the next lock reuses.)
//
// Across processes the lock is Boost.Interprocess's file_lock, a POSIX record lock
// (fcntl): the kernel frees it when the process exits, however it exits. Record locks do
// not exclude threads of one process, and closing any descriptor of the file drops the
// process's lock; so within a process a flag per lock file serializes the holders, and
// only the holder opens the lock file.
//
// Thread-safety: a PathLock may be made and destroyed on any thread.
#pragma once

#include <memory>
#include <string>

namespace tensormap::detail {

class PathLock {
 public:
  // Blocks until this process holds the lock of `path` (an existing file) exclusively.
  // Throws Error(Io) naming the lock file if it cannot be created or locked,
  // Error(NotFound) for a `path` that does not exist, and Error(InvalidArgument) if this
  // thread holds the lock already (it would wait for itself).
  explicit PathLock(const std::string& path);
  ~PathLock();  // removes the lock file and releases the lock
  PathLock(const PathLock&) = delete;
  PathLock& operator=(const PathLock&) = delete;

  // The lock file's path.
  const std::string& lock_path() const;

  struct Held;  // the lock file, locked

 private:
  std::unique_ptr<Held> held_;
};

}  // namespace tensormap::detail
