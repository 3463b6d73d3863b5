/* Decode attention over rows of different lengths, for the slot engine on CPU workers.
 *
 * One query position per row (a decode step). Row r attends over columns [lo[r], hi[r]) of its own slot
 * in the KV cache, so a row that has just started reads its few columns, not the window of the longest
 * row in the step. The cache is read where it lies: keys and values are given as a base pointer and
 * strides in floats (slot, head, column; the dimension is contiguous), the layout of SlotCache.
 *
 * Work is split by (row, key-value head): the query heads of one group share each key and value read.
 * Each task computes its scores, a softmax with the maximum subtracted, and the weighted sum of values in
 * a fixed order, so a row's output does not depend on the other rows of the step. Head sizes that are
 * a multiple of 8 use 8-float vectors (GCC vector extensions, so the code stays portable; -march=native
 * picks the instructions), unrolled for 16, 32, 64 and 128; others a plain loop.
 *
 * Built and loaded by decode_kernel.py (plain C: no Python or torch headers, so it compiles in well under
 * a second), without -ffast-math, which would switch the whole process to flush-to-zero. Returns 0, or 1
 * when scratch memory could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's vector expf (libmvec), which its headers declare only under -ffast-math */
float expf(float) __attribute__((simd("notinbranch")));
#endif

/* aligned(4): loads need no alignment; may_alias: the floats of the cache are read through it */
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

static inline float hsum(v8 x)
{
    float s = 0.0f;
    for (int i = 0; i < 8; i++)
        s += x[i];
    return s;
}

/* Scores s[h * len + j] = scale * q_h . k_j for the group's heads; dim a multiple of 8. Inlined per
 * head size, so that the loops over the dimension unroll. */
static inline __attribute__((always_inline)) void scores_v8(const float *qg, const float *kb, int64_t k_col,
                                                            int64_t len, int64_t group, int64_t dim,
                                                            float scale, float *s)
{
    const int64_t c8 = dim / 8;
    for (int64_t j = 0; j < len; j++) {
        const v8 *kj = (const v8 *)(kb + j * k_col);
        for (int64_t h = 0; h < group; h++) {
            const v8 *qh = (const v8 *)(qg + h * dim);
            v8 acc = qh[0] * kj[0];
            for (int64_t c = 1; c < c8; c++)
                acc += qh[c] * kj[c];
            s[h * len + j] = hsum(acc) * scale;
        }
    }
}

static void scores_any(const float *qg, const float *kb, int64_t k_col, int64_t len, int64_t group,
                       int64_t dim, float scale, float *s)
{
    for (int64_t j = 0; j < len; j++) {
        const float *kj = kb + j * k_col;
        for (int64_t h = 0; h < group; h++) {
            const float *qh = qg + h * dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; d++)
                dot += qh[d] * kj[d];
            s[h * len + j] = dot * scale;
        }
    }
}

static void softmax(float *s, int64_t len)
{
    float top = s[0], sum = 0.0f;
    for (int64_t j = 1; j < len; j++)
        top = s[j] > top ? s[j] : top;
    for (int64_t j = 0; j < len; j++)
        s[j] = expf(s[j] - top);
    for (int64_t j = 0; j < len; j++)
        sum += s[j];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < len; j++)
        s[j] *= inv;
}

/* og[h] = sum_j s[h * len + j] * v_j for the group's heads (og zeroed by the caller). */
static inline __attribute__((always_inline)) void values_v8(const float *s, const float *vb, int64_t v_col,
                                                            int64_t len, int64_t group, int64_t dim, float *og)
{
    const int64_t c8 = dim / 8;
    for (int64_t h = 0; h < group; h++) {
        v8 acc[c8];
        for (int64_t c = 0; c < c8; c++)
            acc[c] = (v8){0};
        const float *sh = s + h * len;
        for (int64_t j = 0; j < len; j++) {
            const v8 *vj = (const v8 *)(vb + j * v_col);
            for (int64_t c = 0; c < c8; c++)
                acc[c] += sh[j] * vj[c];
        }
        memcpy(og + h * dim, acc, sizeof(float) * (size_t)dim);
    }
}

static void values_any(const float *s, const float *vb, int64_t v_col, int64_t len, int64_t group,
                       int64_t dim, float *og)
{
    for (int64_t j = 0; j < len; j++) {
        const float *vj = vb + j * v_col;
        for (int64_t h = 0; h < group; h++) {
            const float p = s[h * len + j];
            float *oh = og + h * dim;
            for (int64_t d = 0; d < dim; d++)
                oh[d] += p * vj[d];
        }
    }
}

#define BY_DIM(call_v8, call_any)                                                                          \
    switch (dim) {                                                                                         \
    case 16: { const int64_t D = 16; call_v8; } break;                                                     \
    case 32: { const int64_t D = 32; call_v8; } break;                                                     \
    case 64: { const int64_t D = 64; call_v8; } break;                                                     \
    case 128: { const int64_t D = 128; call_v8; } break;                                                   \
    default:                                                                                               \
        if (dim % 8 == 0) { const int64_t D = dim; call_v8; } else { call_any; }                           \
    }

int caserve_decode_attention(const float *q, const float *k, const float *v, float *out,
                             const int64_t *lo, const int64_t *hi, int64_t rows, int64_t heads,
                             int64_t kv_heads, int64_t dim, int64_t k_slot, int64_t k_head, int64_t k_col,
                             int64_t v_slot, int64_t v_head, int64_t v_col, float scale, int threads)
{
    const int64_t group = heads / kv_heads;
    const int64_t tasks = rows * kv_heads;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1) reduction(| : failed)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t r = task / kv_heads, g = task % kv_heads;
        const int64_t a = lo[r], len = hi[r] - lo[r];
        const float *qg = q + (r * heads + g * group) * dim; /* q and out: [rows, heads, dim] */
        float *og = out + (r * heads + g * group) * dim;
        memset(og, 0, sizeof(float) * (size_t)(group * dim));
        if (len <= 0)
            continue;
        float *s = malloc(sizeof(float) * (size_t)(group * len));
        if (s == NULL) {
            failed |= 1;
            continue;
        }
        const float *kb = k + r * k_slot + g * k_head + a * k_col;
        const float *vb = v + r * v_slot + g * v_head + a * v_col;
        BY_DIM(scores_v8(qg, kb, k_col, len, group, D, scale, s),
               scores_any(qg, kb, k_col, len, group, dim, scale, s));
        for (int64_t h = 0; h < group; h++)
            softmax(s + h * len, len);
        BY_DIM(values_v8(s, vb, v_col, len, group, D, og), values_any(s, vb, v_col, len, group, dim, og));
        free(s);
    }
    return failed;
}
