/* precsim: a float32 GEMM whose block sums are added to an accumulator rounded in a narrow
 * float format after every add (to nearest, ties to even, or stochastically), or kept in a W-bit
 * integer, fused, so that the block sums never leave registers (see
 * precsim/runtime/accumulate.py for the semantics and precsim/runtime/native.py for how this
 * file is built and checked).
 *
 * The format is a sign-magnitude float grid inside float32 (precsim.formats.float, rounded as
 * precsim.formats.rounding.round_float does): `shift` low mantissa bits dropped (13:
 * fp16, 16: bf16), values below 2^emin (>= 2^-126) on the subnormal grid, a rounded magnitude
 * above `max` (or an infinite sum) becomes the overflow value (Inf, max or NaN) with the sign,
 * NaN stays NaN, and -0 becomes +0 in formats without it.
 *
 * GCC/Clang vector extensions, no intrinsics: the compiler maps 16-wide vectors to what the CPU
 * has (-march=native). Loops follow the usual GEMM blocking (Goto and van de Geijn): B packed in
 * panels of NR columns, A in panels of MR rows, an MR x NR tile held in registers while one
 * block of K is summed; the tile is then rounded into the accumulator. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define VL 16             /* floats per vector */
#define MR 6              /* rows of a tile */
#define NR 32             /* columns of a tile (NR / VL vectors) */
#define NV (NR / VL)
#define MC 120            /* rows of A packed at a time */
#define NC 1024           /* columns of B packed at a time */
#define KC 256            /* elements of K packed at a time (rounded to whole blocks) */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

/* How block sums are added: rounded to a float format (integer = 0), or, for integer codes whose
 * block sums are exact in float32, kept in W bits (lo = -2^(W-1), hi = 2^(W-1) - 1), wrapped or
 * saturated, each add that leaves the range counted. */
typedef struct {
    int32_t shift, half, low, tiny, max, over, negzero;
    float magic;
    int32_t emin_field, quantum;  /* emin + 127; the bits of the subnormal quantum 2^(emin - m) */
    int stochastic;               /* stochastic rounding: block j's bits from words s0, s1 + j * SALT */
    uint32_t s0, s1;
    int integer, saturate;
    int64_t lo, hi;
} fmt_t;

#define SALT 0x2545F491u  /* precsim.runtime.accumulate._BLOCK_SALT */

/* 64-byte aligned; the size rounded up to a multiple of 64, as aligned_alloc requires */
static void *alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline int any(vi m) {
    int32_t x[VL];
    memcpy(x, &m, sizeof x);
    int32_t r = 0;
    for (int i = 0; i < VL; ++i) r |= x[i];
    return r != 0;
}

/* acc + x (float32) rounded to odd: moved one unit toward the exact sum where that is inexact
 * and the last bit is even (TwoSum gives the exact error) */
static inline vi sum_odd(vf acc, vf x) {
    vf s = acc + x;
    vf bb = s - acc;
    vf err = (acc - (s - bb)) + (x - bb);
    vi bits = (vi)s;
    vi away = 1 | (((vi)err ^ bits) >> 31);
    vi move = (err != 0) & (err == err) & ((bits & 1) == 0);
    return bits + (move & away);
}

/* The rounded magnitude `out` of `bits` as a float: past max the overflow value, the sign back
 * on (dropped from 0 in formats without -0), NaN as it was */
static inline vf finish(vi bits, vi out, const fmt_t *f) {
    vi mag = bits & 0x7fffffff;
    vi sign = bits ^ mag;
    vi over = out > f->max;
    out = (f->over & over) | (out & ~over);
    if (!f->negzero)
        sign &= ~(vi)(out == 0);
    vi nan = mag > 0x7f800000;
    return (vf)((bits & nan) | ((out | sign) & ~nan));
}

/* acc + x rounded once to nearest (ties to even): the sum rounded to odd, then to the format's
 * grid (Boldo and Melquiond: no double rounding, float32 keeps 2 more bits than the format) */
