// The writer of one tensormap or safetensors file, as a WriterCore (writer_core.h), for
// the writers inside the core that need more than the public Writer: the shards of a
// ShardedWriter (sealed together, then published) and the Editor (which copies kept
// tensors in the kernel). Internal to the core; defined in writer.cpp.
#pragma once

#include <xxhash.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "format/header.h"
#include "io/output.h"
#include "tensormap/writer.h"
#include "write/writer_core.h"

namespace tensormap::detail {

class FileWriterCore final : public WriterCore {
 public:
  // Validates the declarations and plans the layout, then creates the output: a new
  // AtomicFile at `path`.
  FileWriterCore(std::string path, std::vector<TensorSpec> tensors, WriterOptions options);
  // The same, writing to what `make_output` returns once the declarations are checked
  // (another destination, or a fault injected in a test).
  FileWriterCore(std::string path, std::vector<TensorSpec> tensors, WriterOptions options,
                 const std::function<std::unique_ptr<Output>()>& make_output);
  ~FileWriterCore() override;

  // Writes the whole current tensor by copying `size` bytes at `offset` of the local file
  // open as `fd` (Output::copy_from), recording `checksum` as its XXH3-64 unread.
  // REQUIRES: the current tensor has received no bytes and is `size` bytes long.
  void copy_tensor(int fd, uint64_t offset, uint64_t size, uint64_t checksum, const std::string& what);

 private:
  void put(const void* data, size_t size, size_t tensor, uint64_t at) override;
  void tensor_done(size_t tensor) override;
  void seal() override;
  void publish() override;
  void discard() noexcept override;

  std::vector<TensorSpec> tensors_;
  WriterOptions options_;
  Layout layout_;
  std::vector<unsigned char> safetensors_header_;  // known up front; tensormap's is not
  std::vector<uint64_t> checksums_;
  // Pieces this large are hashed on a second thread while written (put()).
  static constexpr size_t kHashAside = size_t{1} << 20;
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> hash_{nullptr, XXH3_freeState};
  std::unique_ptr<Output> output_;  // null once published or discarded
};

}  // namespace tensormap::detail
