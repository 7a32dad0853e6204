// offload.cu: the activation-offload engine (see mlu_cuda_offload.h): pinned
// pool, two copy streams, events ordering them against the caller's stream,
// and the pack/expand kernels of the compressed modes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <mutex>
#include <stdint.h>
#include <string.h>

#include "mlu_cuda_internal.h"
#include "mlu_cuda_offload.h"
extern "C" {
#include "../core/alloc.h"
#include "../core/offload_window.h"
}

namespace {

struct record {
    int64_t block;      // pool id, -1 when the record is free
    size_t nbytes;      // bytes of the tensor
    size_t packed;      // bytes in the host buffer
    int mode;
    int loaded;         // a load was issued
    int released;       // the caller let go; reclaim when the copies are done
    uint32_t gen;       // bumps on every reuse (31 bits), part of the handle
    cudaEvent_t saved;  // after the device-to-host copy (owned)
    cudaEvent_t done;   // after the load (owned)
    int64_t next_free;
};

}  // namespace

struct mlu_cuda_offload {
    int device;
    std::mutex lock;
    mlu_offload_pool *pool;  // owned; buffers from cudaHostAlloc
    cudaStream_t d2h, h2d;   // owned
    cudaEvent_t caller;      // scratch event recorded on the caller's stream (owned)
    record *recs;            // owned
    int64_t nrecs, caprecs, free_rec, live;
    mlu_offload_window window;  // device-to-host copies the caller's stream is not ordered after
};

namespace {

// Selects the engine's device for the scope, restoring the caller's.
struct device_guard {
    int prev = -1;
    cudaError_t rc = cudaSuccess;
    explicit device_guard(int dev)
    {
        rc = cudaGetDevice(&prev);
        if (rc == cudaSuccess && prev != dev)
            rc = cudaSetDevice(dev);
    }
    ~device_guard()
    {
        int cur = -1;
        if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev)
            cudaSetDevice(prev);
    }
};

void *pinned_alloc(void *ctx, size_t n, mlu_error *err)
{
    void *p = nullptr;
    (void)ctx;
    cudaError_t rc = cudaHostAlloc(&p, n, cudaHostAllocDefault);
    if (rc != cudaSuccess) {
        mlu_cuda_status(rc, "cudaHostAlloc of the offload pool", err);
        cudaGetLastError();
        return nullptr;
    }
    return p;
}

void pinned_free(void *ctx, void *p)
{
    (void)ctx;
    cudaFreeHost(p);
}

