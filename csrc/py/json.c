/* json.c: json_dumps / json_loads / truncate_json / write_file_atomic.
 *
 * The writer walks Python objects and emits text straight into a core
 * buffer (no intermediate jansson tree); the reader parses with jansson
 * (core/json.c) and converts the tree. */
#include "npy.h"
#include "path.h"

#include <math.h>

#include "../core/alloc.h"
#include "../core/atomicfile.h"
#include "../core/buf.h"
#include "../core/dtoa.h"
#include "../core/json.h"

/* ------------------------------------------------------------------ writer */

typedef mlu_path path_step; /* see path.h */

/* A NumPy array whose tolist() is being written: arrays hold no path step
 * of their own (their items are numbered in the list they become), so the
 * cycle check finds them through this chain on the C stack. */
typedef struct array_frame {
    const struct array_frame *parent;
    PyObject *array; /* borrowed */
} array_frame;

typedef struct encoder {
    mlu_state *st;              /* borrowed: the module's */
    mlu_buf buf;
    mlu_error err;
    int truncate;
    int pretty;
    int depth;                  /* indentation level */
    int nest;                   /* containers and arrays being written */
    const array_frame *arrays;  /* innermost array being written, or NULL */
} encoder;

/* Below this nesting the recursion limit is the only guard (a cycle needs
 * the walk up the chain, which shallow data need not pay for). */
#define CYCLE_CHECK_DEPTH 64

static int fail_at(PyObject *exc, const path_step *at, const char *what, PyObject *obj)
{
    if (obj != NULL)
        return mlu_path_fail(exc, "data", at, "%s %s", what, Py_TYPE(obj)->tp_name);
    return mlu_path_fail(exc, "data", at, "%s", what);
}

static int core_fail(encoder *e)
{
    mlu_raise(e->st, &e->err, MLU_DOMAIN_VALUE, NULL);
    return -1;
}

static int put(encoder *e, const char *s, size_t n)
{
    return mlu_buf_append(&e->buf, s, n, &e->err) == MLU_OK ? 0 : core_fail(e);
}

static int newline_indent(encoder *e)
{
    size_t n = 1 + 4 * (size_t)e->depth;
    if (mlu_buf_reserve(&e->buf, n, &e->err) != MLU_OK)
        return core_fail(e);
    e->buf.data[e->buf.len++] = '\n';
    memset(e->buf.data + e->buf.len, ' ', n - 1);
    e->buf.len += n - 1;
    return 0;
}

static int put_str(encoder *e, PyObject *s, const path_step *at)
{
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(s, &n);
    if (p == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            PyErr_Clear();
            return fail_at(PyExc_ValueError, at, "string with a lone surrogate (not valid UTF-8)", NULL);
        }
        return -1;
    }
    return mlu_json_put_string(&e->buf, p, (size_t)n, &e->err) == MLU_OK ? 0 : core_fail(e);
}

static int put_double(encoder *e, double d)
{
    char r[MLU_DTOA_BUFSIZE];
    size_t n;

    if (isnan(d))
        return put(e, "NaN", 3);
    if (isinf(d))
        return d > 0 ? put(e, "Infinity", 8) : put(e, "-Infinity", 9);
    if (!e->truncate) {
        if (mlu_buf_reserve(&e->buf, MLU_DTOA_BUFSIZE, &e->err) != MLU_OK)
            return core_fail(e);
        e->buf.len += mlu_dtoa(d, e->buf.data + e->buf.len); /* repr(d) */
        return 0;
    }
    n = mlu_dtoa(d, r); /* repr(d) */
    if (e->truncate && memchr(r, 'e', n) == NULL) {
        /* Without an exponent the repr is the whole value: 8+ fractional
         * digits means "print d with 4" (no reparse of the text needed). */
        const char *dot = memchr(r, '.', n);
        if (dot != NULL && (size_t)(r + n - (dot + 1)) >= 8)
            return mlu_json_put_fixed4(&e->buf, d, &e->err) == MLU_OK ? 0 : core_fail(e);
    }
    return mlu_json_put_number(&e->buf, r, n, e->truncate, &e->err) == MLU_OK ? 0 : core_fail(e);
}

static int put_long(encoder *e, PyObject *o, const path_step *at)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);

    if (overflow)
        return fail_at(PyExc_OverflowError, at, "integer does not fit in 64 bits (signed)", NULL);
    if (v == -1 && PyErr_Occurred())
        return -1;
    return mlu_json_put_int(&e->buf, v, &e->err) == MLU_OK ? 0 : core_fail(e);
}

