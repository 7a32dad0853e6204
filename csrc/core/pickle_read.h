/* pickle_read.h: a restricted pickle VM for PyTorch checkpoints.
 *
 * Runs protocol-2 pickles with the opcode set and the globals allowlist of
 * torch.load(weights_only=True) and builds a tree (a DAG: memo references
 * share nodes) of plain C nodes.  Nothing is ever called or imported: allowed
 * globals are recognised by name and their effect (OrderedDict(), torch.Size,
 * _rebuild_tensor_v2, ...) is applied to the tree.  Anything else stops the
 * VM with MLU_EUNSAFE (forbidden) or MLU_EFORMAT (malformed), naming the
 * opcode or global and its byte offset. */
#ifndef MLU_PICKLE_READ_H
#define MLU_PICKLE_READ_H

#include "../mlu.h"
#include "ptview.h"
#include "torch_dtypes.h"

#define MLU_PK_NONE_ID UINT32_MAX
#define MLU_PK_MAX_NDIM MLU_PT_MAX_NDIM
/* The loader converts no object nested deeper than this below the root (its
 * walk is recursive), and the writer writes none: both say so in these words. */
#define MLU_PK_MAX_DEPTH 1000
#define MLU_PK_DEPTH_RULE "objects in the pickle are nested deeper than " MLU_PT_STR(MLU_PK_MAX_DEPTH) " levels"

typedef enum mlu_pk_kind {
    MLU_PKN_NONE = 0,
    MLU_PKN_BOOL,      /* u.i = 0/1 */
    MLU_PKN_INT,       /* u.i */
    MLU_PKN_BIGINT,    /* u.s: little-endian two's complement bytes (LONG1 over 8 bytes) */
    MLU_PKN_FLOAT,     /* u.f */
    MLU_PKN_COMPLEX,   /* u.c */
    MLU_PKN_STR,       /* u.s: UTF-8 (not validated here) */
    MLU_PKN_BYTES,     /* u.s: a str whose code points are the bytes (latin-1, from _codecs.encode) */
    MLU_PKN_BYTEARRAY, /* items[0]: a BYTES node, or no items */
    MLU_PKN_TUPLE,     /* items */
    MLU_PKN_LIST,      /* items */
    MLU_PKN_DICT,      /* items: key, value, key, value...; flags: MLU_PK_F_ORDERED/COUNTER; attrs */
    MLU_PKN_SET,       /* items */
    MLU_PKN_SIZE,      /* torch.Size: items are INT nodes */
    MLU_PKN_DEVICE,    /* u.s: type string; u.s.index: -1 or the index */
    MLU_PKN_DTYPE,     /* sub: dtype id (index in mlu_torch_dtypes) */
    MLU_PKN_GLOBAL,    /* sub: mlu_pk_global id (an allowed global that is not a value by itself) */
    MLU_PKN_STORAGE,   /* sub-table index in u.ref (mlu_pk_vm.pids) */
    MLU_PKN_TENSOR,    /* u.ref: index in mlu_pk_vm.tensors */
    MLU_PKN_KIND_COUNT
} mlu_pk_kind;

#define MLU_PK_F_ORDERED 1u
#define MLU_PK_F_COUNTER 2u

/* The globals allowlist, entry i (0, 1, 2... until MLU_PK_FORBIDDEN): sets
 * *module and *name (static strings) and returns MLU_PK_ALLOWED (built by
 * this loader) or MLU_PK_ALLOWED_UNSUPPORTED (on torch's weights-only
 * allowlist, refused here as a format error).  Every other GLOBAL is unsafe. */
enum { MLU_PK_FORBIDDEN = 0, MLU_PK_ALLOWED = 1, MLU_PK_ALLOWED_UNSUPPORTED = 2 };
int mlu_pk_allowlist(size_t i, const char **module, const char **name);

typedef struct mlu_pk_node {
    uint8_t kind;
    uint8_t flags;
    uint16_t sub;
    uint32_t len, cap;  /* items of containers */
    uint32_t attrs;     /* DICT: node id of the BUILD state (OrderedDict attributes); TENSOR: dict of
                           Python attributes (_rebuild_from_type_v2 / _with_state); else MLU_PK_NONE_ID */
    union {
        int64_t i;
        double f;
        struct { double re, im; } c;
        struct { const char *p; uint32_t n; int32_t index; } s;  /* p borrowed from the input */
        uint32_t *items;  /* owned */
        uint32_t ref;
    } u;
} mlu_pk_node;

