/* Locality-band candidates in two passes: an 8-bit screening pass over every zone, then exact
 * float32 similarities for the few zones that can still matter.
 *
 * Why: the band needs s_k = c_k . s for every available zone. At 64 zones x 6,144 dimensions
 * the float32 centroids are 1.5 MiB; one BLAS sgemv over them is bound by cache bandwidth
 * (~24 us on the 2-core EPYC CI machine, with a long tail when other tenants share the L3).
 * The same centroids quantized to uint8 are 384 KiB and stay in L2; on structured tables only
 * ~4 of 64 zones then need their 24 KiB float32 row (benchmarks/eldr_decision.py).
 *
 * Screening: centroid row k is stored as q_k (uint8) with scale a_k, c_k = a_k q_k + e_k; the
 * signature is quantized per call to 13-bit levels with a power-of-two scale, s = b p + f (see
 * "signature quantization" below). Then
 *     c_k . s = a_k b (q_k . p) + e_k . s + (a_k q_k) . f
 * and by Cauchy-Schwarz the last two terms are bounded by |e_k| |s| + |a_k q_k| |f|: |e_k| and
 * |a_k q_k| are known when the table is loaded, |s| and |f| are computed in the quantizing pass.
 * So every zone gets an interval [lo_k, hi_k] that provably holds its float32 similarity (up to
 * float rounding, covered by a relative margin).
 *
 * Which zones can matter (gateway/band.py, `choose`): the band {s_k >= s* - tau} and the
 * min-candidates admission, which walks zones in descending similarity until `m` distinct
 * workers are in. With z = the most zones any one worker serves, the r = m z most similar zones
 * span at least m workers, so the walk never admits a zone less similar than the r-th largest
 * similarity; and every band member has s >= s* - tau. Zones are given exact products in
 * descending order of their upper bounds while T = min(best exact so far - tau, r-th largest
 * exact so far) is kept: T only rises and stays below both quantities, so once the next upper
 * bound is under T no remaining zone is in the band, admitted, or more similar than the chosen
 * zone (which fixes its rank). The caller runs the band over the visited zones only: the same
 * choice, band size, rank and similarity as the band over all zones, up to float32 rounding
 * ties (the exact products here sum in another order than BLAS does).
 *
 * The quantizing pass and the screening sum run on AVX-512 VNNI (four centroid rows per pass
 * over the signature) or AVX2 where the CPU has them and in plain C otherwise; the exact
 * products use the same lane order on AVX2 and in C. All paths give bit-identical results, so
 * decisions do not depend on the CPU.
 *
 * Signatures the screening pass cannot narrow (more than half the zones within tau of the
 * best: tables without structure) are decided load-first instead (`choose_by_load`, at the end
 * of this file), which needs exact products only around the band's edge, the least-loaded
 * workers' zones and the chosen zone's rank. Only when min-candidates must admit zones below
 * such a band is the signature handed back to the caller's one sgemv over every zone, which
 * `choose_all` then sorts and walks here.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SIMKERNEL_X86 1
#endif

/* Signature levels are 13-bit: |p_d| <= 8191. That leaves the bound's dominant term unchanged
 * (the centroids' 8-bit error is ~30 times the signature's) and lets AVX-512 VNNI split p into
 * two int8 halves, p = 128 hi + lo with hi in [-64, 63] and lo in [0, 127], so that
 * q_k . p = 128 (q_k . hi) + q_k . lo is two vpdpbusd (64 uint8 x int8 products each) per 64
 * elements, with no widening of q_k. */
#define QMAX_SIGNATURE 8191.0f

/* AVX2 / scalar integer sums run in int32 lanes: |q p| <= 255 * 8191 and vpmaddwd adds two per
 * lane, so with four accumulators advancing 64 elements per step a block of 4,096 elements is
 * 64 steps per lane, far from 2^31. Blocks are summed in int64. */
#define BLOCK 4096
/* VNNI lanes take 4 products per vpdpbusd, at most 4 * 255 * 127 = 129,540; a block of 65,536
 * elements is 1,024 instructions per lane (1.3e8). Lanes are summed in int64. */
#define VNNI_BLOCK 65536

typedef struct {
    PyObject_HEAD
    Py_ssize_t rows;
    Py_ssize_t dim;
    uint8_t *q;         /* rows x dim */
    float *exact;       /* rows x dim, the float32 centroids */
    double *scale;      /* a_k */
    double *err_norm;   /* |e_k| */
    double *deq_norm;   /* |a_k q_k| */
    int8_t *q2;         /* rows x dim: the residual c_k - a_k q_k, quantized again (see refine) */
    double *scale2;     /* a2_k */
    double *err2_norm;  /* |c_k - a_k q_k - a2_k q2_k| */
    double *deq2_norm;  /* |a_k q_k + a2_k q2_k| */
    double rel;         /* fdot's worst-case relative rounding (see margin) */
    double cur_b, cur_s_norm, cur_f_norm;  /* this decision's signature scale and norms */
    int16_t *p;         /* dim, the quantized signature (scratch; AVX2 and scalar paths only) */
    int8_t *p_hi;       /* dim, its high part + 64 and its low part (scratch; VNNI path) */
    int8_t *p_lo;
    int64_t *q_sums;    /* rows: sum of q_k, and of q2_k (the VNNI path's offset correction) */
    int64_t *q2_sums;
    Py_ssize_t *all_rows; /* rows: 0, 1, ..., rows - 1 */
    int64_t *sums;      /* rows (scratch): q_k . p */
    double *hi;         /* rows (scratch): upper bounds (INFINITY once visited) */
    double *lo;         /* rows (scratch): lower bounds */
    double *xval;       /* rows (scratch): exact values, where flags has FLAG_KNOWN */
    long *zload;        /* rows (scratch): in-flight load of each band zone's candidate */
    unsigned char *flags; /* rows (scratch): FLAG_* bits of `choose_by_load` */
    double *top;        /* rows (scratch): the largest exact values so far */
    double *values;     /* rows (scratch): exact values of visited zones, sorted */
    Py_ssize_t *picked; /* rows (scratch): their zone indices */
    Py_ssize_t *band;   /* rows (scratch): indices into picked that form the band */
    /* set_workers: the candidate serving each row, the zone-less candidates, and per-candidate
     * scratch; rank_depth = the most rows one candidate serves. */
    Py_ssize_t *positions;
    Py_ssize_t *zoneless;
    unsigned char *seen;
    PyObject *ids;      /* tuple: the worker id of each candidate (see Index_matches) */
    Py_ssize_t n_zoneless;
    Py_ssize_t n_candidates;
    Py_ssize_t rank_depth;
    int use_avx2;
    int use_vnni;  /* AVX-512 VNNI for quantizing and screening (implies use_avx2) */
} Index;

/* ---------------------------------------------------------------- signature quantization */

/* Identical on every path, bit for bit:
 *   peak = max_d |s_d| = m 2^e with m in [0.5, 1);  b = 2^(e - 13), so peak / b < 8192;
 *   x_d = s_d / b;  p_d = x_d rounded half to even, clamped to +-8191;  f_d = b (x_d - p_d).
 * Because b is a power of two, x_d is exact, and so is x_d - p_d: below 1/2, p_d = 0; above,
 * both are multiples of ulp(x_d) >= 2^-11 and the difference is at most 1. The sums of squares
 * are taken in that scaled domain (|x_d| <= 8192, so nothing overflows whatever the signature's
 * magnitude) in float32, 16 lanes (lane j takes d = j mod 16, folded in a fixed tree), then the
 * tail in order; each is inflated by its worst-case rounding (see `inflate`) and multiplied by
 * b^2 in double. Peaks under 2^-100 (where 1 / b would leave the normal floats, or the signature
 * is all zeros) take `quantize_degenerate`: p = 0, f = s, slow but exact. */
#define TINY_PEAK 7.888609052210118e-31f /* 2^-100 */

typedef struct {
    double b;   /* the signature's scale (0 when degenerate) */
    double s2;  /* upper bounds on |s|^2 and |f|^2 */
    double f2;
} Quantized;

