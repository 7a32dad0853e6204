/* pickle_read.c: the restricted pickle VM (see pickle_read.h). */
#include "pickle_read.h"
#include "alloc.h"
#include "bytes.h"
#include "pickle_ops.h"

#include <string.h>

static int name_eq(const char *p, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(p, lit, n) == 0;
}

/* ----------------------------------------------------------------- globals */

enum pk_global {
    G_ORDERED_DICT = 1, G_COUNTER, G_PARAMETER, G_TENSOR, G_SIZE, G_DEVICE, G_CODECS_ENCODE,
    G_BYTEARRAY, G_SET, G_COMPLEX, G_REBUILD_TENSOR, G_REBUILD_V2, G_REBUILD_V3, G_REBUILD_PARAM,
    G_REBUILD_PARAM_STATE, G_REBUILD_FROM_TYPE_V2, G_UNTYPED_STORAGE, G_STORAGE_CLASS,
};

static const struct { const char *module, *name; int id; } allowed_globals[] = {
    {"collections", "OrderedDict", G_ORDERED_DICT},
    {"collections", "Counter", G_COUNTER},
    {"torch.nn.parameter", "Parameter", G_PARAMETER},
    {"torch", "Tensor", G_TENSOR},
    {"torch", "Size", G_SIZE},
    {"torch", "device", G_DEVICE},
    {"_codecs", "encode", G_CODECS_ENCODE},
    {"builtins", "bytearray", G_BYTEARRAY},
    {"builtins", "set", G_SET},
    {"builtins", "complex", G_COMPLEX},
    {"torch._utils", "_rebuild_tensor", G_REBUILD_TENSOR},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_V2},
    {"torch._utils", "_rebuild_tensor_v3", G_REBUILD_V3},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAM},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAM_STATE},
    {"torch._tensor", "_rebuild_from_type_v2", G_REBUILD_FROM_TYPE_V2},
    {"torch.storage", "UntypedStorage", G_UNTYPED_STORAGE},
};

/* On torch's weights_only allowlist (torch._weights_only_unpickler.
 * _get_allowed_globals), but not something this loader builds: a GLOBAL of
 * one of these is a TorchFormatError, any other unknown GLOBAL is unsafe.
 * Exact names only: tests/test_ptload_allowlist.py compares this table, the
 * one above and the names the dtype table adds (mlu_pk_allowlist) with
 * torch's, both ways. */
static const struct { const char *module, *name; } allowed_unsupported[] = {
    {"torch.serialization", "_get_layout"},
    {"torch._utils", "_rebuild_qtensor"},
    {"torch._utils", "_rebuild_sparse_tensor"},
    {"torch._utils", "_rebuild_nested_tensor"},
    {"torch._utils", "_rebuild_meta_tensor_no_storage"},
    {"torch._utils", "_rebuild_wrapper_subclass"},
    {"torch._utils", "_rebuild_device_tensor_from_cpu_tensor"},
    {"torch._utils", "_rebuild_device_tensor_from_numpy"},
    {"torch.storage", "TypedStorage"},
    /* quantized dtypes, qschemes, sub-byte integer dtypes */
    {"torch", "qint8"}, {"torch", "quint8"}, {"torch", "qint32"}, {"torch", "quint4x2"}, {"torch", "quint2x4"},
    {"torch", "per_tensor_affine"}, {"torch", "per_channel_affine"}, {"torch", "per_tensor_symmetric"},
    {"torch", "per_channel_symmetric"}, {"torch", "per_channel_affine_float_qparams"},
    {"torch", "uint1"}, {"torch", "uint2"}, {"torch", "uint3"}, {"torch", "uint4"}, {"torch", "uint5"},
    {"torch", "uint6"}, {"torch", "uint7"},
    {"torch", "int1"}, {"torch", "int2"}, {"torch", "int3"}, {"torch", "int4"}, {"torch", "int5"},
    {"torch", "int6"}, {"torch", "int7"},
    /* quantized storage classes */
    {"torch", "QInt32Storage"}, {"torch", "QInt8Storage"}, {"torch", "QUInt2x4Storage"},
    {"torch", "QUInt4x2Storage"}, {"torch", "QUInt8Storage"},
    /* legacy tensor classes */
    {"torch", "BFloat16Tensor"}, {"torch", "BoolTensor"}, {"torch", "ByteTensor"}, {"torch", "CharTensor"},
    {"torch", "DoubleTensor"}, {"torch", "FloatTensor"}, {"torch", "HalfTensor"}, {"torch", "IntTensor"},
    {"torch", "LongTensor"}, {"torch", "ShortTensor"},
    {"torch.cuda", "BFloat16Tensor"}, {"torch.cuda", "BoolTensor"}, {"torch.cuda", "ByteTensor"},
    {"torch.cuda", "CharTensor"}, {"torch.cuda", "DoubleTensor"}, {"torch.cuda", "FloatTensor"},
    {"torch.cuda", "HalfTensor"}, {"torch.cuda", "IntTensor"}, {"torch.cuda", "LongTensor"},
    {"torch.cuda", "ShortTensor"},
    {"torch.sparse", "BFloat16Tensor"}, {"torch.sparse", "ByteTensor"}, {"torch.sparse", "CharTensor"},
    {"torch.sparse", "DoubleTensor"}, {"torch.sparse", "FloatTensor"}, {"torch.sparse", "HalfTensor"},
    {"torch.sparse", "IntTensor"}, {"torch.sparse", "LongTensor"}, {"torch.sparse", "ShortTensor"},
    {"torch.cuda.sparse", "BFloat16Tensor"}, {"torch.cuda.sparse", "ByteTensor"},
    {"torch.cuda.sparse", "CharTensor"}, {"torch.cuda.sparse", "DoubleTensor"},
    {"torch.cuda.sparse", "FloatTensor"}, {"torch.cuda.sparse", "HalfTensor"}, {"torch.cuda.sparse", "IntTensor"},
    {"torch.cuda.sparse", "LongTensor"}, {"torch.cuda.sparse", "ShortTensor"},
    /* and torch.cuda.<storage class> of every legacy storage class of the
     * dtype table (a CPU-only loader): CUDA_STORAGE_MODULE below */
};

/* torch.<storage class> is built; torch.cuda.<storage class> is allowed but
 * unsupported: both sets come from the dtype table's storage_class column. */
#define CUDA_STORAGE_MODULE "torch.cuda"

#define N_ALLOWED (sizeof(allowed_globals) / sizeof(allowed_globals[0]))
#define N_UNSUPPORTED (sizeof(allowed_unsupported) / sizeof(allowed_unsupported[0]))

/* The name of the k-th legacy storage class of the dtype table (k = 0, 1,
 * ...), or NULL past the last; *count is how many there are. */
static const char *storage_class_at(size_t k, size_t *count)
{
    const char *found = NULL;
    size_t j, seen = 0;

    for (j = 0; j < (size_t)MLU_TORCH_N_DTYPES; j++) {
        if (mlu_torch_dtypes[j].storage_class == NULL)
            continue;
        if (seen++ == k)
            found = mlu_torch_dtypes[j].storage_class;
    }
    *count = seen;
    return found;
}

int mlu_pk_allowlist(size_t i, const char **module, const char **name)
{
    int kind = MLU_PK_FORBIDDEN;
    size_t k = i, n_classes;
    const char *sc;

    if (k < N_ALLOWED) {
        *module = allowed_globals[k].module;
        *name = allowed_globals[k].name;
        kind = MLU_PK_ALLOWED;
        goto done;
    }
    k -= N_ALLOWED;
    if (k < (size_t)MLU_TORCH_N_DTYPES) {
        *module = "torch";
        *name = mlu_torch_dtypes[k].name;
        kind = MLU_PK_ALLOWED;
        goto done;
    }
    k -= (size_t)MLU_TORCH_N_DTYPES;
    if ((sc = storage_class_at(k, &n_classes)) != NULL) {
        *module = "torch";
        *name = sc;
        kind = MLU_PK_ALLOWED;
        goto done;
    }
    k -= n_classes;
    if (k < N_UNSUPPORTED) {
        *module = allowed_unsupported[k].module;
        *name = allowed_unsupported[k].name;
        kind = MLU_PK_ALLOWED_UNSUPPORTED;
        goto done;
    }
    k -= N_UNSUPPORTED;
    if ((sc = storage_class_at(k, &n_classes)) != NULL) {
        *module = CUDA_STORAGE_MODULE;
        *name = sc;
        kind = MLU_PK_ALLOWED_UNSUPPORTED;
    }
done:
    return kind;
}

/* Python 2 module names as protocol 2 writes them (a subset of _compat_pickle). */
static void compat_module(const char **mod, size_t *len)
{
    if (name_eq(*mod, *len, "__builtin__")) {
        *mod = "builtins";
        *len = 8;
    } else if (name_eq(*mod, *len, "copy_reg")) {
        *mod = "copyreg";
        *len = 7;
    }
}

/* ----------------------------------------------------------------- helpers */

#define VM_FAIL(code, off, ...) (st = mlu_error_set(err, (code), (int64_t)(off), __VA_ARGS__))

