// The LibTorch layer: views, the lazy state dict, skeletons, release, load and save.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <fstream>
#include <iterator>

#include "../../src/torch/released.h"
#include "../core/support.h"
#include "tensormap/tensormap.h"

namespace tensormap::testing {
namespace {

bool inside(const File& f, const void* p) {
  const auto* base = static_cast<const unsigned char*>(f.cow_data(f.tensors().front())) - f.tensors().front().offset;
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= base && q < base + f.file_size();
}

struct NetModuleImpl : torch::nn::Module {
  NetModuleImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    norm = register_module("norm", torch::nn::BatchNorm1d(16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 4));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2(torch::relu(norm(fc1(x)))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
};
TORCH_MODULE(NetModule);

NetModule trained_net() {
  torch::manual_seed(0);
  NetModule net;
  net->train();
  net->forward(torch::randn({32, 8}));  // moves the running statistics off their defaults
  net->eval();
  return net;
}

// --- tensors ----------------------------------------------------------------------------

TEST(TensorView, EveryLibTorchDtypeRoundTripsWithItsShape) {
  TempDir dir;
  const std::string path = dir.file("dtypes.tmap");
  torch::manual_seed(1);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  const auto base = torch::randn({3, 4}, torch::kDouble) * 100;
  for (auto type : {at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong, at::kHalf, at::kBFloat16,
                    at::kFloat, at::kDouble, at::kComplexFloat, at::kComplexDouble}) {
    tensors.emplace_back(c10::toString(type), base.to(type));
  }
  tensors.emplace_back("scalar", torch::tensor(2.5));
  tensors.emplace_back("empty", torch::zeros({0, 5}));
  save(tensors, path);
  const File f = File::open(path);
  for (const auto& [name, t] : tensors) {
    const at::Tensor view = tensor_view(f, f.at(name));
    EXPECT_EQ(view.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(view.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(view, t)) << name;
    EXPECT_TRUE(torch::equal(tensor_copy(f, f.at(name)), t)) << name;
    if (t.numel() > 0) {
      EXPECT_TRUE(inside(f, view.data_ptr())) << name;
    }
  }
}

TEST(TensorView, CopyOwnsItsMemory) {
  TempDir dir;
  const std::string path = dir.file("copy.tmap");
  save({{"a", torch::arange(10, torch::kFloat)}}, path);
  const File f = File::open(path);
  const at::Tensor copy = tensor_copy(f, f.at("a"));
  EXPECT_FALSE(inside(f, copy.data_ptr()));
  EXPECT_TRUE(torch::equal(copy, torch::arange(10, torch::kFloat)));
}

TEST(TensorView, OutlivesTheFileObject) {
  TempDir dir;
  const std::string path = dir.file("alive.tmap");
  save({{"a", torch::arange(1000, torch::kLong)}}, path);
  at::Tensor view;
  {
    const File f = File::open(path);
    view = tensor_view(f, f.at("a"));
  }
  EXPECT_EQ(view[999].item<int64_t>(), 999);
}

// LibTorch 1.13 has no U16 or F8: views are refused, raw bytes work. LibTorch 2.x has both.
TEST(TensorView, DtypesOnlyLibTorch2HasAreViewsThereAndRawBytesEverywhere) {
  TempDir dir;
  const std::string path = dir.file("u16.tmap");
  const uint16_t values[3] = {1, 2, 65535};
  {
    Writer w(path, {{"u", Dtype::U16, {3}}, {"f8", Dtype::F8_E4M3, {2}}});
    w.write_tensor(values, sizeof values);
    const uint8_t f8[2] = {0x38, 0x40};  // 1.0 and 2.0 in float8_e4m3fn
    w.write_tensor(f8, 2);
    w.commit();
  }
  const File f = File::open(path);
#if TORCH_VERSION_MAJOR >= 2
  const at::Tensor u = tensor_view(f, f.at("u"));
  EXPECT_EQ(u.scalar_type(), at::kUInt16);
  EXPECT_EQ(u.sizes(), (std::vector<int64_t>{3}));
  EXPECT_EQ(static_cast<const uint16_t*>(u.data_ptr())[2], 65535);
  const at::Tensor f8 = tensor_view(f, f.at("f8"));
  EXPECT_EQ(f8.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_TRUE(torch::equal(f8.to(at::kFloat), torch::tensor({1.0f, 2.0f})));
#else
  try {
    tensor_view(f, f.at("u"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::UnsupportedDtype);
    EXPECT_NE(std::string(e.what()).find("U16"), std::string::npos);
  }
  EXPECT_THROW(tensor_view(f, f.at("f8")), Error);
#endif
  const at::Tensor raw = raw_bytes_view(f, f.at("u"));
  EXPECT_EQ(raw.scalar_type(), at::kByte);
  EXPECT_EQ(raw.numel(), 6);
  EXPECT_EQ(raw[4].item<uint8_t>(), 0xFF);
  EXPECT_EQ(raw_bytes_view(f, f.at("f8"))[1].item<uint8_t>(), 0x40);
}

TEST(TensorView, DtypeTableAgreesBothWays) {
  for (Dtype d : kAllDtypes) {
    if (auto type = to_scalar_type(d)) {
      EXPECT_EQ(from_scalar_type(*type), d);
    }
  }
  EXPECT_THROW(from_scalar_type(at::kQInt8), Error);
}

// --- lazy state dict --------------------------------------------------------------------

TEST(LazyStateDict, BehavesLikeAMap) {
  TempDir dir;
  const std::string path = dir.file("sd.tmap");
  save({{"w", torch::ones({2, 2})}, {"b", torch::zeros({2})}}, path);
  const StateDict sd = StateDict::open(path);
  EXPECT_EQ(sd.size(), 2u);
  EXPECT_TRUE(sd.contains("w"));
  EXPECT_FALSE(sd.contains("x"));
  EXPECT_EQ(sd.keys(), (std::vector<std::string>{"w", "b"}));
  EXPECT_TRUE(torch::equal(sd["w"], torch::ones({2, 2})));
  EXPECT_THROW(sd.at("x"), Error);
  std::vector<std::string> seen;
  for (const auto& [name, tensor] : sd) {
    seen.emplace_back(name);
    EXPECT_TRUE(tensor.defined());
  }
  EXPECT_EQ(seen, sd.keys());
  const auto dict = sd.to_ordered_dict();
  EXPECT_EQ(dict.size(), 2u);
  EXPECT_TRUE(torch::equal(dict["b"], torch::zeros({2})));
}

TEST(LazyStateDict, ReadsNoTensorBytesUntilAsked) {
  TempDir dir;
  const std::string path = dir.file("lazy.tmap");
  {
    std::vector<std::pair<std::string, at::Tensor>> big;
    for (int i = 0; i < 8; ++i) big.emplace_back("t" + std::to_string(i), torch::full({1 << 20}, i * 1.0f));
    save(big, path);  // 32 MiB
  }
  // Rss of the file's own mappings: the process's RssFile also grows by whatever code
  // pages of LibTorch the first sum() faults in (several MiB with LibTorch 2.6).
  const auto file_rss = [&] { return file_mapping_pss_rss(::getpid(), path).second; };
  const StateDict sd = StateDict::open(path);
  auto all = sd.to_ordered_dict();  // views only
  const uint64_t opened = file_rss();
  // The header's page: one 2 MiB page-table entry where the file is cached in 2 MiB folios
  // (spec/FORMAT.md, "Huge pages"), which holds the start of t0 too.
  EXPECT_LT(opened, 3u << 20) << "opening and viewing must not read the 32 MiB of data";
  EXPECT_EQ(sd["t3"].sum().item<float>(), 3.0f * (1 << 20));
  const uint64_t touched = file_rss();
  EXPECT_GT(touched, opened + (3u << 20)) << "the touched tensor is read";
  EXPECT_LT(touched, opened + (8u << 20)) << "only the touched tensor is read";
}

// --- skeleton and release ---------------------------------------------------------------

TEST(Release, KeepsShapeDtypeRequiresGradAndTheSameTensorImpl) {
  NetModule net = trained_net();
  auto* impl = net->fc1->weight.unsafeGetTensorImpl();
  release(*net);
  EXPECT_EQ(net->fc1->weight.unsafeGetTensorImpl(), impl);
  EXPECT_EQ(net->named_parameters()["fc1.weight"].unsafeGetTensorImpl(), impl);
  EXPECT_EQ(net->fc1->weight.sizes(), (std::vector<int64_t>{16, 8}));
  EXPECT_EQ(net->fc1->weight.scalar_type(), at::kFloat);
  EXPECT_TRUE(net->fc1->weight.requires_grad());
  EXPECT_TRUE(net->fc1->weight.is_leaf());
  EXPECT_TRUE(is_released(net->fc1->weight));
  EXPECT_TRUE(is_released(net->norm->running_mean));
}

TEST(Release, UsingAReleasedModelThrowsInsteadOfComputingOnGarbage) {
  NetModule net = trained_net();
  release(*net);
  try {
    net->forward(torch::ones({2, 8}));
    FAIL() << "forward ran on released weights";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("released tensor"), std::string::npos) << e.what();
  }
  const at::Tensor& w = net->fc1->weight;
  EXPECT_THROW(w.sum(), c10::Error);
  EXPECT_THROW(w.clone(), c10::Error);
  EXPECT_THROW(w.to(at::kDouble).sum(), c10::Error) << "to() gives a released tensor, not data";
  EXPECT_THROW(w.data_ptr<float>(), c10::Error);
  EXPECT_THROW(torch::zeros({16, 8}).copy_(w), c10::Error);
  EXPECT_THROW(torch::cat({w, w}), c10::Error);
  EXPECT_THROW(w.t().contiguous(), c10::Error);
  EXPECT_THROW(w[0][0].item<float>(), c10::Error);
  std::ostringstream out;
  EXPECT_THROW(out << w, c10::Error);
}

TEST(Release, SavingAReleasedModelIsRefused) {
  TempDir dir;
  NetModule net = trained_net();
  release(*net);
  EXPECT_THROW(save(*net, dir.file("x.tmap")), Error);
  EXPECT_EQ(dir.entries().size(), 0u);
}

TEST(Release, ExplicitlyCheckedOperatorsAreNotCompositeImplicit) {
  // A PrivateUse1 kernel on a CompositeImplicitAutograd operator would take away its
  // autograd formula inside a skeleton scope; the list must hold explicit ones only.
  for (const char* op : detail::explicitly_checked_ops()) {
    std::string name = op, overload;
    if (auto dot = name.find('.'); dot != std::string::npos) {
      overload = name.substr(dot + 1);
      name = name.substr(0, dot);
    }
    const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(("aten::" + name).c_str(), overload.c_str());
    EXPECT_FALSE(handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd)) << op;
  }
}

TEST(Skeleton, ConstructsWithoutRunningRandomInitialisers) {
  torch::manual_seed(3);
  const auto expected_next = torch::rand({1});
  torch::manual_seed(3);
  {
    SkeletonScope scope;
    torch::nn::Linear lin(64, 64);  // kaiming_uniform_ would draw from the generator
  }
  EXPECT_TRUE(torch::equal(torch::rand({1}), expected_next)) << "no random number was drawn";
}

TEST(Skeleton, InitialisersRunAgainOnceTheScopeEnds) {
  { SkeletonScope scope; }
  torch::manual_seed(5);
  const auto a = torch::rand({1000});
  torch::manual_seed(5);
  torch::nn::Linear lin(64, 64);
  EXPECT_GT(lin->weight.abs().sum().item<float>(), 1.0f) << "kaiming_uniform_ ran";
  EXPECT_FALSE(torch::equal(torch::rand({1000}), a)) << "the generator advanced";
  EXPECT_FALSE(c10::impl::tls_local_dispatch_key_set().included_.has_backend(c10::BackendComponent::PrivateUse1Bit))
      << "no PrivateUse1 bit is left behind in the thread-local key set";
}

TEST(Skeleton, NestedScopesRestoreTheOuterState) {
  auto generator = at::detail::getDefaultCPUGenerator();
  SkeletonScope outer;
  { SkeletonScope inner; }
  const at::Tensor state = generator.get_state();
  torch::nn::Linear lin(8, 8);  // the outer scope still skips initialisers
  EXPECT_TRUE(torch::equal(generator.get_state(), state)) << "no random number was drawn";
}

TEST(Skeleton, OpsStillWorkInsideTheScope) {
  SkeletonScope scope;
  const auto x = torch::arange(6, torch::kFloat).reshape({2, 3});
  EXPECT_EQ(x.sum().item<float>(), 15.0f);
  EXPECT_TRUE(torch::equal(torch::ones({2}).fill_(3), torch::full({2}, 3.0f)));
}

// A constructor with the initialisations real architectures run (timm's and Hugging Face's
// trunc_normal_, a zeroed padding row, fill_, a scale, a copy from a computed table), a
// buffer computed from scratch and one computed from a weight.
struct InitPatternsImpl : torch::nn::Module {
  explicit InitPatternsImpl(int64_t rows = 8, int64_t cols = 16) {
    torch::NoGradGuard no_grad;
    truncated = register_parameter("truncated", torch::empty({rows, cols}));
    torch::nn::init::uniform_(truncated, -0.9, 0.9);  // trunc_normal_, as torch writes it
    truncated.erfinv_();
    truncated.mul_(0.02 * std::sqrt(2.0));
    truncated.add_(0.0);
    truncated.clamp_(-2.0, 2.0);
    embedding = register_parameter("embedding", torch::empty({rows, cols}));
    torch::nn::init::normal_(embedding);
    embedding[0].zero_();  // the padding row, through a view
    scale = register_parameter("scale", torch::empty({cols}));
    torch::nn::init::constant_(scale, 1.0);
    scale.mul_(0.5);
    table = register_parameter("table", torch::empty({rows, cols}));
    table.copy_(torch::arange(cols, torch::kFloat).sin().expand({rows, cols}));  // a small table, broadcast
    table.index_put_({torch::tensor({1})}, torch::ones({cols}));
    positions = register_buffer("positions", torch::arange(rows).unsqueeze(1) * 2 + 1);
    derived = register_buffer("derived", truncated.t().contiguous() * 2);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::matmul(x, (truncated + embedding + table) * scale) + derived.t().sum();
  }
  torch::Tensor truncated, embedding, scale, table, positions, derived;
};
TORCH_MODULE(InitPatterns);

TEST(Skeleton, EveryWriteIntoAParameterLeavesItReleased) {
  SkeletonScope scope;
  InitPatterns net;
  for (const auto& p : net->named_parameters()) EXPECT_TRUE(is_released(p.value())) << p.key();
  EXPECT_EQ(net->truncated.sizes(), (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(net->scale.scalar_type(), at::kFloat);
  EXPECT_TRUE(net->truncated.requires_grad() && net->truncated.is_leaf());
}

TEST(Skeleton, ABufferComputedFromScratchKeepsItsValues) {
  SkeletonScope scope;
  InitPatterns net;
  EXPECT_FALSE(is_released(net->positions));
  EXPECT_TRUE(torch::equal(net->positions, torch::arange(8).unsqueeze(1) * 2 + 1));
}

TEST(Skeleton, ValuesComputedFromAReleasedTensorAreReleasedOfTheRightShape) {
  SkeletonScope scope;
  InitPatterns net;
  EXPECT_TRUE(is_released(net->derived));
  EXPECT_EQ(net->derived.sizes(), (std::vector<int64_t>{16, 8}));
  const at::Tensor sum = net->truncated.sum(0);
  EXPECT_TRUE(is_released(sum));
  EXPECT_EQ(sum.sizes(), (std::vector<int64_t>{16}));
}

TEST(Skeleton, ReadingASkeletonsValueNamesTheOperator) {
  SkeletonScope scope;
  InitPatterns net;
  try {
    (void)net->scale.sum().item<float>();
    FAIL() << "item() on a skeleton's tensor returned a value";
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("skeleton"), std::string::npos) << what;
    EXPECT_NE(what.find("aten::_local_scalar_dense"), std::string::npos) << what;
  }
}

TEST(Skeleton, WritingASkeletonsValuesIntoPartOfARealTensorIsRefused) {
  SkeletonScope scope;
  InitPatterns net;
  const at::Tensor real = torch::zeros({4, 16});
  try {
    real.narrow(0, 0, 1).copy_(net->scale.unsqueeze(0));
    FAIL() << "a real tensor took values the skeleton does not have";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("aten::copy_"), std::string::npos);
  }
  EXPECT_TRUE(torch::equal(real, torch::zeros({4, 16})));
}

TEST(Skeleton, OutsideTheScopeAReleasedTensorIsStillRefused) {
  InitPatterns net = [] {
    SkeletonScope scope;
    return InitPatterns();
  }();
  EXPECT_THROW(net->scale.add_(1), c10::Error);
  EXPECT_THROW((void)net->truncated.sum(), c10::Error);
}

TEST(Skeleton, AnInitialisationThatDoesArithmeticOnWeightsCostsNoMemory) {
  // 2 x 64 MiB of weights written by uniform_, erfinv_, mul_, add_, clamp_, normal_,
  // zero_, fill_, copy_ and index_put_: a constructor run outside a scope makes them all
  // resident.
  if (kSanitized) GTEST_SKIP() << "memory figures are not meaningful under AddressSanitizer";
  const bool peak_reset = reset_peak_memory();
  const ProcessMemory before = read_process_memory();
  auto net = build_skeleton([] { return InitPatterns(4096, 4096); });
  const ProcessMemory after = read_process_memory();
  EXPECT_LT(after.rss_anon - std::min(after.rss_anon, before.rss_anon), 8u << 20);
  if (peak_reset) {
    EXPECT_LT(after.vm_hwm - std::min(after.vm_hwm, before.vm_hwm), 16u << 20) << "nothing was resident on the way";
  }
}

TEST(Skeleton, AnInitialisationWithArithmeticLoadsToTheOriginalsOutputs) {
  TempDir dir;
  const std::string path = dir.file("patterns.tmap");
  torch::manual_seed(2);
  InitPatterns original;
  save(*original, path);
  const auto x = torch::randn({3, 8});
  auto skeleton = build_skeleton([] { return InitPatterns(); });
  load(*skeleton, path);
  EXPECT_TRUE(torch::equal(skeleton->forward(x), original->forward(x)));
}

TEST(Skeleton, SetBindsAReleasedTensorAndCopyGivesItMemory) {
  auto net = build_skeleton([] { return NetModule(); });
  torch::manual_seed(4);
  const at::Tensor weight = torch::randn({16, 8}), bias = torch::randn({16});
  {
    torch::NoGradGuard no_grad;
    net->fc1->weight.set_(weight);
    net->fc1->bias.copy_(bias);
  }
  EXPECT_FALSE(is_released(net->fc1->weight) || is_released(net->fc1->bias));
  EXPECT_EQ(net->fc1->weight.data_ptr(), weight.data_ptr()) << "set_ binds, zero-copy";
  EXPECT_NE(net->fc1->bias.data_ptr(), bias.data_ptr()) << "copy_ gives it its own memory";
  EXPECT_TRUE(torch::equal(net->fc1->bias, bias));
  EXPECT_TRUE(net->fc1->weight.requires_grad() && net->fc1->weight.is_leaf());
  EXPECT_TRUE(is_released(net->fc2->weight)) << "the others stay released";
  torch::NoGradGuard no_grad;
  EXPECT_THROW(torch::zeros({4, 16}).copy_(net->fc2->weight), c10::Error) << "a released source has no data";
}

TEST(Skeleton, BuiltThenLoadedGivesTheSameOutputsAsBuiltNormally) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  NetModule net = trained_net();
  const auto x = torch::randn({5, 8});
  const auto expected = net->forward(x);
  save(*net, path);
  auto skeleton = build_skeleton([] { return NetModule(); });
  EXPECT_TRUE(is_released(skeleton->fc2->bias));
  load(*skeleton, path);
  skeleton->eval();
  EXPECT_TRUE(torch::equal(skeleton->forward(x), expected));
}

struct MaskedNetImpl : torch::nn::Module {
  MaskedNetImpl() {
    fc = register_module("fc", torch::nn::Linear(8, 8));
    norm = register_module("norm", torch::nn::BatchNorm1d(8));  // num_batches_tracked: Long
    mask = register_buffer("mask", torch::ones({8}, torch::kBool));
  }
  torch::Tensor forward(torch::Tensor x) { return norm(fc(x)).masked_fill(mask.logical_not(), 0); }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  torch::Tensor mask;
};
TORCH_MODULE(MaskedNet);

TEST(Skeleton, ToADtypeKeepsItASkeletonAndChangesOnlyFloatingPointTensors) {
  auto net = build_skeleton([] { return MaskedNet(); });
  auto* weight = net->fc->weight.unsafeGetTensorImpl();
  net->to(torch::kBFloat16);
  EXPECT_EQ(net->fc->weight.unsafeGetTensorImpl(), weight) << "the same parameter object";
  for (const auto& item : net->named_parameters()) {
    const at::Tensor& t = item.value();
    EXPECT_TRUE(is_released(t)) << item.key();
    EXPECT_EQ(t.scalar_type(), at::kBFloat16) << item.key();
    EXPECT_TRUE(t.requires_grad()) << item.key();
    EXPECT_TRUE(t.is_leaf()) << item.key();
  }
  for (const auto& item : net->named_buffers()) EXPECT_TRUE(is_released(item.value())) << item.key();
  EXPECT_EQ(net->norm->running_mean.scalar_type(), at::kBFloat16);
  EXPECT_EQ(net->norm->num_batches_tracked.scalar_type(), at::kLong) << "as nn.Module.to does";
  EXPECT_EQ(net->mask.scalar_type(), at::kBool) << "as nn.Module.to does";
  EXPECT_EQ(net->fc->weight.sizes(), (std::vector<int64_t>{8, 8}));
  net->to(torch::kCPU);
  net->to(torch::kCPU, torch::kHalf);
  EXPECT_EQ(net->fc->bias.scalar_type(), at::kHalf);
  EXPECT_TRUE(is_released(net->fc->bias));
  try {
    net->to(c10::Device(c10::kMeta));  // (CUDA: not in Debian's CPU-only LibTorch)
    FAIL() << "moved a released model off the CPU";
  } catch (const c10::Error& e) {
    // LibTorch 1.13 reaches tensormap's _to_copy, which refuses; 2.6 makes a meta tensor
    // that Module::to's set_data then refuses. Either way nothing moved.
    const std::string what = e.what();
    EXPECT_TRUE(what.find("only be moved to the CPU") != std::string::npos ||
                what.find("incompatible tensor type") != std::string::npos)
        << what;
  }
  for (const auto& item : net->named_parameters()) {
    EXPECT_TRUE(item.value().device().is_cpu()) << item.key();
    EXPECT_TRUE(is_released(item.value())) << item.key();
  }
  EXPECT_THROW(net->forward(torch::ones({2, 8}, torch::kHalf)), c10::Error) << "still released";
}

TEST(Skeleton, ConvertedToTheCheckpointsDtypeItMapsAndComputesAsTheOriginal) {
  TempDir dir;
  const std::string path = dir.file("half.tmap");
  MaskedNet original;
  original->to(torch::kDouble);                              // LibTorch's own Module::to converts the buffers too,
  original->mask.set_data(original->mask.to(torch::kBool));  // so give them their dtypes back
  original->norm->num_batches_tracked.set_data(original->norm->num_batches_tracked.to(torch::kLong));
  original->eval();
  torch::manual_seed(4);
  const auto x = torch::randn({3, 8}, torch::kDouble);
  const auto expected = original->forward(x);
  save(*original, path);
  auto net = build_skeleton([] { return MaskedNet(); });
  net->to(torch::kDouble);
  const File f = File::open(path);
  const LoadReport report = load(*net, f);
  EXPECT_TRUE(report.complete()) << report.summary();
  EXPECT_EQ(report.loaded.size(), 8u);
  net->eval();
  EXPECT_TRUE(torch::equal(net->forward(x), expected));
  EXPECT_TRUE(inside(f, net->fc->weight.data_ptr())) << "mapped, not copied";
}

// --- load -------------------------------------------------------------------------------

// LoadMode::Auto maps a file on a local filesystem, as Map does (the classification of
// remote ones is tested in the core: FaultProneFilesystems).
TEST(LoadAuto, MapsAFileOnALocalFilesystem) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  save(*trained_net(), path);
  ASSERT_EQ(fault_prone_filesystem(path), "");
  NetModule net;
  release(*net);
  const File f = File::open(path);
  LoadOptions options;
  options.mode = LoadMode::Auto;
  EXPECT_TRUE(load(*net, f, options).complete());
  for (const auto& [name, t] : named_state(*net)) EXPECT_TRUE(inside(f, t.data_ptr())) << name;
}

TEST(LoadMap, EveryParameterAndBufferPointsIntoTheMapping) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  save(*trained_net(), path);
  NetModule net;
  release(*net);
  const File f = File::open(path);
  const LoadReport report = load(*net, f);
  EXPECT_TRUE(report.complete()) << report.summary();
  EXPECT_EQ(report.loaded.size(), 9u);  // 6 parameters, 3 BatchNorm buffers
  for (const auto& [name, t] : named_state(*net)) {
    EXPECT_FALSE(is_released(t)) << name;
    EXPECT_TRUE(inside(f, t.data_ptr())) << name;
  }
}

TEST(LoadMap, AnOptimizerStepChangesTheModelAndNeverTheFile) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  save(*trained_net(), path);
  const auto file_before = read_bytes(path);
  auto net = build_skeleton([] { return NetModule(); });
  load(*net, path);
  const auto w_before = net->fc1->weight.clone();
  torch::optim::SGD sgd(net->parameters(), 0.1);
  net->train();
  net->forward(torch::randn({4, 8})).sum().backward();
  sgd.step();
  EXPECT_FALSE(torch::equal(net->fc1->weight, w_before)) << "the step changed the weights";
  EXPECT_EQ(read_bytes(path), file_before) << "the file did not change";
  File::open(path).verify();
}