static float
reduce8(const float *v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* A float32 sum of n non-negative rounded squares in 16 lanes plus a fold and a tail errs by
 * at most (n / 16 + 24) 2^-24 relative (one rounding per square, per addition along a lane,
 * per fold level, per tail addition), plus up to 2^-126 per square lost to underflow. Doubled
 * for slack, then scaled back by b^2. */
static double
inflate(float sum, Py_ssize_t n, double b)
{
    const double gamma = ((double)n / 16.0 + 24.0) * 5.960464477539063e-08;
    return ((double)sum * (1.0 + 2.0 * gamma) + (double)n * 1.1754943508222875e-38) * b * b;
}

/* Round half to even for |x| < 2^22 in the default rounding mode: adding 1.5 * 2^23 pushes the
 * fraction out of the significand. Matches vroundps / vrndscaleps with TO_NEAREST_INT. */
static inline float
round_even(float x)
{
    const float magic = 12582912.0f;
    return (x + magic) - magic;
}

static inline float
clamp_level(float r)
{
    return r > QMAX_SIGNATURE ? QMAX_SIGNATURE : (r < -QMAX_SIGNATURE ? -QMAX_SIGNATURE : r);
}

/* max |s_d|, or -1 when any element is NaN or infinite. */
static float
peak_scalar(const float *s, Py_ssize_t dim)
{
    float peak = 0.0f;
    for (Py_ssize_t d = 0; d < dim; d++) {
        float m = fabsf(s[d]);
        if (!(m <= FLT_MAX))
            return -1.0f;
        if (m > peak)
            peak = m;
    }
    return peak;
}

static void
quantize_degenerate(const float *s, Py_ssize_t dim, int16_t *p, int8_t *hi, int8_t *lo,
                    Quantized *out)
{
    double sum = 0.0;
    for (Py_ssize_t d = 0; d < dim; d++) {
        sum += (double)s[d] * (double)s[d];
        if (p)
            p[d] = 0;
        if (hi) {
            hi[d] = 64;  /* stored as hi + 64: a zero level */
            lo[d] = 0;
        }
    }
    out->b = 0.0;
    out->s2 = sum * (1.0 + (double)dim * 2.220446049250313e-16) + (double)dim * 1e-300;
    out->f2 = out->s2;
}

/* b and 1 / b for a peak at least TINY_PEAK (both powers of two, normal floats). */
static void
scale_for(float peak, float *b, float *inv_b)
{
    int e;
    (void)frexpf(peak, &e);
    *b = ldexpf(1.0f, e - 13);
    *inv_b = ldexpf(1.0f, 13 - e);
}

/* One element on the scalar path (also the SIMD paths' tails): writes p (or hi / lo), adds the
 * rounded squares of x and x - p to *s2 and *f2. */
static inline void
quantize_element(float v, float inv_b, int16_t *p, int8_t *hi, int8_t *lo, Py_ssize_t d,
                 float *s2, float *f2)
{
    float x = v * inv_b;
    float r = clamp_level(round_even(x));
    float f = x - r;
    int level = (int)r;
    if (p)
        p[d] = (int16_t)level;
    if (hi) {
        hi[d] = (int8_t)((level >> 7) + 64);  /* arithmetic shift: floor(level / 128) */
        lo[d] = (int8_t)(level & 127);
    }
    *s2 += x * x;
    *f2 += f * f;
}

/* Fold 16 lanes the way every path does: (lane j + lane 8 + j), then reduce8. */
static float
fold16(const float *acc)
{
    float v[8];
    for (int j = 0; j < 8; j++)
        v[j] = acc[j] + acc[8 + j];
    return reduce8(v);
}

/* Every path's first steps once it has the peak of s[0, body): the tail's peak, the
 * finiteness check, the degenerate case and the scale. Returns -1 (not finite), 1 (degenerate,
 * *out written) or 0 (go on with *b and *inv_b). */
static int
quantize_start(const float *s, Py_ssize_t dim, Py_ssize_t body, float peak, int16_t *p,
               int8_t *hi, int8_t *lo, Quantized *out, float *b, float *inv_b)
{
    float tail = peak_scalar(s + body, dim - body);
    if (tail < 0.0f)
        return -1;
    if (tail > peak)
        peak = tail;
    if (peak < TINY_PEAK) {
        quantize_degenerate(s, dim, p, hi, lo, out);
        return 1;
    }
    scale_for(peak, b, inv_b);
    return 0;
}

/* Every path's last steps once the folded lane sums of s[0, body) are known: the tail in
 * order, then the bounds. */
static void
quantize_finish(const float *s, Py_ssize_t dim, Py_ssize_t body, float b, float inv_b,
                int16_t *p, int8_t *hi, int8_t *lo, float s2, float f2, Quantized *out)
{
    for (Py_ssize_t d = body; d < dim; d++)
        quantize_element(s[d], inv_b, p, hi, lo, d, &s2, &f2);
    out->b = (double)b;
    out->s2 = inflate(s2, dim, b);
    out->f2 = inflate(f2, dim, b);
}

/* Returns 0, or -1 when the signature is not finite. Writes p. */
static int
quantize_scalar(const float *s, Py_ssize_t dim, int16_t *p, Quantized *out)
{
    float b, inv_b;
    int started = quantize_start(s, dim, 0, 0.0f, p, NULL, NULL, out, &b, &inv_b);
    if (started != 0)
        return started < 0 ? -1 : 0;
    float acc_s[16] = {0}, acc_f[16] = {0};
    const Py_ssize_t body = dim - dim % 16;
    for (Py_ssize_t d = 0; d < body; d += 16)
        for (int j = 0; j < 16; j++)
            quantize_element(s[d + j], inv_b, p, NULL, NULL, d + j, &acc_s[j], &acc_f[j]);
    quantize_finish(s, dim, body, b, inv_b, p, NULL, NULL, fold16(acc_s), fold16(acc_f), out);
    return 0;
}

/* ---------------------------------------------------------------- screening products */

/* q . p in plain C for a row of uint8 (the centroid copy) or int8 (its second level). */
static int64_t
qdot_scalar(const void *row, const int16_t *p, Py_ssize_t dim, int row_signed)
{
    const uint8_t *u = (const uint8_t *)row;
    const int8_t *v = (const int8_t *)row;
    int64_t total = 0;
    for (Py_ssize_t d = 0; d < dim; d++)
        total += (row_signed ? (int32_t)v[d] : (int32_t)u[d]) * (int32_t)p[d];
    return total;
}

/* float32 dot products: 32 running sums (lane j takes elements d = j mod 32), combined in a
 * fixed tree, then the tail in order. The AVX2 version keeps the same lanes in four vectors and
 * combines them in the same order, and neither uses FMA, so both give bit-identical results. */
static float
fdot_scalar(const float *a, const float *b, Py_ssize_t dim)
{
    float acc[32] = {0};
    Py_ssize_t d = 0;
    for (; d + 32 <= dim; d += 32)
        for (int j = 0; j < 32; j++)
            acc[j] += a[d + j] * b[d + j];
    float v[8];
    for (int j = 0; j < 8; j++)
        v[j] = (acc[j] + acc[8 + j]) + (acc[16 + j] + acc[24 + j]);
    float total = reduce8(v);
    for (; d < dim; d++)
        total += a[d] * b[d];
    return total;
}

#ifdef SIMKERNEL_X86
/* q . p on AVX2 for a row of uint8 (the centroid copy) or int8 (its second level): the row is
 * widened to int16 and vpmaddwd adds pairs of products into int32 lanes. Four independent
 * accumulators keep the multiply units busy (one ran at less than half this speed). Each
 * lane takes BLOCK / 64 = 64 pair sums of at most 2 * 255 * 8191 per block, and the four
 * accumulators together stay under 2^31 before they are summed in int64. */
__attribute__((target("avx2")))
static inline __attribute__((always_inline)) int64_t
qdot_rows_avx2(const void *row, const int16_t *p, Py_ssize_t dim, const int row_signed)
{
    const uint8_t *u = (const uint8_t *)row;
    const int8_t *v = (const int8_t *)row;
    int64_t total = 0;
    Py_ssize_t d = 0;
    while (d + 64 <= dim) {
        Py_ssize_t end = d + BLOCK < dim ? d + BLOCK : dim;
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (; d + 64 <= end; d += 64)
            for (int j = 0; j < 4; j++) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(u + d + 16 * j));
                __m256i wide = row_signed ? _mm256_cvtepi8_epi16(bytes)
                                          : _mm256_cvtepu8_epi16(bytes);
                acc[j] = _mm256_add_epi32(
                    acc[j], _mm256_madd_epi16(
                                wide, _mm256_loadu_si256((const __m256i *)(p + d + 16 * j))));
            }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes,
                            _mm256_add_epi32(_mm256_add_epi32(acc[0], acc[1]),
                                             _mm256_add_epi32(acc[2], acc[3])));
        for (int j = 0; j < 8; j++)
            total += lanes[j];
    }
    for (; d < dim; d++)
        total += (row_signed ? (int32_t)v[d] : (int32_t)u[d]) * (int32_t)p[d];
    return total;
}

__attribute__((target("avx2")))
static int64_t
qdot_avx2(const uint8_t *q, const int16_t *p, Py_ssize_t dim)
{
    return qdot_rows_avx2(q, p, dim, 0);
}

__attribute__((target("avx2")))
static int64_t
qdot2_avx2(const int8_t *q2, const int16_t *p, Py_ssize_t dim)
{
    return qdot_rows_avx2(q2, p, dim, 1);
}

__attribute__((target("avx2")))
static float
fdot_avx2(const float *a, const float *b, Py_ssize_t dim)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    Py_ssize_t d = 0;
    for (; d + 32 <= dim; d += 32) {
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d)));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(a + d + 8),
                                             _mm256_loadu_ps(b + d + 8)));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(a + d + 16),
                                             _mm256_loadu_ps(b + d + 16)));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(a + d + 24),
                                             _mm256_loadu_ps(b + d + 24)));
    }
    float v[8];
    _mm256_storeu_ps(v, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float total = reduce8(v);
    for (; d < dim; d++)
        total += a[d] * b[d];
    return total;
}

