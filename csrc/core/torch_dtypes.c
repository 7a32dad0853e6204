/* torch_dtypes.c: the torch dtype table (see torch_dtypes.h). */
#include "torch_dtypes.h"

#include <stdlib.h>
#include <string.h>

const mlu_torch_dtype mlu_torch_dtypes[MLU_TORCH_N_DTYPES] = {
    /* name, storage class, itemsize, swap unit, numpy, ml_dtypes, safetensors */
    {"float64", "DoubleStorage", 8, 8, "<f8", NULL, "F64"},
    {"float32", "FloatStorage", 4, 4, "<f4", NULL, "F32"},
    {"float16", "HalfStorage", 2, 2, "<f2", NULL, "F16"},
    {"bfloat16", "BFloat16Storage", 2, 2, NULL, "bfloat16", "BF16"},
    {"int64", "LongStorage", 8, 8, "<i8", NULL, "I64"},
    {"int32", "IntStorage", 4, 4, "<i4", NULL, "I32"},
    {"int16", "ShortStorage", 2, 2, "<i2", NULL, "I16"},
    {"int8", "CharStorage", 1, 1, "i1", NULL, "I8"},
    {"uint8", "ByteStorage", 1, 1, "u1", NULL, "U8"},
    {"bool", "BoolStorage", 1, 1, "?", NULL, "BOOL"},
    {"complex64", "ComplexFloatStorage", 8, 4, "<c8", NULL, "C64"},
    {"complex128", "ComplexDoubleStorage", 16, 8, "<c16", NULL, NULL},
    {"complex32", NULL, 4, 2, NULL, NULL, NULL},
    {"float8_e5m2", NULL, 1, 1, NULL, "float8_e5m2", "F8_E5M2"},
    {"float8_e4m3fn", NULL, 1, 1, NULL, "float8_e4m3fn", "F8_E4M3"},
    {"float8_e5m2fnuz", NULL, 1, 1, NULL, "float8_e5m2fnuz", "F8_E5M2FNUZ"},
    {"float8_e4m3fnuz", NULL, 1, 1, NULL, "float8_e4m3fnuz", "F8_E4M3FNUZ"},
    {"float8_e8m0fnu", NULL, 1, 1, NULL, "float8_e8m0fnu", "F8_E8M0"},
    {"float4_e2m1fn_x2", NULL, 1, 1, NULL, NULL, "F4"},
    {"uint16", NULL, 2, 2, "<u2", NULL, "U16"},
    {"uint32", NULL, 4, 4, "<u4", NULL, "U32"},
    {"uint64", NULL, 8, 8, "<u8", NULL, "U64"},
    {"bits8", NULL, 1, 1, NULL, NULL, NULL},
    {"bits16", NULL, 2, 2, NULL, NULL, NULL},
    {"bits1x8", NULL, 1, 1, NULL, NULL, NULL},
    {"bits2x4", NULL, 1, 1, NULL, NULL, NULL},
    {"bits4x2", NULL, 1, 1, NULL, NULL, NULL},
};

typedef char uint8_id_ok[MLU_TORCH_DTYPE_UINT8 < MLU_TORCH_N_DTYPES ? 1 : -1];

static int name_eq(const char *p, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(p, lit, n) == 0;
}

int mlu_torch_dtype_find(const char *name, size_t len)
{
    int i, found = -1;

    for (i = 0; i < MLU_TORCH_N_DTYPES && found < 0; i++)
        if (name_eq(name, len, mlu_torch_dtypes[i].name))
            found = i;
    return found;
}

int mlu_torch_dtype_named(const char *name)
{
    return mlu_torch_dtype_find(name, strlen(name));
}

int mlu_torch_dtype_can_require_grad(int id)
{
    const char *n;

    if (id < 0 || id >= MLU_TORCH_N_DTYPES)
        return 0;
    n = mlu_torch_dtypes[id].name;
    return strncmp(n, "float", 5) == 0 || strncmp(n, "bfloat", 6) == 0 || strncmp(n, "complex", 7) == 0;
}

int mlu_torch_dtype_is_complex(int id)
{
    return id >= 0 && id < MLU_TORCH_N_DTYPES && strncmp(mlu_torch_dtypes[id].name, "complex", 7) == 0;
}

int mlu_torch_dtype_can_negate(int id)
{
    /* the dtypes torch's neg kernel covers (resolve_neg on any other fails) */
    static const char *const negatable[] = {
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
        "complex32", "complex64", "complex128",
    };
    size_t i;
    int found = 0;

    if (id < 0 || id >= MLU_TORCH_N_DTYPES)
        return 0;
    for (i = 0; i < sizeof(negatable) / sizeof(negatable[0]) && !found; i++)
        found = strcmp(mlu_torch_dtypes[id].name, negatable[i]) == 0;
    return found;
}

int mlu_torch_storage_class_find(const char *name, size_t len)
{
    int i, found = -1;

    for (i = 0; i < MLU_TORCH_N_DTYPES && found < 0; i++)
        if (mlu_torch_dtypes[i].storage_class != NULL && name_eq(name, len, mlu_torch_dtypes[i].storage_class))
            found = i;
    return found;
}

int mlu_torch_dtype_of_safetensors(const char *name)
{
    int i, found = -1;

    for (i = 0; i < MLU_TORCH_N_DTYPES && found < 0; i++)
        if (mlu_torch_dtypes[i].safetensors != NULL && strcmp(name, mlu_torch_dtypes[i].safetensors) == 0)
            found = i;
    return found;
}

/* NumPy's kind and item size of a NumPy column entry: "<f4" (a byte order,
 * the kind, the size), or "?" (bool, one byte). */
static void numpy_kind_size(const char *np, char *kind, size_t *itemsize)
{
    if (strchr("<>|=", np[0]) != NULL)
        np++;
    if (strcmp(np, "?") == 0) {
        *kind = 'b';
        *itemsize = 1;
    } else {
        *kind = np[0];
        *itemsize = (size_t)strtoul(np + 1, NULL, 10);
    }
}

int mlu_torch_dtype_of_numpy(char kind, size_t itemsize)
{
    int i, found = -1;

    for (i = 0; i < MLU_TORCH_N_DTYPES && found < 0; i++) {
        char k;
        size_t n;
        if (mlu_torch_dtypes[i].numpy == NULL)
            continue;
        numpy_kind_size(mlu_torch_dtypes[i].numpy, &k, &n);
        if (k == kind && n == itemsize && n == mlu_torch_dtypes[i].itemsize)
            found = i;
    }
    return found;
}

int mlu_torch_dtype_of_ml_dtypes(const char *name, size_t itemsize)
{
    int i, found = -1;

    for (i = 0; i < MLU_TORCH_N_DTYPES && found < 0; i++)
        if (mlu_torch_dtypes[i].ml_dtypes != NULL && strcmp(name, mlu_torch_dtypes[i].ml_dtypes) == 0 &&
            mlu_torch_dtypes[i].itemsize == itemsize)
            found = i;
    return found;
}