// The documented rule of state_dict.h: one StateDict, one private mapping, shared by the
// models loaded from it; by path (or from another StateDict), private pages.
TEST(LoadMap, ModelsLoadedFromOneStateDictShareTheirPagesAndLoadsByPathDoNot) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  save(*trained_net(), path);
  const auto file_before = read_bytes(path);
  const StateDict sd = StateDict::open(path);
  auto a = build_skeleton([] { return NetModule(); });
  auto b = build_skeleton([] { return NetModule(); });
  auto c = build_skeleton([] { return NetModule(); });
  load(*a, sd);
  load(*b, sd);
  load(*c, path);
  const auto original = c->fc1->weight.clone();
  {
    torch::NoGradGuard no_grad;
    a->fc1->weight.add_(1);
  }
  EXPECT_TRUE(torch::equal(b->fc1->weight, original + 1)) << "b shares a's pages";
  EXPECT_TRUE(torch::equal(sd["fc1.weight"], original + 1)) << "so do later views";
  EXPECT_TRUE(torch::equal(c->fc1->weight, original)) << "a load by path is private";
  EXPECT_TRUE(torch::equal(StateDict::open(path)["fc1.weight"], original)) << "another StateDict";
  EXPECT_EQ(read_bytes(path), file_before) << "the file never changes";
}

