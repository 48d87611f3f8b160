/* moeinf_policy_core: cache policies' state and decisions in C (a CPython extension), and the policy
   simulator's replay loop over them.

   TraceCore: the `trace` policy of src/moeinf/runtime/trace_policy.py + next_use.py, decision for
   decision: the same expected-time (ET) formula in the same floating-point operation order (built
   with -ffp-contract=off), the same lazy max-heap and check schedule. LruCore and LfuCore: the
   `lru` and `lfu` policies of src/moeinf/runtime/policy.py. The Python classes stay the reference
   and the fallback; tests/test_policy_core.py replays traces through both and requires identical
   fetch sequences. Why C: the policy simulator ran ~200 ET estimates per trace token, ~0.5 ms in
   pure Python, and its own loop ~50 us per token (issue 8 asks for 20k tokens per CPU second).

   Keys are flat ids f = layer * E + expert (their order is the (layer, expert) tuple order, which
   breaks ties in the heaps exactly as Python's tuple comparison does). The Python subclasses
   (runtime/policy_core.py, runtime/trace_policy_native.py) supply the tables, the library prior
   (`_load_prior`) and the ExpertKey objects returned to callers; TraceCore calls back `_rematch()`
   every rematch_every tokens. `_simulate` runs bench/simulator.py's loop step for step. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PC_VERSION 2
#define NONE INT64_MIN /* "no value" for token-valued fields (Python's None / missing dict key) */

typedef struct { double neg; int32_t f; } Ent; /* heap entry (-ET, key) */
typedef struct { int32_t *v; Py_ssize_t n, cap; } IVec;
typedef struct { int64_t token; int32_t f; } Check;
typedef struct { Check *v; Py_ssize_t n, cap; } CVec;

static int ivec_push(IVec *a, int32_t x) {
    if (a->n == a->cap) {
        Py_ssize_t cap = a->cap ? 2 * a->cap : 16;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) { PyErr_NoMemory(); return -1; }
        a->v = v; a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static int cvec_push(CVec *a, int64_t token, int32_t f) {
    if (a->n == a->cap) {
        Py_ssize_t cap = a->cap ? 2 * a->cap : 16;
        Check *v = realloc(a->v, cap * sizeof *v);
        if (!v) { PyErr_NoMemory(); return -1; }
        a->v = v; a->cap = cap;
    }
    a->v[a->n].token = token;
    a->v[a->n++].f = f;
    return 0;
}

/* The common start of every policy object: shape and the ExpertKey objects by flat id. */
/* The fields every core starts with (the casts to Base and Simple rely on this prefix). */
#define BASE_HEAD \
    PyObject_HEAD \
    int ready;    \
    int L, E, n;  \
    PyObject *keytab; /* list of n ExpertKey objects */

typedef struct {
    BASE_HEAD
} Base;

typedef struct {
    BASE_HEAD
    /* parameters */
    int bypass, prefetch, rematch_every, streak_lag, has_library;
    double bypass_margin, prefetch_threshold, kappa, lookahead_p, default_rate;
    int max_r;
    double *pow, *span, *hazard; /* [max_r + 1] */
    int32_t *next_check;         /* [max_r + 1] */
    /* per key */
    uint8_t *resident, *has_stored;
    double *stored, *ew;
    int64_t *last, *inserted, *checked_t, *ahead_tok;
    int32_t *count, *checked_c, *mark;
    int32_t mark_now;
    Py_ssize_t n_resident;
    Ent *heap;
    Py_ssize_t heap_n, heap_cap;
    double *prior; /* [n] or NULL: uniform default_rate */
    /* the running token and layer */
    int64_t t, ntok;
    int c, max_layer, in_layer, due;
    IVec running;
    IVec *layer_keys; /* [L]: experts of each layer's previous visit */
    uint8_t *has_layer_keys;
    CVec *checks;     /* [L]: (token, key) ET recomputations due at that layer's visit */
    IVec ahead_list, ahead_due;
    int ahead_layer;
    IVec *follow_due; /* [L] */
    Py_ssize_t n_follow_due;
    /* routing statistics */
    double **follow; /* [L * L]: (l, m) -> [E * E] or NULL */
    int has_follow;
    double *reuse;   /* [n] or NULL */
    double **cross;  /* [ncross]: [((xd + 1) * E + 1) * E], row k * E + e for e at layer c - k */
    int ncross, xd;
    IVec xflat;
    Py_ssize_t *xpos; /* [L], -1: the layer did not run in this token */
    double *xnow;     /* [L * E] */
    uint8_t *has_xnow;
} Core;

/* A policy core's type object: subclassable (the Python halves add the library and the shape). */
#define POLICY_TYPE(name, type, dealloc, methods, doc)                                   \
    {                                                                                    \
        PyVarObject_HEAD_INIT(NULL, 0)                                                   \
        .tp_name = "moeinf_policy_core." name,                                           \
        .tp_basicsize = sizeof(type),                                                    \
        .tp_dealloc = (destructor)dealloc,                                               \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,                            \
        .tp_doc = doc,                                                                   \
        .tp_methods = methods,                                                           \
        .tp_new = PyType_GenericNew,                                                     \
    }

/* --- heaps: binary min-heaps of entries of type T ordered by LT (TraceCore's (-ET, key), LfuCore's
   (count, last use, key)); PREFIX_down sifts h[i] down, PREFIX_push grows the array as needed. */

#define DEFINE_HEAP(PREFIX, T, LT)                                                                   \
    static void PREFIX##_down(T *h, Py_ssize_t n, Py_ssize_t i) {                                   \
        T x = h[i];                                                                                  \
        for (;;) {                                                                                   \
            Py_ssize_t c = 2 * i + 1;                                                                \
            if (c >= n) break;                                                                       \
            if (c + 1 < n && LT(h[c + 1], h[c])) c++;                                                \
            if (!LT(h[c], x)) break;                                                                 \
            h[i] = h[c];                                                                             \
            i = c;                                                                                   \
        }                                                                                            \
        h[i] = x;                                                                                    \
    }                                                                                                \
    static int PREFIX##_push(T **heap, Py_ssize_t *n, Py_ssize_t *cap, T x) {                       \
        if (*n == *cap) {                                                                            \
            Py_ssize_t grown = *cap ? 2 * *cap : 256;                                                \
            T *h = realloc(*heap, grown * sizeof *h);                                                \
            if (!h) { PyErr_NoMemory(); return -1; }                                                 \
            *heap = h; *cap = grown;                                                                 \
        }                                                                                            \
        T *h = *heap;                                                                                \
        Py_ssize_t i = (*n)++;                                                                       \
        while (i > 0) {                                                                              \
            Py_ssize_t p = (i - 1) / 2;                                                              \
            if (!LT(x, h[p])) break;                                                                 \
            h[i] = h[p];                                                                             \
            i = p;                                                                                   \
        }                                                                                            \
        h[i] = x;                                                                                    \
        return 0;                                                                                    \
    }                                                                                                \
    static T PREFIX##_pop(T *h, Py_ssize_t *n) {                                                     \
        T top = h[0];                                                                                \
        h[0] = h[--*n];                                                                              \
        if (*n) PREFIX##_down(h, *n, 0);                                                             \
        return top;                                                                                  \
    }

static inline int ent_lt(Ent a, Ent b) { return a.neg < b.neg || (a.neg == b.neg && a.f < b.f); }
DEFINE_HEAP(eheap, Ent, ent_lt)

static int heap_push(Core *s, double neg, int32_t f) {
    Ent x = {neg, f};
    return eheap_push(&s->heap, &s->heap_n, &s->heap_cap, x);
}

static Ent heap_pop(Core *s) { return eheap_pop(s->heap, &s->heap_n); }

static void heap_replace(Core *s, double neg, int32_t f) {
    s->heap[0].neg = neg;
    s->heap[0].f = f;
    eheap_down(s->heap, s->heap_n, 0);
}

/* --- expected time of next use (next_use.py) ------------------------------------------------------ */

typedef struct { int64_t tv; double p, q; } Estimate;

static Estimate estimate(Core *s, int32_t f) {
    int layer = f / s->E, e = f % s->E;
    int64_t t = s->t;
    int64_t tv = layer > s->c ? t : t + 1;
    int64_t seen = s->last[f];
    double rate = s->prior ? s->prior[f] : s->default_rate;
    int64_t nt = s->ntok < s->max_r ? s->ntok : s->max_r;
    double span = s->span[nt] + s->kappa;
    double p, q;
    if (seen == NONE) {
        p = 0.0;
        q = s->kappa * rate / span;
    } else {
        int64_t r = tv - seen;
        if (r > s->max_r) r = s->max_r;
        if (r < 0) r = 0; /* cannot happen in layer order; Python would index from the end */
        p = s->hazard[r];
        if (s->reuse) {
            p *= s->reuse[f];
            if (p > 0.99) p = 0.99;
        }
        q = (s->ew[f] * s->pow[r] + s->kappa * rate) / span;
    }
    if (q > p) p = q;
    if (tv != t && s->has_xnow[layer]) {
        p = s->xnow[(Py_ssize_t)layer * s->E + e];
        if (p < 0.01) p = 0.01;
        else if (p > 0.99) p = 0.99;
    }
    if (s->ahead_list.n && s->ahead_tok[f] == tv && s->lookahead_p > p) p = s->lookahead_p;
    Estimate out = {tv, p, q};
    return out;
}