static const char *kind_names[MLU_PKN_KIND_COUNT] = {
    "None", "bool", "int", "int", "float", "complex", "str", "bytes", "bytearray", "tuple", "list",
    "dict", "set", "torch.Size", "torch.device", "torch.dtype", "global", "storage", "tensor",
};

const char *mlu_pk_kind_name(int kind)
{
    return kind >= 0 && kind < MLU_PKN_KIND_COUNT ? kind_names[kind] : "?";
}

static int is_container(uint8_t k)
{
    return k == MLU_PKN_TUPLE || k == MLU_PKN_LIST || k == MLU_PKN_DICT || k == MLU_PKN_SET || k == MLU_PKN_SIZE ||
           k == MLU_PKN_BYTEARRAY;
}

void mlu_pk_vm_init(mlu_pk_vm *vm)
{
    memset(vm, 0, sizeof(*vm));
}

void mlu_pk_vm_free(mlu_pk_vm *vm)
{
    uint32_t i;
    for (i = 0; i < vm->n_nodes; i++)
        if (is_container(vm->nodes[i].kind))
            mlu_free(vm->nodes[i].u.items);
    mlu_free(vm->nodes);
    mlu_free(vm->pids);
    mlu_free(vm->tensors);
    mlu_free(vm->storages);
    mlu_free(vm->stack);
    mlu_free(vm->marks);
    mlu_free(vm->memo);
    memset(vm, 0, sizeof(*vm));
}

/* Grows an array whose count is a uint32_t (node, record and item ids are
 * 32-bit) to hold `need`; returns 0 or -1 (the caller reports the failure:
 * out of memory, or over the budget). */
static int grow(void **arr, uint32_t *cap, uint64_t need, size_t elem)
{
    size_t c = *cap;

    if (need > UINT32_MAX - 1 ||
        mlu_grow(arr, &c, (size_t)need, elem, UINT32_MAX - 1, "a pickle table", NULL) != MLU_OK)
        return -1;
    *cap = (uint32_t)c;
    return 0;
}

static int grow_size(void **arr, size_t *cap, size_t need, size_t elem)
{
    return mlu_grow(arr, cap, need, elem, SIZE_MAX, "a pickle table", NULL) == MLU_OK ? 0 : -1;
}

/* The work and memory of a pickle are bounded by its size: every node,
 * container item, memo slot, tensor record and string copied out of the
 * input is charged, in bytes of memory it will cost here and in the Python
 * objects made of it, against PK_COST_PER_BYTE per input byte (plus
 * PK_COST_BASE).  Opcodes executed are bounded by the input bytes (each
 * consumes at least one), and REDUCE copies by the item charge.  Past the
 * budget the load stops with a format error ("expands beyond its size"). */
#define PK_COST_PER_BYTE 64u
#define PK_COST_BASE ((uint64_t)4 << 20)
#define PK_COST_SCALAR 48u      /* C node + a small Python object and its memo slot */
#define PK_COST_CONTAINER 128u  /* C node + an empty Python list/dict/tuple and its memo slot */
#define PK_COST_ITEM 8u         /* an item id here, a pointer in the Python container */
#define PK_COST_MEMO 8u         /* one memo slot */
#define PK_COST_TENSOR (sizeof(mlu_pk_tensor) + 512u)

static int charge(mlu_pk_vm *vm, uint64_t cost)
{
    if (vm->budget < cost) {
        vm->over_budget = 1;
        return -1;
    }
    vm->budget -= cost;
    return 0;
}

/* New node id, or MLU_PK_NONE_ID when out of memory or over the budget. */
static uint32_t new_node(mlu_pk_vm *vm, uint8_t kind)
{
    mlu_pk_node *n;
    if (charge(vm, is_container(kind) || kind == MLU_PKN_DICT ? PK_COST_CONTAINER : PK_COST_SCALAR) < 0 ||
        vm->n_nodes >= UINT32_MAX - 2 ||
        grow((void **)&vm->nodes, &vm->cap_nodes, (uint64_t)vm->n_nodes + 1, sizeof(*vm->nodes)) < 0)
        return MLU_PK_NONE_ID;
    n = &vm->nodes[vm->n_nodes];
    memset(n, 0, sizeof(*n));
    n->kind = kind;
    n->attrs = MLU_PK_NONE_ID;
    return vm->n_nodes++;
}

/* None, True, False and () are immutable: one shared node each per VM
 * (Python's are singletons too), so that a run of 1-byte opcodes does not
 * allocate a node per byte. */
static uint32_t const_node(mlu_pk_vm *vm, uint8_t kind, int64_t value)
{
    uint32_t *slot = kind == MLU_PKN_NONE ? &vm->const_ids[0] : kind == MLU_PKN_TUPLE ? &vm->const_ids[1]
                     : value ? &vm->const_ids[2] : &vm->const_ids[3];
    if (*slot == MLU_PK_NONE_ID || *slot == 0) {
        uint32_t id = new_node(vm, kind);
        if (id == MLU_PK_NONE_ID)
            return id;
        vm->nodes[id].u.i = value;
        *slot = id + 1;  /* 0 means unset (the VM is zeroed at init) */
        return id;
    }
    return *slot - 1;
}

/* New scalar nodes with their value: an INT, a FLOAT, or a STR or BIGINT
 * (kind) over n bytes at p (borrowed from the pickle); MLU_PK_NONE_ID when out
 * of memory or over the budget (PUSH reports it). */
static uint32_t int_node(mlu_pk_vm *vm, int64_t v)
{
    uint32_t node = new_node(vm, MLU_PKN_INT);
    if (node != MLU_PK_NONE_ID)
        vm->nodes[node].u.i = v;
    return node;
}

static uint32_t float_node(mlu_pk_vm *vm, double d)
{
    uint32_t node = new_node(vm, MLU_PKN_FLOAT);
    if (node != MLU_PK_NONE_ID)
        vm->nodes[node].u.f = d;
    return node;
}

static uint32_t bytes_node(mlu_pk_vm *vm, uint8_t kind, const uint8_t *p, uint32_t n)
{
    uint32_t node = new_node(vm, kind);
    if (node != MLU_PK_NONE_ID) {
        vm->nodes[node].u.s.p = (const char *)p;
        vm->nodes[node].u.s.n = n;
    }
    return node;
}

/* The error for a failed allocation: over the budget, or out of memory. */
static mlu_status fail_nomem(mlu_pk_vm *vm, size_t at, mlu_error *err)
{
    if (vm->over_budget)
        return mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "pickle expands beyond its size at byte %zu", at);
    return mlu_error_set(err, MLU_ENOMEM, (int64_t)at, "out of memory reading the pickle");
}

/* Appends a copy of *t to the tensor records and a TENSOR node for it. */
static mlu_status new_tensor(mlu_pk_vm *vm, size_t at, const mlu_pk_tensor *t, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint32_t node;
    if (charge(vm, PK_COST_TENSOR) < 0)
        return VM_FAIL(MLU_EFORMAT, at, "pickle expands beyond its size at byte %zu (too many tensor records)", at);
    if (grow((void **)&vm->tensors, &vm->cap_tensors, (uint64_t)vm->n_tensors + 1, sizeof(*vm->tensors)) < 0 ||
        (node = new_node(vm, MLU_PKN_TENSOR)) == MLU_PK_NONE_ID) {
        if (vm->over_budget)
            return VM_FAIL(MLU_EFORMAT, at, "pickle expands beyond its size at byte %zu", at);
        return (st = fail_nomem(vm, at, err));
    }
    vm->tensors[vm->n_tensors] = *t;
    vm->nodes[node].u.ref = vm->n_tensors++;
    *out = node;
    return st;
}

/* A parameter made of tensor node src: a new record, the same view. */
static mlu_status param_copy(mlu_pk_vm *vm, size_t at, uint32_t src, int rg, uint32_t *out, mlu_error *err)
{
    mlu_pk_tensor t = vm->tensors[vm->nodes[src].u.ref];
    t.is_parameter = 1;
    t.requires_grad = rg;
    return new_tensor(vm, at, &t, out, err);
}

/* Appends item to container node (charged: REDUCE copies such as
 * OrderedDict(list) or set(list) of one large memoised list cannot grow
 * quadratically). */
static int add_item(mlu_pk_vm *vm, uint32_t node, uint32_t item)
{
    mlu_pk_node *n = &vm->nodes[node];
    if (charge(vm, PK_COST_ITEM) < 0)
        return -1;
    if (n->len >= UINT32_MAX - 2 || grow((void **)&n->u.items, &n->cap, (uint64_t)n->len + 1, sizeof(uint32_t)) < 0)
        return -1;
    n->u.items[n->len++] = item;
    return 0;
}

static int push(mlu_pk_vm *vm, uint32_t id)
{
    if (grow_size((void **)&vm->stack, &vm->cap_stack, vm->n_stack + 1, sizeof(uint32_t)) < 0)
        return -1;
    vm->stack[vm->n_stack++] = id;
    return 0;
}

static mlu_pk_node *N(mlu_pk_vm *vm, uint32_t id) { return &vm->nodes[id]; }

static int as_int(mlu_pk_vm *vm, uint32_t id, int64_t *out)
{
    mlu_pk_node *n = N(vm, id);
    if (n->kind == MLU_PKN_INT || n->kind == MLU_PKN_BOOL) {
        *out = n->u.i;
        return 0;
    }
    return -1;
}

