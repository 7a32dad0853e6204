/* sigsave.c: a signal's struct sigaction saved and restored (see sigsave.h). */
#define _GNU_SOURCE
#include "sigsave.h"

#include <errno.h>
#include <string.h>

/* The kernel's SA_RESTORER (not in <signal.h>): the C library adds it, with
 * its own restorer, to every action it installs, and the kernel reports it
 * back.  No caller chose it, and a restore adds it again: a record leaves it
 * out, so actions saved before and after a restore compare equal. */
#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__) || defined(__aarch64__) || \
                           defined(__arm__) || defined(__powerpc__) || defined(__s390__))
#define LIBC_SA_RESTORER 0x04000000
#else
#define LIBC_SA_RESTORER 0
#endif

/* Where this code is loaded: the same in the process that saved a record
 * and its forks, elsewhere (address space layout randomisation) another. */
static uint64_t image_tag(void)
{
    return (uint64_t)(uintptr_t)&mlu_sigsave_valid_signum;
}

int mlu_sigsave_valid_signum(long signum)
{
    return signum >= 1 && signum < NSIG;
}

mlu_status mlu_sigsave_get(int signum, mlu_sigsave *out, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    struct sigaction raw;
    int s;

    memset(out, 0, sizeof(*out));
    memset(&raw, 0, sizeof(raw));
    if (!mlu_sigsave_valid_signum(signum)) {
        mlu_error_set(err, MLU_EINVAL, -1, "signal number %d is out of range (1 to %d)", signum, NSIG - 1);
        goto done;
    }
    if (sigaction(signum, NULL, &raw) != 0) {
        st = mlu_error_errno(err, errno, "cannot read the action of signal %d", signum);
        goto done;
    }
    /* Field by field into a zeroed struct: the C library fills only the part
     * of sa_mask the kernel has and leaves the rest (and any padding) as it
     * was, so a plain copy would differ from one save to the next. */
    if (raw.sa_flags & SA_SIGINFO)
        out->action.sa_sigaction = raw.sa_sigaction;
    else
        out->action.sa_handler = raw.sa_handler;
    out->action.sa_flags = raw.sa_flags & ~LIBC_SA_RESTORER;
    sigemptyset(&out->action.sa_mask);
    for (s = 1; s < NSIG; s++) {
        if (sigismember(&raw.sa_mask, s) == 1)
            sigaddset(&out->action.sa_mask, s);
    }
    memcpy(out->magic, MLU_SIGSAVE_MAGIC, sizeof(out->magic));
    out->signum = signum;
    out->action_size = (uint32_t)sizeof(out->action);
    out->image = image_tag();
    st = MLU_OK;
done:
    return st;
}

mlu_status mlu_sigsave_set(int signum, const mlu_sigsave *saved, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;

    if (!mlu_sigsave_valid_signum(signum)) {
        mlu_error_set(err, MLU_EINVAL, -1, "signal number %d is out of range (1 to %d)", signum, NSIG - 1);
        goto done;
    }
    if (memcmp(saved->magic, MLU_SIGSAVE_MAGIC, sizeof(saved->magic)) != 0 ||
        saved->action_size != (uint32_t)sizeof(saved->action)) {
        mlu_error_set(err, MLU_EINVAL, -1, "not a saved signal action");
        goto done;
    }
    if (saved->signum != signum) {
        mlu_error_set(err, MLU_EINVAL, -1, "the action was saved for signal %d, not %d", (int)saved->signum,
                      signum);
        goto done;
    }
    if (saved->image != image_tag()) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "the action of signal %d was saved in another process: its handler address means "
                      "nothing here", signum);
        goto done;
    }
    if (sigaction(signum, &saved->action, NULL) != 0) {
        st = mlu_error_errno(err, errno, "cannot restore the action of signal %d", signum);
        goto done;
    }
    st = MLU_OK;
done:
    return st;
}
