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
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define MK_X86 1
#include <immintrin.h>
#endif

#define MK_VERSION 1
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
#define AVX2_ROWS(NAME, WLOAD, SLOAD)                                                                     \
    MK_AVX2 static inline __attribute__((always_inline)) void NAME##_block(                              \
        const float *x, int64_t t, int nt, int64_t K, const void *w, int64_t n, int r, float *y,        \
        int64_t N, const epilogue_t *ep) {                                                               \
        __m256 acc[4][2];                                                                                \
        for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();                        \
        const float *x0 = x + t * K, *x1 = x + (t + (nt > 1)) * K;                                       \
        int64_t k = 0;                                                                                   \
        for (; k + 8 <= K; k += 8) {                                                                     \
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
AVX2_ROWS(rows_f32_avx2, wload_f32, load_f32)
AVX2_ROWS(rows_bf16_avx2, wload_bf16, load_bf16)
AVX2_ROWS(rows_f16_avx2, wload_f16, load_f16)

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
/* The caller is thread 0; workers 1..n-1 wait for a new generation, spin briefly (the next product
 * of a decode step follows within microseconds), then sleep on a condition variable. One job at a
 * time: concurrent callers are serialised by `submit`. */

typedef void (*task_fn)(void *arg, int tid, int nth);

static struct {
    pthread_mutex_t submit, lock;
    pthread_cond_t wake;
    int workers;
    atomic_uint gen;
    task_fn fn;
    void *arg;
    int nth;
    atomic_int remaining;
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

static unsigned start_gen[MK_MAX_THREADS]; /* the generation current when worker tid was created */

static void *worker_main(void *p) {
    int tid = (int)(intptr_t)p;
    unsigned seen = start_gen[tid]; /* not pool.gen: the first job may be published before we get here */
    for (;;) {
        int64_t deadline = now_ns() + MK_SPIN_NS;
        for (int i = 0; atomic_load_explicit(&pool.gen, memory_order_acquire) == seen; i++) {
            cpu_relax();
            if ((i & 255) == 255 && now_ns() > deadline) {
                pthread_mutex_lock(&pool.lock);
                while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                pthread_mutex_unlock(&pool.lock);
            }
        }
        seen = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (tid < pool.nth) {
            pool.fn(pool.arg, tid, pool.nth);
            atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_release);
        }
    }
    return NULL;
}

static void after_fork_child(void) {
    /* The workers do not exist in a forked child: start afresh. */
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_child); }

/* Run fn(arg, tid, nth) for tid in [0, nth) on nth threads and wait for all of them. */
static void run_parallel(task_fn fn, void *arg, int nth) {
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_once(&fork_once, install_fork_handler);
    pthread_mutex_lock(&pool.submit);
    while (pool.workers < nth - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_gen[pool.workers + 1] = atomic_load(&pool.gen);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.workers++;
    }
    if (nth > pool.workers + 1) nth = pool.workers + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.nth = nth;
    atomic_store(&pool.remaining, nth - 1);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(arg, 0, nth);
    for (int i = 0; atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0; i++)
        if (i < 100000) cpu_relax();
        else sched_yield();
    pthread_mutex_unlock(&pool.submit);
}

/* Thread tid's share of n rows, in multiples of 4 so blocks stay whole. */
static void split_rows(int64_t n, int tid, int nth, int64_t *n0, int64_t *n1) {
    int64_t blocks = (n + 3) / 4, per = blocks / nth, extra = blocks % nth;
    int64_t b0 = tid * per + (tid < extra ? tid : extra), b1 = b0 + per + (tid < extra);
    *n0 = b0 * 4 < n ? b0 * 4 : n;
    *n1 = b1 * 4 < n ? b1 * 4 : n;
}

static int clamp_threads(int nth, int64_t rows) {
    if (nth < 1) nth = 1;
    if (nth > MK_MAX_THREADS) nth = MK_MAX_THREADS;
    int64_t blocks = (rows + 3) / 4;
    if (nth > blocks) nth = (int)(blocks > 0 ? blocks : 1);
    return nth;
}

/* ---------------------------------------------------------------- public API */

typedef struct {
    rows_fn rows;
    const float *x;
    int64_t T, K, N;
    const void *w;
    float *y;
    epilogue_t ep;
} linear_job;

static void linear_task(void *p, int tid, int nth) {
    linear_job *j = p;
    int64_t n0, n1;
    split_rows(j->N, tid, nth, &n0, &n1);
    if (n0 < n1) j->rows(j->x, j->T, j->K, j->w, n0, n1, j->y, j->N, &j->ep);
}

/* y[T, N] = x[T, K] W[N, K]^T + bias[N]. */
int mk_linear(const float *x, int64_t T, int64_t K, const void *w, int dtype, int64_t N, const float *bias,
              float *y, int nthreads) {
    rows_fn rows = rows_for(dtype);
    if (!rows) return MK_EDTYPE;
    if (T < 0 || K < 0 || N < 0) return MK_ESHAPE;
    if (T == 0 || N == 0) return MK_OK;
    linear_job j = {rows, x, T, K, N, w, y, {bias, NULL, 0}};
    run_parallel(linear_task, &j, clamp_threads(nthreads, N));
    return MK_OK;
}

typedef struct {
    rows_fn rows;
    const float *x;
    int64_t T, D, I;
    const void *gate, *up, *down;
    float *g, *u; /* [T, I] each: gate and up products, then h = silu(g) * u in g */
    float *out;
    epilogue_t ep;
} expert_job;

static void expert_up_task(void *p, int tid, int nth) {
    expert_job *j = p;
    epilogue_t plain = {NULL, NULL, 0};
    int64_t i0, i1;
    split_rows(j->I, tid, nth, &i0, &i1);
    if (i0 >= i1) return;
    j->rows(j->x, j->T, j->D, j->gate, i0, i1, j->g, j->I, &plain);
    j->rows(j->x, j->T, j->D, j->up, i0, i1, j->u, j->I, &plain);
    for (int64_t t = 0; t < j->T; t++) {
        float *g = j->g + t * j->I, *u = j->u + t * j->I;
        for (int64_t i = i0; i < i1; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static void expert_down_task(void *p, int tid, int nth) {
    expert_job *j = p;
    int64_t d0, d1;
    split_rows(j->D, tid, nth, &d0, &d1);
    if (d0 < d1) j->rows(j->g, j->T, j->I, j->down, d0, d1, j->out, j->D, &j->ep);
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
    expert_job j = {rows, x, T, D, I, gate, up, down, h, h + T * I, out, {NULL, scale, accumulate}};
    run_parallel(expert_up_task, &j, clamp_threads(nthreads, I));
    run_parallel(expert_down_task, &j, clamp_threads(nthreads, D));
    if (h != stack) free(h);
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