/* Reads an int tuple (TUPLE, LIST or SIZE of ints >= 0) into v; returns count or -1. */
static int int_tuple(mlu_pk_vm *vm, uint32_t id, int64_t *v)
{
    mlu_pk_node *n = N(vm, id);
    uint32_t i;
    if (n->kind != MLU_PKN_TUPLE && n->kind != MLU_PKN_SIZE && n->kind != MLU_PKN_LIST)
        return -1;
    if (n->len > MLU_PK_MAX_NDIM)
        return -1;
    for (i = 0; i < n->len; i++) {
        if (N(vm, n->u.items[i])->kind != MLU_PKN_INT)
            return -1;
        v[i] = N(vm, n->u.items[i])->u.i;
        if (v[i] < 0)
            return -1;
    }
    return (int)n->len;
}

static int is_empty_dict_or_none(mlu_pk_vm *vm, uint32_t id)
{
    mlu_pk_node *n = N(vm, id);
    return n->kind == MLU_PKN_NONE || (n->kind == MLU_PKN_DICT && n->len == 0 && n->attrs == MLU_PK_NONE_ID);
}

/* ------------------------------------------------------------ tensor build */

/* Records a tensor rebuild.  Its dtype is the v3 argument, or -1: the
 * dtype of the storage's FIRST declaration, as torch.load keeps one typed
 * storage per key (resolved with the view checks in mlu_pk_finish, which
 * every load and verify runs). */
static mlu_status make_tensor(mlu_pk_vm *vm, size_t at, uint32_t storage, uint32_t offset_n, uint32_t size_n,
                              uint32_t stride_n, int rg, int dtype, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    mlu_pk_tensor t;
    int64_t off;
    int nd, ns;
    uint32_t node;

    memset(&t, 0, sizeof(t));
    if (N(vm, storage)->kind != MLU_PKN_STORAGE)
        return VM_FAIL(MLU_EFORMAT, at, "tensor rebuild at byte %zu: storage argument is a %s, not a storage", at,
                       mlu_pk_kind_name(N(vm, storage)->kind));
    if (as_int(vm, offset_n, &off) < 0 || off < 0)
        return VM_FAIL(MLU_EFORMAT, at, "tensor rebuild at byte %zu: " MLU_PT_RULE_OFFSET, at);
    nd = int_tuple(vm, size_n, t.shape);
    ns = int_tuple(vm, stride_n, t.stride);
    if (nd < 0 || ns < 0 || nd != ns)
        return VM_FAIL(MLU_EFORMAT, at, "tensor rebuild at byte %zu: " MLU_PT_RULE_SHAPE, at);
    t.pid = N(vm, storage)->u.ref;
    t.dtype = dtype;
    t.ndim = nd;
    t.offset = (uint64_t)off;
    t.requires_grad = rg;
    t.at = at;
    if ((st = new_tensor(vm, at, &t, &node, err)) != MLU_OK)
        return st;
    *out = node;
    return st;
}

/* Checks tensor t's view (dtype resolved) against its storage: the rules of
 * ptview.h, which the writer keeps too, in their words after the tensor's
 * place in the pickle. */
static mlu_status check_view(const mlu_pk_vm *vm, mlu_pk_tensor *t, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_pk_pid *pid = &vm->pids[t->pid];
    const mlu_pk_storage *s = &vm->storages[pid->storage];
    mlu_pt_view v;
    mlu_error why;
    size_t at = t->at;

    v.dtype = t->dtype;
    v.ndim = (size_t)t->ndim;
    v.shape = t->shape;
    v.stride = t->stride;
    v.offset = (int64_t)t->offset; /* an int64 >= 0 when read */
    v.requires_grad = t->requires_grad;
    v.flags = t->flags;
    mlu_error_clear(&why);
    if (mlu_pt_view_check(&v, s->key, s->key_len, s->nbytes, &t->end_bytes, &why) != MLU_OK)
        return VM_FAIL(MLU_EFORMAT, at, "tensor at byte %zu: %s", at, why.text);
    return st;
}

static int bool_arg(mlu_pk_vm *vm, uint32_t id, int *out)
{
    mlu_pk_node *n = N(vm, id);
    if (n->kind == MLU_PKN_BOOL || (n->kind == MLU_PKN_INT && (n->u.i == 0 || n->u.i == 1))) {
        *out = (int)n->u.i;
        return 0;
    }
    return -1;
}

/* The REDUCE of an allowed global, one function per family of callables
 * (as _pickle.c has one load_* per opcode family).  Each builds the result in
 * *out, or fails naming the callable and the byte offset of the REDUCE. */

static mlu_status apply_nomem(mlu_pk_vm *vm, size_t at, mlu_error *err)
{
    mlu_status st;
    if (vm->over_budget)
        return VM_FAIL(MLU_EFORMAT, at, "pickle expands beyond its size at byte %zu (repeated copies of a large container)", at);
    return (st = fail_nomem(vm, at, err));
}

/* OrderedDict(), Counter(), set(), torch.Size(): containers from an optional iterable. */
static mlu_status apply_container(mlu_pk_vm *vm, size_t at, int gid, uint32_t args, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    mlu_pk_node *a = N(vm, args);
    uint32_t n = a->len, *v, node, i, src;

    if ((node = new_node(vm, gid == G_SET ? MLU_PKN_SET : gid == G_SIZE ? MLU_PKN_SIZE : MLU_PKN_DICT)) == MLU_PK_NONE_ID)
        return apply_nomem(vm, at, err);
    a = N(vm, args);
    v = a->u.items;
    if (gid == G_SET || gid == G_SIZE) {
        if (n == 1 && (N(vm, v[0])->kind == MLU_PKN_LIST || N(vm, v[0])->kind == MLU_PKN_TUPLE)) {
            src = v[0];
            for (i = 0; i < N(vm, src)->len; i++) {
                uint32_t it = N(vm, src)->u.items[i];
                if (gid == G_SIZE && N(vm, it)->kind != MLU_PKN_INT)
                    return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: torch.Size takes ints", at);
                if (add_item(vm, node, it) < 0)
                    return apply_nomem(vm, at, err);
            }
        } else if (n != 0) {
            return VM_FAIL(MLU_EFORMAT, at, gid == G_SET ? "REDUCE at byte %zu: set() takes a list"
                                                         : "REDUCE at byte %zu: torch.Size takes one tuple", at);
        }
        *out = node;
        return st;
    }
    N(vm, node)->flags = gid == G_ORDERED_DICT ? MLU_PK_F_ORDERED : MLU_PK_F_COUNTER;
    if (n == 1 && gid == G_COUNTER && N(vm, v[0])->kind == MLU_PKN_DICT) {
        src = v[0];
        for (i = 0; i < N(vm, src)->len; i++)
            if (add_item(vm, node, N(vm, src)->u.items[i]) < 0)
                return apply_nomem(vm, at, err);
    } else if (n == 1 && (N(vm, v[0])->kind == MLU_PKN_LIST || N(vm, v[0])->kind == MLU_PKN_TUPLE)) {
        src = v[0];
        for (i = 0; i < N(vm, src)->len; i++) {
            uint32_t pair = N(vm, src)->u.items[i];
            if ((N(vm, pair)->kind != MLU_PKN_TUPLE && N(vm, pair)->kind != MLU_PKN_LIST) || N(vm, pair)->len != 2)
                return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: OrderedDict items must be pairs", at);
            if (add_item(vm, node, N(vm, pair)->u.items[0]) < 0 || add_item(vm, node, N(vm, pair)->u.items[1]) < 0)
                return apply_nomem(vm, at, err);
        }
    } else if (n != 0) {
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: unsupported arguments to %s", at,
                       gid == G_ORDERED_DICT ? "OrderedDict" : "Counter");
    }
    *out = node;
    return st;
}

static int is_latin1_name(mlu_pk_vm *vm, uint32_t id)
{
    return name_eq(N(vm, id)->u.s.p, N(vm, id)->u.s.n, "latin1") || name_eq(N(vm, id)->u.s.p, N(vm, id)->u.s.n, "latin-1");
}