static double et_of(Core *s, int32_t f) {
    Estimate x = estimate(s, f);
    double q = x.q < 1e-3 ? 1e-3 : x.q;
    int64_t base = x.tv * s->L + f / s->E;
    return (double)base + (double)s->L * (1.0 - x.p) / q;
}

/* The ET of f (of a layer ahead in this token) with p averaged with P(f | the running layer's experts);
   returns 0 without a table for that layer pair (then *out is untouched). */
static int et_follow(Core *s, int32_t f, double *out) {
    int m = f / s->E, e = f % s->E;
    if (!s->has_follow || s->c < 0) return 0;
    double *table = s->follow[(Py_ssize_t)s->c * s->L + m];
    if (!table) return 0;
    double sum = 0.0;
    for (Py_ssize_t i = 0; i < s->running.n; i++) sum += table[(Py_ssize_t)(s->running.v[i] % s->E) * s->E + e];
    double pf = sum / (double)s->running.n;
    Estimate x = estimate(s, f);
    double p = 0.5 * (x.p + pf);
    double q = x.q < 1e-3 ? 1e-3 : x.q;
    int64_t base = x.tv * s->L + m;
    *out = (double)base + (double)s->L * (1.0 - p) / q;
    return 1;
}

static int push_key(Core *s, int32_t f) {
    double et = et_of(s, f);
    s->stored[f] = et;
    s->has_stored[f] = 1;
    return heap_push(s, -et, f);
}

static int rebuild(Core *s) {
    s->heap_n = 0;
    for (int32_t f = 0; f < s->n; f++) {
        s->has_stored[f] = 0;
        if (s->resident[f] && push_key(s, f) < 0) return -1;
    }
    return 0;
}

/* The cross-token prediction for the running layer's next visit (next_use._predict_next). */
static int predict_next(Core *s, const int32_t *keys, Py_ssize_t nk) {
    int c = s->c;
    if (c >= s->ncross) return 0;
    const double *table = s->cross[c];
    Py_ssize_t start = s->xpos[c] = s->xflat.n;
    /* entries a * E - e for expert e at layer a: its row in layer c's table is c * E - that */
    for (Py_ssize_t i = 0; i < nk; i++)
        if (ivec_push(&s->xflat, (int32_t)c * s->E - keys[i] % s->E) < 0) return -1;
    for (int a = c - s->xd; a < c; a++) {
        if (a >= 0 && s->xpos[a] >= 0) { start = s->xpos[a]; break; }
    }
    double *out = s->xnow + (Py_ssize_t)c * s->E;
    Py_ssize_t cE = (Py_ssize_t)c * s->E, E = s->E;
    const double *intercept = table + (Py_ssize_t)(s->xd + 1) * E * E;
    /* numpy's add.reduce over axis 0: the first row, then each next row added in order */
    Py_ssize_t stop = s->xflat.n;
    const double *row = start == stop ? intercept : table + (cE - s->xflat.v[start]) * E;
    memcpy(out, row, E * sizeof *out);
    for (Py_ssize_t i = start + 1; i < stop; i++) {
        row = table + (cE - s->xflat.v[i]) * E;
        for (Py_ssize_t j = 0; j < E; j++) out[j] += row[j];
    }
    if (start < stop)
        for (Py_ssize_t j = 0; j < E; j++) out[j] += intercept[j];
    s->has_xnow[c] = 1;
    return 1;
}

static int schedule(Core *s, int32_t f, int64_t token) { return cvec_push(&s->checks[f / s->E], token, f); }

/* --- layer and token boundaries ------------------------------------------------------------------- */

static int new_token(Core *s, PyObject *self) {
    memset(s->has_xnow, 0, s->L);
    s->xflat.n = 0;
    for (int l = 0; l < s->L; l++) s->xpos[l] = -1;
    s->t += 1;
    s->ntok += 1;
    if (s->has_library && s->rematch_every && s->ntok % s->rematch_every == 0) {
        PyObject *r = PyObject_CallMethod(self, "_rematch", NULL); /* -> _load_prior -> rebuild */
        if (!r) return -1;
        Py_DECREF(r);
    }
    return 0;
}

static int start_layer(Core *s, PyObject *self, int layer) {
    s->in_layer = 1;
    if (s->c >= 0) {
        IVec *lk = &s->layer_keys[s->c];
        lk->n = 0;
        for (Py_ssize_t i = 0; i < s->running.n; i++)
            if (ivec_push(lk, s->running.v[i]) < 0) return -1;
        s->has_layer_keys[s->c] = 1;
    }
    if (layer <= s->c) {
        if (new_token(s, self) < 0) return -1;
    } else if (s->ntok == 0) {
        s->ntok = 1;
    }
    s->c = layer;
    if (layer > s->max_layer) s->max_layer = layer;
    s->running.n = 0;
    s->due = 1;
    if (layer == s->ahead_layer) {
        s->ahead_due.n = 0;
        for (Py_ssize_t i = 0; i < s->ahead_list.n; i++) {
            int32_t f = s->ahead_list.v[i];
            if (s->resident[f] && ivec_push(&s->ahead_due, f) < 0) return -1;
            s->ahead_tok[f] = NONE;
        }
        s->ahead_list.n = 0;
        s->ahead_layer = -1;
    }
    if (s->n_follow_due) {
        IVec *lowered = &s->follow_due[layer];
        if (lowered->n) {
            for (Py_ssize_t i = 0; i < lowered->n; i++)
                if (s->resident[lowered->v[i]] && ivec_push(&s->ahead_due, lowered->v[i]) < 0) return -1;
            lowered->n = 0;
            s->n_follow_due--;
        }
    }
    return 0;
}

/* Recompute one due key's ET (trace_policy._refresh_layer's loop body); `mark` dedups within a call. */
static int refresh_key(Core *s, int32_t f) {
    if (s->mark[f] == s->mark_now) return 0;
    s->mark[f] = s->mark_now;
    int64_t t = s->t;
    int64_t seen = s->last[f] == NONE ? -1 : s->last[f];
    if (seen >= t || !s->resident[f]) return 0;
    if (push_key(s, f) < 0) return -1;
    int64_t r;
    if (seen >= 0) r = t - seen;
    else r = t - (s->inserted[f] == NONE ? t : s->inserted[f]);
    int64_t nxt = r <= s->max_r ? s->next_check[r] : 0;
    if (nxt && schedule(s, f, t + nxt - r) < 0) return -1;
    return 0;
}

static int refresh_layer(Core *s) {
    s->due = 0;
    int c = s->c;
    if (s->ncross && !s->has_xnow[c] && s->running.n) {
        int got = predict_next(s, s->running.v, s->running.n);
        if (got < 0) return -1;
        if (got)
            for (Py_ssize_t i = 0; i < s->running.n; i++)
                if (s->resident[s->running.v[i]] && push_key(s, s->running.v[i]) < 0) return -1;
    }
    if (++s->mark_now == INT32_MAX) {
        memset(s->mark, 0, s->n * sizeof *s->mark);
        s->mark_now = 1;
    }
    /* Checks due now, then the previous visit's experts, then the looked-ahead ones (Python's order). */
    CVec *due = &s->checks[c];
    Py_ssize_t kept = 0, ndue = due->n;
    int32_t *now = NULL;
    Py_ssize_t nnow = 0;
    if (ndue) {
        now = malloc(ndue * sizeof *now);
        if (!now) { PyErr_NoMemory(); return -1; }
        for (Py_ssize_t i = 0; i < ndue; i++) {
            Check ch = due->v[i];
            if (ch.token == s->t) now[nnow++] = ch.f;
            else if (ch.token > s->t) due->v[kept++] = ch; /* earlier tokens: never popped in Python */
        }
        due->n = kept;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < nnow && rc == 0; i++) rc = refresh_key(s, now[i]);
    free(now);
    if (rc < 0) return -1;
    if (s->has_layer_keys[c]) {
        IVec *prev = &s->layer_keys[c];
        for (Py_ssize_t i = 0; i < prev->n; i++)
            if (refresh_key(s, prev->v[i]) < 0) return -1;
    }
    if (s->ahead_due.n) {
        for (Py_ssize_t i = 0; i < s->ahead_due.n; i++)
            if (refresh_key(s, s->ahead_due.v[i]) < 0) return -1;
        s->ahead_due.n = 0;
    }
    return 0;
}

static int is_running(Core *s, int32_t f) {
    for (Py_ssize_t i = 0; i < s->running.n; i++)
        if (s->running.v[i] == f) return 1;
    return 0;
}

/* (ET, key) of the evictable resident with the largest ET; *found = -1 if none. can_evict: a Python
   callable, or NULL for "not of the running layer call". Returns -1 on a Python error. */