TEST(LoadCopy, ConvertsBf16InTheFileIntoAnF32Model) {
  TempDir dir;
  const std::string path = dir.file("bf16.tmap");
  const auto weights = torch::randn({4, 3});
  save({{"weight", weights.to(at::kBFloat16)}, {"bias", torch::ones({4}, at::kBFloat16)}}, path);
  torch::nn::Linear lin(3, 4);
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  load(*lin, path, copy);
  EXPECT_EQ(lin->weight.scalar_type(), at::kFloat);
  EXPECT_TRUE(torch::equal(lin->weight, weights.to(at::kBFloat16).to(at::kFloat)));
  EXPECT_TRUE(torch::equal(lin->bias, torch::ones({4})));
}

// verify_checksums, on by default: a flipped byte in a tensor's data (the header still
// sound, so the file opens) stops a copy-mode load with ChecksumMismatch naming the
// tensor, whether the bytes go straight into the model or through a dtype conversion;
// unchecked, the load takes the corrupt bytes.
TEST(LoadCopy, VerifyingChecksumsNamesTheCorruptTensor) {
  TempDir dir;
  const std::string path = dir.file("lin.tmap");
  save({{"weight", torch::randn({4, 3})}, {"bias", torch::ones({4})}}, path);
  const File file = File::open(path);
  const uint64_t at = file.tensors()[file.tensors()[0].name == "bias" ? 0 : 1].offset;  // bias's first byte
  std::vector<unsigned char> bytes = read_bytes(path);
  bytes[at] ^= 0x01;
  write_bytes(path, bytes);
  for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    torch::nn::Linear lin(3, 4);
    lin->to(dtype);
    LoadOptions checked;
    checked.mode = LoadMode::Copy;  // verify_checksums is on by default
    try {
      load(*lin, path, checked);
      ADD_FAILURE() << "a corrupt tensor loaded";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::ChecksumMismatch) << e.what();
      EXPECT_NE(std::string(e.what()).find("'bias'"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
    LoadOptions unchecked = checked;
    unchecked.verify_checksums = false;
    load(*lin, path, unchecked);
    EXPECT_FALSE(torch::equal(lin->bias, torch::ones({4}, dtype))) << "the flipped bit is loaded";
  }
}

TEST(LoadCopy, IntoAnAllocatedModelWritesTheExistingStorage) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  auto source = trained_net();
  save(*source, path);
  NetModule net;
  void* storage = net->fc1->weight.data_ptr();
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  load(*net, path, copy);
  EXPECT_EQ(net->fc1->weight.data_ptr(), storage);
  EXPECT_TRUE(torch::equal(net->fc1->weight, source->fc1->weight));
  EXPECT_TRUE(torch::equal(net->norm->running_var, source->norm->running_var));
}

