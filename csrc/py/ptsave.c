/* ptsave.c: the Python face of PyTorch .pt saving. */
#include "module.h"

int mlu_ptsave_module_init(PyObject *m)
{
    (void)m;
    return 0;
}
