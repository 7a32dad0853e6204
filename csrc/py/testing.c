/* testing.c: hooks for the test suite only (allocation-failure injection). */
#include "module.h"

#include <string.h>

#include "../core/alloc.h"
#include "../core/json.h"
#include "../core/pickle_read.h"

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

/* _json_parse_only(bytes): jansson's parse alone (as json_loads and
 * json_read run it, the tree freed, no Python objects made), so a benchmark
 * can show the floor under the conversion.  True when the text parsed. */
static PyObject *py_json_parse_only(PyObject *m, PyObject *arg)
{
    mlu_json_doc doc = {NULL, 0};
    mlu_error err;
    mlu_status rc;

    (void)m;
    if (!PyBytes_Check(arg))
        return PyErr_Format(PyExc_TypeError, "_json_parse_only takes bytes, not %s", Py_TYPE(arg)->tp_name);
    mlu_error_clear(&err);
    rc = mlu_json_parse(PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), MLU_JSON_ALLOW_NONFINITE,
                        &doc, &err);
    mlu_json_doc_free(&doc);
    return PyBool_FromLong(rc == MLU_OK);
}

/* New ref: [(module, name, supported), ...], the .pt reader's globals allowlist. */
static PyObject *py_pk_allowlist(PyObject *m, PyObject *unused)
{
    PyObject *out = PyList_New(0), *row;
    const char *mod, *name;
    size_t i;
    int kind, rc;

    (void)m;
    (void)unused;
    if (out == NULL)
        goto done;
    for (i = 0; (kind = mlu_pk_allowlist(i, &mod, &name)) != MLU_PK_FORBIDDEN; i++) {
        row = Py_BuildValue("(ssO)", mod, name, kind == MLU_PK_ALLOWED ? Py_True : Py_False);
        if (row == NULL)
            goto error;
        rc = PyList_Append(out, row);
        Py_DECREF(row);
        if (rc < 0)
            goto error;
    }
    goto done;
error:
    Py_CLEAR(out);
done:
    return out;
}

/* _raise_status(status, text, errno=0, domain="value", subject=None, offset=-1):
 * raises what mlu_raise makes of that core error, so a test can check the
 * status -> exception tables themselves.  status and domain are the names of
 * mlu.h's and module.h's enums, without their prefixes, in lower case for
 * the domain. */
static PyObject *py_raise_status(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"status", "text", "errno", "domain", "subject", "offset", NULL};
    static const char *const statuses[MLU_STATUS_COUNT] = {
        "OK", "ENOMEM", "EINVAL", "ETYPE", "EOVERFLOW", "EIO", "EFORMAT", "EUNSAFE", "ENOTSUP", "EDEVICE",
        "ETIMEDOUT",
    };
    static const char *const domains[MLU_DOMAIN_COUNT] = {
        "value", "safetensors", "torch", "pattern", "json", "library", "self_check",
    };
    const char *status, *text, *domain = "value";
    int sys_errno = 0, code, dom;
    long long offset = -1;
    PyObject *subject = Py_None;
    mlu_error err;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "ss|isOL:_raise_status", kwlist, &status, &text,
                                     &sys_errno, &domain, &subject, &offset))
        return NULL;
    for (code = 0; code < MLU_STATUS_COUNT && strcmp(statuses[code], status) != 0; code++)
        ;
    for (dom = 0; dom < MLU_DOMAIN_COUNT && strcmp(domains[dom], domain) != 0; dom++)
        ;
    if (code == MLU_STATUS_COUNT || dom == MLU_DOMAIN_COUNT)
        return PyErr_Format(PyExc_ValueError, "unknown status %s or domain %s", status, domain);
    mlu_error_clear(&err);
    err.code = (mlu_status)code;
    err.sys_errno = sys_errno;
    err.offset = (int64_t)offset;
    PyOS_snprintf(err.text, sizeof(err.text), "%s", text);
    return mlu_raise(mlu_get_state(m), &err, (mlu_domain)dom, subject == Py_None ? NULL : subject);
}

int mlu_testing_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"_fail_alloc_after", py_fail_alloc_after, METH_O,
         "_fail_alloc_after(n): the core's (n+1)th allocation from now fails; n < 0 stops it."},
        {"_json_parse_only", py_json_parse_only, METH_O,
         "_json_parse_only(bytes) -> bool: jansson's parse alone (benchmarks)."},
        {"_alloc_count", py_alloc_count, METH_NOARGS,
         "_alloc_count() -> int: core allocations since the last _fail_alloc_after."},
        {"_pk_allowlist", py_pk_allowlist, METH_NOARGS,
         "_pk_allowlist() -> [(module, name, supported)]: every GLOBAL the .pt reader accepts (supported) or "
         "refuses as allowed by torch but not built here."},
        {"_raise_status", (PyCFunction)(void (*)(void))py_raise_status, METH_VARARGS | METH_KEYWORDS,
         "_raise_status(status, text, errno=0, domain='value', subject=None, offset=-1): raise as the core's "
         "status would."},
        {NULL, NULL, 0, NULL},
    };
    return PyModule_AddFunctions(m, methods);
}