static inline vf add_round(vf acc, vf x, const fmt_t *f) {
    vi bits = sum_odd(acc, x);
    vi mag = bits & 0x7fffffff;
    /* unsigned adds: a NaN's bits plus half a quantum pass 2^31 (its lanes are thrown away) */
    vi up = (vi)(((vu)mag + (uint32_t)f->half + (vu)((mag >> f->shift) & 1)) & ~(uint32_t)f->low);
    vi sub = (vi)(((vf)mag + f->magic) - f->magic);
    vi tiny = mag < f->tiny;
    return finish(bits, (sub & tiny) | (up & ~tiny), f);
}

/* lowbias32, the mixer of precsim.formats.random (products modulo 2^32) */
static inline vu mix(vu x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

/* acc + x rounded stochastically with the words rb, as precsim.formats.rounding rounds the sum
 * rounded to odd: d significand bits below the grid's quantum; d <= 23: the low d bits of rb
 * added and cleared; below one quantum: 0 or the quantum, up when sig + rb's low bits carry */
static inline vf add_stochastic(vf acc, vf x, vi rb, const fmt_t *f) {
    vi bits = sum_odd(acc, x);
    vi mag = bits & 0x7fffffff;
    vi biased = mag >> 23;
    vi e1 = biased - (biased == 0);  /* float32 subnormals share 2^-126's exponent field */
    vi gap = f->emin_field - e1;
    vi d = f->shift + (gap & (gap > 0));
    vi dm = d - ((d - 23) & (d > 23));
    vi mask = (((vi){0} + 1) << dm) - 1;
    vi rounded = (vi)(((vu)mag + (vu)(rb & mask)) & ~(vu)mask);
    vi sig = ((mag & 0x7fffff) | 0x800000) & (biased > 0);
    sig |= mag & (biased == 0);
    vi ds = d - ((d - 30) & (d > 30));
    vi excess = (d - 30) & (d > 30);
    excess -= (excess - 24) & (excess > 24);
    vi low = (((vi){0} + 1) << ds) - 1;
    vi up = ((sig >> excess) + (rb & low)) > low;
    vi small = d > 23;
    return finish(bits, ((up & f->quantum) & small) | (rounded & ~small), f);
}

/* dst[k * w + j] = src[k * sk + j * sj] for k < kc, j < n; zero for n <= j < w (reading along
 * whichever axis is contiguous in memory) */
static void pack(float *dst, const float *src, long kc, long n, long w, long sk, long sj) {
    if (n < w)
        memset(dst, 0, sizeof(float) * kc * w);
    if (sj == 1 || sk != 1) {
        for (long k = 0; k < kc; ++k)
            for (long j = 0; j < n; ++j) dst[k * w + j] = src[k * sk + j * sj];
    } else {
        for (long j = 0; j < n; ++j)
            for (long k = 0; k < kc; ++k) dst[k * w + j] = src[k + j * sj];
    }
}

/* mm rows of nn `es`-byte elements from src (rows ls elements apart) to dst (ld apart); whole
 * tiles with a row size known here (10% faster than memcpy of a variable size) */
static void copy_rows(char *dst, long ld, const char *src, long ls, long mm, long nn, size_t es) {
    if (mm == MR && nn == NR && es == sizeof(float))
        for (int i = 0; i < MR; ++i)
            memcpy(dst + i * ld * sizeof(float), src + i * ls * sizeof(float), NR * sizeof(float));
    else if (mm == MR && nn == NR)
        for (int i = 0; i < MR; ++i)
            memcpy(dst + i * ld * sizeof(int64_t), src + i * ls * sizeof(int64_t), NR * sizeof(int64_t));
    else
        for (long i = 0; i < mm; ++i) memcpy(dst + i * ld * es, src + i * ls * es, nn * es);
}

/* An MR x NR tile from rows of length ld (mm x nn of them inside the matrix; NULL: zero), and back */
static void get(void *tile, const char *from, long ld, long mm, long nn, size_t es) {
    if (!from || mm < MR || nn < NR)
        memset(tile, 0, es * MR * NR);
    if (from)
        copy_rows(tile, NR, from, ld, mm, nn, es);
}

static void put(char *to, const void *tile, long ld, long mm, long nn, size_t es) {
    copy_rows(to, ld, tile, NR, mm, nn, es);
}

/* acc[e] + sums[e] kept in W bits (int64 arithmetic cannot overflow: W <= 48 and the sums are
 * below 2^24); returns the adds that left the range */
static long add_int(int64_t *acc, const float *sums, const fmt_t *f) {
    long events = 0;
    int64_t lo = f->lo, hi = f->hi, mask = -2 * lo - 1;
    for (int e = 0; e < MR * NR; ++e) {
        int64_t v = acc[e] + (int64_t)sums[e];
        events += v < lo || v > hi;
        acc[e] = f->saturate ? (v < lo ? lo : v > hi ? hi : v) : ((v - lo) & mask) + lo;
    }
    return events;
}

/* The sums of k0 .. k1 - 1 of an MR x NR tile into c (registers) */
static inline void block_sums(vf c[MR][NV], long k0, long k1, const float *a, const float *b) {
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) c[i][v] = (vf){0};
    for (long k = k0; k < k1; ++k) {
        const float *bk = b + k * NR, *ak = a + k * MR;
        vf b0 = load(bk), b1 = load(bk + VL);
        for (int i = 0; i < MR; ++i) {
            float x = ak[i];
            vf ai = {x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
            c[i][0] += ai * b0;
            c[i][1] += ai * b1;
        }
    }
}

/* One MR x NR tile over kc elements of K (global k0 ..): each block's sums, then the rounded
 * adds into acc; every `promote` elements acc is added to tot and reset. */
static void tile(long kc, long k0, long block, long promote, const float *a, const float *b, float *acc,
                 float *tot, const fmt_t *f, int32_t at, long ld) {
    for (long kb = 0; kb < kc; kb += block) {
        long ke = kb + block < kc ? kb + block : kc;
        vf c[MR][NV];
        block_sums(c, kb, ke, a, b);
        if (f->stochastic) {  /* element `at + i * ld + j` of the output, block (k0 + kb) / block */
            vi lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
            uint32_t word = f->s1 + (uint32_t)((k0 + kb) / block) * SALT;
            for (int i = 0; i < MR; ++i)
                for (int v = 0; v < NV; ++v) {
                    float *p = acc + i * NR + v * VL;
                    vu index = (vu)(lanes + (int32_t)(at + i * ld + v * VL));
                    store(p, add_stochastic(load(p), c[i][v], (vi)mix((index ^ f->s0) + word), f));
                }
        } else {
        /* Fast path: the float32 sum rounded by integer arithmetic on its bits. It is exact
         * unless the sum is a midpoint of the format (its exact error then decides), lies
         * outside the normal range, or is NaN; then the whole tile takes add_round. */
        vf fast[MR][NV];
        vi odd = (vi){0};
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) {
                vi bits = (vi)(load(acc + i * NR + v * VL) + c[i][v]);
                vi mag = bits & 0x7fffffff;
                odd |= ((bits & f->low) == f->half + 1) | ((vu)(mag - f->tiny) > (uint32_t)(f->max - f->tiny));
                fast[i][v] = (vf)(((vu)bits + (uint32_t)f->half + (vu)((bits >> f->shift) & 1)) & ~(uint32_t)f->low);
            }
        int slow = any(odd);
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) {
                float *p = acc + i * NR + v * VL;
                store(p, slow ? add_round(load(p), c[i][v], f) : fast[i][v]);
            }
        }
        if (promote && (k0 + ke) % promote == 0) {
            for (int e = 0; e < MR * NR; e += VL) {
                store(tot + e, load(tot + e) + load(acc + e));
                store(acc + e, (vf){0});
            }
        }
    }
}

