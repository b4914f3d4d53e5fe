/* The kernel for one dtype: REAL (float or double), LANES of them per VBYTES-byte vector, INT
 * the integer of the same width, FN(name) the dtype's name for each function (see _chain.c). */
#define TILE (2 * LANES) /* rows per tile: two vectors */

typedef REAL FN(vec) __attribute__((vector_size(VBYTES)));
typedef INT FN(mask) __attribute__((vector_size(VBYTES)));
#define VEC FN(vec)
#define MASK FN(mask)

static inline VEC FN(splat)(REAL s) { return (VEC){0} + s; }

/* s in every lane, its sign kept: a bound of -0.0 clamps to -0.0, as torch's clamp (0.0 + -0.0
 * is +0.0; -0.0 - 0.0 is -0.0). A bias is splat (its -0.0 as +0.0, as the loop's GEMM ends). */
static inline VEC FN(exact)(REAL s) { return s - (VEC){0}; }

/* NaN stays NaN, as in torch: every comparison below is false for it. */
static inline VEC FN(activate)(VEC v, const Layer *l) {
    switch (l->act) {
    case ACT_RELU:
        return (VEC)((MASK)v & ~(v < 0));
    case ACT_LEAKY: { /* as torch: x > 0 ? x : x * slope (0 * slope is NaN for slope inf) */
        MASK pos = v > 0;
        return (VEC)(((MASK)v & pos) | ((MASK)(v * (REAL)l->slope) & ~pos));
    }
    case ACT_CLAMP: {
        MASK low = v < (REAL)l->lo, high = v > (REAL)l->hi;
        VEC lo = FN(exact)((REAL)l->lo), hi = FN(exact)((REAL)l->hi);
        return (VEC)(((MASK)lo & low) | ((MASK)hi & high) | ((MASK)v & ~(low | high)));
    }
    default:
        return v;
    }
}

/* Outputs o0 .. o0 + NB - 1 of one layer for one tile: A (in, TILE) -> B (out, TILE).
 * block: both vectors of rows; half: the first only (a tile of at most LANES rows). */
#define BLOCK(NB)                                                                              \
    static void FN(block##NB)(const REAL *restrict A, const Layer *l, const REAL *w,           \
                              const REAL *b, int64_t o0, REAL *restrict B) {                   \
        VEC lo[NB], hi[NB];                                                                    \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                 \
            lo[j] = hi[j] = FN(splat)(b ? b[o0 + j] : (REAL)0);                                \
        }                                                                                      \
        const int64_t in = l->in, out = l->out;                                                \
        for (int64_t k = 0; k < in; k++) {                                                     \
            VEC a0 = *(const VEC *)(A + k * TILE), a1 = *(const VEC *)(A + k * TILE + LANES);  \
            const REAL *wk = w + k * out + o0;                                                 \
            _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                             \
                lo[j] += wk[j] * a0;                                                           \
                hi[j] += wk[j] * a1;                                                           \
            }                                                                                  \
        }                                                                                      \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                 \
            *(VEC *)(B + (o0 + j) * TILE) = FN(activate)(lo[j], l);                            \
            *(VEC *)(B + (o0 + j) * TILE + LANES) = FN(activate)(hi[j], l);                    \
        }                                                                                      \
    }                                                                                          \
    static void FN(half##NB)(const REAL *restrict A, const Layer *l, const REAL *w,            \
                             const REAL *b, int64_t o0, REAL *restrict B) {                    \
        VEC lo[NB];                                                                            \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                 \
            lo[j] = FN(splat)(b ? b[o0 + j] : (REAL)0);                                        \
        }                                                                                      \
        const int64_t in = l->in, out = l->out;                                                \
        for (int64_t k = 0; k < in; k++) {                                                     \
            VEC a0 = *(const VEC *)(A + k * TILE);                                             \
            const REAL *wk = w + k * out + o0;                                                 \
            _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) lo[j] += wk[j] * a0;          \
        }                                                                                      \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                 \
            *(VEC *)(B + (o0 + j) * TILE) = FN(activate)(lo[j], l);                            \
        }                                                                                      \
    }

BLOCK(8)
BLOCK(4)
BLOCK(2)
BLOCK(1)
#undef BLOCK

