/* ptload.c: the Python face of PyTorch .pt loading. */
#include "module.h"

int mlu_ptload_module_init(PyObject *m)
{
    (void)m;
    return 0;
}
