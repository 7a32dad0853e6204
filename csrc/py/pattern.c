/* pattern.c: the Python face of codebook interleaving patterns. */
#include "module.h"

int mlu_pattern_module_init(PyObject *m)
{
    (void)m;
    return 0;
}
