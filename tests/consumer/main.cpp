// Writes files with the installed core and reads them back; exits 0 only if the values
// survive. Needs no LibTorch: the core reads and writes torch.save archives itself.
#include <tensormap/core.h>

#include <cstdio>
#include <cstring>
#include <string>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const float value[3] = {1.5f, -2.0f, 4.25f};
  tensormap::Writer w(argv[1], {{"v", tensormap::Dtype::F32, {3}}});
  w.write_tensor(value, sizeof value);
  w.commit();
  const auto f = tensormap::File::open(argv[1]);
  f.verify();
  const auto bytes = f.bytes(f.at("v"));
  bool same = bytes.size == sizeof value && std::memcmp(bytes.data, value, sizeof value) == 0;

  // The same through the writer factory and Checkpoint, as a torch.save archive.
  const std::string archive = std::string(argv[1]) + ".pt";
  tensormap::WriterOptions options;
  options.format = tensormap::Format::TorchSave;
  const auto writer = tensormap::open_writer(archive, {{"v", tensormap::Dtype::F32, {3}}}, options);
  writer->write_tensor(value, sizeof value);
  writer->commit();
  const auto checkpoint = tensormap::Checkpoint::open(archive);
  float back[3] = {};
  checkpoint.read("v", back);
  same = same && checkpoint.format() == tensormap::CheckpointFormat::TorchSave &&
         std::memcmp(back, value, sizeof value) == 0;
  std::printf("consumer: %s\n", same ? "ok" : "MISMATCH");
  return same ? 0 : 1;
}
