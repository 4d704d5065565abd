/*
 * kvtier page-copy library: C ABI (loaded from Python with ctypes, see kvtier/copy/_lib.py).
 *
 * Every function returns a cudaError_t as an int (0 = success); kvtier_error_string() turns a
 * code into text. No function blocks on the device except kvtier_host_unregister (which the CUDA
 * driver itself serialises). All copies are stream ordered on the stream passed in.
 *
 * Segment model: a copy is a table of segments {src, dst, nbytes}; every address is a
 * device-accessible (unified) address: device memory, or host memory registered with
 * kvtier_host_register (its *device* address). Segments of one launch must not overlap each
 * other's destination; any alignment and any size (including 0) are accepted.
 */
#ifndef KVTIER_COPY_H_
#define KVTIER_COPY_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or the segment struct changes; Python refuses a stale library. */
#define KVTIER_COPY_ABI_VERSION 1

/* One contiguous byte range to copy. 24 bytes, laid out as three little-endian uint64. */
typedef struct kvtier_segment {
  uint64_t src;    /* device-accessible source address */
  uint64_t dst;    /* device-accessible destination address */
  uint64_t nbytes; /* bytes to copy */
} kvtier_segment;

/* KVTIER_COPY_ABI_VERSION of the compiled library. */
int kvtier_copy_abi_version(void);

/* Text of a cudaError_t code (static string, never NULL). */
const char* kvtier_error_string(int code);

/* Number of CUDA devices in *count (0 and an error code when no driver / no device). */
int kvtier_device_count(int* count);

/*
 * Copy `count` segments in ONE kernel launch on `stream` (a cudaStream_t; 0 = legacy default).
 * `segments` must be device-accessible (device memory, or mapped host memory) and stay valid until
 * the kernel has run. One warp copies one segment: cut large pages into pieces of a few KiB to
 * 64 KiB (multiples of 16, as kvtier/copy/layout.py does) so that they spread over many warps.
 * Returns the launch error, if any; execution errors surface on the stream.
 */
int kvtier_copy_segments(const kvtier_segment* segments, int64_t count, int device, void* stream);

/*
 * Baselines for the benchmark: copy `count` byte ranges with the copy engines.
 * `dsts`, `srcs`, `sizes` are HOST arrays. mode 0: one cudaMemcpyAsync per range; mode 1:
 * cudaMemcpyBatchAsync when the toolkit and driver have it (else falls back to mode 0).
 * *used_mode (may be NULL) receives the mode actually used.
 */
int kvtier_memcpy_ranges(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                         int64_t count, int device, void* stream, int mode, int* used_mode);

/* 1 when this library was compiled with cudaMemcpyBatchAsync, else 0. */
int kvtier_memcpy_batch_compiled(void);

/*
 * Make host memory [ptr, ptr + nbytes) reachable by kernels on every device (page-locked and
 * mapped). Memory that is already page-locked (cudaHostAlloc, torch pin_memory, an earlier
 * registration covering the whole range) is left as is and *newly_registered is set to 0; then
 * the caller must not unregister it. *device_ptr receives the device address of ptr.
 */
int kvtier_host_register(void* ptr, uint64_t nbytes, int device, uint64_t* device_ptr,
                         int* newly_registered);

/* Undo kvtier_host_register for a range it registered (newly_registered == 1). */
int kvtier_host_unregister(void* ptr);

#ifdef __cplusplus
}
#endif

#endif /* KVTIER_COPY_H_ */
