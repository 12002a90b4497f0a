// Interrupting a long operation (a save, a conversion, an edit, a verification, a copy
// load) from the thread that runs it: how the Python package turns Ctrl-C into an aborted
// save instead of one that commits and then raises.
//
//   tensormap::InterruptCheckScope scope([] { if (stop_requested()) throw MyStop(); });
//   tensormap::save(model, "model.tmap");  // throws MyStop at the next piece after a stop
//
// The check runs on the thread that opened the scope, between pieces of work: before each
// piece of at most 16 MiB a writer writes or copies, before each 4 MiB a verification
// reads, and before each tensor a load binds. Whatever it throws abandons the operation as
// any failure does: a writer removes its temporary and the destination keeps its old
// content; a load stops between tensors (those already copied stay, as after any error).
//
// Thread-safety: the scope is thread-local; scopes nest, the inner one in force.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>

#include "tensormap/export.h"

namespace tensormap {

using InterruptCheck = std::function<void()>;

class TENSORMAP_EXPORT InterruptCheckScope {
 public:
  explicit InterruptCheckScope(InterruptCheck check);
  ~InterruptCheckScope();  // restores the scope it replaced
  InterruptCheckScope(const InterruptCheckScope&) = delete;
  InterruptCheckScope& operator=(const InterruptCheckScope&) = delete;

 private:
  InterruptCheck previous_;
};

namespace detail {
// Runs this thread's interrupt check, if a scope set one. For the library's own loops.
TENSORMAP_EXPORT void check_interrupt();
// For the library's waits on other threads: waits on `changed` (`lock` held) for at most
// 50 ms, then runs the check with the lock released. If the check throws, `stop` runs
// with the lock held again (to tell the other threads) and the exception goes on.
TENSORMAP_EXPORT void wait_interruptibly(std::unique_lock<std::mutex>& lock, std::condition_variable& changed,
                                         const std::function<void()>& stop);
}  // namespace detail

}  // namespace tensormap