/* quantize_scalar with the 16 lanes in two 8-float vectors. */
__attribute__((target("avx2")))
static int
quantize_avx2(const float *s, Py_ssize_t dim, int16_t *p, Quantized *out)
{
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
    __m256 peak8 = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    const Py_ssize_t body = dim - dim % 16;
    for (Py_ssize_t d = 0; d < body; d += 8) {
        __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(s + d));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(m, big, _CMP_NLE_UQ));  /* NaN or inf */
        peak8 = _mm256_max_ps(peak8, m);
    }
    if (_mm256_movemask_ps(bad))
        return -1;
    float lanes[8];
    _mm256_storeu_ps(lanes, peak8);
    float peak = 0.0f;
    for (int j = 0; j < 8; j++)
        if (lanes[j] > peak)
            peak = lanes[j];
    float b, inv_b;
    int started = quantize_start(s, dim, body, peak, p, NULL, NULL, out, &b, &inv_b);
    if (started != 0)
        return started < 0 ? -1 : 0;
    const __m256 iv = _mm256_set1_ps(inv_b);
    const __m256 cap = _mm256_set1_ps(QMAX_SIGNATURE), floor_ = _mm256_set1_ps(-QMAX_SIGNATURE);
    __m256 s2a = _mm256_setzero_ps(), s2b = s2a, f2a = s2a, f2b = s2a;
    for (Py_ssize_t d = 0; d < body; d += 16) {
        __m256 x0 = _mm256_mul_ps(_mm256_loadu_ps(s + d), iv);
        __m256 x1 = _mm256_mul_ps(_mm256_loadu_ps(s + d + 8), iv);
        __m256 r0 = _mm256_round_ps(x0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r1 = _mm256_round_ps(x1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r0 = _mm256_max_ps(_mm256_min_ps(r0, cap), floor_);
        r1 = _mm256_max_ps(_mm256_min_ps(r1, cap), floor_);
        /* packs works within 128-bit halves; the permute puts elements back in order */
        __m256i packed = _mm256_packs_epi32(_mm256_cvttps_epi32(r0), _mm256_cvttps_epi32(r1));
        _mm256_storeu_si256((__m256i *)(p + d), _mm256_permute4x64_epi64(packed, 0xD8));
        __m256 e0 = _mm256_sub_ps(x0, r0), e1 = _mm256_sub_ps(x1, r1);
        s2a = _mm256_add_ps(s2a, _mm256_mul_ps(x0, x0));
        s2b = _mm256_add_ps(s2b, _mm256_mul_ps(x1, x1));
        f2a = _mm256_add_ps(f2a, _mm256_mul_ps(e0, e0));
        f2b = _mm256_add_ps(f2b, _mm256_mul_ps(e1, e1));
    }
    float acc[16];
    _mm256_storeu_ps(acc, s2a);
    _mm256_storeu_ps(acc + 8, s2b);
    float s2 = fold16(acc);
    _mm256_storeu_ps(acc, f2a);
    _mm256_storeu_ps(acc + 8, f2b);
    quantize_finish(s, dim, body, b, inv_b, p, NULL, NULL, s2, fold16(acc), out);
    return 0;
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* quantize_scalar with the 16 lanes in one vector, writing hi / lo instead of p (both screening
 * levels read only the halves on this path). */
VNNI_TARGET
static int
quantize_vnni(const float *s, Py_ssize_t dim, int8_t *hi, int8_t *lo, Quantized *out)
{
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512 peak16 = _mm512_setzero_ps();
    __mmask16 bad = 0;
    const Py_ssize_t body = dim - dim % 16;
    for (Py_ssize_t d = 0; d < body; d += 16) {
        __m512 m = _mm512_abs_ps(_mm512_loadu_ps(s + d));
        bad |= _mm512_cmp_ps_mask(m, big, _CMP_NLE_UQ);  /* NaN or inf */
        peak16 = _mm512_max_ps(peak16, m);
    }
    if (bad)
        return -1;
    float b, inv_b;
    int started = quantize_start(s, dim, body, _mm512_reduce_max_ps(peak16), NULL, hi, lo,
                                 out, &b, &inv_b);
    if (started != 0)
        return started < 0 ? -1 : 0;
    const __m512 iv = _mm512_set1_ps(inv_b);
    const __m512 cap = _mm512_set1_ps(QMAX_SIGNATURE), floor_ = _mm512_set1_ps(-QMAX_SIGNATURE);
    const __m512i low7 = _mm512_set1_epi32(127);
    __m512 s2v = _mm512_setzero_ps(), f2v = s2v;
    for (Py_ssize_t d = 0; d < body; d += 16) {
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + d), iv);
        __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_max_ps(_mm512_min_ps(r, cap), floor_);
        __m512i level = _mm512_cvttps_epi32(r);
        _mm_storeu_si128((__m128i *)(hi + d),
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_srai_epi32(level, 7),
                                                               _mm512_set1_epi32(64))));
        _mm_storeu_si128((__m128i *)(lo + d),
                         _mm512_cvtepi32_epi8(_mm512_and_si512(level, low7)));
        __m512 e = _mm512_sub_ps(x, r);
        s2v = _mm512_add_ps(s2v, _mm512_mul_ps(x, x));
        f2v = _mm512_add_ps(f2v, _mm512_mul_ps(e, e));
    }
    float acc[16];
    _mm512_storeu_ps(acc, s2v);
    float s2 = fold16(acc);
    _mm512_storeu_ps(acc, f2v);
    quantize_finish(s, dim, body, b, inv_b, NULL, hi, lo, s2, fold16(acc), out);
    return 0;
}

/* Sum of 16 int32 lanes, in int64. */
VNNI_TARGET
static inline int64_t
lanes_i64(__m512i v)
{
    __m512i wide = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
    return _mm512_reduce_add_epi64(wide);
}

/* Raw sums of n rows (n is 1 or 4, a constant once inlined) against the signature's halves,
 * each signature chunk loaded once for all n rows; the last partial chunk is read with a byte
 * mask rather than a scalar loop. vpdpbusd multiplies unsigned by signed bytes: the halves
 * (hi + 64 and lo, both in [0, 127]) fit either role, so the uint8 centroid copy goes in as the
 * unsigned operand (rows_unsigned) and the int8 second level as the signed one. */
VNNI_TARGET
static inline __attribute__((always_inline)) void
dot_rows_vnni(const int8_t *const rows[4], const int n, const int rows_unsigned, Py_ssize_t dim,
              const int8_t *hi64, const int8_t *lo, int64_t *out_hi, int64_t *out_lo)
{
    int64_t total_hi[4] = {0, 0, 0, 0}, total_lo[4] = {0, 0, 0, 0};
    for (Py_ssize_t start = 0; start < dim; start += VNNI_BLOCK) {
        const Py_ssize_t end = start + VNNI_BLOCK < dim ? start + VNNI_BLOCK : dim;
        __m512i ah[4], al[4];
        for (int r = 0; r < n; r++) {
            ah[r] = _mm512_setzero_si512();
            al[r] = _mm512_setzero_si512();
        }
        for (Py_ssize_t d = start; d < end; d += 64) {
            /* a full chunk, or the last partial one under a byte mask */
            const __mmask64 mask = end - d >= 64 ? ~(__mmask64)0
                                                 : ((__mmask64)1 << (end - d)) - 1;
            const __m512i ph = _mm512_maskz_loadu_epi8(mask, hi64 + d);
            const __m512i pl = _mm512_maskz_loadu_epi8(mask, lo + d);
            for (int r = 0; r < n; r++) {
                const __m512i x = _mm512_maskz_loadu_epi8(mask, rows[r] + d);
                if (rows_unsigned) {
                    ah[r] = _mm512_dpbusd_epi32(ah[r], x, ph);
                    al[r] = _mm512_dpbusd_epi32(al[r], x, pl);
                } else {
                    ah[r] = _mm512_dpbusd_epi32(ah[r], ph, x);
                    al[r] = _mm512_dpbusd_epi32(al[r], pl, x);
                }
            }
        }
        for (int r = 0; r < n; r++) {
            total_hi[r] += lanes_i64(ah[r]);
            total_lo[r] += lanes_i64(al[r]);
        }
    }
    for (int r = 0; r < n; r++) {
        out_hi[r] = total_hi[r];
        out_lo[r] = total_lo[r];
    }
}

/* x_k . p for the rows ks (n of them; row k at base + k * dim) from the raw sums:
 * x . p = 128 (x . hi) + x . lo, and x . hi = x . (hi + 64) - 64 sum(x). */
VNNI_TARGET
static void
dot_many_vnni(const int8_t *base, const int64_t *row_sums, const int rows_unsigned,
              const Py_ssize_t *ks, Py_ssize_t n, Py_ssize_t dim, const int8_t *hi64,
              const int8_t *lo, int64_t *out)
{
    int64_t h[4], l[4];
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const int8_t *rows[4] = {base + ks[i] * dim, base + ks[i + 1] * dim,
                                 base + ks[i + 2] * dim, base + ks[i + 3] * dim};
        if (rows_unsigned)
            dot_rows_vnni(rows, 4, 1, dim, hi64, lo, h, l);
        else
            dot_rows_vnni(rows, 4, 0, dim, hi64, lo, h, l);
        for (int r = 0; r < 4; r++)
            out[i + r] = 128 * (h[r] - 64 * row_sums[ks[i + r]]) + l[r];
    }
    for (; i < n; i++) {
        const int8_t *rows[4] = {base + ks[i] * dim, NULL, NULL, NULL};
        if (rows_unsigned)
            dot_rows_vnni(rows, 1, 1, dim, hi64, lo, h, l);
        else
            dot_rows_vnni(rows, 1, 0, dim, hi64, lo, h, l);
        out[i] = 128 * (h[0] - 64 * row_sums[ks[i]]) + l[0];
    }
}

/* fdot_avx2 for four rows at once (the signature is loaded once for all four, and four rows
 * stream in parallel): the same 32 lanes per row, as two 16-float vectors, folded in the same
 * order, so each result is bit-identical to fdot_avx2's. */
VNNI_TARGET
static void
fdot4_avx512(const float *const rows[4], const float *s, Py_ssize_t dim, float out[4])
{
    __m512 lo[4], hi[4];
    for (int r = 0; r < 4; r++) {
        lo[r] = _mm512_setzero_ps();
        hi[r] = _mm512_setzero_ps();
    }
    Py_ssize_t d = 0;
    for (; d + 32 <= dim; d += 32) {
        const __m512 s0 = _mm512_loadu_ps(s + d), s1 = _mm512_loadu_ps(s + d + 16);
        for (int r = 0; r < 4; r++) {
            lo[r] = _mm512_add_ps(lo[r], _mm512_mul_ps(_mm512_loadu_ps(rows[r] + d), s0));
            hi[r] = _mm512_add_ps(hi[r], _mm512_mul_ps(_mm512_loadu_ps(rows[r] + d + 16), s1));
        }
    }
    for (int r = 0; r < 4; r++) {
        /* (a0 + a1) + (a2 + a3) of fdot_avx2, with a0 | a1 = lo and a2 | a3 = hi */
        __m256 a01 = _mm256_add_ps(_mm512_castps512_ps256(lo[r]),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                       _mm512_castps_pd(lo[r]), 1)));
        __m256 a23 = _mm256_add_ps(_mm512_castps512_ps256(hi[r]),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                       _mm512_castps_pd(hi[r]), 1)));
        float v[8];
        _mm256_storeu_ps(v, _mm256_add_ps(a01, a23));
        float total = reduce8(v);
        for (Py_ssize_t t = d; t < dim; t++)
            total += rows[r][t] * s[t];
        out[r] = total;
    }
}
#endif