static int encode(encoder *e, PyObject *o, const path_step *at);

/* Dict keys become strings the way json.dumps does it. */
static int put_key(encoder *e, PyObject *k, const path_step *at)
{
    int rc;

    if (PyUnicode_Check(k))
        return put_str(e, k, at);
    if (k == Py_True)
        return put(e, "\"true\"", 6);
    if (k == Py_False)
        return put(e, "\"false\"", 7);
    if (k == Py_None)
        return put(e, "\"null\"", 6);
    if (PyLong_Check(k) || PyFloat_Check(k)) {
        int saved = e->truncate;
        if (put(e, "\"", 1) < 0)
            return -1;
        e->truncate = 0;
        rc = PyLong_Check(k) ? put_long(e, k, at) : put_double(e, PyFloat_AS_DOUBLE(k));
        e->truncate = saved;
        return rc < 0 ? -1 : put(e, "\"", 1);
    }
    return mlu_path_fail(PyExc_TypeError, "data", at,
                         "keys must be str, int, float, bool or None, not %s", Py_TYPE(k)->tp_name);
}

static int check_cycle(encoder *e, PyObject *o, const path_step *at)
{
    const path_step *p;
    const array_frame *a;

    if (e->nest < CYCLE_CHECK_DEPTH)
        return 0;
    for (p = at; p != NULL; p = p->parent)
        if (p->container == o)
            return fail_at(PyExc_ValueError, at, "circular reference detected", NULL);
    for (a = e->arrays; a != NULL; a = a->parent)
        if (a->array == o)
            return fail_at(PyExc_ValueError, at, "circular reference detected", NULL);
    return 0;
}

/* The frame of a non-empty container: open writes the bracket (after the
 * cycle check) and indents, each item starts with item_start, close
 * dedents and writes the closing bracket. */
static int container_open(encoder *e, PyObject *o, const path_step *at, const char *bracket)
{
    if (check_cycle(e, o, at) < 0 || put(e, bracket, 1) < 0)
        return -1;
    e->depth++;
    return 0;
}

static int item_start(encoder *e, Py_ssize_t i)
{
    if (i > 0 && put(e, e->pretty ? "," : ", ", e->pretty ? 1 : 2) < 0)
        return -1;
    return e->pretty ? newline_indent(e) : 0;
}

static int container_close(encoder *e, const char *bracket)
{
    e->depth--;
    if (e->pretty && newline_indent(e) < 0)
        return -1;
    return put(e, bracket, 1);
}

static int encode_dict(encoder *e, PyObject *d, const path_step *at)
{
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    int rc;

    if (PyDict_GET_SIZE(d) == 0)
        return put(e, "{}", 2);
    if (container_open(e, d, at, "{") < 0)
        return -1;
    while (PyDict_Next(d, &pos, &k, &v)) {
        path_step step = {at, k, i, 0, d};
        Py_INCREF(k);
        Py_INCREF(v);
        rc = item_start(e, i);
        if (rc == 0)
            rc = put_key(e, k, &step);
        if (rc == 0)
            rc = put(e, ": ", 2);
        if (rc == 0)
            rc = encode(e, v, &step);
        Py_DECREF(k);
        Py_DECREF(v);
        if (rc < 0)
            return -1;
        i++;
    }
    return container_close(e, "}");
}

static int encode_seq(encoder *e, PyObject *s, const path_step *at)
{
    int is_list = PyList_Check(s);
    Py_ssize_t i;
    int rc;

    if (Py_SIZE(s) == 0)
        return put(e, "[]", 2);
    if (container_open(e, s, at, "[") < 0)
        return -1;
    for (i = 0; i < Py_SIZE(s); i++) {
        PyObject *item = is_list ? PyList_GET_ITEM(s, i) : PyTuple_GET_ITEM(s, i);
        path_step step = {at, NULL, i, 0, s};
        Py_INCREF(item);
        rc = item_start(e, i);
        if (rc == 0)
            rc = encode(e, item, &step);
        Py_DECREF(item);
        if (rc < 0)
            return -1;
    }
    return container_close(e, "]");
}

/* numpy scalars and arrays: converted to the Python values they stand for.
 * An object array's tolist() holds its items as they are: other arrays, or
 * (0-d) the array itself, so this recurses through encode like a list. */
