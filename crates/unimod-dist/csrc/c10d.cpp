// The small C ABI UniMoD-rs needs from libtorch beyond tch's: c10d's TCPStore (rendezvous and
// the CPU collective), NCCL's all-reduce and broadcast, and the TF32 switches.
//
// NCCL is the libnccl.so.2 that libtorch_cuda.so itself links (the torch wheel ships it), found
// in the process with dlsym: no NCCL or CUDA header is needed to build, and a CPU-only libtorch
// builds the same shim (its NCCL calls then say NCCL is not loaded). libtorch's own
// ProcessGroupNCCL is not used because its headers include the CUDA toolkit's (CCCL, nvcc's
// crt/), which the wheel does not ship.
// Compiled against the same libtorch as tch, as torch-sys compiles its own wrapper. No C++
// exception crosses the boundary: every entry point catches and returns the message (the shared
// crates/unimod-kernels/csrc/guarded.h).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <dlfcn.h>

#include "guarded.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Store = c10::intrusive_ptr<c10d::Store>;

using unimod::fail;
using unimod::guarded;

}  // namespace

extern "C" {

int unimod_store_new(const char* host, uint16_t port, bool is_server, int world,
                     int64_t timeout_ms, void** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    opts.numWorkers = static_cast<size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    Store s = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new Store(std::move(s));
  });
}

void unimod_store_free(void* store) { delete static_cast<Store*>(store); }

int unimod_store_set(void* store, const char* key, const uint8_t* data, size_t len, char* err,
                     size_t err_len) {
  return guarded(err, err_len, [&] {
    (*static_cast<Store*>(store))->set(key, std::vector<uint8_t>(data, data + len));
  });
}

// Blocks until `key` exists (up to the store's timeout). The value is malloc'ed: free it with
// `unimod_bytes_free`.
int unimod_store_get(void* store, const char* key, uint8_t** data, size_t* len, char* err,
                     size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<uint8_t> v = (*static_cast<Store*>(store))->get(key);
    *len = v.size();
    *data = static_cast<uint8_t*>(std::malloc(v.size() > 0 ? v.size() : 1));
    std::memcpy(*data, v.data(), v.size());
  });
}

void unimod_bytes_free(uint8_t* data) { std::free(data); }

int unimod_store_add(void* store, const char* key, int64_t delta, int64_t* out, char* err,
                     size_t err_len) {
  return guarded(err, err_len,
                 [&] { *out = (*static_cast<Store*>(store))->add(key, delta); });
}

int unimod_store_delete(void* store, const char* key, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { (*static_cast<Store*>(store))->deleteKey(key); });
}

// TF32 for f32 matmuls (cuBLAS) and convolutions (cuDNN) on Ampere and newer GPUs; no effect
// on the CPU.
void unimod_set_tf32(bool on) {
  at::globalContext().setAllowTF32CuBLAS(on);
  at::globalContext().setAllowTF32CuDNN(on);
}

bool unimod_tf32() { return at::globalContext().allowTF32CuBLAS(); }

}  // extern "C"

// --- NCCL, resolved in the running process ----------------------------------------------------

