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
 * signature is quantized per call to int16, s = b p + f. Then
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
 * The screening sum runs on AVX-512 VNNI or AVX2 where the CPU has them and in plain C
 * otherwise; the exact products use the same lane order on AVX2 and in C. All paths give
 * bit-identical results, so decisions do not depend on the CPU.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SIMKERNEL_X86 1
#endif

/* Integer products are summed in int32 lanes: |q p| <= 255 * 32767 and vpmaddwd adds two per
 * lane, so a lane can take 64 such pair sums (< 2^31); with four accumulators advancing 64
 * elements per step, a block of 4,096 elements is 64 steps. Blocks are summed in int64. */
#define BLOCK 4096
#define QMAX_SIGNATURE 32767.0f

typedef struct {
    PyObject_HEAD
    Py_ssize_t rows;
    Py_ssize_t dim;
    uint8_t *q;         /* rows x dim */
    float *exact;       /* rows x dim, the float32 centroids */
    double *scale;      /* a_k */
    double *err_norm;   /* |e_k| */
    double *deq_norm;   /* |a_k q_k| */
    int16_t *p;         /* dim, the quantized signature (scratch) */
    double *hi;         /* rows (scratch) */
    double *top;        /* rows (scratch): the largest exact values so far */
    double *values;     /* rows (scratch): exact values of visited zones, sorted */
    Py_ssize_t *picked; /* rows (scratch): their zone indices */
    Py_ssize_t *band;   /* rows (scratch): indices into picked that form the band */
    /* set_workers: the candidate serving each row, the zone-less candidates, and per-candidate
     * scratch; rank_depth = the most rows one candidate serves. */
    Py_ssize_t *positions;
    Py_ssize_t *zoneless;
    unsigned char *seen;
    Py_ssize_t n_zoneless;
    Py_ssize_t n_candidates;
    Py_ssize_t rank_depth;
    int use_avx2;
    int use_vnni;  /* AVX-512 VNNI for the screening sum (implies use_avx2) */
} Index;

/* ---------------------------------------------------------------- screening products */

static int64_t
qdot_scalar(const uint8_t *q, const int16_t *p, Py_ssize_t dim)
{
    int64_t total = 0;
    for (Py_ssize_t d = 0; d < dim; d++)
        total += (int32_t)q[d] * (int32_t)p[d];
    return total;
}

#ifdef SIMKERNEL_X86
/* The same integer sum with AVX-512 VNNI (vpdpwssd: 32 int16 products per instruction), where
 * the CPU has it: Ice Lake / Zen 4 and later. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t
qdot_vnni(const uint8_t *q, const int16_t *p, Py_ssize_t dim)
{
    int64_t total = 0;
    Py_ssize_t d = 0;
    while (d + 64 <= dim) {
        Py_ssize_t end = d + BLOCK;
        if (end > dim)
            end = dim;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0;
        for (; d + 64 <= end; d += 64) {
            a0 = _mm512_dpwssd_epi32(
                a0, _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + d))),
                _mm512_loadu_si512((const void *)(p + d)));
            a1 = _mm512_dpwssd_epi32(
                a1, _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + d + 32))),
                _mm512_loadu_si512((const void *)(p + d + 32)));
        }
        /* each lane took at most BLOCK / 64 pair sums: no overflow */
        total += (int64_t)_mm512_reduce_add_epi32(a0) + (int64_t)_mm512_reduce_add_epi32(a1);
    }
    for (; d < dim; d++)
        total += (int32_t)q[d] * (int32_t)p[d];
    return total;
}
#endif

/* float32 dot products: 32 running sums (lane j takes elements d = j mod 32), combined in a
 * fixed tree, then the tail in order. The AVX2 version keeps the same lanes in four vectors and
 * combines them in the same order, and neither uses FMA, so both give bit-identical results. */
