/* errors.c: the one path from a core status to a Python exception.
 *
 * Which class each status becomes is in one table (status_class); where an
 * area's errors differ (the format error of each format, ImportError for a
 * library that cannot be loaded, ...) a second table says so
 * (domain_class).  Each entry also names how its exception is built from
 * the error and the caller's subject (build_*): OSError with errno and the
 * file name, JSONDecodeError with the document and position, or the text. */
#include "module.h"

#include <assert.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

/* How an exception is made from the error and the subject (see mlu_raise). */
typedef enum build_kind {
    BUILD_TEXT = 0,   /* class(text), or class("'path': text") with the file's path as subject */
    BUILD_OS_ERROR,   /* OSError(errno, text[, subject as the file name]) */
    BUILD_DOCUMENT,   /* class(text, document, position): subject = the document (bytes) */
    BUILD_DETAIL,     /* class("text. subject") when the subject is a str */
} build_kind;

/* A class: a builtin (*builtin) or a field of the module state, and how it is built. */
typedef struct exc_rule {
    PyObject **builtin;     /* NULL: state_field names it */
    ptrdiff_t state_field;  /* offsetof(mlu_state, ...) */
    build_kind build;
    int set;                /* 0: no rule (domain_class: as status_class) */
} exc_rule;

#define BUILTIN(name, how) {&PyExc_##name, 0, BUILD_##how, 1}
#define STATE(name, how) {NULL, (ptrdiff_t)offsetof(mlu_state, name), BUILD_##how, 1}

/* status -> class; MLU_OK has none (raising it is a SystemError). */
static const exc_rule status_class[MLU_STATUS_COUNT] = {
    [MLU_ENOMEM] = BUILTIN(MemoryError, TEXT),
    [MLU_EINVAL] = BUILTIN(ValueError, TEXT),
    [MLU_ETYPE] = BUILTIN(TypeError, TEXT),
    [MLU_EOVERFLOW] = BUILTIN(OverflowError, TEXT),
    [MLU_EIO] = BUILTIN(OSError, OS_ERROR), /* its subclass picked by errno */
    [MLU_EFORMAT] = BUILTIN(ValueError, TEXT), /* each format's own class below */
    [MLU_EUNSAFE] = STATE(UnsafePickleError, TEXT),
    [MLU_ENOTSUP] = BUILTIN(RuntimeError, TEXT),
    [MLU_EDEVICE] = BUILTIN(RuntimeError, TEXT),
    [MLU_ETIMEDOUT] = BUILTIN(TimeoutError, TEXT),
};

/* domain -> the classes that differ there from status_class. */
static const exc_rule domain_class[MLU_DOMAIN_COUNT][MLU_STATUS_COUNT] = {
    [MLU_DOMAIN_SAFETENSORS] = {[MLU_EFORMAT] = STATE(SafetensorsError, TEXT)},
    [MLU_DOMAIN_TORCH] = {[MLU_EFORMAT] = STATE(TorchFormatError, TEXT)},
    /* every pattern problem is a PatternError (a ValueError), bad arguments included */
    [MLU_DOMAIN_PATTERN] = {[MLU_EINVAL] = STATE(PatternError, TEXT), [MLU_EFORMAT] = STATE(PatternError, TEXT)},
    [MLU_DOMAIN_JSON] = {[MLU_EFORMAT] = STATE(JSONDecodeError, DOCUMENT)},
    [MLU_DOMAIN_LIBRARY] = {[MLU_ENOTSUP] = BUILTIN(ImportError, DETAIL)},
    [MLU_DOMAIN_SELF_CHECK] = {[MLU_EFORMAT] = BUILTIN(AssertionError, TEXT)},
};

#undef BUILTIN
#undef STATE

/* Borrowed: the class rule names. */
static PyObject *resolve(mlu_state *st, const exc_rule *rule)
{
    if (rule->builtin != NULL)
        return *rule->builtin;
    return *(PyObject **)((char *)st + rule->state_field);
}

