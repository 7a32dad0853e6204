/* state.c: the module state of mlutils._core (see state.h): its definition,
 * GC traverse and clear, the accessors and the type helpers. */
#include "state.h"

#include <string.h>

mlu_state *mlu_get_state(PyObject *module)
{
    return (mlu_state *)PyModule_GetState(module);
}

mlu_state *mlu_state_from_type(PyTypeObject *type)
{
    PyObject *m = PyType_GetModuleByDef(type, &mlu_module_def); /* borrowed */
    return m == NULL ? NULL : mlu_get_state(m);
}

int mlu_add_struct_type(PyObject *m, PyStructSequence_Desc *desc, PyObject **field)
{
    PyObject *type = (PyObject *)PyStructSequence_NewType(desc); /* new ref */
    const char *dot = strrchr(desc->name, '.');

    if (type == NULL)
        return -1;
    *field = type; /* owned by the state */
    return PyModule_AddObjectRef(m, dot != NULL ? dot + 1 : desc->name, type);
}

int mlu_add_heap_type(PyObject *m, PyType_Spec *spec, PyObject **field)
{
    PyObject *type = PyType_FromModuleAndSpec(m, spec, NULL); /* new ref */
    const char *dot = strrchr(spec->name, '.');

    if (type == NULL)
        return -1;
    *field = type; /* owned by the state */
    return PyModule_AddObjectRef(m, dot != NULL ? dot + 1 : spec->name, type);
}

PyObject *mlu_struct_new_steal(PyObject *type, PyObject **values, Py_ssize_t n)
{
    PyObject *res = NULL;
    Py_ssize_t i;

    for (i = 0; i < n; i++)
        if (values[i] == NULL)
            goto done;
    res = PyStructSequence_New((PyTypeObject *)type);
    if (res == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyStructSequence_SET_ITEM(res, i, values[i]); /* steals */
        values[i] = NULL;
    }
done:
    for (i = 0; i < n; i++)
        Py_XDECREF(values[i]);
    return res;
}

/* Visits every field of the module's state (GC traverse) or, when visit is
 * NULL, clears each. */
static int state_fields(PyObject *m, visitproc visit, void *arg)
{
    mlu_state *st = mlu_get_state(m);

    if (st == NULL)
        return 0;
#define EACH_FIELD(name, doc) \
    if (visit != NULL)        \
        Py_VISIT(st->name);   \
    else                      \
        Py_CLEAR(st->name);
    MLU_STATE_FIELDS(EACH_FIELD)
#undef EACH_FIELD
    return 0;
}

static int state_traverse(PyObject *m, visitproc visit, void *arg)
{
    return state_fields(m, visit, arg);
}

static int state_clear(PyObject *m)
{
    return state_fields(m, NULL, NULL);
}

static void state_free(void *m)
{
    state_fields((PyObject *)m, NULL, NULL);
}

PyModuleDef mlu_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mlutils._core",
    .m_doc = "The C core of mlutils (JSON, state-dict IO, samplers, patterns, CUDA).",
    .m_size = sizeof(mlu_state),
    .m_methods = NULL,
    .m_slots = NULL, /* module.c's, set by PyInit__core */
    .m_traverse = state_traverse,
    .m_clear = state_clear,
    .m_free = state_free,
};