/* tile() for an integer accumulator; returns the adds that left the W-bit range */
static long tile_int(long kc, long k0, long block, long promote, const float *a, const float *b, int64_t *acc,
                     int64_t *tot, const fmt_t *f) {
    long events = 0;
    for (long kb = 0; kb < kc; kb += block) {
        long ke = kb + block < kc ? kb + block : kc;
        vf c[MR][NV];
        float sums[MR * NR] __attribute__((aligned(64)));
        block_sums(c, kb, ke, a, b);
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) store(sums + i * NR + v * VL, c[i][v]);
        events += add_int(acc, sums, f);
        if (promote && (k0 + ke) % promote == 0)
            for (int e = 0; e < MR * NR; ++e) {
                tot[e] += acc[e];
                acc[e] = 0;
            }
    }
    return events;
}

/* Where B comes from: a strided matrix (element (k, n) of matrix p at
 * b[p * sbp + k * sbk + n * sbn]), or, with conv set, the im2col columns of image p of a conv3d
 * (input [P, C, D, H, W] contiguous at b; k runs over (channel, kernel depth, row, column), n over
 * the output's (depth, row, column)), read straight from the image without writing the columns
 * out. A conv1d or conv2d is a conv3d with unit depth (and height). */
typedef struct {
    const float *b;
    long sbp, sbk, sbn;
    int conv;
    long c, d, h, w, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, od, oh, ow;
} source_t;

