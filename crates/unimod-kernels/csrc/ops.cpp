// Counting the operators a piece of tch code dispatches, as a proxy for the kernels it launches
// on a GPU (where a small model's step costs about as much host time per kernel as the kernel
// itself). libtorch's RecordFunction observers see every dispatched operator, the ones the
// autograd engine runs for the backward pass included. An operator is counted when it is not one
// that only makes a view or allocates (no kernel on any device) and calls no other operator but
// those (composite operators such as `linear` launch nothing themselves). No CUDA header needed.
#include <ATen/record_function.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "guarded.h"

namespace {

std::atomic<bool> counting{false};
std::atomic<int64_t> leaves{0};
std::atomic<int64_t> all_ops{0};
at::CallbackHandle handle = 0;

// Per thread: for each operator being run, whether it has called another.
thread_local std::vector<bool> open_ops;

// UNIMOD_OPS_TRACE=1 prints each counted operator to stderr (which ones a step launches).
bool trace = false;

// Operators that launch no kernel: views, metadata and allocations without a fill.
bool launches_nothing(std::string_view name) {
  // The autograd engine's record of a backward node: what the node runs is recorded apart.
  if (name.rfind("autograd::", 0) == 0) return true;
  static constexpr std::string_view kNone[] = {
      "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::expand",
      "aten::narrow", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
      "aten::t", "aten::transpose", "aten::permute", "aten::alias", "aten::detach",
      "aten::detach_", "detach", "detach_", "aten::lift_fresh", "aten::_reshape_alias", "aten::reshape",
      "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk",
      "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_strided",
      "aten::empty_like", "aten::contiguous", "aten::to", "aten::flatten", "aten::unflatten",
      "aten::expand_as", "aten::view_as", "aten::numpy_T", "aten::set_", "aten::resize_",
      "aten::_has_compatible_shallow_copy_type", "aten::requires_grad_",
      "aten::retain_grad", "aten::is_nonzero", "aten::result_type"};
  for (auto n : kNone) {
    if (n == name) return true;
  }
  return false;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  // An operator that allocates or views through the dispatcher still computes itself.
  if (!open_ops.empty() && !launches_nothing(fn.name())) open_ops.back() = true;
  open_ops.push_back(false);
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (open_ops.empty()) return;  // began before counting started
  bool had_child = open_ops.back();
  open_ops.pop_back();
  if (!counting.load(std::memory_order_relaxed)) return;
  all_ops.fetch_add(1, std::memory_order_relaxed);
  if (!had_child && !launches_nothing(fn.name())) {
    leaves.fetch_add(1, std::memory_order_relaxed);
    if (trace) std::fprintf(stderr, "op %s\n", fn.name());
  }
}

}  // namespace

extern "C" {

// Starts counting (from zero) on every thread. Returns 0, or -1 with the message in `err`.
int unimod_ops_begin(char* err, size_t err_len) {
  return unimod::guarded(err, err_len, [&] {
    if (handle == 0) {
      handle = at::addGlobalCallback(
          at::RecordFunctionCallback(on_start, on_end).scopes({at::RecordScope::FUNCTION}));
    }
    const char* t = std::getenv("UNIMOD_OPS_TRACE");
    trace = t != nullptr && std::strcmp(t, "1") == 0;
    leaves = 0;
    all_ops = 0;
    counting = true;
  });
}

// Stops counting and removes the observer; `*kernels`: leaf operators that compute, `*ops`:
// every operator dispatched.
void unimod_ops_end(int64_t* kernels, int64_t* ops) {
  counting = false;
  if (handle != 0) {
    at::removeCallback(handle);
    handle = 0;
  }
  *kernels = leaves.load();
  *ops = all_ops.load();
}

}  // extern "C"