__device__ __forceinline__ float load_f(const __half *p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f(const __nv_bfloat16 *p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_f(__half *p, long long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16 *p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

__global__ void pack_bf16_kernel(const float *__restrict__ src, __nv_bfloat16 *__restrict__ dst, long long n)
{
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void expand_bf16_kernel(const __nv_bfloat16 *__restrict__ src, float *__restrict__ dst, long long n)
{
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = __bfloat162float(src[i]);
}

// amax over the finite |x| into *amax (zeroed before): non-negative floats
// order as their bits.  Infinities and NaN do not count: they travel as NaN.
template <typename T>
__global__ void amax_kernel(const T *__restrict__ src, long long n, unsigned int *amax)
{
    __shared__ float red[256];
    float m = 0.0f;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = fabsf(load_f(src, i));
        if (v > m && isfinite(v))
            m = v;
    }
    red[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0)
        atomicMax(amax, __float_as_uint(red[0]));
}

__device__ __forceinline__ float e4m3_scale(float amax)
{
    // values are stored as x * scale; scale maps amax to e4m3's largest finite
    // value.  1 when that is not finite (amax 0, or so small that the quotient
    // overflows: an infinite scale would turn every zero into 0 * inf = NaN)
    float scale = (amax > 0.0f && isfinite(amax)) ? MLU_OFFLOAD_E4M3_MAX / amax : 1.0f;
    return isfinite(scale) ? scale : 1.0f;
}

template <typename T>
__global__ void pack_e4m3_kernel(const T *__restrict__ src, __nv_fp8_storage_t *__restrict__ dst,
                                 long long n, const float *__restrict__ amax)
{
    float scale = e4m3_scale(*amax);
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = load_f(src, i);
        // e4m3 has no infinity: an infinity travels as NaN (0x7f), not as the
        // largest finite value saturation would make of it
        dst[i] = isinf(v) ? (__nv_fp8_storage_t)0x7f : __nv_cvt_float_to_fp8(v * scale, __NV_SATFINITE, __NV_E4M3);
    }
}

template <typename T>
__global__ void expand_e4m3_kernel(const __nv_fp8_storage_t *__restrict__ src, T *__restrict__ dst,
                                   long long n, const float *__restrict__ amax)
{
    float inv = 1.0f / e4m3_scale(*amax);
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        __half_raw h = __nv_cvt_fp8_to_halfraw(src[i], __NV_E4M3);
        store_f(dst, i, __half2float(__half(h)) * inv);
    }
}

unsigned grid_for(long long n)
{
    long long blocks = (n + 255) / 256;
    if (blocks > 65535LL * 8)
        blocks = 65535LL * 8;
    return (unsigned)(blocks < 1 ? 1 : blocks);
}

size_t elem_size(int mode)
{
    return mode == MLU_OFFLOAD_F32_BF16 ? 4 : 2;
}

mlu_status check_mode(int mode, size_t nbytes, const void *scratch, mlu_error *err)
{
    if (mode < 0 || mode >= MLU_OFFLOAD_MODES)
        return mlu_error_set(err, MLU_EINVAL, -1, "offload: unknown compression mode %d", mode);
    if (mode == MLU_OFFLOAD_RAW)
        return MLU_OK;
    if (nbytes % elem_size(mode) != 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "offload: %zu bytes is not a whole number of elements", nbytes);
    if (scratch == nullptr)
        return mlu_error_set(err, MLU_EINVAL, -1, "offload: compression needs a scratch buffer");
    if (mlu_offload_packed_size(mode, nbytes / elem_size(mode)) == 0)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "offload: %zu bytes is too large", nbytes);
    return MLU_OK;
}

// The kernels packing src into scratch on stream s.
mlu_status launch_pack(int mode, const void *src, size_t nbytes, void *scratch, cudaStream_t s, mlu_error *err)
{
    long long n = (long long)(nbytes / elem_size(mode));
    unsigned g = grid_for(n);
    char *trailer = (char *)scratch + mlu_offload_e4m3_trailer_at((size_t)n);  // e4m3 only
    float *amax = (float *)(trailer + MLU_OFFLOAD_E4M3_AMAX_AT);
    __nv_fp8_storage_t *q = (__nv_fp8_storage_t *)scratch;
    mlu_status rc;

    if (mode == MLU_OFFLOAD_F32_BF16) {
        pack_bf16_kernel<<<g, 256, 0, s>>>((const float *)src, (__nv_bfloat16 *)scratch, n);
        return mlu_cuda_status(cudaGetLastError(), "offload: bfloat16 pack kernel launch", err);
    }
    rc = mlu_cuda_status(cudaMemsetAsync(trailer, 0, MLU_OFFLOAD_E4M3_TRAILER, s),
                         "offload: cudaMemsetAsync of the amax", err);
    if (rc != MLU_OK)
        return rc;
    if (mode == MLU_OFFLOAD_F16_E4M3) {
        amax_kernel<__half><<<g, 256, 0, s>>>((const __half *)src, n, (unsigned int *)amax);
        pack_e4m3_kernel<__half><<<g, 256, 0, s>>>((const __half *)src, q, n, amax);
    } else {
        amax_kernel<__nv_bfloat16><<<g, 256, 0, s>>>((const __nv_bfloat16 *)src, n, (unsigned int *)amax);
        pack_e4m3_kernel<__nv_bfloat16><<<g, 256, 0, s>>>((const __nv_bfloat16 *)src, q, n, amax);
    }
    return mlu_cuda_status(cudaGetLastError(), "offload: float8 pack kernel launch", err);
}

