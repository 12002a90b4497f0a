// Saves a LibTorch module with the installed tensormap::torch and maps it back into a
// skeleton; exits 0 only if the outputs agree.
#include <tensormap/tensormap.h>
#include <torch/torch.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  torch::nn::Linear original(4, 3);
  tensormap::save(*original, argv[1]);
  auto loaded = tensormap::build_skeleton([] { return torch::nn::Linear(4, 3); });
  tensormap::load(*loaded, argv[1]);
  const auto x = torch::randn({2, 4});
  const bool same = torch::equal(original(x), loaded(x));
  std::printf("consumer_torch: %s\n", same ? "ok" : "MISMATCH");
  return same ? 0 : 1;
}
