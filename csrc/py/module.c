/* module.c: mlutils._core.  Wires the areas together: the exec step that
 * fills the module state (state.c) with the exceptions, the features set and
 * each area, which adds itself in its own file. */
#include "module.h"

#include <string.h>

#define PY_ARRAY_UNIQUE_SYMBOL MLU_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_20_API_VERSION
#include <numpy/arrayobject.h>

#include <jansson.h>

#include "../cuda/mlu_cuda.h"

#ifndef MLU_VERSION
#error "MLU_VERSION must be defined by the build (setup.py reads mlutils/_version.py)"
#endif

/* New exception class `name` with the given bases; stored in *slot and added
 * to the module.  Returns 0 or -1. */
static int add_exception(PyObject *m, PyObject **slot, const char *name,
                         PyObject *bases, const char *doc)
{
    char qualname[128];
    PyObject *exc;

    snprintf(qualname, sizeof(qualname), "mlutils.%s", name);
    exc = PyErr_NewExceptionWithDoc(qualname, doc, bases, NULL); /* new ref */
    if (exc == NULL)
        return -1;
    *slot = exc;
    return PyModule_AddObjectRef(m, name, exc);
}

static int add_exceptions(PyObject *m, mlu_state *st)
{
    int rc = -1;
    PyObject *json = NULL, *pickle = NULL, *jde = NULL, *upe = NULL, *bases = NULL;
    /* Each class after MlutilsError: its slot, name, doc and bases (addresses
     * of the classes, read when it is made: a base may be made just before). */
    const struct {
        PyObject **slot;
        const char *name, *doc;
        PyObject **bases[3]; /* NULL after the last */
    } classes[] = {
        {&st->JSONDecodeError, "JSONDecodeError",
         "Invalid JSON text; also a json.JSONDecodeError (lineno, colno, pos).",
         {&st->MlutilsError, &jde, NULL}},
        {&st->SafetensorsError, "SafetensorsError",
         "A malformed or unsupported safetensors file (also a ValueError).",
         {&st->MlutilsError, &PyExc_ValueError, NULL}},
        {&st->TorchFormatError, "TorchFormatError",
         "A malformed or unsupported PyTorch .pt file (also a ValueError).",
         {&st->MlutilsError, &PyExc_ValueError, NULL}},
        {&st->UnsafePickleError, "UnsafePickleError",
         "A pickle asks for a global or operation outside the weights-only allowlist.",
         {&st->TorchFormatError, &upe, NULL}},
        {&st->SamplerStateError, "SamplerStateError",
         "A sampler state of another kind, length or version (also a ValueError).",
         {&st->MlutilsError, &PyExc_ValueError, NULL}},
        /* also an AssertionError: the reference validates with assert, and code
         * written against it catches AssertionError */
        {&st->PatternError, "PatternError",
         "An invalid pattern provider or input (also a ValueError and an AssertionError).",
         {&st->MlutilsError, &PyExc_ValueError, &PyExc_AssertionError}},
    };
    size_t i, k, n;

    json = PyImport_ImportModule("json");
    pickle = PyImport_ImportModule("pickle");
    if (json == NULL || pickle == NULL)
        goto done;
    jde = PyObject_GetAttrString(json, "JSONDecodeError");
    upe = PyObject_GetAttrString(pickle, "UnpicklingError");
    if (jde == NULL || upe == NULL)
        goto done;
    if (add_exception(m, &st->MlutilsError, "MlutilsError", NULL,
                      "Base class of every error mlutils raises.") < 0)
        goto done;
    for (i = 0; i < sizeof(classes) / sizeof(classes[0]); i++) {
        for (n = 0; n < 3 && classes[i].bases[n] != NULL; n++)
            ;
        if ((bases = PyTuple_New((Py_ssize_t)n)) == NULL)
            goto done;
        for (k = 0; k < n; k++)
            PyTuple_SET_ITEM(bases, k, Py_NewRef(*classes[i].bases[k])); /* steals the new ref */
        if (add_exception(m, classes[i].slot, classes[i].name, bases, classes[i].doc) < 0)
            goto done;
        Py_CLEAR(bases);
    }
    rc = 0;
done:
    Py_XDECREF(bases);
    Py_XDECREF(jde);
    Py_XDECREF(upe);
    Py_XDECREF(json);
    Py_XDECREF(pickle);
    return rc;
}

/* A frozenset of what this build carries; mlutils.features extends it with
 * what is usable at run time. */
static int add_build_features(PyObject *m)
{
    int rc = -1;
    PyObject *set = PySet_New(NULL), *item = NULL;
    const char *names[8];
    int i, n = 0;

    if (set == NULL)
        return -1;
    names[n++] = "json";
    if (mlu_cuda_built())
        names[n++] = "cuda";
#if defined(__SANITIZE_ADDRESS__)
    names[n++] = "asan";
#endif
    for (i = 0; i < n; i++) {
        item = PyUnicode_FromString(names[i]);
        if (item == NULL || PySet_Add(set, item) < 0)
            goto done;
        Py_CLEAR(item);
    }
    item = PyFrozenSet_New(set);
    if (item == NULL || PyModule_AddObjectRef(m, "build_features", item) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(item);
    Py_DECREF(set);
    return rc;
}

static int mlu_exec(PyObject *m)
{
    mlu_state *st = mlu_get_state(m);

    if (_import_array() < 0)
        return -1;
    if (PyModule_AddStringConstant(m, "__version__", MLU_VERSION) < 0)
        return -1;
    if (PyModule_AddStringConstant(m, "jansson_version", JANSSON_VERSION) < 0)
        return -1;
    if (add_exceptions(m, st) < 0)
        return -1;
    if (add_build_features(m) < 0)
        return -1;
    if (mlu_cuda_module_init(m) < 0)
        return -1;
    if (mlu_json_module_init(m) < 0)
        return -1;
    if (mlu_testing_module_init(m) < 0)
        return -1;
    if (mlu_safetensors_module_init(m) < 0)
        return -1;
    if (mlu_ptload_module_init(m) < 0)
        return -1;
    if (mlu_ptsave_module_init(m) < 0)
        return -1;
    if (mlu_sampler_module_init(m) < 0)
        return -1;
    if (mlu_pattern_module_init(m) < 0)
        return -1;
    if (mlu_nccl_module_init(m) < 0)
        return -1;
    if (mlu_offload_module_init(m) < 0)
        return -1;
    if (mlu_sigsave_module_init(m) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot mlu_slots[] = {
    {Py_mod_exec, (void *)mlu_exec},
    {0, NULL},
};

PyMODINIT_FUNC PyInit__core(void)
{
    mlu_module_def.m_slots = mlu_slots; /* the state's definition (state.c) runs this file's exec */
    return PyModuleDef_Init(&mlu_module_def);
}
