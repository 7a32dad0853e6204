/* torch_dtypes.h: the torch dtypes the .pt reader and writer know, in one
 * table: torch's name, its legacy storage class, element size, byte-swap
 * unit, and its NumPy and safetensors equivalents.  A dtype id is an index
 * into mlu_torch_dtypes; ids are internal (files and Python see names). */
#ifndef MLU_TORCH_DTYPES_H
#define MLU_TORCH_DTYPES_H

#include <stddef.h>
#include <stdint.h>

#define MLU_TORCH_N_DTYPES 27
#define MLU_TORCH_DTYPE_UINT8 8 /* the id of uint8: untyped storages are typed as uint8, as torch does */

typedef struct mlu_torch_dtype {
    const char *name;          /* torch's name: torch.<name> ("float32", "bfloat16", ...) */
    const char *storage_class; /* legacy storage class (torch.<storage_class>), or NULL: UntypedStorage */
    uint8_t itemsize;          /* bytes per element */
    uint8_t swap_unit;         /* byte-swap granularity (complex: half the item) */
    const char *numpy;         /* NumPy's little-endian dtype string ("<f4"), or NULL when NumPy has none */
    const char *ml_dtypes;     /* the ml_dtypes type of that name ("bfloat16"), or NULL */
    const char *safetensors;   /* the safetensors dtype ("F32"), or NULL when safetensors has none */
} mlu_torch_dtype;

extern const mlu_torch_dtype mlu_torch_dtypes[MLU_TORCH_N_DTYPES];

/* The id of torch dtype name[0..len) ("float32"), or -1. */
int mlu_torch_dtype_find(const char *name, size_t len);
/* The same for a NUL-terminated name. */
int mlu_torch_dtype_named(const char *name);
/* 1 when a tensor of dtype id may require gradients (floating point and
 * complex, as torch allows), else 0. */
int mlu_torch_dtype_can_require_grad(int id);
/* 1 when dtype id is complex (complex32/64/128: torch's conjugate bit
 * applies to it), else 0. */
int mlu_torch_dtype_is_complex(int id);
/* 1 when torch can negate a tensor of dtype id (its negative bit resolves:
 * floating point but float8/float4, complex, signed integers and uint8),
 * else 0. */
int mlu_torch_dtype_can_negate(int id);
/* The id of the dtype whose legacy storage class is name[0..len) ("FloatStorage"), or -1. */
int mlu_torch_storage_class_find(const char *name, size_t len);
/* The id of the dtype whose safetensors dtype is the NUL-terminated name
 * ("F32"), or -1 when safetensors' dtype has no torch equivalent (F6_*).
 * This column is the one statement of which safetensors dtype is which torch,
 * NumPy and ml_dtypes type (_core.safetensors_dtypes joins through it). */
int mlu_torch_dtype_of_safetensors(const char *name);
/* The id of the dtype whose NumPy column is of NumPy kind `kind` (dtype.kind:
 * 'b' bool, 'i', 'u', 'f', 'c') with `itemsize` bytes, or -1: how a NumPy
 * array's dtype is matched, whatever its byte order. */
int mlu_torch_dtype_of_numpy(char kind, size_t itemsize);
/* The id of the dtype whose ml_dtypes column is the NUL-terminated name
 * ("bfloat16") with `itemsize` bytes, or -1. */
int mlu_torch_dtype_of_ml_dtypes(const char *name, size_t itemsize);

#endif
