// Writes a file with the installed library and reads it back; exits 0 only if the value
// survives.
#include <tensormap/core.h>

#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const float value[3] = {1.5f, -2.0f, 4.25f};
  tensormap::Writer w(argv[1], {{"v", tensormap::Dtype::F32, {3}}});
  w.write_tensor(value, sizeof value);
  w.commit();
  const auto f = tensormap::File::open(argv[1]);
  f.verify();
  const auto bytes = f.bytes(f.at("v"));
  const bool same = bytes.size == sizeof value && std::memcmp(bytes.data, value, sizeof value) == 0;
  std::printf("consumer: %s\n", same ? "ok" : "MISMATCH");
  return same ? 0 : 1;
}