mlu_status launch_expand(int mode, const void *scratch, void *dst, size_t nbytes, cudaStream_t s, mlu_error *err)
{
    long long n = (long long)(nbytes / elem_size(mode));
    unsigned g = grid_for(n);
    const char *trailer = (const char *)scratch + mlu_offload_e4m3_trailer_at((size_t)n);  // e4m3 only
    const float *amax = (const float *)(trailer + MLU_OFFLOAD_E4M3_AMAX_AT);
    const __nv_fp8_storage_t *q = (const __nv_fp8_storage_t *)scratch;

    if (mode == MLU_OFFLOAD_F32_BF16)
        expand_bf16_kernel<<<g, 256, 0, s>>>((const __nv_bfloat16 *)scratch, (float *)dst, n);
    else if (mode == MLU_OFFLOAD_F16_E4M3)
        expand_e4m3_kernel<__half><<<g, 256, 0, s>>>(q, (__half *)dst, n, amax);
    else
        expand_e4m3_kernel<__nv_bfloat16><<<g, 256, 0, s>>>(q, (__nv_bfloat16 *)dst, n, amax);
    return mlu_cuda_status(cudaGetLastError(), "offload: expand kernel launch", err);
}

int64_t make_handle(int64_t idx, uint32_t gen)
{
    return ((int64_t)gen << 32) | idx;
}

// The live record named by handle, or nullptr with err set.
record *find(mlu_cuda_offload *e, int64_t handle, mlu_error *err)
{
    int64_t idx = handle & 0xffffffffLL;
    uint32_t gen = (uint32_t)((uint64_t)handle >> 32);

    if (handle < 0 || idx >= e->nrecs || e->recs[idx].block < 0 || e->recs[idx].gen != gen ||
        e->recs[idx].released) {
        mlu_error_set(err, MLU_EINVAL, -1, "offload: handle %lld is not live (released or never made)",
                      (long long)handle);
        return nullptr;
    }
    return &e->recs[idx];
}

// One call into the engine: holds its lock and selects its device for the
// scope (restoring the caller's at the end).
struct engine_call {
    std::lock_guard<std::mutex> hold;
    device_guard device;
    explicit engine_call(mlu_cuda_offload *e) : hold(e->lock), device(e->device) {}
    // MLU_OK, or the failure to select the device (into err)
    mlu_status status(mlu_error *err) const
    {
        return mlu_cuda_status(device.rc, "offload: cudaSetDevice", err);
    }
    // The record of a live handle; nullptr with err set when the device could
    // not be selected or the handle is not live.
    record *lookup(mlu_cuda_offload *e, int64_t handle, mlu_error *err) const
    {
        return status(err) == MLU_OK ? find(e, handle, err) : nullptr;
    }
};

// Returns the record's buffer to the pool when its copies are done (or
// always, after waiting, when `block` is set).
mlu_status reclaim(mlu_cuda_offload *e, int64_t idx, int block, int *freed, mlu_error *err)
{
    record *r = &e->recs[idx];
    cudaEvent_t evs[2] = {r->saved, r->loaded ? r->done : nullptr};
    mlu_status rc = MLU_OK;

    *freed = 0;
    for (int k = 0; k < 2; k++) {
        cudaError_t q;
        if (evs[k] == nullptr)
            continue;
        q = block ? cudaEventSynchronize(evs[k]) : cudaEventQuery(evs[k]);
        if (q == cudaErrorNotReady)
            return MLU_OK;
        if (q != cudaSuccess)
            return mlu_cuda_status(q, "offload: waiting for a copy", err);
    }
    rc = mlu_offload_pool_release(e->pool, r->block, err);
    if (rc != MLU_OK)
        return rc;
    r->block = -1;
    r->released = 0;
    r->next_free = e->free_rec;
    e->free_rec = idx;
    e->live--;
    *freed = 1;
    return MLU_OK;
}

