/* errors.c: the one path from a core status to a Python exception.
 *
 * Which class each status becomes is in one table (status_class); the
 * class of MLU_EFORMAT depends on the area (domain_format); OSError is
 * built in one place (raise_os_error), with errno and, when the caller knows
 * it, the file name. */
#include "module.h"

#include <assert.h>
#include <stddef.h>
#include <string.h>

#define FROM_DOMAIN ((ptrdiff_t)-1) /* the domain's format class */
#define NO_FIELD ((ptrdiff_t)-2)    /* a builtin class */

/* A class: a builtin (*builtin) or a field of the module state. */
typedef struct exc_ref {
    PyObject **builtin;
    ptrdiff_t state_field; /* offsetof(mlu_state, ...), NO_FIELD or FROM_DOMAIN */
} exc_ref;

#define BUILTIN(name) {&PyExc_##name, NO_FIELD}
#define STATE(name) {NULL, (ptrdiff_t)offsetof(mlu_state, name)}

/* status -> class; MLU_OK has none (raising it is a SystemError). */
static const exc_ref status_class[MLU_STATUS_COUNT] = {
    [MLU_OK] = {NULL, NO_FIELD},
    [MLU_ENOMEM] = BUILTIN(MemoryError),
    [MLU_EINVAL] = BUILTIN(ValueError),
    [MLU_ETYPE] = BUILTIN(TypeError),
    [MLU_EOVERFLOW] = BUILTIN(OverflowError),
    [MLU_EIO] = BUILTIN(OSError), /* its subclass picked by errno */
    [MLU_EFORMAT] = {NULL, FROM_DOMAIN},
    [MLU_EUNSAFE] = STATE(UnsafePickleError),
    [MLU_ENOTSUP] = BUILTIN(RuntimeError),
    [MLU_EDEVICE] = BUILTIN(RuntimeError),
};

/* domain -> the class of MLU_EFORMAT there. */
static const exc_ref domain_format[MLU_DOMAIN_COUNT] = {
    [MLU_DOMAIN_VALUE] = BUILTIN(ValueError),
    [MLU_DOMAIN_SAFETENSORS] = STATE(SafetensorsError),
    [MLU_DOMAIN_TORCH] = STATE(TorchFormatError),
    [MLU_DOMAIN_PATTERN] = STATE(PatternError),
};

#undef BUILTIN
#undef STATE

/* Borrowed: the class ref names. */
static PyObject *resolve(mlu_state *st, exc_ref ref)
{
    if (ref.builtin != NULL)
        return *ref.builtin;
    return *(PyObject **)((char *)st + ref.state_field);
}

/* OSError(errno, message[, filename]); OSError's constructor picks the
 * subclass (FileNotFoundError, PermissionError, ...) from errno.  With a
 * file name the message is strerror alone, as open() raises it; without,
 * "what we did: strerror". */
static void raise_os_error(int sys_errno, const char *text, PyObject *filename)
{
    char msg[MLU_ERROR_TEXT + 128];
    PyObject *umsg = NULL, *args = NULL;

    if (sys_errno != 0 && filename != NULL)
        PyOS_snprintf(msg, sizeof(msg), "%s", strerror(sys_errno));
    else if (sys_errno != 0)
        PyOS_snprintf(msg, sizeof(msg), "%s: %s", text, strerror(sys_errno));
    else
        PyOS_snprintf(msg, sizeof(msg), "%s", text);
    umsg = PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace"); /* new ref */
    if (umsg == NULL)
        goto done;
    if (filename != NULL)
        args = Py_BuildValue("(iOO)", sys_errno, umsg, filename);
    else
        args = Py_BuildValue("(iO)", sys_errno, umsg);
    if (args != NULL)
        PyErr_SetObject(PyExc_OSError, args);
done:
    Py_XDECREF(args);
    Py_XDECREF(umsg);
}

PyObject *mlu_raise(mlu_state *st, const mlu_error *err, mlu_domain domain, PyObject *filename)
{
    const char *text = err->text[0] ? err->text : mlu_status_name(err->code);
    PyObject *exc; /* borrowed */

    assert(st != NULL);
    if ((int)err->code <= (int)MLU_OK || err->code >= MLU_STATUS_COUNT ||
        (int)domain < 0 || domain >= MLU_DOMAIN_COUNT) {
        PyErr_Format(PyExc_SystemError, "mlutils: error raised with status %d (domain %d)",
                     (int)err->code, (int)domain);
        return NULL;
    }
    if (err->code == MLU_EIO) {
        raise_os_error(err->sys_errno, text, filename);
        return NULL;
    }
    if (status_class[err->code].state_field == FROM_DOMAIN)
        exc = resolve(st, domain_format[domain]);
    else
        exc = resolve(st, status_class[err->code]);
    PyErr_Format(exc, "%s", text);
    return NULL;
}

PyObject *mlu_raise_errno(mlu_state *st, int sys_errno, PyObject *filename)
{
    mlu_error err;

    mlu_error_clear(&err);
    err.code = MLU_EIO;
    err.sys_errno = sys_errno;
    return mlu_raise(st, &err, MLU_DOMAIN_VALUE, filename);
}