static int encode_numpy(encoder *e, PyObject *o, const path_step *at, int *handled)
{
    PyObject *conv = NULL;
    array_frame frame = {e->arrays, o};
    int rc = -1;

    *handled = 1;
    if (PyArray_IsScalar(o, Bool)) {
        return put(e, PyObject_IsTrue(o) ? "true" : "false", PyObject_IsTrue(o) ? 4 : 5);
    } else if (PyArray_IsScalar(o, Integer)) {
        conv = PyNumber_Index(o);
    } else if (PyArray_IsScalar(o, Floating)) {
        conv = PyNumber_Float(o);
    } else if (PyArray_Check(o)) {
        /* as lists; an element that is not JSON (complex, bytes) fails below */
        if (check_cycle(e, o, at) < 0)
            return -1;
        conv = PyArray_ToList((PyArrayObject *)o);
        e->arrays = &frame;
    } else {
        *handled = 0;
        return 0;
    }
    if (conv != NULL)
        rc = encode(e, conv, at);
    e->arrays = frame.parent;
    Py_XDECREF(conv);
    return rc;
}

static int encode(encoder *e, PyObject *o, const path_step *at)
{
    int rc, handled;

    if (o == Py_None)
        return put(e, "null", 4);
    if (o == Py_True)
        return put(e, "true", 4);
    if (o == Py_False)
        return put(e, "false", 5);
    if (PyUnicode_Check(o))
        return put_str(e, o, at);
    if (PyLong_Check(o))
        return put_long(e, o, at);
    if (PyFloat_Check(o))
        return put_double(e, PyFloat_AS_DOUBLE(o));
    /* Every path below may come back here: each level counts against the
     * recursion limit (RecursionError, never a C stack overflow). */
    if (Py_EnterRecursiveCall(" while encoding JSON"))
        return -1;
    e->nest++;
    if (PyDict_Check(o))
        rc = encode_dict(e, o, at);
    else if (PyList_Check(o) || PyTuple_Check(o))
        rc = encode_seq(e, o, at);
    else {
        rc = encode_numpy(e, o, at, &handled);
        if (!handled)
            rc = fail_at(PyExc_TypeError, at, "cannot serialise object of type", o);
    }
    e->nest--;
    Py_LeaveRecursiveCall();
    return rc;
}

/* Output of a typical call (a metrics dict) fits without regrowing. */
#define DUMPS_FIRST_RESERVE 512

/* json_dumps(data, truncate=False, pretty=False, raw=False) -> str | bytes
 *
 * Vectorcall with its own argument parsing: this is called once per log line,
 * and PyArg_ParseTupleAndKeywords would cost as much as writing a small dict. */
static PyObject *py_json_dumps(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data", "truncate", "pretty", "raw"};
    PyObject *given[4] = {NULL, NULL, NULL, NULL}; /* borrowed */
    PyObject *res = NULL;
    Py_ssize_t i, j, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int flags[3] = {0, 0, 0}; /* truncate, pretty, raw */
    encoder e;
    path_step root = {NULL, NULL, 0, 0, NULL};

    if (nargs > 4)
        return PyErr_Format(PyExc_TypeError, "json_dumps() takes at most 4 arguments (%zd given)", nargs);
    for (i = 0; i < nargs; i++)
        given[i] = args[i];
    for (i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i); /* borrowed */
        for (j = 0; j < 4; j++)
            if (PyUnicode_CompareWithASCIIString(name, names[j]) == 0)
                break;
        if (j == 4)
            return PyErr_Format(PyExc_TypeError, "json_dumps() got an unexpected keyword argument '%U'", name);
        if (given[j] != NULL)
            return PyErr_Format(PyExc_TypeError, "json_dumps() got multiple values for argument '%s'", names[j]);
        given[j] = args[nargs + i];
    }
    if (given[0] == NULL)
        return PyErr_Format(PyExc_TypeError, "json_dumps() missing required argument 'data'");
    for (j = 0; j < 3; j++) {
        if (given[j + 1] != NULL && (flags[j] = PyObject_IsTrue(given[j + 1])) < 0)
            return NULL;
    }
    memset(&e, 0, sizeof(e));
    e.st = mlu_get_state(m);
    mlu_error_clear(&e.err);
    e.truncate = flags[0];
    e.pretty = flags[1];
    if (mlu_buf_reserve(&e.buf, DUMPS_FIRST_RESERVE, &e.err) != MLU_OK) {
        core_fail(&e);
        goto done;
    }
    if (encode(&e, given[0], &root) == 0) {
        res = flags[2] ? PyBytes_FromStringAndSize(e.buf.data, (Py_ssize_t)e.buf.len)
                       : PyUnicode_DecodeUTF8(e.buf.data, (Py_ssize_t)e.buf.len, "strict");
    }
