/* sigsave.h: a signal's action as the kernel holds it, saved and put back.
 *
 * Python's signal module only knows the handlers set through it: one set in
 * C (faulthandler.register, a library) reads as SIG_DFL there, and putting
 * back what signal.getsignal() said removes it.  These save and restore the
 * whole struct sigaction (handler, flags, mask) instead.
 *
 *   mlu_sigsave s;
 *   mlu_sigsave_get(SIGUSR1, &s, &err);    before installing another handler
 *   ...
 *   mlu_sigsave_set(SIGUSR1, &s, &err);    after removing it
 *
 * A record holds a handler's address, valid only in the process that saved
 * it (or a fork of it): it also holds the signal number and where this code
 * is loaded, and mlu_sigsave_set refuses one saved for another signal or in
 * another process image, so a record that outlived its process (stored,
 * sent elsewhere) is refused rather than installing a stray address. */
#ifndef MLU_SIGSAVE_H
#define MLU_SIGSAVE_H

#include <signal.h>

#include "../mlu.h"

typedef struct mlu_sigsave {
    char magic[8];         /* MLU_SIGSAVE_MAGIC */
    int32_t signum;        /* the signal it was saved for */
    uint32_t action_size;  /* sizeof(struct sigaction) */
    uint64_t image;        /* where this code is loaded in the process that saved it */
    struct sigaction action;
} mlu_sigsave;

#define MLU_SIGSAVE_MAGIC "mlusig1"

/* 1 when signum names a signal (1 <= signum < NSIG), else 0. */
int mlu_sigsave_valid_signum(long signum);

/* Saves signum's current action into *out (every byte set: padding zeroed).
 * MLU_EINVAL for a number that names no signal; MLU_EIO (errno) when
 * sigaction fails. */
mlu_status mlu_sigsave_get(int signum, mlu_sigsave *out, mlu_error *err);

/* Makes *saved signum's action again.  MLU_EINVAL for a number that names no
 * signal, or a record mlu_sigsave_get did not make for signum in this
 * process image; MLU_EIO (errno) when sigaction fails (EINVAL for SIGKILL
 * and SIGSTOP, whose action cannot change). */
mlu_status mlu_sigsave_set(int signum, const mlu_sigsave *saved, mlu_error *err);

#endif