/* torch.device(), _codecs.encode(), bytearray(), complex(): scalar values. */
static mlu_status apply_value(mlu_pk_vm *vm, size_t at, int gid, uint32_t args, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint32_t n = N(vm, args)->len, *v = N(vm, args)->u.items, node, i;

    if (gid == G_DEVICE) {
        int64_t idx = -1;
        if (n < 1 || n > 2 || N(vm, v[0])->kind != MLU_PKN_STR ||
            (n == 2 && (as_int(vm, v[1], &idx) < 0 || idx < 0 || idx > INT32_MAX)))
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: torch.device takes (str[, int])", at);
        if (charge(vm, N(vm, v[0])->u.s.n) < 0 || (node = new_node(vm, MLU_PKN_DEVICE)) == MLU_PK_NONE_ID)
            return apply_nomem(vm, at, err);
        v = N(vm, args)->u.items;
        N(vm, node)->u.s = N(vm, v[0])->u.s;
        N(vm, node)->u.s.index = (int32_t)idx;
    } else if (gid == G_CODECS_ENCODE) {
        if (n != 2 || N(vm, v[0])->kind != MLU_PKN_STR || N(vm, v[1])->kind != MLU_PKN_STR || !is_latin1_name(vm, v[1]))
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _codecs.encode takes (str, 'latin1')", at);
        /* a new bytes object per call, even of one memoised str */
        if (charge(vm, N(vm, v[0])->u.s.n) < 0 || (node = new_node(vm, MLU_PKN_BYTES)) == MLU_PK_NONE_ID)
            return apply_nomem(vm, at, err);
        N(vm, node)->u.s = N(vm, N(vm, args)->u.items[0])->u.s;
    } else if (gid == G_BYTEARRAY) {
        if (n == 0) {
            if ((node = new_node(vm, MLU_PKN_BYTEARRAY)) == MLU_PK_NONE_ID)
                return apply_nomem(vm, at, err);
        } else if ((n == 1 && N(vm, v[0])->kind == MLU_PKN_BYTES) ||
                   (n == 2 && N(vm, v[0])->kind == MLU_PKN_STR && N(vm, v[1])->kind == MLU_PKN_STR &&
                    is_latin1_name(vm, v[1]))) {
            uint32_t b;
            if (charge(vm, 2 * (uint64_t)N(vm, v[0])->u.s.n) < 0 || (node = new_node(vm, MLU_PKN_BYTEARRAY)) == MLU_PK_NONE_ID)
                return apply_nomem(vm, at, err);
            if ((b = new_node(vm, MLU_PKN_BYTES)) == MLU_PK_NONE_ID)
                return apply_nomem(vm, at, err);
            N(vm, b)->u.s = N(vm, N(vm, args)->u.items[0])->u.s;
            if (add_item(vm, node, b) < 0)
                return apply_nomem(vm, at, err);
        } else {
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: unsupported arguments to bytearray", at);
        }
    } else { /* G_COMPLEX */
        double p[2] = {0, 0};
        for (i = 0; i < n && i < 2; i++) {
            mlu_pk_node *x = N(vm, v[i]);
            if (x->kind == MLU_PKN_FLOAT)
                p[i] = x->u.f;
            else if (x->kind == MLU_PKN_INT)
                p[i] = (double)x->u.i;
            else
                n = 99;
        }
        if (n > 2)
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: complex takes two numbers", at);
        if ((node = new_node(vm, MLU_PKN_COMPLEX)) == MLU_PK_NONE_ID)
            return apply_nomem(vm, at, err);
        N(vm, node)->u.c.re = p[0];
        N(vm, node)->u.c.im = p[1];
    }
    *out = node;
    return st;
}

/* The longest part of a str from the pickle an error message quotes. */
#define PK_QUOTE_MAX 40

/* The flags of the metadata argument `md` of _rebuild_tensor_v2/v3 (what
 * torch's _set_tensor_metadata takes): None, or a dict (an OrderedDict or a
 * Counter too, as torch takes any dict) whose keys are 'conj' and 'neg'
 * with bool values.  torch sets a bit for its key whatever the value (it
 * writes only True), and so does this reader: {'conj': False} is a
 * conjugate view in torch.load, so here too.  Which dtype a flag needs is
 * checked with the view (ptview.h) by mlu_pk_finish, when the dtype is
 * known. */
static mlu_status tensor_flags(mlu_pk_vm *vm, size_t at, uint32_t md, unsigned *flags, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_pk_node *d = N(vm, md);
    unsigned f = 0, bit;
    uint32_t i;

    if (d->kind == MLU_PKN_NONE)
        goto done;
    if (d->kind != MLU_PKN_DICT) {
        VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: tensor metadata is a %s, not a dict", at,
                mlu_pk_kind_name(d->kind));
        goto done;
    }
    if (d->attrs != MLU_PK_NONE_ID) {
        VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: tensor metadata is a dict with attributes", at);
        goto done;
    }
    for (i = 0; i + 1 < d->len; i += 2) {
        const mlu_pk_node *k = N(vm, d->u.items[i]), *v = N(vm, d->u.items[i + 1]);
        if (k->kind != MLU_PKN_STR) {
            VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: tensor metadata key is a %s, not a str", at,
                    mlu_pk_kind_name(k->kind));
            goto done;
        }
        if (name_eq(k->u.s.p, k->u.s.n, "conj")) {
            bit = MLU_PT_FLAG_CONJ;
        } else if (name_eq(k->u.s.p, k->u.s.n, "neg")) {
            bit = MLU_PT_FLAG_NEG;
        } else {
            VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: unknown tensor metadata flag '%.*s%s' (known: 'conj', 'neg')",
                    at, (int)(k->u.s.n > PK_QUOTE_MAX ? PK_QUOTE_MAX : k->u.s.n), k->u.s.p,
                    k->u.s.n > PK_QUOTE_MAX ? "..." : "");
            goto done;
        }
        if (v->kind != MLU_PKN_BOOL) {
            VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: tensor metadata flag '%s' is a %s, not a bool", at,
                    bit == MLU_PT_FLAG_CONJ ? "conj" : "neg", mlu_pk_kind_name(v->kind));
            goto done;
        }
        f |= bit;
    }
    *flags = f;
done:
    return st;
}

/* _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3. */
static mlu_status apply_rebuild_tensor(mlu_pk_vm *vm, size_t at, int gid, uint32_t args, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint32_t n = N(vm, args)->len, *v = N(vm, args)->u.items;
    uint32_t want = gid == G_REBUILD_V2 ? 6 : 7;
    unsigned flags = 0;
    int dt = -1, rg = 0;

    if (gid == G_REBUILD_TENSOR) {
        if (n != 4)
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _rebuild_tensor takes 4 arguments, got %u", at, n);
        return make_tensor(vm, at, v[0], v[1], v[2], v[3], 0, -1, out, err);
    }
    if (n != want && n != want + 1)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _rebuild_tensor_v%d takes %u or %u arguments, got %u", at,
                       gid == G_REBUILD_V2 ? 2 : 3, want, want + 1, n);
    if (bool_arg(vm, v[4], &rg) < 0)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: requires_grad is not a bool", at);
    if (N(vm, v[5])->kind != MLU_PKN_DICT || N(vm, v[5])->len != 0)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: backward hooks must be an empty OrderedDict", at);
    if (gid == G_REBUILD_V3) {
        if (N(vm, v[6])->kind != MLU_PKN_DTYPE)
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _rebuild_tensor_v3 needs a torch dtype", at);
        dt = N(vm, v[6])->sub;
    }
    if (n == want + 1 && (st = tensor_flags(vm, at, v[want], &flags, err)) != MLU_OK)
        return st;
    if ((st = make_tensor(vm, at, v[0], v[1], v[2], v[3], rg, dt, out, err)) != MLU_OK)
        return st;
    vm->tensors[N(vm, *out)->u.ref].flags = flags;
    return st;
}

/* _rebuild_parameter, _rebuild_parameter_with_state, torch.nn.Parameter(). */
static mlu_status apply_parameter(mlu_pk_vm *vm, size_t at, int gid, uint32_t args, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint32_t n = N(vm, args)->len, *v = N(vm, args)->u.items;
    int rg = 0;

    if (gid == G_PARAMETER) { /* torch.nn.Parameter(tensor[, requires_grad]) */
        rg = 1;
        if (n < 1 || n > 2 || N(vm, v[0])->kind != MLU_PKN_TENSOR || (n == 2 && bool_arg(vm, v[1], &rg) < 0))
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: Parameter takes (tensor[, bool])", at);
        return param_copy(vm, at, v[0], rg, out, err);
    }
    if (n != (gid == G_REBUILD_PARAM ? 3u : 4u) || N(vm, v[0])->kind != MLU_PKN_TENSOR || bool_arg(vm, v[1], &rg) < 0)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _rebuild_parameter takes (tensor, bool, hooks)", at);
    if (N(vm, v[2])->kind != MLU_PKN_DICT || N(vm, v[2])->len != 0)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: parameter backward hooks must be empty", at);
    if (n == 4 && N(vm, v[3])->kind != MLU_PKN_NONE && N(vm, v[3])->kind != MLU_PKN_DICT)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: parameter state must be a dict of attributes", at);
    /* a new tensor record: same view, marked as a parameter */
    if ((st = param_copy(vm, at, v[0], rg, out, err)) != MLU_OK)
        return st;
    if (n == 4 && !is_empty_dict_or_none(vm, v[3]))
        N(vm, *out)->attrs = v[3];
    return st;
}

static mlu_status apply(mlu_pk_vm *vm, size_t at, uint32_t fn, uint32_t args, uint32_t *out, int depth,
                        mlu_error *err);