/* New ref: text as a str; the core's text may quote input cut inside a
 * UTF-8 sequence, so it is decoded leniently. */
static PyObject *text_str(const char *text)
{
    return PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
}

PyObject *mlu_take_raised(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *t = NULL, *v = NULL, *tb = NULL;

    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
#endif
}

void mlu_restore_raised(PyObject *exc)
{
    if (exc == NULL)
        return;
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* Adds `note` to the exception being raised (BaseException.add_note):
 * shown under its traceback, leaving str(e) and its args as they are.  A
 * failure to add it leaves the exception as it was. */
static void add_note_to_raised(const char *note)
{
    PyObject *v = mlu_take_raised(), *r;

    if (v == NULL)
        return;
    r = PyObject_CallMethod(v, "add_note", "N", text_str(note));
    if (r == NULL)
        PyErr_Clear();
    Py_XDECREF(r);
    mlu_restore_raised(v);
}

/* New ref: os.fspath(path) (str or bytes) when path is a str, bytes or
 * os.PathLike; NULL, with no error set, for anything else or a path whose
 * __fspath__ fails. */
static PyObject *as_fspath(PyObject *path)
{
    PyObject *fs;

    if (path == NULL || !(PyUnicode_Check(path) || PyBytes_Check(path) || PyObject_HasAttrString(path, "__fspath__")))
        return NULL;
    fs = PyOS_FSPath(path);
    if (fs == NULL)
        PyErr_Clear();
    return fs;
}

/* OSError(errno, message[, filename]); OSError's constructor picks the
 * subclass (FileNotFoundError, PermissionError, ...) from errno.  With a
 * file name the message is strerror alone, as open() raises it, and what
 * we did (`text`: "cannot create a temporary file beside ...") becomes the
 * exception's note; without, the message is "what we did: strerror".  An
 * os.PathLike file name is given as os.fspath(filename), as open() gives
 * it. */
static void build_os_error(PyObject *exc, int sys_errno, const char *text, PyObject *filename)
{
    char msg[MLU_ERROR_TEXT + 128];
    PyObject *umsg = NULL, *args = NULL;
    PyObject *fs = as_fspath(filename); /* new ref, or NULL: the file name given as it is */

    if (fs != NULL)
        filename = fs;
    if (sys_errno != 0 && filename != NULL)
        PyOS_snprintf(msg, sizeof(msg), "%s", strerror(sys_errno));
    else if (sys_errno != 0)
        PyOS_snprintf(msg, sizeof(msg), "%s: %s", text, strerror(sys_errno));
    else
        PyOS_snprintf(msg, sizeof(msg), "%s", text);
    umsg = text_str(msg); /* new ref */
    if (umsg == NULL)
        goto done;
    if (filename != NULL)
        args = Py_BuildValue("(iOO)", sys_errno, umsg, filename);
    else
        args = Py_BuildValue("(iO)", sys_errno, umsg);
    if (args != NULL) {
        PyErr_SetObject(exc, args);
        if (sys_errno != 0 && filename != NULL && text != NULL && text[0] != '\0')
            add_note_to_raised(text);
    }
done:
    Py_XDECREF(args);
    Py_XDECREF(umsg);
    Py_XDECREF(fs);
}

/* exc(text); when path (the subject: str, bytes or os.PathLike; may be NULL)
 * names the file the error is about and the text does not name it already,
 * exc("'path': text"), so that a format error says which file it is in. */
static void build_text_error(PyObject *exc, const char *text, PyObject *path)
{
    PyObject *fs = as_fspath(path), *str = NULL; /* new refs */
    const char *u;

    if (fs != NULL && PyBytes_Check(fs))
        str = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(fs), PyBytes_GET_SIZE(fs));
    else if (fs != NULL)
        str = Py_NewRef(fs);
    if (str == NULL)
        PyErr_Clear(); /* a path that cannot be shown: the text alone */
    u = str != NULL ? PyUnicode_AsUTF8(str) : NULL;
    if (u == NULL)
        PyErr_Clear();
    if (u != NULL && u[0] != '\0' && strstr(text, u) == NULL)
        PyErr_Format(exc, "'%U': %s", str, text);
    else
        PyErr_Format(exc, "%s", text);
    Py_XDECREF(str);
    Py_XDECREF(fs);
}

