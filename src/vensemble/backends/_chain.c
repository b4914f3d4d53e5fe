/* Every member's chain of Linear layers and piecewise-linear activations in one pass.
 *
 * Built at run time by vensemble/backends/native.py (cc -O3 -march=native -fopenmp -shared)
 * and called through ctypes, for CPU inference. Each thread takes tiles of TILE rows of one
 * member at a time and runs them through every layer while the activations stay in registers
 * and L1; a batched GEMM per layer instead writes every member's activations to memory and
 * reads them back for the next layer.
 *
 * Layout inside a tile: features-major, rows in the vector lanes (A[k * TILE + r]). Output o
 * of a layer for TILE rows is bias[o] + sum_k W^T[k, o] * A[k, :]: a broadcast of one weight
 * times two vectors of rows (one, for a tile of at most a vector's rows: half the work). A
 * batch of at most FEW rows runs the other way round, outputs in the lanes and all rows at
 * once (see _chain.h). Any width runs at full vector width (a one-output head too), and
 * the weights are read in the ensemble's in-major layout (W^T, (in, out) per member), as
 * stored, without a copy. _chain.h holds the code; it is included once per dtype.
 */
#include <stdint.h>
#include <stdlib.h>

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_LEAKY = 2, ACT_CLAMP = 3 };

/* The vector: as wide as the target's registers (-march=native): a vector wider than them is
 * split by the compiler into pieces that no longer fit the registers (on an AVX2 CPU the
 * 64-byte vector ran the kernel 15-30x slower than torch's batched GEMM). */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif

/* The widest vector any build uses: scratch tiles are aligned to it. */
#define ALIGN 64

/* One Linear layer and the activation after it, for member 0: member m's weight and bias
 * lie m * w_stride and m * b_stride elements further. The same struct serves both dtypes
 * (the activation's constants are doubles). */
typedef struct {
    int64_t in, out;
    const void *w; /* W^T: (in, out), row-major */
    int64_t w_stride;
    const void *b; /* (out), or NULL */
    int64_t b_stride;
    int32_t act;
    double slope, lo, hi;
} Layer;

#define REAL float
#define LANES (VBYTES / 4)
#define INT int32_t
#define FN(name) name##_f32
#include "_chain.h"
#undef REAL
#undef LANES
#undef INT
#undef FN

#define REAL double
#define LANES (VBYTES / 8)
#define INT int64_t
#define FN(name) name##_f64
#include "_chain.h"
