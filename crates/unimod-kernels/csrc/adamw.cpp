// libtorch's fused AdamW (`torch.optim.AdamW(fused=True)`): one pass over each parameter, its
// gradient and moments, where the written-out update launches about sixteen kernels per
// parameter; and the multi-tensor norm that clipping reads. tch does not wrap the multi-tensor
// ops, so this shim does. It needs no CUDA header: it is compiled whatever the libtorch. No C++
// exception crosses the boundary (guarded.h).
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "guarded.h"

namespace {

std::vector<at::Tensor> tensors(void* const* ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*static_cast<at::Tensor*>(ptrs[i]));
  }
  return out;
}

}  // namespace

extern "C" {

// One AdamW update of `n` parameters (tch `C_tensor`s: `at::Tensor*`) at step `*step` (an f32
// scalar tensor on their device, already counting this update); gradients are divided by
// `*grad_scale` first when it is not null. Returns 0, or -1 with the message in `err`.
int unimod_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                       void* const* exp_avg_sqs, size_t n, void* step, double lr, double beta1,
                       double beta2, double weight_decay, double eps, void* grad_scale, char* err,
                       size_t err_len) {
  return unimod::guarded(err, err_len, [&] {
    // Every parameter reads the same step count.
    std::vector<at::Tensor> steps(n, *static_cast<at::Tensor*>(step));
    std::optional<at::Tensor> scale;
    if (grad_scale != nullptr) {
      scale = *static_cast<at::Tensor*>(grad_scale);
    }
    at::_fused_adamw_(tensors(params, n), tensors(grads, n), tensors(exp_avgs, n),
                      tensors(exp_avg_sqs, n), {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, scale, std::nullopt);
  });
}

// The global L2 norm of `n` tensors, as a new f32 scalar tensor (`*out`, a tch `C_tensor` the
// caller owns): one multi-tensor norm, then the norm of the norms (clip_grad_norm_'s way).
int unimod_global_norm(void* const* ts, size_t n, void** out, char* err, size_t err_len) {
  return unimod::guarded(err, err_len, [&] {
    auto norms = at::_foreach_norm(tensors(ts, n), 2, at::kFloat);
    *out = new at::Tensor(at::stack(norms).norm());
  });
}

}  // extern "C"