/* q2_k . p for the zones ks, into out. */
static void
qdot2_many(const Index *self, const Py_ssize_t *ks, Py_ssize_t n, int64_t *out)
{
#ifdef SIMKERNEL_X86
    if (self->use_vnni) {
        dot_many_vnni(self->q2, self->q2_sums, 0, ks, n, self->dim, self->p_hi, self->p_lo, out);
        return;
    }
    if (self->use_avx2) {
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = qdot2_avx2(self->q2 + ks[i] * self->dim, self->p, self->dim);
        return;
    }
#endif
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = qdot_scalar(self->q2 + ks[i] * self->dim, self->p, self->dim, 1);
}

/* Quantize the signature and compute q_k . p for every row into self->sums. Returns 0, or -1
 * when the signature is not finite. */
static int
screen(Index *self, const float *s, Quantized *out)
{
    const Py_ssize_t dim = self->dim, rows = self->rows;
#ifdef SIMKERNEL_X86
    if (self->use_vnni) {
        if (quantize_vnni(s, dim, self->p_hi, self->p_lo, out) < 0)
            return -1;
        dot_many_vnni((const int8_t *)self->q, self->q_sums, 1, self->all_rows, rows, dim,
                      self->p_hi, self->p_lo, self->sums);
        return 0;
    }
    if (self->use_avx2) {
        if (quantize_avx2(s, dim, self->p, out) < 0)
            return -1;
        for (Py_ssize_t k = 0; k < rows; k++)
            self->sums[k] = qdot_avx2(self->q + k * dim, self->p, dim);
        return 0;
    }
#endif
    if (quantize_scalar(s, dim, self->p, out) < 0)
        return -1;
    for (Py_ssize_t k = 0; k < rows; k++)
        self->sums[k] = qdot_scalar(self->q + k * dim, self->p, dim, 0);
    return 0;
}

static float
fdot(const Index *self, const float *row, const float *s)
{
#ifdef SIMKERNEL_X86
    if (self->use_avx2)
        return fdot_avx2(row, s, self->dim);
#endif
    return fdot_scalar(row, s, self->dim);
}

/* out[i] = fdot of row ks[i], for n rows: four at a time where AVX-512 is there (same
 * results; independent rows stream in parallel, ~2x the throughput of one at a time). */
static void
fdot_many(const Index *self, const float *s, const Py_ssize_t *ks, Py_ssize_t n, float *out)
{
    Py_ssize_t i = 0;
#ifdef SIMKERNEL_X86
    if (self->use_vnni)
        for (; i + 4 <= n; i += 4) {
            const float *rows[4] = {
                self->exact + ks[i] * self->dim, self->exact + ks[i + 1] * self->dim,
                self->exact + ks[i + 2] * self->dim, self->exact + ks[i + 3] * self->dim,
            };
            fdot4_avx512(rows, s, self->dim, out + i);
        }
#endif
    for (; i < n; i++)
        out[i] = fdot(self, self->exact + ks[i] * self->dim, s);
}

/* ---------------------------------------------------------------- object */

/* Frees every buffer and leaves the pointers NULL (dealloc, and __init__ called again). */
static void
free_buffers(Index *self)
{
    void **buffers[] = {
        (void **)&self->q, (void **)&self->exact, (void **)&self->scale,
        (void **)&self->err_norm, (void **)&self->deq_norm, (void **)&self->p,
        (void **)&self->p_hi, (void **)&self->p_lo, (void **)&self->sums, (void **)&self->hi,
        (void **)&self->lo, (void **)&self->xval, (void **)&self->zload, (void **)&self->flags,
        (void **)&self->q2, (void **)&self->scale2, (void **)&self->err2_norm,
        (void **)&self->deq2_norm, (void **)&self->q_sums, (void **)&self->q2_sums,
        (void **)&self->all_rows,
        (void **)&self->top, (void **)&self->values, (void **)&self->picked,
        (void **)&self->band, (void **)&self->positions, (void **)&self->zoneless,
        (void **)&self->seen,
    };
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) {
        PyMem_Free(*buffers[i]);
        *buffers[i] = NULL;
    }
    Py_CLEAR(self->ids);
}

static void
Index_dealloc(Index *self)
{
    free_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* |row - deq| and |deq| for deq = a q (+ a2 q2 when q2 is given): the residual and
 * dequantized norms one screening level's bound needs. */
static void
residual_norms(const float *row, Py_ssize_t dim, double a, const uint8_t *q, double a2,
               const int8_t *q2, double *err_norm, double *deq_norm)
{
    double err2 = 0.0, deq2 = 0.0;
    for (Py_ssize_t d = 0; d < dim; d++) {
        double deq = a * (double)q[d] + (q2 ? a2 * (double)q2[d] : 0.0);
        double err = (double)row[d] - deq;
        err2 += err * err;
        deq2 += deq * deq;
    }
    *err_norm = sqrt(err2);
    *deq_norm = sqrt(deq2);
}

/* Index(centroids: C-contiguous float32 buffer, rows: int, dim: int, isa="auto"|"avx2"|"scalar").
 * "avx2" / "scalar" cap the instruction set (tests compare them: the results are identical). Centroids must be finite
 * and non-negative (zone centroids are means of non-negative signatures); the caller checks and
 * uses its numpy path otherwise. */
static int
Index_init(Index *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"centroids", "rows", "dim", "isa", NULL};
    Py_buffer view;
    Py_ssize_t rows, dim;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*nn|s", kwlist, &view, &rows, &dim, &isa))
        return -1;
    if (strcmp(isa, "auto") != 0 && strcmp(isa, "avx2") != 0 && strcmp(isa, "scalar") != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "isa must be 'auto', 'avx2' or 'scalar'");
        return -1;
    }
    if (rows < 0 || dim < 1 || view.len != rows * dim * (Py_ssize_t)sizeof(float)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "centroids buffer does not hold rows x dim float32");
        return -1;
    }
    free_buffers(self);  /* __init__ may be called again: start over */
    Py_ssize_t cells = rows * dim;
    size_t nrows = (size_t)(rows > 0 ? rows : 1);
    self->rows = rows;
    self->dim = dim;
    self->q = PyMem_Malloc((size_t)(cells > 0 ? cells : 1));
    self->exact = PyMem_Malloc(sizeof(float) * (size_t)(cells > 0 ? cells : 1));
    self->scale = PyMem_Malloc(sizeof(double) * nrows);
    self->err_norm = PyMem_Malloc(sizeof(double) * nrows);
    self->deq_norm = PyMem_Malloc(sizeof(double) * nrows);
    self->p = PyMem_Malloc(sizeof(int16_t) * (size_t)dim);
    self->p_hi = PyMem_Malloc((size_t)dim);
    self->p_lo = PyMem_Malloc((size_t)dim);
    self->sums = PyMem_Malloc(sizeof(int64_t) * nrows);
    self->hi = PyMem_Malloc(sizeof(double) * nrows);
    self->lo = PyMem_Malloc(sizeof(double) * nrows);
    self->xval = PyMem_Malloc(sizeof(double) * nrows);
    self->zload = PyMem_Malloc(sizeof(long) * nrows);
    self->flags = PyMem_Malloc(nrows);
    self->q2 = PyMem_Malloc((size_t)(cells > 0 ? cells : 1));
    self->scale2 = PyMem_Malloc(sizeof(double) * nrows);
    self->err2_norm = PyMem_Malloc(sizeof(double) * nrows);
    self->deq2_norm = PyMem_Malloc(sizeof(double) * nrows);
    self->q_sums = PyMem_Malloc(sizeof(int64_t) * nrows);
    self->q2_sums = PyMem_Malloc(sizeof(int64_t) * nrows);
    self->all_rows = PyMem_Malloc(sizeof(Py_ssize_t) * nrows);
    self->top = PyMem_Malloc(sizeof(double) * nrows);
    self->values = PyMem_Malloc(sizeof(double) * nrows);
    self->picked = PyMem_Malloc(sizeof(Py_ssize_t) * nrows);
    self->band = PyMem_Malloc(sizeof(Py_ssize_t) * nrows);
    if (!self->q || !self->exact || !self->scale || !self->err_norm || !self->deq_norm ||
        !self->p || !self->p_hi || !self->p_lo || !self->sums || !self->hi || !self->top ||
        !self->lo || !self->xval || !self->zload || !self->flags || !self->q2 ||
        !self->scale2 || !self->err2_norm || !self->deq2_norm || !self->q_sums ||
        !self->q2_sums || !self->all_rows ||
        !self->values || !self->picked || !self->band) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(self->exact, view.buf, sizeof(float) * (size_t)cells);
    PyBuffer_Release(&view);
    for (Py_ssize_t k = 0; k < rows; k++) {
        const float *row = self->exact + k * dim;
        float top = 0.0f;
        for (Py_ssize_t d = 0; d < dim; d++) {
            if (!(row[d] >= 0.0f) || !isfinite(row[d])) {
                PyErr_SetString(PyExc_ValueError, "centroids must be finite and non-negative");
                return -1;
            }
            if (row[d] > top)
                top = row[d];
        }
        /* The first level: the row to uint8 with its own scale. */
        double a = (double)top / 255.0;
        uint8_t *qrow = self->q + k * dim;
        for (Py_ssize_t d = 0; d < dim; d++) {
            long level = a > 0.0 ? lround((double)row[d] / a) : 0;
            qrow[d] = (uint8_t)(level > 255 ? 255 : level);
        }
        self->scale[k] = a;
        residual_norms(row, dim, a, qrow, 0.0, NULL, &self->err_norm[k], &self->deq_norm[k]);
        /* The second level: what the uint8 copy misses, to int8 with its own scale. */
        double top2 = 0.0;
        for (Py_ssize_t d = 0; d < dim; d++) {
            double r = fabs((double)row[d] - a * (double)qrow[d]);
            if (r > top2)
                top2 = r;
        }
        double a2 = top2 / 127.0;
        int8_t *q2row = self->q2 + k * dim;
        for (Py_ssize_t d = 0; d < dim; d++) {
            double r = (double)row[d] - a * (double)qrow[d];
            long level = a2 > 0.0 ? lround(r / a2) : 0;
            q2row[d] = (int8_t)(level > 127 ? 127 : (level < -127 ? -127 : level));
        }
        self->scale2[k] = a2;
        residual_norms(row, dim, a, qrow, a2, q2row, &self->err2_norm[k], &self->deq2_norm[k]);
        int64_t sum = 0, sum2 = 0;
        for (Py_ssize_t d = 0; d < dim; d++) {
            sum += qrow[d];
            sum2 += q2row[d];
        }
        self->q_sums[k] = sum;
        self->q2_sums[k] = sum2;
        self->all_rows[k] = k;
    }
    /* fdot sums 32 lanes of dim / 32 products each, folds them in five levels and adds a tail of
     * fewer than 32: no result passes through more than dim / 32 + 40 roundings of 2^-24, each
     * relative to at most sum |c_d s_d| <= |c_k| |s|. Doubled for slack. */
    self->rel = 2.0 * ((double)dim / 32.0 + 40.0) * 5.960464477539063e-08 + 1e-12;
    self->use_avx2 = 0;
    self->use_vnni = 0;