mlu_status sweep(mlu_cuda_offload *e, int block, mlu_error *err)
{
    for (int64_t i = 0; i < e->nrecs; i++) {
        int freed;
        if (e->recs[i].block >= 0 && e->recs[i].released) {
            mlu_status rc = reclaim(e, i, block, &freed, err);
            if (rc != MLU_OK)
                return rc;
        }
    }
    return MLU_OK;
}

int64_t take_record(mlu_cuda_offload *e, mlu_error *err)
{
    if (e->free_rec >= 0) {
        int64_t i = e->free_rec;
        e->free_rec = e->recs[i].next_free;
        return i;
    }
    if (e->nrecs == e->caprecs) {
        size_t cap = (size_t)e->caprecs;  /* handle indices fit 31 bits */
        if (mlu_grow((void **)&e->recs, &cap, cap + 1, sizeof(record), 0x7fffffff, "the offload handle table",
                     err) != MLU_OK)
            return -1;
        e->caprecs = (int64_t)cap;
    }
    record *r = &e->recs[e->nrecs];
    memset(r, 0, sizeof(*r));
    r->block = -1;
    if (mlu_cuda_status(cudaEventCreateWithFlags(&r->saved, cudaEventDisableTiming),
                        "offload: cudaEventCreate", err) != MLU_OK)
        return -1;
    if (mlu_cuda_status(cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming),
                        "offload: cudaEventCreate", err) != MLU_OK) {
        cudaEventDestroy(r->saved);
        return -1;
    }
    return e->nrecs++;
}

// The live record named by handle, or nullptr (no error: a gone handle's copies are done).
record *find_quiet(mlu_cuda_offload *e, int64_t handle)
{
    int64_t idx = handle & 0xffffffffLL;
    uint32_t gen = (uint32_t)((uint64_t)handle >> 32);

    if (handle < 0 || idx >= e->nrecs || e->recs[idx].block < 0 || e->recs[idx].gen != gen)
        return nullptr;
    return &e->recs[idx];
}

struct window_ctx {
    mlu_cuda_offload *e;
};

// The window's callbacks: a copy is finished when its `saved` event is (or
// its record is gone: records are reclaimed only after their copies finish).
int window_finished(void *ctx, int64_t handle, mlu_error *err)
{
    record *r = find_quiet(((window_ctx *)ctx)->e, handle);
    cudaError_t q;

    if (r == nullptr)
        return 1;
    q = cudaEventQuery(r->saved);
    if (q == cudaSuccess)
        return 1;
    if (q == cudaErrorNotReady)
        return 0;
    mlu_cuda_status(q, "offload: querying a copy", err);
    return -1;
}

mlu_status window_wait(void *ctx, int64_t handle, mlu_error *err)
{
    record *r = find_quiet(((window_ctx *)ctx)->e, handle);

    if (r == nullptr)
        return MLU_OK;
    return mlu_cuda_status(cudaEventSynchronize(r->saved), "offload: waiting for a copy (the copy window is full)",
                           err);
}

}  // namespace