static float
reduce8(const float *v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

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

/* One signature element to int16 level round(v / b), half away from zero, clamped to +-32767
 * (|v / b| <= 32767 by the choice of b); returns f^2 for f = v - b level. A plain conversion,
 * not lround: a libm call per element made the whole pass several times slower. */
static inline double
quantize_one(float v, double b, double inv_b, int16_t *out)
{
    double x = (double)v * inv_b;
    int32_t level = (int32_t)(x + (x >= 0.0 ? 0.5 : -0.5));
    if (level > 32767)
        level = 32767;
    else if (level < -32767)
        level = -32767;
    *out = (int16_t)level;
    double f = (double)v - b * (double)level;
    return f * f;
}

/* Quantize the signature into p (see Index_candidates); returns 0, or -1 when it is not
 * finite. Writes |s|^2 and |f|^2. */
static int
quantize_scalar(const float *s, Py_ssize_t dim, int16_t *p, double *b_out, double *s2_out,
                double *f2_out)
{
    float peak = 0.0f;
    double s2 = 0.0;
    for (Py_ssize_t d = 0; d < dim; d++) {
        float m = fabsf(s[d]);
        if (m > peak)
            peak = m;
        s2 += (double)s[d] * (double)s[d];
    }
    if (!isfinite(s2))
        return -1;
    double b = (double)peak / (double)QMAX_SIGNATURE, f2 = 0.0;
    const double inv_b = b > 0.0 ? 1.0 / b : 0.0;
    for (Py_ssize_t d = 0; d < dim; d++)
        f2 += quantize_one(s[d], b, inv_b, p + d);
    *b_out = b;
    *s2_out = s2;
    *f2_out = f2;
    return 0;
}

#ifdef SIMKERNEL_X86
__attribute__((target("avx2")))
static int64_t
qdot_avx2(const uint8_t *q, const int16_t *p, Py_ssize_t dim)
{
    /* Four independent accumulators (one vpmaddwd chain each) keep the multiply units busy;
     * one accumulator ran at less than half this speed. */
    int64_t total = 0;
    Py_ssize_t d = 0;
    while (d + 64 <= dim) {
        Py_ssize_t end = d + BLOCK;
        if (end > dim)
            end = dim;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (; d + 64 <= end; d += 64) {
#define QSTEP(acc, off)                                                                     \
    acc = _mm256_add_epi32(                                                                 \
        acc, _mm256_madd_epi16(                                                             \
                 _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + d + (off)))),   \
                 _mm256_loadu_si256((const __m256i *)(p + d + (off)))))
            QSTEP(a0, 0);
            QSTEP(a1, 16);
            QSTEP(a2, 32);
            QSTEP(a3, 48);
#undef QSTEP
        }
        int32_t lanes[8];
        /* each lane holds at most BLOCK / 64 pair sums of |2 * 255 * 32767|: no overflow */
        _mm256_storeu_si256((__m256i *)lanes, a0);
        for (int j = 0; j < 8; j++)
            total += lanes[j];
        _mm256_storeu_si256((__m256i *)lanes, a1);
        for (int j = 0; j < 8; j++)
            total += lanes[j];
        _mm256_storeu_si256((__m256i *)lanes, a2);
        for (int j = 0; j < 8; j++)
            total += lanes[j];
        _mm256_storeu_si256((__m256i *)lanes, a3);
        for (int j = 0; j < 8; j++)
            total += lanes[j];
    }
    for (; d < dim; d++)
        total += (int32_t)q[d] * (int32_t)p[d];
    return total;
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

