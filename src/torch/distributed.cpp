// Tensor-parallel loading over c10d: every rank reads its own parts, or one rank reads
// and sends the others theirs. See include/tensormap/distributed.h.
#include "tensormap/distributed.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <unordered_set>

#include "loading.h"
#include "released.h"
#include "tensormap/error.h"
#include "tensormap/sharded.h"
#include "tensormap/skeleton.h"

namespace tensormap {
namespace {

// Fields of one tensor's descriptor, as the source rank broadcasts it.
enum Field : int64_t { kPresent, kNameHash, kDtype, kRank, kDims, kFields = kDims + 8 };

// The four collectives a load needs, over whichever c10d object the user holds: a
// ProcessGroup (LibTorch 1.13's ProcessGroupGloo is one; in 2.x a ProcessGroup dispatches
// to its backends) or, in LibTorch 2.x, a Backend such as ProcessGroupGloo on its own.
// Both spell these calls alike, so one template adapts either.
class Group {
 public:
  virtual ~Group() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual void allreduce_min(at::Tensor& t) = 0;
  virtual void broadcast(at::Tensor& t, int root) = 0;
  virtual void send(at::Tensor& t, int to, int tag) = 0;
  virtual void recv(at::Tensor& t, int from, int tag) = 0;
};

template <typename C10dGroup>
class GroupOf final : public Group {
 public:
  explicit GroupOf(C10dGroup& group) : group_(group) {}
  int rank() const override { return group_.getRank(); }
  int size() const override { return group_.getSize(); }
  void allreduce_min(at::Tensor& t) override {
    std::vector<at::Tensor> io{t};
    c10d::AllreduceOptions min;
    min.reduceOp = c10d::ReduceOp::MIN;
    group_.allreduce(io, min)->wait();
  }
  void broadcast(at::Tensor& t, int root) override {
    std::vector<at::Tensor> io{t};
    c10d::BroadcastOptions from;
    from.rootRank = root;
    group_.broadcast(io, from)->wait();
  }
  void send(at::Tensor& t, int to, int tag) override {
    std::vector<at::Tensor> io{t};
    group_.send(io, to, tag)->wait();
  }
  void recv(at::Tensor& t, int from, int tag) override {
    std::vector<at::Tensor> io{t};
    group_.recv(io, from, tag)->wait();
  }