/* One layer for one tile of member m; half: only the tile's first vector of rows is live. */
static void FN(layer)(const REAL *A, const Layer *l, int64_t m, REAL *B, int half) {
    const REAL *w = (const REAL *)l->w + m * l->w_stride;
    const REAL *b = l->b ? (const REAL *)l->b + m * l->b_stride : NULL;
    int64_t o = 0;
    if (half) {
        for (; o + 8 <= l->out; o += 8) FN(half8)(A, l, w, b, o, B);
        if (o + 4 <= l->out) {
            FN(half4)(A, l, w, b, o, B);
            o += 4;
        }
        if (o + 2 <= l->out) {
            FN(half2)(A, l, w, b, o, B);
            o += 2;
        }
        if (o < l->out) FN(half1)(A, l, w, b, o, B);
        return;
    }
    for (; o + 8 <= l->out; o += 8) FN(block8)(A, l, w, b, o, B);
    if (o + 4 <= l->out) {
        FN(block4)(A, l, w, b, o, B);
        o += 4;
    }
    if (o + 2 <= l->out) {
        FN(block2)(A, l, w, b, o, B);
        o += 2;
    }
    if (o < l->out) FN(block1)(A, l, w, b, o, B);
}

/* A batch of at most FEW rows (an agent acting): outputs in the vector lanes instead, all
 * rows at once, so each weight is read once per call and no lane computes a padding row.
 * Row-major activations: A[r * in + k] -> B[r * out + o]. NV vectors of outputs at a time,
 * then one, then one for the last fewer than LANES outputs (its other lanes idle), or, for
 * fewer than VEC_TAIL of them, one output at a time. */
#define FEW 8
#define NV 4
#define VEC_TAIL 4 /* the last outputs of a layer, when fewer: one at a time (a value head) */

static inline VEC FN(load)(const REAL *p) {
    VEC v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void FN(store)(REAL *p, VEC v) { __builtin_memcpy(p, &v, sizeof v); }

/* One lane of FN(activate): for the last output or few of a layer. */
static inline REAL FN(activate1)(REAL v, const Layer *l) {
    switch (l->act) {
    case ACT_RELU:
        return v < 0 ? (REAL)0 : v; /* (as the vector code: NaN and -0.0 go through) */
    case ACT_LEAKY:
        return v > 0 ? v : v * (REAL)l->slope;
    case ACT_CLAMP:
        return v < (REAL)l->lo ? (REAL)l->lo : v > (REAL)l->hi ? (REAL)l->hi : v;
    default:
        return v;
    }
}

#define FEW_ROWS(R)                                                                            \
    static void FN(few##R)(const REAL *restrict A, const Layer *l, const REAL *w,              \
                           const REAL *b, REAL *restrict B) {                                  \
        const int64_t in = l->in, out = l->out;                                                \
        int64_t o0 = 0;                                                                        \
        for (; o0 + NV * LANES <= out; o0 += NV * LANES) {                                     \
            VEC acc[R][NV];                                                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                             \
                VEC bv = b ? FN(load)(b + o0 + v * LANES) : FN(splat)(0);                      \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][v] = bv;            \
            }                                                                                  \
            for (int64_t k = 0; k < in; k++) {                                                 \
                VEC wv[NV];                                                                    \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) wv[v] =                   \
                    FN(load)(w + k * out + o0 + v * LANES);                                    \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                          \
                    REAL a = A[r * in + k];                                                    \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] +=          \
                        a * wv[v];                                                             \
                }                                                                              \
            }                                                                                  \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                              \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) FN(store)(               \
                    B + r * out + o0 + v * LANES, FN(activate)(acc[r][v], l));                 \
            }                                                                                  \
        }                                                                                      \
        for (; o0 + LANES <= out; o0 += LANES) {                                               \
            VEC acc[R];                                                                        \
            VEC bv = b ? FN(load)(b + o0) : FN(splat)(0);                                      \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] = bv;                   \
            for (int64_t k = 0; k < in; k++) {                                                 \
                VEC wv = FN(load)(w + k * out + o0);                                           \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] += A[r * in + k] * wv; \
            }                                                                                  \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) FN(store)(                    \
                B + r * out + o0, FN(activate)(acc[r], l));                                    \
        }                                                                                      \
        if (out - o0 > 0 && out - o0 < VEC_TAIL) { /* a last output or few, one at a time */   \
            for (; o0 < out; o0++) {                                                           \
                REAL acc[R];                                                                   \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] =                   \
                    b ? b[o0] : (REAL)0;                                                       \
                for (int64_t k = 0; k < in; k++) {                                             \
                    REAL wk = w[k * out + o0];                                                 \
                    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] +=              \
                        A[r * in + k] * wk;                                                    \
                }                                                                              \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) B[r * out + o0] =          \
                    FN(activate1)(acc[r], l);                                                  \
            }                                                                                  \
        }                                                                                      \
        if (o0 < out) { /* the last fewer than LANES outputs: one vector, lanes past out idle */ \
            const int64_t tail = out - o0, total = in * out;                                   \
            /* inputs whose vector of weights from o0 lies inside this member's W^T: it runs   \
             * into the next input's row (lanes never stored); the last few go lane by lane */ \
            int64_t kv = total - o0 >= LANES ? (total - o0 - LANES) / out + 1 : 0;             \
            if (kv > in) kv = in;                                                              \
            VEC bv = FN(splat)(0), acc[R];                                                     \
            for (int64_t j = 0; j < tail; j++) bv[j] = b ? b[o0 + j] : (REAL)0;                \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] = bv;                   \
            for (int64_t k = 0; k < kv; k++) {                                                 \
                VEC wv = FN(load)(w + k * out + o0);                                           \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] += A[r * in + k] * wv; \
            }                                                                                  \
            REAL lanes[R][LANES]; /* (the sums so far, in memory: added to lane by lane) */    \
            __builtin_memcpy(lanes, acc, sizeof lanes);                                        \
            for (int64_t k = kv; k < in; k++) {                                                \
                for (int64_t j = 0; j < tail; j++) {                                           \
                    REAL wk = w[k * out + o0 + j];                                             \
                    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) lanes[r][j] +=         \
                        A[r * in + k] * wk;                                                    \
                }                                                                              \
            }                                                                                  \
            __builtin_memcpy(acc, lanes, sizeof lanes);                                        \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                              \
                REAL v[LANES];                                                                 \
                FN(store)(v, FN(activate)(acc[r], l));                                         \
                for (int64_t j = 0; j < tail; j++) B[r * out + o0 + j] = v[j];                 \
            }                                                                                  \
        }                                                                                      \
    }