static int top_in(Core *s, PyObject *can_evict, int only_layer, int32_t *found, double *et_out);

static int top(Core *s, PyObject *can_evict, int32_t *found, double *et_out) {
    return top_in(s, can_evict, -1, found, et_out);
}

/* As top(), where without `can_evict` only keys of `only_layer` (>= 0) qualify. */
static int top_in(Core *s, PyObject *can_evict, int only_layer, int32_t *found, double *et_out) {
    int use_follow = s->has_follow && s->running.n;
    Ent *held = NULL;
    Py_ssize_t nheld = 0, capheld = 0;
    *found = -1;
    int rc = 0;
    while (s->heap_n) {
        Ent e = s->heap[0];
        int32_t f = e.f;
        if (!s->resident[f] || !s->has_stored[f] || s->stored[f] != -e.neg) {
            heap_pop(s);
            continue;
        }
        int ok;
        if (can_evict) {
            PyObject *r = PyObject_CallOneArg(can_evict, PyList_GET_ITEM(s->keytab, f));
            if (!r) { rc = -1; break; }
            ok = PyObject_IsTrue(r);
            Py_DECREF(r);
            if (ok < 0) { rc = -1; break; }
        } else {
            ok = (only_layer < 0 || f / s->E == only_layer) && !is_running(s, f);
        }
        if (ok) {
            int m = f / s->E;
            if (use_follow && m > s->c && !(s->checked_t[f] == s->t && s->checked_c[f] == s->c)) {
                s->checked_t[f] = s->t;
                s->checked_c[f] = s->c;
                double et;
                if (et_follow(s, f, &et) && et < -e.neg) {
                    s->stored[f] = et;
                    heap_replace(s, -et, f);
                    if (s->follow_due[m].n == 0) s->n_follow_due++;
                    if (ivec_push(&s->follow_due[m], f) < 0) { rc = -1; break; }
                    continue;
                }
            }
            *found = f;
            *et_out = -e.neg;
            break;
        }
        if (nheld == capheld) {
            capheld = capheld ? 2 * capheld : 16;
            Ent *h = realloc(held, capheld * sizeof *h);
            if (!h) { PyErr_NoMemory(); rc = -1; break; }
            held = h;
        }
        held[nheld++] = heap_pop(s);
    }
    for (Py_ssize_t i = 0; i < nheld; i++)
        if (heap_push(s, held[i].neg, held[i].f) < 0) rc = -1;
    free(held);
    if (rc == 0 && s->heap_n > 4 * s->n_resident + 64) { /* stale entries pile up: refile the live ones */
        Py_ssize_t k = 0;
        for (Py_ssize_t i = 0; i < s->heap_n; i++) {
            Ent e = s->heap[i];
            if (s->resident[e.f] && s->has_stored[e.f] && s->stored[e.f] == -e.neg) s->heap[k++] = e;
        }
        s->heap_n = k;
        for (Py_ssize_t i = k / 2 - 1; i >= 0; i--) eheap_down(s->heap, k, i);
    }
    return rc;
}

/* --- argument helpers ----------------------------------------------------------------------------- */

static int key_of(void *obj, PyObject *key, int32_t *f) {
    Base *s = obj;
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2) {
        PyErr_SetString(PyExc_TypeError, "expected an ExpertKey (layer, expert)");
        return -1;
    }
    long layer = PyLong_AsLong(PyTuple_GET_ITEM(key, 0));
    long e = PyLong_AsLong(PyTuple_GET_ITEM(key, 1));
    if ((layer == -1 || e == -1) && PyErr_Occurred()) return -1;
    if (layer < 0 || layer >= s->L || e < 0 || e >= s->E) {
        PyErr_Format(PyExc_ValueError, "expert key (%ld, %ld) outside the policy's %d x %d", layer, e, s->L, s->E);
        return -1;
    }
    *f = (int32_t)(layer * s->E + e);
    return 0;
}

static PyObject *key_obj(void *obj, int32_t f) {
    Base *s = obj;
    PyObject *k = PyList_GET_ITEM(s->keytab, f);
    Py_INCREF(k);
    return k;
}

static int check_ready(void *obj) {
    if (!((Base *)obj)->ready) {
        PyErr_SetString(PyExc_RuntimeError, "policy core used before _setup()");
        return -1;
    }
    return 0;
}

/* --- the hooks ------------------------------------------------------------------------------------ */

static int access_one(Core *s, int32_t f, int64_t lag_floor) {
    int64_t t = s->t;
    int64_t seen = s->last[f];
    s->last[f] = t;
    s->count[f] += 1;
    if (seen == NONE) {
        s->ew[f] = 1.0;
    } else {
        int64_t r = t - seen;
        s->ew[f] = s->ew[f] * s->pow[r < s->max_r ? r : s->max_r] + 1.0;
    }
    if (s->resident[f] && (seen == NONE || seen != t - 1 || s->stored[f] < (double)lag_floor)) return push_key(s, f);
    return 0;
}

static PyObject *Core_on_access(Core *s, PyObject *const *args, Py_ssize_t nargs) {
    int32_t f;
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "on_access(key, hit)"); return NULL; }
    if (check_ready(s) < 0 || key_of(s, args[0], &f) < 0) return NULL;
    if (!s->in_layer && start_layer(s, (PyObject *)s, f / s->E) < 0) return NULL;
    if (ivec_push(&s->running, f) < 0) return NULL;
    if (access_one(s, f, (s->t - s->streak_lag) * s->L) < 0) return NULL;
    Py_RETURN_NONE;
}

/* One layer call's uses (on_accesses): `fs` are flat ids, nk >= 1. */
static int accesses(Core *s, const int32_t *fs, Py_ssize_t nk) {
    if (!s->in_layer && start_layer(s, (PyObject *)s, fs[0] / s->E) < 0) return -1;
    if (s->ncross && predict_next(s, fs, nk) < 0) return -1;
    for (Py_ssize_t i = 0; i < nk; i++)
        if (ivec_push(&s->running, fs[i]) < 0) return -1;
    int64_t lag_floor = (s->t - s->streak_lag) * s->L;
    for (Py_ssize_t i = 0; i < nk; i++)
        if (access_one(s, fs[i], lag_floor) < 0) return -1;
    return 0;
}

static PyObject *Core_on_accesses(Core *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "on_accesses(keys, missed)"); return NULL; }
    if (check_ready(s) < 0) return NULL;
    PyObject *seq = PySequence_Fast(args[0], "keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t nk = PySequence_Fast_GET_SIZE(seq);
    int32_t small[16], *fs = nk <= 16 ? small : malloc(nk * sizeof *fs);
    PyObject *ret = NULL;
    if (!fs) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < nk; i++)
        if (key_of(s, PySequence_Fast_GET_ITEM(seq, i), &fs[i]) < 0) goto done;
    if (nk && accesses(s, fs, nk) < 0) goto done;
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (fs && fs != small) free(fs);
    Py_DECREF(seq);
    return ret;
}

static int insert(Core *s, int32_t f) {
    if (!s->resident[f]) { s->resident[f] = 1; s->n_resident++; }
    if (push_key(s, f) < 0) return -1;
    if (s->last[f] == NONE) {
        s->inserted[f] = s->t;
        return schedule(s, f, s->t + 1);
    }
    return 0;
}

static void evict(Core *s, int32_t f) {
    if (s->resident[f]) { s->resident[f] = 0; s->n_resident--; }
    s->has_stored[f] = 0;
    s->inserted[f] = NONE;
}

static PyObject *Core_on_insert(Core *s, PyObject *key) {
    int32_t f;
    if (check_ready(s) < 0 || key_of(s, key, &f) < 0 || insert(s, f) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_on_evict(Core *s, PyObject *key) {
    int32_t f;
    if (check_ready(s) < 0 || key_of(s, key, &f) < 0) return NULL;
    evict(s, f);
    Py_RETURN_NONE;
}

static int victim(Core *s, PyObject *can_evict, int32_t *f, double *et) {
    if (s->due && refresh_layer(s) < 0) return -1;
    return top(s, can_evict, f, et);
}

static PyObject *Core_choose_victim(Core *s, PyObject *can_evict) {
    int32_t f;
    double et;
    if (check_ready(s) < 0 || victim(s, can_evict, &f, &et) < 0) return NULL;
    if (f < 0) Py_RETURN_NONE;
    return key_obj(s, f);
}

/* choose_victim + on_evict + on_insert in one call (the simulator's fast path). */
static PyObject *Core_replace(Core *s, PyObject *const *args, Py_ssize_t nargs) {
    int32_t f, v;
    double et;
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "replace(key, can_evict)"); return NULL; }
    if (check_ready(s) < 0 || key_of(s, args[0], &f) < 0) return NULL;
    if (victim(s, args[1], &v, &et) < 0) return NULL;
    if (v < 0) Py_RETURN_NONE;
    evict(s, v);
    if (insert(s, f) < 0) return NULL;
    return key_obj(s, v);
}