#ifdef SIMKERNEL_X86
    __builtin_cpu_init();
    self->use_avx2 = (strcmp(isa, "scalar") != 0 && __builtin_cpu_supports("avx2")) ? 1 : 0;
    self->use_vnni = (strcmp(isa, "auto") == 0 && self->use_avx2 &&
                      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vnni")) ? 1 : 0;
#endif
    return 0;
}

/* The half-width of a zone's interval around its coarse value, for a quantized centroid whose
 * residual has norm `err` and whose dequantized row has norm `deq`: Cauchy-Schwarz on both
 * residuals, fdot's rounding (self->rel, relative to |c_k| |s| <= (deq + err) |s|), and an
 * absolute 1e-9 for the double arithmetic of the coarse value. */
static double
margin(const Index *self, double err, double deq)
{
    return err * self->cur_s_norm + deq * self->cur_f_norm +
           self->rel * (deq + err) * self->cur_s_norm + 1e-9;
}

#define VISIT_NOT_FINITE (-1)
#define VISIT_HAND_BACK (-2)

/* Screen every zone, then visit the zones that can matter (see the top of this file), leaving
 * them in self->picked / self->values sorted by descending similarity, ties by ascending zone.
 * Returns how many, VISIT_NOT_FINITE when the signature has a NaN or inf, or VISIT_HAND_BACK when
 * more than half of the zones (of at least 8) may lie within tau of the best: visiting them one
 * by one would cost more than one product over all of them. The screening intervals are left in
 * self->lo / self->hi either way (`choose_by_load` uses them after a hand-back). */
/* Screen the signature and leave the first level's interval of every zone in self->lo /
 * self->hi (the integer sums are exact). Returns 0, or VISIT_NOT_FINITE. */
static int
screen_intervals(Index *self, const float *s)
{
    Quantized quant;
    if (screen(self, s, &quant) < 0)
        return VISIT_NOT_FINITE;
    self->cur_b = quant.b;
    self->cur_s_norm = sqrt(quant.s2);
    self->cur_f_norm = sqrt(quant.f2);
    for (Py_ssize_t k = 0; k < self->rows; k++) {
        double coarse = self->scale[k] * quant.b * (double)self->sums[k];
        double eps = margin(self, self->err_norm[k], self->deq_norm[k]);
        self->hi[k] = coarse + eps;
        self->lo[k] = coarse - eps;
    }
    return 0;
}

static Py_ssize_t
visit(Index *self, const float *s, double tau, Py_ssize_t depth)
{
    const Py_ssize_t dim = self->dim, rows = self->rows;

    if (screen_intervals(self, s) < 0)
        return VISIT_NOT_FINITE;
    double best_lo = -INFINITY;
    for (Py_ssize_t k = 0; k < rows; k++)
        if (self->lo[k] > best_lo)
            best_lo = self->lo[k];
    Py_ssize_t near = 0;
    for (Py_ssize_t k = 0; k < rows; k++)
        if (self->hi[k] >= best_lo - tau)
            near++;
    if (rows >= 8 && 2 * near > rows)
        return VISIT_HAND_BACK;

    /* Exact pass, zones in descending upper bound. The threshold T is a lower bound on both
     * s* - tau and the depth-th largest similarity, tightened by every exact value found, so
     * it only rises; once the next upper bound is below it, no remaining zone can matter. */
    Py_ssize_t *picked = self->picked;
    double *values = self->values;
    const int limited = depth >= 1 && depth <= rows;
    double *top = self->top;  /* the depth largest exact values so far, descending */
    Py_ssize_t found = 0;
    double best = -INFINITY;
    for (Py_ssize_t step = 0; step < rows; step++) {
        Py_ssize_t k = -1;
        for (Py_ssize_t j = 0; j < rows; j++)  /* next unvisited zone by upper bound */
            if (self->hi[j] != INFINITY && (k < 0 || self->hi[j] > self->hi[k]))
                k = j;
        if (k < 0)
            break;
        double threshold = -INFINITY;
        if (limited && found >= depth) {
            threshold = best - tau;
            if (top[depth - 1] < threshold)
                threshold = top[depth - 1];
        }
        if (self->hi[k] < threshold)
            break;
        self->hi[k] = INFINITY;  /* visited */
        float exact = fdot(self, self->exact + k * dim, s);
        double v = (double)exact;
        if (v > best)
            best = v;
        if (limited) {  /* insert into the running top-depth list */
            Py_ssize_t n = found < depth ? found + 1 : depth, i = n - 1;
            if (found < depth || v > top[depth - 1]) {
                while (i > 0 && top[i - 1] < v) {
                    top[i] = top[i - 1];
                    i--;
                }
                top[i] = v;
            }
        }
        /* keep (picked, values) sorted by descending similarity, ties by ascending zone */
        Py_ssize_t i = found;
        while (i > 0 && (values[i - 1] < v || (values[i - 1] == v && picked[i - 1] > k))) {
            values[i] = values[i - 1];
            picked[i] = picked[i - 1];
            i--;
        }
        values[i] = v;
        picked[i] = k;
        found++;
    }
    return found;
}

/* `arg` as a C-contiguous buffer of n float32, or -1 with ValueError(message). */
static int
get_floats(PyObject *arg, Py_ssize_t n, const char *message, Py_buffer *view)
{
    if (PyObject_GetBuffer(arg, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->len != n * (Py_ssize_t)sizeof(float) || view->format == NULL ||
        strcmp(view->format, "f") != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, message);
        return -1;
    }
    return 0;
}

/* The signature argument as a float32 buffer of the table's dimension. */
static int
get_signature(Index *self, PyObject *arg, Py_buffer *view)
{
    return get_floats(arg, self->dim, "signature must be float32 of the table's dimension", view);
}

/* candidates(signature, tau, rank_depth) -> (negated similarities, zones) | None | False
 *
 * signature: C-contiguous float32 buffer of length dim. rank_depth: min candidates x the most
 * zones one worker serves. Returns the zones (row indices) that can affect the band decision,
 * most similar first with ties in zone order, and their exact float32 similarities NEGATED (the
 * ascending list gateway/band.py walks), as Python lists; None when the signature is not
 * finite; False when the caller's full product is cheaper (see `visit`). */
static PyObject *
Index_candidates(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "candidates(signature, tau, rank_depth)");
        return NULL;
    }
    double tau = PyFloat_AsDouble(args[1]);
    if (tau == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t depth = PyLong_AsSsize_t(args[2]);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (get_signature(self, args[0], &view) < 0)
        return NULL;
    Py_ssize_t found = visit(self, (const float *)view.buf, tau, depth);
    PyBuffer_Release(&view);
    if (found == VISIT_NOT_FINITE)
        Py_RETURN_NONE;
    if (found == VISIT_HAND_BACK)
        Py_RETURN_FALSE;
    PyObject *zones = PyList_New(found), *sims = PyList_New(found);
    if (!zones || !sims)
        goto fail;
    for (Py_ssize_t i = 0; i < found; i++) {
        PyObject *zk = PyLong_FromSsize_t(self->picked[i]);
        PyObject *sk = PyFloat_FromDouble(-self->values[i]);
        if (!zk || !sk) {
            Py_XDECREF(zk);
            Py_XDECREF(sk);
            goto fail;
        }
        PyList_SET_ITEM(zones, i, zk);
        PyList_SET_ITEM(sims, i, sk);
    }
    return Py_BuildValue("(NN)", sims, zones);

fail:
    Py_XDECREF(zones);
    Py_XDECREF(sims);
    return NULL;
}