done:
    mlu_buf_free(&e.buf);
    return res;
}

/* ------------------------------------------------------------------ reader */

/* One conversion of a parsed document.  Object keys repeat (a list of
 * records has the same few keys thousands of times): each distinct key text
 * becomes one str, looked up by its bytes in a small cache, so its object and
 * hash are made once per conversion instead of once per occurrence. */
#define KEY_CACHE_SIZE 64 /* power of two */
#define KEY_CACHE_MAX_LEN 64

typedef struct key_slot {
    const char *text; /* borrowed from the document */
    size_t len;
    PyObject *str;    /* owned; NULL when the slot is empty */
} key_slot;

typedef struct converter {
    mlu_state *st;              /* borrowed: the module's */
    const mlu_json_doc *doc;
    mlu_error *err;
    key_slot keys[KEY_CACHE_SIZE];
} converter;

static void converter_clear(converter *c)
{
    size_t i;

    for (i = 0; i < KEY_CACHE_SIZE; i++)
        Py_CLEAR(c->keys[i].str);
}

/* New ref: the str of an object key (jansson's keys are valid UTF-8 without
 * NUL).  One pass over the bytes gives the hash and whether they are ASCII;
 * ASCII keys are copied straight into a new str. */
static PyObject *convert_key(converter *c, const char *key, size_t len)
{
    uint32_t h = 2166136261u;
    unsigned char high = 0;
    size_t i;
    key_slot *slot = NULL;
    PyObject *k;

    for (i = 0; i < len; i++) {
        unsigned char b = (unsigned char)key[i];
        high |= b;
        h = (h ^ b) * 16777619u;
    }
    if (len <= KEY_CACHE_MAX_LEN) {
        slot = &c->keys[(h ^ (h >> 16) ^ (uint32_t)len) & (KEY_CACHE_SIZE - 1)];
        if (slot->str != NULL && slot->len == len && memcmp(slot->text, key, len) == 0)
            return Py_NewRef(slot->str);
    }
    if (high < 0x80) {
        k = PyUnicode_New((Py_ssize_t)len, 127);
        if (k != NULL)
            memcpy(PyUnicode_DATA(k), key, len);
    } else {
        k = PyUnicode_DecodeUTF8(key, (Py_ssize_t)len, "strict");
    }
    if (k != NULL && slot != NULL) {
        Py_XSETREF(slot->str, Py_NewRef(k));
        slot->text = key;
        slot->len = len;
    }
    return k;
}

static PyObject *convert(converter *c, json_t *j);

/* New ref: a JSON string, or the float a NaN/Infinity sentinel stands for. */
static PyObject *convert_string(converter *c, json_t *j)
{
    const char *s;
    size_t n;
    double number;
    char *tmp = NULL; /* owned */
    PyObject *res = NULL;
    int r = mlu_json_string_value(c->doc, j, &s, &n, &number, &tmp, c->err);

    if (r < 0)
        mlu_raise(c->st, c->err, MLU_DOMAIN_VALUE, NULL);
    else if (r == 1)
        res = PyFloat_FromDouble(number);
    else
        res = PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, "strict");
    mlu_free(tmp);
    return res;
}

/* New ref: the Python value of a JSON array. */
static PyObject *convert_array(converter *c, json_t *j)
{
    size_t i, n = json_array_size(j);
    PyObject *res = PyList_New((Py_ssize_t)n), *v;

    if (res == NULL)
        goto error;
    for (i = 0; i < n; i++) {
        v = convert(c, json_array_get(j, i)); /* new ref */
        if (v == NULL)
            goto error;
        PyList_SET_ITEM(res, (Py_ssize_t)i, v); /* steals v */
    }
    goto done;
error:
    Py_CLEAR(res);
done:
    return res;
}

/* New ref: the Python dict of a JSON object, in the text's key order. */
static PyObject *convert_object(converter *c, json_t *j)
{
    PyObject *res = PyDict_New(), *k = NULL, *v = NULL;
    const char *key;
    size_t klen;
    json_t *val;

    if (res == NULL)
        goto error;
    json_object_keylen_foreach(j, key, klen, val) {
        /* jansson refuses NUL in keys, so a key is never a sentinel */
        k = convert_key(c, key, klen);
        if (k == NULL)
            goto error;
        v = convert(c, val);
        if (v == NULL || PyDict_SetItem(res, k, v) < 0)
            goto error;
        Py_CLEAR(k);
        Py_CLEAR(v);
    }
    goto done;
error:
    Py_CLEAR(res);
done:
    Py_XDECREF(k);
    Py_XDECREF(v);
    return res;
}

