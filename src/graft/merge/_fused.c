/* Fused kernels for the task-vector family (TIES, DARE-TIES, Breadcrumbs-TIES, DELLA).
 *
 * Loaded by graft/merge/_fused.py through ctypes; compiled on first use with the
 * system's C compiler and cached. Every operation mirrors the pure-torch path in
 * graft/merge/_task_vectors.py step by step (same float32 operations in the same order,
 * IEEE round-to-nearest, no FMA contraction: build with -ffp-contract=off), so both paths
 * give the same bytes. Nothing here allocates a tensor-sized buffer: the inputs are read
 * in their stored dtype (float32, bfloat16 or float16, widened exactly to float32 chunk
 * by chunk) and the output is written once.
 *
 * Selection (trim): |d| is a non-negative float, so its bit pattern read as uint32 orders
 * like the value. Pass 1 histograms the top 16 bits per model; the bin holding the k-th
 * largest is resolved by pass 2, a histogram of the low 16 bits inside that bin only. That
 * gives the exact k-th largest value v and how many entries equal to v are kept; the
 * merge pass keeps entries > v, and entries == v in flat-index order (the first ones for
 * a stable descending sort, the last ones for a stable ascending sort), counting as it
 * goes. Single-threaded per call: the engine runs several tensors at once.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define CHUNK 2048 /* a multiple of 16 */
#define BINS 65536
#define HI_BINS 32768 /* |d| has no sign bit: its top 16 bits are below 2^15 */
#define MAXT 64

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* per-model sparsifiers of the merge pass */
enum {
    M_DENSE = 0,    /* d                                  (density 1)            */
    M_ZERO_MUL = 1, /* d * 0                              (TIES trim, k = 0)     */
    M_TOPK_MUL = 2, /* d * [in cut a]                     (TIES trim)            */
    M_BAND = 3,     /* [in a and not in b] ? d : +0       (Breadcrumbs)          */
    M_MASK = 4,     /* mask ? d : +0, then / p if rescale (DARE)                 */
    M_ZERO = 5,     /* +0                                 (DARE, density 0)      */
    M_PROB = 6      /* mask ? d : +0, then / prob[j] if rescale (DELLA)          */
};

static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
        return u2f(f2u(v) | sign);
    }
    if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

/* Bit q of the result is set when key[q] == v (q < 16; 16 readable entries). */
static inline uint32_t eq16(const uint32_t *key, uint32_t v) {
#if defined(__AVX512F__)
    return _mm512_cmpeq_epi32_mask(_mm512_loadu_si512((const void *)key),
                                   _mm512_set1_epi32((int)v));
#elif defined(__AVX2__)
    __m256i w = _mm256_set1_epi32((int)v);
    __m256i a = _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)key), w);
    __m256i b = _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)(key + 8)), w);
    return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(a)) |
           (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(b)) << 8;
#else
    uint32_t m = 0;
    for (int q = 0; q < 16; q++) m |= (uint32_t)(key[q] == v) << q;
    return m;
#endif
}

/* Bit q set when key[q] >> 16 == v. */
static inline uint32_t eq16_hi(const uint32_t *key, uint32_t v) {
#if defined(__AVX512F__)
    return _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(_mm512_loadu_si512((const void *)key), 16),
                                   _mm512_set1_epi32((int)v));
#elif defined(__AVX2__)
    __m256i w = _mm256_set1_epi32((int)v);
    __m256i a = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)key), 16);
    __m256i b = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(key + 8)), 16);
    return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a, w))) |
           (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(b, w))) << 8;
#else
    uint32_t m = 0;
    for (int q = 0; q < 16; q++) m |= (uint32_t)(key[q] >> 16 == v) << q;
    return m;
#endif
}

/* The valid bits of the 16-entry block at j of a chunk of len entries. */
static inline uint32_t block_bits(int j, int len) {
    return len - j >= 16 ? 0xffffu : (1u << (len - j)) - 1u;
}

/* keys[j] = bits of |a[j] - b[j]| (an order-preserving uint32 of the magnitude) */
static inline void abs_keys(const float *a, const float *b, int len, uint32_t *key) {
    for (int j = 0; j < len; j++) key[j] = f2u(a[j] - b[j]) & 0x7fffffffu;
}