/* set_workers(positions, zoneless, candidates, ids=None): which candidate serves each row
 * (zone) of this index, which candidates serve no zone, how many candidates there are, and
 * optionally each candidate's worker id (a tuple of str, for `matches`). Needed by choose. */
static PyObject *
Index_set_workers(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 3 && nargs != 4) || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "set_workers(positions: tuple, zoneless: tuple, candidates, ids=None)");
        return NULL;
    }
    Py_ssize_t candidates = PyLong_AsSsize_t(args[2]);
    if (candidates == -1 && PyErr_Occurred())
        return NULL;
    PyObject *ids = nargs == 4 ? args[3] : Py_None;
    if (ids != Py_None) {
        if (!PyTuple_Check(ids) || PyTuple_GET_SIZE(ids) != candidates) {
            PyErr_SetString(PyExc_ValueError, "ids must be a tuple with one id per candidate");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < candidates; i++)
            if (!PyUnicode_Check(PyTuple_GET_ITEM(ids, i))) {
                PyErr_SetString(PyExc_TypeError, "ids must be str");
                return NULL;
            }
    }
    Py_ssize_t npos = PyTuple_GET_SIZE(args[0]), nzl = PyTuple_GET_SIZE(args[1]);
    if (npos != self->rows || candidates < 0) {
        PyErr_SetString(PyExc_ValueError, "one position per zone row is needed");
        return NULL;
    }
    Py_ssize_t *positions = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(npos + 1));
    Py_ssize_t *zoneless = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(nzl + 1));
    unsigned char *seen = PyMem_Malloc((size_t)candidates + 1);
    if (!positions || !zoneless || !seen) {
        PyMem_Free(positions);
        PyMem_Free(zoneless);
        PyMem_Free(seen);
        return PyErr_NoMemory();
    }
    for (int which = 0; which < 2; which++) {
        PyObject *tuple = args[which];
        Py_ssize_t *out = which == 0 ? positions : zoneless;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
            Py_ssize_t v = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, i));
            if (v == -1 && PyErr_Occurred())
                goto bad;
            if (v < 0 || v >= candidates) {
                PyErr_SetString(PyExc_ValueError, "candidate position out of range");
                goto bad;
            }
            out[i] = v;
        }
    }
    Py_ssize_t most = 1;  /* rank_depth: the most rows one candidate serves */
    Py_ssize_t *counts = PyMem_Calloc((size_t)candidates + 1, sizeof(Py_ssize_t));
    if (!counts) {
        PyErr_NoMemory();
        goto bad;
    }
    for (Py_ssize_t i = 0; i < npos; i++)
        if (++counts[positions[i]] > most)
            most = counts[positions[i]];
    PyMem_Free(counts);
    PyMem_Free(self->positions);
    PyMem_Free(self->zoneless);
    PyMem_Free(self->seen);
    self->rank_depth = most;
    self->positions = positions;
    self->zoneless = zoneless;
    self->seen = seen;
    self->n_zoneless = nzl;
    self->n_candidates = candidates;
    Py_XINCREF(ids == Py_None ? NULL : ids);
    Py_XSETREF(self->ids, ids == Py_None ? NULL : ids);
    Py_RETURN_NONE;

bad:
    PyMem_Free(positions);
    PyMem_Free(zoneless);
    PyMem_Free(seen);
    return NULL;
}

/* Interned attribute names, set at module init. */
static PyObject *str_worker_id, *str_in_flight;

/* Reading `worker_id` / `in_flight` of 64 WorkerViews per decision through PyObject_GetAttr
 * cost ~1.3 us each time (a type lookup and a descriptor call per object). WorkerView is a
 * slots dataclass, so each is a member descriptor over a fixed offset: the offset is looked up
 * once per type (and again if the type is modified, which changes its version tag) and the
 * slot read directly, exactly what generic attribute access would return. Anything else (a
 * subclass, a property, a plain object, an unset slot) takes PyObject_GetAttr. */
typedef struct {
    PyTypeObject *type;    /* compared by identity only */
    unsigned int version;  /* its tp_version_tag when resolved */
    Py_ssize_t offset;     /* -1: not a plain object slot */
} SlotCache;

static SlotCache worker_id_slot, in_flight_slot;

/* A new reference to obj.name, or NULL with an exception set. */
static PyObject *
get_attr(PyObject *obj, PyObject *name, SlotCache *cache)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp != cache->type || !(tp->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ||
        tp->tp_version_tag != cache->version) {
        cache->type = NULL;
        cache->offset = -1;
        if (tp->tp_getattro == PyObject_GenericGetAttr) {
            PyObject *descr = _PyType_Lookup(tp, name);  /* borrowed; assigns a version tag */
            if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
                PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
                if (member->type == T_OBJECT_EX)
                    cache->offset = member->offset;
            }
        }
        if (tp->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) {
            cache->type = tp;
            cache->version = tp->tp_version_tag;
        }
    }
    if (cache->type == tp && cache->offset >= 0) {
        PyObject *value = *(PyObject **)((char *)obj + cache->offset);
        if (value != NULL)
            return Py_NewRef(value);
    }
    return PyObject_GetAttr(obj, name);
}

/* matches(candidates: list) -> bool: whether the list has one object per candidate whose
 * `worker_id` is the id given to set_workers, in order. Callers keep one index per available
 * worker list and ask this on every decision, so it is a pointer comparison per candidate in the
 * common case (the registry hands out the same str objects); equal strings also match. */
