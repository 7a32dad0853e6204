/* sampler.c: the Python face of samplers. */
#include "module.h"

int mlu_sampler_module_init(PyObject *m)
{
    (void)m;
    return 0;
}
