/* state.h: the module state of mlutils._core and what reaches it: the one
 * state struct, the module definition that holds it, the accessors every
 * area uses (from the module or from one of its heap types), and the helpers
 * that add a type to the module and to its state field.
 *
 * Every binding file uses these and module.c calls every area's init, so
 * they live apart from module.c (state.c): the areas depend on the state,
 * never on the file that wires them. */
#ifndef MLU_PY_STATE_H
#define MLU_PY_STATE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

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
    X(safetensors_entry_type, "SafetensorsEntry (struct sequence)")            \
    X(safetensors_dtype_type, "SafetensorsDtype (struct sequence)")            \
    X(sampler_cursor_type,  "SamplerCursor")                                   \
    X(sampler_position_type, "SamplerPosition (struct sequence)")              \
    X(pattern_table_type,   "PatternTable")                                    \
    X(nccl_comm_type,       "NcclComm")                                        \
    X(nccl_library_type,    "NcclLibrary (struct sequence)")                   \
    X(cuda_device_count_type, "CudaDeviceCount (struct sequence)")             \
    X(torch_dtype_type,     "TorchDtype (struct sequence)")                    \
    X(offload_pool_type,    "HostPool")                                        \
    X(offload_engine_type,  "CudaOffloadEngine")

/* One module state; every field is a strong reference owned by the module
 * (NULL until its init ran; visited and cleared in state.c from MLU_STATE_FIELDS). */
typedef struct mlu_state {
#define MLU_STATE_FIELD_DECL(name, doc) PyObject *name;
    MLU_STATE_FIELDS(MLU_STATE_FIELD_DECL)
#undef MLU_STATE_FIELD_DECL
} mlu_state;

/* The module's definition (state.c): its name, docstring and state (size,
 * traverse, clear, free).  Its m_slots, the exec step that fills the state,
 * are module.c's, which sets them in PyInit__core before the definition is
 * used; nothing here calls into module.c or any area. */
extern PyModuleDef mlu_module_def;

/* Borrowed: the state of the module (from the module, or from one of its heap types). */
mlu_state *mlu_get_state(PyObject *module);
mlu_state *mlu_state_from_type(PyTypeObject *type);

/* Makes the struct sequence type of desc (named "mlutils._core.<Name>"),
 * stores it in *field (a state field, which then owns it) and adds it to the
 * module as <Name>.  Returns 0 or -1. */
int mlu_add_struct_type(PyObject *m, PyStructSequence_Desc *desc, PyObject **field);

/* Makes the heap type of spec (named "mlutils._core.<Name>") for module m,
 * stores it in *field (a state field, which then owns it) and adds it to the
 * module as <Name>.  Returns 0 or -1. */
int mlu_add_heap_type(PyObject *m, PyType_Spec *spec, PyObject **field);

/* New ref: an instance of the struct sequence `type` (borrowed) holding
 * `values`, which it steals (all of them, even on failure; NULL entries mean
 * that making the value failed, and so does the call). */
PyObject *mlu_struct_new_steal(PyObject *type, PyObject **values, Py_ssize_t n);

#endif