 private:
  C10dGroup& group_;
};

// Every rank passes what it found (nothing, or an Error); every rank learns whether any
// rank failed and, if so, throws the failure of the lowest failing rank, on every rank.
void agree(Group& group, const std::optional<Error>& local) {
  const int world = group.size();
  const int me = group.rank();
  at::Tensor first = at::full({1}, local ? me : world, at::kLong);
  group.allreduce_min(first);
  const int failed = static_cast<int>(first.item<int64_t>());
  if (failed == world) return;
  // The failing rank broadcasts its error: the kind's name, a newline, the message. Names,
  // not the enum's values, cross the wire, so ranks agree whatever order the enum has.
  const std::string text =
      failed == me ? std::string(error_kind_name(local->kind())) + "\n" + local->what() : std::string();
  at::Tensor head = at::tensor({static_cast<int64_t>(text.size())}, at::kLong);
  group.broadcast(head, failed);
  at::Tensor body = at::empty({head[0].item<int64_t>()}, at::kByte);
  if (failed == me && !text.empty()) std::memcpy(body.data_ptr(), text.data(), text.size());
  if (body.numel() > 0) group.broadcast(body, failed);
  const std::string received(static_cast<const char*>(body.data_ptr()), static_cast<size_t>(body.numel()));
  const size_t newline = received.find('\n');
  const std::string name = received.substr(0, newline);
  const std::string message = newline == std::string::npos ? std::string() : received.substr(newline + 1);
  throw Error(error_kind_from_name(name).value_or(ErrorKind::LibTorch),
              "rank " + std::to_string(failed) + " of " + std::to_string(world) + ": " + message);
}

// Runs `step`, keeping a tensormap or LibTorch error for agree() instead of throwing.
std::optional<Error> attempt(const std::function<void()>& step) {
  try {
    step();
  } catch (const Error& e) {
    return e;
  } catch (const c10::Error& e) {
    return Error(ErrorKind::LibTorch, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Error(ErrorKind::Io, e.what());
  }
  return std::nullopt;
}

// A tensor's bytes as a flat U8 view, which c10d moves whatever the dtype.
at::Tensor bytes_of(const at::Tensor& t) { return t.view({-1}).view(at::kByte); }

// Receives into `target` through a contiguous buffer (the target itself when possible).
template <typename Receive>
void receive_into(at::Tensor& target, Receive receive) {
  detail::ensure_storage(target);
  if (target.is_contiguous()) {
    receive(bytes_of(target));
  } else {
    at::Tensor buffer = at::empty(target.sizes(), target.options());
    receive(bytes_of(buffer));
    target.copy_(buffer);
  }
}

// A load in which one rank reads the checkpoint (source_rank >= 0), in three stages, each
// agreed on by every rank before the next begins.
class OneRankLoad {
 public:
  OneRankLoad(torch::nn::Module& module, const std::string& path, Group& group, const ParallelPlan& plan,
              const DistributedLoadOptions& options)
      : path(path),
        group(group),
        plan(plan),
        options(options),
        source(options.source_rank),
        is_source(group.rank() == source),
        model_state(named_state(module)),
        count(static_cast<int64_t>(model_state.size())) {}

  LoadReport run() {
    describe();
    check();
    move();
    return report;
  }

 private:
  void describe() {
    // 1. The source opens the checkpoint and describes, for each tensor of its model, what
    //    the file holds under that name; everyone learns whether it could.
    table = at::zeros({count + 1, kFields}, at::kLong);
    std::optional<Error> failure;
    if (is_source) {
      failure = attempt([&] {
        state = StateDict::open(path);
        source_mode = detail::resolved_mode(options.load.mode, *state);
        auto t = table.accessor<int64_t, 2>();
        t[count][0] = count;
        std::unordered_set<std::string_view> names;
        for (int64_t i = 0; i < count; ++i) {
          const std::string& name = model_state[static_cast<size_t>(i)].first;
          names.insert(name);
          t[i][kNameHash] = static_cast<int64_t>(std::hash<std::string>{}(name));
          if (!state->contains(name)) continue;
          const StateDict::Info info = state->info(name);
          t[i][kPresent] = 1;
          t[i][kDtype] = static_cast<int64_t>(info.dtype);
          t[i][kRank] = static_cast<int64_t>(info.shape.size());
          for (size_t d = 0; d < info.shape.size(); ++d) t[i][kDims + static_cast<int64_t>(d)] = info.shape[d];
        }
        for (const std::string& name : state->keys()) {
          if (!names.count(name)) report.unexpected.push_back(name);
        }
      });
    }
    agree(group, failure);
    group.broadcast(table, source);
  }

  void check() {
    // 2. Every rank checks its own model against the table, as load() would.
    auto t = table.accessor<int64_t, 2>();
    parts.assign(static_cast<size_t>(count), detail::Part{});
    loadable = at::zeros({std::max<int64_t>(count, 1)}, at::kLong);
    const std::optional<Error> failure = attempt([&] {
      if (t[count][0] != count) {
        throw Error(ErrorKind::ModelMismatch, "the model has " + std::to_string(count) +
                                                  " tensors, the source rank's model " + std::to_string(t[count][0]));
      }
      for (int64_t i = 0; i < count; ++i) {
        const auto& [name, target] = model_state[static_cast<size_t>(i)];
        if (t[i][kNameHash] != static_cast<int64_t>(std::hash<std::string>{}(name))) {
          throw Error(ErrorKind::ModelMismatch, "tensor " + std::to_string(i) + " is " + quoted_name(name) +
                                                    " here, another name on the source rank");
        }
        if (!t[i][kPresent]) {
          report.missing.push_back(name);
          detail::mark_missing(target, name, path);
          continue;
        }
        StateDict::Info info{static_cast<Dtype>(t[i][kDtype]), {}, 0};
        for (int64_t d = 0; d < t[i][kRank]; ++d) info.shape.push_back(t[i][kDims + d]);
        const std::string why = detail::check_target(target, name, info, plan, is_source ? source_mode : LoadMode::Copy,
                                                     parts[static_cast<size_t>(i)]);
        if (!why.empty()) {
          report.mismatched.push_back(name + ": " + why);
          continue;
        }
        loadable[i] = 1;
      }
      if (options.load.strict && !report.complete()) {
        throw Error(ErrorKind::ModelMismatch,
                    path + " does not match the model, nothing was loaded: " + report.summary());
      }
    });
    agree(group, failure);
    // Not strict: a tensor moves only if every rank can take it.
    group.allreduce_min(loadable);
  }

  void move() {
    // 3. The weights move, tensor by tensor, in model order. The source keeps only its own
    //    share too: its parts and replicated tensors as a rank of a parallel load takes
    //    them, the others' parts read with pread into a buffer that lives until sent.
    at::NoGradGuard no_grad;
    const ViewMapping mapping = own_mappings_fit(static_cast<size_t>(count)) ? ViewMapping::Own : ViewMapping::File;
    at::Tensor send_buffer = at::empty({0}, at::kByte);  // one for every part sent: no heap churn
    for (int64_t i = 0; i < count; ++i) {
      if (!loadable[i].item<int64_t>()) continue;
      const std::string& name = model_state[static_cast<size_t>(i)].first;
      at::Tensor target = model_state[static_cast<size_t>(i)].second;
      const detail::Part part = parts[static_cast<size_t>(i)];
      const int tag = static_cast<int>(i);
      if (is_source) {
        detail::LoadPlan::Binding own{target, name, part};
        // The page cache is left as it is: the source reads every rank's part of the file.
        detail::BindingOptions how;
        how.mode = source_mode;
        how.mapping = mapping;
        how.read_ahead = true;
        how.verify = options.load.verify_checksums;
        detail::load_binding(own, *state, how);
      }
      if (part.dim < 0) {  // replicated: a broadcast of the whole tensor
        if (is_source) {
          at::Tensor whole = target.contiguous();
          if (whole.numel() > 0) {
            at::Tensor bytes = bytes_of(whole);
            group.broadcast(bytes, source);
          }
        } else {
          receive_into(target, [&](at::Tensor bytes) {
            if (bytes.numel() > 0) group.broadcast(bytes, source);
          });
        }
      } else if (is_source) {  // split: each rank gets its part, point to point
        const c10::ScalarType stored = *to_scalar_type(state->info(name).dtype);  // checked above
        const auto bytes = c10::multiply_integers(target.sizes()) * static_cast<int64_t>(c10::elementSize(stored));
        if (send_buffer.numel() < bytes) send_buffer = at::empty({bytes}, at::kByte);
        for (int r = 0; r < group.size() && bytes > 0; ++r) {
          if (r == source) continue;  // its own part is loaded above
          at::Tensor piece = send_buffer.narrow(0, 0, bytes);
          state->read(name, part.dim, part.length * r, part.length, piece.data_ptr());
          if (stored != target.scalar_type())
            piece = bytes_of(piece.view(stored).view(target.sizes()).to(target.scalar_type()));
          group.send(piece, r, tag);
        }
      } else {
        receive_into(target, [&](at::Tensor bytes) {
          if (bytes.numel() > 0) group.recv(bytes, source, tag);
        });
      }
      report.loaded.push_back(name);
    }
  }

  const std::string& path;
  Group& group;
  const ParallelPlan& plan;
  const DistributedLoadOptions& options;
  const int source;
  const bool is_source;
  const std::vector<std::pair<std::string, at::Tensor>> model_state;
  const int64_t count;
  std::optional<StateDict> state;         // the source's only
  LoadMode source_mode = LoadMode::Copy;  // the source's, Auto resolved
  LoadReport report;
  at::Tensor table;                 // per model tensor: what the checkpoint holds under its name
  std::vector<detail::Part> parts;  // this rank's part of each tensor
  at::Tensor loadable;              // per model tensor: 1 if every rank can take it
};

LoadReport load_from_one_rank(torch::nn::Module& module, const std::string& path, Group& group,
                              const ParallelPlan& plan, const DistributedLoadOptions& options) {
  return OneRankLoad(module, path, group, plan, options).run();
}

LoadReport load_over(torch::nn::Module& module, const std::string& path, Group& group,
                     const std::vector<std::pair<std::string, int64_t>>& splits,
                     const DistributedLoadOptions& options) {
  ParallelPlan plan{group.rank(), group.size(), splits};
  if (options.source_rank < -1 || options.source_rank >= group.size()) {
    throw Error(ErrorKind::InvalidArgument, "source rank " + std::to_string(options.source_rank) +
                                                " is not a rank of the group of " + std::to_string(group.size()));
  }
  if (options.source_rank >= 0) return load_from_one_rank(module, path, group, plan, options);

  // Every rank reads its own parts. The models are checked first, on every rank, so that
  // either all load or none does.
  LoadOptions local = options.load;
  local.parallel = plan;
  std::optional<StateDict> state;
  std::optional<detail::LoadPlan> load_plan;
  auto failure = attempt([&] {
    state = StateDict::open(path);
    local.mode = detail::resolved_mode(local.mode, *state);
    try {
      load_plan = detail::plan_load(module, *state, local);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::ModelMismatch) throw;
      throw Error(e.kind(), path + ": " + e.what());
    }
  });
  agree(group, failure);
  LoadReport report;
  failure = attempt([&] { report = detail::apply_load(std::move(*load_plan), *state, local); });
  agree(group, failure);
  return report;
}

// --- saving ------------------------------------------------------------------------------

// Per tensor, what every rank's model must agree on: its name (hashed), the dimension it
// is split along (-1: replicated), its dtype and its (part's) shape.
constexpr int64_t kSaveFields = 4 + static_cast<int64_t>(format::kMaxRank);

std::string parent_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, std::max<size_t>(slash, 1));
}