extern "C" mlu_status mlu_cuda_offload_new(int device, size_t cap, mlu_cuda_offload **out, mlu_error *err)
{
    mlu_status rc = MLU_ENOMEM;
    mlu_cuda_offload *e = nullptr;
    mlu_pool_allocator a = {pinned_alloc, pinned_free, nullptr, "pinned host memory"};
    int count = 0;

    rc = mlu_cuda_status(cudaGetDeviceCount(&count), "offload: cudaGetDeviceCount", err);
    if (rc != MLU_OK)
        goto error;
    if (device < 0 || device >= count) {
        rc = mlu_error_set(err, MLU_EINVAL, -1, "offload: no CUDA device %d (%d present)", device, count);
        goto error;
    }
    e = new (std::nothrow) mlu_cuda_offload();
    if (e == nullptr) {
        rc = mlu_error_set(err, MLU_ENOMEM, -1, "offload: out of memory");
        goto error;
    }
    e->device = device;
    e->free_rec = -1;
    mlu_offload_window_init(&e->window, MLU_OFFLOAD_DEFAULT_WINDOW);
    {
        device_guard g(device);
        rc = mlu_cuda_status(g.rc, "offload: cudaSetDevice", err);
        if (rc != MLU_OK)
            goto error;
        rc = mlu_offload_pool_new(&a, cap, &e->pool, err);
        if (rc != MLU_OK)
            goto error;
        rc = mlu_cuda_status(cudaStreamCreateWithFlags(&e->d2h, cudaStreamNonBlocking),
                             "offload: cudaStreamCreate", err);
        if (rc != MLU_OK)
            goto error;
        rc = mlu_cuda_status(cudaStreamCreateWithFlags(&e->h2d, cudaStreamNonBlocking),
                             "offload: cudaStreamCreate", err);
        if (rc != MLU_OK)
            goto error;
        rc = mlu_cuda_status(cudaEventCreateWithFlags(&e->caller, cudaEventDisableTiming),
                             "offload: cudaEventCreate", err);
        if (rc != MLU_OK)
            goto error;
    }
    *out = e;
    return MLU_OK;
error:
    mlu_cuda_offload_destroy(e);
    return rc;
}

extern "C" void mlu_cuda_offload_destroy(mlu_cuda_offload *e)
{
    if (e == nullptr)
        return;
    {
        device_guard g(e->device);
        if (e->d2h)
            cudaStreamSynchronize(e->d2h);
        if (e->h2d)
            cudaStreamSynchronize(e->h2d);
        for (int64_t i = 0; i < e->nrecs; i++) {
            cudaEventDestroy(e->recs[i].saved);
            cudaEventDestroy(e->recs[i].done);
        }
        mlu_free(e->recs);
        mlu_offload_window_free(&e->window);
        mlu_offload_pool_free(e->pool);
        if (e->caller)
            cudaEventDestroy(e->caller);
        if (e->d2h)
            cudaStreamDestroy(e->d2h);
        if (e->h2d)
            cudaStreamDestroy(e->h2d);
        cudaGetLastError();
    }
    delete e;
}

extern "C" mlu_status mlu_cuda_offload_streams(mlu_cuda_offload *e, void **d2h, void **h2d, mlu_error *err)
{
    (void)err;
    *d2h = (void *)e->d2h;
    *h2d = (void *)e->h2d;
    return MLU_OK;
}