/* Columns n0 .. n0 + n - 1 and rows k0 .. k0 + kc - 1 of B (matrix p) into a panel of NR columns */
static void pack_b(float *dst, const source_t *src, long p, long k0, long kc, long n0, long n) {
    if (!src->conv) {
        pack(dst, src->b + p * src->sbp + k0 * src->sbk + n0 * src->sbn, kc, n, NR, src->sbk, src->sbn);
        return;
    }
    /* the panel's runs of columns in one output row: the same for every k */
    long taps = src->kd * src->kh * src->kw, plane = src->oh * src->ow, runs = 0;
    long at[NR], len[NR], z0[NR], i0[NR], c0[NR];
    for (long j = 0; j < n; j += len[runs++]) {
        long o = n0 + j, oc = o % src->ow;
        at[runs] = j;
        len[runs] = src->ow - oc < n - j ? src->ow - oc : n - j;
        z0[runs] = o / plane * src->sd;
        i0[runs] = o % plane / src->ow * src->sh;
        c0[runs] = oc * src->sw;
    }
    const float *x = src->b + p * src->c * src->d * src->h * src->w;
    for (long k = 0; k < kc; ++k) {
        long kk = k0 + k, r = kk % taps;
        long dz = r / (src->kh * src->kw) * src->dd - src->pd;
        long di = r % (src->kh * src->kw) / src->kw * src->dh - src->ph, dj = r % src->kw * src->dw - src->pw;
        const float *xc = x + kk / taps * src->d * src->h * src->w;
        float *row = dst + k * NR;
        for (long q = 0; q < runs; ++q) {
            long z = z0[q] + dz, i = i0[q] + di, c = c0[q] + dj, m = len[q];
            float *out = row + at[q];
            if (z < 0 || z >= src->d || i < 0 || i >= src->h) {
                memset(out, 0, sizeof(float) * m);
                continue;
            }
            const float *line = xc + (z * src->h + i) * src->w;
            if (src->sw == 1) {  /* a contiguous stretch of the input row, zeros beyond it */
                long lo = c < 0 ? -c : 0, hi = src->w - c < m ? src->w - c : m;
                if (hi < lo)
                    hi = lo;
                if (lo > m)
                    lo = hi = m;
                memset(out, 0, sizeof(float) * lo);
                memcpy(out + lo, line + c + lo, sizeof(float) * (hi - lo));
                memset(out + hi, 0, sizeof(float) * (m - hi));
            } else {
                for (long t = 0; t < m; ++t) {
                    long col = c + t * src->sw;
                    out[t] = col >= 0 && col < src->w ? line[col] : 0.0f;
                }
            }
        }
        for (long j = n; j < NR; ++j) row[j] = 0.0f;
    }
}

/* Matrices p0 .. p1 - 1, rows m0 .. m1 - 1 of C = A @ B accumulated: A [P, M, K] with any strides
 * (sap = 0: one A for every matrix), B from `src`; S, C and T contiguous [P, M, N]. S: the
 * accumulator's start (NULL: zero). Block sums of `block` elements of K are added to the
 * accumulator, rounded after every add; with promote (elements, a multiple of block) the
 * accumulator is added to T (needed when K > the packed K, else NULL) every `promote` elements
 * and reset, and C is T + acc at the end. Returns 0, or 1 where memory ran out. */