TEST(LoadCopy, IntoAReleasedModelAllocatesOwnedMemory) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  save(*trained_net(), path);
  auto net = build_skeleton([] { return NetModule(); });
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  const File f = File::open(path);
  load(*net, f, copy);
  EXPECT_FALSE(inside(f, net->fc1->weight.data_ptr()));
  EXPECT_TRUE(torch::equal(net->fc2->bias, tensor_view(f, f.at("fc2.bias"))));
}

TEST(LoadStrict, OneErrorListsEveryProblemAndNothingIsLoaded) {
  TempDir dir;
  const std::string path = dir.file("bad.tmap");
  save({{"weight", torch::ones({4, 5})}, {"extra", torch::ones({1})}}, path);
  torch::nn::Linear lin(3, 4);
  const auto before = lin->weight.clone();
  try {
    load(*lin, path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::ModelMismatch);
    const std::string m = e.what();
    EXPECT_NE(m.find("1 missing from the file ('bias')"), std::string::npos) << m;
    EXPECT_NE(m.find("1 unexpected in the file ('extra')"), std::string::npos) << m;
    EXPECT_NE(m.find("weight: shape [4, 3] in the model, [4, 5] in the file"), std::string::npos) << m;
  }
  EXPECT_TRUE(torch::equal(lin->weight, before));
}