/* torch._utils._rebuild_from_type_v2(func, Tensor or Parameter, args, state). */
static mlu_status apply_from_type(mlu_pk_vm *vm, size_t at, uint32_t args, uint32_t *out, int depth, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint32_t n = N(vm, args)->len, *v = N(vm, args)->u.items, node;
    int tg;

    if (n != 4 || N(vm, v[0])->kind != MLU_PKN_GLOBAL || N(vm, v[1])->kind != MLU_PKN_GLOBAL ||
        N(vm, v[2])->kind != MLU_PKN_TUPLE)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _rebuild_from_type_v2 takes (func, type, args, state)", at);
    tg = N(vm, v[1])->sub;
    if (tg != G_TENSOR && tg != G_PARAMETER)
        return VM_FAIL(MLU_EUNSAFE, at, "REDUCE at byte %zu: _rebuild_from_type_v2 of a type other than Tensor/Parameter", at);
    if (N(vm, v[3])->kind != MLU_PKN_NONE && N(vm, v[3])->kind != MLU_PKN_DICT)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: tensor state must be a dict of attributes", at);
    if (depth > 4)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: nested _rebuild_from_type_v2", at);
    st = apply(vm, at, v[0], v[2], &node, depth + 1, err);
    if (st != MLU_OK)
        return st;
    if (N(vm, node)->kind != MLU_PKN_TENSOR)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: _rebuild_from_type_v2 did not make a tensor", at);
    if (tg == G_PARAMETER)
        vm->tensors[N(vm, node)->u.ref].is_parameter = 1;
    if (!is_empty_dict_or_none(vm, v[3])) {
        if (N(vm, node)->attrs != MLU_PK_NONE_ID)
            return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: tensor state given twice", at);
        N(vm, node)->attrs = v[3];
    }
    *out = node;
    return st;
}

/* Applies the allowed callable `gid` (a GLOBAL node `fn`) to the args tuple. */
static mlu_status apply(mlu_pk_vm *vm, size_t at, uint32_t fn, uint32_t args, uint32_t *out, int depth,
                        mlu_error *err)
{
    mlu_status st = MLU_OK;
    mlu_pk_node *a = N(vm, args);
    int gid = N(vm, fn)->sub;

    if (a->kind != MLU_PKN_TUPLE)
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: arguments are a %s, not a tuple", at, mlu_pk_kind_name(a->kind));
    switch (gid) {
    case G_ORDERED_DICT:
    case G_COUNTER:
    case G_SET:
    case G_SIZE:
        return apply_container(vm, at, gid, args, out, err);
    case G_DEVICE:
    case G_CODECS_ENCODE:
    case G_BYTEARRAY:
    case G_COMPLEX:
        return apply_value(vm, at, gid, args, out, err);
    case G_REBUILD_TENSOR:
    case G_REBUILD_V2:
    case G_REBUILD_V3:
        return apply_rebuild_tensor(vm, at, gid, args, out, err);
    case G_REBUILD_PARAM:
    case G_REBUILD_PARAM_STATE:
    case G_PARAMETER:
        return apply_parameter(vm, at, gid, args, out, err);
    case G_REBUILD_FROM_TYPE_V2:
        return apply_from_type(vm, at, args, out, depth, err);
    default: /* torch.Tensor(...), storage classes: allowed by torch, not built here */
        return VM_FAIL(MLU_EFORMAT, at, "REDUCE at byte %zu: calling this torch class is allowed by torch but not "
                       "supported by this loader", at);
    }
}

/* ------------------------------------------------------------ persistent id */

static mlu_status persistent_load(mlu_pk_vm *vm, size_t at, uint32_t tup, uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    mlu_pk_node *t = N(vm, tup);
    uint32_t want = vm->legacy ? 6 : 5, *v, node;
    mlu_pk_pid pid;
    int64_t numel;
    uint64_t isz;

    if (t->kind != MLU_PKN_TUPLE || t->len < 1)
        return VM_FAIL(MLU_EUNSAFE, at, "BINPERSID at byte %zu: persistent id is a %s, not a tuple", at, mlu_pk_kind_name(t->kind));
    v = t->u.items;
    if (N(vm, v[0])->kind != MLU_PKN_STR || !name_eq(N(vm, v[0])->u.s.p, N(vm, v[0])->u.s.n, "storage"))
        return VM_FAIL(MLU_EUNSAFE, at, "BINPERSID at byte %zu: persistent id typename is not 'storage'", at);
    if (t->len != want)
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: persistent id has %u fields, expected %u", at, t->len, want);
    memset(&pid, 0, sizeof(pid));
    if (N(vm, v[1])->kind != MLU_PKN_GLOBAL ||
        (N(vm, v[1])->sub != G_STORAGE_CLASS && N(vm, v[1])->sub != G_UNTYPED_STORAGE))
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: storage type is not a storage class", at);
    pid.dtype = N(vm, v[1])->sub == G_STORAGE_CLASS ? (int)N(vm, v[1])->u.i : -1;
    if (N(vm, v[2])->kind != MLU_PKN_STR || N(vm, v[3])->kind != MLU_PKN_STR)
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: storage key and location must be strings", at);
    if (as_int(vm, v[4], &numel) < 0 || numel < 0 || N(vm, v[4])->kind != MLU_PKN_INT)
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: storage size is not an int >= 0", at);
    if (vm->legacy && N(vm, v[5])->kind != MLU_PKN_NONE)
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: legacy storage views (view_metadata) are not supported", at);
    isz = pid.dtype >= 0 ? mlu_torch_dtypes[pid.dtype].itemsize : 1;
    if (mlu_mul_overflow_u64((uint64_t)numel, isz, &pid.nbytes) || pid.nbytes > (uint64_t)INT64_MAX)
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: storage size overflows", at);
    pid.numel = (uint64_t)numel;
    pid.key = N(vm, v[2])->u.s.p;
    pid.key_len = N(vm, v[2])->u.s.n;
    pid.location = N(vm, v[3])->u.s.p;
    pid.location_len = N(vm, v[3])->u.s.n;
    if (pid.key_len == 0 || memchr(pid.key, '/', pid.key_len) != NULL || memchr(pid.key, '\0', pid.key_len) != NULL)
        return VM_FAIL(MLU_EFORMAT, at, "BINPERSID at byte %zu: storage key '%.*s' is not a plain name", at,
                       (int)pid.key_len, pid.key);
    if (grow((void **)&vm->pids, &vm->cap_pids, (uint64_t)vm->n_pids + 1, sizeof(*vm->pids)) < 0 ||
        (node = new_node(vm, MLU_PKN_STORAGE)) == MLU_PK_NONE_ID)
        return (st = fail_nomem(vm, at, err));
    pid.storage = (uint32_t)at; /* byte offset until mlu_pk_finish resolves it */
    vm->pids[vm->n_pids] = pid;
    N(vm, node)->u.ref = vm->n_pids++;
    *out = node;
    return st;
}

/* ------------------------------------------------------------------- run */

static mlu_status do_global(mlu_pk_vm *vm, size_t at, const char *mod, size_t ml, const char *name, size_t nl,
                            uint32_t *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t i;
    int gid = 0, dt = -1, kind = MLU_PKN_GLOBAL;
    uint32_t node;
    const char *m0 = mod;
    size_t ml0 = ml;

    compat_module(&mod, &ml);
    for (i = 0; i < N_ALLOWED; i++)
        if (name_eq(mod, ml, allowed_globals[i].module) && name_eq(name, nl, allowed_globals[i].name))
            gid = allowed_globals[i].id;
    if (gid == 0 && name_eq(mod, ml, "torch")) {
        /* canonical torch names only: torch's weights-only allowlist is keyed by
         * str(dtype) ("torch.float32"), so GLOBAL torch.float or torch.half is
         * refused there, and here */
        if ((dt = mlu_torch_dtype_find(name, nl)) >= 0) {
            kind = MLU_PKN_DTYPE;
        } else if ((dt = mlu_torch_storage_class_find(name, nl)) >= 0) {
            gid = G_STORAGE_CLASS;
        }
    }
    if (gid == 0 && kind == MLU_PKN_GLOBAL) {
        int unsupported = name_eq(mod, ml, CUDA_STORAGE_MODULE) && mlu_torch_storage_class_find(name, nl) >= 0;
        for (i = 0; i < N_UNSUPPORTED; i++)
            if (name_eq(mod, ml, allowed_unsupported[i].module) && name_eq(name, nl, allowed_unsupported[i].name))
                unsupported = 1;
        if (unsupported)
            VM_FAIL(MLU_EFORMAT, at, "GLOBAL %.*s.%.*s at byte %zu is allowed by torch but not supported by this loader",
                    (int)ml, mod, (int)nl, name, at);
        else
            VM_FAIL(MLU_EUNSAFE, at, "unsupported global: GLOBAL %.*s.%.*s at byte %zu is not on the weights-only allowlist",
                    (int)ml0, m0, (int)nl, name, at);
        goto done;
    }
    if ((node = new_node(vm, (uint8_t)kind)) == MLU_PK_NONE_ID) {
        st = fail_nomem(vm, at, err);
        goto done;
    }
    N(vm, node)->sub = (uint16_t)(kind == MLU_PKN_DTYPE ? dt : gid);
    N(vm, node)->u.i = dt;
    *out = node;
done:
    return st;
}

/* Reads a '\n'-terminated line for GLOBAL. */
static int read_line(const uint8_t *d, size_t size, size_t *pos, const char **p, size_t *n)
{
    const uint8_t *nl;
    if (*pos >= size)
        return -1;
    nl = memchr(d + *pos, '\n', size - *pos);
    if (nl == NULL)
        return -1;
    *p = (const char *)d + *pos;
    *n = (size_t)(nl - (d + *pos));
    *pos += *n + 1;
    return 0;
}