static int run(long M, long N, long K, const float *A, long sap, long sam, long sak, const source_t *src,
               const void *S, void *C, void *T, long block, long promote, const fmt_t *f, long p0, long p1,
               long m0, long m1, long *events) {
    size_t es = f->integer ? sizeof(int64_t) : sizeof(float);  /* the accumulator's element size */
    long kcmax = block * (KC / block > 1 ? KC / block : 1);
    long ncmax = N < NC ? (N + NR - 1) / NR * NR : NC;
    float *bp = alloc(sizeof(float) * kcmax * ncmax);
    /* one A for several matrices: packed once, all of it (else one MC x KC block at a time) */
    int shared = sap == 0 && p1 - p0 > 1;
    long mpad = (m1 - m0 + MR - 1) / MR * MR;
    float *ap = alloc(sizeof(float) * (shared ? mpad * K : kcmax * MC));
    int64_t acc[MR * NR] __attribute__((aligned(64)));  /* float or int64 elements */
    int64_t tot[MR * NR] __attribute__((aligned(64)));
    if (!bp || !ap) {
        free(bp);
        free(ap);
        return 1;
    }
    for (long pc = 0; shared && pc < K; pc += kcmax) {
        long kc = K - pc < kcmax ? K - pc : kcmax;
        for (long ir = 0; ir < m1 - m0; ir += MR)
            pack(ap + pc * mpad + ir * kc, A + (m0 + ir) * sam + pc * sak, kc, m1 - m0 - ir < MR ? m1 - m0 - ir : MR,
                 MR, sak, sam);
    }
    for (long p = p0; p < p1; ++p) {
        const float *a = A + p * sap;
        const char *s = S ? (const char *)S + p * M * N * es : NULL;
        char *c = (char *)C + p * M * N * es, *t = T ? (char *)T + p * M * N * es : NULL;
        for (long jc = 0; jc < N; jc += NC) {
            long nc = N - jc < NC ? N - jc : NC;
            for (long pc = 0; pc < K; pc += kcmax) {
                long kc = K - pc < kcmax ? K - pc : kcmax;
                int first = pc == 0, last = pc + kc >= K;
                for (long jr = 0; jr < nc; jr += NR)
                    pack_b(bp + jr * kc, src, p, pc, kc, jc + jr, nc - jr < NR ? nc - jr : NR);
                for (long ic = m0; ic < m1; ic += MC) {
                    long mc = m1 - ic < MC ? m1 - ic : MC;
                    const float *apack = shared ? ap + pc * mpad + (ic - m0) * kc : ap;
                    for (long ir = 0; !shared && ir < mc; ir += MR)
                        pack(ap + ir * kc, a + (ic + ir) * sam + pc * sak, kc, mc - ir < MR ? mc - ir : MR, MR,
                             sak, sam);
                    for (long jr = 0; jr < nc; jr += NR) {
                        long nn = nc - jr < NR ? nc - jr : NR;
                        for (long ir = 0; ir < mc; ir += MR) {
                            long mm = mc - ir < MR ? mc - ir : MR, at = (ic + ir) * N + jc + jr;
                            const char *from = first ? s : c;
                            const char *past = t && !first ? t : NULL;
                            get(acc, from ? from + at * es : NULL, N, mm, nn, es);
                            get(tot, past ? past + at * es : NULL, N, mm, nn, es);
                            if (f->integer)
                                *events += tile_int(kc, pc, block, promote, apack + ir * kc, bp + jr * kc, acc, tot, f);
                            else
                                tile(kc, pc, block, promote, apack + ir * kc, bp + jr * kc, (float *)acc,
                                     (float *)tot, f, (int32_t)(p * M * N + at), N);
                            if (promote && last)
                                for (int e = 0; e < MR * NR; ++e) {
                                    if (f->integer)
                                        acc[e] += tot[e];
                                    else
                                        ((float *)acc)[e] += ((float *)tot)[e];
                                }
                            else if (t)
                                put(t + at * es, tot, N, mm, nn, es);
                            put(c + at * es, acc, N, mm, nn, es);
                        }
                    }
                }
            }
        }
    }
    free(bp);
    free(ap);
    return 0;
}

/* The format from its parameters: {dropped bits, bits of 2^emin, bits of max, overflow value,
 * whether -0 exists, bits of the subnormal rounding constant, emin + 127, bits of the subnormal
 * quantum, stochastic rounding, seed words s0 and s1} */