TEST(LoadStrict, MapModeRefusesADtypeItWouldHaveToConvert) {
  TempDir dir;
  const std::string path = dir.file("half.tmap");
  save({{"weight", torch::ones({4, 3}, at::kHalf)}, {"bias", torch::ones({4}, at::kHalf)}}, path);
  torch::nn::Linear lin(3, 4);
  try {
    load(*lin, path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use LoadMode::Copy"), std::string::npos) << e.what();
  }
}

TEST(LoadNonStrict, LoadsWhatMatchesAndReportsTheRest) {
  TempDir dir;
  const std::string path = dir.file("partial.tmap");
  save({{"weight", torch::full({4, 3}, 2.0f)}, {"extra", torch::ones({1})}}, path);
  torch::nn::Linear lin(3, 4);
  LoadOptions lenient;
  lenient.strict = false;
  const LoadReport r = load(*lin, path, lenient);
  EXPECT_EQ(r.loaded, std::vector<std::string>{"weight"});
  EXPECT_EQ(r.missing, std::vector<std::string>{"bias"});
  EXPECT_EQ(r.unexpected, std::vector<std::string>{"extra"});
  EXPECT_FALSE(r.complete());
  EXPECT_TRUE(torch::equal(lin->weight, torch::full({4, 3}, 2.0f)));
}

TEST(LoadNonStrict, AMissingTensorSaysSoAndMaterializeInitialisesItAsTorchNnWould) {
  TempDir dir;
  const std::string path = dir.file("partial.tmap");
  NetModule trained = trained_net();
  std::vector<std::pair<std::string, at::Tensor>> kept;
  for (const auto& item : trained->named_parameters()) {
    if (item.key() != "fc2.bias" && item.key().rfind("norm.", 0) != 0) kept.emplace_back(item.key(), item.value());
  }
  save(kept, path);  // no fc2.bias, nothing of norm
  auto net = build_skeleton([] { return NetModule(); });
  const File f = File::open(path);
  LoadOptions lenient;
  lenient.strict = false;
  const LoadReport r = load(*net, f, lenient);
  EXPECT_EQ(r.missing.size(), 6u) << r.summary();  // fc2.bias and norm's 5 tensors
  try {
    net->forward(torch::ones({2, 8}));
    FAIL() << "forward ran on a missing tensor";
  } catch (const c10::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("'norm."), std::string::npos) << what;
    EXPECT_NE(what.find("has no tensor of that name"), std::string::npos) << what;
    EXPECT_NE(what.find(path), std::string::npos) << what;
  }
  SkeletonScope scope;  // materialize initialises even here
  torch::manual_seed(9);
  std::vector<std::string> done = materialize(*net);
  std::sort(done.begin(), done.end());
  EXPECT_EQ(done, (std::vector<std::string>{"fc2.bias", "norm.bias", "norm.num_batches_tracked", "norm.running_mean",
                                            "norm.running_var", "norm.weight"}));
  for (const auto& item : net->named_parameters()) EXPECT_FALSE(is_released(item.value())) << item.key();
  // Linear's rule: bias uniform in +-1/sqrt(fan_in); BatchNorm's: ones, zeros, fresh stats.
  const at::Tensor& bias = net->fc2->bias;
  EXPECT_GT(bias.abs().max().item<float>(), 0.0f);
  EXPECT_LE(bias.abs().max().item<float>(), 0.25f);
  EXPECT_TRUE(torch::equal(net->norm->weight, torch::ones({16})));
  EXPECT_TRUE(torch::equal(net->norm->bias, torch::zeros({16})));
  EXPECT_TRUE(torch::equal(net->norm->running_var, torch::ones({16})));
  EXPECT_TRUE(net->fc2->bias.requires_grad());
  // The loaded weight of the same Linear sat out of its reset: still the file's bytes.
  EXPECT_TRUE(torch::equal(net->fc2->weight, trained->fc2->weight));
  EXPECT_TRUE(inside(f, net->fc2->weight.data_ptr())) << "still mapped";
  net->eval();
  EXPECT_EQ(net->forward(torch::ones({2, 8})).sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_TRUE(materialize(*net).empty()) << "nothing is left released";
}

struct CustomImpl : torch::nn::Module {
  CustomImpl() { scale = register_parameter("scale", torch::full({3}, 7.0f)); }
  torch::Tensor scale;
};
TORCH_MODULE(Custom);

TEST(Materialize, AModuleTorchNnDoesNotDefineGetsZerosThenTheCallersInitialiser) {
  auto custom = build_skeleton([] { return Custom(); });
  try {
    (void)custom->scale.sum();
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not loaded yet"), std::string::npos) << e.what();
  }
  EXPECT_EQ(materialize(*custom), std::vector<std::string>{"scale"});
  EXPECT_TRUE(torch::equal(custom->scale, torch::zeros({3})));
  auto other = build_skeleton([] { return Custom(); });
  std::vector<std::string> seen;
  materialize(*other, [&](const std::string& name, at::Tensor& t) {
    seen.push_back(name);
    t.fill_(1.5f);
  });
  EXPECT_EQ(seen, std::vector<std::string>{"scale"});
  EXPECT_TRUE(torch::equal(other->scale, torch::full({3}, 1.5f)));
}

// MultiheadAttention's rule also zeroes its out_proj's bias: a loaded out_proj must come
// through untouched (and still mapped) while the missing in_proj gets the rule's values.
TEST(Materialize, ARuleThatReachesIntoAChildLeavesTheChildsLoadedTensorsAlone) {
  TempDir dir;
  const std::string path = dir.file("attention.tmap");
  torch::manual_seed(3);
  torch::nn::MultiheadAttention trained(torch::nn::MultiheadAttentionOptions(8, 2));
  {
    torch::NoGradGuard no_grad;
    trained->out_proj->bias.uniform_(1.0, 2.0);  // torch's own rule would make it 0
  }
  save({{"out_proj.weight", trained->out_proj->weight}, {"out_proj.bias", trained->out_proj->bias}}, path);
  auto attention =
      build_skeleton([] { return torch::nn::MultiheadAttention(torch::nn::MultiheadAttentionOptions(8, 2)); });
  const File f = File::open(path);
  LoadOptions lenient;
  lenient.strict = false;
  const LoadReport r = load(*attention, f, lenient);
  EXPECT_EQ(r.missing, (std::vector<std::string>{"in_proj_weight", "in_proj_bias"})) << r.summary();
  EXPECT_EQ(materialize(*attention), (std::vector<std::string>{"in_proj_weight", "in_proj_bias"}));
  EXPECT_TRUE(torch::equal(attention->out_proj->bias, trained->out_proj->bias)) << "the loaded bias was reset";
  EXPECT_TRUE(inside(f, attention->out_proj->bias.data_ptr())) << "still mapped";
  EXPECT_TRUE(torch::equal(attention->in_proj_bias, torch::zeros({24})));
  EXPECT_GT(attention->in_proj_weight.abs().max().item<float>(), 0.0f) << "xavier_uniform_ ran";
}

TEST(Materialize, TheCallersModuleRuleDecidesForEveryModule) {
  auto net = build_skeleton([] { return NetModule(); });
  std::vector<std::string> asked;
  const auto done = materialize(*net, {}, [&](const std::string& name, torch::nn::Module& m) {
    asked.push_back(name);
    if (name != "fc1") return;  // the others keep zeros
    for (auto& p : m.parameters(/*recurse=*/false)) p.fill_(0.5f);
  });
  EXPECT_EQ(asked, (std::vector<std::string>{"fc1", "norm", "fc2"}));
  EXPECT_EQ(done.size(), 9u);
  EXPECT_TRUE(torch::equal(net->fc1->weight, torch::full({16, 8}, 0.5f)));
  EXPECT_TRUE(torch::equal(net->fc2->weight, torch::zeros_like(net->fc2->weight)));
  EXPECT_TRUE(torch::equal(net->norm->running_var, torch::zeros({16}))) << "not BatchNorm's rule";
}

// --- edit -------------------------------------------------------------------------------

TEST(Edit, PutAndRemoveTensorsOfAFileAModelIsMappedFrom) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  NetModule trained = trained_net();
  save(*trained, path);
  auto mapped = build_skeleton([] { return NetModule(); });
  load(*mapped, path);
  const auto fc2_bias = mapped->fc2->bias.clone();
  {
    Editor e = Editor::open(path);
    put(e, "fc2.bias", torch::zeros({4}));                              // a temporary: the Editor keeps it alive
    put(e, "extra", torch::arange(10, torch::kLong).view({2, 5}).t());  // not contiguous
    e.remove("norm.num_batches_tracked");
    EXPECT_THROW(put(e, "x", at::Tensor()), Error) << "an undefined tensor is refused";
    const EditReport r = e.commit(false);
    EXPECT_EQ(r.written, 2u);
    EXPECT_EQ(r.removed, 1u);
  }
  const StateDict sd = StateDict::open(path);
  EXPECT_TRUE(torch::equal(sd["fc2.bias"], torch::zeros({4})));
  EXPECT_TRUE(torch::equal(sd["extra"], torch::arange(10, torch::kLong).view({2, 5}).t()));
  EXPECT_TRUE(torch::equal(sd["fc1.weight"], trained->fc1->weight));
  EXPECT_FALSE(sd.contains("norm.num_batches_tracked"));
  EXPECT_TRUE(torch::equal(mapped->fc2->bias, fc2_bias)) << "the mapped model keeps the old file's pages";
  File::open(path).verify();
}

// --- save -------------------------------------------------------------------------------

TEST(Save, NonContiguousTensorsAreStoredInLogicalOrder) {
  TempDir dir;
  const std::string path = dir.file("nc.tmap");
  const auto base = torch::arange(12, torch::kFloat).reshape({3, 4});
  const auto transposed = base.t();
  const auto strided = base.index({torch::indexing::Slice(), torch::indexing::Slice(0, 4, 2)});
  ASSERT_FALSE(transposed.is_contiguous());
  save({{"t", transposed}, {"s", strided}, {"offset", base[2]}}, path);
  const StateDict sd = StateDict::open(path);
  EXPECT_TRUE(torch::equal(sd["t"], transposed));
  EXPECT_TRUE(torch::equal(sd["s"], strided));
  EXPECT_TRUE(torch::equal(sd["offset"], base[2]));
}

TEST(Save, TiedWeightsComeBackTied) {
  // One tensor registered under two names, as a tied embedding and output head are.
  struct Tied : torch::nn::Module {
    Tied() {
      embedding = register_parameter("embedding", torch::randn({10, 4}));
      head = register_parameter("head", embedding);
    }
    at::Tensor embedding, head;
  };
  TempDir dir;
  const std::string path = dir.file("tied.tmap");
  auto source = std::make_shared<Tied>();
  save(*source, path);
  const File f = File::open(path);
  ASSERT_TRUE(f.find("embedding") && f.find("head")) << "each name is in the file";
  EXPECT_EQ(f.at("head").alias_of, std::optional<uint32_t>(0)) << "... and the bytes once";
  EXPECT_EQ(f.major_version(), 2);
  EXPECT_LT(f.file_size(), 4096u + 2 * 4096u);
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    auto net = build_skeleton([] { return std::make_shared<Tied>(); });
    LoadOptions options;
    options.mode = mode;
    load(*net, f, options);
    const auto params = net->named_parameters();
    EXPECT_EQ(params["embedding"].unsafeGetTensorImpl(), params["head"].unsafeGetTensorImpl());
    EXPECT_EQ(net->head.unsafeGetTensorImpl(), net->embedding.unsafeGetTensorImpl());
    EXPECT_TRUE(torch::equal(params["head"], source->embedding));
  }
}

