/* cuda.c: the Python face of csrc/cuda (device discovery, checksum). */
#include "module.h"

#include <string.h>

#include "../core/checksum.h"
#include "../cuda/mlu_cuda.h"

/* What cuda_device_count() returns (fields by name, also a tuple). */
static PyStructSequence_Field device_count_fields[] = {
    {"count", "usable CUDA devices"},
    {"reason", "why there are none ('' when count > 0)"},
    {NULL, NULL},
};
static PyStructSequence_Desc device_count_desc = {
    "mlutils._core.CudaDeviceCount", "Usable CUDA devices, and why none when count is 0.",
    device_count_fields, 2,
};

/* cuda_device_count() -> CudaDeviceCount(count, reason). */
static PyObject *py_cuda_device_count(PyObject *m, PyObject *unused)
{
    PyObject *v[2];
    mlu_error err;
    int count = 0;
    mlu_status st;

    (void)unused;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_cuda_device_count(&count, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK)
        return mlu_raise(mlu_get_state(m), &err, MLU_DOMAIN_VALUE, NULL);
    v[0] = PyLong_FromLong(count);
    v[1] = PyUnicode_DecodeUTF8(count > 0 ? "" : err.text, count > 0 ? 0 : (Py_ssize_t)strlen(err.text),
                                "replace");
    return mlu_struct_new_steal(mlu_get_state(m)->cuda_device_count_type, v, 2);
}

/* cuda_checksum64(ptr, nbytes, stream=0) -> int */
static PyObject *py_cuda_checksum64(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ptr", "nbytes", "stream", NULL};
    unsigned long long ptr = 0, stream = 0;
    Py_ssize_t nbytes = 0;
    uint64_t out = 0;
    mlu_error err;
    mlu_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Kn|K:cuda_checksum64", kwlist,
                                     &ptr, &nbytes, &stream))
        return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "nbytes must be >= 0");
        return NULL;
    }
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_cuda_checksum64((const void *)(uintptr_t)ptr, (size_t)nbytes,
                             (void *)(uintptr_t)stream, &out, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK)
        return mlu_raise(mlu_get_state(m), &err, MLU_DOMAIN_VALUE, NULL);
    return PyLong_FromUnsignedLongLong(out);
}

/* checksum64(buffer) -> int: the CPU reference over any contiguous buffer. */
static PyObject *py_checksum64(PyObject *m, PyObject *arg)
{
    Py_buffer view;
    uint64_t out;

    (void)m;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    out = mlu_checksum64(view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(out);
}

static PyObject *py_cuda_built(PyObject *m, PyObject *unused)
{
    (void)m;
    (void)unused;
    return PyBool_FromLong(mlu_cuda_built());
}

int mlu_cuda_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"cuda_built", py_cuda_built, METH_NOARGS,
         "cuda_built() -> bool: whether this build carries CUDA code."},
        {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
         "cuda_device_count() -> CudaDeviceCount(count, reason): usable devices, and why none when 0."},
        {"cuda_checksum64", (PyCFunction)(void (*)(void))py_cuda_checksum64,
         METH_VARARGS | METH_KEYWORDS,
         "cuda_checksum64(ptr, nbytes, stream=0) -> int: checksum64 of device memory."},
        {"checksum64", py_checksum64, METH_O,
         "checksum64(buffer) -> int: sum of b[i]*(2i+1) mod 2**64 over the bytes."},
        {NULL, NULL, 0, NULL},
    };
    if (mlu_add_struct_type(m, &device_count_desc, &mlu_get_state(m)->cuda_device_count_type) < 0)
        return -1;
    return PyModule_AddFunctions(m, methods);
}
