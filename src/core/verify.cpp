// Checking a whole checkpoint: see tensormap/verify.h.
#include "tensormap/verify.h"

#include "tensormap/file.h"

namespace tensormap {

VerifyReport verify_checkpoint(const std::string& path) {
  const Checkpoint checkpoint = Checkpoint::open(path);
  VerifyReport report;
  report.path = path;
  report.format = checkpoint.format();
  report.tensors = checkpoint.size();
  for (const std::string& name : checkpoint.keys()) (void)checkpoint.info(name);  // each name in its shard
  const std::vector<File> files = checkpoint.files();
  report.files = files.size();
  report.checksums = !files.empty();
  for (const File& file : files) {
    report.checksums = report.checksums && file.has_checksums();
    for (const TensorEntry& e : file.tensors()) report.bytes += e.alias_of ? 0 : e.byte_length;
    for (Error& e : file.find_corruption()) report.problems.push_back(std::move(e));
  }
  return report;
}

}  // namespace tensormap