/* New ref: the Python value of any JSON value (no acquisitions here). */
static PyObject *convert(converter *c, json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_NULL:
        return Py_NewRef(Py_None);
    case JSON_TRUE:
        return Py_NewRef(Py_True);
    case JSON_FALSE:
        return Py_NewRef(Py_False);
    case JSON_INTEGER:
        return PyLong_FromLongLong((long long)json_integer_value(j));
    case JSON_REAL:
        return PyFloat_FromDouble(json_real_value(j));
    case JSON_STRING:
        return convert_string(c, j);
    case JSON_ARRAY:
        return convert_array(c, j);
    case JSON_OBJECT:
        return convert_object(c, j);
    default:
        PyErr_SetString(PyExc_SystemError, "unknown JSON value type");
        return NULL;
    }
}

/* New ref: the Python value of a parsed document. */
static PyObject *convert_doc(mlu_state *st, const mlu_json_doc *doc, mlu_error *err)
{
    converter c;
    PyObject *res;

    memset(&c, 0, sizeof(c));
    c.st = st;
    c.doc = doc;
    c.err = err;
    res = convert(&c, doc->root);
    converter_clear(&c);
    return res;
}

/* Raises a failed parse of text[0:n]: malformed text becomes
 * mlutils.JSONDecodeError, which carries the document and the position. */
static void raise_parse_error(mlu_state *st, const mlu_error *err, const char *text, size_t n)
{
    PyObject *doc = NULL; /* new ref: the document, when the error is in it */

    if (err->code == MLU_EFORMAT && (doc = PyBytes_FromStringAndSize(text, (Py_ssize_t)n)) == NULL)
        return;
    mlu_raise(st, err, MLU_DOMAIN_JSON, doc);
    Py_XDECREF(doc);
}

/* A UTF-8 byte order mark: json.loads(bytes) accepts it. */
static size_t bom_length(const char *text, size_t n)
{
    return (n >= 3 && (unsigned char)text[0] == 0xEF && (unsigned char)text[1] == 0xBB &&
            (unsigned char)text[2] == 0xBF) ? 3 : 0;
}

/* New ref: the value of the JSON text[0:n] (a leading UTF-8 BOM skipped),
 * parsed without the GIL; JSONDecodeError when it is malformed.  text must
 * stay unchanged while the GIL is released (immutable, or held by a buffer). */
static PyObject *parse_text(mlu_state *st, const char *text, size_t n)
{
    mlu_json_doc doc = {NULL, 0};
    mlu_error err;
    mlu_status rc;
    PyObject *res = NULL;
    size_t bom = bom_length(text, n);

    text += bom;
    n -= bom;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_json_parse(text, n, MLU_JSON_ALLOW_NONFINITE, &doc, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK)
        raise_parse_error(st, &err, text, n);
    else
        res = convert_doc(st, &doc, &err);
    mlu_json_doc_free(&doc);
    return res;
}

/* json_loads(str | bytes | bytearray | memoryview) -> object */
static PyObject *py_json_loads(PyObject *m, PyObject *arg)
{
    const char *text;
    Py_ssize_t n;
    Py_buffer view = {0};
    PyObject *res;

    if (PyUnicode_Check(arg)) {
        text = PyUnicode_AsUTF8AndSize(arg, &n);
        if (text == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "JSON text holds a lone surrogate (not valid UTF-8)");
            }
            return NULL;
        }
        return parse_text(mlu_get_state(m), text, (size_t)n);
    }
    if (!PyObject_CheckBuffer(arg))
        return PyErr_Format(PyExc_TypeError, "JSON text must be str or bytes, not %s",
                            Py_TYPE(arg)->tp_name);
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    res = parse_text(mlu_get_state(m), view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return res;
}

/* json_read_file(path) -> object: one open, fstat and read of the whole file,
 * then the parse, each without the GIL; OSError (FileNotFoundError, ...)
 * names the path. */
