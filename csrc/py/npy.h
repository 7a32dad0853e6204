/* npy.h: include this (not numpy/arrayobject.h) in binding files other than
 * module.c, which owns the NumPy C-API table. */
#ifndef MLU_PY_NPY_H
#define MLU_PY_NPY_H
#include "module.h"
#define PY_ARRAY_UNIQUE_SYMBOL MLU_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_20_API_VERSION
#include <numpy/arrayobject.h>
#endif
