/* module.h: what every file of the binding includes: the module state and
 * its types (state.h), status -> exception conversion (errors.c), and the
 * init entry of each area, which module.c calls. */
#ifndef MLU_PY_MODULE_H
#define MLU_PY_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../mlu.h"
#include "state.h"

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