FEW_ROWS(1)
FEW_ROWS(2)
FEW_ROWS(3)
FEW_ROWS(4)
FEW_ROWS(5)
FEW_ROWS(6)
FEW_ROWS(7)
FEW_ROWS(8)
#undef FEW_ROWS

static void FN(few)(const REAL *A, const Layer *l, int64_t m, int64_t rows, REAL *B) {
    const REAL *w = (const REAL *)l->w + m * l->w_stride;
    const REAL *b = l->b ? (const REAL *)l->b + m * l->b_stride : NULL;
    switch (rows) {
    case 1: FN(few1)(A, l, w, b, B); break;
    case 2: FN(few2)(A, l, w, b, B); break;
    case 3: FN(few3)(A, l, w, b, B); break;
    case 4: FN(few4)(A, l, w, b, B); break;
    case 5: FN(few5)(A, l, w, b, B); break;
    case 6: FN(few6)(A, l, w, b, B); break;
    case 7: FN(few7)(A, l, w, b, B); break;
    default: FN(few8)(A, l, w, b, B); break;
    }
}

/* Whether a batch of rows (<= FEW) runs the few-rows way: when it does less work than the tile
 * of at most one vector of rows, which computes one vector per output and input (its lanes
 * the rows, padded). The few-rows way computes, per row and input, one vector per LANES
 * outputs, and for the last fewer than LANES outputs one vector per input but the last few,
 * which go lane by lane, then stores those lanes one by one: the operations counted. (1000 x
 * 8-15-15-1 on 4 rows: 140 us the few-rows way against 120 on a tile; on 1 row 98 against 119.) */
