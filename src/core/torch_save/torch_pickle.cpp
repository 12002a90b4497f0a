// The objects of torch.save's pickles: see torch_pickle.h.
#include "torch_save/torch_pickle.h"

#include <optional>
#include <unordered_map>

#include "format/names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "torch_save/torch_names.h"
#include "util/bytes.h"

namespace tensormap::detail {
namespace {

using Kind = PickleValue::Kind;
using Global = PickleValue::Global;

class TorchObjects final : public PickleObjects {
 public:
  explicit TorchObjects(const StorageCheck& check) : check_(check) {}

  PickleRef global(PickleMachine& m, std::string_view module, std::string_view name) override {
    const PickleRef v = m.make(Kind::Global);
    if (module == "collections" && name == "OrderedDict") {
      v->global = Global::OrderedDict;
    } else if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
      v->global = Global::RebuildTensorV2;
    } else if (module == "torch._utils" && name == "_rebuild_tensor_v3") {
      v->global = Global::RebuildTensorV3;
    } else if (module == "torch._utils" && name == "_rebuild_parameter") {
      v->global = Global::RebuildParameter;
    } else if (module == "torch._utils" && name == "_rebuild_parameter_with_state") {
      v->global = Global::RebuildParameterWithState;
    } else if (module == "torch" && dtype_of_storage_class(name)) {
      v->global = Global::StorageType;
      v->dtype = *dtype_of_storage_class(name);
    } else if ((module == "torch.storage" || module == "torch") && name == "UntypedStorage") {  // torch 2.x, v3
      v->global = Global::StorageType;
      v->untyped = true;
    } else if (module == "torch" && dtype_of_torch_name(name)) {
      v->global = Global::TorchDtype;
      v->dtype = *dtype_of_torch_name(name);
    } else if (module == "__torch__" || module.substr(0, 10) == "__torch__.") {
      v->global = Global::ScriptClass;  // instantiated empty, then given its attributes
    } else {
      v->global = Global::Other;  // never called: whatever it makes stays opaque
    }
    std::string text;
    text.reserve(module.size() + 1 + name.size());
    text.append(module).append(".").append(name);
    m.keep_text(*v, text);
    return v;
  }

  PickleRef reduce(PickleMachine& m, const PickleValue& callable, const PickleValue& args) override {
    if (callable.kind == Kind::Opaque) return opaque(m, callable);
    if (callable.kind != Kind::Global) m.fail("REDUCE of something that is not a global");
    const auto& a = args.items();
    switch (callable.global) {
      case Global::OrderedDict:
        if (!a.empty()) m.fail("OrderedDict with arguments");
        return m.make(Kind::Dict);
      case Global::RebuildTensorV2:
        // (storage, storage offset, size, stride, requires_grad, hooks[, metadata])
        if (a.size() >= 4 && a[0]->kind == Kind::Opaque) return unstored(m, "a tensor over ", a[0]->text());
        if (a.size() < 4 || a[0]->kind != Kind::Storage) m.fail("_rebuild_tensor_v2 with unexpected arguments");
        if (a[0]->untyped) m.fail("_rebuild_tensor_v2 over an untyped storage");
        return tensor(m, *a[0], *a[1], *a[2], *a[3], a[0]->dtype);
      case Global::RebuildTensorV3:
        // (untyped storage, storage offset, size, stride, requires_grad, hooks, dtype[, metadata])
        if (a.size() < 7 || a[0]->kind != Kind::Storage || !a[0]->untyped || a[6]->kind != Kind::Global) {
          m.fail("_rebuild_tensor_v3 with unexpected arguments");
        }
        if (a[6]->global != Global::TorchDtype) return unstored(m, "a tensor of ", a[6]->text());  // skipped
        return tensor(m, *a[0], *a[1], *a[2], *a[3], a[6]->dtype);
      case Global::RebuildParameter:
      case Global::RebuildParameterWithState:
        if (a.empty() || (a[0]->kind != Kind::Tensor && a[0]->kind != Kind::Opaque)) {
          m.fail("_rebuild_parameter without a tensor");
        }
        return a[0];
      case Global::ScriptClass:
      case Global::Other: return opaque(m, callable);
      default: m.fail("REDUCE of " + quoted(callable.text()) + ", which is not callable");
    }
  }

  // cls.__new__(cls): an empty object of a TorchScript class, whose attributes its BUILD
  // gives; an opaque value for any other class, and for any made with keywords.
  PickleRef new_object(PickleMachine& m, const PickleValue& cls, bool keywords) override {
    if (keywords || cls.kind != Kind::Global || cls.global != Global::ScriptClass) return opaque(m, cls);
    const PickleRef v = m.make(Kind::Dict);
    v->script_object = true;
    return v;
  }

  // BUILD of a TorchScript object: its state is the dict of its attributes, given once.
  // Of an OrderedDict, the state is its _metadata attribute, not needed; of an opaque
  // object, whatever it is.
  void build(PickleMachine& m, PickleValue& object, const PickleValue& state) override {
    if (object.kind != Kind::Dict && object.kind != Kind::Opaque) {
      m.fail("BUILD on something other than a dict or an object");
    }
    if (!object.script_object) return;
    const std::string of = "BUILD of a TorchScript object";
    if (object.built) m.fail(of + " twice");
    if (state.kind != Kind::Dict) m.fail(of + " with a state that is not a dict");
    if (&state == &object) m.fail(of + " with itself as its state");
    // The object shares its state's entries: nothing is copied, so one large state
    // given to many objects costs no more than itself.
    object.list = state.list;
    object.built = true;
  }