/* 1: compute the miss f from a scratch slot; 0: give it a slot; -1: error. */
static int bypass_f(Core *s, int32_t f) {
    int32_t v;
    double et;
    if (!s->bypass) return 0;
    if (victim(s, NULL, &v, &et) < 0) return -1;
    if (v < 0) return 0;
    return et_of(s, f) > et + s->bypass_margin * s->L;
}

static PyObject *Core_should_bypass(Core *s, PyObject *key) {
    int32_t f;
    if (check_ready(s) < 0 || key_of(s, key, &f) < 0) return NULL;
    int r = bypass_f(s, f);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

typedef struct { double et; int32_t f; } Cand;

static int cand_cmp(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->et < y->et) return -1;
    if (x->et > y->et) return 1;
    return (x->f > y->f) - (x->f < y->f);
}

/* The prefetch plan after `layer`'s call into out[] (at most s->prefetch keys, most urgent first);
   returns their number, or -1 on error. */
static Py_ssize_t plan_f(Core *s, long layer, int32_t *out) {
    if (s->due && refresh_layer(s) < 0) return -1;
    s->in_layer = 0;
    long nxt = layer + 1;
    if (!s->prefetch || nxt >= s->L || nxt < 0) return 0;
    /* candidates: the ahead keys (run time) then the next layer's previous visit, each once */
    IVec *prev = s->has_layer_keys[nxt] ? &s->layer_keys[nxt] : NULL;
    Py_ssize_t npool = (prev ? prev->n : 0) + (s->ahead_layer == nxt ? s->ahead_list.n : 0);
    if (npool == 0) return 0;
    Cand small[32], *cands = npool <= 32 ? small : malloc(npool * sizeof *cands);
    if (!cands) { PyErr_NoMemory(); return -1; }
    Py_ssize_t nc = 0, nout = 0;
    if (++s->mark_now == INT32_MAX) {
        memset(s->mark, 0, s->n * sizeof *s->mark);
        s->mark_now = 1;
    }
    for (int part = 0; part < 2; part++) {
        IVec *src = part == 0 ? (s->ahead_layer == nxt ? &s->ahead_list : NULL) : prev;
        if (!src) continue;
        for (Py_ssize_t i = 0; i < src->n; i++) {
            int32_t f = src->v[i];
            if (s->ahead_layer == nxt) { /* dict.fromkeys: first occurrence only */
                if (s->mark[f] == s->mark_now) continue;
                s->mark[f] = s->mark_now;
            }
            if (s->resident[f]) continue;
            Estimate x = estimate(s, f);
            if (x.p >= s->prefetch_threshold) {
                cands[nc].et = et_of(s, f);
                cands[nc++].f = f;
            }
        }
    }
    int32_t v;
    double vet;
    if (nc && top(s, NULL, &v, &vet) < 0) nout = -1;
    else if (nc && v >= 0) {
        qsort(cands, nc, sizeof *cands, cand_cmp);
        for (Py_ssize_t i = 0; i < nc && i < s->prefetch; i++)
            if (cands[i].et < vet) out[nout++] = cands[i].f;
    }
    if (cands != small) free(cands);
    return nout;
}

/* The checks and the layer argument of a (layer, expert_ids) method; -1 with an exception set. */
static int layer_call(Core *s, PyObject *const *args, Py_ssize_t nargs, const char *usage, long *layer) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, usage); return -1; }
    if (check_ready(s) < 0) return -1;
    *layer = PyLong_AsLong(args[0]);
    return *layer == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *Core_plan_prefetch(Core *s, PyObject *const *args, Py_ssize_t nargs) {
    long layer;
    if (layer_call(s, args, nargs, "plan_prefetch(layer, expert_ids)", &layer) < 0) return NULL;
    int32_t small[16], *plan = s->prefetch <= 16 ? small : malloc(s->prefetch * sizeof *plan);
    if (!plan) return PyErr_NoMemory();
    Py_ssize_t np = plan_f(s, layer, plan);
    PyObject *out = np < 0 ? NULL : PyList_New(np);
    for (Py_ssize_t i = 0; out && i < np; i++) PyList_SET_ITEM(out, i, key_obj(s, plan[i]));
    if (plan != small) free(plan);
    return out;
}

static PyObject *Core_on_router_lookahead(Core *s, PyObject *const *args, Py_ssize_t nargs) {
    long layer;
    if (layer_call(s, args, nargs, "on_router_lookahead(layer, expert_ids)", &layer) < 0) return NULL;
    if (layer < 0 || layer >= s->L) return PyErr_Format(PyExc_ValueError, "layer %ld outside 0..%d", layer, s->L - 1);
    PyObject *seq = PySequence_Fast(args[1], "expert_ids must be a sequence");
    if (!seq) return NULL;
    int64_t tv = layer > s->c ? s->t : s->t + 1;
    for (Py_ssize_t i = 0; i < s->ahead_list.n; i++) s->ahead_tok[s->ahead_list.v[i]] = NONE;
    s->ahead_list.n = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long e = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (e == -1 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
        if (e < 0 || e >= s->E) { Py_DECREF(seq); return PyErr_Format(PyExc_ValueError, "expert %ld outside 0..%d", e, s->E - 1); }
        int32_t f = (int32_t)(layer * s->E + e);
        if (s->ahead_tok[f] != NONE) continue; /* a repeated id: one dict entry */
        s->ahead_tok[f] = tv;
        if (ivec_push(&s->ahead_list, f) < 0) { Py_DECREF(seq); return NULL; }
    }
    Py_DECREF(seq);
    s->ahead_layer = (int)layer;
    for (Py_ssize_t i = 0; i < s->ahead_list.n; i++)
        if (s->resident[s->ahead_list.v[i]] && push_key(s, s->ahead_list.v[i]) < 0) return NULL;
    Py_RETURN_NONE;
}

/* --- replay (bench/simulator.py's loop) ---------------------------------------------------------- */

/* simulate() of bench/simulator.py, step for step, with a core's hooks called directly: the same
   residency, the same transfer-channel time model, the same counters, and the fetch order as a log
   (flat id * 2 + prefetch). Used only for an unmodified native policy (simulator.py checks). */

typedef struct {
    int (*accesses)(void *p, const int32_t *fs, Py_ssize_t n);
    int (*bypass)(void *p, int32_t f);  /* NULL: never bypasses (not asked, as simulator.py does) */
    /* the victim among residents not in run (and of `only_layer` when >= 0); *v = -1 if none */
    int (*victim)(void *p, const int32_t *run, Py_ssize_t nrun, int only_layer, int32_t *v);
    int (*evict)(void *p, int32_t f);
    int (*insert)(void *p, int32_t f);
    Py_ssize_t (*plan)(void *p, long layer, int32_t *out); /* NULL: no prefetch */
    int (*plan_max)(void *p);
    /* choose_victim(can_evict) for a Python predicate (LruCore and LfuCore; TraceCore has its own) */
    int (*find)(void *p, PyObject *can_evict, int32_t *v);
} Ops;

typedef struct { int32_t f; double at; uint8_t alive; } QEnt;

typedef struct {
    const char *name;
    int E;
    uint8_t *resident, *prefetched, *queued, *has_ready;
    double *ready_at;
    QEnt *q;
    Py_ssize_t q_head, q_n, q_cap;
    Py_ssize_t *q_pos; /* f -> index in q of its live entry */
    const int32_t *run;
    Py_ssize_t nrun;
    long long wasted;
    IVec log;
    int want_log;
} Sim;

static int sim_in_run(Sim *m, int32_t f) {
    for (Py_ssize_t i = 0; i < m->nrun; i++)
        if (m->run[i] == f) return 1;
    return 0;
}

/* simulator.py's evict(): the policy's own on_evict already ran unless `notify` */
static int sim_evict(Sim *m, const Ops *ops, void *pol, int32_t v, int notify) {
    if (!m->resident[v] || sim_in_run(m, v)) {
        PyErr_Format(PyExc_RuntimeError, "policy %s chose victim (%d, %d) that is not evictable", m->name,
                     v / m->E, v % m->E);
        return -1;
    }
    m->resident[v] = 0;
    if (notify && ops->evict(pol, v) < 0) return -1;
    if (m->prefetched[v]) {
        m->prefetched[v] = 0;
        m->wasted++;
        if (m->queued[v]) { /* cancelled before its transfer started */
            m->queued[v] = 0;
            m->q[m->q_pos[v]].alive = 0;
        }
        m->has_ready[v] = 0;
    }
    return 0;
}

static int sim_log(Sim *m, int32_t f, int prefetch) {
    return m->want_log ? ivec_push(&m->log, f * 2 + prefetch) : 0;
}

