/* moeinf native kernels: batch-1 / small-batch matrix-vector products for CPU decode.
 *
 * Owns: y = x W^T (+ bias) and the fused SwiGLU expert forward out = down(silu(gate x) * up x), with
 * x fp32 [T, K] and W [N, K] row-major in fp32, bf16 or f16, fp32 accumulation. Decode is bound by
 * reading weights, so each weight is read from memory once: a block of 4 weight rows stays in L1
 * while every token is multiplied with it, and half-precision weights are widened in registers
 * (F16C / a 16-bit shift for bf16). Output rows are split over a small pthread pool whose size is
 * a per-call argument (the caller passes torch's thread count so the two pools never both run).
 * An AVX2+FMA+F16C path is chosen at run time when the CPU has it; a portable scalar path otherwise.
 * No dependency on Python or torch: callers pass data pointers and shapes (loaded with ctypes).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define MK_X86 1
#include <immintrin.h>
#endif

#define MK_VERSION 2
#define MK_MAX_THREADS 64
#define MK_SPIN_NS 200000L /* workers spin this long for the next job before sleeping */

enum { MK_F32 = 0, MK_BF16 = 1, MK_F16 = 2 };
enum { MK_OK = 0, MK_EDTYPE = 1, MK_ESHAPE = 2, MK_ENOMEM = 3 };

/* What happens to a dot product before it is stored: y[t, n] = (acc ? y : 0) + scale[t] * (dot + bias[n]). */
typedef struct {
    const float *bias;  /* [N] or NULL */
    const float *scale; /* [T] or NULL */
    int accumulate;
} epilogue_t;

static inline void store(float *y, const epilogue_t *ep, int64_t t, int64_t n, float v) {
    if (ep->bias) v += ep->bias[n];
    if (ep->scale) v *= ep->scale[t];
    if (ep->accumulate) v += *y;
    *y = v;
}