  PickleRef persistent(PickleMachine& m, const PickleValue& pid) override {
    // ('storage', storage type, key, location, number of elements)
    const auto& p = pid.items();
    if (pid.kind != Kind::Tuple || p.size() != 5 || p[0]->text() != "storage" || p[1]->kind != Kind::Global ||
        (p[1]->global != Global::StorageType && p[1]->global != Global::Other) || p[2]->kind != Kind::String ||
        p[4]->kind != Kind::Int || p[4]->integer < 0) {
      m.fail("a persistent id that is not a storage reference");
    }
    if (p[1]->global == Global::Other) {         // a storage of a dtype tensormap does not store
      const PickleRef v = m.make(Kind::Opaque);  // (torch.ComplexHalfStorage): its tensors are skipped
      PickleMachine::share_text(*v, *p[1]);
      return v;
    }
    const std::string_view key = p[2]->text();
    auto it = storages_.find(key);
    if (it == storages_.end()) {
      const PickleRef v = m.make(Kind::Storage);
      const PickleValue& type = *p[1];
      v->untyped = type.untyped;
      v->dtype = type.dtype;
      PickleMachine::share_text(*v, *p[2]);
      // An untyped storage counts bytes; a typed one, elements.
      const auto bytes = checked_mul(static_cast<uint64_t>(p[4]->integer), type.untyped ? 1 : dtype_size(type.dtype));
      if (!bytes || *bytes > format::kMaxFileOffset) m.fail("storage " + quoted(key) + " is too large to address");
      v->storage_bytes = *bytes;
      check_(std::string(key), *bytes);
      m.charge(64);  // the entry in storages_
      it = storages_.emplace(key, v).first;
    }
    return it->second;
  }

 private:
  // What calling or instantiating `callable` would have made, without doing it.
  static PickleRef opaque(PickleMachine& m, const PickleValue& callable) {
    const PickleRef v = m.make(Kind::Opaque);
    if (callable.kind == Kind::Global || callable.kind == Kind::Opaque) {
      PickleMachine::share_text(*v, callable);
    } else {
      m.keep_text(*v, "an object");
    }
    return v;
  }

  // A tensor of a dtype tensormap does not store: skipped, and said so.
  static PickleRef unstored(PickleMachine& m, std::string_view what, std::string_view of) {
    const PickleRef v = m.make(Kind::Opaque);
    m.keep_text(*v, std::string(what).append(of));
    v->unstored_tensor = true;
    return v;
  }

  static std::vector<int64_t> ints(PickleMachine& m, const PickleValue& v, const char* what) {
    if (v.kind != Kind::Tuple) m.fail(std::string(what) + " is not a tuple");
    std::vector<int64_t> out;
    out.reserve(v.items().size());
    for (const PickleRef item : v.items()) {
      if (item->kind != Kind::Int || item->integer < 0) {
        m.fail(std::string(what) + " holds a value that is not a non-negative integer");
      }
      out.push_back(item->integer);
    }
    return out;
  }

  // The tensor over `storage` that _rebuild_tensor_v2/v3 describe, checked to lie inside
  // it: the last element it reaches, offset + sum((size - 1) * stride), must be inside.
  static PickleRef tensor(PickleMachine& m, const PickleValue& storage, const PickleValue& offset,
                          const PickleValue& size, const PickleValue& stride, Dtype dtype) {
    if (offset.kind != Kind::Int || offset.integer < 0) m.fail("a tensor with a bad storage offset");
    if (size.kind != Kind::Tuple || stride.kind != Kind::Tuple) m.fail("a tensor's size or stride is not a tuple");
    if (size.items().size() != stride.items().size()) m.fail("a tensor whose size and stride differ in length");
    if (size.items().size() > 64) m.fail("a tensor of rank " + std::to_string(size.items().size()));
    const PickleRef v = m.make(Kind::Tensor);
    TensorDescription* t = &m.make_tensor(*v, size.items().size(), storage.text().size());
    t->key = storage.text();
    t->dtype = dtype;
    t->offset = static_cast<uint64_t>(offset.integer);
    t->sizes = ints(m, size, "a tensor's size");
    t->strides = ints(m, stride, "a tensor's stride");
    const std::vector<uint64_t> shape(t->sizes.begin(), t->sizes.end());
    const auto bytes = format::tensor_byte_length(shape.data(), static_cast<unsigned>(shape.size()), dtype_size(dtype));
    if (!bytes) m.fail("a tensor of " + std::to_string(shape.size()) + " dimensions too large to address");
    if (*bytes > 0) {
      std::optional<uint64_t> last = t->offset;
      for (size_t d = 0; d < shape.size() && last; ++d) {
        const auto step = checked_mul(shape[d] - 1, static_cast<uint64_t>(t->strides[d]));
        last = step ? checked_add(*last, *step) : std::nullopt;
      }
      const auto end = last ? checked_add(*last, 1) : std::nullopt;
      const auto end_bytes = end ? checked_mul(*end, dtype_size(dtype)) : std::nullopt;
      if (!end_bytes || *end_bytes > storage.storage_bytes) {
        m.fail("a tensor does not fit its storage " + quoted(storage.text()) + " of " +
               std::to_string(storage.storage_bytes) + " bytes");
      }
    }
    return v;
  }

  const StorageCheck& check_;
  std::unordered_map<std::string_view, PickleRef> storages_;  // keys are views of the pickle
};

}  // namespace

std::unique_ptr<PickleDocument> unpickle(const unsigned char* data, size_t size, const StorageCheck& check_storage,
                                         const std::string& path) {
  auto document = std::make_unique<PickleDocument>(size);
  TorchObjects objects(check_storage);
  PickleMachine(*document, objects, data, size, path).run();
  return document;
}

}  // namespace tensormap::detail