// A model whose factory does not tie (two parameters) loads a file that says they are
// tied with one storage for both: the load ties them by the file's word, in both modes.
TEST(Save, ALoadTiesWhatTheFileStoresOnceEvenIfTheSkeletonDoesNot) {
  struct Pair : torch::nn::Module {
    Pair() {
      a = register_parameter("a", torch::randn({64, 8}));
      b = register_parameter("b", torch::randn({64, 8}));
      c = register_parameter("c", torch::randn({3}));
    }
    at::Tensor a, b, c;
  };
  TempDir dir;
  auto source = std::make_shared<Pair>();
  source->b.set_data(source->a);  // two parameters over one storage: tied, as a GPT-2's head and embedding
  const std::string path = dir.file("tied.tmap");
  save(*source, path);
  EXPECT_EQ(Checkpoint::open(path).alias_of("b"), std::optional<std::string>("a"));
  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    auto net = build_skeleton([] { return std::make_shared<Pair>(); });
    ASSERT_NE(net->a.unsafeGetTensorImpl(), net->b.unsafeGetTensorImpl());
    LoadOptions options;
    options.mode = mode;
    const LoadReport report = load(*net, path, options);
    EXPECT_TRUE(report.complete()) << report.summary();
    const auto params = net->named_parameters();
    EXPECT_EQ(params["a"].data_ptr(), params["b"].data_ptr());
    EXPECT_TRUE(params["a"].storage().is_alias_of(params["b"].storage()));
    EXPECT_TRUE(torch::equal(params["b"], source->a));
    {
      torch::NoGradGuard no_grad;
      params["a"].add_(1);  // a step on one is a step on both, as before saving
    }
    EXPECT_TRUE(torch::equal(params["b"], source->a + 1));
  }
  // Asked not to, save stores each name's bytes: a format 1.0 file for 1.x readers.
  SaveOptions separate;
  separate.store_ties_once = false;
  save(*source, dir.file("separate.tmap"), separate);
  const File f = File::open(dir.file("separate.tmap"));
  EXPECT_EQ(f.major_version(), 1);
  EXPECT_NE(f.at("a").offset, f.at("b").offset);
  // Python's torch.load sees the tie too: one storage for both names.
  save(*source, dir.file("tied.pt"), SaveOptions{4096, {}, false, Format::TorchSave});
  EXPECT_EQ(Checkpoint::open(dir.file("tied.pt")).alias_of("b"), std::optional<std::string>("a"));
}

TEST(Save, OverTheFileAModelWasMappedFromIsSafe) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  auto source = trained_net();
  save(*source, path);
  auto net = build_skeleton([] { return NetModule(); });
  load(*net, path);
  net->eval();
  const auto x = torch::randn({3, 8});
  const auto before = net->forward(x);
  {
    torch::NoGradGuard no_grad;
    net->fc2->bias.add_(1.0f);  // a private change, saved below
  }
  const auto changed = net->forward(x);
  save(*net, path);
  EXPECT_TRUE(torch::equal(net->forward(x), changed)) << "the loaded model is unchanged";
  File::open(path).verify();
  auto reloaded = build_skeleton([] { return NetModule(); });
  load(*reloaded, path);
  reloaded->eval();
  EXPECT_TRUE(torch::equal(reloaded->forward(x), changed));
  EXPECT_FALSE(torch::equal(changed, before));
}

TEST(Save, ModuleMetadataAndAlignmentArePassedThrough) {
  TempDir dir;
  const std::string path = dir.file("meta.tmap");
  SaveOptions options;
  options.alignment = 64;
  options.metadata = {{"arch", "net"}};
  save(*trained_net(), path, options);
  const File f = File::open(path);
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.metadata_value("arch"), std::string_view("net"));
}

// --- saves in the background -----------------------------------------------------------

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(SaveAsync, TheFileHoldsTheValuesOfTheMomentOfTheCall) {
  TempDir dir;
  auto net = trained_net();
  save(*net, dir.file("sync.tmap"));  // the reference: the same values, saved synchronously
  const auto before = net->fc1->weight.clone();
  SaveHandle handle = save_async(*net, dir.file("async.tmap"));
  {
    torch::NoGradGuard no_grad;  // training goes on at once
    for (auto& p : net->parameters()) p.add_(1.0f);
  }
  EXPECT_GT(handle.pid(), 0);
  handle.wait();
  EXPECT_TRUE(handle.done());
  EXPECT_EQ(handle.pid(), -1);
  EXPECT_TRUE(file_bytes(dir.file("async.tmap")) == file_bytes(dir.file("sync.tmap")));  // not a diff of MBs
  auto loaded = build_skeleton([] { return NetModule(); });
  load(*loaded, dir.file("async.tmap"));
  EXPECT_FALSE(torch::equal(loaded->fc1->weight, net->fc1->weight));
  EXPECT_TRUE(torch::equal(loaded->fc1->weight, before));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"async.tmap", "sync.tmap"}));
}

TEST(SaveAsync, TensorsThatOverlapInOneStorageAreEachSavedWhole) {
  // The child gives back each tensor's pages once written, but not those a tensor still to
  // be written reads.
  TempDir dir;
  const auto storage = torch::randn({4 << 20});
  const std::vector<std::pair<std::string, at::Tensor>> tensors = {{"first", storage.narrow(0, 0, 3 << 20)},
                                                                   {"second", storage.narrow(0, 1 << 20, 3 << 20)},
                                                                   {"whole", storage}};
  save(tensors, dir.file("sync.tmap"));
  SaveHandle handle = save_async(tensors, dir.file("async.tmap"));
  storage.zero_();
  handle.wait();
  EXPECT_TRUE(file_bytes(dir.file("async.tmap")) == file_bytes(dir.file("sync.tmap")));  // not a diff of MBs
}