PyObject *mlu_raise_about(PyObject *exc, PyObject *path, const char *fmt, ...)
{
    va_list ap;
    PyObject *msg;
    const char *text;

    va_start(ap, fmt);
    msg = PyUnicode_FromFormatV(fmt, ap); /* new ref */
    va_end(ap);
    text = msg != NULL ? PyUnicode_AsUTF8(msg) : NULL;
    if (text != NULL)
        build_text_error(exc, text, path);
    Py_XDECREF(msg);
    return NULL;
}

/* exc(message, document, position), as json.JSONDecodeError takes them: the
 * document (the bytes parsed, borrowed; none: "") as a str, and the
 * character index of err->offset in it. */
static void build_document_error(PyObject *exc, const mlu_error *err, const char *text, PyObject *document)
{
    const char *doc = "";
    Py_ssize_t n = 0, at;
    PyObject *s = NULL, *head = NULL, *msg = NULL, *value = NULL;

    if (document != NULL && PyBytes_Check(document)) {
        doc = PyBytes_AS_STRING(document);
        n = PyBytes_GET_SIZE(document);
    }
    at = err->offset < 0 ? 0 : err->offset > (int64_t)n ? n : (Py_ssize_t)err->offset;
    s = PyUnicode_DecodeUTF8(doc, n, "replace");
    head = s != NULL ? PyUnicode_DecodeUTF8(doc, at, "replace") : NULL;
    msg = head != NULL ? text_str(text) : NULL;
    if (msg != NULL)
        value = PyObject_CallFunction(exc, "OOn", msg, s, PyUnicode_GET_LENGTH(head));
    if (value != NULL)
        PyErr_SetObject(exc, value);
    Py_XDECREF(value);
    Py_XDECREF(msg);
    Py_XDECREF(head);
    Py_XDECREF(s);
}

PyObject *mlu_raise(mlu_state *st, const mlu_error *err, mlu_domain domain, PyObject *subject)
{
    const char *text = err->text[0] ? err->text : mlu_status_name(err->code);
    const exc_rule *rule;
    PyObject *exc; /* borrowed */

    assert(st != NULL);
    if ((int)err->code <= (int)MLU_OK || err->code >= MLU_STATUS_COUNT ||
        (int)domain < 0 || domain >= MLU_DOMAIN_COUNT) {
        PyErr_Format(PyExc_SystemError, "mlutils: error raised with status %d (domain %d)",
                     (int)err->code, (int)domain);
        return NULL;
    }
    rule = domain_class[domain][err->code].set ? &domain_class[domain][err->code] : &status_class[err->code];
    exc = resolve(st, rule);
    switch (rule->build) {
    case BUILD_OS_ERROR:
        build_os_error(exc, err->sys_errno, text, subject);
        break;
    case BUILD_DOCUMENT:
        build_document_error(exc, err, text, subject);
        break;
    case BUILD_DETAIL:
        if (subject != NULL && PyUnicode_Check(subject))
            PyErr_Format(exc, "%s. %U", text, subject);
        else
            PyErr_Format(exc, "%s", text);
        break;
    default:
        build_text_error(exc, text, subject);
        break;
    }
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

PyObject *mlu_raise_write(mlu_state *st, const mlu_error *err, mlu_domain domain, PyObject *path)
{
    return mlu_raise(st, err, domain, err->code == MLU_EIO ? path : NULL);
}
