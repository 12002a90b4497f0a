// Reads the process's memory figures from /proc.
#include "tensormap/process_memory.h"

#include <fstream>
#include <string>

namespace tensormap {
namespace {

// Parses "Name:   1234 kB" lines of a /proc file into the fields named.
void read_kb_fields(const char* path, const char* const* names, uint64_t* const* values, int n) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    for (int i = 0; i < n; ++i) {
      const std::string prefix = std::string(names[i]) + ":";
      if (line.compare(0, prefix.size(), prefix) == 0) {
        *values[i] = std::stoull(line.substr(prefix.size())) * 1024;
      }
    }
  }
}

}  // namespace

uint64_t total_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemTotal:") return kib * 1024;
    meminfo.ignore(64, '\n');
  }
  return 0;
}

ProcessMemory read_process_memory() {
  ProcessMemory m;
  const char* status_names[] = {"VmHWM", "VmRSS", "RssAnon", "RssFile"};
  uint64_t* status_values[] = {&m.vm_hwm, &m.vm_rss, &m.rss_anon, &m.rss_file};
  read_kb_fields("/proc/self/status", status_names, status_values, 4);
  const char* rollup_names[] = {"Pss"};
  uint64_t* rollup_values[] = {&m.pss};
  read_kb_fields("/proc/self/smaps_rollup", rollup_names, rollup_values, 1);
  return m;
}

bool reset_peak_memory() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

}  // namespace tensormap