extern "C" mlu_status mlu_cuda_offload_save(mlu_cuda_offload *e, const void *src, size_t nbytes, int mode,
                                            void *scratch, void *stream, int64_t *handle, mlu_error *err)
{
    engine_call call(e);
    cudaStream_t s = (cudaStream_t)stream;
    mlu_status rc = MLU_EINVAL;
    size_t packed = nbytes;
    int64_t idx = -1, block = -1;
    void *host = nullptr;
    size_t hsize = 0;
    record *r;

    if ((rc = call.status(err)) != MLU_OK)
        goto done;
    if (nbytes == 0 || src == nullptr) {
        rc = mlu_error_set(err, MLU_EINVAL, -1, "offload: nothing to save (%zu bytes at %p)", nbytes, src);
        goto done;
    }
    if ((rc = check_mode(mode, nbytes, scratch, err)) != MLU_OK)
        goto done;
    if (mode != MLU_OFFLOAD_RAW)
        packed = mlu_offload_packed_size(mode, nbytes / elem_size(mode));
    if ((rc = sweep(e, 0, err)) != MLU_OK)
        goto done;
    rc = mlu_offload_pool_acquire(e->pool, packed, &block, &host, &hsize, err);
    if (rc == MLU_ENOMEM && e->live > 0) {
        // buffers released but still copying may make room: finish them
        mlu_error retry_err;
        mlu_error_clear(&retry_err);
        if (sweep(e, 1, &retry_err) == MLU_OK) {
            mlu_error_clear(err);
            rc = mlu_offload_pool_acquire(e->pool, packed, &block, &host, &hsize, err);
        }
    }
    if (rc != MLU_OK)
        goto done;
    idx = take_record(e, err);
    if (idx < 0) {
        rc = err->code;
        goto error;
    }
    r = &e->recs[idx];
    r->block = block;
    r->nbytes = nbytes;
    r->packed = packed;
    r->mode = mode;
    r->loaded = 0;
    r->released = 0;
    r->gen = (r->gen + 1) & 0x7fffffffu;  // handles stay non-negative
    e->live++;
    block = -1;
    // the copy stream sees every kernel queued on the caller's stream so far;
    // the caller's stream never waits for the copy
    if ((rc = mlu_cuda_status(cudaEventRecord(e->caller, s), "offload: cudaEventRecord", err)) != MLU_OK ||
        (rc = mlu_cuda_status(cudaStreamWaitEvent(e->d2h, e->caller, 0), "offload: cudaStreamWaitEvent", err)) != MLU_OK)
        goto error_rec;
    if (mode != MLU_OFFLOAD_RAW && (rc = launch_pack(mode, src, nbytes, scratch, e->d2h, err)) != MLU_OK)
        goto error_rec;
    rc = mlu_cuda_status(cudaMemcpyAsync(host, mode == MLU_OFFLOAD_RAW ? src : scratch, packed,
                                         cudaMemcpyDeviceToHost, e->d2h),
                         "offload: cudaMemcpyAsync device to host", err);
    if (rc != MLU_OK)
        goto error_rec;
    if ((rc = mlu_cuda_status(cudaEventRecord(r->saved, e->d2h), "offload: cudaEventRecord", err)) != MLU_OK)
        goto error_rec;
    *handle = make_handle(idx, r->gen);
    // the source (and scratch) stay allocated until the copy has read them:
    // keep that backlog within the window (this thread may wait for the
    // oldest copies; the caller's stream never waits)
    {
        window_ctx wc = {e};
        size_t held = nbytes;
        if (mode != MLU_OFFLOAD_RAW && mlu_add_overflow_size(held, packed, &held))
            held = SIZE_MAX;
        mlu_error push_err;
        mlu_error_clear(&push_err);
        if (mlu_offload_window_push(&e->window, *handle, held, &push_err) != MLU_OK)
            // no room to remember it: wait for this copy now (the bound holds)
            rc = window_wait(&wc, *handle, err);
        else
            rc = mlu_offload_window_settle(&e->window, window_finished, window_wait, &wc, err);
        if (rc != MLU_OK) {
            // the copy is queued: its record is reclaimed once it is done
            r->released = 1;
            *handle = -1;
            goto done;
        }
    }
    rc = MLU_OK;
    goto done;
error_rec:
    // wait for whatever was queued on the buffer before handing it back
    cudaStreamSynchronize(e->d2h);
    cudaGetLastError();
    mlu_offload_pool_release(e->pool, r->block, nullptr);
    r->block = -1;
    r->next_free = e->free_rec;
    e->free_rec = idx;
    e->live--;
    goto done;
error:
    if (block >= 0)
        mlu_offload_pool_release(e->pool, block, nullptr);
done:
    return rc;
}