static PyObject *py_json_read_file(PyObject *m, PyObject *arg)
{
    mlu_state *st = mlu_get_state(m);
    PyObject *path = NULL, *res = NULL; /* path: new ref (bytes) */
    char *data = NULL;                  /* owned (mlu_free) */
    size_t len = 0;
    mlu_error err;
    mlu_status rc;

    if (!PyUnicode_FSConverter(arg, &path))
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_read_file(PyBytes_AS_STRING(path), &data, &len, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK)
        mlu_raise(st, &err, MLU_DOMAIN_VALUE, arg);
    else
        res = parse_text(st, data, len);
    mlu_free(data);
    Py_DECREF(path);
    return res;
}

/* truncate_json(str | bytes) -> same type */
static PyObject *py_truncate_json(PyObject *m, PyObject *arg)
{
    const char *text;
    Py_ssize_t n;
    int is_str = PyUnicode_Check(arg);
    mlu_buf out = MLU_BUF_INIT;
    mlu_error err;
    mlu_status rc;
    PyObject *res = NULL;

    if (is_str) {
        text = PyUnicode_AsUTF8AndSize(arg, &n);
        if (text == NULL)
            return NULL;
    } else if (PyBytes_Check(arg)) {
        text = PyBytes_AS_STRING(arg);
        n = PyBytes_GET_SIZE(arg);
    } else {
        return PyErr_Format(PyExc_TypeError, "truncate_json takes str or bytes, not %s",
                            Py_TYPE(arg)->tp_name);
    }
    mlu_error_clear(&err);
    /* pure C over the immutable text of arg (kept alive by the caller) */
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_json_truncate_text(text, (size_t)n, &out, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK) {
        mlu_raise(mlu_get_state(m), &err, MLU_DOMAIN_VALUE, NULL);
        goto done;
    }
    res = is_str ? PyUnicode_DecodeUTF8(out.data ? out.data : "", (Py_ssize_t)out.len, "strict")
                 : PyBytes_FromStringAndSize(out.data ? out.data : "", (Py_ssize_t)out.len);
done:
    mlu_buf_free(&out);
    return res;
}

/* write_file_atomic(path, data, *, durable=True): temp file beside path,
 * fsync, rename, fsync folder (no fsyncs unless durable). */
static PyObject *py_write_file_atomic(PyObject *m, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "data", "durable", NULL};
    PyObject *pathobj, *durable = Py_True; /* borrowed: the path as given, the flag */
    PyObject *path = NULL, *res = NULL;    /* new refs: the path's bytes, the result */
    Py_buffer view = {0}; /* view.obj NULL until the buffer is held */
    mlu_error err;
    mlu_status rc;
    unsigned flags;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oy*|$O!:write_file_atomic", kwlist,
                                     &pathobj, &view, &PyBool_Type, &durable))
        goto done;
    if (!PyUnicode_FSConverter(pathobj, &path))
        goto done;
    flags = durable == Py_True ? MLU_AFILE_DURABLE : 0u;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_write_file_atomic(PyBytes_AS_STRING(path), view.buf, (size_t)view.len, flags, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK) {
        /* an OSError names the path as it was given, as open() does */
        mlu_raise_write(mlu_get_state(m), &err, MLU_DOMAIN_VALUE, pathobj);
        goto done;
    }
    res = Py_NewRef(Py_None);
done:
    if (view.obj != NULL)
        PyBuffer_Release(&view);
    Py_XDECREF(path);
    return res;
}

int mlu_json_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"json_dumps", (PyCFunction)(void (*)(void))py_json_dumps, METH_FASTCALL | METH_KEYWORDS,
         "json_dumps(data, truncate=False, pretty=False, raw=False)\n--\n\n"
         "Serialise data to JSON text (bytes when raw): the text json.dumps(data,\n"
         "ensure_ascii=False) writes (indent=4 when pretty); numpy scalars and arrays\n"
         "as numbers and lists; truncate rounds numbers with 8+ fractional digits to 4."},
        {"json_loads", py_json_loads, METH_O, "json_loads(text) -> object"},
        {"json_read_file", py_json_read_file, METH_O,
         "json_read_file(path) -> object: the parsed JSON file; OSError when it cannot be read."},
        {"truncate_json", py_truncate_json, METH_O,
         "truncate_json(text) -> text with numbers of 8+ fractional digits rounded to 4"},
        {"write_file_atomic", (PyCFunction)(void (*)(void))py_write_file_atomic,
         METH_VARARGS | METH_KEYWORDS,
         "write_file_atomic(path, data, *, durable=True): replace path with data atomically "
         "(fsynced when durable)."},
        {NULL, NULL, 0, NULL},
    };
    return PyModule_AddFunctions(m, methods);
}