static PyObject *
Index_matches(Index *self, PyObject *candidates)
{
    if (self->ids == NULL || !PyList_Check(candidates) ||
        PyList_GET_SIZE(candidates) != self->n_candidates)
        Py_RETURN_FALSE;
    for (Py_ssize_t i = 0; i < self->n_candidates; i++) {
        PyObject *wid = get_attr(PyList_GET_ITEM(candidates, i), str_worker_id, &worker_id_slot);
        if (wid == NULL)
            return NULL;
        PyObject *want = PyTuple_GET_ITEM(self->ids, i);
        int same = wid == want;
        if (!same) {
            same = PyUnicode_Check(wid) ? PyUnicode_Compare(wid, want) == 0 : 0;
            if (PyErr_Occurred()) {
                Py_DECREF(wid);
                return NULL;
            }
        }
        Py_DECREF(wid);
        if (!same)
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* The load of candidate `position`: the list item itself when it is an int, else its
 * `in_flight` attribute (a WorkerView). Only band members and zone-less candidates are read. */
static int
load_at(PyObject *in_flight, Py_ssize_t position, long *out)
{
    PyObject *item = PyList_GET_ITEM(in_flight, position);
    long v;
    if (PyLong_Check(item)) {
        v = PyLong_AsLong(item);
    } else {
        PyObject *attr = get_attr(item, str_in_flight, &in_flight_slot);
        if (attr == NULL)
            return -1;
        v = PyLong_AsLong(attr);
        Py_DECREF(attr);
    }
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* Parsed (in_flight, tau, min_candidates) of choose / choose_all. */
typedef struct {
    PyObject *in_flight;
    double tau;
    Py_ssize_t min_candidates;
} ChooseArgs;

static int
parse_choose(Index *self, PyObject *const *args, Py_ssize_t nargs, const char *usage,
             ChooseArgs *out)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (self->positions == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "choose needs set_workers first");
        return -1;
    }
    out->in_flight = args[1];
    if (!PyList_Check(out->in_flight) || PyList_GET_SIZE(out->in_flight) != self->n_candidates) {
        PyErr_SetString(PyExc_ValueError, "in_flight must be a list with one item per candidate");
        return -1;
    }
    out->tau = PyFloat_AsDouble(args[2]);
    if (out->tau == -1.0 && PyErr_Occurred())
        return -1;
    out->min_candidates = PyLong_AsSsize_t(args[3]);
    if (out->min_candidates == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

static PyObject *walk_band(Index *self, Py_ssize_t found, const ChooseArgs *a);
static PyObject *choose_by_load(Index *self, const float *s, const ChooseArgs *a);

/* choose(signature, in_flight, tau, min_candidates)
 *     -> (position, row, band_size, rank, similarity) | None | False
 *
 * gateway/band.py `choose` (the band, min-candidates, least in-flight with ties to the more
 * similar then lower zone, zone-less overflow) over the visited zones, in one call. `row` is -1
 * (and rank 0, similarity NaN) when a zone-less candidate is chosen. None: signature not finite;
 * False: hand back to the full product (see `visit`). in_flight: a list with one item per
 * candidate, each an int or an object with an int `in_flight` attribute. */
static PyObject *
Index_choose(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    ChooseArgs a;
    if (parse_choose(self, args, nargs, "choose(signature, in_flight, tau, min_candidates)",
                     &a) < 0)
        return NULL;
    Py_buffer view;
    if (get_signature(self, args[0], &view) < 0)
        return NULL;
    Py_ssize_t depth = a.min_candidates * self->rank_depth;
    Py_ssize_t found = visit(self, (const float *)view.buf, a.tau, depth);
    PyObject *result;
    if (found == VISIT_NOT_FINITE || found == 0)
        result = Py_NewRef(Py_None);
    else if (found == VISIT_HAND_BACK)
        result = choose_by_load(self, (const float *)view.buf, &a);
    else
        result = walk_band(self, found, &a);
    PyBuffer_Release(&view);
    return result;
}

/* choose_all(negated_similarities, in_flight, tau, min_candidates) -> as choose, never False
 *
 * The same decision from similarities the caller computed for every zone (the one-sgemv path
 * `choose` hands unstructured signatures to): a float32 buffer of -s_k, one per row. Sorting
 * and walking 64 zones here costs a few microseconds; in Python it cost ~15. A NaN
 * similarity is never admitted; None when none is finite. */
static PyObject *
Index_choose_all(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    ChooseArgs a;
    if (parse_choose(self, args, nargs,
                     "choose_all(negated_similarities, in_flight, tau, min_candidates)", &a) < 0)
        return NULL;
    Py_buffer view;
    if (get_floats(args[0], self->rows, "similarities must be float32, one per zone row",
                   &view) < 0)
        return NULL;
    const float *neg = (const float *)view.buf;
    double *values = self->values;
    Py_ssize_t *picked = self->picked;
    for (Py_ssize_t k = 0; k < self->rows; k++) {  /* insertion: descending, ties by zone */
        double v = -(double)neg[k];
        if (isnan(v))
            v = -INFINITY;
        Py_ssize_t i = k;
        while (i > 0 && values[i - 1] < v) {
            values[i] = values[i - 1];
            picked[i] = picked[i - 1];
            i--;
        }
        values[i] = v;
        picked[i] = k;
    }
    PyBuffer_Release(&view);
    if (self->rows == 0 || !isfinite(values[0]))
        Py_RETURN_NONE;
    return walk_band(self, self->rows, &a);
}

/* The band walk over the first `found` entries of (values, picked), as band.py does it in
 * Python floats on negated similarities. */
static PyObject *
walk_band(Index *self, Py_ssize_t found, const ChooseArgs *a)
{
    PyObject *in_flight = a->in_flight;
    const double tau = a->tau;
    const Py_ssize_t min_candidates = a->min_candidates;
    const double *values = self->values;
    const Py_ssize_t *picked = self->picked;
    const double limit = tau + (-values[0]);
    memset(self->seen, 0, (size_t)self->n_candidates);
    Py_ssize_t workers = 0, j = 0, band_len = 0;
    Py_ssize_t *band = self->band;
    while (j < found && -values[j] <= limit) {
        Py_ssize_t pos = self->positions[picked[j]];
        band[band_len++] = j;
        if (!self->seen[pos]) {
            self->seen[pos] = 1;
            workers++;
        }
        j++;
    }
    while (workers < min_candidates && j < found && isfinite(values[j])) {
        Py_ssize_t pos = self->positions[picked[j]];
        if (!self->seen[pos]) {
            band[band_len++] = j;
            self->seen[pos] = 1;
            workers++;
        }
        j++;
    }
    long chosen_load = 0;
    Py_ssize_t best_j = -1;
    for (Py_ssize_t i = 0; i < band_len; i++) {
        long load;
        if (load_at(in_flight, self->positions[picked[band[i]]], &load) < 0)
            return NULL;
        if (best_j < 0 || load < chosen_load) {
            chosen_load = load;
            best_j = band[i];
        }
    }
    Py_ssize_t overflow = -1;
    for (Py_ssize_t i = 0; i < self->n_zoneless; i++) {
        long load;
        if (load_at(in_flight, self->zoneless[i], &load) < 0)
            return NULL;
        if (load < chosen_load) {
            chosen_load = load;
            overflow = self->zoneless[i];
        }
    }
    Py_ssize_t band_size = workers + self->n_zoneless;
    if (overflow >= 0)
        return Py_BuildValue("(nnnnd)", overflow, (Py_ssize_t)-1, band_size, (Py_ssize_t)0,
                             Py_NAN);
    Py_ssize_t rank = 1;  /* zones strictly more similar than the chosen one */
    while (rank - 1 < best_j && values[rank - 1] > values[best_j])
        rank++;
    return Py_BuildValue("(nnnnd)", self->positions[picked[best_j]], picked[best_j], band_size,
                         rank, values[best_j]);
}

/* exact(signature) -> list[float]: float32 similarities of every zone by the same product the
 * candidates pass uses (for tests and inspection). */
static PyObject *
Index_exact(Index *self, PyObject *arg)
{
    Py_buffer view;
    if (get_signature(self, arg, &view) < 0)
        return NULL;
    Py_ssize_t *ks = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(self->rows + 1));
    float *out = PyMem_Malloc(sizeof(float) * (size_t)(self->rows + 1));
    PyObject *list = (ks && out) ? PyList_New(self->rows) : PyErr_NoMemory();
    if (list) {
        for (Py_ssize_t k = 0; k < self->rows; k++)
            ks[k] = k;
        fdot_many(self, (const float *)view.buf, ks, self->rows, out);
        for (Py_ssize_t k = 0; k < self->rows; k++) {
            PyObject *item = PyFloat_FromDouble((double)out[k]);
            if (!item) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, k, item);
        }
    }
    PyMem_Free(ks);
    PyMem_Free(out);
    PyBuffer_Release(&view);
    return list;
}

static PyObject *
Index_get_isa(Index *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(self->use_vnni ? "avx512vnni" : self->use_avx2 ? "avx2" : "scalar");
}

static PyObject *Index_bounds(Index *self, PyObject *arg);

static PyMethodDef Index_methods[] = {
    {"bounds", (PyCFunction)Index_bounds, METH_O,
     "bounds(signature) -> (lo, hi, lo2, hi2), both levels' intervals per zone"},
    {"candidates", (PyCFunction)(void (*)(void))Index_candidates, METH_FASTCALL,
     "candidates(signature, tau, rank_depth) -> (negated similarities, zones) | None | False"},
    {"exact", (PyCFunction)Index_exact, METH_O, "exact(signature) -> list of similarities"},
    {"matches", (PyCFunction)Index_matches, METH_O,
     "matches(candidates) -> whether their worker_id attributes are the ids given to set_workers"},
    {"set_workers", (PyCFunction)(void (*)(void))Index_set_workers, METH_FASTCALL,
     "set_workers(positions, zoneless, candidates, ids=None)"},
    {"choose_all", (PyCFunction)(void (*)(void))Index_choose_all, METH_FASTCALL,
     "choose_all(negated_similarities, in_flight, tau, min_candidates) -> as choose"},
    {"choose", (PyCFunction)(void (*)(void))Index_choose, METH_FASTCALL,
     "choose(signature, in_flight, tau, min_candidates) -> "
     "(position, row, band_size, rank, similarity) | None | False"},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Index_get_candidates_count(Index *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->positions ? self->n_candidates : -1);
}

static PyObject *
Index_get_rank_depth(Index *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->positions ? self->rank_depth : 1);
}