extern "C" mlu_status mlu_cuda_offload_load(mlu_cuda_offload *e, int64_t handle, void *dst, size_t nbytes,
                                            void *scratch, void *stream, mlu_error *err)
{
    engine_call call(e);
    cudaStream_t s = (cudaStream_t)stream;
    mlu_status rc;
    record *r = call.lookup(e, handle, err);
    void *host;

    if (r == nullptr)
        return err->code;
    if (nbytes != r->nbytes || dst == nullptr)
        return mlu_error_set(err, MLU_EINVAL, -1, "offload: load into %zu bytes of a %zu-byte tensor",
                             nbytes, r->nbytes);
    if ((rc = check_mode(r->mode, nbytes, scratch, err)) != MLU_OK)
        return rc;
    host = mlu_offload_pool_ptr(e->pool, r->block, nullptr);
    // after the save's copy, and after the caller's work on dst/scratch so far
    if ((rc = mlu_cuda_status(cudaStreamWaitEvent(e->h2d, r->saved, 0), "offload: cudaStreamWaitEvent", err)) != MLU_OK ||
        (rc = mlu_cuda_status(cudaEventRecord(e->caller, s), "offload: cudaEventRecord", err)) != MLU_OK ||
        (rc = mlu_cuda_status(cudaStreamWaitEvent(e->h2d, e->caller, 0), "offload: cudaStreamWaitEvent", err)) != MLU_OK)
        return rc;
    rc = mlu_cuda_status(cudaMemcpyAsync(r->mode == MLU_OFFLOAD_RAW ? dst : scratch, host, r->packed,
                                         cudaMemcpyHostToDevice, e->h2d),
                         "offload: cudaMemcpyAsync host to device", err);
    if (rc != MLU_OK)
        return rc;
    if (r->mode != MLU_OFFLOAD_RAW && (rc = launch_expand(r->mode, scratch, dst, nbytes, e->h2d, err)) != MLU_OK)
        return rc;
    rc = mlu_cuda_status(cudaEventRecord(r->done, e->h2d), "offload: cudaEventRecord", err);
    if (rc == MLU_OK)
        r->loaded = 1;
    return rc;
}

extern "C" mlu_status mlu_cuda_offload_wait(mlu_cuda_offload *e, int64_t handle, void *stream, mlu_error *err)
{
    engine_call call(e);
    record *r = call.lookup(e, handle, err);

    if (r == nullptr)
        return err->code;
    if (!r->loaded)
        return mlu_error_set(err, MLU_EINVAL, -1, "offload: wait on handle %lld, which was never loaded",
                             (long long)handle);
    return mlu_cuda_status(cudaStreamWaitEvent((cudaStream_t)stream, r->done, 0),
                           "offload: cudaStreamWaitEvent", err);
}

extern "C" mlu_status mlu_cuda_offload_sync(mlu_cuda_offload *e, int64_t handle, mlu_error *err)
{
    engine_call call(e);
    record *r = call.lookup(e, handle, err);
    mlu_status rc;

    if (r == nullptr)
        return err->code;
    rc = mlu_cuda_status(cudaEventSynchronize(r->saved), "offload: cudaEventSynchronize", err);
    if (rc == MLU_OK && r->loaded)
        rc = mlu_cuda_status(cudaEventSynchronize(r->done), "offload: cudaEventSynchronize", err);
    return rc;
}

extern "C" mlu_status mlu_cuda_offload_release(mlu_cuda_offload *e, int64_t handle, mlu_error *err)
{
    engine_call call(e);
    record *r = call.lookup(e, handle, err);
    int freed;

    if (r == nullptr)
        return err->code;
    r->released = 1;
    return reclaim(e, handle & 0xffffffffLL, 0, &freed, err);
}

extern "C" mlu_status mlu_cuda_offload_stats(mlu_cuda_offload *e, mlu_pool_stats *out, int64_t *handles,
                                             mlu_error *err)
{
    engine_call call(e);
    mlu_status rc = call.status(err);

    if (rc == MLU_OK)
        rc = sweep(e, 0, err);
    mlu_offload_pool_stats(e->pool, out);
    *handles = e->live;
    return rc;
}

extern "C" mlu_status mlu_cuda_offload_window(mlu_cuda_offload *e, const size_t *limit, size_t *cur_limit,
                                              uint64_t *waits, mlu_error *err)
{
    engine_call call(e);
    mlu_status rc = call.status(err);

    if (rc == MLU_OK && limit != nullptr)
        e->window.limit = *limit;
    *cur_limit = e->window.limit;
    *waits = e->window.waits;
    return rc;
}

extern "C" mlu_status mlu_cuda_offload_trim(mlu_cuda_offload *e, uint64_t *freed, mlu_error *err)
{
    engine_call call(e);
    mlu_status rc = call.status(err);

    if (rc == MLU_OK)
        rc = sweep(e, 1, err);

    *freed = rc == MLU_OK ? mlu_offload_pool_trim(e->pool) : 0;
    return rc;
}