/* One run of the VM: the input and where it stands.  Each opcode family has
 * one load_* function (as CPython's _pickle.c has), called with the opcode
 * in c->op and c->pos just past it; it moves c->pos past its argument and
 * returns MLU_OK, or fails with err set (naming the opcode's byte offset). */
typedef struct pk_run {
    mlu_pk_vm *vm;
    const uint8_t *data;  /* borrowed */
    size_t size;
    size_t pos;           /* the next byte to read */
    size_t at;            /* byte offset of the current opcode */
    size_t base;          /* stack index of the innermost MARK (0 without one) */
    uint8_t op;
    int stopped;          /* STOP seen: root holds the result */
    uint32_t root;
    mlu_error *err;
} pk_run;

typedef mlu_status (*pk_load_fn)(pk_run *c);

/* In a load_* function with `vm`, `err` and `st` in scope and an error: label. */
#define NEED(k)                                                                                         \
    do {                                                                                                \
        if (c->size - c->pos < (size_t)(k)) {                                                           \
            vm->truncated = 1;                                                                          \
            VM_FAIL(MLU_EFORMAT, c->at, "pickle is truncated: opcode 0x%02x at byte %zu needs %zu more bytes", c->op, \
                    c->at, (size_t)(k));                                                                \
            goto error;                                                                                 \
        }                                                                                               \
    } while (0)
#define POPN(k)                                                                                         \
    do {                                                                                                \
        if (vm->n_stack < (size_t)(k) + c->base) {                                                      \
            VM_FAIL(MLU_EFORMAT, c->at, "stack underflow: opcode 0x%02x ('%c') at byte %zu", c->op,     \
                    c->op >= 32 && c->op < 127 ? c->op : '?', c->at);                                   \
            goto error;                                                                                 \
        }                                                                                               \
    } while (0)
#define TOP(k) (vm->stack[vm->n_stack - (k)])
#define OOM()                                                                                           \
    do {                                                                                                \
        if (vm->over_budget)                                                                            \
            VM_FAIL(MLU_EFORMAT, c->at, "pickle expands beyond its size at byte %zu", c->at);           \
        else                                                                                            \
            VM_FAIL(MLU_ENOMEM, c->at, "out of memory reading the pickle");                             \
        goto error;                                                                                     \
    } while (0)
#define PUSH(id)                                                                                        \
    do {                                                                                                \
        uint32_t id_ = (id);                                                                            \
        if (id_ == MLU_PK_NONE_ID || push(vm, id_) < 0)                                                 \
            OOM();                                                                                      \
    } while (0)
/* Declarations and the exit every load_* function shares. */
#define LOAD_BEGIN                                                                                      \
    mlu_pk_vm *vm = c->vm;                                                                              \
    mlu_error *err = c->err;                                                                            \
    mlu_status st = MLU_EFORMAT
#define LOAD_END                                                                                        \
    st = MLU_OK;                                                                                        \
    goto done;                                                                                          \
error:                                                                                                  \
    if (st == MLU_OK)                                                                                   \
        st = MLU_EFORMAT;                                                                               \
done:                                                                                                   \
    return st

/* PROTO: protocols up to 5 (no FRAME follows in what torch writes; FRAME is refused). */
static mlu_status load_proto(pk_run *c)
{
    LOAD_BEGIN;
    NEED(1);
    if (c->data[c->pos] > 5) {
        VM_FAIL(MLU_EFORMAT, c->at, "unsupported pickle protocol %u at byte %zu", c->data[c->pos], c->at);
        goto error;
    }
    c->pos += 1;
    LOAD_END;
}

/* STOP: the top of the whole stack is the result. */
static mlu_status load_stop(pk_run *c)
{
    LOAD_BEGIN;
    c->base = 0;
    POPN(1);
    c->root = TOP(1);
    c->stopped = 1;
    LOAD_END;
}

/* NONE, NEWTRUE, NEWFALSE: shared constant nodes. */
static mlu_status load_const(pk_run *c)
{
    LOAD_BEGIN;
    if (c->op == MLU_PKOP_NONE)
        PUSH(const_node(vm, MLU_PKN_NONE, 0));
    else
        PUSH(const_node(vm, MLU_PKN_BOOL, c->op == MLU_PKOP_NEWTRUE));
    LOAD_END;
}

/* BININT1, BININT2, BININT: little-endian ints of 1, 2 (unsigned) and 4 (signed) bytes. */
static mlu_status load_binint(pk_run *c)
{
    LOAD_BEGIN;
    const uint8_t *data = c->data;
    size_t pos = c->pos, k = c->op == MLU_PKOP_BININT1 ? 1 : c->op == MLU_PKOP_BININT2 ? 2 : 4;
    int64_t v;

    NEED(k);
    if (c->op == MLU_PKOP_BININT1)
        v = data[pos];
    else if (c->op == MLU_PKOP_BININT2)
        v = mlu_le16(data + pos);
    else
        v = (int32_t)mlu_le32(data + pos);
    c->pos += k;
    PUSH(int_node(vm, v));
    LOAD_END;
}

/* LONG1: two's complement of up to 255 bytes; over 8 bytes kept as bytes (BIGINT). */
static mlu_status load_long1(pk_run *c)
{
    LOAD_BEGIN;
    const uint8_t *data = c->data;
    size_t k, j;
    uint32_t node;

    NEED(1);
    k = data[c->pos++];
    NEED(k);
    if (k <= 8) {
        uint64_t u = 0;
        for (j = 0; j < k; j++)
            u |= (uint64_t)data[c->pos + j] << (8 * j);
        if (k > 0 && k < 8 && (data[c->pos + k - 1] & 0x80))
            u |= ~(uint64_t)0 << (8 * k);
        node = int_node(vm, (int64_t)u);
    } else {
        node = bytes_node(vm, MLU_PKN_BIGINT, data + c->pos, (uint32_t)k);
    }
    c->pos += k;
    PUSH(node);
    LOAD_END;
}

/* BINFLOAT: a big-endian IEEE double. */
static mlu_status load_binfloat(pk_run *c)
{
    LOAD_BEGIN;
    uint64_t u = 0;
    size_t j;
    double d;

    NEED(8);
    for (j = 0; j < 8; j++)
        u = (u << 8) | c->data[c->pos + j];
    memcpy(&d, &u, 8);
    c->pos += 8;
    PUSH(float_node(vm, d));
    LOAD_END;
}

/* BINUNICODE (4-byte length), SHORT_BINSTRING (1-byte length): str nodes. */
static mlu_status load_string(pk_run *c)
{
    LOAD_BEGIN;
    uint32_t n, node;

    if (c->op == MLU_PKOP_BINUNICODE) {
        NEED(4);
        n = mlu_le32(c->data + c->pos);
        c->pos += 4;
    } else {
        NEED(1);
        n = c->data[c->pos++];
    }
    NEED(n);
    /* torch decodes BINUNICODE as UTF-8 with surrogatepass and SHORT_BINSTRING as strict
     * UTF-8 while unpickling: every string, used or not */
    if (mlu_utf8_invalid_at(c->data + c->pos, n, c->op == MLU_PKOP_BINUNICODE) != n) {
        VM_FAIL(MLU_EFORMAT, c->at, "string at byte %zu is not valid UTF-8", c->at);
        goto error;
    }
    node = bytes_node(vm, MLU_PKN_STR, c->data + c->pos, n);
    c->pos += n;
    PUSH(node);
    LOAD_END;
}

/* EMPTY_TUPLE (shared), EMPTY_LIST, EMPTY_DICT, EMPTY_SET. */
static mlu_status load_empty(pk_run *c)
{
    LOAD_BEGIN;
    if (c->op == MLU_PKOP_EMPTY_TUPLE)
        PUSH(const_node(vm, MLU_PKN_TUPLE, 0));
    else
        PUSH(new_node(vm, c->op == MLU_PKOP_EMPTY_LIST ? MLU_PKN_LIST
                          : c->op == MLU_PKOP_EMPTY_DICT ? MLU_PKN_DICT : MLU_PKN_SET));
    LOAD_END;
}

static mlu_status load_mark(pk_run *c)
{
    LOAD_BEGIN;
    if (grow_size((void **)&vm->marks, &vm->cap_marks, vm->n_marks + 1, sizeof(size_t)) < 0)
        OOM();
    vm->marks[vm->n_marks++] = vm->n_stack;
    LOAD_END;
}

/* TUPLE1, TUPLE2, TUPLE3: a tuple of the top 1..3 items. */
static mlu_status load_small_tuple(pk_run *c)
{
    LOAD_BEGIN;
    size_t k = (size_t)(c->op - MLU_PKOP_TUPLE1 + 1), j;
    uint32_t node;

    POPN(k);
    node = new_node(vm, MLU_PKN_TUPLE);
    if (node == MLU_PK_NONE_ID)
        OOM();
    for (j = k; j > 0; j--)
        if (add_item(vm, node, TOP(j)) < 0)
            OOM();
    vm->n_stack -= k;
    PUSH(node);
    LOAD_END;
}

/* TUPLE, APPENDS, SETITEMS: the items above the innermost MARK, into a new
 * tuple or the list / dict below that MARK. */