// What a rank knows of its model for a distributed save: per tensor, its name, the
// dimension it is split along (-1: replicated), its (part's) shape and bytes; and the
// table every rank's must equal (agree_on_models).
struct Described {
  std::vector<std::string> names;
  std::vector<int64_t> dims;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<uint64_t> bytes;
  at::Tensor table;
};

// A distributed save whose file is written (or, in the background, being written), and
// whose commit is left: the agreements the call did not make, then rank 0's index.
struct PendingSave {
  std::string path;
  bool sync = true;
  bool background = false;
  Described model;
  std::vector<int> owner;      // each replicated tensor's writer
  int64_t id = 0;              // this rank's file's id (63 random bits)
  SaveHandle file;             // a background save's child; empty once written
  std::optional<Error> start;  // why this rank's background save did not start
};

std::string file_id(int64_t id) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(id));
  return text;
}

// Where rank `rank` of `world` writes its file of the save of the index at `path`.
std::string rank_file(const std::string& path, int64_t id, int rank, int world) {
  return parent_of(path) + "/" + distributed_file_name(path, file_id(id), rank, world);
}

Described describe(const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& path,
                   const ParallelPlan& plan) {
  const auto count = static_cast<int64_t>(state.size());
  Described model;
  model.table = at::zeros({count * kSaveFields + 1}, at::kLong);
  auto t = model.table.accessor<int64_t, 1>();
  t[count * kSaveFields] = count;
  for (size_t i = 0; i < state.size(); ++i) {
    const auto& [name, tensor] = state[i];
    if (!tensor.defined() || is_released(tensor) || tensor.is_meta()) {
      throw Error(ErrorKind::InvalidArgument, path + ": tensor " + quoted_name(name) + " holds no data to save");
    }
    if (tensor.dim() > static_cast<int64_t>(format::kMaxRank)) {
      throw Error(ErrorKind::InvalidArgument, path + ": tensor " + quoted_name(name) + " has more than " +
                                                  std::to_string(format::kMaxRank) + " dimensions");
    }
    int64_t dim = -1;
    if (const auto split = plan.split_dim(name)) {
      dim = *split < 0 ? *split + tensor.dim() : *split;
      if (dim < 0 || dim >= tensor.dim()) {
        throw Error(ErrorKind::InvalidArgument, path + ": the splits split dimension " + std::to_string(*split) +
                                                    " of tensor " + quoted_name(name) + ", of rank " +
                                                    std::to_string(tensor.dim()));
      }
    }
    const int64_t at = static_cast<int64_t>(i) * kSaveFields;
    t[at] = static_cast<int64_t>(std::hash<std::string>{}(name) >> 1);
    t[at + 1] = dim;
    t[at + 2] = static_cast<int64_t>(tensor.scalar_type());
    t[at + 3] = tensor.dim();
    for (int64_t d = 0; d < tensor.dim(); ++d) t[at + 4 + d] = tensor.size(d);
    model.names.push_back(name);
    model.dims.push_back(dim);
    model.shapes.push_back(tensor.sizes().vec());
    model.bytes.push_back(tensor.nbytes());
  }
  return model;
}

