/* path.c: error paths into nested Python values (see path.h). */
#include "path.h"

PyObject *mlu_path_string(const char *root, const mlu_path *at)
{
    PyObject *parts = PyList_New(0), *res = NULL, *item = NULL;
    const mlu_path *p;

    if (parts == NULL)
        goto done;
    for (p = at; p != NULL && p->parent != NULL; p = p->parent) {
        if (p->attr)
            item = PyUnicode_FromFormat(".%S", p->key);
        else if (p->key != NULL)
            item = PyUnicode_FromFormat("[%R]", p->key);
        else
            item = PyUnicode_FromFormat("[%zd]", p->index);
        if (item == NULL || PyList_Insert(parts, 0, item) < 0)
            goto done;
        Py_CLEAR(item);
    }
    item = PyUnicode_FromString(root);
    if (item == NULL || PyList_Insert(parts, 0, item) < 0)
        goto done;
    Py_CLEAR(item);
    item = PyUnicode_FromString("");
    if (item != NULL)
        res = PyUnicode_Join(item, parts);
done:
    Py_XDECREF(item);
    Py_XDECREF(parts);
    return res;
}

int mlu_path_fail(PyObject *exc, const char *root, const mlu_path *at, const char *fmt, ...)
{
    PyObject *where = mlu_path_string(root, at), *msg = NULL;
    va_list ap;

    if (where == NULL)
        goto done;
    va_start(ap, fmt);
    msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL)
        PyErr_Format(exc, "%U at %U", msg, where);
done:
    Py_XDECREF(msg);
    Py_XDECREF(where);
    return -1;
}