TEST(SaveAsync, ItsErrorSurfacesAtWait) {
  TempDir dir;
  const std::string path = dir.file("no-such-folder/net.tmap");
  SaveHandle handle = save_async(*trained_net(), path);
  try {
    handle.wait();
    FAIL() << "a save into a missing folder succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  SaveHandle on_meta = save_async({{"w", torch::empty({4}, torch::kMeta)}}, dir.file("meta.tmap"));
  try {
    on_meta.wait();
    FAIL() << "a meta tensor was saved";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("meta device"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(dir.entries().empty());
}

TEST(SaveAsync, ASecondSaveToTheSamePathWaitsForTheFirst) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  const auto big = torch::randn({16 << 20});  // 64 MiB: the first save is still running
  SaveHandle first = save_async({{"w", big}}, path);
  SaveHandle second = save_async({{"w", big + 1}}, path);
  EXPECT_TRUE(first.done()) << "the second save began before the first had ended";
  second.wait();
  first.wait();
  EXPECT_TRUE(torch::equal(tensor_view(File::open(path), File::open(path).at("w")), big + 1));
}

TEST(SaveAsync, AKilledSaveLeavesTheOldFileAndNoTemporary) {
  TempDir dir;
  const std::string path = dir.file("net.tmap");
  save({{"w", torch::zeros({4})}}, path);
  const std::string old = file_bytes(path);
  SaveHandle handle = save_async({{"w", torch::randn({64 << 20})}}, path);  // 256 MiB
  ASSERT_EQ(::kill(handle.pid(), SIGKILL), 0);
  try {
    handle.wait();
    FAIL() << "a killed save succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("killed by signal 9"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(file_bytes(path) == old);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"net.tmap"});
}

// --- safetensors ----------------------------------------------------------------------

TEST(Safetensors, ASavedModelLoadsZeroCopyInMapMode) {
  TempDir dir;
  const std::string path = dir.file("net.safetensors");
  auto source = trained_net();
  SaveOptions options;
  options.format = Format::Safetensors;
  save(*source, path, options);
  const File f = File::open(path);
  EXPECT_EQ(f.format(), Format::Safetensors);
  auto net = build_skeleton([] { return NetModule(); });
  load(*net, f);
  net->eval();
  const auto x = torch::randn({4, 8});
  EXPECT_TRUE(torch::equal(net->forward(x), source->forward(x)));
  for (const auto& [name, t] : named_state(*net)) {
    EXPECT_TRUE(inside(f, t.data_ptr())) << name << " is aligned, so it is not copied";
  }
}

TEST(Safetensors, MisalignedTensorOfTheReferenceFixtureIsCopiedNotReinterpreted) {
  const File f = File::open(TENSORMAP_FIXTURES_DIR "/safetensors/sample_overall.safetensors");
  const at::Tensor d = tensor_view(f, f.at("d"));
  EXPECT_EQ(d.scalar_type(), at::kDouble);
  EXPECT_FALSE(inside(f, d.data_ptr())) << "a misaligned F64 must be copied";
  EXPECT_EQ(reinterpret_cast<uintptr_t>(d.data_ptr()) % 8, 0u);
  EXPECT_TRUE(torch::equal(d, torch::arange(-3, 3, at::kDouble)));
  EXPECT_TRUE(torch::equal(tensor_view(f, f.at("i")), torch::arange(-3, 3, at::kInt)));
  EXPECT_TRUE(torch::equal(tensor_view(f, f.at("e")), torch::arange(-3, 3, at::kHalf)));
}

// F8 keeps its dtype tag; a float8_e5m2 view on LibTorch 2.x, raw bytes only on 1.13.
TEST(Safetensors, F8TensorsKeepTheirDtypeAndRawBytes) {
  TempDir dir;
  const std::string path = dir.file("f8.safetensors");
  WriterOptions options;
  options.format = Format::Safetensors;
  write_pattern_file(path, {{"f8", Dtype::F8_E5M2, {4}}}, options);
  const File f = File::open(path);
  EXPECT_EQ(f.at("f8").dtype, Dtype::F8_E5M2) << "the dtype tag survives";
#if TORCH_VERSION_MAJOR >= 2
  EXPECT_EQ(tensor_view(f, f.at("f8")).scalar_type(), at::kFloat8_e5m2);
#else
  EXPECT_THROW(tensor_view(f, f.at("f8")), Error);
#endif
  EXPECT_EQ(raw_bytes_view(f, f.at("f8")).numel(), 4);
}

// --- torch.save archives and sharded checkpoints ------------------------------------------

const std::string kTorchSave = TENSORMAP_FIXTURES_DIR "/torch_save/";

TEST(TorchSave, APythonStateDictLoadsIntoTheSameModelZeroCopy) {
  // tests/fixtures/torch_save/make_fixtures.py: Linear(8,16), BatchNorm1d(16), ReLU, Linear(16,4)
  auto make = [] {
    return torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::BatchNorm1d(16), torch::nn::ReLU(),
                                 torch::nn::Linear(16, 4));
  };
  auto net = build_skeleton(make);
  const StateDict sd = StateDict::open(kTorchSave + "state_dict.pt");
  EXPECT_EQ(sd.format(), CheckpointFormat::TorchSave);
  const LoadReport report = load(*net, sd);
  EXPECT_TRUE(report.complete()) << report.summary();
  EXPECT_EQ(report.loaded.size(), 9u);
  net->eval();
  EXPECT_EQ(net->forward(torch::ones({2, 8})).sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(net[1]->as<torch::nn::BatchNorm1d>()->num_batches_tracked.item<int64_t>(), 1);
}

TEST(TorchSave, ViewsThatShareAStorageStillShareIt) {
  const StateDict sd = StateDict::open(kTorchSave + "shared_views.pt");
  const at::Tensor base = sd["base"], row = sd["row"], matrix_t = sd["matrix_t"], strided = sd["strided"];
  EXPECT_EQ(row.storage().data(), base.storage().data());
  EXPECT_EQ(matrix_t.storage().data(), base.storage().data());
  EXPECT_FALSE(matrix_t.is_contiguous());
  EXPECT_TRUE(torch::equal(row, torch::arange(4, 8, at::kFloat)));
  EXPECT_TRUE(torch::equal(strided, torch::arange(0, 24, 3, at::kFloat)));
  EXPECT_TRUE(torch::equal(matrix_t, torch::arange(24, at::kFloat).view({4, 6}).t()));
}

TEST(TorchSave, NestedDictsGiveDottedNames) {
  const StateDict sd = StateDict::open(kTorchSave + "nested.pt");
  EXPECT_EQ(sd.keys(), (std::vector<std::string>{"model.w", "model.b", "ema.model.w"}));
}

// A training checkpoint holds more than tensors: every tensor is read, the rest is
// skipped and listed, and no class of the file is ever called.
TEST(TorchSave, ValuesThatAreNotTensorsAreSkippedAndListedAndNothingRuns) {
  const StateDict plain = StateDict::open(kTorchSave + "not_a_tensor.pt");  // {"w": tensor, "lr": 0.1}
  EXPECT_EQ(plain.keys(), (std::vector<std::string>{"w"}));
  EXPECT_EQ(plain.skipped(), (std::vector<std::pair<std::string, std::string>>{{"lr", "a float"}}));
  const StateDict foreign = StateDict::open(kTorchSave + "foreign_class.pt");  // "args": argparse.Namespace
  EXPECT_EQ(foreign.keys(), (std::vector<std::string>{"w"}));
  ASSERT_EQ(foreign.skipped().size(), 1u);
  EXPECT_EQ(foreign.skipped()[0].first, "args");
  EXPECT_NE(foreign.skipped()[0].second.find("'argparse.Namespace' (not executed)"), std::string::npos);
  EXPECT_TRUE(torch::equal(foreign["w"], torch::ones({2})));
}

TEST(TorchSave, AModuleSavedAsTorchSaveLoadsBackZeroCopy) {
  TempDir dir;
  const std::string path = dir.file("net.pt");
  auto source = trained_net();
  SaveOptions options;
  options.format = Format::TorchSave;
  save(*source, path, options);
  auto net = build_skeleton([] { return NetModule(); });
  load(*net, path);
  net->eval();
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(net->forward(x), source->forward(x)));
  const auto head = read_bytes(path);
  EXPECT_EQ(head[0], 'P');  // a zip archive, as Python's torch.save writes
}

// LibTorch's own archives, what a C++ user's old checkpoints are: torch::save(module)
// writes a TorchScript module, its parameters and buffers as attributes of nested objects.
// They are read without running or even reading the archive's code, by the names
// named_parameters() and named_buffers() give, and map-load zero-copy.
TEST(LibTorchArchive, TorchSaveOfAModuleLoadsIntoASkeletonZeroCopyByItsNames) {
  TempDir dir;
  const std::string path = dir.file("net.pt");
  auto source = trained_net();
  torch::save(source, path);
  const StateDict sd = StateDict::open(path);
  EXPECT_EQ(sd.format(), CheckpointFormat::TorchSave);
  std::vector<std::string> expected;
  for (const auto& p : source->named_parameters()) expected.push_back(p.key());
  for (const auto& b : source->named_buffers()) expected.push_back(b.key());
  std::vector<std::string> keys = sd.keys();
  std::sort(expected.begin(), expected.end());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, expected);
  EXPECT_TRUE(sd.skipped().empty());

  for (LoadMode mode : {LoadMode::Map, LoadMode::Copy}) {
    auto net = build_skeleton([] { return NetModule(); });
    LoadOptions options;
    options.mode = mode;
    const LoadReport report = load(*net, path, options);
    EXPECT_TRUE(report.complete()) << report.summary();
    EXPECT_EQ(report.loaded.size(), expected.size());
    const std::string where = mode == LoadMode::Map ? path : "";
    EXPECT_EQ(file_mapped_at(net->fc1->weight.data_ptr()), where);
    EXPECT_EQ(file_mapped_at(net->norm->num_batches_tracked.data_ptr()), where);
    net->eval();
    const auto x = torch::randn({3, 8});
    EXPECT_TRUE(torch::equal(net->forward(x), source->forward(x)));
    EXPECT_EQ(net->norm->num_batches_tracked.item<int64_t>(), 1);
  }
  // LibTorch still reads the archive: tensormap never writes to it.
  auto back = NetModule();
  torch::load(back, path);
  EXPECT_TRUE(torch::equal(back->fc2->bias, source->fc2->bias));
}

TEST(LibTorchArchive, OutputArchivesGiveDottedNamesViewsAndEveryDtype) {
  TempDir dir;
  const std::string path = dir.file("archive.pt");
  torch::manual_seed(1);
  const auto x = torch::arange(6, torch::kInt64).reshape({2, 3});
  const auto y = torch::randn({5}).to(torch::kBFloat16);
  const auto z = torch::randn({3, 2}).t();  // not contiguous
  const auto flag = torch::tensor({true, false, true});
  torch::serialize::OutputArchive archive, inner;
  inner.write("z", z, /*is_buffer=*/true);
  inner.write("flag", flag, /*is_buffer=*/true);
  archive.write("x", x);
  archive.write("inner", inner);
  archive.write("y", y);
  archive.save_to(path);
  const StateDict sd = StateDict::open(path);
  std::vector<std::string> keys = sd.keys();
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"inner.flag", "inner.z", "x", "y"}));
  EXPECT_TRUE(torch::equal(sd["x"], x));
  EXPECT_EQ(sd["y"].scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(sd["y"], y));
  EXPECT_TRUE(torch::equal(sd["inner.z"], z));
  EXPECT_TRUE(torch::equal(sd["inner.flag"], flag));

  // A tensor list (torch::save(std::vector<Tensor>)) names its tensors by position.
  const std::string list = dir.file("list.pt");
  torch::save(std::vector<torch::Tensor>{x, z}, list);
  const StateDict listed = StateDict::open(list);
  EXPECT_EQ(listed.keys().size(), 2u);
  EXPECT_TRUE(torch::equal(listed["0"], x));
  EXPECT_TRUE(torch::equal(listed["1"], z));

  // And each converts to a tensormap file holding the same tensors.
  const std::string out = dir.file("archive.tmap");
  convert(path, out);
  const StateDict converted = StateDict::open(out);
  EXPECT_TRUE(torch::equal(converted["inner.z"], z));
  EXPECT_TRUE(torch::equal(converted["y"], y));
}

