/* Sanitizer driver for a generated network (tests/test_sanitizers.py).
 *
 * Compiled together with NET.c, where the test passes
 *   -DNET=<name> -DNETU=<NAME> -DNET_HEADER='"<name>.h"' -DNET_CE=<1 for cross_entropy, 0 for mse>
 * It allocates every context array with malloc at exactly the size the header's macros
 * give (ints, stats, scratch and cache at least 1, as the header says), poisons the work arrays with
 * NaN / -1 bytes so that reading a slot before writing it shows up as a non-finite result,
 * and runs every entry point: forward (evaluation and training, with and without row
 * indices), backward, zero_grad, optimizer_step (SGD with momentum and weight decay, then
 * AdamW), train_step and train_batches, for the capacities and thread counts given on the
 * command line.  Exit status 0 means every check passed; AddressSanitizer and
 * UndefinedBehaviorSanitizer abort on the first error they see.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include NET_HEADER

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(x) CAT(NET, CAT(_, x))   /* F(forward) -> <name>_forward */
#define M(x) CAT(NETU, CAT(_, x))  /* M(NUM_PARAMS) -> <NAME>_NUM_PARAMS */

typedef F(real) real;
#if NET_CE
typedef int32_t target_t;
#define TARGET_SIZE 1
#else
typedef real target_t;
#define TARGET_SIZE M(OUT_SIZE)
#endif

#define DATA_ROWS 5
#define AT_LEAST_1(n) ((n) > 0 ? (size_t)(n) : (size_t)1)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform(void) /* xorshift64*, in [0, 1) */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
}

static void *alloc(size_t bytes, int poison)
{
    void *p = malloc(bytes);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(3);
    }
    memset(p, poison ? 0xFF : 0, bytes); /* 0xFF bytes: NaN reals, -1 ints */
    return p;
}

static int failures = 0;

static void check(int ok, const char *what, int cap, int threads)
{
    if (!ok) {
        fprintf(stderr, "FAILED: %s (capacity %d, threads %d)\n", what, cap, threads);
        failures++;
    }
}

static int all_finite(const real *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i]))
            return 0;
    return 1;
}

static const real *outputs(const F(ctx) *c, int s)
{
    return c->acts + (size_t)s * M(ACTS_PER_SAMPLE) + M(OUT_OFFSET);
}

static int outputs_finite(const F(ctx) *c, int n)
{
    for (int s = 0; s < n; s++)
        if (!all_finite(outputs(c, s), M(OUT_SIZE)))
            return 0;
    return 1;
}

