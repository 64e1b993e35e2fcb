// CUDA graphs from Rust: libtorch's at::cuda::CUDAGraph, capturing whatever tch queues on the
// capture stream while a Rust callback runs, and a side stream for the warm-up that capture
// needs (lazy initialisation of cuBLAS handles and autograd's streams must not happen inside
// it). PyTorch's torch.cuda.graph does the same steps.
//
// CUDAGraph.h includes the CUDA runtime headers and, through them, nvcc's crt/ and CCCL's nv/:
// `cargo xtask setup` installs those two header packages next to the wheel's own CUDA headers.
// Where they are absent (a CPU libtorch, a machine without setup) build.rs leaves
// UNIMOD_CUDA_GRAPHS undefined and every entry point says the shim was built without them.
// No C++ exception crosses the boundary (guarded.h).
#include <memory>

#include "guarded.h"

#ifdef UNIMOD_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using unimod::fail;
using unimod::guarded;

constexpr const char* kNotBuilt = "unimod-kernels was built without CUDA graphs";

}  // namespace

extern "C" {

// A callback into Rust: returns 0, or nonzero when the work failed (Rust keeps the message).
typedef int (*unimod_work)(void* ctx);

int unimod_cuda_graphs_built() {
#ifdef UNIMOD_CUDA_GRAPHS
  return 1;
#else
  return 0;
#endif
}

#ifdef UNIMOD_CUDA_GRAPHS

}  // extern "C"

namespace {

// Makes `device` and a fresh side stream of it current until destroyed. Built from libc10_cuda's
// out-of-line functions only: c10's CUDAGuard and CUDAEvent call the CUDA runtime inline, and
// the runtime (libcudart.so.13) is a library the binaries could not find on their own, while
// libc10_cuda sits beside libtorch.
struct SideStream {
  c10::DeviceIndex previous_device;
  c10::cuda::CUDAStream previous_stream;

  explicit SideStream(int device)
      : previous_device(c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(device))),
        previous_stream(c10::cuda::getCurrentCUDAStream()) {
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool());
  }
  ~SideStream() {
    c10::cuda::setCurrentCUDAStream(previous_stream);
    c10::cuda::ExchangeDevice(previous_device);
  }
};

}  // namespace

extern "C" {

// Runs `work` with a side stream of `device` current. The device is synchronised before and
// after (instead of cross-stream events, see SideStream): it orders the work after what was
// queued before and before what is queued after, at a cost only warm-ups pay.
int unimod_cuda_on_side_stream(int device, unimod_work work, void* ctx, int* work_status,
                               char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    SideStream side(device);
    c10::cuda::device_synchronize();
    *work_status = work(ctx);
    c10::cuda::device_synchronize();
  });
}

// Captures what `work` queues on `device` into a new graph (`*out`). The capture always ends,
// also when `work` fails (`*work_status` nonzero) or libtorch throws, so the device stays usable;
// then no graph is returned.
int unimod_cuda_graph_capture(int device, unimod_work work, void* ctx, int* work_status,
                              void** out, char* err, size_t err_len) {
  *out = nullptr;
  return guarded(err, err_len, [&] {
    // As torch.cuda.graph: capture on a side stream, after everything queued so far.
    SideStream side(device);
    c10::cuda::device_synchronize();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    graph->capture_begin();
    try {
      *work_status = work(ctx);
    } catch (...) {
      try {
        graph->capture_end();
      } catch (...) {
      }
      throw;
    }
    graph->capture_end();
    if (*work_status == 0) {
      *out = graph.release();
    }
  });
}

int unimod_cuda_graph_replay(void* graph, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<at::cuda::CUDAGraph*>(graph)->replay(); });
}

void unimod_cuda_graph_free(void* graph) {
  try {
    delete static_cast<at::cuda::CUDAGraph*>(graph);
  } catch (...) {
  }
}

#else

int unimod_cuda_on_side_stream(int, unimod_work, void*, int*, char* err, size_t err_len) {
  return fail(kNotBuilt, err, err_len);
}

int unimod_cuda_graph_capture(int, unimod_work, void*, int*, void** out, char* err,
                              size_t err_len) {
  *out = nullptr;
  return fail(kNotBuilt, err, err_len);
}

int unimod_cuda_graph_replay(void*, char* err, size_t err_len) {
  return fail(kNotBuilt, err, err_len);
}

void unimod_cuda_graph_free(void*) {}

#endif

}  // extern "C"