static int call_hook(PyObject *self, const char *name) {
    PyObject *r = PyObject_CallMethod(self, name, NULL);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *replay(PyObject *self, const Ops *ops, void *pol, PyObject *args) {
    Base *b = pol;
    PyObject *experts_obj, *offsets_obj;
    Py_ssize_t slots;
    int per_layer, want_log;
    double C, X;
    if (!PyArg_ParseTuple(args, "OOnpddp", &experts_obj, &offsets_obj, &slots, &per_layer, &C, &X, &want_log))
        return NULL;
    if (check_ready(pol) < 0) return NULL;
    PyObject *name = PyObject_GetAttrString(self, "name");
    if (!name) return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(experts_obj, &buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) < 0) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *offsets = NULL, *result = NULL;
    int32_t *run = NULL, *missed = NULL, *plan = NULL;
    Py_ssize_t *free_ = NULL;
    Sim m;
    memset(&m, 0, sizeof m);
    int L = b->L, E = b->E;
    Py_ssize_t n = b->n;
    long long accesses_ = 0, misses = 0, issued = 0, used = 0, bypasses = 0;
    if (buf.ndim != 3 || buf.itemsize != 8 || (buf.format[0] != 'q' && buf.format[0] != 'l') || buf.shape[1] != L) {
        PyErr_SetString(PyExc_ValueError, "experts: expected a C-contiguous int64 array [T, L, K] of the policy's L");
        goto done;
    }
    Py_ssize_t T = buf.shape[0], K = buf.shape[2];
    const int64_t *x = buf.buf;
    offsets = PySequence_Fast(offsets_obj, "offsets must be a sequence");
    if (!offsets) goto done;
    m.name = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : "?";
    m.E = E;
    m.want_log = want_log;
    int plan_max = ops->plan ? ops->plan_max(pol) : 0;
    free_ = calloc(L, sizeof *free_);
    m.resident = calloc(n, 1); m.prefetched = calloc(n, 1); m.queued = calloc(n, 1); m.has_ready = calloc(n, 1);
    m.ready_at = calloc(n, sizeof *m.ready_at);
    m.q_pos = calloc(n, sizeof *m.q_pos);
    run = malloc((K ? K : 1) * sizeof *run);
    missed = malloc((K ? K : 1) * sizeof *missed);
    plan = malloc((plan_max > 0 ? plan_max : 1) * sizeof *plan);
    if (!free_ || !m.resident || !m.prefetched || !m.queued || !m.has_ready || !m.ready_at || !m.q_pos || !run ||
        !missed || !plan) {
        PyErr_NoMemory();
        goto done;
    }
    if (per_layer) for (int l = 0; l < L; l++) free_[l] = slots / L;
    else free_[0] = slots;
    double now = 0.0, busy = 0.0;
    Py_ssize_t nreq = PySequence_Fast_GET_SIZE(offsets) - 1;
    for (Py_ssize_t r = 0; r < nreq; r++) {
        Py_ssize_t a = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(offsets, r));
        Py_ssize_t z = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(offsets, r + 1));
        if (PyErr_Occurred()) goto done;
        if (a < 0 || z > T || a > z) { PyErr_SetString(PyExc_ValueError, "bad seq_offsets"); goto done; }
        if (call_hook(self, "on_request_start") < 0) goto done;
        for (Py_ssize_t t = a; t < z; t++) {
            for (int layer = 0; layer < L; layer++) {
                const int64_t *ids = x + ((Py_ssize_t)t * L + layer) * K;
                Py_ssize_t nrun = 0;
                for (Py_ssize_t k = 0; k < K; k++) {
                    if (ids[k] < 0) continue;
                    if (ids[k] >= E) { PyErr_SetString(PyExc_ValueError, "expert id outside the policy's E"); goto done; }
                    run[nrun++] = (int32_t)(layer * E + ids[k]);
                }
                if (!nrun) continue;
                m.run = run; m.nrun = nrun;
                accesses_ += nrun;
                /* the channel: queued prefetches that started before this layer's routing keep going */
                while (m.q_head < m.q_n && busy < now) {
                    QEnt e = m.q[m.q_head++];
                    if (!e.alive) continue;
                    m.queued[e.f] = 0;
                    busy = (busy > e.at ? busy : e.at) + X;
                    m.ready_at[e.f] = busy;
                    m.has_ready[e.f] = 1;
                }
                double ready = now;
                Py_ssize_t nmiss = 0;
                for (Py_ssize_t i = 0; i < nrun; i++)
                    if (!m.resident[run[i]]) missed[nmiss++] = run[i];
                if (ops->accesses(pol, run, nrun) < 0) goto done;
                for (Py_ssize_t i = 0; i < nrun; i++) {
                    int32_t f = run[i];
                    if (!m.prefetched[f]) continue;
                    m.prefetched[f] = 0;
                    used++;
                    if (m.queued[f]) { /* promoted to demand */
                        m.queued[f] = 0;
                        m.q[m.q_pos[f]].alive = 0;
                        busy = (busy > now ? busy : now) + X;
                        m.ready_at[f] = busy;
                        m.has_ready[f] = 1;
                    }
                    if (m.has_ready[f]) {
                        m.has_ready[f] = 0;
                        if (m.ready_at[f] > ready) ready = m.ready_at[f];
                    }
                }
                int pool = per_layer ? layer : 0;
                int only = per_layer ? layer : -1;
                misses += nmiss;
                for (Py_ssize_t i = 0; i < nmiss; i++) {
                    int32_t f = missed[i];
                    busy = (busy > now ? busy : now) + X;
                    if (busy > ready) ready = busy;
                    if (sim_log(&m, f, 0) < 0) goto done;
                    if (free_[pool]) {
                        free_[pool]--;
                        m.resident[f] = 1;
                        if (ops->insert(pol, f) < 0) goto done;
                        continue;
                    }
                    if (ops->bypass) {
                        int by = ops->bypass(pol, f);
                        if (by < 0) goto done;
                        if (by) { bypasses++; continue; }
                    }
                    int32_t v;
                    if (ops->victim(pol, run, nrun, only, &v) < 0) goto done;
                    if (v < 0) {
                        PyErr_Format(PyExc_RuntimeError, "policy %s found no victim for a demand miss", m.name);
                        goto done;
                    }
                    if (sim_evict(&m, ops, pol, v, 1) < 0 || ops->insert(pol, f) < 0) goto done;
                    m.resident[f] = 1;
                }
                Py_ssize_t np = ops->plan ? ops->plan(pol, layer, plan) : 0;
                if (np < 0) goto done;
                for (Py_ssize_t i = 0; i < np; i++) {
                    int32_t f = plan[i];
                    if (m.resident[f] || sim_in_run(&m, f)) continue;
                    int p = per_layer ? f / E : 0;
                    if (free_[p]) {
                        free_[p]--;
                    } else {
                        int32_t v;
                        if (ops->victim(pol, run, nrun, per_layer ? f / E : -1, &v) < 0) goto done;
                        if (v < 0) break;
                        if (sim_evict(&m, ops, pol, v, 1) < 0) goto done;
                    }
                    m.resident[f] = 1;
                    if (ops->insert(pol, f) < 0) goto done;
                    m.prefetched[f] = 1;
                    m.queued[f] = 1;
                    if (m.q_n == m.q_cap) {
                        Py_ssize_t cap = m.q_cap ? 2 * m.q_cap : 1024;
                        QEnt *q2 = realloc(m.q, cap * sizeof *q2);
                        if (!q2) { PyErr_NoMemory(); goto done; }
                        m.q = q2; m.q_cap = cap;
                    }
                    m.q_pos[f] = m.q_n;
                    m.q[m.q_n].f = f; m.q[m.q_n].at = now; m.q[m.q_n].alive = 1;
                    m.q_n++;
                    issued++;
                    if (sim_log(&m, f, 1) < 0) goto done;
                }
                now = ready + C;
            }
        }
        if (call_hook(self, "on_request_end") < 0) goto done;
    }
    for (Py_ssize_t f = 0; f < n; f++) m.wasted += m.prefetched[f];
    {
        PyObject *log = Py_None;
        if (want_log) {
            log = PyList_New(m.log.n);
            if (!log) goto done;
            for (Py_ssize_t i = 0; i < m.log.n; i++) PyList_SET_ITEM(log, i, PyLong_FromLong(m.log.v[i]));
        } else {
            Py_INCREF(log);
        }
        result = Py_BuildValue("{sLsLsLsLsLsLsdsN}", "accesses", accesses_, "demand_misses", misses,
                               "prefetches_issued", issued, "prefetches_used", used, "prefetches_wasted", m.wasted,
                               "bypasses", bypasses, "time_ms", now, "log", log);
    }
done:
    free(run); free(missed); free(plan); free(free_);
    free(m.resident); free(m.prefetched); free(m.queued); free(m.has_ready);
    free(m.ready_at); free(m.q_pos); free(m.q); free(m.log.v);
    Py_XDECREF(offsets);
    Py_DECREF(name);
    PyBuffer_Release(&buf);
    return result;
}

/* TraceCore's ops */
static int trace_accesses(void *p, const int32_t *fs, Py_ssize_t n) { return accesses(p, fs, n); }
static int trace_bypass(void *p, int32_t f) { return bypass_f(p, f); }
static int trace_victim(void *p, const int32_t *run, Py_ssize_t nrun, int only, int32_t *v) {
    Core *s = p;
    double et;
    (void)run; (void)nrun; /* the running layer call's keys are the core's own `running` */
    if (s->due && refresh_layer(s) < 0) return -1;
    return top_in(s, NULL, only, v, &et);
}
static int trace_evict(void *p, int32_t f) { evict(p, f); return 0; }
static int trace_insert(void *p, int32_t f) { return insert(p, f); }
static Py_ssize_t trace_plan(void *p, long layer, int32_t *out) { return plan_f(p, layer, out); }
static int trace_plan_max(void *p) { return ((Core *)p)->prefetch; }
static const Ops TRACE_OPS = {trace_accesses, trace_bypass, trace_victim, trace_evict, trace_insert, trace_plan,
                              trace_plan_max, NULL};