/* ---------------------------------------------------------------- scalar conversions and path */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise the mantissa */
            exp = 127 - 14;
            while (!(man & 0x400u)) {
                man <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_f32(const void *w, int64_t i) { return ((const float *)w)[i]; }
static inline float load_bf16(const void *w, int64_t i) { return bf16_to_f32(((const uint16_t *)w)[i]); }
static inline float load_f16(const void *w, int64_t i) { return f16_to_f32(((const uint16_t *)w)[i]); }

/* Rows [n0, n1) of y[T, N] = x[T, K] W[N, K]^T, scalar. 8 partial sums per dot so the rounding is
 * close to the vector path's. */
#define SCALAR_ROWS(NAME, LOAD)                                                                           \
    static void NAME(const float *x, int64_t T, int64_t K, const void *w, int64_t n0, int64_t n1,       \
                     float *y, int64_t N, const epilogue_t *ep) {                                        \
        for (int64_t n = n0; n < n1; n++) {                                                             \
            for (int64_t t = 0; t < T; t++) {                                                           \
                const float *xt = x + t * K;                                                            \
                float part[8] = {0};                                                                    \
                int64_t k = 0;                                                                          \
                for (; k + 8 <= K; k += 8)                                                              \
                    for (int j = 0; j < 8; j++) part[j] += LOAD(w, n * K + k + j) * xt[k + j];          \
                float s = ((part[0] + part[4]) + (part[1] + part[5])) +                                 \
                          ((part[2] + part[6]) + (part[3] + part[7]));                                  \
                for (; k < K; k++) s += LOAD(w, n * K + k) * xt[k];                                     \
                store(y + t * N + n, ep, t, n, s);                                                      \
            }                                                                                           \
        }                                                                                               \
    }
SCALAR_ROWS(rows_f32_scalar, load_f32)
SCALAR_ROWS(rows_bf16_scalar, load_bf16)
SCALAR_ROWS(rows_f16_scalar, load_f16)

/* ---------------------------------------------------------------- AVX2 + FMA + F16C path */
#ifdef MK_X86
#define MK_AVX2 __attribute__((target("avx2,fma,f16c")))

MK_AVX2 static inline __m256 wload_f32(const void *w, int64_t i) { return _mm256_loadu_ps((const float *)w + i); }
MK_AVX2 static inline __m256 wload_bf16(const void *w, int64_t i) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
MK_AVX2 static inline __m256 wload_f16(const void *w, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
}

MK_AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R rows (1 or 4) x NT tokens (1 or 2) of dot products: R*NT independent accumulators keep the FMA
 * units busy while the weight rows stream in; the K tail (K % 8) is finished in scalar code. */
#define AVX2_ROWS(NAME, WLOAD, SLOAD, ES)                                                                 \
    MK_AVX2 static inline __attribute__((always_inline)) void NAME##_block(                              \
        const float *x, int64_t t, int nt, int64_t K, const void *w, int64_t n, int r, float *y,        \
        int64_t N, const epilogue_t *ep) {                                                               \
        __m256 acc[4][2];                                                                                \
        for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();                        \
        const float *x0 = x + t * K, *x1 = x + (t + (nt > 1)) * K;                                       \
        /* The next r rows, fetched while these are multiplied: short rows end the hardware             \
           prefetcher's streams before it has ramped up. */                                              \
        const char *pf = (const char *)w + (n + r) * K * ES;                                             \
        int64_t k = 0;                                                                                   \
        for (; k + 8 <= K; k += 8) {                                                                     \
            for (int64_t off = k * r * ES; off < (k + 8) * r * ES; off += 64)                            \
                _mm_prefetch(pf + off, _MM_HINT_T1);                                                     \
            __m256 a = _mm256_loadu_ps(x0 + k), b = _mm256_loadu_ps(x1 + k);                             \
            for (int i = 0; i < r; i++) {                                                                \
                __m256 wv = WLOAD(w, (n + i) * K + k);                                                   \
                acc[i][0] = _mm256_fmadd_ps(wv, a, acc[i][0]);                                           \
                if (nt > 1) acc[i][1] = _mm256_fmadd_ps(wv, b, acc[i][1]);                               \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < r; i++) {                                                                    \
            for (int j = 0; j < nt; j++) {                                                               \
                const float *xt = j ? x1 : x0;                                                           \
                float s = hsum(acc[i][j]);                                                               \
                for (int64_t kk = k; kk < K; kk++) s += SLOAD(w, (n + i) * K + kk) * xt[kk];            \
                store(y + (t + j) * N + n + i, ep, t + j, n + i, s);                                     \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    MK_AVX2 static void NAME(const float *x, int64_t T, int64_t K, const void *w, int64_t n0, int64_t n1, \
                             float *y, int64_t N, const epilogue_t *ep) {                                \
        int64_t n = n0;                                                                                  \
        for (; n + 4 <= n1; n += 4) {                                                                    \
            int64_t t = 0;                                                                               \
            for (; t + 2 <= T; t += 2) NAME##_block(x, t, 2, K, w, n, 4, y, N, ep);                      \
            if (t < T) NAME##_block(x, t, 1, K, w, n, 4, y, N, ep);                                      \
        }                                                                                                \
        for (; n < n1; n++) {                                                                            \
            int64_t t = 0;                                                                               \
            for (; t + 2 <= T; t += 2) NAME##_block(x, t, 2, K, w, n, 1, y, N, ep);                      \
            if (t < T) NAME##_block(x, t, 1, K, w, n, 1, y, N, ep);                                      \
        }                                                                                                \
    }
AVX2_ROWS(rows_f32_avx2, wload_f32, load_f32, 4)
AVX2_ROWS(rows_bf16_avx2, wload_bf16, load_bf16, 2)
AVX2_ROWS(rows_f16_avx2, wload_f16, load_f16, 2)

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
static int cpu_has_avx2(void) { return 0; }
#endif

typedef void (*rows_fn)(const float *, int64_t, int64_t, const void *, int64_t, int64_t, float *, int64_t,
                        const epilogue_t *);

static atomic_int use_simd = -1; /* -1: not decided yet */

static int simd_on(void) {
    int s = atomic_load(&use_simd);
    if (s < 0) {
        s = cpu_has_avx2();
        atomic_store(&use_simd, s);
    }
    return s;
}

static rows_fn rows_for(int dtype) {
#ifdef MK_X86
    if (simd_on()) {
        switch (dtype) {
        case MK_F32: return rows_f32_avx2;
        case MK_BF16: return rows_bf16_avx2;
        case MK_F16: return rows_f16_avx2;
        }
        return NULL;
    }
#endif
    switch (dtype) {
    case MK_F32: return rows_f32_scalar;
    case MK_BF16: return rows_bf16_scalar;
    case MK_F16: return rows_f16_scalar;
    }
    return NULL;
}

/* ---------------------------------------------------------------- thread pool */
/* A job is a number of row chunks. The caller publishes it, wakes the workers and claims chunks
 * itself; workers claim chunks from the same atomic counter while they last. The caller waits for
 * the chunks to be done, not for the workers to show up, so a worker that the OS has not scheduled
 * (a busy or shared machine) costs nothing: the caller then does all the work, at one thread's speed.
 * Workers spin briefly after a job (the next product of a decode step follows within microseconds),
 * then sleep on a condition variable. One job at a time: callers are serialised by `submit`. */

typedef struct job job_t;
struct job {
    void (*chunk)(const job_t *, int64_t c); /* compute chunk c */
    int64_t chunks;
    atomic_llong next, done;
    const void *args;
};

static struct {
    pthread_mutex_t submit, lock;
    pthread_cond_t wake;
    int workers;
    atomic_uint gen;
    job_t *_Atomic current;
    atomic_int active; /* workers inside a job: the caller's job must outlive them */
} pool = {.submit = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#ifdef MK_X86
    _mm_pause();
#else
    sched_yield();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void work_on(job_t *j) {
    for (int64_t c; (c = atomic_fetch_add(&j->next, 1)) < j->chunks;) {
        j->chunk(j, c);
        atomic_fetch_add(&j->done, 1);
    }
}

static void *worker_main(void *p) {
    unsigned seen = (unsigned)(uintptr_t)p; /* the generation when this worker was created */
    for (;;) {
        int64_t deadline = now_ns() + MK_SPIN_NS;
        for (int i = 0; atomic_load(&pool.gen) == seen; i++) {
            /* Spin a few microseconds, then yield while waiting: torch's threads (attention, norms
             * between two of our products) get this core whenever they are runnable. */
            if (i < 2048) cpu_relax();
            else sched_yield();
            if ((i & 255) == 255 && now_ns() > deadline) {
                pthread_mutex_lock(&pool.lock);
                while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                pthread_mutex_unlock(&pool.lock);
            }
        }
        seen = atomic_load(&pool.gen);
        /* Announce, then look: the caller clears `current` before it waits for `active` to drop to 0
         * (both seq_cst), so a job seen here is still alive. */
        atomic_fetch_add(&pool.active, 1);
        job_t *j = atomic_load(&pool.current);
        if (j) work_on(j);
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* The workers do not exist in a forked child: start afresh. */
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    atomic_store(&pool.active, 0);
    atomic_store(&pool.current, NULL);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static void spin_until_equal(atomic_llong *v, long long want) {
    for (int i = 0; atomic_load(v) != want; i++)
        if (i < 2048) cpu_relax();
        else sched_yield();
}

/* Run all chunks of j on up to nth threads (the caller included) and return when they are done. */
static void run_job(job_t *j, int nth) {
    atomic_store(&j->next, 0);
    atomic_store(&j->done, 0);
    if (nth <= 1 || j->chunks <= 1) {
        work_on(j);
        return;
    }
    pthread_once(&fork_once, install_fork_handler);
    pthread_mutex_lock(&pool.submit);
    /* Workers block every signal (they inherit the mask at creation): a Ctrl-C must reach Python's
       main thread, which may be asleep in readline; a worker taking it would leave it asleep. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.workers < nth - 1 && pool.workers < MK_MAX_THREADS - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(uintptr_t)atomic_load(&pool.gen));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    atomic_store(&pool.current, j);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    work_on(j);
    spin_until_equal(&j->done, j->chunks);
    atomic_store(&pool.current, NULL);
    for (int i = 0; atomic_load(&pool.active) > 0; i++)
        if (i < 2048) cpu_relax();
        else sched_yield();
    pthread_mutex_unlock(&pool.submit);
}

/* Rows per chunk: one chunk per thread, in multiples of 4 so row blocks stay whole, and at least
 * MK_MIN_CHUNK weights (k per row) so that waking a thread (microseconds) pays off: a small product
 * runs on the caller alone. One long contiguous range per thread streams best: 8 chunks per thread
 * measured 40.6 ms per S1 decode step against 36.3-37.0 (2 cores), and a thread that is not scheduled
 * still costs nothing while the caller claims its chunk too (chunks are claimed, not assigned). */
#define MK_MIN_CHUNK 32768
static int64_t chunk_rows(int64_t rows, int64_t k, int nth) {
    if (nth < 1) nth = 1;
    if (nth > MK_MAX_THREADS) nth = MK_MAX_THREADS;
    int64_t r = (rows + nth - 1) / nth, least = (MK_MIN_CHUNK + k - 1) / (k > 0 ? k : 1);
    if (r < least) r = least;
    return (r + 3) / 4 * 4;
}

static void chunk_range(int64_t c, int64_t per, int64_t rows, int64_t *r0, int64_t *r1) {
    *r0 = c * per;
    *r1 = *r0 + per < rows ? *r0 + per : rows;
}

/* ---------------------------------------------------------------- public API */

typedef struct {
    rows_fn rows;
    const float *x;
    int64_t T, K, N, per;
    const void *w;
    float *y;
    epilogue_t ep;
} linear_args;

static void linear_chunk(const job_t *j, int64_t c) {
    const linear_args *a = j->args;
    int64_t n0, n1;
    chunk_range(c, a->per, a->N, &n0, &n1);
    a->rows(a->x, a->T, a->K, a->w, n0, n1, a->y, a->N, &a->ep);
}

/* y[T, N] = x[T, K] W[N, K]^T + bias[N]. */
int mk_linear(const float *x, int64_t T, int64_t K, const void *w, int dtype, int64_t N, const float *bias,
              float *y, int nthreads) {
    rows_fn rows = rows_for(dtype);
    if (!rows) return MK_EDTYPE;
    if (T < 0 || K < 0 || N < 0) return MK_ESHAPE;
    if (T == 0 || N == 0) return MK_OK;
    int64_t per = chunk_rows(N, K, nthreads);
    linear_args a = {rows, x, T, K, N, per, w, y, {bias, NULL, 0}};
    job_t j = {linear_chunk, (N + per - 1) / per, 0, 0, &a};
    run_job(&j, nthreads);
    return MK_OK;
}

typedef struct {
    rows_fn rows;
    const float *x;
    int64_t T, D, I, per_i, per_d;
    const void *gate, *up, *down;
    float *g, *u; /* [T, I] each: gate and up products, then h = silu(g) * u in g */
    float *out;
    epilogue_t ep;
} expert_args;

static void expert_up_chunk(const job_t *j, int64_t c) {
    const expert_args *a = j->args;
    epilogue_t plain = {NULL, NULL, 0};
    int64_t i0, i1;
    chunk_range(c, a->per_i, a->I, &i0, &i1);
    a->rows(a->x, a->T, a->D, a->gate, i0, i1, a->g, a->I, &plain);
    a->rows(a->x, a->T, a->D, a->up, i0, i1, a->u, a->I, &plain);
    for (int64_t t = 0; t < a->T; t++) {
        float *g = a->g + t * a->I, *u = a->u + t * a->I;
        for (int64_t i = i0; i < i1; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static void expert_down_chunk(const job_t *j, int64_t c) {
    const expert_args *a = j->args;
    int64_t d0, d1;
    chunk_range(c, a->per_d, a->D, &d0, &d1);
    a->rows(a->g, a->T, a->I, a->down, d0, d1, a->out, a->D, &a->ep);
}

/* out[T, D] = (accumulate ? out : 0) + scale[T] * down(silu(x gate^T) * (x up^T)).
 * x [T, D] fp32; gate, up [I, D] and down [D, I] in `dtype`; scale [T] or NULL. */
int mk_expert_forward(const float *x, int64_t T, int64_t D, int64_t I, const void *gate, const void *up,
                      const void *down, int dtype, const float *scale, int accumulate, float *out,
                      int nthreads) {
    rows_fn rows = rows_for(dtype);
    if (!rows) return MK_EDTYPE;
    if (T < 0 || D < 0 || I < 0) return MK_ESHAPE;
    if (T == 0 || D == 0) return MK_OK;
    float stack[8192]; /* T * I <= 4096 (decode) needs no allocation */
    size_t need = (size_t)(2 * T * I);
    float *h = need <= sizeof stack / sizeof *stack ? stack : malloc(need * sizeof(float));
    if (!h) return MK_ENOMEM;
    int64_t per_i = chunk_rows(I, 2 * D, nthreads), per_d = chunk_rows(D, I, nthreads);
    expert_args a = {rows, x, T, D, I, per_i, per_d, gate, up, down, h, h + T * I, out, {NULL, scale, accumulate}};
    job_t up_job = {expert_up_chunk, (I + per_i - 1) / per_i, 0, 0, &a};
    job_t down_job = {expert_down_chunk, (D + per_d - 1) / per_d, 0, 0, &a};
    if (I > 0) run_job(&up_job, nthreads);
    run_job(&down_job, nthreads);
    if (h != stack) free(h);
    return MK_OK;
}

/* ---------------------------------------------------------------- a whole MoE layer for one token */

#define MK_MAX_EXPERTS 64

typedef struct {
    rows_fn rows;
    const float *x;
    int64_t D, I, n, per_i, per_d;
    const void *const *gate, *const *up, *const *down;
    const float *scale; /* [n] */
    float *g, *u;       /* [n, I] each; h = silu(g) * u in g */
    float *out;         /* [D] */
} moe_args;

static void moe_up_chunk(const job_t *j, int64_t c) {
    const moe_args *a = j->args;
    epilogue_t plain = {NULL, NULL, 0};
    int64_t r0, r1; /* rows of the n experts' gate/up stacked: expert e owns [e * I, (e + 1) * I) */
    chunk_range(c, a->per_i, a->n * a->I, &r0, &r1);
    for (int64_t e = r0 / a->I; e < a->n && e * a->I < r1; e++) {
        int64_t i0 = r0 > e * a->I ? r0 - e * a->I : 0, i1 = r1 < (e + 1) * a->I ? r1 - e * a->I : a->I;
        float *g = a->g + e * a->I, *u = a->u + e * a->I;
        a->rows(a->x, 1, a->D, a->gate[e], i0, i1, g, a->I, &plain);
        a->rows(a->x, 1, a->D, a->up[e], i0, i1, u, a->I, &plain);
        for (int64_t i = i0; i < i1; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i]; /* as expert_up_chunk */
    }
}

static void moe_down_chunk(const job_t *j, int64_t c) {
    const moe_args *a = j->args;
    int64_t d0, d1;
    chunk_range(c, a->per_d, a->D, &d0, &d1);
    for (int64_t d = d0; d < d1; d++) a->out[d] = 0.0f;
    for (int64_t e = 0; e < a->n; e++) {
        /* out += scale[e] * (down_e h_e), in the given expert order: the same roundings as one expert
           at a time (its product, times its weight, added to the running sum). */
        epilogue_t ep = {NULL, a->scale + e, 1};
        a->rows(a->g + e * a->I, 1, a->I, a->down[e], d0, d1, a->out, a->D, &ep);
    }
}

/* out[D] = sum over e = 0..n-1, in that order, of scale[e] * down_e(silu(gate_e x) * (up_e x)), for
 * one token x [D] fp32; gate_e, up_e [I, D] and down_e [D, I] in `dtype`. Bit for bit what n calls of
 * mk_expert_forward, each result times its scale, summed from zero in the same order, give; two jobs
 * (gate/up of all experts, then down) instead of 2n. */
int mk_moe_forward(const float *x, int64_t D, int64_t I, int64_t n, const void *const *gate,
                   const void *const *up, const void *const *down, int dtype, const float *scale, float *out,
                   int nthreads) {
    rows_fn rows = rows_for(dtype);
    if (!rows) return MK_EDTYPE;
    if (D < 0 || I < 0 || n < 0 || n > MK_MAX_EXPERTS) return MK_ESHAPE;
    if (D == 0) return MK_OK;
    float *h = malloc((size_t)(2 * n * I + 1) * sizeof(float));
    if (!h) return MK_ENOMEM;
    int64_t per_i = chunk_rows(n * I, 2 * D, nthreads), per_d = chunk_rows(D, n * I, nthreads);
    moe_args a = {rows, x, D, I, n, per_i, per_d, gate, up, down, scale, h, h + n * I, out};
    job_t up_job = {moe_up_chunk, (n * I + per_i - 1) / per_i, 0, 0, &a};
    job_t down_job = {moe_down_chunk, (D + per_d - 1) / per_d, 0, 0, &a};
    if (n > 0 && I > 0) run_job(&up_job, nthreads);
    run_job(&down_job, nthreads);
    free(h);
    return MK_OK;
}

int mk_version(void) { return MK_VERSION; }

/* 1 when the AVX2+FMA+F16C path is in use, 0 for the scalar path. */
int mk_simd(void) { return simd_on(); }

/* Force the scalar path (enable=0) or the best available one (enable=1); returns the path now in use. */
int mk_set_simd(int enable) {
    atomic_store(&use_simd, enable ? cpu_has_avx2() : 0);
    return simd_on();
}