static void run(int cap, int threads, int team)
{
    F(ctx) c;
    memset(&c, 0, sizeof c);
    c.params = alloc(sizeof(real) * M(NUM_PARAMS), 0);
    c.grads = alloc(sizeof(real) * M(NUM_PARAMS), 1);
    c.buffers = alloc(sizeof(real) * M(NUM_BUFFERS), 0);
    c.opt_m = alloc(sizeof(real) * M(NUM_PARAMS), 0);
    c.opt_v = alloc(sizeof(real) * M(NUM_PARAMS), 0);
    c.acts = alloc(sizeof(real) * (size_t)cap * M(ACTS_PER_SAMPLE), 1);
    c.dacts = alloc(sizeof(real) * (size_t)cap * M(ACTS_PER_SAMPLE), 1);
    c.ints = alloc(sizeof(int32_t) * AT_LEAST_1((size_t)cap * M(INTS_PER_SAMPLE)), 1);
    c.stats = alloc(sizeof(real) * AT_LEAST_1(M(STATS_SIZE)), 1);
    c.grads_tls = alloc(sizeof(real) * (size_t)threads * M(NUM_PARAMS), 1);
    c.scratch = alloc(sizeof(real) * AT_LEAST_1((size_t)threads * M(SCRATCH_PER_THREAD)), 1);
    c.cache = alloc(sizeof(real) * AT_LEAST_1(M(CACHE_SIZE)), 1);
    c.losses = alloc(sizeof(double) * (size_t)cap, 1);
    c.cache_valid = 0;
    c.capacity = cap;
    c.threads = threads;
    c.team = team; /* 0: one thread per chunk */
    c.parallel_min_eval = c.parallel_min_train = 1; /* every batch size runs on all the threads */
    c.seed = 42;
    c.counter = 0;

    for (int i = 0; i < M(NUM_PARAMS); i++)
        c.params[i] = (real)(0.1 * uniform() - 0.05); /* small: deep stacks stay well scaled */
    for (int i = 0; i < M(NUM_BUFFERS); i++) /* positive: valid running means and variances */
        c.buffers[i] = (real)(0.5 + uniform());

    real *x = alloc(sizeof(real) * DATA_ROWS * M(IN_SIZE), 0);
    target_t *y = alloc(sizeof(target_t) * DATA_ROWS * TARGET_SIZE, 0);
    for (int i = 0; i < DATA_ROWS * M(IN_SIZE); i++)
        x[i] = (real)(2 * uniform() - 1);
    for (int i = 0; i < DATA_ROWS * TARGET_SIZE; i++)
#if NET_CE
        y[i] = (int32_t)(uniform() * M(OUT_SIZE));
#else
        y[i] = (real)uniform(); /* in [0, 1): targets of mse and of binary_cross_entropy */
#endif
    const int64_t rows[DATA_ROWS] = {4, 0, 2, 1, 3};

    /* sizes outside 1..capacity are refused */
    check(F(forward)(&c, x, NULL, 0, 0) == -1, "forward with n = 0 returns -1", cap, threads);
    check(F(forward)(&c, x, NULL, cap + 1, 1) == -1, "forward with n > capacity returns -1", cap, threads);

    /* evaluation forward, without and with row indices */
    check(F(forward)(&c, x, NULL, cap, 0) == 0, "eval forward returns 0", cap, threads);
    check(outputs_finite(&c, cap), "eval forward outputs are finite", cap, threads);
    check(F(forward)(&c, x, rows, cap, 0) == 0, "eval forward (rows) returns 0", cap, threads);
    check(outputs_finite(&c, cap), "eval forward (rows) outputs are finite", cap, threads);

    /* training forward + backward */
    check(F(forward)(&c, x, NULL, cap, 1) == 0, "train forward returns 0", cap, threads);
    check(outputs_finite(&c, cap), "train forward outputs are finite", cap, threads);
    F(zero_grad)(&c);
    double loss = F(backward)(&c, y, NULL, cap);
    check(isfinite(loss) && loss >= 0, "backward loss is finite", cap, threads);
    check(all_finite(c.grads, M(NUM_PARAMS)), "gradients are finite", cap, threads);

    /* optimizers */
    F(optim) sgd = {0};
    sgd.kind = 0;
    sgd.lr = 0.01;
    sgd.momentum = 0.9;
    sgd.weight_decay = 1e-2;
    F(optim) adam = {0};
    adam.kind = 1;
    adam.lr = 1e-3;
    adam.beta1 = 0.9;
    adam.beta2 = 0.999;
    adam.eps = 1e-8;
    adam.weight_decay = 1e-2;
    const int batches = (DATA_ROWS + cap - 1) / cap; /* train_batches: rows in batches of cap, the last smaller */
    double *losses = alloc(sizeof(double) * (size_t)batches, 0);
    int64_t *correct = alloc(sizeof(int64_t) * (size_t)batches, 0);
    F(optim) *opts[2] = {&sgd, &adam};
    for (int o = 0; o < 2; o++) {
        F(optim) *opt = opts[o];
        const char *name = o ? "Adam" : "SGD";
        char what[128];
        /* each optimizer starts from zero moments (they share opt_m / opt_v) */
        memset(c.opt_m, 0, sizeof(real) * M(NUM_PARAMS));
        memset(c.opt_v, 0, sizeof(real) * M(NUM_PARAMS));
        F(optimizer_step)(&c, opt);
        snprintf(what, sizeof what, "%s optimizer_step", name);
        check(opt->step == 1 && all_finite(c.params, M(NUM_PARAMS)), what, cap, threads);
        /* train_step, without and with row indices */
        loss = F(train_step)(&c, x, y, NULL, cap, opt);
        snprintf(what, sizeof what, "%s train_step loss is finite", name);
        check(isfinite(loss), what, cap, threads);
        loss = F(train_step)(&c, x, y, rows, cap, opt);
        snprintf(what, sizeof what, "%s train_step (rows) loss is finite", name);
        check(isfinite(loss), what, cap, threads);
        int64_t done = F(train_batches)(&c, x, y, rows, DATA_ROWS, cap, opt, NULL, losses, correct);
        snprintf(what, sizeof what, "%s train_batches does every batch with a finite loss", name);
        check(done == batches, what, cap, threads);
        for (int k = 0; k < done; k++) {
            snprintf(what, sizeof what, "%s train_batches correct counts in range", name);
            check(isfinite(losses[k]) && correct[k] >= 0 && correct[k] <= cap, what, cap, threads);
        }
        check(opt->step == 3 + batches, "optimizer steps counted", cap, threads);
    }
    /* the recipe options at once: augmented inputs, a rate per batch, Nesterov, clipping,
     * half the parameters frozen, label smoothing (cross_entropy only) */
    double *lrs = alloc(sizeof(double) * (size_t)batches, 0);
    for (int k = 0; k < batches; k++)
        lrs[k] = 0.01 / (k + 1);
    const int64_t ranges[2] = {0, M(NUM_PARAMS) / 2};
    sgd.nesterov = 1;
    sgd.clip_norm = 0.5;
    sgd.ranges = ranges;
    sgd.nranges = 1;
    c.aug_shift = 1;
    c.aug_hflip = 1;
    c.aug_erase = 0.5;
    for (size_t ch = 0; ch < sizeof c.aug_fill / sizeof c.aug_fill[0]; ch++)
        c.aug_fill[ch] = -1 - 0.25 * (double)ch; /* a black pixel per channel */
    c.aug_seed = 7;
    c.aug_epoch = 3;
    c.label_smoothing = 0.1;
    int64_t done = F(train_batches)(&c, x, y, rows, DATA_ROWS, cap, &sgd, lrs, losses, correct);
    check(done == batches && sgd.lr == lrs[batches - 1], "train_batches with the recipe options", cap, threads);
    c.aug_shift = c.aug_hflip = 0;
    c.aug_erase = c.label_smoothing = 0;
    free(lrs);
    check(all_finite(c.params, M(NUM_PARAMS)), "parameters stay finite", cap, threads);
    check(all_finite(c.buffers, M(NUM_BUFFERS)), "buffers stay finite", cap, threads);

    check(F(forward)(&c, x, rows, cap, 0) == 0 && outputs_finite(&c, cap), "eval forward after training", cap,
          threads);

    free(losses);
    free(correct);
    free(x);
    free(y);
    free(c.params);
    free(c.grads);
    free(c.buffers);
    free(c.opt_m);
    free(c.opt_v);
    free(c.acts);
    free(c.dacts);
    free(c.ints);
    free(c.stats);
    free(c.grads_tls);
    free(c.scratch);
    free(c.cache);
    free(c.losses);
}

int main(int argc, char **argv)
{
    /* usage: driver CAPACITY:THREADS[:TEAM] ... */
    for (int i = 1; i < argc; i++) {
        int cap = 0, threads = 0, team = 0;
        if (sscanf(argv[i], "%d:%d:%d", &cap, &threads, &team) < 2 || cap < 1 || threads < 1 || team < 0) {
            fprintf(stderr, "bad argument '%s' (want CAPACITY:THREADS[:TEAM])\n", argv[i]);
            return 2;
        }
        run(cap, threads, team);
    }
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