int FN(vensemble_few_rows)(int64_t rows, int32_t depth, const Layer *layers) {
    if (rows < 1 || rows > FEW) return 0;
    int64_t few = 0, tile = 0;
    for (int i = 0; i < depth; i++) {
        const int64_t in = layers[i].in, out = layers[i].out, tail = out % LANES;
        const int64_t o0 = out - tail, total = in * out;
        int64_t kv = total - o0 >= LANES ? (total - o0 - LANES) / out + 1 : 0; /* as in FEW_ROWS */
        if (kv > in) kv = in;
        if (tail > 0 && tail < VEC_TAIL)
            few += rows * (in * (out / LANES) + in * tail);
        else
            few += rows * (in * (out / LANES) + (tail ? kv + (in - kv) * tail + tail : 0)) + tail;
        tile += in * out;
    }
    return few < tile;
}

/* The chain for rows <= FEW, one member per task: see FN(few). */
static int FN(chain_few)(int64_t n, int64_t rows, const REAL *x, int64_t x_stride,
                         int32_t depth, const Layer *layers, REAL *y, int32_t threads,
                         int64_t widest) {
    const int64_t in0 = layers[0].in, out = layers[depth - 1].out;
    const size_t bytes = (size_t)widest * FEW * sizeof(REAL);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        REAL *A = malloc(bytes), *B = malloc(bytes);
        if (!A || !B) failed = 1;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < n; m++) {
            if (!A || !B) continue;
            __builtin_memcpy(A, x + m * x_stride, (size_t)(rows * in0) * sizeof(REAL));
            REAL *src = A, *dst = B;
            for (int i = 0; i < depth; i++) {
                FN(few)(src, &layers[i], m, rows, dst);
                REAL *swap = src;
                src = dst;
                dst = swap;
            }
            __builtin_memcpy(y + m * rows * out, src, (size_t)(rows * out) * sizeof(REAL));
        }
        free(A);
        free(B);
    }
    return failed ? -1 : 0;
}

/* The rows of a tile: two vectors of them (the build's vector width: see _chain.c). */
int FN(vensemble_tile_rows)(void) { return TILE; }

/* y (n, rows, out of the last layer) = the chain applied to x: (rows, in of the first layer),
 * the same for every member when x_stride is 0, else member m's rows start at x + m *
 * x_stride. Returns 0, or -1 when scratch memory could not be allocated (y is then partly
 * written). */
int FN(vensemble_chain)(int64_t n, int64_t rows, const REAL *x, int64_t x_stride,
                        int32_t depth, const Layer *layers, REAL *y, int32_t threads) {
    int64_t widest = 0;
    for (int i = 0; i < depth; i++) {
        if (layers[i].in > widest) widest = layers[i].in;
        if (layers[i].out > widest) widest = layers[i].out;
    }
    if (FN(vensemble_few_rows)(rows, depth, layers))
        return FN(chain_few)(n, rows, x, x_stride, depth, layers, y, threads, widest);
    const int64_t tiles = (rows + TILE - 1) / TILE, in0 = layers[0].in;
    const int64_t out = layers[depth - 1].out;
    /* (rounded up to a multiple of ALIGN, as aligned_alloc wants) */
    const size_t bytes = ((size_t)widest * TILE * sizeof(REAL) + ALIGN - 1) / ALIGN * ALIGN;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        REAL *A = aligned_alloc(ALIGN, bytes), *B = aligned_alloc(ALIGN, bytes);
        if (!A || !B) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n * tiles; t++) {
            if (!A || !B) continue;
            const int64_t m = t / tiles, r0 = (t % tiles) * TILE;
            const int64_t nr = rows - r0 < TILE ? rows - r0 : TILE;
            const REAL *xs = x + m * x_stride + r0 * in0;
            for (int64_t k = 0; k < in0; k++) {
                for (int64_t r = 0; r < nr; r++) A[k * TILE + r] = xs[r * in0 + k];
                for (int64_t r = nr; r < TILE; r++) A[k * TILE + r] = 0;
            }
            REAL *src = A, *dst = B;
            const int half = nr <= LANES; /* (a batch of a few rows: half the work) */
            for (int i = 0; i < depth; i++) {
                FN(layer)(src, &layers[i], m, dst, half);
                REAL *swap = src;
                src = dst;
                dst = swap;
            }
            REAL *ys = y + (m * rows + r0) * out;
            for (int64_t r = 0; r < nr; r++)
                for (int64_t o = 0; o < out; o++) ys[r * out + o] = src[o * TILE + r];
        }
        free(A);
        free(B);
    }
    return failed ? -1 : 0;
}

#undef TILE
#undef FEW
#undef NV
#undef VEC_TAIL
#undef VEC
#undef MASK
