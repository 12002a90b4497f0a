// The thread-local interrupt check of interrupt.h.
#include "tensormap/interrupt.h"

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

}  // namespace tensormap
