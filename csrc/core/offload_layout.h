/* offload_layout.h: the forms an offloaded tensor travels in, defined once.
 *
 * The CUDA kernels (csrc/cuda/offload.cu) pack and expand these forms; the
 * binding (csrc/py/offload.c) exports the modes, mlu_offload_packed_size and
 * the e4m3 constants to Python (_core.OFFLOAD_*), where the CPU engine
 * (mlutils/offload/) packs and expands the same bytes with torch ops.
 *
 * float32 -> bfloat16 (MLU_OFFLOAD_F32_BF16): nelem bfloat16 values, nothing else.
 *
 * float16/bfloat16 -> float8 e4m3 (MLU_OFFLOAD_F16_E4M3, MLU_OFFLOAD_BF16_E4M3):
 *
 *     [ nelem e4m3 bytes | padding to a multiple of MLU_OFFLOAD_E4M3_ALIGN | trailer ]
 *
 * each byte the value times scale = MLU_OFFLOAD_E4M3_MAX / amax (1 when that
 * is not a finite positive number), with amax the largest finite |value|;
 * the trailer (MLU_OFFLOAD_E4M3_TRAILER bytes, the last of the form) holds
 * amax as a float32 at MLU_OFFLOAD_E4M3_AMAX_AT, the rest of it reserved.
 * The padding is never read. */
#ifndef MLU_OFFLOAD_LAYOUT_H
#define MLU_OFFLOAD_LAYOUT_H

#include "../mlu.h"

/* How a tensor travels: as it is, or packed by a kernel before the copy. */
enum mlu_offload_mode {
    MLU_OFFLOAD_RAW = 0,        /* nbytes copied as they are */
    MLU_OFFLOAD_F32_BF16 = 1,   /* float32 -> bfloat16 (round to nearest even) */
    MLU_OFFLOAD_F16_E4M3 = 2,   /* float16 -> float8 e4m3, per-tensor scale 448/amax */
    MLU_OFFLOAD_BF16_E4M3 = 3,  /* bfloat16 -> float8 e4m3, per-tensor scale 448/amax
                                 * (amax of the finite values; +-inf and NaN -> NaN) */
    MLU_OFFLOAD_MODES
};

#define MLU_OFFLOAD_E4M3_ALIGN 16u    /* the e4m3 payload is padded to a multiple of this */
#define MLU_OFFLOAD_E4M3_TRAILER 16u  /* bytes after the padded payload */
#define MLU_OFFLOAD_E4M3_AMAX_AT 0u   /* offset of the float32 amax in the trailer */
#define MLU_OFFLOAD_E4M3_MAX 448.0f   /* e4m3's largest finite value: where amax lands */

#if MLU_OFFLOAD_E4M3_TRAILER % MLU_OFFLOAD_E4M3_ALIGN != 0 || MLU_OFFLOAD_E4M3_AMAX_AT + 4 > MLU_OFFLOAD_E4M3_TRAILER
#error "the e4m3 trailer must keep the form aligned and hold the float32 amax"
#endif

/* Bytes of the packed form of nelem elements (the scratch and host size):
 * bf16: 2 per element; e4m3: the layout above.  0 for a bad mode or an
 * overflow. */
static inline size_t mlu_offload_packed_size(int mode, size_t nelem)
{
    size_t n;
    switch (mode) {
    case MLU_OFFLOAD_F32_BF16:
        return mlu_mul_overflow_size(nelem, 2, &n) ? 0 : n;
    case MLU_OFFLOAD_F16_E4M3:
    case MLU_OFFLOAD_BF16_E4M3:
        if (mlu_add_overflow_size(nelem, MLU_OFFLOAD_E4M3_ALIGN - 1 + MLU_OFFLOAD_E4M3_TRAILER, &n))
            return 0;
        return n / MLU_OFFLOAD_E4M3_ALIGN * MLU_OFFLOAD_E4M3_ALIGN;
    default:
        return 0;
    }
}

/* Byte offset of the trailer in the e4m3 form of nelem elements, for an
 * nelem that mlu_offload_packed_size accepted. */
static inline size_t mlu_offload_e4m3_trailer_at(size_t nelem)
{
    return mlu_offload_packed_size(MLU_OFFLOAD_F16_E4M3, nelem) - MLU_OFFLOAD_E4M3_TRAILER;
}

#endif
