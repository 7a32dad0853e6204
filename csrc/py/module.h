/* module.h: the binding layer's shared declarations: module state, the init
 * entry of each area, and status -> exception conversion. */
#ifndef MLU_PY_MODULE_H
#define MLU_PY_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../mlu.h"

/* Slots of mlu_state.area_objects, a few per area. */
enum mlu_slot {
    MLU_SLOT_SAFETENSORS_0 = 0, MLU_SLOT_SAFETENSORS_1, MLU_SLOT_SAFETENSORS_2, MLU_SLOT_SAFETENSORS_3,
    MLU_SLOT_PTLOAD_0, MLU_SLOT_PTLOAD_1, MLU_SLOT_PTLOAD_2, MLU_SLOT_PTLOAD_3,
    MLU_SLOT_PTSAVE_0, MLU_SLOT_PTSAVE_1, MLU_SLOT_PTSAVE_2, MLU_SLOT_PTSAVE_3,
    MLU_SLOT_SAMPLER_0, MLU_SLOT_SAMPLER_1, MLU_SLOT_SAMPLER_2, MLU_SLOT_SAMPLER_3,
    MLU_SLOT_PATTERN_0, MLU_SLOT_PATTERN_1, MLU_SLOT_PATTERN_2, MLU_SLOT_PATTERN_3,
    MLU_SLOT_NCCL_0,
    MLU_SLOT_COUNT
};

/* One module state; every field is owned by the module (cleared in
 * mlu_state_clear).  Areas add their heap types and cached objects here. */
typedef struct mlu_state {
    /* exceptions */
    PyObject *MlutilsError;       /* (Exception) */
    PyObject *JSONDecodeError;    /* (MlutilsError, json.JSONDecodeError) */
    PyObject *SafetensorsError;   /* (MlutilsError, ValueError) */
    PyObject *TorchFormatError;   /* (MlutilsError, ValueError) */
    PyObject *UnsafePickleError;  /* (TorchFormatError, pickle.UnpicklingError) */
    PyObject *SamplerStateError;  /* (MlutilsError, ValueError) */
    PyObject *PatternError;       /* (MlutilsError, ValueError) */
    /* area objects */
    PyObject *area_objects[MLU_SLOT_COUNT]; /* the areas' heap types and caches, see mlu_slot */
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
