/* checksum.h: a position-weighted byte checksum, defined once so the CPU and
 * the CUDA kernel (csrc/cuda/checksum.cu) can be compared in tests:
 *
 *     checksum(b[0..n)) = sum over i of b[i] * (2*i + 1)   (mod 2^64)
 *
 * It sees every byte and its position, so a copy that drops, moves or
 * changes bytes changes it (not a cryptographic hash). */
#ifndef MLU_CHECKSUM_H
#define MLU_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

uint64_t mlu_checksum64(const void *data, size_t n);

#endif