// The models agree: the same count first (the tables' lengths), then every field. Every
// rank sees the same minima, so all throw alike.
void agree_on_models(Group& group, const PendingSave& pending) {
  const Described& model = pending.model;
  const auto count = static_cast<int64_t>(model.names.size());
  at::Tensor counts = at::tensor({count, -count}, at::kLong);
  group.allreduce_min(counts);
  if (counts[0].item<int64_t>() != -counts[1].item<int64_t>()) {
    throw Error(ErrorKind::ModelMismatch, pending.path + ": the ranks' models have different numbers of tensors (" +
                                              std::to_string(counts[0].item<int64_t>()) + " to " +
                                              std::to_string(-counts[1].item<int64_t>()) + ")");
  }
  at::Tensor low = model.table.clone(), high = model.table.neg();
  group.allreduce_min(low);
  group.allreduce_min(high);
  const at::Tensor differ = at::ne(low, high.neg()).nonzero();
  if (differ.numel() > 0) {
    const int64_t i = differ[0][0].item<int64_t>() / kSaveFields;
    throw Error(ErrorKind::ModelMismatch, pending.path + ": the ranks' models differ at tensor " + std::to_string(i) +
                                              " (" + quoted_name(model.names[static_cast<size_t>(i)]) +
                                              " here): its name, split, dtype or shape");
  }
}