static PyGetSetDef Index_getset[] = {
    {"rank_depth", (getter)Index_get_rank_depth, NULL,
     "the most zone rows one candidate serves (1 before set_workers)", NULL},
    {"candidates_count", (getter)Index_get_candidates_count, NULL,
     "candidates given to set_workers (-1 before)", NULL},
    {"isa", (getter)Index_get_isa, NULL, "instruction set of the screening pass", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._simkernel.Index",
    .tp_doc = "Two-pass locality-band candidates over one set of zone centroids.",
    .tp_basicsize = sizeof(Index),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Index_init,
    .tp_dealloc = (destructor)Index_dealloc,
    .tp_methods = Index_methods,
    .tp_getset = Index_getset,
};

static struct PyModuleDef simkernel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_simkernel",
    .m_doc = "Two-pass locality-band candidates (see gateway/band.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__simkernel(void)
{
    if (PyType_Ready(&IndexType) < 0)
        return NULL;
    str_worker_id = PyUnicode_InternFromString("worker_id");
    str_in_flight = PyUnicode_InternFromString("in_flight");
    if (!str_worker_id || !str_in_flight)
        return NULL;
    PyObject *module = PyModule_Create(&simkernel_module);
    if (!module)
        return NULL;
    Py_INCREF(&IndexType);
    if (PyModule_AddObject(module, "Index", (PyObject *)&IndexType) < 0) {
        Py_DECREF(&IndexType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

/* ---------------------------------------------------------------- load-first decisions */

/* When the screening pass cannot narrow the zones (most lie within tau of the best: `visit`
 * hands back), the decision is still cheap if it is taken load-first. With every zone's
 * interval [lo_k, hi_k] known, a zone's interval needs narrowing (first by the second level,
 * `refine`, ~20 times narrower for a quarter of fdot's memory traffic; then, if it still
 * matters, by an exact product) only for
 *   1. the best similarity s*: zones whose upper bound exceeds the best exact value so far;
 *   2. band membership (-s_k <= tau - s*, as the walk computes it): zones whose interval
 *      straddles the limit;
 *   3. the chosen zone: among band members on the least-loaded workers, the most similar (ties
 *      to the lower zone), again only zones whose upper bound reaches the best so far;
 *   4. its rank: zones whose interval straddles its similarity.
 * That is the walk's choice: the band in (descending similarity, ascending zone) order and
 * the first member with the fewest in-flight requests. When the band spans fewer than
 * min_candidates workers the walk would admit zones below it in similarity order, which needs
 * them all ranked: then this returns False and the caller takes the one-sgemv path. */

#define FLAG_KNOWN 1
#define FLAG_BAND 2
#define FLAG_TRIED 4
#define FLAG_REFINED 8

/* The second level's interval for zone k: with c_k = a_k q_k + a2_k q2_k + e2_k,
 *     c_k . s = b (a_k q_k . p + a2_k q2_k . p) + e2_k . s + (a_k q_k + a2_k q2_k) . f
 * bounded as in `visit`, ~100 times narrower in the centroid term for a 6 KiB int8 pass instead
 * of fdot's 24 KiB float32 one. */
static void
level2(const Index *self, Py_ssize_t k, int64_t d2, double *lo2, double *hi2)
{
    double coarse = self->cur_b * (self->scale[k] * (double)self->sums[k] +
                                   self->scale2[k] * (double)d2);
    double eps = margin(self, self->err2_norm[k], self->deq2_norm[k]);
    *lo2 = coarse - eps;
    *hi2 = coarse + eps;
}

/* Narrow the intervals (lo / hi) of zones ks, none refined yet, with the second level (four
 * rows per pass on VNNI). Both levels hold the exact value, so their intersection does. */
static void
refine_many(Index *self, const Py_ssize_t *ks, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        self->flags[ks[i]] |= FLAG_REFINED;
    if (self->cur_b == 0.0)  /* degenerate signature: p = 0 carries nothing */
        return;
    int64_t d2[4];
    for (Py_ssize_t i = 0; i < n; i += 4) {
        Py_ssize_t m = n - i < 4 ? n - i : 4;
        qdot2_many(self, ks + i, m, d2);
        for (Py_ssize_t j = 0; j < m; j++) {
            Py_ssize_t k = ks[i + j];
            double lo2, hi2;
            level2(self, k, d2[j], &lo2, &hi2);
            if (lo2 > self->lo[k])
                self->lo[k] = lo2;
            if (hi2 < self->hi[k])
                self->hi[k] = hi2;
        }
    }
}

static void
refine(Index *self, Py_ssize_t k)
{
    if (!(self->flags[k] & (FLAG_REFINED | FLAG_KNOWN)))
        refine_many(self, &k, 1);
}

static double
exact_of(Index *self, const float *s, Py_ssize_t k)
{
    if (!(self->flags[k] & FLAG_KNOWN)) {
        self->xval[k] = (double)fdot(self, self->exact + k * self->dim, s);
        self->flags[k] |= FLAG_KNOWN;
    }
    return self->xval[k];
}

/* exact_of for n zones at once (fdot_many's batches). */
static void
exact_many(Index *self, const float *s, const Py_ssize_t *ks, Py_ssize_t n)
{
    float out[4];
    for (Py_ssize_t i = 0; i < n; i += 4) {
        Py_ssize_t m = n - i < 4 ? n - i : 4;
        fdot_many(self, s, ks + i, m, out);
        for (Py_ssize_t j = 0; j < m; j++) {
            self->xval[ks[i + j]] = (double)out[j];
            self->flags[ks[i + j]] |= FLAG_KNOWN;
        }
    }
}

/* Whether an interval leaves undecided which side of t its value lies on, for the two
 * comparisons the walk makes: the band's edge (in iff s_k >= t) and the rank (counted iff
 * s_k > t). */
typedef int (*Undecided)(double lo, double hi, double t);

static int
undecided_at_least(double lo, double hi, double t)
{
    return lo < t && hi >= t;
}

static int
undecided_above(double lo, double hi, double t)
{
    return lo <= t && hi > t;
}

/* Settle every zone undecided against t: refine them all (the second level, four rows per
 * pass), then give exact products (four rows per pass) to those still undecided. todo: scratch
 * of rows entries. */
static void
settle(Index *self, const float *s, Undecided undecided, double t, Py_ssize_t *todo)
{
    Py_ssize_t n = 0;
    for (Py_ssize_t k = 0; k < self->rows; k++)
        if (!(self->flags[k] & (FLAG_KNOWN | FLAG_REFINED)) &&
            undecided(self->lo[k], self->hi[k], t))
            todo[n++] = k;
    refine_many(self, todo, n);
    n = 0;
    for (Py_ssize_t k = 0; k < self->rows; k++)
        if (!(self->flags[k] & FLAG_KNOWN) && undecided(self->lo[k], self->hi[k], t))
            todo[n++] = k;
    exact_many(self, s, todo, n);
}

static PyObject *
choose_by_load(Index *self, const float *s, const ChooseArgs *a)
{
    const Py_ssize_t rows = self->rows;
    const double *hi = self->hi, *lo = self->lo;
    unsigned char *flags = self->flags;
    memset(flags, 0, (size_t)rows);

    /* 1. s*, visiting zones in descending upper bound while one can still beat the best; each
     * is refined before it is given an exact product, and taken again in bound order. */
    double best = -INFINITY;
    for (;;) {
        Py_ssize_t k = -1;
        for (Py_ssize_t j = 0; j < rows; j++)
            if (!(flags[j] & FLAG_KNOWN) && hi[j] > best && (k < 0 || hi[j] > hi[k]))
                k = j;
        if (k < 0)
            break;
        if (!(flags[k] & FLAG_REFINED)) {
            refine(self, k);
            continue;
        }
        double v = exact_of(self, s, k);
        if (v > best)
            best = v;
    }
    if (!isfinite(best))
        Py_RETURN_FALSE;  /* let the general path sort it out */

    /* 2. The band, and its distinct workers. */
    const double limit = a->tau + (-best);  /* in the band iff -s_k <= limit, i.e. s_k >= -limit */
    settle(self, s, undecided_at_least, -limit, self->band);
    memset(self->seen, 0, (size_t)self->n_candidates);
    Py_ssize_t workers = 0;
    long least = 0;
    int any = 0;
    for (Py_ssize_t k = 0; k < rows; k++) {
        int in;
        if (-lo[k] <= limit)
            in = 1;
        else if (-hi[k] > limit)
            in = 0;
        else
            in = -exact_of(self, s, k) <= limit;
        if (!in)
            continue;
        flags[k] |= FLAG_BAND;
        Py_ssize_t pos = self->positions[k];
        if (!self->seen[pos]) {
            self->seen[pos] = 1;
            workers++;
        }
        if (load_at(a->in_flight, pos, &self->zload[k]) < 0)
            return NULL;
        if (!any || self->zload[k] < least) {
            least = self->zload[k];
            any = 1;
        }
    }
    if (!any || workers < a->min_candidates)
        Py_RETURN_FALSE;  /* min-candidates would admit zones below the band */
    const Py_ssize_t band_size = workers + self->n_zoneless;

    /* Zone-less overflow: strictly fewer in flight than every band member. */
    Py_ssize_t overflow = -1;
    long chosen_load = least;
    for (Py_ssize_t i = 0; i < self->n_zoneless; i++) {
        long load;
        if (load_at(a->in_flight, self->zoneless[i], &load) < 0)
            return NULL;
        if (load < chosen_load) {
            chosen_load = load;
            overflow = self->zoneless[i];
        }
    }
    if (overflow >= 0)
        return Py_BuildValue("(nnnnd)", overflow, (Py_ssize_t)-1, band_size, (Py_ssize_t)0,
                             Py_NAN);

    /* 3. The most similar band zone on a least-loaded worker; ties to the lower zone, so a zone
     * whose upper bound only equals the best so far is still tried. */
    Py_ssize_t chosen = -1;
    double chosen_s = -INFINITY;
    for (;;) {
        Py_ssize_t k = -1;
        for (Py_ssize_t j = 0; j < rows; j++)
            if ((flags[j] & (FLAG_BAND | FLAG_TRIED)) == FLAG_BAND && self->zload[j] == least &&
                (chosen < 0 || hi[j] >= chosen_s) && (k < 0 || hi[j] > hi[k]))
                k = j;
        if (k < 0)
            break;
        if (!(flags[k] & (FLAG_REFINED | FLAG_KNOWN))) {
            refine(self, k);
            continue;
        }
        flags[k] |= FLAG_TRIED;
        double v = exact_of(self, s, k);
        if (chosen < 0 || v > chosen_s || (v == chosen_s && k < chosen)) {
            chosen = k;
            chosen_s = v;
        }
    }

    if (chosen < 0)  /* cannot happen: some band member has the least load */
        Py_RETURN_FALSE;

    /* 4. Rank: 1 + the zones strictly more similar (the chosen zone is known already). */
    settle(self, s, undecided_above, chosen_s, self->band);
    Py_ssize_t rank = 1;
    for (Py_ssize_t k = 0; k < rows; k++) {
        if (k == chosen || hi[k] <= chosen_s)
            continue;
        if (lo[k] > chosen_s || exact_of(self, s, k) > chosen_s)
            rank++;
    }
    return Py_BuildValue("(nnnnd)", self->positions[chosen], chosen, band_size, rank, chosen_s);
}

/* bounds(signature) -> (lo, hi, lo2, hi2): both levels' intervals for every zone (for tests and
 * inspection; each must hold `exact`'s value). */
static PyObject *
Index_bounds(Index *self, PyObject *arg)
{
    Py_buffer view;
    if (get_signature(self, arg, &view) < 0)
        return NULL;
    int screened = screen_intervals(self, (const float *)view.buf);
    PyBuffer_Release(&view);
    if (screened < 0)
        Py_RETURN_NONE;
    PyObject *lists[4] = {PyList_New(self->rows), PyList_New(self->rows), PyList_New(self->rows),
                          PyList_New(self->rows)};
    PyObject *result = NULL;
    int64_t *d2 = PyMem_Malloc(sizeof(int64_t) * (size_t)(self->rows + 1));
    if (!d2) {
        PyErr_NoMemory();
        goto done;
    }
    if (!lists[0] || !lists[1] || !lists[2] || !lists[3])
        goto done;
    qdot2_many(self, self->all_rows, self->rows, d2);
    for (Py_ssize_t k = 0; k < self->rows; k++) {
        double lo2 = self->lo[k], hi2 = self->hi[k];
        if (self->cur_b != 0.0)  /* as `refine_many`: a degenerate signature keeps level 1 */
            level2(self, k, d2[k], &lo2, &hi2);
        double values[4] = {self->lo[k], self->hi[k], lo2, hi2};
        for (int i = 0; i < 4; i++) {
            PyObject *item = PyFloat_FromDouble(values[i]);
            if (!item)
                goto done;
            PyList_SET_ITEM(lists[i], k, item);
        }
    }
    result = Py_BuildValue("(OOOO)", lists[0], lists[1], lists[2], lists[3]);
done:
    PyMem_Free(d2);
    for (int i = 0; i < 4; i++)
        Py_XDECREF(lists[i]);
    return result;
}