// U16, U32, U64 and F8 have no typed storage: they are written as torch 2.x writes them
// (_rebuild_tensor_v3) and read back with their dtype and bytes, on any LibTorch.
TEST(TorchSave, EveryDtypeIsWrittenAndReadBackBitForBit) {
  TempDir dir;
  const std::string path = dir.file("all.pt");
  std::vector<TensorSpec> specs;
  for (Dtype d : kAllDtypes) specs.push_back({std::string(dtype_name(d)), d, {2, 3}});
  {
    TorchSaveWriter w(path, specs);
    for (size_t i = 0; i < specs.size(); ++i) {
      std::vector<uint8_t> bytes(w.byte_length(i));
      for (size_t j = 0; j < bytes.size(); ++j) bytes[j] = static_cast<uint8_t>(j * 7 + i);
      if (specs[i].dtype == Dtype::BOOL)
        for (auto& b : bytes) b &= 1;
      w.write_tensor(bytes.data(), bytes.size());
    }
    w.commit();
  }
  const StateDict sd = StateDict::open(path);
  ASSERT_EQ(sd.size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const StateDict::Info info = sd.info(specs[i].name);
    EXPECT_EQ(info.dtype, specs[i].dtype) << specs[i].name;
    EXPECT_EQ(info.shape, (std::vector<int64_t>{2, 3}));
    const at::Tensor raw = sd.raw_bytes(specs[i].name);
    ASSERT_EQ(static_cast<uint64_t>(raw.numel()), info.byte_length);
    for (int64_t j = 0; j < raw.numel(); ++j) {
      uint8_t expected = static_cast<uint8_t>(j * 7 + static_cast<int64_t>(i));
      if (specs[i].dtype == Dtype::BOOL) expected &= 1;
      ASSERT_EQ(raw[j].item<uint8_t>(), expected) << specs[i].name << " byte " << j;
    }
    if (!to_scalar_type(specs[i].dtype)) {
      EXPECT_THROW(sd.at(specs[i].name), Error) << specs[i].name;  // LibTorch 1.13 has no such dtype
    } else {
      EXPECT_EQ(sd.at(specs[i].name).scalar_type(), *to_scalar_type(specs[i].dtype));
    }
  }
}

TEST(Sharded, AnIndexLoadsLikeOneFileAndMapsShardsOnlyWhenNeeded) {
  TempDir dir;
  const std::string index = dir.file("net.safetensors.index.json");
  auto source = trained_net();
  const auto state = named_state(*source);
  {
    std::vector<TensorSpec> specs;
    for (const auto& [name, t] : state)
      specs.push_back({name, from_scalar_type(t.scalar_type()), {t.sizes().begin(), t.sizes().end()}});
    WriterOptions options;
    options.format = Format::Safetensors;
    ShardedWriter writer(index, specs, 300, options);  // several shards
    EXPECT_GT(writer.shard_count(), 2u);
    for (const auto& [name, t] : state) {
      if (t.nbytes()) writer.write_tensor(t.data_ptr(), t.nbytes());
    }
    writer.commit();
  }
  const StateDict sd = StateDict::open(index);
  EXPECT_EQ(sd.format(), CheckpointFormat::ShardedSafetensors);
  EXPECT_EQ(sd.size(), state.size());
  for (const auto& [name, t] : state) {  // views in mappings of their own: the same values
    EXPECT_TRUE(sd.at(name, ViewMapping::Own).equal(t)) << name;
    if (t.dim() > 0 && t.size(0) > 1) {
      EXPECT_TRUE(sd.slice(name, 0, 1, t.size(0) - 1, ViewMapping::Own).equal(t.narrow(0, 1, t.size(0) - 1))) << name;
    }
  }
  auto net = build_skeleton([] { return NetModule(); });
  load(*net, index);
  net->eval();
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(net->forward(x), source->forward(x)));
}

TEST(Sharded, ATensorMissingFromItsShardIsAnErrorNamingBoth) {
  TempDir dir;
  save({{"a", torch::ones({2})}}, dir.file("shard-a.tmap"));
  save({{"b", torch::ones({2})}}, dir.file("shard-b.tmap"));
  write_bytes(dir.file("m.tmap.index.json"), [] {
    const std::string json = R"({"weight_map": {"a": "shard-a.tmap", "b": "shard-a.tmap"}})";
    return std::vector<unsigned char>(json.begin(), json.end());
  }());
  const StateDict sd = StateDict::open(dir.file("m.tmap.index.json"));
  EXPECT_TRUE(torch::equal(sd["a"], torch::ones({2})));
  try {
    sd.at("b");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::ShardIndexInvalid);
    EXPECT_NE(std::string(e.what()).find("tensor 'b' is mapped to shard 'shard-a.tmap', which does not contain it"),
              std::string::npos)
        << e.what();
  }
}

TEST(Sharded, AShardNameThatLeavesTheDirectoryIsRefused) {
  TempDir dir;
  const std::string json = R"({"weight_map": {"a": "../elsewhere.tmap"}})";
  write_bytes(dir.file("m.tmap.index.json"), std::vector<unsigned char>(json.begin(), json.end()));
  EXPECT_THROW(StateDict::open(dir.file("m.tmap.index.json")), Error);
}

// --- files that shrink while open ---------------------------------------------------------

// Another process truncating the file under our mapping: tensormap's own reads (verify,
// copy-mode loads, raw bytes for conversion) report Error(Truncated) instead of SIGBUS.
TEST(Truncation, OwnReadsOfAFileShrunkWhileOpenGiveAnErrorNotSigbus) {
  TempDir dir;
  const std::string path = dir.file("shrinking.tmap");
  save({{"weight", torch::ones({512, 512})}, {"bias", torch::ones({512})}}, path);  // 1 MiB + 2 KiB
  const File f = File::open(path);
  const StateDict sd(f);
  ASSERT_EQ(::truncate(path.c_str(), 64 * 1024), 0);  // as another process might

  auto expect_truncated = [](auto&& action, const char* what) {
    try {
      action();
      ADD_FAILURE() << what << " did not notice the truncation";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Truncated) << what << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find("shrank"), std::string::npos) << e.what();
    }
  };
  expect_truncated([&] { f.verify(); }, "verify");
  expect_truncated([&] { sd.raw_bytes("weight"); }, "raw_bytes (conversion)");
  std::vector<float> buffer(512 * 512);
  expect_truncated([&] { f.read(f.at("weight"), 0, buffer.data(), 512 * 512 * 4); }, "File::read");
  torch::nn::Linear lin(512, 512);
  LoadOptions copy;
  copy.mode = LoadMode::Copy;
  expect_truncated([&] { load(*lin, sd, copy); }, "copy-mode load");
}

// --- a real multi-layer model -----------------------------------------------------------

class TransformerRoundTrip : public ::testing::TestWithParam<LoadMode> {};

TEST_P(TransformerRoundTrip, OutputsAreBitIdenticalAfterSaveAndLoad) {
  auto make = [] {
    return torch::nn::TransformerEncoder(
        torch::nn::TransformerEncoderOptions(torch::nn::TransformerEncoderLayerOptions(64, 4).dim_feedforward(128), 2));
  };
  torch::manual_seed(7);
  auto original = make();
  original->eval();
  const auto x = torch::randn({10, 3, 64});
  const auto expected = original->forward(x);
  TempDir dir;
  const std::string path = dir.file("transformer.tmap");
  save(*original, path);

  auto loaded = build_skeleton(make);
  LoadOptions options;
  options.mode = GetParam();
  const auto report = load(*loaded, path, options);
  EXPECT_EQ(report.loaded.size(), named_state(*original).size());
  loaded->eval();
  EXPECT_TRUE(torch::equal(loaded->forward(x), expected));
}

INSTANTIATE_TEST_SUITE_P(Modes, TransformerRoundTrip, ::testing::Values(LoadMode::Map, LoadMode::Copy),
                         [](const auto& info) { return info.param == LoadMode::Map ? "Map" : "Copy"; });

}  // namespace
}  // namespace tensormap::testing
