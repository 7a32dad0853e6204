/* test_sigsave.c: a signal's raw action saved and restored (core/sigsave.c). */
#define _GNU_SOURCE
#include "mlu_test.h"

#include <errno.h>
#include <signal.h>

#include "core/sigsave.h"

static volatile sig_atomic_t hits, info_hits;

static void on_signal(int signum)
{
    (void)signum;
    hits++;
}

static void on_signal_info(int signum, siginfo_t *info, void *ctx)
{
    (void)ctx;
    if (info != NULL && info->si_signo == signum)
        info_hits++;
}

/* A handler set outside any saver comes back after another replaced it. */
static void test_round_trip(void)
{
    struct sigaction mine, now;
    mlu_sigsave saved, again;
    mlu_error err;

    memset(&mine, 0, sizeof(mine));
    mine.sa_sigaction = on_signal_info;
    mine.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&mine.sa_mask);
    sigaddset(&mine.sa_mask, SIGUSR2);
    CHECK(sigaction(SIGUSR1, &mine, NULL) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_get(SIGUSR1, &saved, &err) == MLU_OK);
    CHECK(mlu_sigsave_get(SIGUSR1, &again, &err) == MLU_OK);
    CHECK(memcmp(&saved, &again, sizeof(saved)) == 0);  /* every byte set the same way */
    CHECK(signal(SIGUSR1, SIG_IGN) != SIG_ERR);
    CHECK(signal(SIGUSR1, SIG_DFL) != SIG_ERR);
    CHECK(mlu_sigsave_set(SIGUSR1, &saved, &err) == MLU_OK);
    CHECK(mlu_sigsave_get(SIGUSR1, &again, &err) == MLU_OK);
    CHECK(memcmp(&saved, &again, sizeof(saved)) == 0);  /* what a restore installs reads back equal */
    CHECK(sigaction(SIGUSR1, NULL, &now) == 0);
    CHECK(now.sa_sigaction == on_signal_info && (now.sa_flags & (SA_SIGINFO | SA_RESTART)) == (SA_SIGINFO | SA_RESTART));
    CHECK(sigismember(&now.sa_mask, SIGUSR2) == 1 && sigismember(&now.sa_mask, SIGTERM) == 0);
    info_hits = 0;
    CHECK(raise(SIGUSR1) == 0);
    CHECK(info_hits == 1);
    /* a plain handler too */
    CHECK(signal(SIGUSR1, on_signal) != SIG_ERR);
    CHECK(mlu_sigsave_get(SIGUSR1, &saved, &err) == MLU_OK);
    CHECK(signal(SIGUSR1, SIG_DFL) != SIG_ERR);
    CHECK(mlu_sigsave_set(SIGUSR1, &saved, &err) == MLU_OK);
    hits = 0;
    CHECK(raise(SIGUSR1) == 0);
    CHECK(hits == 1);
    CHECK(signal(SIGUSR1, SIG_DFL) != SIG_ERR);
}

static void test_refusals(void)
{
    mlu_sigsave saved, bad;
    mlu_error err;
    int nums[] = {0, -1, NSIG, NSIG + 1, -2147483647 - 1};
    size_t i;

    mlu_error_clear(&err);
    CHECK(mlu_sigsave_get(SIGUSR2, &saved, &err) == MLU_OK);
    for (i = 0; i < sizeof(nums) / sizeof(nums[0]); i++) {
        mlu_error_clear(&err);
        CHECK(mlu_sigsave_get(nums[i], &bad, &err) == MLU_EINVAL && strstr(err.text, "out of range") != NULL);
        mlu_error_clear(&err);
        CHECK(mlu_sigsave_set(nums[i], &saved, &err) == MLU_EINVAL && strstr(err.text, "out of range") != NULL);
    }
    CHECK(!mlu_sigsave_valid_signum(0) && mlu_sigsave_valid_signum(1) && mlu_sigsave_valid_signum(NSIG - 1));
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_set(SIGUSR1, &saved, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "saved for signal") != NULL);
    bad = saved;
    bad.magic[0] ^= 1;
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_set(SIGUSR2, &bad, &err) == MLU_EINVAL && strstr(err.text, "not a saved") != NULL);
    bad = saved;
    bad.action_size--;
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_set(SIGUSR2, &bad, &err) == MLU_EINVAL && strstr(err.text, "not a saved") != NULL);
    bad = saved;
    bad.image ^= 0x1000;  /* as if saved where the code was loaded elsewhere */
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_set(SIGUSR2, &bad, &err) == MLU_EINVAL && strstr(err.text, "another process") != NULL);
    /* the kernel's own refusals: SIGKILL's and SIGSTOP's actions read, never change */
    CHECK(mlu_sigsave_get(SIGKILL, &bad, &err) == MLU_OK);
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_set(SIGKILL, &bad, &err) == MLU_EIO && err.sys_errno == EINVAL);
    CHECK(mlu_sigsave_get(SIGSTOP, &bad, &err) == MLU_OK);
    mlu_error_clear(&err);
    CHECK(mlu_sigsave_set(SIGSTOP, &bad, &err) == MLU_EIO && err.sys_errno == EINVAL);
}

int main(void)
{
    test_round_trip();
    test_refusals();
    return TEST_DONE("test_sigsave");
}
