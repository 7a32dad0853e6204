/* errors.c: turning a core status into a Python exception. */
#include "module.h"

#include <string.h>

PyObject *mlu_raise(mlu_state *st, const mlu_error *err, PyObject *format_exc)
{
    PyObject *exc = NULL;
    const char *text = err->text[0] ? err->text : mlu_status_name(err->code);

    switch (err->code) {
    case MLU_OK:
        PyErr_SetString(PyExc_SystemError, "mlutils: error raised with status ok");
        return NULL;
    case MLU_ENOMEM:
        PyErr_Format(PyExc_MemoryError, "%s", text);
        return NULL;
    case MLU_EINVAL:
        exc = PyExc_ValueError;
        break;
    case MLU_ETYPE:
        exc = PyExc_TypeError;
        break;
    case MLU_EOVERFLOW:
        exc = PyExc_OverflowError;
        break;
    case MLU_EIO: {
        /* OSError(errno, "what we did: why"): the errno picks the subclass
         * (FileNotFoundError, PermissionError, ...). */
        char msg[MLU_ERROR_TEXT + 128];
        PyObject *args;
        if (err->sys_errno != 0)
            PyOS_snprintf(msg, sizeof(msg), "%s: %s", text, strerror(err->sys_errno));
        else
            PyOS_snprintf(msg, sizeof(msg), "%s", text);
        args = Py_BuildValue("(is)", err->sys_errno, msg);
        if (args != NULL) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
        return NULL;
    }
    case MLU_EFORMAT:
        exc = format_exc != NULL ? format_exc : PyExc_ValueError;
        break;
    case MLU_EUNSAFE:
        exc = st != NULL ? st->UnsafePickleError : PyExc_ValueError;
        break;
    case MLU_ENOTSUP:
    case MLU_EDEVICE:
    default:
        exc = PyExc_RuntimeError;
        break;
    }
    PyErr_Format(exc, "%s", text);
    return NULL;
}