static PyObject *Core_simulate(Core *s, PyObject *args) { return replay((PyObject *)s, &TRACE_OPS, s, args); }

/* --- set-up and state for the Python side --------------------------------------------------------- */

static double *doubles_of(PyObject *obj, Py_ssize_t want, const char *what) {
    if (PyObject_CheckBuffer(obj)) { /* a float64 array: one copy, no Python floats in between */
        Py_buffer b;
        if (PyObject_GetBuffer(obj, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
            double *out = NULL;
            if (b.itemsize == 8 && b.format && strcmp(b.format, "d") == 0 && b.len == want * 8) {
                out = malloc((want ? want : 1) * sizeof *out);
                if (out) memcpy(out, b.buf, want * sizeof *out);
                else PyErr_NoMemory();
            } else {
                PyErr_Format(PyExc_ValueError, "%s: expected %zd float64 values", what, want);
            }
            PyBuffer_Release(&b);
            return out;
        }
        PyErr_Clear(); /* not contiguous float64: go through the sequence protocol */
    }
    PyObject *seq = PySequence_Fast(obj, what);
    if (!seq) return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != want) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%s: expected %zd values", what, want);
        return NULL;
    }
    double *out = malloc((want ? want : 1) * sizeof *out);
    if (!out) { Py_DECREF(seq); PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < want; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (out[i] == -1.0 && PyErr_Occurred()) { free(out); Py_DECREF(seq); return NULL; }
    }
    Py_DECREF(seq);
    return out;
}

static void free_state(Core *s) {
    free(s->pow); free(s->span); free(s->hazard); free(s->next_check);
    free(s->resident); free(s->has_stored); free(s->stored); free(s->ew);
    free(s->last); free(s->inserted); free(s->checked_t); free(s->ahead_tok);
    free(s->count); free(s->checked_c); free(s->mark); free(s->heap); free(s->prior);
    free(s->running.v); free(s->ahead_list.v); free(s->ahead_due.v); free(s->xflat.v);
    if (s->layer_keys) for (int l = 0; l < s->L; l++) free(s->layer_keys[l].v);
    if (s->checks) for (int l = 0; l < s->L; l++) free(s->checks[l].v);
    if (s->follow_due) for (int l = 0; l < s->L; l++) free(s->follow_due[l].v);
    free(s->layer_keys); free(s->has_layer_keys); free(s->checks); free(s->follow_due);
    if (s->follow) for (Py_ssize_t i = 0; i < (Py_ssize_t)s->L * s->L; i++) free(s->follow[i]);
    free(s->follow);
    free(s->reuse);
    if (s->cross) for (int i = 0; i < s->ncross; i++) free(s->cross[i]);
    free(s->cross);
    free(s->xpos); free(s->xnow); free(s->has_xnow);
    Py_CLEAR(s->keytab);
    Py_ssize_t keep = offsetof(Core, ready);
    memset((char *)s + keep, 0, sizeof *s - keep);
}

/* _setup(L, E, params, keytab, pow, span, hazard, next_check, reuse, follow, cross, xd)
   params: (bypass, bypass_margin, prefetch, prefetch_threshold, kappa, rematch_every, streak_lag,
   lookahead_p, default_rate, has_library); reuse: n floats or None; follow: {(l, m): E*E floats} or
   None; cross: list of (n + 1) * E floats per layer, or None. */
static PyObject *Core_setup(Core *s, PyObject *args) {
    int L, E, xd;
    PyObject *params, *keytab, *pw, *span, *hazard, *nc, *reuse, *follow, *cross;
    if (!PyArg_ParseTuple(args, "iiOOOOOOOOOi", &L, &E, &params, &keytab, &pw, &span, &hazard, &nc, &reuse,
                          &follow, &cross, &xd))
        return NULL;
    free_state(s);
    if (L < 1 || E < 1) return PyErr_Format(PyExc_ValueError, "bad shape %d x %d", L, E);
    s->L = L; s->E = E; s->n = L * E;
    int bypass, prefetch, rematch, lag, has_library;
    if (!PyArg_ParseTuple(params, "pdiddiiddp", &bypass, &s->bypass_margin, &prefetch, &s->prefetch_threshold,
                          &s->kappa, &rematch, &lag, &s->lookahead_p, &s->default_rate, &has_library))
        return NULL;
    s->bypass = bypass; s->prefetch = prefetch; s->rematch_every = rematch; s->streak_lag = lag;
    s->has_library = has_library;
    if (!PyList_Check(keytab) || PyList_GET_SIZE(keytab) != s->n)
        return PyErr_Format(PyExc_ValueError, "keytab: expected a list of %d keys", s->n);
    Py_INCREF(keytab);
    s->keytab = keytab;
    Py_ssize_t R = PySequence_Length(hazard);
    if (R < 2) return NULL;
    s->max_r = (int)(R - 1);
    if (!(s->pow = doubles_of(pw, R, "pow")) || !(s->span = doubles_of(span, R, "span")) ||
        !(s->hazard = doubles_of(hazard, R, "hazard")))
        return NULL;
    double *ncd = doubles_of(nc, R, "next_check");
    if (!ncd) return NULL;
    s->next_check = malloc(R * sizeof *s->next_check);
    if (!s->next_check) { free(ncd); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < R; i++) s->next_check[i] = (int32_t)ncd[i];
    free(ncd);
    Py_ssize_t n = s->n;
    s->resident = calloc(n, 1); s->has_stored = calloc(n, 1);
    s->stored = calloc(n, sizeof(double)); s->ew = calloc(n, sizeof(double));
    s->last = malloc(n * sizeof(int64_t)); s->inserted = malloc(n * sizeof(int64_t));
    s->checked_t = malloc(n * sizeof(int64_t)); s->ahead_tok = malloc(n * sizeof(int64_t));
    s->count = calloc(n, sizeof(int32_t)); s->checked_c = calloc(n, sizeof(int32_t));
    s->mark = calloc(n, sizeof(int32_t));
    s->layer_keys = calloc(L, sizeof(IVec)); s->has_layer_keys = calloc(L, 1);
    s->checks = calloc(L, sizeof(CVec)); s->follow_due = calloc(L, sizeof(IVec));
    s->xpos = malloc(L * sizeof(Py_ssize_t)); s->xnow = calloc((Py_ssize_t)L * E, sizeof(double));
    s->has_xnow = calloc(L, 1);
    if (!s->resident || !s->has_stored || !s->stored || !s->ew || !s->last || !s->inserted || !s->checked_t ||
        !s->ahead_tok || !s->count || !s->checked_c || !s->mark || !s->layer_keys || !s->has_layer_keys ||
        !s->checks || !s->follow_due || !s->xpos || !s->xnow || !s->has_xnow)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) s->last[i] = s->inserted[i] = s->checked_t[i] = s->ahead_tok[i] = NONE;
    for (int l = 0; l < L; l++) s->xpos[l] = -1;
    if (reuse != Py_None && !(s->reuse = doubles_of(reuse, n, "reuse"))) return NULL;
    if (follow != Py_None) {
        if (!PyDict_Check(follow)) return PyErr_Format(PyExc_TypeError, "follow: expected a dict");
        s->follow = calloc((Py_ssize_t)L * L, sizeof(double *));
        if (!s->follow) return PyErr_NoMemory();
        s->has_follow = 1;
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(follow, &pos, &k, &v)) {
            int l, m;
            if (!PyArg_ParseTuple(k, "ii", &l, &m)) return NULL;
            if (l < 0 || l >= L || m < 0 || m >= L) continue; /* never looked up */
            if (!(s->follow[(Py_ssize_t)l * L + m] = doubles_of(v, (Py_ssize_t)E * E, "follow table"))) return NULL;
        }
    }
    if (cross != Py_None) {
        Py_ssize_t nx = PySequence_Length(cross);
        if (nx < 0) return NULL;
        s->cross = calloc(nx ? nx : 1, sizeof(double *));
        if (!s->cross) return PyErr_NoMemory();
        s->ncross = (int)nx;
        for (Py_ssize_t i = 0; i < nx; i++) {
            PyObject *tab = PySequence_GetItem(cross, i);
            if (!tab) return NULL;
            s->cross[i] = doubles_of(tab, ((Py_ssize_t)(xd + 1) * E + 1) * E, "cross table");
            Py_DECREF(tab);
            if (!s->cross[i]) return NULL;
        }
        s->xd = xd;
    }
    s->c = -1; s->max_layer = -1; s->ahead_layer = -1; s->mark_now = 1;
    s->ready = 1;
    Py_RETURN_NONE;
}

