/* testing.c: hooks for the test suite only (allocation-failure injection). */
#include "module.h"

#include "../core/alloc.h"

static PyObject *py_fail_alloc_after(PyObject *m, PyObject *arg)
{
    long n = PyLong_AsLong(arg);

    (void)m;
    if (n == -1 && PyErr_Occurred())
        return NULL;
    mlu_alloc_fail_after(n);
    Py_RETURN_NONE;
}

static PyObject *py_alloc_count(PyObject *m, PyObject *unused)
{
    (void)m;
    (void)unused;
    return PyLong_FromLong(mlu_alloc_count());
}

int mlu_testing_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"_fail_alloc_after", py_fail_alloc_after, METH_O,
         "_fail_alloc_after(n): the core's (n+1)th allocation from now fails; n < 0 stops it."},
        {"_alloc_count", py_alloc_count, METH_NOARGS,
         "_alloc_count() -> int: core allocations since the last _fail_alloc_after."},
        {NULL, NULL, 0, NULL},
    };
    return PyModule_AddFunctions(m, methods);
}
