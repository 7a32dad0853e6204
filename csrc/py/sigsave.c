/* sigsave.c: the Python face of core/sigsave.h: a signal's kernel-level
 * action as opaque bytes, and putting it back.
 *
 *   saved = _core.sigaction_save(signal.SIGUSR1)      # bytes
 *   ... signal.signal(SIGUSR1, handler) ... signal.signal(SIGUSR1, SIG_DFL)
 *   _core.sigaction_restore(signal.SIGUSR1, saved)    # faulthandler's again
 *
 * Python's view (signal.getsignal) is not touched: restore it through
 * signal.signal first, then the raw action. */
#include "module.h"

#include "../core/sigsave.h"

/* The signal number in o (an int, or anything with __index__): 0 and *out,
 * or -1 with TypeError (not an int) or ValueError (names no signal, however
 * large). */
static int signum_arg(PyObject *o, int *out)
{
    PyObject *n = PyNumber_Index(o); /* new ref */
    long v;
    int overflow = 0, rc = -1;

    if (n == NULL)
        goto done;
    v = PyLong_AsLongAndOverflow(n, &overflow);
    if (v == -1 && PyErr_Occurred())
        goto done;
    if (overflow != 0 || !mlu_sigsave_valid_signum(v)) {
        PyErr_Format(PyExc_ValueError, "signal number %R is out of range (1 to %d)", n, NSIG - 1);
        goto done;
    }
    *out = (int)v;
    rc = 0;
done:
    Py_XDECREF(n);
    return rc;
}

/* sigaction_save(signum) -> bytes (new ref). */
static PyObject *py_sigaction_save(PyObject *module, PyObject *arg)
{
    mlu_state *st = mlu_get_state(module); /* borrowed */
    mlu_sigsave saved;
    mlu_error err;
    int signum = 0;

    if (signum_arg(arg, &signum) < 0)
        return NULL;
    mlu_error_clear(&err);
    if (mlu_sigsave_get(signum, &saved, &err) != MLU_OK)
        return mlu_raise(st, &err, MLU_DOMAIN_VALUE, NULL);
    return PyBytes_FromStringAndSize((const char *)&saved, (Py_ssize_t)sizeof(saved));
}

/* sigaction_restore(signum, saved) -> None (new ref). */
static PyObject *py_sigaction_restore(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    mlu_state *st = mlu_get_state(module); /* borrowed */
    PyObject *res = NULL;
    Py_buffer view = {0};
    mlu_sigsave saved;
    mlu_error err;
    int signum = 0, have_view = 0;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "sigaction_restore() takes 2 arguments (%zd given)", nargs);
        goto done;
    }
    if (signum_arg(args[0], &signum) < 0)
        goto done;
    if (PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "sigaction_restore() takes the bytes sigaction_save() returned, not a str");
        goto done;
    }
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        goto done;
    have_view = 1;
    if (view.len != (Py_ssize_t)sizeof(saved)) {
        PyErr_Format(PyExc_ValueError, "a saved signal action is %zu bytes, not %zd (it comes from sigaction_save())",
                     sizeof(saved), view.len);
        goto done;
    }
    memcpy(&saved, view.buf, sizeof(saved)); /* aligned, and immune to the buffer changing */
    mlu_error_clear(&err);
    if (mlu_sigsave_set(signum, &saved, &err) != MLU_OK) {
        mlu_raise(st, &err, MLU_DOMAIN_VALUE, NULL);
        goto done;
    }
    res = Py_NewRef(Py_None);
done:
    if (have_view)
        PyBuffer_Release(&view);
    return res;
}

int mlu_sigsave_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"sigaction_save", py_sigaction_save, METH_O,
         "sigaction_save(signum) -> bytes: the signal's action as the kernel holds it (handler, flags,\n"
         "mask), handlers set outside Python's signal module included; opaque, for sigaction_restore\n"
         "in this process or a fork of it.  ValueError for a number that names no signal; OSError\n"
         "when sigaction fails."},
        {"sigaction_restore", (PyCFunction)(void (*)(void))py_sigaction_restore, METH_FASTCALL,
         "sigaction_restore(signum, saved) -> None: makes `saved` (from sigaction_save(signum)) the\n"
         "signal's action again; signal.getsignal() is not updated.  ValueError for a number that\n"
         "names no signal, or bytes sigaction_save(signum) did not return in this process; OSError\n"
         "when sigaction fails (EINVAL for SIGKILL and SIGSTOP)."},
        {NULL, NULL, 0, NULL},
    };

    return PyModule_AddFunctions(m, methods);
}