/* Widen len values starting at off into dst; returns nonzero when one is NaN or Inf. */
static int widen(const void *src, int dt, int64_t off, int len, float *dst) {
    uint32_t bad = 0;
    if (dt == DT_F32) {
        const uint32_t *s = (const uint32_t *)src + off;
        for (int j = 0; j < len; j++) {
            bad |= (s[j] & 0x7f800000u) == 0x7f800000u;
            dst[j] = u2f(s[j]);
        }
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) {
            bad |= (s[j] & 0x7f80u) == 0x7f80u;
            dst[j] = u2f((uint32_t)s[j] << 16);
        }
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) {
            bad |= (s[j] & 0x7c00u) == 0x7c00u;
            dst[j] = half_to_float(s[j]);
        }
    }
    return bad != 0;
}

/* 1 when none of the n values at p (dtype dt) is NaN or Inf, else 0. */
int graft_finite(const void *p, int dt, int64_t n) {
    uint32_t bad = 0;
    if (dt == DT_F32) {
        const uint32_t *s = (const uint32_t *)p;
        for (int64_t i = 0; i < n; i++) bad |= (s[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *s = (const uint16_t *)p;
        uint16_t e = dt == DT_BF16 ? 0x7f80u : 0x7c00u;
        for (int64_t i = 0; i < n; i++) bad |= (s[i] & e) == e;
    }
    return bad == 0;
}

/* float32 -> bfloat16 / float16, rounding to nearest even as torch's casts do. A NaN has
 * no one encoding across torch's cast paths: `narrow` reports it and the caller lets
 * torch cast that tensor. */
static inline uint16_t to_bf16(float f) {
    uint32_t u = f2u(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t to_f16(float f) {
    uint32_t u = f2u(f), a = u & 0x7fffffffu;
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 (or Inf) rounds to Inf */
    if (a < 0x38800000u) {                        /* below 2^-14: a subnormal half */
        /* |f| * 2^24 is exact and below 2^10; adding 2^23 rounds it to an integer (RNE) */
        float t = u2f(a) * 16777216.0f;
        return sign | (uint16_t)(f2u(t + 8388608.0f) - 0x4b000000u);
    }
    uint32_t r = (a + 0xfffu + ((a >> 13) & 1u)) >> 13; /* 10 mantissa bits, RNE */
    return sign | (uint16_t)(r - (112u << 10));          /* rebias 127 -> 15 */
}

/* Store len float32 values at dst + off in dtype dt; returns nonzero on a NaN. */
static int narrow(const float *src, int dt, void *dst, int64_t off, int len) {
    if (dt == DT_F32) { /* float32 NaNs are stored as they are */
        memcpy((float *)dst + off, src, sizeof(float) * (size_t)len);
        return 0;
    }
    uint32_t nan = 0;
    for (int j = 0; j < len; j++) nan |= (f2u(src[j]) & 0x7fffffffu) > 0x7f800000u;
    uint16_t *d = (uint16_t *)dst + off;
    if (dt == DT_BF16)
        for (int j = 0; j < len; j++) d[j] = to_bf16(src[j]);
    else
        for (int j = 0; j < len; j++) d[j] = to_f16(src[j]);
    return nan != 0;
}

/* Exact top-k thresholds.
 *
 * For each cut c (of model cut_model[c], keeping the cut_k[c] largest |d|, 1 <= k < n),
 * writes vstar[c] (the k-th largest |d| as uint32 bits; entries above it are kept) and
 * need_eq[c] / eq_total[c] (of the eq_total entries equal to vstar, need_eq are kept).
 * vstar = bin_start - 1 with need_eq = eq_total = 0 means "keep exactly the entries from
 * bin_start up". Returns 0, 1 on a NaN/Inf input, 2 when out of memory.
 */
int graft_select(int64_t n, int T, const void *base, int base_dt, const void *const *fts,
                 const int32_t *ft_dt, int C, const int32_t *cut_model, const int64_t *cut_k,
                 int64_t *vstar, int64_t *need_eq, int64_t *eq_total) {
    if (T > MAXT || C > 256) return 3;
    int used[MAXT] = {0};
    for (int c = 0; c < C; c++) used[cut_model[c]] = 1;
    uint32_t *hi = calloc((size_t)T * HI_BINS, sizeof(uint32_t));
    uint32_t *lo = calloc((size_t)(C ? C : 1) * BINS, sizeof(uint32_t));
    if (!hi || !lo) { free(hi); free(lo); return 2; }
    float fb[CHUNK], fi[CHUNK];
    uint32_t key[CHUNK];
    uint16_t top[CHUNK];
    int bad = 0;
    /* pass 1: the keys' top halves, computed vectorised into a buffer, then counted */
    for (int64_t s = 0; s < n && !bad; s += CHUNK) {
        int len = (int)(n - s < CHUNK ? n - s : CHUNK);
        bad |= widen(base, base_dt, s, len, fb);
        for (int m = 0; m < T; m++) {
            if (!used[m]) continue;
            bad |= widen(fts[m], ft_dt[m], s, len, fi);
            for (int j = 0; j < len; j++)
                top[j] = (uint16_t)((f2u(fi[j] - fb[j]) & 0x7fffffffu) >> 16);
            uint32_t *h = hi + (size_t)m * HI_BINS;
            for (int j = 0; j < len; j++) h[top[j]]++;
        }
    }
    if (bad) { free(hi); free(lo); return 1; }
    int64_t bin[256], need[256];
    int todo = 0;
    for (int c = 0; c < C; c++) {
        const uint32_t *h = hi + (size_t)cut_model[c] * HI_BINS;
        int64_t cum = 0, k = cut_k[c];
        int b = HI_BINS - 1;
        for (; b > 0 && cum + h[b] < k; b--) cum += h[b];
        bin[c] = b;
        need[c] = k - cum;
        if (need[c] == (int64_t)h[b]) { /* the whole bin is kept */
            vstar[c] = ((int64_t)b << 16) - 1;
            need_eq[c] = eq_total[c] = 0;
        } else {
            vstar[c] = -2; /* resolved by pass 2 */
            todo = 1;
        }
    }
    if (todo) {
        for (int64_t s = 0; s < n; s += CHUNK) {
            int len = (int)(n - s < CHUNK ? n - s : CHUNK);
            widen(base, base_dt, s, len, fb);
            int have = -1;
            for (int c = 0; c < C; c++) {
                if (vstar[c] != -2) continue;
                int m = cut_model[c];
                if (have != m) {
                    widen(fts[m], ft_dt[m], s, len, fi);
                    abs_keys(fi, fb, len, key);
                    have = m;
                }
                /* pass 2: few keys fall in the bin; find them 16 at a time */
                uint32_t *l = lo + (size_t)c * BINS;
                uint32_t want = (uint32_t)bin[c];
                for (int j = 0; j < len; j += 16) {
                    uint32_t hit = eq16_hi(key + j, want) & block_bits(j, len);
                    for (; hit; hit &= hit - 1) l[key[j + __builtin_ctz(hit)] & 0xffffu]++;
                }
            }
        }
        for (int c = 0; c < C; c++) {
            if (vstar[c] != -2) continue;
            const uint32_t *l = lo + (size_t)c * BINS;
            int64_t cum = 0;
            int b = BINS - 1;
            for (; b > 0 && cum + l[b] < need[c]; b--) cum += l[b];
            vstar[c] = (bin[c] << 16) | b;
            need_eq[c] = need[c] - cum;
            eq_total[c] = l[b];
        }
    }
    free(hi);
    free(lo);
    return 0;
}

/* A top-k cut: entries with key > v are in; of the `total` entries with key == v, the
 * first `need` in flat order are in (or the last `need` when `high`). kind 0: a real cut,
 * 1: keeps nothing, 2: keeps everything. `seen` counts the equal entries passed so far. */
typedef struct { int64_t v, need, total, seen; int high, kind; } cut_t;

/* in[j] = membership of key[j] in cut c, for one chunk (vectorised; equal keys fixed up). */
static void cut_chunk(cut_t *c, const uint32_t *key, int len, uint8_t *in) {
    if (c->kind) {
        memset(in, c->kind == 2, (size_t)len);
        return;
    }
    int64_t v = c->v;
    int eq = 0;
    for (int j = 0; j < len; j++) {
        in[j] = (int64_t)key[j] > v;
        eq += (int64_t)key[j] == v;
    }
    if (!eq) return;
    /* eq > 0: v is a key, in [0, 2^31) */
    for (int j = 0; j < len; j += 16) {
        uint32_t hit = eq16(key + j, (uint32_t)v) & block_bits(j, len);
        for (; hit; hit &= hit - 1) {
            int64_t i = c->seen++;
            in[j + __builtin_ctz(hit)] = c->high ? i >= c->total - c->need : i < c->need;
        }
    }
}

/* The merge pass: sparsify each delta, weight, elect, disjoint sum or mean, scale, add base.
 *
 * cut_a / cut_b: per model, index of its cuts (-1: none, -2: all). masks: per model a
 * uint8 keep-mask (M_MASK, M_PROB) or NULL. probs: per model float32 keep probabilities
 * (M_PROB; with a NULL mask +0 marks a dropped entry) or NULL. pdiv: per model divisor
 * of M_MASK when rescale. out: n values of dtype out_dt, each the float32 result rounded
 * as torch's cast rounds it.
 * Returns 0, 1 on a NaN/Inf input (out is then garbage), 2 when out of memory, 4 when a
 * result is NaN and out_dt is not float32 (out is then garbage).
 */
int graft_merge(int64_t n, int T, const void *base, int base_dt, const void *const *fts,
                const int32_t *ft_dt, const int32_t *mode, const int32_t *cut_a,
                const int32_t *cut_b, int C, const int64_t *vstar, const int64_t *need_eq,
                const int64_t *eq_total, const int32_t *tie_high, const uint8_t *const *masks,
                const float *const *probs, const float *pdiv, int rescale, const float *w,
                int weighted, int equal_w, int normalize, int has_scale, float scale,
                int out_dt, void *out) {
    if (T > MAXT || C > 256) return 3;
    cut_t cuts[256];
    for (int c = 0; c < C; c++) {
        cuts[c].v = vstar[c];
        cuts[c].need = need_eq[c];
        cuts[c].total = eq_total[c];
        cuts[c].seen = 0;
        cuts[c].high = tie_high[c];
        cuts[c].kind = 0;
    }
    cut_t none = {0, 0, 0, 0, 0, 1}, all = {0, 0, 0, 0, 0, 2};
    cut_t *ca[MAXT], *cb[MAXT];
    for (int m = 0; m < T; m++) {
        ca[m] = cut_a[m] == -1 ? &none : cut_a[m] == -2 ? &all : &cuts[cut_a[m]];
        cb[m] = cut_b[m] == -1 ? &none : cut_b[m] == -2 ? &all : &cuts[cut_b[m]];
    }
    float *buf = malloc(sizeof(float) * CHUNK * (size_t)(T + 6));
    uint8_t *ina = malloc(2 * CHUNK);
    uint32_t *key = malloc(sizeof(uint32_t) * CHUNK);
    if (!buf || !ina || !key) { free(buf); free(ina); free(key); return 2; }
    uint8_t *inb = ina + CHUNK;
    float *fb = buf, *tot = buf + CHUNK, *pos = buf + 2 * CHUNK, *neg = buf + 3 * CHUNK;
    float *div = buf + 4 * CHUNK, *res = buf + 5 * CHUNK, *wd[MAXT];
    for (int m = 0; m < T; m++) wd[m] = buf + (size_t)CHUNK * (m + 6);
    int bad = 0, nan = 0;
    for (int64_t s = 0; s < n; s += CHUNK) {
        int len = (int)(n - s < CHUNK ? n - s : CHUNK);
        bad |= widen(base, base_dt, s, len, fb);
        for (int m = 0; m < T; m++) {
            float *d = wd[m];
            bad |= widen(fts[m], ft_dt[m], s, len, d);
            for (int j = 0; j < len; j++) d[j] = d[j] - fb[j];
            switch (mode[m]) {
            case M_ZERO_MUL:
                for (int j = 0; j < len; j++) d[j] = d[j] * 0.0f;
                break;
            case M_TOPK_MUL:
                for (int j = 0; j < len; j++) key[j] = f2u(d[j]) & 0x7fffffffu;
                cut_chunk(ca[m], key, len, ina);
                for (int j = 0; j < len; j++) d[j] = d[j] * (ina[j] ? 1.0f : 0.0f);
                break;
            case M_BAND:
                for (int j = 0; j < len; j++) key[j] = f2u(d[j]) & 0x7fffffffu;
                cut_chunk(ca[m], key, len, ina);
                cut_chunk(cb[m], key, len, inb);
                for (int j = 0; j < len; j++) d[j] = (ina[j] && !inb[j]) ? d[j] : 0.0f;
                break;
            case M_MASK: {
                const uint8_t *mk = masks[m] + s;
                for (int j = 0; j < len; j++) d[j] = mk[j] ? d[j] : 0.0f;
                if (rescale) {
                    float p = pdiv[m];
                    for (int j = 0; j < len; j++) d[j] = d[j] / p;
                }
                break;
            }
            case M_ZERO:
                for (int j = 0; j < len; j++) d[j] = 0.0f;
                break;
            case M_PROB: {
                const float *p = probs[m] + s;
                if (!masks[m]) { /* p is +0 where dropped (graft_della_probs' draw) */
                    if (rescale)
                        for (int j = 0; j < len; j++) d[j] = p[j] != 0.0f ? d[j] / p[j] : 0.0f;
                    else
                        for (int j = 0; j < len; j++) d[j] = p[j] != 0.0f ? d[j] : 0.0f;
                    break;
                }
                const uint8_t *mk = masks[m] + s;
                for (int j = 0; j < len; j++) d[j] = mk[j] ? d[j] : 0.0f;
                if (rescale)
                    for (int j = 0; j < len; j++) d[j] = d[j] / p[j];
                break;
            }
            default:
                break;
            }
            if (weighted) {
                float wm = w[m];
                for (int j = 0; j < len; j++) d[j] = d[j] * wm;
            }
        }
        /* election: Σ wᵢδᵢ in model order; agreeing sums Σ clamp(x, min=0) and
         * Σ clamp(x, max=0) (NaN propagates, as in torch); branch-free so it vectorises */
        float *restrict t = tot, *restrict ps = pos, *restrict ng = neg, *restrict dv = div;
        memcpy(t, wd[0], sizeof(float) * (size_t)len);
        for (int m = 1; m < T; m++) {
            const float *restrict x = wd[m];
            for (int j = 0; j < len; j++) t[j] = t[j] + x[j];
        }
        for (int j = 0; j < len; j++) ps[j] = ng[j] = dv[j] = 0.0f;
        for (int m = 0; m < T; m++) {
            const float *restrict x = wd[m];
            for (int j = 0; j < len; j++) {
                float xj = x[j];
                ps[j] = ps[j] + (xj <= 0.0f ? 0.0f : xj);
                ng[j] = ng[j] + (xj >= 0.0f ? 0.0f : xj);
            }
        }
        float *restrict o = res;
        for (int j = 0; j < len; j++) o[j] = t[j] >= 0.0f ? ps[j] : ng[j];
        if (normalize) {
            /* Σ wᵢ over agreeing models (equal weights: w x the count, as the torch path) */
            for (int m = 0; m < T; m++) {
                const float *restrict x = wd[m];
                float add = equal_w ? 1.0f : w[m];
                for (int j = 0; j < len; j++) {
                    int up = t[j] >= 0.0f;
                    int agree = (up & (x[j] > 0.0f)) | (!up & (x[j] < 0.0f));
                    dv[j] = dv[j] + (agree ? add : 0.0f);
                }
            }
            float w0 = w[0];
            if (equal_w)
                for (int j = 0; j < len; j++) dv[j] = dv[j] * w0;
            for (int j = 0; j < len; j++) o[j] = o[j] / (dv[j] == 0.0f ? 1.0f : dv[j]);
        }
        if (has_scale)
            for (int j = 0; j < len; j++) o[j] = o[j] * scale;
        for (int j = 0; j < len; j++) o[j] = o[j] + fb[j];
        nan |= narrow(o, out_dt, out, s, len);
    }
    free(buf);
    free(ina);
    free(key);
    return bad ? 1 : nan ? 4 : 0;
}

/* Keep-masks from torch's CPU generator, drawn as torch.rand draws them.
 *
 * torch's CPU generator is MT19937; a float32 uniform is the low 24 bits of one 32-bit
 * output times 2^-24, drawn serially. `state` is the generator's state as
 * Generator.get_state() returns it (5056 bytes; at byte 8 an int32 `left`, at 16 a
 * uint64 `next`, at 24 the 624 state words as uint64), updated in place so that
 * set_state() continues the stream exactly where torch.rand would leave it. keep[i] =
 * u_i < p, or u_i < probs[i] when probs is given. The caller checks once per process
 * that this matches torch.rand (graft/merge/_fused.py). Returns 0, 3 on a state it does
 * not recognise. */
/* A state word tempered into an output, then torch's float32 uniform: its low 24 bits
 * times 2^-24 (exact). */
static inline float mt_uniform(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return (float)(y & 0xffffffu) * 5.9604644775390625e-08f;
}

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    uint32_t y = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
}

/* The generator between calls: its 624 words, the next one to use and how many are left
 * before the next twist. */
typedef struct {
    uint32_t mt[624];
    int64_t pos, avail;
} mt_gen;

/* 0, or 3 on a state it does not recognise. */
static int mt_load(const uint8_t *state, mt_gen *g) {
    int32_t left;
    uint64_t next, w;
    memcpy(&left, state + 8, 4);
    memcpy(&next, state + 16, 8);
    if (left < 1 || left > 625 || next > 624) return 3;
    for (int i = 0; i < 624; i++) {
        memcpy(&w, state + 24 + 8 * (size_t)i, 8);
        if (w >> 32) return 3;
        g->mt[i] = (uint32_t)w;
    }
    /* outputs left before the next twist: state words next .. next + avail - 1 */
    g->avail = left - 1;
    g->pos = (int64_t)next;
    if (g->avail > 0 && g->pos + g->avail != 624) return 3;
    return 0;
}

static void mt_save(const mt_gen *g, uint8_t *state) {
    int32_t left = (int32_t)(g->avail + 1);
    uint64_t next = (uint64_t)g->pos, w;
    memcpy(state + 8, &left, 4);
    memcpy(state + 16, &next, 8);
    for (int k = 0; k < 624; k++) {
        w = g->mt[k];
        memcpy(state + 24 + 8 * (size_t)k, &w, 8);
    }
}

/* The next run of untempered words (at most n, at least 1), twisting first when none are
 * left: the reference algorithm's twist, in place, in three runs. */
static const uint32_t *mt_words(mt_gen *g, int64_t n, int64_t *take) {
    if (g->avail == 0) {
        uint32_t *mt = g->mt;
        int k = 0;
        for (; k < 227; k++) mt[k] = mt[k + 397] ^ mt_twist(mt[k], mt[k + 1]);
        for (; k < 623; k++) mt[k] = mt[k - 227] ^ mt_twist(mt[k], mt[k + 1]);
        mt[623] = mt[396] ^ mt_twist(mt[623], mt[0]);
        g->pos = 0;
        g->avail = 624;
    }
    *take = n < g->avail ? n : g->avail;
    const uint32_t *src = g->mt + g->pos;
    g->pos += *take;
    g->avail -= *take;
    return src;
}

int graft_mt_keep(uint8_t *state, int64_t n, float p, const float *probs, uint8_t *keep) {
    mt_gen g;
    if (mt_load(state, &g)) return 3;
    for (int64_t i = 0, take; i < n; i += take) {
        const uint32_t *src = mt_words(&g, n - i, &take);
        uint8_t *dst = keep + i;
        if (probs) {
            const float *pr = probs + i;
            for (int64_t t = 0; t < take; t++) dst[t] = mt_uniform(src[t]) < pr[t];
        } else {
            for (int64_t t = 0; t < take; t++) dst[t] = mt_uniform(src[t]) < p;
        }
    }
    mt_save(&g, state);
    return 0;
}

/* Stable ascending order of key[0..n) (LSD radix, 3 passes of 11 bits): the indices in
 * sorted order are left in idx (n entries; k2/i2 are n-entry scratch). */
static const uint32_t *radix_order(int64_t n, uint32_t *key, uint32_t *idx, uint32_t *k2,
                                   uint32_t *i2) {
    for (int64_t j = 0; j < n; j++) idx[j] = (uint32_t)j;
    uint32_t *ka = key, *ia = idx, *kb = k2, *ib = i2;
    for (int shift = 0; shift < 33; shift += 11) {
        uint32_t cnt[2049] = {0};
        for (int64_t j = 0; j < n; j++) cnt[((ka[j] >> shift) & 0x7ffu) + 1]++;
        for (int b = 0; b < 2048; b++) cnt[b + 1] += cnt[b];
        for (int64_t j = 0; j < n; j++) {
            uint32_t pos = cnt[(ka[j] >> shift) & 0x7ffu]++;
            kb[pos] = ka[j];
            ib[pos] = ia[j];
        }
        uint32_t *t = ka; ka = kb; kb = t;
        t = ia; ia = ib; ib = t;
    }
    return ia;
}

/* The same order by value buckets: |d| scaled onto n buckets over [0, max] is monotone in
 * the key, so a stable counting sort by bucket leaves only in-bucket disorder, which an
 * insertion sort on (key << 32 | index) removes. Fine-tuning deltas are spread enough that
 * this is a fraction of a move per entry (bf16 deltas take few distinct values, each
 * alone in its bucket). Returns 0, giving up, when max is not finite or once the moves
 * exceed two per entry so far (heavy tails crowd the low buckets); on success packed[r]'s
 * low 32 bits are the index of rank r. bkt: n entries, cnt: 2n, packed: n.
 */
static int bucket_order(int64_t n, const uint32_t *key, uint32_t kmax, uint32_t *bkt,
                        uint32_t *cnt, uint64_t *packed) {
    if (kmax >= 0x7f800000u) return 0;
    double scale = kmax ? (double)(n - 1) / (double)u2f(kmax) : 0.0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t b = (uint32_t)((double)u2f(key[j]) * scale);
        bkt[j] = b < (uint32_t)n ? b : (uint32_t)(n - 1);
    }
    /* The two halves count and place with counters of their own, so consecutive entries of
     * one bucket do not wait on one counter; A's entries of a bucket go before B's. */
    uint32_t *ca = cnt, *cb = cnt + n;
    memset(cnt, 0, sizeof(uint32_t) * 2 * (size_t)n);
    int64_t h = n / 2;
    for (int64_t j = 0; j < h; j++) {
        ca[bkt[j]]++;
        cb[bkt[h + j]]++;
    }
    if (n & 1) cb[bkt[n - 1]]++;
    uint32_t run = 0;
    for (int64_t b = 0; b < n; b++) {
        uint32_t x = ca[b], y = cb[b];
        ca[b] = run;
        cb[b] = run + x;
        run += x + y;
    }
    for (int64_t j = 0; j < h; j++) {
        packed[ca[bkt[j]]++] = ((uint64_t)key[j] << 32) | (uint64_t)j;
        packed[cb[bkt[h + j]]++] = ((uint64_t)key[h + j] << 32) | (uint64_t)(h + j);
    }
    if (n & 1) packed[cb[bkt[n - 1]]++] = ((uint64_t)key[n - 1] << 32) | (uint64_t)(n - 1);
    int64_t moves = 0;
    uint64_t top = packed[0]; /* the largest so far, kept in a register */
    for (int64_t i = 1; i < n; i++) {
        uint64_t x = packed[i];
        if (x > top) {
            top = x;
            continue;
        }
        int64_t k = i;
        while (k > 0 && packed[k - 1] > x) {
            packed[k] = packed[k - 1];
            k--;
        }
        packed[k] = x;
        moves += i - k;
        if (moves > 2 * i + 64) return 0;
    }
    return 1;
}

/* p[index of rank r] = prob[r], for the order of `bucket_order` (packed, when non-NULL)
 * or `radix_order`. Kept scalar: gcc would vectorize it as a scatter, which on AMD Zen is
 * microcoded and slower than these plain stores (measured: a quarter of della's ranking). */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#else
#define NO_VECTORIZE
#endif
NO_VECTORIZE static void place_ranks(int64_t n, const uint64_t *packed, const uint32_t *order,
                                     const float *prob, float *p) {
    if (packed) {
        for (int64_t r = 0; r < n; r++) p[(uint32_t)packed[r]] = prob[r];
    } else {
        for (int64_t r = 0; r < n; r++) p[order[r]] = prob[r];
    }
}

/* DELLA's keep probabilities: within each row of |d| (rows x cols, row-major), the rank r
 * of an entry in a stable ascending sort gives p = lo + span * (r / (cols - 1)), each step
 * rounded to float32 as torch does (cols == 1: r / (cols - 1) is 0.5). The order comes from
 * `bucket_order`, or from `radix_order` on the rows it gives up on; after four give-ups in
 * a row (a tensor's rows are alike) only every 32nd row tries buckets again.
 * With a generator `state` (as graft_mt_keep takes it) MagPrune's draw follows, row by
 * row in flat order as torch.rand(shape) < probs draws it: probs[i] is then its
 * probability where entry i is kept and +0 where it is dropped (p > 0 for DELLA, so +0
 * means dropped), and the state is advanced past rows * cols draws.
 * Returns 0, 1 on a NaN/Inf input, 2 when out of memory, 3 on an unknown state.
 */
int graft_della_probs(int64_t rows, int64_t cols, const void *base, int base_dt,
                      const void *ft, int ft_dt, float lo, float span, uint8_t *state,
                      float *probs) {
    mt_gen gen;
    if (state && mt_load(state, &gen)) return 3;
    size_t n = (size_t)cols;
    uint32_t *key = malloc(sizeof(uint32_t) * 2 * n);
    uint32_t *idx = malloc(sizeof(uint32_t) * 2 * n);
    uint64_t *packed = malloc(sizeof(uint64_t) * n);
    float *fb = malloc(sizeof(float) * 3 * n);
    if (!key || !idx || !packed || !fb) {
        free(key); free(idx); free(packed); free(fb);
        return 2;
    }
    float *fi = fb + cols, *prob = fb + 2 * cols; /* prob[r]: the probability of rank r */
    float denom = (float)(cols - 1);
    for (int64_t rank = 0; rank < cols; rank++) {
        float frac = cols > 1 ? (float)rank / denom : 0.5f;
        prob[rank] = lo + span * frac;
    }
    int bad = 0, misses = 0;
    for (int64_t r = 0; r < rows && !bad; r++) {
        int64_t off = r * cols;
        for (int64_t s = 0; s < cols; s += CHUNK) {
            int len = (int)(cols - s < CHUNK ? cols - s : CHUNK);
            bad |= widen(base, base_dt, off + s, len, fb + s);
            bad |= widen(ft, ft_dt, off + s, len, fi + s);
        }
        uint32_t kmax = 0;
        for (int64_t j = 0; j < cols; j++) {
            uint32_t k = f2u(fi[j] - fb[j]) & 0x7fffffffu;
            key[j] = k;
            kmax = k > kmax ? k : kmax;
        }
        /* bucket_order keeps its buckets in key[cols..] and its counters in idx */
        int tried = misses < 4 || r % 32 == 0;
        if (tried && bucket_order(cols, key, kmax, key + cols, idx, packed)) {
            misses = 0;
            place_ranks(cols, packed, NULL, prob, probs + off);
        } else {
            misses += tried;
            const uint32_t *order = radix_order(cols, key, idx, key + cols, idx + cols);
            place_ranks(cols, NULL, order, prob, probs + off);
        }
        for (int64_t j = 0, take; state && j < cols; j += take) { /* draw while in cache */
            const uint32_t *src = mt_words(&gen, cols - j, &take);
            float *q = probs + off + j;
            for (int64_t t = 0; t < take; t++) q[t] = mt_uniform(src[t]) < q[t] ? q[t] : 0.0f;
        }
    }
    if (state && !bad) mt_save(&gen, state);
    free(key);
    free(idx);
    free(packed);
    free(fb);
    return bad;
}
