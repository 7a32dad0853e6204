/* module.h: the binding layer's shared declarations: module state, the init
 * entry of each area, and status -> exception conversion. */
#ifndef MLU_PY_MODULE_H
#define MLU_PY_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../mlu.h"

/* Every object the module state owns, once: X(field, doc).  The struct,
 * GC traverse and clear are all generated from this list, so none of them
 * can miss a field.  Adding an area = its fields here + its init function,
 * which fills them. */
#define MLU_STATE_FIELDS(X)                                                    \
    /* exceptions (module.c) */                                                \
    X(MlutilsError,       "(Exception)")                                       \
    X(JSONDecodeError,    "(MlutilsError, json.JSONDecodeError)")              \
    X(SafetensorsError,   "(MlutilsError, ValueError)")                        \
    X(TorchFormatError,   "(MlutilsError, ValueError)")                        \
    X(UnsafePickleError,  "(TorchFormatError, pickle.UnpicklingError)")        \
    X(SamplerStateError,  "(MlutilsError, ValueError)")                        \
    X(PatternError,       "(MlutilsError, ValueError, AssertionError)")        \
    /* heap types, each set by its area's init (safetensors.c, sampler.c, ...) */ \
    X(safetensors_map_type, "SafetensorsMap")                                  \
    X(sampler_cursor_type,  "SamplerCursor")                                   \
    X(pattern_table_type,   "PatternTable")                                    \
    X(nccl_comm_type,       "NcclComm")

/* One module state; every field is a strong reference owned by the module
 * (NULL until its init ran; cleared in mlu_state_clear). */
typedef struct mlu_state {
#define MLU_STATE_FIELD_DECL(name, doc) PyObject *name;
    MLU_STATE_FIELDS(MLU_STATE_FIELD_DECL)
#undef MLU_STATE_FIELD_DECL
} mlu_state;

extern PyModuleDef mlu_module_def;

/* Borrowed: the state of the module (from the module, or from one of its heap types). */
mlu_state *mlu_get_state(PyObject *module);
mlu_state *mlu_state_from_type(PyTypeObject *type);

/* Raises the Python exception matching err->code; MLU_EFORMAT uses
 * format_exc (borrowed; NULL means ValueError).  Always returns NULL so call
 * sites can `return mlu_raise(...)`. */
PyObject *mlu_raise(mlu_state *st, const mlu_error *err, PyObject *format_exc);

/* Each area's entry: adds its functions/types to the module (exec phase).
 * Return 0 on success, -1 with an exception set. */
int mlu_cuda_module_init(PyObject *m);
int mlu_json_module_init(PyObject *m);
int mlu_testing_module_init(PyObject *m);
int mlu_safetensors_module_init(PyObject *m);
int mlu_ptload_module_init(PyObject *m);
int mlu_ptsave_module_init(PyObject *m);
int mlu_sampler_module_init(PyObject *m);
int mlu_pattern_module_init(PyObject *m);
int mlu_nccl_module_init(PyObject *m);
int mlu_offload_module_init(PyObject *m);

#endif
