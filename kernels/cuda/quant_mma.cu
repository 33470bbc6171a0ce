// --- tensor-core product on the quantized weights, 2 <= T <= 64 tokens ---------------------
// Batched decode: fp32 FMAs would make 64 tokens compute-bound, and dequantize + cuBLAS moves
// 4x the weight bytes. A tile is 128 weight rows x 64 tokens; per 128-value step of K the 256
// threads decode 32 values of two rows each into fp16 shared memory beside an fp16 copy of x,
// and 8 warps run mma.m16n8k16 (fp32 accumulation), each on 32 rows x 32 tokens. Four lanes
// share a row, so each block load of a warp touches 8 rows (8 cache lines) for 1024 values:
// these scattered loads, not DRAM bytes, set the pace (H100, 8B Q4_K gate_up at 64 / 4 tokens:
// 138 / 103 us with 64-value steps and 16 rows a load, 110 / 95 us with this; DRAM alone 22 us).
// Pipelined, one barrier a step: both tiles have two shared stages; while step s multiplies
// from one, the next step's raw blocks are in flight to registers and its x to the other stage
// (cp.async), and warps done with their MMAs decode step s + 1 while others still multiply.
// Work split (stream-K): the grid is what fits on the SMs at once (2 blocks each), and block b
// takes steps [b total / grid, (b + 1) total / grid) of the (tile, step) sequence, so every SM
// gets the same number of steps whatever the shape; a tile shared by blocks is summed with
// fp32 atomic adds into a zeroed output, its first block adding bias and residual.
// MMA_BM, MMA_BN, MMA_BK and MMA_BLOCKS_PER_SM come defined before this text
// (kernels/cupy/kernel_constants.py).
#define MMA_W_STAGE (MMA_BM * MMA_BK * 2)
#define MMA_X_STAGE (MMA_BN * MMA_BK * 2)

// The group's 8 values a * (code - OFF) - m as fp16 pairs, in half the instructions of the
// fp32 route: PRMT puts each code byte under fp16's exponent of 1024 (0x64XX = 1024 + code,
// exact), one subtraction of 1024 + OFF (exact), one fp16 FMA. a and m are rounded to fp16
// first (2^-11 relative), which the tile's fp16 values are anyway.
template <class Q>
__device__ __forceinline__ uint4 codes_h2(u32 c0, u32 c1, float a, float m) {
    constexpr u32 z = (0x6400u + Q::OFF) * 0x10001u;
    const u32 a2 = pack_h2(a, a), m2 = pack_h2(-m, -m);
    auto v = [&](u32 c, u32 sel) {
        u32 h = __byte_perm(c, 0x64646464u, sel), r;
        asm("sub.f16x2 %0, %1, %2;" : "=r"(h) : "r"(h), "r"(z));
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(h), "r"(a2), "r"(m2));
        return r;
    };
    return make_uint4(v(c0, 0x4140), v(c0, 0x4342), v(c1, 0x4140), v(c1, 0x4342));
}
// Byte offset of 16-byte chunk c (0..15) of row r in a [rows][128] fp16 tile. The chunk is
// XORed with the row so that ldmatrix's 8 row addresses and the decode's stores hit distinct
// banks without padding.
__device__ __forceinline__ u32 swz(int r, int c) { return r * (MMA_BK * 2) + ((c ^ (r & 7)) << 4); }