// Who writes each replicated tensor: the rank with the fewest bytes so far. Every rank
// works it out alone; ranks whose models agree work out the same.
std::vector<int> owners(const Described& model, int world) {
  std::vector<uint64_t> bytes(static_cast<size_t>(world), 0);
  std::vector<int> owner(model.names.size(), -1);
  for (size_t i = 0; i < model.names.size(); ++i) {
    if (model.dims[i] >= 0) {
      for (auto& b : bytes) b += model.bytes[i];
    }
  }
  for (size_t i = 0; i < model.names.size(); ++i) {
    if (model.dims[i] >= 0) continue;
    owner[i] = static_cast<int>(std::min_element(bytes.begin(), bytes.end()) - bytes.begin());
    bytes[static_cast<size_t>(owner[i])] += model.bytes[i];
  }
  return owner;
}

// The commit, on every rank together: a background save's outcome and agreement first;
// then every rank's file id, and rank 0 publishes the index naming the files.
void commit(Group& group, PendingSave& pending) {
  const int rank = group.rank(), world = group.size();
  if (pending.background) {
    agree(group, pending.start ? pending.start : attempt([&] { pending.file.wait(); }));
    try {
      agree_on_models(group, pending);
    } catch (const Error&) {  // this rank's file is of no save: it goes now, not at the next
      std::error_code ignored;
      std::filesystem::remove(rank_file(pending.path, pending.id, rank, world), ignored);
      throw;
    }
  }
  at::Tensor ids = at::full({world}, std::numeric_limits<int64_t>::max(), at::kLong);
  ids[rank] = pending.id;
  group.allreduce_min(ids);
  agree(group, attempt([&] {
          if (rank != 0) return;
          const Described& model = pending.model;
          std::vector<std::string> files;  // every rank's file, by rank
          for (int r = 0; r < world; ++r) {
            files.push_back(distributed_file_name(pending.path, file_id(ids[r].item<int64_t>()), r, world));
          }
          DistributedIndex index;
          for (size_t i = 0; i < model.names.size(); ++i) {
            if (model.dims[i] < 0) {
              index.whole.emplace_back(model.names[i], files[static_cast<size_t>(pending.owner[i])]);
              index.total_size += model.bytes[i];
              continue;
            }
            DistributedIndex::Split split{model.names[i], model.dims[i], model.shapes[i], {}};
            split.shape[static_cast<size_t>(model.dims[i])] *= world;
            split.files = files;
            index.split.push_back(std::move(split));
            index.total_size += model.bytes[i] * static_cast<uint64_t>(world);
          }
          publish_distributed_index(pending.path, index, pending.sync);
        }));
}