static mlu_status load_marked(pk_run *c)
{
    LOAD_BEGIN;
    size_t j, k, base = c->base;
    uint8_t op = c->op;
    uint32_t target = 0;

    if (vm->n_marks == 0) {
        VM_FAIL(MLU_EFORMAT, c->at, "opcode '%c' at byte %zu without a MARK", op, c->at);
        goto error;
    }
    k = vm->n_stack - base;
    if (op != MLU_PKOP_TUPLE) {
        size_t outer = vm->n_marks >= 2 ? vm->marks[vm->n_marks - 2] : 0;
        if (base <= outer) {
            VM_FAIL(MLU_EFORMAT, c->at, "stack underflow: opcode '%c' at byte %zu has no target", op, c->at);
            goto error;
        }
        target = vm->stack[base - 1];
        if (op == MLU_PKOP_APPENDS && N(vm, target)->kind != MLU_PKN_LIST) {
            VM_FAIL(MLU_EUNSAFE, c->at, "APPENDS at byte %zu on a %s (only lists allowed)", c->at,
                    mlu_pk_kind_name(N(vm, target)->kind));
            goto error;
        }
        if (op == MLU_PKOP_SETITEMS && N(vm, target)->kind != MLU_PKN_DICT) {
            VM_FAIL(MLU_EUNSAFE, c->at, "SETITEMS at byte %zu on a %s (only dicts allowed)", c->at,
                    mlu_pk_kind_name(N(vm, target)->kind));
            goto error;
        }
        if (op == MLU_PKOP_SETITEMS && (k % 2) != 0) {
            VM_FAIL(MLU_EFORMAT, c->at, "SETITEMS at byte %zu with an odd number of items", c->at);
            goto error;
        }
    } else {
        target = new_node(vm, MLU_PKN_TUPLE);
        if (target == MLU_PK_NONE_ID)
            OOM();
    }
    for (j = 0; j < k; j++)
        if (add_item(vm, target, vm->stack[base + j]) < 0)
            OOM();
    vm->n_stack = base;
    vm->n_marks--;
    if (op == MLU_PKOP_TUPLE)
        PUSH(target);
    LOAD_END;
}

/* APPEND, SETITEM: one item (pair) into the list (dict) below it. */
static mlu_status load_append(pk_run *c)
{
    LOAD_BEGIN;
    size_t k = c->op == MLU_PKOP_APPEND ? 1 : 2, j;
    uint32_t target;

    POPN(k + 1);
    target = TOP(k + 1);
    if (c->op == MLU_PKOP_APPEND && N(vm, target)->kind != MLU_PKN_LIST) {
        VM_FAIL(MLU_EUNSAFE, c->at, "APPEND at byte %zu on a %s (only lists allowed)", c->at,
                mlu_pk_kind_name(N(vm, target)->kind));
        goto error;
    }
    if (c->op == MLU_PKOP_SETITEM && N(vm, target)->kind != MLU_PKN_DICT) {
        VM_FAIL(MLU_EUNSAFE, c->at, "SETITEM at byte %zu on a %s (only dicts allowed)", c->at,
                mlu_pk_kind_name(N(vm, target)->kind));
        goto error;
    }
    for (j = k; j > 0; j--)
        if (add_item(vm, target, TOP(j)) < 0)
            OOM();
    vm->n_stack -= k;
    LOAD_END;
}

/* The memo index argument of PUT and GET: 1 byte (w = 1) or 4 (w = 4). */
static mlu_status memo_index(pk_run *c, size_t w, size_t *idx)
{
    LOAD_BEGIN;
    NEED(w);
    *idx = w == 1 ? c->data[c->pos] : mlu_le32(c->data + c->pos);
    c->pos += w;
    LOAD_END;
}

/* BINPUT, LONG_BINPUT: memo[idx] = top of the stack. */
static mlu_status load_put(pk_run *c)
{
    LOAD_BEGIN;
    size_t idx;

    if ((st = memo_index(c, c->op == MLU_PKOP_BINPUT ? 1 : 4, &idx)) != MLU_OK)
        goto error;
    POPN(1);
    if (idx > c->size) {
        VM_FAIL(MLU_EFORMAT, c->at, "memo index %zu at byte %zu is larger than the pickle", idx, c->at);
        goto error;
    }
    if (idx >= vm->n_memo) {
        size_t cap = vm->n_memo, j;
        if (grow_size((void **)&vm->memo, &cap, idx + 1, sizeof(uint32_t)) < 0 ||
            charge(vm, (uint64_t)(cap - vm->n_memo) * PK_COST_MEMO) < 0)
            OOM();
        for (j = vm->n_memo; j < cap; j++)
            vm->memo[j] = MLU_PK_NONE_ID;
        vm->n_memo = cap;
    }
    vm->memo[idx] = TOP(1);
    LOAD_END;
}

/* BINGET, LONG_BINGET: push memo[idx]. */
static mlu_status load_get(pk_run *c)
{
    LOAD_BEGIN;
    size_t idx;

    if ((st = memo_index(c, c->op == MLU_PKOP_BINGET ? 1 : 4, &idx)) != MLU_OK)
        goto error;
    if (idx >= vm->n_memo || vm->memo[idx] == MLU_PK_NONE_ID) {
        VM_FAIL(MLU_EFORMAT, c->at, "memo misuse: GET of undefined memo entry %zu at byte %zu", idx, c->at);
        goto error;
    }
    PUSH(vm->memo[idx]);
    LOAD_END;
}

/* GLOBAL "module\nname\n": only names on the allowlist. */
static mlu_status load_global(pk_run *c)
{
    LOAD_BEGIN;
    const char *mod, *name;
    size_t ml, nl;
    uint32_t node = MLU_PK_NONE_ID;

    if (read_line(c->data, c->size, &c->pos, &mod, &ml) < 0 || read_line(c->data, c->size, &c->pos, &name, &nl) < 0) {
        vm->truncated = 1;
        VM_FAIL(MLU_EFORMAT, c->at, "pickle is truncated: GLOBAL at byte %zu", c->at);
        goto error;
    }
    if (do_global(vm, c->at, mod, ml, name, nl, &node, err) != MLU_OK)
        goto error;
    PUSH(node);
    LOAD_END;
}

/* REDUCE: an allowed global applied to a tuple. */
static mlu_status load_reduce(pk_run *c)
{
    LOAD_BEGIN;
    uint32_t fn, args, node = MLU_PK_NONE_ID;

    POPN(2);
    fn = TOP(2);
    args = TOP(1);
    if (N(vm, fn)->kind != MLU_PKN_GLOBAL) {
        VM_FAIL(MLU_EUNSAFE, c->at, "REDUCE at byte %zu calls a %s, not an allowed global", c->at,
                mlu_pk_kind_name(N(vm, fn)->kind));
        goto error;
    }
    if (apply(vm, c->at, fn, args, &node, 0, err) != MLU_OK)
        goto error;
    vm->n_stack -= 2;
    PUSH(node);
    LOAD_END;
}

/* NEWOBJ: torch.nn.Parameter.__new__(Parameter, tensor[, requires_grad]) only. */
static mlu_status load_newobj(pk_run *c)
{
    LOAD_BEGIN;
    uint32_t cls, args, *v, node = MLU_PK_NONE_ID;
    int rg = 1;

    POPN(2);
    cls = TOP(2);
    args = TOP(1);
    if (N(vm, cls)->kind != MLU_PKN_GLOBAL || N(vm, cls)->sub != G_PARAMETER) {
        VM_FAIL(MLU_EUNSAFE, c->at, "NEWOBJ at byte %zu on a %s (only torch.nn.Parameter allowed)", c->at,
                mlu_pk_kind_name(N(vm, cls)->kind));
        goto error;
    }
    v = N(vm, args)->u.items;
    if (N(vm, args)->kind != MLU_PKN_TUPLE || N(vm, args)->len < 1 || N(vm, args)->len > 2 ||
        N(vm, v[0])->kind != MLU_PKN_TENSOR || (N(vm, args)->len == 2 && bool_arg(vm, v[1], &rg) < 0)) {
        VM_FAIL(MLU_EFORMAT, c->at, "NEWOBJ at byte %zu: Parameter takes (tensor[, bool])", c->at);
        goto error;
    }
    if (param_copy(vm, c->at, v[0], rg, &node, err) != MLU_OK)
        goto error;
    vm->n_stack -= 2;
    PUSH(node);
    LOAD_END;
}

/* BUILD: an OrderedDict's attribute dict; nothing else has state here. */
static mlu_status load_build(pk_run *c)
{
    LOAD_BEGIN;
    uint32_t inst, state;

    POPN(2);
    inst = TOP(2);
    state = TOP(1);
    if (N(vm, inst)->kind != MLU_PKN_DICT || !(N(vm, inst)->flags & MLU_PK_F_ORDERED)) {
        if (N(vm, inst)->kind == MLU_PKN_TENSOR) {
            VM_FAIL(MLU_EFORMAT, c->at, "BUILD at byte %zu: tensor state is not supported by this loader", c->at);
            goto error;
        }
        VM_FAIL(MLU_EUNSAFE, c->at, "BUILD at byte %zu on a %s (only OrderedDict allowed)", c->at,
                mlu_pk_kind_name(N(vm, inst)->kind));
        goto error;
    }
    if (N(vm, state)->kind != MLU_PKN_DICT || N(vm, inst)->attrs != MLU_PK_NONE_ID) {
        VM_FAIL(MLU_EFORMAT, c->at, "BUILD at byte %zu: OrderedDict state must be one dict", c->at);
        goto error;
    }
    N(vm, inst)->attrs = state;
    vm->n_stack -= 1;
    LOAD_END;
}

