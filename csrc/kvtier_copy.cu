// kvtier page-copy kernel: many (src, dst, nbytes) segments in ONE launch.
//
// Build (plain nvcc, no torch headers): `python -m kvtier.copy.build`, which runs
//   nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -cudart static
//        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 ...
//        -o libkvtier_copy.so csrc/kvtier_copy.cu
//
// Work split: one warp per segment, warps grid-strided over the segment table. The planner
// (kvtier/copy/layout.py) cuts large pages into chunks, so a 2 MiB page is spread over many warps
// of many blocks, and thousands of tiny pages cost one warp each, not one DMA each. A segment of
// any size is still copied correctly by its warp (just more slowly) if it was not cut.
//
// Vector width per segment: 16-byte loads/stores when src and dst have the same address mod 16,
// else 8, 4, 2 bytes, else bytes; the head up to the first aligned destination address and the
// tail are copied byte by byte. Each lane keeps kUnroll independent loads in flight before storing,
// which matters when the source is host memory read over PCIe/C2C.
//
// Addresses are unified (UVA) addresses: device memory, or host memory registered with
// kvtier_host_register (mapped), whose device address the caller passes.

#include <cuda_runtime.h>

#include <stdint.h>
#include <string.h>

#include "kvtier_copy.h"

namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kMaxDevices = 64;

// Streaming (evict-first) loads and stores: every byte is touched once.
template <typename V>
__device__ __forceinline__ V load_stream(const V* p) {
  return __ldcs(p);
}
template <typename V>
__device__ __forceinline__ void store_stream(V* p, V v) {
  __stcs(p, v);
}

// Copy n bytes, one lane per byte, kUnroll loads in flight per lane.
__device__ __forceinline__ void copy_bytes(const uint8_t* __restrict__ src,
                                           uint8_t* __restrict__ dst, uint64_t n, int lane) {
  uint64_t i = lane;
  for (; i + (kUnroll - 1) * 32 < n; i += kUnroll * 32) {
    uint8_t r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = src[i + u * 32];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * 32] = r[u];
  }
  for (; i < n; i += 32) dst[i] = src[i];
}

// Copy n bytes as elements of V; src and dst are aligned to sizeof(V) and n is a multiple of it.
template <typename V>
__device__ __forceinline__ void copy_vectors(const uint8_t* __restrict__ src,
                                             uint8_t* __restrict__ dst, uint64_t n, int lane) {
  const V* __restrict__ s = reinterpret_cast<const V*>(src);
  V* __restrict__ d = reinterpret_cast<V*>(dst);
  const uint64_t count = n / sizeof(V);
  uint64_t i = lane;
  for (; i + (kUnroll - 1) * 32 < count; i += kUnroll * 32) {
    V r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = load_stream(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_stream(d + i + u * 32, r[u]);
  }
  for (; i < count; i += 32) store_stream(d + i, load_stream(s + i));
}

// Bytes up to the first sizeof(V)-aligned destination, vectors, then the tail bytes.
// Requires (src - dst) % sizeof(V) == 0, so aligning dst aligns src too.
template <typename V>
__device__ __forceinline__ void copy_aligned(const uint8_t* src, uint8_t* dst, uint64_t n,
                                             int lane) {
  constexpr uint64_t kAlign = sizeof(V);
  uint64_t head = (kAlign - (reinterpret_cast<uintptr_t>(dst) & (kAlign - 1))) & (kAlign - 1);
  if (head > n) head = n;
  copy_bytes(src, dst, head, lane);
  src += head;
  dst += head;
  n -= head;
  const uint64_t body = n & ~(kAlign - 1);
  copy_vectors<V>(src, dst, body, lane);
  copy_bytes(src + body, dst + body, n - body, lane);
}

__device__ __forceinline__ void copy_segment(const uint8_t* src, uint8_t* dst, uint64_t n,
                                             int lane) {
  const uintptr_t skew = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
  if ((skew & 15) == 0) {
    copy_aligned<uint4>(src, dst, n, lane);
  } else if ((skew & 7) == 0) {
    copy_aligned<uint2>(src, dst, n, lane);
  } else if ((skew & 3) == 0) {
    copy_aligned<unsigned int>(src, dst, n, lane);
  } else if ((skew & 1) == 0) {
    copy_aligned<unsigned short>(src, dst, n, lane);
  } else {
    copy_bytes(src, dst, n, lane);
  }
}

__global__ void __launch_bounds__(kThreads)
    kvtier_copy_kernel(const kvtier_segment* __restrict__ segments, int64_t count) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;
  for (int64_t i = warp; i < count; i += num_warps) {
    const kvtier_segment seg = segments[i];
    copy_segment(reinterpret_cast<const uint8_t*>(seg.src), reinterpret_cast<uint8_t*>(seg.dst),
                 seg.nbytes, lane);
  }
}

// Resident blocks per device (SMs x occupancy), computed once per device.
int g_max_blocks[kMaxDevices] = {0};

cudaError_t max_resident_blocks(int device, int* out) {
  if (device >= 0 && device < kMaxDevices && g_max_blocks[device] > 0) {
    *out = g_max_blocks[device];
    return cudaSuccess;
  }
  int sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kvtier_copy_kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) per_sm = 1;
  const int blocks = sms * per_sm;
  if (device >= 0 && device < kMaxDevices) g_max_blocks[device] = blocks;  // benign race
  *out = blocks;
  return cudaSuccess;
}

// Clears the runtime's last-error slot (so a later call does not report this error again), returns err.
int fail(cudaError_t err) {
  (void)cudaGetLastError();
  return static_cast<int>(err);
}

