/* path.h: where in a nested Python value a writer is, for error messages
 * ("obj['optimizer']['state'][3]").  A chain of steps lives on the C stack
 * of the recursive walk; nothing is allocated until an error is raised. */
#ifndef MLU_PY_PATH_H
#define MLU_PY_PATH_H

#include "module.h"

typedef struct mlu_path {
    const struct mlu_path *parent;
    PyObject *key;          /* borrowed: dict key or attribute name; NULL for a sequence index */
    Py_ssize_t index;
    int attr;               /* key is an attribute name: ".name" */
    PyObject *container;    /* borrowed: the container the step is in (cycle checks), or NULL */
} mlu_path;

/* New ref: root followed by every step, e.g. "data['a'][3]". */
PyObject *mlu_path_string(const char *root, const mlu_path *at);

/* Raises exc with "<formatted text> at <path>" (PyUnicode_FromFormat
 * formats); always returns -1. */
int mlu_path_fail(PyObject *exc, const char *root, const mlu_path *at, const char *fmt, ...);

#endif