namespace {

struct NcclUniqueId {
  char internal[128];
};
using NcclComm = void*;
// ncclDataType_t and ncclRedOp_t values of nccl.h (stable since NCCL 2.10).
enum : int { kNcclFloat16 = 6, kNcclFloat32 = 7, kNcclFloat64 = 8, kNcclBfloat16 = 9 };
enum : int { kNcclSum = 0 };

struct NcclApi {
  int (*get_unique_id)(NcclUniqueId*);
  int (*comm_init_rank)(NcclComm*, int, NcclUniqueId, int);
  int (*comm_destroy)(NcclComm);
  int (*all_reduce)(const void*, void*, size_t, int, int, NcclComm, void*);
  int (*broadcast)(const void*, void*, size_t, int, int, NcclComm, void*);
  const char* (*error_string)(int);
  int (*cuda_set_device)(int);
};

// Every symbol, or nullptr when one is missing (a CPU-only libtorch).
const NcclApi* nccl_api() {
  static const NcclApi* api = [] () -> const NcclApi* {
    static NcclApi a;
    auto sym = [](const char* name) { return dlsym(RTLD_DEFAULT, name); };
    a.get_unique_id = reinterpret_cast<decltype(a.get_unique_id)>(sym("ncclGetUniqueId"));
    a.comm_init_rank = reinterpret_cast<decltype(a.comm_init_rank)>(sym("ncclCommInitRank"));
    a.comm_destroy = reinterpret_cast<decltype(a.comm_destroy)>(sym("ncclCommDestroy"));
    a.all_reduce = reinterpret_cast<decltype(a.all_reduce)>(sym("ncclAllReduce"));
    a.broadcast = reinterpret_cast<decltype(a.broadcast)>(sym("ncclBroadcast"));
    a.error_string = reinterpret_cast<decltype(a.error_string)>(sym("ncclGetErrorString"));
    a.cuda_set_device = reinterpret_cast<decltype(a.cuda_set_device)>(sym("cudaSetDevice"));
    bool all = a.get_unique_id && a.comm_init_rank && a.comm_destroy && a.all_reduce &&
               a.broadcast && a.error_string && a.cuda_set_device;
    return all ? &a : nullptr;
  }();
  return api;
}

const NcclApi& need_nccl() {
  const NcclApi* api = nccl_api();
  if (!api) {
    throw std::runtime_error(
        "NCCL is not loaded in this process: it comes with a CUDA build of libtorch "
        "(libtorch_cuda.so links libnccl.so.2)");
  }
  return *api;
}

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string(what) + ": " + need_nccl().error_string(code));
  }
}

int nccl_type(const at::Tensor& t) {
  if (!t.is_cuda() || !t.is_contiguous()) {
    throw std::runtime_error("NCCL takes contiguous CUDA tensors");
  }
  switch (t.scalar_type()) {
    case at::kFloat: return kNcclFloat32;
    case at::kDouble: return kNcclFloat64;
    case at::kHalf: return kNcclFloat16;
    case at::kBFloat16: return kNcclBfloat16;
    default: throw std::runtime_error("NCCL sums f16, bf16, f32 or f64 tensors here");
  }
}

}  // namespace

extern "C" {

bool unimod_nccl_loaded() { return nccl_api() != nullptr; }

int unimod_nccl_unique_id(uint8_t* out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    NcclUniqueId id;
    check(need_nccl().get_unique_id(&id), "ncclGetUniqueId");
    std::memcpy(out, id.internal, sizeof(id.internal));
  });
}

// A communicator for `rank` of `world` on CUDA device `device` (made current for this thread).
int unimod_nccl_init(int device, int world, const uint8_t* id, int rank, void** out, char* err,
                     size_t err_len) {
  return guarded(err, err_len, [&] {
    const NcclApi& api = need_nccl();
    if (api.cuda_set_device(device) != 0) {
      throw std::runtime_error("cudaSetDevice(" + std::to_string(device) + ") failed");
    }
    NcclUniqueId uid;
    std::memcpy(uid.internal, id, sizeof(uid.internal));
    NcclComm comm = nullptr;
    check(api.comm_init_rank(&comm, world, uid, rank), "ncclCommInitRank");
    *out = comm;
  });
}

void unimod_nccl_free(void* comm) {
  if (const NcclApi* api = nccl_api()) api->comm_destroy(comm);
}

// In-place sum over the ranks of `tensor` (a tch `C_tensor`: `at::Tensor*`), enqueued on the
// legacy default stream, where libtorch's own kernels run unless a stream is set: it follows
// the backward that produced the tensor and precedes whatever reads it.
int unimod_nccl_all_reduce(void* comm, void* tensor, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    int type = nccl_type(t);
    check(need_nccl().all_reduce(t.data_ptr(), t.data_ptr(), t.numel(), type, kNcclSum, comm,
                                 nullptr),
          "ncclAllReduce");
  });
}

int unimod_nccl_broadcast(void* comm, void* tensor, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    int type = nccl_type(t);
    check(need_nccl().broadcast(t.data_ptr(), t.data_ptr(), t.numel(), type, root, comm, nullptr),
          "ncclBroadcast");
  });
}

}  // extern "C"
