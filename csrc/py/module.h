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
 * (NULL until its init ran; visited and cleared in module.c from MLU_STATE_FIELDS). */
typedef struct mlu_state {
#define MLU_STATE_FIELD_DECL(name, doc) PyObject *name;
    MLU_STATE_FIELDS(MLU_STATE_FIELD_DECL)
#undef MLU_STATE_FIELD_DECL
} mlu_state;

extern PyModuleDef mlu_module_def;

/* Borrowed: the state of the module (from the module, or from one of its heap types). */
mlu_state *mlu_get_state(PyObject *module);
mlu_state *mlu_state_from_type(PyTypeObject *type);

/* The area an error comes from, where its class differs from the status's
 * (the table domain_class in errors.c): mostly the format error of the area
 * whose untrusted bytes were malformed. */
typedef enum mlu_domain {
    MLU_DOMAIN_VALUE = 0,    /* none: the status's class (MLU_EFORMAT: ValueError) */
    MLU_DOMAIN_SAFETENSORS,  /* MLU_EFORMAT: SafetensorsError */
    MLU_DOMAIN_TORCH,        /* MLU_EFORMAT: TorchFormatError */
    MLU_DOMAIN_PATTERN,      /* MLU_EINVAL, MLU_EFORMAT: PatternError */
    MLU_DOMAIN_JSON,         /* MLU_EFORMAT: JSONDecodeError(msg, doc, pos); subject: the document */
    MLU_DOMAIN_LIBRARY,      /* loading a native library: MLU_ENOTSUP: ImportError("text. subject") */
    MLU_DOMAIN_SELF_CHECK,   /* an object's own invariants: MLU_EFORMAT: AssertionError */
    MLU_DOMAIN_COUNT
} mlu_domain;

/* errors.c, the one status -> exception path: raises the class of
 * err->code (one table there; a domain may name another, see mlu_domain).
 * subject (borrowed, may be NULL) is what the error is about, used where the
 * class takes it: for MLU_EIO the file name (OSError(errno, message,
 * filename), its subclass picked by errno); in MLU_DOMAIN_JSON the document
 * as bytes, which err->offset indexes; in MLU_DOMAIN_LIBRARY a str appended
 * to the message; elsewhere the file the error is about (str, bytes or
 * os.PathLike; anything else is not shown), as mlu_raise_about shows it.
 * st (borrowed) must not be NULL.  Always returns NULL so call sites can
 * `return mlu_raise(...)`. */
PyObject *mlu_raise(mlu_state *st, const mlu_error *err, mlu_domain domain, PyObject *subject);

/* exc(PyUnicode_FromFormat(fmt, ...)), or exc("'path': text") when path
 * (borrowed, may be NULL: str, bytes or os.PathLike) names the file the
 * error is about and the text does not name it already: the one place a
 * file's name is put in an error's text.  Always returns NULL. */
PyObject *mlu_raise_about(PyObject *exc, PyObject *path, const char *fmt, ...);

/* mlu_raise for an error of a writer of the file at path (borrowed: str,
 * bytes or os.PathLike, as the caller was given it): an OSError carries
 * os.fspath(path) as its file name, errno and strerror as open() raises
 * them ("[Errno 2] No such file or directory: 'path'"), whichever step
 * failed (temp file, write, fsync, rename); any other error is raised as
 * without a subject.  Always returns NULL. */
PyObject *mlu_raise_write(mlu_state *st, const mlu_error *err, mlu_domain domain, PyObject *path);

/* The exception being raised, taken: a new ref (normalized, its traceback
 * attached) with the error indicator cleared; NULL when none is set. */
PyObject *mlu_take_raised(void);
/* Raises exc again (steals the ref; nothing when NULL). */
void mlu_restore_raised(PyObject *exc);

/* OSError for an errno from a system call made in the binding itself, as
 * mlu_raise makes it.  Always returns NULL. */
PyObject *mlu_raise_errno(mlu_state *st, int sys_errno, PyObject *filename);

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
int mlu_sigsave_module_init(PyObject *m);

#endif