static fmt_t format(const int32_t *p) {
    fmt_t f = {p[0], (1 << (p[0] - 1)) - 1, (1 << p[0]) - 1, p[1], p[2], p[3], p[4], 0.0f, p[6], p[7], p[8],
               (uint32_t)p[9], (uint32_t)p[10], 0, 0, 0, 0};
    memcpy(&f.magic, p + 5, sizeof f.magic);
    return f;
}

/* run() over `threads` threads: thread i of n takes matrices p * i / n .. of a batch, or, with
 * fewer matrices than threads, rows of every matrix (cut on whole tiles). */
static int run_parallel(long P, long M, long N, long K, const float *A, long sap, long sam, long sak,
                        const source_t *src, const void *S, void *C, void *T, long block, long promote,
                        const fmt_t *f, int threads, long *events) {
    int status = 0;
    long count = 0;
#pragma omp parallel num_threads(threads) reduction(| : status) reduction(+ : count)
    {
        long i = 0, n = 1;
#ifdef _OPENMP
        i = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        long p0 = 0, p1 = P, m0 = 0, m1 = M;
        if (P >= n) {
            p0 = P * i / n;
            p1 = P * (i + 1) / n;
        } else {
            long tiles = (M + MR - 1) / MR;
            m0 = tiles * i / n * MR;
            m1 = i + 1 == n ? M : tiles * (i + 1) / n * MR;
        }
        if (p0 < p1 && m0 < m1)
            status |= run(M, N, K, A, sap, sam, sak, src, S, C, T, block, promote, f, p0, p1, m0, m1, &count);
    }
    if (events)
        *events += count;
    return status;
}

/* C = A @ B accumulated, B a strided matrix [P, K, N] (sap, sbp = 0: one A or B for every matrix) */
int precsim_acc_gemm(long P, long M, long N, long K, const float *A, long sap, long sam, long sak, const float *B,
                     long sbp, long sbk, long sbn, const float *S, float *C, float *T, long block, long promote,
                     const int32_t *format_, int threads) {
    source_t src = {.b = B, .sbp = sbp, .sbk = sbk, .sbn = sbn};
    fmt_t f = format(format_);
    return run_parallel(P, M, N, K, A, sap, sam, sak, &src, S, C, T, block, promote, &f, threads, NULL);
}

/* The same for a conv3d (groups 1): X [P, c, d, h, w] contiguous, W the weight flattened to
 * [M, c * kd * kh * kw] (row stride ldw), geometry g = {c, d, h, w, kd, kh, kw, stride (3),
 * padding (3), dilation (3), od, oh, ow}; C [P, M, od * oh * ow] */
int precsim_acc_conv(long P, long M, const float *W, long ldw, const float *X, const long *g, const float *S,
                     float *C, float *T, long block, long promote, const int32_t *format_, int threads) {
    source_t src = {X, 0, 0, 0, 1, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12],
                    g[13], g[14], g[15], g[16], g[17], g[18]};
    fmt_t f = format(format_);
    return run_parallel(P, M, g[16] * g[17] * g[18], g[0] * g[4] * g[5] * g[6], W, 0, ldw, 1, &src, S, C, T, block,
                        promote, &f, threads, NULL);
}

/* precsim_acc_gemm for integer codes (block sums exact in float32) with a `bits`-bit accumulator
 * (8..48), wrapped or saturated: S, C and T int64; the overflow events are added to *events */
int precsim_acc_int_gemm(long P, long M, long N, long K, const float *A, long sap, long sam, long sak,
                         const float *B, long sbp, long sbk, long sbn, const int64_t *S, int64_t *C, int64_t *T,
                         long block, long promote, int bits, int saturate, int threads, long *events) {
    source_t src = {.b = B, .sbp = sbp, .sbk = sbk, .sbn = sbn};
    fmt_t f = {.integer = 1, .saturate = saturate, .lo = -((int64_t)1 << (bits - 1)),
               .hi = ((int64_t)1 << (bits - 1)) - 1};
    return run_parallel(P, M, N, K, A, sap, sam, sak, &src, S, C, T, block, promote, &f, threads, events);
}

/* 1 where this library runs threads (built with OpenMP), else 0 */
int precsim_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