// The index paths of background distributed saves started in this process and not yet
// waited for. Another save of the same checkpoint meanwhile is refused: its commit would
// remove the files of the one in flight, which are not in the index yet.
class InFlight {
 public:
  static std::string key(const std::string& path) {
    std::error_code ignored;
    return std::filesystem::absolute(path, ignored).lexically_normal().string();
  }
  static void refuse_if_saving(const std::string& path) {
    std::lock_guard<std::mutex> lock(mutex());
    if (paths().count(key(path)) > 0) {
      throw Error(ErrorKind::InvalidArgument, path +
                                                  ": a background distributed save of this checkpoint is in flight; "
                                                  "wait() for its handle before saving it again");
    }
  }
  static void add(const std::string& path) {
    std::lock_guard<std::mutex> lock(mutex());
    paths().insert(key(path));
  }
  static void remove(const std::string& path) {
    std::lock_guard<std::mutex> lock(mutex());
    paths().erase(key(path));
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::set<std::string>& paths() {
    static std::set<std::string> p;
    return p;
  }
};

// Every rank writes its own file, named with an id of its own, atomically and (with
// options.sync) durably. In the background a child process writes it (save_async) from a
// snapshot taken now, and the call makes no collective: the ranks' agreement on their
// models, and any rank's failure to start, wait for wait(). In the foreground the models
// agree before anything is written.
PendingSave save_over(const torch::nn::Module& module, const std::string& path, Group& group,
                      const std::vector<std::pair<std::string, int64_t>>& splits, const SaveOptions& options,
                      bool background) {
  const int rank = group.rank(), world = group.size();
  const auto state = named_state(module);
  PendingSave pending;
  pending.path = path;
  pending.sync = options.sync;
  pending.background = background;
  std::optional<Error> failure = attempt([&] {
    if (options.format != Format::Tensormap) {
      throw Error(ErrorKind::InvalidArgument, path + ": a distributed save writes tensormap files only");
    }
    distributed_file_name(path, std::string(16, '0'), rank, world);  // checks the index's name
    InFlight::refuse_if_saving(path);
    pending.model = describe(state, path, ParallelPlan{rank, world, splits});
  });
  if (background && failure) {
    pending.start = failure;
    return pending;
  }
  if (!background) {
    agree(group, failure);
    agree_on_models(group, pending);
  }
  pending.owner = owners(pending.model, world);
  pending.id =
      static_cast<int64_t>((static_cast<uint64_t>(std::random_device{}()) << 32 | std::random_device{}()) >> 1);
  failure = attempt([&] {
    std::vector<std::pair<std::string, at::Tensor>> own;
    for (size_t i = 0; i < state.size(); ++i) {
      if (pending.model.dims[i] >= 0 || pending.owner[i] == rank) own.push_back(state[i]);
    }
    if (own.empty()) return;
    const std::string file = rank_file(path, pending.id, rank, world);
    if (background) {
      pending.file = save_async(own, file, options);
    } else {
      save(own, file, options);
    }
  });
  if (background) {
    pending.start = failure;
  } else {
    agree(group, failure);
  }
  return pending;
}

}  // namespace