__attribute__((target("avx2")))
static int
quantize_avx2(const float *s, Py_ssize_t dim, int16_t *p, double *b_out, double *s2_out,
              double *f2_out)
{
    /* Same quantization as quantize_scalar up to the rounding of ties (round-half-even here),
     * which the bound does not depend on: f is measured from the p actually written. */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 peak = _mm256_setzero_ps();
    __m256d s2a = _mm256_setzero_pd(), s2b = s2a;
    Py_ssize_t d = 0;
    for (; d + 8 <= dim; d += 8) {
        __m256 v = _mm256_loadu_ps(s + d);
        peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v));
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s2a = _mm256_add_pd(s2a, _mm256_mul_pd(lo, lo));
        s2b = _mm256_add_pd(s2b, _mm256_mul_pd(hi, hi));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s2a, s2b));
    double s2 = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    float peaks[8];
    _mm256_storeu_ps(peaks, peak);
    float top = 0.0f;
    for (int j = 0; j < 8; j++)
        if (peaks[j] > top)
            top = peaks[j];
    for (Py_ssize_t t = d; t < dim; t++) {
        float m = fabsf(s[t]);
        if (m > top)
            top = m;
        s2 += (double)s[t] * (double)s[t];
    }
    if (!isfinite(s2))  /* a NaN or inf anywhere makes the sum non-finite */
        return -1;
    double b = (double)top / (double)QMAX_SIGNATURE;
    if (!(b > 0.0))
        return quantize_scalar(s, dim, p, b_out, s2_out, f2_out);  /* all zeros */
    const __m256d inv = _mm256_set1_pd(1.0 / b), bb = _mm256_set1_pd(b);
    const __m256d cap = _mm256_set1_pd(32767.0), floor_ = _mm256_set1_pd(-32767.0);
    __m256d f2a = _mm256_setzero_pd();
    for (d = 0; d + 8 <= dim; d += 8) {
        __m256 v = _mm256_loadu_ps(s + d);
        __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        __m256d x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        __m256d r0 = _mm256_round_pd(_mm256_mul_pd(x0, inv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256d r1 = _mm256_round_pd(_mm256_mul_pd(x1, inv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r0 = _mm256_max_pd(_mm256_min_pd(r0, cap), floor_);
        r1 = _mm256_max_pd(_mm256_min_pd(r1, cap), floor_);
        __m128i i0 = _mm256_cvtpd_epi32(r0), i1 = _mm256_cvtpd_epi32(r1);
        _mm_storeu_si128((__m128i *)(p + d), _mm_packs_epi32(i0, i1));
        __m256d e0 = _mm256_sub_pd(x0, _mm256_mul_pd(bb, r0));
        __m256d e1 = _mm256_sub_pd(x1, _mm256_mul_pd(bb, r1));
        f2a = _mm256_add_pd(f2a, _mm256_add_pd(_mm256_mul_pd(e0, e0), _mm256_mul_pd(e1, e1)));
    }
    _mm256_storeu_pd(lanes, f2a);
    double f2 = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; d < dim; d++)
        f2 += quantize_one(s[d], b, 1.0 / b, p + d);
    *b_out = b;
    *s2_out = s2;
    *f2_out = f2;
    return 0;
}
#endif

static int64_t
qdot(const Index *self, const uint8_t *q)
{
#ifdef SIMKERNEL_X86
    if (self->use_vnni)
        return qdot_vnni(q, self->p, self->dim);
    if (self->use_avx2)
        return qdot_avx2(q, self->p, self->dim);
#endif
    return qdot_scalar(q, self->p, self->dim);
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

/* ---------------------------------------------------------------- object */

static void
Index_dealloc(Index *self)
{
    PyMem_Free(self->q);
    PyMem_Free(self->exact);
    PyMem_Free(self->scale);
    PyMem_Free(self->err_norm);
    PyMem_Free(self->deq_norm);
    PyMem_Free(self->p);
    PyMem_Free(self->hi);
    PyMem_Free(self->top);
    PyMem_Free(self->values);
    PyMem_Free(self->picked);
    PyMem_Free(self->band);
    PyMem_Free(self->positions);
    PyMem_Free(self->zoneless);
    PyMem_Free(self->seen);
    Py_TYPE(self)->tp_free((PyObject *)self);
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
    if (self->q != NULL) {  /* __init__ called again: start over */
        PyMem_Free(self->q); PyMem_Free(self->exact); PyMem_Free(self->scale);
        PyMem_Free(self->err_norm); PyMem_Free(self->deq_norm); PyMem_Free(self->p);
        PyMem_Free(self->hi); PyMem_Free(self->top);
        PyMem_Free(self->values); PyMem_Free(self->picked); PyMem_Free(self->band);
        PyMem_Free(self->positions); PyMem_Free(self->zoneless); PyMem_Free(self->seen);
        self->positions = NULL; self->zoneless = NULL; self->seen = NULL;
        self->q = NULL;
    }
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
    self->hi = PyMem_Malloc(sizeof(double) * nrows);
    self->top = PyMem_Malloc(sizeof(double) * nrows);
    self->values = PyMem_Malloc(sizeof(double) * nrows);
    self->picked = PyMem_Malloc(sizeof(Py_ssize_t) * nrows);
    self->band = PyMem_Malloc(sizeof(Py_ssize_t) * nrows);
    if (!self->q || !self->exact || !self->scale || !self->err_norm || !self->deq_norm ||
        !self->p || !self->hi || !self->top || !self->values || !self->picked || !self->band) {
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
        double a = (double)top / 255.0;
        double err2 = 0.0, deq2 = 0.0;
        uint8_t *qrow = self->q + k * dim;
        for (Py_ssize_t d = 0; d < dim; d++) {
            long level = a > 0.0 ? lround((double)row[d] / a) : 0;
            if (level > 255)
                level = 255;
            qrow[d] = (uint8_t)level;
            double deq = a * (double)level;
            double err = (double)row[d] - deq;
            err2 += err * err;
            deq2 += deq * deq;
        }
        self->scale[k] = a;
        self->err_norm[k] = sqrt(err2);
        self->deq_norm[k] = sqrt(deq2);
    }
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

#define VISIT_NOT_FINITE (-1)
#define VISIT_HAND_BACK (-2)

/* Screen every zone, then visit the zones that can matter (see the top of this file), leaving
 * them in self->picked / self->values sorted by descending similarity, ties by ascending zone.
 * Returns how many, VISIT_NOT_FINITE when the signature has a NaN or inf, or VISIT_HAND_BACK when
 * more than half of the zones (of at least 8) may lie within tau of the best: visiting them one
 * by one would cost more than the caller's single product over all of them. */
static Py_ssize_t
visit(Index *self, const float *s, double tau, Py_ssize_t depth)
{
    const Py_ssize_t dim = self->dim, rows = self->rows;

    /* Quantize the signature: b = max|s| / 32767, p = round(s / b), f = s - b p. */
    double b, s2, f2;
    int ok;
#ifdef SIMKERNEL_X86
    if (self->use_avx2)
        ok = quantize_avx2(s, dim, self->p, &b, &s2, &f2);
    else
#endif
        ok = quantize_scalar(s, dim, self->p, &b, &s2, &f2);
    if (ok < 0)
        return VISIT_NOT_FINITE;
    const double s_norm = sqrt(s2), f_norm = sqrt(f2);

    /* Screening pass: an interval for every zone. The integer sum is exact; the relative margin
     * covers float32 rounding in the exact pass (at most dim * 2^-24 of the sum of |terms|,
     * which |c_k| |s| bounds). */
    const double rel = 1e-5 + (double)dim * 6e-8;
    double best_lo = -INFINITY;
    for (Py_ssize_t k = 0; k < rows; k++) {
        double coarse = self->scale[k] * b * (double)qdot(self, self->q + k * dim);
        double eps = self->err_norm[k] * s_norm + self->deq_norm[k] * f_norm +
                     rel * (fabs(coarse) + (self->deq_norm[k] + self->err_norm[k]) * s_norm) +
                     1e-7;
        self->hi[k] = coarse + eps;
        if (coarse - eps > best_lo)
            best_lo = coarse - eps;
    }
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

/* The signature argument as a float32 buffer of the table's dimension. */
static int
get_signature(Index *self, PyObject *arg, Py_buffer *view)
{
    if (PyObject_GetBuffer(arg, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != self->dim * (Py_ssize_t)sizeof(float) || view->itemsize != 4) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "signature must be float32 of the table's dimension");
        return -1;
    }
    return 0;
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

/* set_workers(positions, zoneless, candidates): which candidate serves each row (zone) of this
 * index, which candidates serve no zone, and how many candidates there are. Needed by choose. */
static PyObject *
Index_set_workers(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_workers(positions: tuple, zoneless: tuple, candidates)");
        return NULL;
    }
    Py_ssize_t candidates = PyLong_AsSsize_t(args[2]);
    if (candidates == -1 && PyErr_Occurred())
        return NULL;
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
    Py_RETURN_NONE;

bad:
    PyMem_Free(positions);
    PyMem_Free(zoneless);
    PyMem_Free(seen);
    return NULL;
}

static int
load_at(PyObject *in_flight, Py_ssize_t position, long *out)
{
    PyObject *item = PyList_GET_ITEM(in_flight, position);
    long v = PyLong_AsLong(item);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* choose(signature, in_flight, tau, min_candidates)
 *     -> (position, row, band_size, rank, similarity) | None | False
 *
 * gateway/band.py `choose` (the band, min-candidates, least in-flight with ties to the more
 * similar then lower zone, zone-less overflow) over the visited zones, in one call. `row` is -1
 * (and rank 0, similarity NaN) when a zone-less candidate is chosen. None: signature not finite;
 * False: hand back to the full product (see `visit`). in_flight: list of ints, one per
 * candidate. */
static PyObject *
Index_choose(Index *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "choose(signature, in_flight, tau, min_candidates)");
        return NULL;
    }
    if (self->positions == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "choose needs set_workers first");
        return NULL;
    }
    PyObject *in_flight = args[1];
    if (!PyList_Check(in_flight) || PyList_GET_SIZE(in_flight) != self->n_candidates) {
        PyErr_SetString(PyExc_ValueError, "in_flight must be a list with one int per candidate");
        return NULL;
    }
    double tau = PyFloat_AsDouble(args[2]);
    if (tau == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t min_candidates = PyLong_AsSsize_t(args[3]);
    if (min_candidates == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (get_signature(self, args[0], &view) < 0)
        return NULL;
    Py_ssize_t depth = min_candidates * self->rank_depth;
    Py_ssize_t found = visit(self, (const float *)view.buf, tau, depth);
    PyBuffer_Release(&view);
    if (found == VISIT_NOT_FINITE || found == 0)
        Py_RETURN_NONE;
    if (found == VISIT_HAND_BACK)
        Py_RETURN_FALSE;

    /* The band walk on negated similarities, exactly as band.py does it in Python floats. */
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
    PyObject *out = PyList_New(self->rows);
    if (!out) {
        PyBuffer_Release(&view);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < self->rows; k++) {
        float v = fdot(self, self->exact + k * self->dim, (const float *)view.buf);
        PyObject *item = PyFloat_FromDouble((double)v);
        if (!item) {
            Py_DECREF(out);
            PyBuffer_Release(&view);
            return NULL;
        }
        PyList_SET_ITEM(out, k, item);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *
Index_get_isa(Index *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(self->use_vnni ? "avx512vnni" : self->use_avx2 ? "avx2" : "scalar");
}

static PyMethodDef Index_methods[] = {
    {"candidates", (PyCFunction)(void (*)(void))Index_candidates, METH_FASTCALL,
     "candidates(signature, tau, rank_depth) -> (negated similarities, zones) | None | False"},
    {"exact", (PyCFunction)Index_exact, METH_O, "exact(signature) -> list of similarities"},
    {"set_workers", (PyCFunction)(void (*)(void))Index_set_workers, METH_FASTCALL,
     "set_workers(positions, zoneless, candidates)"},
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