/* BINPERSID: a storage reference ('storage', cls, key, location, numel[, ...]). */
static mlu_status load_binpersid(pk_run *c)
{
    LOAD_BEGIN;
    uint32_t node = MLU_PK_NONE_ID;

    POPN(1);
    if (persistent_load(vm, c->at, TOP(1), &node, err) != MLU_OK)
        goto error;
    vm->n_stack -= 1;
    PUSH(node);
    LOAD_END;
}

/* The opcodes a weights-only pickle may use; every other one is refused. */
static const pk_load_fn dispatch[256] = {
    [MLU_PKOP_PROTO] = load_proto,
    [MLU_PKOP_STOP] = load_stop,
    [MLU_PKOP_NONE] = load_const,
    [MLU_PKOP_NEWTRUE] = load_const,
    [MLU_PKOP_NEWFALSE] = load_const,
    [MLU_PKOP_BININT1] = load_binint,
    [MLU_PKOP_BININT2] = load_binint,
    [MLU_PKOP_BININT] = load_binint,
    [MLU_PKOP_LONG1] = load_long1,
    [MLU_PKOP_BINFLOAT] = load_binfloat,
    [MLU_PKOP_BINUNICODE] = load_string,
    [MLU_PKOP_SHORT_BINSTRING] = load_string,
    [MLU_PKOP_EMPTY_TUPLE] = load_empty,
    [MLU_PKOP_EMPTY_LIST] = load_empty,
    [MLU_PKOP_EMPTY_DICT] = load_empty,
    [MLU_PKOP_EMPTY_SET] = load_empty,
    [MLU_PKOP_MARK] = load_mark,
    [MLU_PKOP_TUPLE1] = load_small_tuple,
    [MLU_PKOP_TUPLE2] = load_small_tuple,
    [MLU_PKOP_TUPLE3] = load_small_tuple,
    [MLU_PKOP_TUPLE] = load_marked,
    [MLU_PKOP_APPENDS] = load_marked,
    [MLU_PKOP_SETITEMS] = load_marked,
    [MLU_PKOP_APPEND] = load_append,
    [MLU_PKOP_SETITEM] = load_append,
    [MLU_PKOP_BINPUT] = load_put,
    [MLU_PKOP_LONG_BINPUT] = load_put,
    [MLU_PKOP_BINGET] = load_get,
    [MLU_PKOP_LONG_BINGET] = load_get,
    [MLU_PKOP_GLOBAL] = load_global,
    [MLU_PKOP_REDUCE] = load_reduce,
    [MLU_PKOP_NEWOBJ] = load_newobj,
    [MLU_PKOP_BUILD] = load_build,
    [MLU_PKOP_BINPERSID] = load_binpersid,
};

mlu_status mlu_pk_run(mlu_pk_vm *vm, const uint8_t *data, size_t size, size_t *ppos, int legacy, uint32_t *root,
                      mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    pk_run c = {0};
    pk_load_fn load;

    c.vm = vm;
    c.data = data;
    c.size = size;
    c.pos = c.at = *ppos;
    c.err = err;
    vm->data = data;
    vm->size = size;
    vm->legacy = legacy;
    vm->over_budget = 0;
    vm->truncated = 0;
    {
        uint64_t extra = PK_COST_PER_BYTE * (uint64_t)(size - c.pos) + PK_COST_BASE;
        vm->budget = vm->budget > UINT64_MAX - extra ? UINT64_MAX : vm->budget + extra;
    }
    vm->n_stack = 0;
    vm->n_marks = 0;
    mlu_free(vm->memo);
    vm->memo = NULL;
    vm->n_memo = 0;
    while (!c.stopped) {
        c.at = c.pos;
        if (c.pos >= size) {
            vm->truncated = 1;
            VM_FAIL(MLU_EFORMAT, c.at, "pickle is truncated: no STOP opcode before byte %zu", c.at);
            goto error;
        }
        c.op = data[c.pos++];
        c.base = vm->n_marks ? vm->marks[vm->n_marks - 1] : 0;
        load = dispatch[c.op];
        if (load == NULL) {
            VM_FAIL(MLU_EUNSAFE, c.at, "unsupported opcode 0x%02x ('%c') at byte %zu: not allowed in a weights-only pickle",
                    c.op, c.op >= 32 && c.op < 127 ? c.op : '?', c.at);
            goto error;
        }
        if (load(&c) != MLU_OK)
            goto error;
    }
    *root = c.root;
    *ppos = c.pos;
    st = MLU_OK;
    goto done;
error:
    if (st == MLU_OK || err == NULL || err->code == MLU_OK)
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)c.at, "malformed pickle at byte %zu", c.at);
    else
        st = err->code;
done:
    return st;
}

/* ------------------------------------------------------------------ finish */

static int key_cmp(const mlu_pk_pid *a, const mlu_pk_pid *b)
{
    return mlu_bytes_cmp(a->key, a->key_len, b->key, b->key_len);
}

/* The order of pids x and y by key (an mlu_index_cmp over vm->pids). */
static int pid_cmp(const void *ctx, size_t x, size_t y)
{
    const mlu_pk_pid *pids = ctx;

    return key_cmp(&pids[x], &pids[y]);
}

mlu_status mlu_pk_finish(mlu_pk_vm *vm, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t *order = NULL; /* owned: pid indices sorted by key */
    uint32_t i, j;
    size_t k;

    mlu_free(vm->storages);
    vm->storages = NULL;
    vm->n_storages = 0;
    if (vm->n_pids == 0)
        goto done;
    order = mlu_calloc(vm->n_pids, sizeof(*order));
    vm->storages = mlu_calloc(vm->n_pids, sizeof(*vm->storages));
    if (order == NULL || vm->storages == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for %u storages", vm->n_pids);
        goto done;
    }
    for (i = 0; i < vm->n_pids; i++)
        order[i] = i;
    /* stable merge not needed: the first pid (lowest byte offset) is found by scanning each group */
    mlu_sort_indices(order, vm->n_pids, pid_cmp, vm->pids);
    for (i = 0; i < vm->n_pids; i = j) {
        mlu_pk_pid *first = &vm->pids[order[i]];
        size_t first_idx = order[i];  /* pids are in pickle order: the lowest index is the first use */
        mlu_pk_storage *s = &vm->storages[vm->n_storages];
        for (j = i; j < vm->n_pids && key_cmp(&vm->pids[order[j]], first) == 0; j++) {
            mlu_pk_pid *p = &vm->pids[order[j]];
            if (p->nbytes != first->nbytes) {
                st = mlu_error_set(err, MLU_EFORMAT, (int64_t)p->storage, "storage '%.*s' is declared with %llu bytes at byte %u and %llu bytes at byte %u",
                                   (int)p->key_len, p->key, (unsigned long long)first->nbytes, first->storage,
                                   (unsigned long long)p->nbytes, p->storage);
                goto done;
            }
            if (order[j] < first_idx) {
                first = p;
                first_idx = order[j];
            }
        }
        s->key = first->key;
        s->key_len = first->key_len;
        s->nbytes = first->nbytes;
        s->legacy_numel = first->numel;
        s->dtype = first->dtype;
        s->first_offset = first->storage;
        s->swap_unit = first->dtype >= 0 ? mlu_torch_dtypes[first->dtype].swap_unit : 0;
        for (k = i; k < j; k++)
            vm->pids[order[k]].storage = vm->n_storages;
        vm->n_storages++;
    }
    /* torch.load keeps the first declaration of a key (one typed storage):
     * a tensor rebuilt without a dtype of its own (not v3) takes that
     * declaration's dtype, whatever storage class its own pid names; an
     * UntypedStorage declaration is loaded as uint8 (a uint16 tensor and a
     * uint8 view of its bytes, saved in that order, come back so) */
    for (i = 0; i < vm->n_tensors; i++) {
        mlu_pk_tensor *t = &vm->tensors[i];
        mlu_pk_storage *s = &vm->storages[vm->pids[t->pid].storage];
        if (t->dtype < 0)
            t->dtype = s->dtype >= 0 ? s->dtype : MLU_TORCH_DTYPE_UINT8;
        if ((st = check_view(vm, t, err)) != MLU_OK)
            goto done;
    }
    /* untyped storages byte-swap by the element of the first tensor that views them */
    for (i = 0; i < vm->n_tensors; i++) {
        mlu_pk_storage *s = &vm->storages[vm->pids[vm->tensors[i].pid].storage];
        int unit = mlu_torch_dtypes[vm->tensors[i].dtype].swap_unit;
        if (s->swap_unit == 0)
            s->swap_unit = unit;
        else if (s->dtype < 0 && s->swap_unit != unit)
            s->swap_unit = -1; /* conflicting views: only a problem for big-endian files */
    }
done:
    mlu_free(order);
    return st;
}