struct DistributedSaveHandle::State {
  std::unique_ptr<Group> group;
  PendingSave pending;
  bool in_flight = false;  // registered with InFlight: a fork started
  ~State() {
    if (in_flight) InFlight::remove(pending.path);
  }
};

DistributedSaveHandle::DistributedSaveHandle() = default;
DistributedSaveHandle::DistributedSaveHandle(std::unique_ptr<State> state) : state_(std::move(state)) {}
DistributedSaveHandle::DistributedSaveHandle(DistributedSaveHandle&&) noexcept = default;
DistributedSaveHandle& DistributedSaveHandle::operator=(DistributedSaveHandle&&) noexcept = default;
DistributedSaveHandle::~DistributedSaveHandle() = default;  // the file's child is waited for

void DistributedSaveHandle::wait() {
  if (!state_) return;
  const std::unique_ptr<State> state = std::move(state_);
  commit(*state->group, state->pending);
}

bool DistributedSaveHandle::done() const { return !state_ || state_->pending.file.done(); }

namespace {

template <typename C10dGroup>
void save_now(const torch::nn::Module& module, const std::string& path, C10dGroup& group,
              const std::vector<std::pair<std::string, int64_t>>& splits, const SaveOptions& options) {
  GroupOf<C10dGroup> adapted(group);
  PendingSave pending = save_over(module, path, adapted, splits, options, false);
  commit(adapted, pending);
}

template <typename C10dGroup>
DistributedSaveHandle save_later(const torch::nn::Module& module, const std::string& path, C10dGroup& group,
                                 const std::vector<std::pair<std::string, int64_t>>& splits,
                                 const SaveOptions& options) {
  auto state = std::make_unique<DistributedSaveHandle::State>();
  state->group = std::make_unique<GroupOf<C10dGroup>>(group);
  state->pending = save_over(module, path, *state->group, splits, options, true);
  if (!state->pending.start) {
    InFlight::add(path);
    state->in_flight = true;
  }
  return DistributedSaveHandle(std::move(state));
}

}  // namespace

void save_distributed(const torch::nn::Module& module, const std::string& path, c10d::ProcessGroup& group,
                      const std::vector<std::pair<std::string, int64_t>>& splits, const SaveOptions& options) {
  save_now(module, path, group, splits, options);
}

DistributedSaveHandle save_distributed_async(const torch::nn::Module& module, const std::string& path,
                                             c10d::ProcessGroup& group,
                                             const std::vector<std::pair<std::string, int64_t>>& splits,
                                             const SaveOptions& options) {
  return save_later(module, path, group, splits, options);
}

#if TENSORMAP_C10D_HAS_BACKEND
void save_distributed(const torch::nn::Module& module, const std::string& path, c10d::Backend& group,
                      const std::vector<std::pair<std::string, int64_t>>& splits, const SaveOptions& options) {
  save_now(module, path, group, splits, options);
}

DistributedSaveHandle save_distributed_async(const torch::nn::Module& module, const std::string& path,
                                             c10d::Backend& group,
                                             const std::vector<std::pair<std::string, int64_t>>& splits,
                                             const SaveOptions& options) {
  return save_later(module, path, group, splits, options);
}
#endif

LoadReport load_distributed(torch::nn::Module& module, const std::string& path, c10d::ProcessGroup& group,
                            const std::vector<std::pair<std::string, int64_t>>& splits,
                            const DistributedLoadOptions& options) {
  GroupOf<c10d::ProcessGroup> adapted(group);
  return load_over(module, path, adapted, splits, options);
}

#if TENSORMAP_C10D_HAS_BACKEND
LoadReport load_distributed(torch::nn::Module& module, const std::string& path, c10d::Backend& group,
                            const std::vector<std::pair<std::string, int64_t>>& splits,
                            const DistributedLoadOptions& options) {
  GroupOf<c10d::Backend> adapted(group);
  return load_over(module, path, adapted, splits, options);
}
#endif

}  // namespace tensormap
