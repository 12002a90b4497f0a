// The thread-local interrupt check of interrupt.h.
#include "tensormap/interrupt.h"

#include <chrono>
#include <utility>

namespace tensormap {
namespace {

thread_local InterruptCheck current_check;

}  // namespace

InterruptCheckScope::InterruptCheckScope(InterruptCheck check) : previous_(std::move(current_check)) {
  current_check = std::move(check);
}

InterruptCheckScope::~InterruptCheckScope() { current_check = std::move(previous_); }

void detail::check_interrupt() {
  if (current_check) current_check();
}

void detail::wait_interruptibly(std::unique_lock<std::mutex>& lock, std::condition_variable& changed,
                                const std::function<void()>& stop) {
  changed.wait_for(lock, std::chrono::milliseconds(50));
  lock.unlock();
  try {
    check_interrupt();
  } catch (...) {
    lock.lock();
    stop();
    throw;
  }
  lock.lock();
}

}  // namespace tensormap
