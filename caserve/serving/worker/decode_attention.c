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
 * picks the instructions); others plain loops over the columns, one head and one float of it at a time
 * (for heads of 1, 2 or 4 floats the compiler vectorizes those over the columns: 3-4.5x faster than a
 * loop over the head's floats inside the loop over the columns). With vectors, heads under 64 floats
 * reduce their scores eight columns at a time, and the weighted sum keeps its accumulators in registers,
 * in several sets for short heads: small heads (16 floats, as in the CPU-sized models) would otherwise
 * spend their time on reductions and on multiply-adds that wait for the one before.
 *
 * Built and loaded by decode_kernel.py (plain C: no Python or torch headers, so it compiles in well under
 * a second), without -ffast-math, which would switch the whole process to flush-to-zero. Returns 0, or 1
 * when scratch memory could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
/* glibc's vector expf (libmvec), which its headers declare only under -ffast-math (GCC's attribute;
 * clang takes it from -fveclib=libmvec, which decode_kernel.py adds) */
float expf(float) __attribute__((simd("notinbranch")));
#endif

/* aligned(4): loads need no alignment; may_alias: the floats of the cache are read through it */
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

/* Lanes of a and b picked by index (0-7 from a, 8-15 from b): __builtin_shufflevector in clang and
 * GCC 12 and later, __builtin_shuffle in older GCC. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
typedef int32_t v8i __attribute__((vector_size(32)));
#define SHUFFLE(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (v8i){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* The sum of one vector's lanes, as the tree ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)), the one sum8 below
 * builds for each of its eight columns. (Which columns a row reduces in blocks depends only on its own
 * range, so its output does not depend on the other rows either way.) */
static inline float hsum(v8 x)
{
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

/* Lane-wise sums of pairs of lanes from a and b: [a0+a1, b0+b1, a2+a3, b2+b3, ...]. */
static inline v8 pair_sums(v8 a, v8 b)
{
    return SHUFFLE(a, b, 0, 8, 2, 10, 4, 12, 6, 14)
         + SHUFFLE(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}

/* The eight horizontal sums of x[0..7] in one vector (lane i = hsum(x[i]), in hsum's order): three
 * levels of shuffles and adds instead of eight scalar reductions. */
static inline v8 sum8(const v8 *x)
{
    const v8 p01 = pair_sums(x[0], x[1]), p23 = pair_sums(x[2], x[3]);
    const v8 p45 = pair_sums(x[4], x[5]), p67 = pair_sums(x[6], x[7]);
    const v8 q03 = SHUFFLE(p01, p23, 0, 1, 8, 9, 4, 5, 12, 13)
                 + SHUFFLE(p01, p23, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 q47 = SHUFFLE(p45, p67, 0, 1, 8, 9, 4, 5, 12, 13)
                 + SHUFFLE(p45, p67, 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(q03, q47, 0, 1, 2, 3, 8, 9, 10, 11)
         + SHUFFLE(q03, q47, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Scores s[h * len + j] = scale * q_h . k_j for the group's heads; dim a multiple of 8. Heads under 64
 * floats take eight columns at a time, their lane sums reduced together (sum8), where one column's few
 * multiply-adds would otherwise wait on its own reduction; the rest of the columns, and every column of
 * wider heads (whose multiply-adds outweigh the reduction, and which read each key once for all the
 * group's heads this way: 8% faster for Qwen2's 14/2 x 64), one by one, in the same order.
 * Inlined per head size, so that the loops over the dimension unroll. */
static inline __attribute__((always_inline)) void scores_v8(const float *qg, const float *kb, int64_t k_col,
                                                            int64_t len, int64_t group, int64_t dim,
                                                            float scale, float *s)
{
    const int64_t c8 = dim / 8;
    int64_t j = 0;
    for (; c8 < 8 && j + 8 <= len; j += 8) {
        for (int64_t h = 0; h < group; h++) {
            const v8 *qh = (const v8 *)(qg + h * dim);
            v8 acc[8];
            for (int i = 0; i < 8; i++) {
                const v8 *kj = (const v8 *)(kb + (j + i) * k_col);
                acc[i] = qh[0] * kj[0];
                for (int64_t c = 1; c < c8; c++)
                    acc[i] += qh[c] * kj[c];
            }
            *(v8 *)(s + h * len + j) = sum8(acc) * scale;
        }
    }
    for (; j < len; j++) {
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

static inline __attribute__((always_inline)) void scores_any(const float *qg, const float *kb, int64_t k_col,
                                                             int64_t len, int64_t group, int64_t dim,
                                                             float scale, float *s)
{
    for (int64_t h = 0; h < group; h++) {
        const float *qh = qg + h * dim;
        float *sh = s + h * len;
        for (int64_t j = 0; j < len; j++) {
            const float *kj = kb + j * k_col;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; d++)
                dot += qh[d] * kj[d];
            sh[j] = dot * scale;
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

/* o = sum_j p[j] * v_j over n 8-float vectors of the dimension (n from 1 to 8, a constant where this is
 * inlined, so that the accumulators stay in registers). For short vectors, consecutive columns go to up
 * to four sets of accumulators, summed in a fixed order at the end, so that their multiply-adds do not
 * wait for each other. */
static inline __attribute__((always_inline)) void values_chunk(const float *p, const float *vb, int64_t v_col,
                                                               int64_t len, int n, float *o)
{
    const int sets = n <= 2 ? 4 : n <= 4 ? 2 : 1;
    v8 acc[4][8];
    for (int u = 0; u < sets; u++)
        for (int c = 0; c < n; c++)
            acc[u][c] = (v8){0};
    int64_t j = 0;
    for (; j + sets <= len; j += sets)
        for (int u = 0; u < sets; u++) {
            const v8 *vj = (const v8 *)(vb + (j + u) * v_col);
            for (int c = 0; c < n; c++)
                acc[u][c] += p[j + u] * vj[c];
        }
    for (int u = 0; j < len; j++, u++) {
        const v8 *vj = (const v8 *)(vb + j * v_col);
        for (int c = 0; c < n; c++)
            acc[u][c] += p[j] * vj[c];
    }
    for (int c = 0; c < n; c++) {
        v8 sum = acc[0][c];
        if (sets == 2)
            sum += acc[1][c];
        if (sets == 4)
            sum = (sum + acc[1][c]) + (acc[2][c] + acc[3][c]);
        memcpy(o + c * 8, &sum, sizeof sum);
    }
}

/* og[h] = sum_j s[h * len + j] * v_j for the group's heads; dim a multiple of 8, taken 64 floats at a
 * time. */
static void values_v8(const float *s, const float *vb, int64_t v_col, int64_t len, int64_t group,
                      int64_t dim, float *og)
{
    for (int64_t h = 0; h < group; h++)
        for (int64_t c0 = 0; c0 < dim; c0 += 64) {
            const float *p = s + h * len, *vc = vb + c0;
            float *o = og + h * dim + c0;
            switch ((dim - c0) >= 64 ? 8 : (int)((dim - c0) / 8)) {
            case 1: values_chunk(p, vc, v_col, len, 1, o); break;
            case 2: values_chunk(p, vc, v_col, len, 2, o); break;
            case 3: values_chunk(p, vc, v_col, len, 3, o); break;
            case 4: values_chunk(p, vc, v_col, len, 4, o); break;
            case 5: values_chunk(p, vc, v_col, len, 5, o); break;
            case 6: values_chunk(p, vc, v_col, len, 6, o); break;
            case 7: values_chunk(p, vc, v_col, len, 7, o); break;
            default: values_chunk(p, vc, v_col, len, 8, o); break;
            }
        }
}

static inline __attribute__((always_inline)) void values_any(const float *s, const float *vb, int64_t v_col,
                                                             int64_t len, int64_t group, int64_t dim, float *og)
{
    for (int64_t h = 0; h < group; h++)
        for (int64_t d = 0; d < dim; d++) {
            const float *p = s + h * len, *vd = vb + d;
            float acc = 0.0f;
            for (int64_t j = 0; j < len; j++)
                acc += p[j] * vd[j * v_col];
            og[h * dim + d] = acc;
        }
}

/* Head sizes not a multiple of 8, the small ones as constants (toy models: sshleifer/tiny-gpt2's heads are one
 * float), so that the loops over the dimension vanish and those over the columns vectorize. */
#define BY_SMALL_DIM(call_any)                                                                             \
    switch (dim) {                                                                                         \
    case 1: { const int64_t D = 1; call_any; } break;                                                      \
    case 2: { const int64_t D = 2; call_any; } break;                                                      \
    case 4: { const int64_t D = 4; call_any; } break;                                                      \
    default: { const int64_t D = dim; call_any; }                                                          \
    }

#define BY_DIM(call_v8, call_any)                                                                          \
    switch (dim) {                                                                                         \
    case 16: { const int64_t D = 16; call_v8; } break;                                                     \
    case 32: { const int64_t D = 32; call_v8; } break;                                                     \
    case 64: { const int64_t D = 64; call_v8; } break;                                                     \
    case 128: { const int64_t D = 128; call_v8; } break;                                                   \
    default:                                                                                               \
        if (dim % 8 == 0) { const int64_t D = dim; call_v8; } else { BY_SMALL_DIM(call_any); }             \
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
               scores_any(qg, kb, k_col, len, group, D, scale, s));
        for (int64_t h = 0; h < group; h++)
            softmax(s + h * len, len);
        if (dim % 8 == 0) /* values_v8 picks its register blocks by the head size itself */
            values_v8(s, vb, v_col, len, group, dim, og);
        else
            BY_SMALL_DIM(values_any(s, vb, v_col, len, group, D, og));
        free(s);
    }
    return failed;
}
