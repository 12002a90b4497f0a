// The temporary files of unfinished writers: see temporaries.h.
#include "io/temporaries.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "io/posix_io.h"
#include "io/unique_fd.h"
#include "tensormap/temporaries.h"

namespace tensormap::detail {

namespace {

// The named temporaries of this process, for remove_temporary_files(), which must be
// async-signal-safe: fixed slots, each a path and an atomic state, no allocation.
constexpr int kRegistrySlots = 64;
struct RegistrySlot {
  std::atomic<int> state{0};  // 0 free, 1 being filled, 2 holds a path
  char path[PATH_MAX];
};
RegistrySlot registry[kRegistrySlots];

}  // namespace

int register_temporary(const std::string& path) noexcept {
  if (path.size() >= PATH_MAX) return -1;
  for (int i = 0; i < kRegistrySlots; ++i) {
    int expected = 0;
    if (registry[i].state.compare_exchange_strong(expected, 1)) {
      std::memcpy(registry[i].path, path.c_str(), path.size() + 1);
      registry[i].state.store(2);
      return i;
    }
  }
  return -1;  // more than 64 at once: still removed by their owners and by later saves
}

void unregister_temporary(int slot) noexcept {
  if (slot >= 0) registry[slot].state.store(0);
}

std::string temporary_name(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t salt = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                        (static_cast<uint64_t>(::getpid()) << 32) ^ counter.fetch_add(1);
  char suffix[32];
  std::snprintf(suffix, sizeof suffix, "%012llx", static_cast<unsigned long long>(salt & 0xFFFFFFFFFFFFull));
  return parent_directory(path) + "/." + base_name(path) + ".tmp-" + suffix;
}

bool named_temporaries_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("TENSORMAP_NAMED_TEMPORARIES");
    return v != nullptr && v[0] == '1';
  }();
  return forced;
}

namespace {
constexpr time_t kStaleAfterSeconds = 60;
}  // namespace

}  // namespace tensormap::detail

namespace tensormap {

void remove_temporary_files() noexcept {
  for (auto& slot : detail::registry) {
    if (slot.state.load() == 2) ::unlink(slot.path);
  }
}

}  // namespace tensormap

namespace tensormap::detail {

void collect_stale_temporaries(const std::string& dir, const std::function<bool(std::string_view)>& ours) noexcept {
  constexpr std::string_view kTag = ".tmp-";
  constexpr size_t kSuffix = kTag.size() + 12;  // ".tmp-" and 12 hex digits
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  const time_t now = ::time(nullptr);
  while (const dirent* entry = ::readdir(d)) {
    const std::string_view name(entry->d_name);
    if (name.size() < 2 + kSuffix || name[0] != '.' || name.substr(name.size() - kSuffix, kTag.size()) != kTag)
      continue;
    try {
      if (!ours(name.substr(1, name.size() - 1 - kSuffix))) continue;
    } catch (...) {
      continue;
    }
    const std::string candidate = dir + "/" + std::string(name);
    const UniqueFd fd(::open(candidate.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
    if (!fd) continue;
    struct stat st {};
    // A live writer holds its flock; a young file may be one whose writer has not taken
    // it yet (create, then lock); the checks after the lock see that the name still
    // leads to the file locked.
    if (::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode) && now - st.st_mtime >= kStaleAfterSeconds &&
        ::flock(fd.get(), LOCK_EX | LOCK_NB) == 0) {
      struct stat again {};
      if (::lstat(candidate.c_str(), &again) == 0 && again.st_ino == st.st_ino && again.st_dev == st.st_dev) {
        ::unlink(candidate.c_str());
      }
    }
  }
  ::closedir(d);
}

}  // namespace tensormap::detail