template <class Q>
__device__ __forceinline__ void qmma(const Planes& w, int rows, int K, const u16* __restrict__ x16, int sx, int T,
                                     float* __restrict__ out, int so, const float* __restrict__ bias,
                                     const float* __restrict__ res, int sr) {
    extern __shared__ __align__(128) u8 smem[];  // w stages 0, 1, then x stages 0, 1
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const int n0 = blockIdx.y * MMA_BN, wm = (warp & 3) * 32, wn = (warp >> 2) * 32;
    const u32 ws0 = smem_addr(smem), xs0 = ws0 + 2 * MMA_W_STAGE;
    const int steps = K / MMA_BK;
    const long long total = (long long)((rows + MMA_BM - 1) / MMA_BM) * steps;
    long long at = total * blockIdx.x / gridDim.x;
    const long long end = total * (blockIdx.x + 1) / gridDim.x;
    // thread tid decodes values [32 (tid % 4), +32) of each step of weight rows tid / 4 and +64
    const int rq = tid >> 2, quarter = tid & 3;
    pdl_trigger();
    while (at < end) {
        const int tile = (int)(at / steps), s0 = (int)(at - (long long)tile * steps);
        const int s1 = (int)min((long long)steps, s0 + (end - at));
        at += s1 - s0;
        const int m0 = tile * MMA_BM;

        float acc[2][4][4];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

        typename Q::Raw raw[2];
        int b, j, g0;
        auto fetch = [&](int st) {
            const int v = st * MMA_BK + 32 * quarter;
            b = v / Q::QK;
            Q::locate32(v - b * Q::QK, j, g0);
#pragma unroll
            for (int h = 0; h < 2; h++)
                raw[h] = Q::template load<false>(w, (size_t)min(m0 + rq + 64 * h, rows - 1), b, j);
        };
        auto stage_x = [&](int st, int buf) {
#pragma unroll
            for (int i = 0; i < MMA_BN * (MMA_BK / 8) / 256; i++) {
                const int n = (tid >> 4) + 16 * i, k8 = tid & 15;
                const bool in = n0 + n < T;
                cp_async16(xs0 + buf * MMA_X_STAGE + swz(n, k8),
                           in ? x16 + (size_t)(n0 + n) * sx + st * MMA_BK + k8 * 8 : x16, in ? 16 : 0);
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        };
        fetch(s0);  // weights only: launched programmatically, the previous kernel may still run
        pdl_wait();
        stage_x(s0, 0);
        for (int st = s0; st < s1; st++) {
            const int buf = (st - s0) & 1;
#pragma unroll
            for (int h = 0; h < 2; h++) {
#pragma unroll
                for (int gg = 0; gg < 4; gg++) {
                    // g0 % 4 == 0, so (g & 3) == gg is known at compile time and raw stays in
                    // registers; g itself is the same across the warp (no divergent groups)
                    const int g = (g0 & ~3) + gg;
                    u32 c0, c1;
                    float a, m;
                    Q::codes(raw[h], j, g, c0, c1, a, m);
                    const int c = (b * Q::QK + Q::xoff(j, g) - st * MMA_BK) >> 3;
                    *(uint4*)(smem + buf * MMA_W_STAGE + swz(rq + 64 * h, c)) = codes_h2<Q>(c0, c1, a, m);
                }
            }
            if (st + 1 < s1) fetch(st + 1);
            asm volatile("cp.async.wait_all;" ::: "memory");
            __syncthreads();
            if (st + 1 < s1) stage_x(st + 1, buf ^ 1);
            const u32 wb = ws0 + buf * MMA_W_STAGE, xb = xs0 + buf * MMA_X_STAGE;
#pragma unroll
            for (int kk = 0; kk < MMA_BK / 8; kk += 2) {
                u32 a[2][4];
#pragma unroll
                for (int i = 0; i < 2; i++) ldsm4(a[i], wb + swz(wm + i * 16 + (lane & 15), kk + (lane >> 4)));
#pragma unroll
                for (int p = 0; p < 2; p++) {  // tokens wn + 16 p .. + 15, skipped past T
                    if (n0 + wn + 16 * p >= T) continue;
                    u32 bf[4];  // b0, b1 of token group 2p, then of 2p + 1
                    ldsm4(bf, xb + swz(wn + 16 * p + ((lane >> 4) << 3) + (lane & 7), kk + ((lane >> 3) & 1)));
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        mma16816(acc[i][2 * p], a[i], bf[0], bf[1]);
                        mma16816(acc[i][2 * p + 1], a[i], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads();  // the next tile's first step rewrites stage 0
        // acc[i][j] = {(row g, token 2t), (row g, token 2t+1), (row g+8, token 2t), (row g+8, token 2t+1)}
        const bool whole = s0 == 0 && s1 == steps;
#pragma unroll
        for (int i = 0; i < 2; i++) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int row = m0 + wm + i * 16 + gq + (e >> 1) * 8, t = n0 + wn + j * 8 + tq * 2 + (e & 1);
                    if (row >= rows || t >= T) continue;
                    float v = acc[i][j][e];
                    if (s0 == 0) {
                        if (bias) v += bias[row];
                        if (res) v += res[(size_t)t * sr + row];
                    }
                    if (whole) out[(size_t)t * so + row] = v;
                    else atomicAdd(out + (size_t)t * so + row, v);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, MMA_BLOCKS_PER_SM)
    qmma_64(PLANE_ARGS, int rows, int nb, int K, const u16* x16, int sx, int T, float* out, int so, const float* bias,
            const float* res, int sr) {
    if constexpr (HasCodes<QT>::v) {  // block formats only (QMatrix.qmma)
        const Planes w = PLANES;
        qmma<QT>(w, rows, K, x16, sx, T, out, so, bias, res, sr);
    }
}