/* A persistent id: ('storage', cls, key, location, numel[, view_metadata]). */
typedef struct mlu_pk_pid {
    const char *key;      /* borrowed from the input */
    uint32_t key_len;
    const char *location; /* borrowed */
    uint32_t location_len;
    int dtype;            /* storage class dtype id, or -1 for UntypedStorage (bytes) */
    uint64_t numel;       /* as written: elements (typed) or bytes (untyped) */
    uint64_t nbytes;      /* numel * element size, checked */
    uint32_t storage;     /* index of the unique storage this pid resolves to (after mlu_pk_vm_finish) */
} mlu_pk_pid;

typedef struct mlu_pk_tensor {
    uint32_t pid;         /* index in pids */
    int dtype;            /* -1 until mlu_pk_finish: the storage's first declaration */
    int ndim;
    int requires_grad;
    int is_parameter;
    unsigned flags;       /* MLU_PT_FLAG_* (ptview.h): the keys of the rebuild's metadata dict */
    uint64_t offset;      /* in elements of dtype */
    int64_t shape[MLU_PK_MAX_NDIM];
    int64_t stride[MLU_PK_MAX_NDIM];
    uint64_t end_bytes;   /* one past the last byte the view touches (0 when empty) */
    size_t at;            /* byte offset of the rebuild in the pickle (for errors) */
} mlu_pk_tensor;

/* A unique storage (pids that share a key share one). */
typedef struct mlu_pk_storage {
    const char *key;      /* borrowed */
    uint32_t key_len;
    uint64_t nbytes;
    uint64_t legacy_numel;/* elements as counted in the legacy format */
    int dtype;            /* storage class dtype, -1 untyped */
    int swap_unit;        /* element byte-swap unit, 0 until known */
    size_t first_offset;  /* byte offset of the first pid (for errors) */
} mlu_pk_storage;

typedef struct mlu_pk_vm {
    /* input (borrowed) */
    const uint8_t *data;
    size_t size;
    size_t pos;
    int legacy;           /* 6-tuple persistent ids */
    /* results (owned) */
    mlu_pk_node *nodes; uint32_t n_nodes, cap_nodes;
    mlu_pk_pid *pids; uint32_t n_pids, cap_pids;
    mlu_pk_tensor *tensors; uint32_t n_tensors, cap_tensors;
    mlu_pk_storage *storages; uint32_t n_storages;
    /* working state (owned) */
    uint32_t *stack; size_t n_stack, cap_stack;
    size_t *marks; size_t n_marks, cap_marks;
    uint32_t *memo; size_t n_memo;
    uint64_t budget;      /* memory (bytes) the pickle may still cost: grows with the input size */
    int over_budget;      /* set when something was refused for the budget */
    uint32_t const_ids[4];/* shared None, (), True, False nodes: id + 1, or 0 */
    int truncated;        /* set when the last run stopped for want of input bytes */
} mlu_pk_vm;

void mlu_pk_vm_init(mlu_pk_vm *vm);
void mlu_pk_vm_free(mlu_pk_vm *vm);

/* Runs one pickle starting at data[*pos]; on success stores the root node id
 * in *root and moves *pos past STOP.  Nodes, pids and tensors accumulate over
 * several calls (the legacy format is a sequence of pickles); the stack and
 * memo are reset for each.  `legacy` selects 6-tuple persistent ids. */
mlu_status mlu_pk_run(mlu_pk_vm *vm, const uint8_t *data, size_t size, size_t *pos, int legacy,
                      uint32_t *root, mlu_error *err);

/* Merges pids by key into vm->storages (checking that they agree) and fills
 * each pid's `storage`; checks every tensor view (flags included) against
 * its storage. */
mlu_status mlu_pk_finish(mlu_pk_vm *vm, mlu_error *err);

/* For the global names used in errors and tests. */
const char *mlu_pk_kind_name(int kind);

#endif