/* _load_prior(rates or None): the library's per-token rates (n floats), then every ET refiled. */
static PyObject *Core_load_prior(Core *s, PyObject *prior) {
    if (check_ready(s) < 0) return NULL;
    free(s->prior);
    s->prior = NULL;
    if (prior != Py_None && !(s->prior = doubles_of(prior, s->n, "prior"))) return NULL;
    if (rebuild(s) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_start_request(Core *s, PyObject *Py_UNUSED(unused)) {
    if (check_ready(s) < 0) return NULL;
    memset(s->count, 0, s->n * sizeof *s->count);
    s->ntok = 0;
    Py_RETURN_NONE;
}

/* This request's use counts, n ints in flat order. */
static PyObject *Core_counts(Core *s, PyObject *Py_UNUSED(unused)) {
    if (check_ready(s) < 0) return NULL;
    PyObject *out = PyList_New(s->n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < s->n; i++) PyList_SET_ITEM(out, i, PyLong_FromLong(s->count[i]));
    return out;
}

static void Core_dealloc(Core *s) {
    free_state(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef Core_methods[] = {
    {"on_access", (PyCFunction)(void (*)(void))Core_on_access, METH_FASTCALL, "One use of key."},
    {"on_accesses", (PyCFunction)(void (*)(void))Core_on_accesses, METH_FASTCALL, "A layer call's uses."},
    {"on_insert", (PyCFunction)Core_on_insert, METH_O, "key took a slot."},
    {"on_evict", (PyCFunction)Core_on_evict, METH_O, "key left its slot."},
    {"choose_victim", (PyCFunction)Core_choose_victim, METH_O, "The resident key with the largest ET."},
    {"replace", (PyCFunction)(void (*)(void))Core_replace, METH_FASTCALL, "choose_victim+on_evict+on_insert."},
    {"should_bypass", (PyCFunction)Core_should_bypass, METH_O, "Compute a miss from a scratch slot?"},
    {"plan_prefetch", (PyCFunction)(void (*)(void))Core_plan_prefetch, METH_FASTCALL, "Keys to fetch ahead."},
    {"on_router_lookahead", (PyCFunction)(void (*)(void))Core_on_router_lookahead, METH_FASTCALL,
     "The early router's guess for a layer."},
    {"_setup", (PyCFunction)Core_setup, METH_VARARGS, "Shape, parameters and tables."},
    {"_simulate", (PyCFunction)Core_simulate, METH_VARARGS, "bench.simulator.simulate's loop, natively."},
    {"_load_prior", (PyCFunction)Core_load_prior, METH_O, "Prior rates (or None), then a rebuild."},
    {"_start_request", (PyCFunction)Core_start_request, METH_NOARGS, "Clear the request's counts."},
    {"_counts", (PyCFunction)Core_counts, METH_NOARGS, "This request's use counts."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = POLICY_TYPE("TraceCore", Core, Core_dealloc, Core_methods,
                                           "The trace policy's state and decisions (runtime/trace_policy_native.py).");

/* --- shared by LruCore and LfuCore ---------------------------------------------------------------- */

static int setup_base(Base *b, PyObject *args) {
    int L, E;
    PyObject *keytab;
    if (!PyArg_ParseTuple(args, "iiO", &L, &E, &keytab)) return -1;
    if (L < 1 || E < 1) {
        PyErr_Format(PyExc_ValueError, "bad shape %d x %d", L, E);
        return -1;
    }
    if (!PyList_Check(keytab) || PyList_GET_SIZE(keytab) != (Py_ssize_t)L * E) {
        PyErr_Format(PyExc_ValueError, "keytab: expected a list of %d keys", L * E);
        return -1;
    }
    b->L = L; b->E = E; b->n = L * E;
    Py_INCREF(keytab);
    Py_XSETREF(b->keytab, keytab);
    return 0;
}

/* Whether f may be evicted: by the Python `can_evict`, else not in run and of `only` (>= 0). 1/0/-1. */
static int evictable(Base *b, PyObject *can_evict, const int32_t *run, Py_ssize_t nrun, int only, int32_t f) {
    if (can_evict) {
        PyObject *r = PyObject_CallOneArg(can_evict, PyList_GET_ITEM(b->keytab, f));
        if (!r) return -1;
        int ok = PyObject_IsTrue(r);
        Py_DECREF(r);
        return ok;
    }
    if (only >= 0 && f / b->E != only) return 0;
    for (Py_ssize_t i = 0; i < nrun; i++)
        if (run[i] == f) return 0;
    return 1;
}

/* Parses a layer call's keys into flat ids (*fs: `small` or malloc'd; free if != small). */
static Py_ssize_t keys_of(void *obj, PyObject *keys, int32_t *small, int32_t **fs) {
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence");
    if (!seq) return -1;
    Py_ssize_t nk = PySequence_Fast_GET_SIZE(seq);
    *fs = nk <= 16 ? small : malloc(nk * sizeof **fs);
    if (!*fs) { Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < nk; i++) {
        if (key_of(obj, PySequence_Fast_GET_ITEM(seq, i), &(*fs)[i]) < 0) {
            if (*fs != small) free(*fs);
            *fs = small;
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return nk;
}

/* The Python-facing hooks of LruCore and LfuCore, through their Ops (`ops` after the Base fields). */
#define SIMPLE_HEAD BASE_HEAD const Ops *ops;

typedef struct {
    SIMPLE_HEAD
} Simple;

static PyObject *Simple_on_access(Simple *s, PyObject *const *args, Py_ssize_t nargs) {
    int32_t f;
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "on_access(key, hit)"); return NULL; }
    if (check_ready(s) < 0 || key_of(s, args[0], &f) < 0 || s->ops->accesses(s, &f, 1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Simple_on_accesses(Simple *s, PyObject *const *args, Py_ssize_t nargs) {
    int32_t small[16], *fs;
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "on_accesses(keys, missed)"); return NULL; }
    if (check_ready(s) < 0) return NULL;
    Py_ssize_t nk = keys_of(s, args[0], small, &fs);
    if (nk < 0) return NULL;
    int rc = s->ops->accesses(s, fs, nk);
    if (fs != small) free(fs);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Simple_on_insert(Simple *s, PyObject *key) {
    int32_t f;
    if (check_ready(s) < 0 || key_of(s, key, &f) < 0 || s->ops->insert(s, f) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Simple_on_evict(Simple *s, PyObject *key) {
    int32_t f;
    if (check_ready(s) < 0 || key_of(s, key, &f) < 0 || s->ops->evict(s, f) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Simple_choose_victim(Simple *s, PyObject *can_evict) {
    int32_t v;
    if (check_ready(s) < 0 || s->ops->find(s, can_evict, &v) < 0) return NULL;
    if (v < 0) Py_RETURN_NONE;
    return key_obj(s, v);
}

/* choose_victim + on_evict + on_insert in one call (the simulator's fast path). */
static PyObject *Simple_replace(Simple *s, PyObject *const *args, Py_ssize_t nargs) {
    int32_t f, v;
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "replace(key, can_evict)"); return NULL; }
    if (check_ready(s) < 0 || key_of(s, args[0], &f) < 0 || s->ops->find(s, args[1], &v) < 0) return NULL;
    if (v < 0) Py_RETURN_NONE;
    if (s->ops->evict(s, v) < 0 || s->ops->insert(s, f) < 0) return NULL;
    return key_obj(s, v);
}

static PyObject *Simple_simulate(Simple *s, PyObject *args) {
    if (check_ready(s) < 0) return NULL;
    return replay((PyObject *)s, s->ops, s, args);
}

#define SIMPLE_METHODS(what)                                                                              \
    {"on_access", (PyCFunction)(void (*)(void))Simple_on_access, METH_FASTCALL, "One use of key."},        \
    {"on_accesses", (PyCFunction)(void (*)(void))Simple_on_accesses, METH_FASTCALL, "A layer call's uses."}, \
    {"on_insert", (PyCFunction)Simple_on_insert, METH_O, "key took a slot."},                               \
    {"on_evict", (PyCFunction)Simple_on_evict, METH_O, "key left its slot."},                               \
    {"choose_victim", (PyCFunction)Simple_choose_victim, METH_O, "The " what " evictable key."},           \
    {"replace", (PyCFunction)(void (*)(void))Simple_replace, METH_FASTCALL, "choose_victim+on_evict+on_insert."}, \
    {"_simulate", (PyCFunction)Simple_simulate, METH_VARARGS, "bench.simulator.simulate's loop, natively."}

/* A simple core's method table (the shared hooks and its own _setup) and type object. */
#define SIMPLE_POLICY(name, type, what)                                                                \
    static PyMethodDef type##_methods[] = {                                                            \
        SIMPLE_METHODS(what),                                                                          \
        {"_setup", (PyCFunction)type##_setup, METH_VARARGS, "Shape and keys."},                        \
        {NULL, NULL, 0, NULL},                                                                         \
    };                                                                                                 \
    static PyTypeObject type##Type = POLICY_TYPE(name, type, type##_dealloc, type##_methods,           \
                                                 #type "Policy's state and decisions (runtime/policy_core.py).")

/* --- LruCore: runtime/policy.py's LruPolicy ------------------------------------------------------- */

/* The recency order (oldest first) of the keys the policy was told are resident: a doubly linked
   list over flat ids, as LruPolicy's OrderedDict. */
typedef struct {
    SIMPLE_HEAD
    int32_t *prev, *next;
    uint8_t *in;
    int32_t head, tail;
} Lru;

static void lru_unlink(Lru *s, int32_t f) {
    if (s->prev[f] >= 0) s->next[s->prev[f]] = s->next[f]; else s->head = s->next[f];
    if (s->next[f] >= 0) s->prev[s->next[f]] = s->prev[f]; else s->tail = s->prev[f];
    s->in[f] = 0;
}

static void lru_append(Lru *s, int32_t f) {
    s->prev[f] = s->tail;
    s->next[f] = -1;
    if (s->tail >= 0) s->next[s->tail] = f; else s->head = f;
    s->tail = f;
    s->in[f] = 1;
}

static void lru_to_end(Lru *s, int32_t f) {
    if (s->in[f]) lru_unlink(s, f);
    lru_append(s, f);
}

static int lru_accesses(void *p, const int32_t *fs, Py_ssize_t n) {
    Lru *s = p;
    for (Py_ssize_t i = 0; i < n; i++)
        if (s->in[fs[i]]) lru_to_end(s, fs[i]);
    return 0;
}

static int lru_find(Lru *s, PyObject *can_evict, const int32_t *run, Py_ssize_t nrun, int only, int32_t *v) {
    *v = -1;
    for (int32_t f = s->head; f >= 0; f = s->next[f]) {
        int ok = evictable((Base *)s, can_evict, run, nrun, only, f);
        if (ok < 0) return -1;
        if (ok) { *v = f; break; }
    }
    return 0;
}

static int lru_victim(void *p, const int32_t *run, Py_ssize_t nrun, int only, int32_t *v) {
    return lru_find(p, NULL, run, nrun, only, v);
}
static int lru_find_py(void *p, PyObject *can_evict, int32_t *v) { return lru_find(p, can_evict, NULL, 0, -1, v); }
static int lru_evict(void *p, int32_t f) {
    if (((Lru *)p)->in[f]) lru_unlink(p, f);
    return 0;
}
static int lru_insert(void *p, int32_t f) { lru_to_end(p, f); return 0; }
static const Ops LRU_OPS = {lru_accesses, NULL, lru_victim, lru_evict, lru_insert, NULL, NULL, lru_find_py};

static PyObject *Lru_setup(Lru *s, PyObject *args) {
    if (setup_base((Base *)s, args) < 0) return NULL;
    free(s->prev); free(s->next); free(s->in);
    s->prev = malloc(s->n * sizeof *s->prev);
    s->next = malloc(s->n * sizeof *s->next);
    s->in = calloc(s->n, 1);
    if (!s->prev || !s->next || !s->in) return PyErr_NoMemory();
    s->head = s->tail = -1;
    s->ops = &LRU_OPS;
    s->ready = 1;
    Py_RETURN_NONE;
}

static void Lru_dealloc(Lru *s) {
    free(s->prev); free(s->next); free(s->in);
    Py_CLEAR(s->keytab);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

SIMPLE_POLICY("LruCore", Lru, "least recently used");

/* --- LfuCore: runtime/policy.py's LfuPolicy ------------------------------------------------------- */

/* Least (count, last use, key) among residents; counts survive eviction. A lazy min-heap as in
   LfuPolicy: entries are lower bounds of their key's current values, re-filed when they surface. */
typedef struct { int64_t c, t; int32_t f; } LEnt;

typedef struct {
    SIMPLE_HEAD
    int64_t *count, *last, tick;
    uint8_t *resident;
    Py_ssize_t n_resident;
    LEnt *heap;
    Py_ssize_t heap_n, heap_cap;
} Lfu;

static inline int lent_lt(LEnt a, LEnt b) {
    return a.c < b.c || (a.c == b.c && (a.t < b.t || (a.t == b.t && a.f < b.f)));
}

DEFINE_HEAP(lheap, LEnt, lent_lt)

static int lfu_push(Lfu *s, LEnt x) { return lheap_push(&s->heap, &s->heap_n, &s->heap_cap, x); }

static LEnt lfu_pop(Lfu *s) { return lheap_pop(s->heap, &s->heap_n); }

static int lfu_accesses(void *p, const int32_t *fs, Py_ssize_t n) {
    Lfu *s = p;
    for (Py_ssize_t i = 0; i < n; i++) {
        s->count[fs[i]] += 1;
        s->last[fs[i]] = ++s->tick;
    }
    return 0;
}

static int lfu_insert(void *p, int32_t f) {
    Lfu *s = p;
    if (!s->resident[f]) { s->resident[f] = 1; s->n_resident++; }
    if (s->last[f] == NONE) s->last[f] = s->tick;
    LEnt x = {s->count[f], s->last[f], f};
    if (lfu_push(s, x) < 0) return -1;
    if (s->heap_n > 4 * s->n_resident + 64) { /* entries of evicted keys pile up: refile the residents */
        s->heap_n = 0;
        for (int32_t g = 0; g < s->n; g++)
            if (s->resident[g]) {
                LEnt y = {s->count[g], s->last[g], g};
                s->heap[s->heap_n++] = y;
            }
        for (Py_ssize_t i = s->heap_n / 2 - 1; i >= 0; i--) lheap_down(s->heap, s->heap_n, i);
    }
    return 0;
}

static int lfu_evict(void *p, int32_t f) {
    Lfu *s = p;
    if (s->resident[f]) { s->resident[f] = 0; s->n_resident--; }
    return 0;
}

/* The least current (count, last, key) among evictable residents; *v = -1 if none. Entries popped as
   not evictable go back on the heap. */
static int lfu_find(Lfu *s, PyObject *can_evict, const int32_t *run, Py_ssize_t nrun, int only, int32_t *v) {
    LEnt small[16], *held = small;
    Py_ssize_t nheld = 0, cap = 16;
    int rc = 0;
    *v = -1;
    while (s->heap_n) {
        LEnt e = s->heap[0];
        if (!s->resident[e.f]) { lfu_pop(s); continue; }
        if (s->count[e.f] != e.c || s->last[e.f] != e.t) { /* used since: re-file with current values */
            s->heap[0].c = s->count[e.f];
            s->heap[0].t = s->last[e.f];
            lheap_down(s->heap, s->heap_n, 0);
            continue;
        }
        int ok = evictable((Base *)s, can_evict, run, nrun, only, e.f);
        if (ok < 0) { rc = -1; break; }
        if (ok) { *v = e.f; break; }
        if (nheld == cap) {
            cap *= 2;
            LEnt *h = held == small ? malloc(cap * sizeof *h) : realloc(held, cap * sizeof *h);
            if (!h) { PyErr_NoMemory(); rc = -1; break; }
            if (held == small) memcpy(h, small, sizeof small);
            held = h;
        }
        held[nheld++] = lfu_pop(s);
    }
    for (Py_ssize_t i = 0; i < nheld; i++)
        if (lfu_push(s, held[i]) < 0) rc = -1;
    if (held != small) free(held);
    return rc;
}

static int lfu_victim(void *p, const int32_t *run, Py_ssize_t nrun, int only, int32_t *v) {
    return lfu_find(p, NULL, run, nrun, only, v);
}
static int lfu_find_py(void *p, PyObject *can_evict, int32_t *v) { return lfu_find(p, can_evict, NULL, 0, -1, v); }
static const Ops LFU_OPS = {lfu_accesses, NULL, lfu_victim, lfu_evict, lfu_insert, NULL, NULL, lfu_find_py};

static PyObject *Lfu_setup(Lfu *s, PyObject *args) {
    if (setup_base((Base *)s, args) < 0) return NULL;
    free(s->count); free(s->last); free(s->resident);
    s->count = calloc(s->n, sizeof *s->count);
    s->last = malloc(s->n * sizeof *s->last);
    s->resident = calloc(s->n, 1);
    if (!s->count || !s->last || !s->resident) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < s->n; i++) s->last[i] = NONE;
    s->tick = 0; s->n_resident = 0; s->heap_n = 0;
    s->ops = &LFU_OPS;
    s->ready = 1;
    Py_RETURN_NONE;
}

static void Lfu_dealloc(Lfu *s) {
    free(s->count); free(s->last); free(s->resident); free(s->heap);
    Py_CLEAR(s->keytab);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

SIMPLE_POLICY("LfuCore", Lfu, "least frequently used");

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "moeinf_policy_core", .m_doc = NULL, .m_size = -1, .m_methods = NULL,
};

PyMODINIT_FUNC PyInit_moeinf_policy_core(void) {
    PyTypeObject *types[] = {&CoreType, &LruType, &LfuType};
    const char *names[] = {"TraceCore", "LruCore", "LfuCore"};
    for (int i = 0; i < 3; i++)
        if (PyType_Ready(types[i]) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    for (int i = 0; i < 3; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "VERSION", PC_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