cudaError_t memcpy_loop(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                        int64_t count, cudaStream_t stream) {
  for (int64_t i = 0; i < count; ++i) {
    if (sizes[i] == 0) continue;
    cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(dsts[i]),
                                      reinterpret_cast<const void*>(srcs[i]), sizes[i],
                                      cudaMemcpyDefault, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Device address of page-locked host memory at p (false if p is not page-locked host memory).
bool device_address(uint8_t* p, uint8_t** out) {
  cudaPointerAttributes attr;
  memset(&attr, 0, sizeof(attr));
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess || attr.type != cudaMemoryTypeHost) {
    (void)cudaGetLastError();
    return false;
  }
  void* d = attr.devicePointer;
  if (d == nullptr && cudaHostGetDevicePointer(&d, p, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  *out = static_cast<uint8_t*>(d);
  return true;
}

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
#define KVTIER_HAVE_MEMCPY_BATCH 1
cudaError_t memcpy_batch(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                         int64_t count, cudaStream_t stream) {
  static_assert(sizeof(void*) == sizeof(uint64_t), "64-bit addresses expected");
  cudaMemcpyAttributes attr;
  memset(&attr, 0, sizeof(attr));
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t attr_index = 0;
  void* const* d = reinterpret_cast<void* const*>(dsts);
  const void* const* s = reinterpret_cast<const void* const*>(srcs);
  size_t* n = const_cast<size_t*>(reinterpret_cast<const size_t*>(sizes));
#if CUDART_VERSION >= 13000
  return cudaMemcpyBatchAsync(d, s, n, static_cast<size_t>(count), &attr, &attr_index, 1, stream);
#else
  size_t fail_index = 0;
  return cudaMemcpyBatchAsync(const_cast<void**>(d), const_cast<void**>(s), n,
                              static_cast<size_t>(count), &attr, &attr_index, 1, &fail_index,
                              stream);
#endif
}
#else
#define KVTIER_HAVE_MEMCPY_BATCH 0
#endif

}  // namespace

extern "C" {

int kvtier_copy_abi_version(void) { return KVTIER_COPY_ABI_VERSION; }

const char* kvtier_error_string(int code) {
  const char* s = cudaGetErrorString(static_cast<cudaError_t>(code));
  return s != nullptr ? s : "unknown CUDA error";
}

int kvtier_device_count(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    return fail(err);
  }
  return 0;
}

int kvtier_copy_segments(const kvtier_segment* segments, int64_t count, int device,
                         void* stream) {
  if (count <= 0) return 0;
  if (segments == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return fail(err);
  int max_blocks = 0;
  err = max_resident_blocks(device, &max_blocks);
  if (err != cudaSuccess) return fail(err);
  const int64_t wanted = (count + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned int blocks =
      static_cast<unsigned int>(wanted < max_blocks ? wanted : static_cast<int64_t>(max_blocks));
  kvtier_copy_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(segments,
                                                                                      count);
  err = cudaGetLastError();
  return err == cudaSuccess ? 0 : static_cast<int>(err);
}

int kvtier_memcpy_batch_compiled(void) { return KVTIER_HAVE_MEMCPY_BATCH; }

int kvtier_memcpy_ranges(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                         int64_t count, int device, void* stream, int mode, int* used_mode) {
  if (used_mode != nullptr) *used_mode = 0;
  if (count <= 0) return 0;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return fail(err);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
#if KVTIER_HAVE_MEMCPY_BATCH
  if (mode == 1) {
    err = memcpy_batch(dsts, srcs, sizes, count, s);
    if (err == cudaSuccess) {
      if (used_mode != nullptr) *used_mode = 1;
      return 0;
    }
    // Old driver, or the legacy default stream (which the batch API refuses): use the loop.
    if (err != cudaErrorNotSupported && err != cudaErrorCallRequiresNewerDriver &&
        !(err == cudaErrorInvalidValue && s == nullptr)) {
      return fail(err);
    }
    (void)cudaGetLastError();
  }
#else
  (void)mode;
#endif
  err = memcpy_loop(dsts, srcs, sizes, count, s);
  return err == cudaSuccess ? 0 : fail(err);
}

int kvtier_host_register(void* ptr, uint64_t nbytes, int device, uint64_t* device_ptr,
                         int* newly_registered) {
  *device_ptr = 0;
  *newly_registered = 0;
  if (ptr == nullptr || nbytes == 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return fail(err);
  uint8_t* first = static_cast<uint8_t*>(ptr);
  uint8_t* last = first + (nbytes - 1);

  uint8_t* d_first = nullptr;
  uint8_t* d_last = nullptr;
  const bool pinned = device_address(first, &d_first) && device_address(last, &d_last);
  if (!pinned) {
    err = cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (err != cudaSuccess) return fail(err);  // e.g. part of the range is registered already
    *newly_registered = 1;
    if (!device_address(first, &d_first) || !device_address(last, &d_last)) {
      (void)cudaHostUnregister(ptr);
      *newly_registered = 0;
      return fail(cudaErrorInvalidValue);
    }
  }
  if (d_last != d_first + (nbytes - 1)) {
    // Already page-locked, but as pieces that do not map to one contiguous device range.
    if (*newly_registered) (void)cudaHostUnregister(ptr);
    *newly_registered = 0;
    return fail(cudaErrorHostMemoryAlreadyRegistered);
  }
  *device_ptr = reinterpret_cast<uint64_t>(d_first);
  return 0;
}

int kvtier_host_unregister(void* ptr) {
  cudaError_t err = cudaHostUnregister(ptr);
  return err == cudaSuccess ? 0 : fail(err);
}

}  // extern "C"
