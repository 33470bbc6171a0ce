// --- GEMV on integer activations with dp4a (as llama.cpp's MMVQ) ------------------------------
// The float GEMV (quant_gemv.cu) is bound by its activation traffic (a float per weight nibble, from L1)
// and its decode instructions. Here a pre-pass quantizes each activation row once per product
// (quantize_x), and a format's dot32() multiplies its raw weight bytes with __dp4a.
// llama.cpp rounds the activations to int8 per 32 values; measured here, that moved decode
// logits by 1-2% against fp32 and failed the GPU-vs-NumPy engine tests (bound 1%, identical
// greedy tokens). So each value is rounded to q in [-16256, 16256] (127 * 128, 15 bits) and
// stored as two int8 planes, q = 128 h + l with h = q >> 7, l = q & 127: two dp4a per weight
// word and half the fp32 path's activation bytes (logits then within ~1e-3 of fp32).
//
// quantize_x: v the product's input (MODE as in gemv), rounded per 32 values by common.cu's
// quantize8 into the layout xq_chunk describes. MODE 1 quantizes nw * x and folds the norm
// into the scale (ds.x = d * rinv): q is scale-invariant, so no pass over the row has to come
// first. MODE 2's SiLU takes exp in double so that the NumPy twin
// (numpy_backend.quantize_q8_input) reproduces v to the bit.
// Grid (K / (8 blockDim.x) rounded up, T); a thread quantizes 8 values, 4 neighbouring lanes a
// block.
// A 1-token product after decode attention skips it: attention.cu quantizes its own output.
template <int MODE>
__device__ __forceinline__ void quantize_x(const float* __restrict__ x, int sx, int K, const float* __restrict__ nw,
                                           float eps, u8* __restrict__ xq, int sq, float2* __restrict__ ds, int sd) {
    __shared__ float scratch[32];
    // launched programmatically, the product after it may launch once the one before has
    // finished, not earlier: its blocks would compete with that product's last wave
    pdl_wait();
    pdl_trigger();
    const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x, pos = 8 * c;
    const float* xr = x + (size_t)t * sx;
    float v[8] = {};
    if (pos < K) {
        float unused = 0.0f;
        if (MODE == 2) {
            const float4 a = *(const float4*)(xr + pos), b = *(const float4*)(xr + pos + 4);
            const float4 c2 = *(const float4*)(xr + K + pos), d2 = *(const float4*)(xr + K + pos + 4);
            const float g[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            const float u[8] = {c2.x, c2.y, c2.z, c2.w, d2.x, d2.y, d2.z, d2.w};
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = g[i] / (1.0f + (float)exp(-(double)g[i])) * u[i];
        } else {
            load_x8<MODE>(xr, pos, K, nw, v, unused);
        }
    }
    // MODE 1: the row's sum of squares after this thread's own x and nw loads are issued, so
    // both round trips overlap
    float rinv = 1.0f;
    if (MODE == 1) {
        float ss = 0.0f;
        for (int i = 4 * threadIdx.x; i < K; i += 4 * blockDim.x) {
            const float4 a = *(const float4*)(xr + i);
            ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        }
        rinv = 1.0f / sqrtf(block_sum(ss, scratch) / (float)K + eps);
    }
    quantize8(v, pos < K, pos, rinv, xq + (size_t)t * sq, ds + (size_t)t * sd);
}

// 1/rms of a K-value row from its sums of squares per 32 values (gemv_q8_round's yss), summed in
// a fixed order: every warp gets the same bits. start() asks for the first 32 N before a
// product's loop, so that their round trip overlaps it; finish() adds the rest. (N = 0 for
// Q6_K, whose GEMV spills 84 bytes with them in registers.)
template <int N>
struct RmsInv {
    float s[N > 0 ? N : 1] = {};
    __device__ void start(const float* __restrict__ ss, int K) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int k = 0; k < N; k++)
            if (lane + 32 * k < K / 32) s[k] = ss[lane + 32 * k];
    }
    __device__ float finish(const float* __restrict__ ss, int K, float eps) const {
        float t = 0.0f;
#pragma unroll
        for (int k = 0; k < N; k++) t += s[k];
        for (int i = (threadIdx.x & 31) + 32 * N; i < K / 32; i += 32) t += ss[i];
        return 1.0f / sqrtf(warp_sum(t) / (float)K + eps);
    }
};

// out[t, row] = sum over 32-value blocks b of dot32(W[row] block b, x[t] block b). Same warp
// and lane layout as gemv; a lane's sub-blocks each load the block's 64 bytes and its ds.
// Those x loads set Q4_K's pace while a block's 64 bytes were contiguous (H100, 8B gate_up:
// 27.5 us with one int8 plane, 39.8 with two): lanes 128 bytes apart made each 16-byte load
// instruction touch 32 L1 lines; xq_chunk's order makes it 4.
template <class Q, int NT>
__device__ __forceinline__ void gemv_q8(const Planes& w, int rows, int nb, const u8* __restrict__ xq, int sq,
                                        const float2* __restrict__ xds, int sd, const float* __restrict__ xss,
                                        float eps, int T, float* __restrict__ out, int so,
                                        const float* __restrict__ bias, const float* __restrict__ res, int sr,
                                        int ksplit) {
    constexpr int R = Q::RQ;
    float acc[R][NT], ss[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        ss[t] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][t] = 0.0f;
    }
    RmsInv<(sizeof(typename Q::Raw) > 48 ? 0 : 4)> rms;
    const int row0 = for_each_unit<Q, R>(w, rows, nb, ksplit, [&](const typename Q::Raw(&raw)[R], int b, int j) {
#pragma unroll
        for (int h = 0; h < Q::NG / 4; h++) {
            const int pos = b * Q::QK + Q::xoff(j, 4 * h);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (NT > 1 && t >= T) continue;
                const X32 x = load_x32(xq + (size_t)t * sq, xds + (size_t)t * sd, pos);
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][t] += Q::dot32(raw[r], j, h, x);
            }
        }
    }, [&] {
        if (xss) rms.start(xss, nb * Q::QK);
    });
    if (xss) {  // x was rounded by the product that made it (gemv_q8_round), before its RMSNorm's 1/rms
        const float s = rms.finish(xss, nb * Q::QK, eps);
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[r][t] *= s;
    }
    gemv_store<R, NT, 0>(acc, ss, rows, row0, 0, 0.0f, T, out, so, bias, res, sr, ksplit);
}

// --- 1-token products that round their output for the next product -----------------------
// Otherwise each dp4a product's input is made by quantize_x, a kernel of its own between two
// products on the step's critical path. A residual-stream product (wo, down: out = dot + bias
// + res, read through an RMSNorm by the next one) does it here: a block owns 32 consecutive
// outputs, so once its warps' partial sums meet in shared memory one warp holds a whole
// 32-value block of nw * out and rounds it (common.cu quantize32), no other block, counter or
// fence involved; it stores the block's sum of out^2 in yss[block], which the consumer sums
// in a fixed order for 1/rms (RmsInv) and applies after its dot products. (Measured on an
// H100, docs/benchmarks.md: this pays where the next product is gemv_q8, 2 of 3 quantizers
// a layer; gate_up rounding its SwiGLU for down lost more than the quantizer costs.)
// Lanes: 8 neighbours take 8 consecutive units of a row (128 contiguous bytes of the
// interleaved planes) and a warp's 4 octets 4 rows, so a load instruction reads 4 whole
// 128-byte pieces. A thread takes NR = Q::RQ rows, as gemv_q8 (2, or 4 of the small 32-value
// units), so that a block of 32 warps fits the register file (a 4096-output product has one
// block per SM: its loads in flight set its speed): rows r = oct + 4 (w % RW) + 32 i / NR of
// the block, RW = 8 / NR warps covering its 32 rows; warp w takes run w / RW of 8 units,
// then every (warps / RW)-th.
template <class Q>
__device__ __forceinline__ void gemv_q8_round(const Planes& w, int nb, const u8* __restrict__ xq,
                                              const float2* __restrict__ xds, float* __restrict__ out,
                                              const float* __restrict__ bias, const float* __restrict__ res,
                                              const float* __restrict__ nw, u8* __restrict__ yq,
                                              float2* __restrict__ yds, float* __restrict__ yss) {
    constexpr int NR = Q::RQ, RW = 8 / NR;
    __shared__ float part[32 / RW][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, oct = lane >> 3;
    const int runs = (blockDim.x >> 5) / RW, run = warp / RW, o0 = blockIdx.x * 32;
    const int units = nb * Q::UPB, u0 = (lane & 7) + 8 * run;
    const int r = oct + 4 * (warp % RW);  // the block's row of acc[i] is r + 32 i / NR
    pdl_trigger();
    if (u0 < units) {  // the first unit of each row into L2 while the kernel before still runs
        const int b = u0 / Q::UPB, j = u0 - b * Q::UPB;
#pragma unroll
        for (int i = 0; i < NR; i++) (void)Q::template load<PREFETCH>(w, o0 + r + 32 * i / NR, b, j);
    }
    // warp 0's epilogue operands, asked for before the wait and the loop so that their round
    // trips overlap them (res: once the kernel before has written it)
    const int o = o0 + lane;
    float add = 0.0f, nwo = 0.0f, resv = 0.0f;
    if (warp == 0) {
        if (bias) add = bias[o];
        nwo = nw[o];
    }
    pdl_wait();
    if (warp == 0 && res) resv = res[o];
    float acc[NR] = {};
    for (int u = u0; u < units; u += 8 * runs) {
        const int b = u / Q::UPB, j = u - b * Q::UPB;
        typename Q::Raw raw[NR];
#pragma unroll
        for (int i = 0; i < NR; i++) raw[i] = Q::template load<true>(w, o0 + r + 32 * i / NR, b, j);
#pragma unroll
        for (int h = 0; h < Q::NG / 4; h++) {
            const int pos = b * Q::QK + Q::xoff(j, 4 * h);
            const X32 x = load_x32(xq, xds, pos);
#pragma unroll
            for (int i = 0; i < NR; i++) acc[i] += Q::dot32(raw[i], j, h, x);
        }
    }
#pragma unroll
    for (int i = 0; i < NR; i++) {
        acc[i] += __shfl_xor_sync(FULL_MASK, acc[i], 1);
        acc[i] += __shfl_xor_sync(FULL_MASK, acc[i], 2);
        acc[i] += __shfl_xor_sync(FULL_MASK, acc[i], 4);
        if ((lane & 7) == 0) part[run][r + 32 * i / NR] = acc[i];
    }
    __syncthreads();
    if (warp != 0) return;
    float v = 0.0f;
    for (int k = 0; k < runs; k++) v += part[k][lane];
    v += add + resv;
    out[o] = v;
    const float ss = warp_sum(v * v);
    if (lane == 0) yss[blockIdx.x] = ss;
    quantize32(v * nwo, blockIdx.x, yq, yds);
}

#define DEF_GEMV_Q8(NT)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, NT == 1 ? 8 : 4)                                     \
        gemv_q8_##NT(PLANE_ARGS, int rows, int nb, int K, const u8* xq, int sq, const float2* xds, int sd,            \
                     const float* xss, float eps, int T, float* out, int so, const float* bias, const float* res,      \
                     int sr, int ksplit) {                                                                             \
        if constexpr (HasDot<QT>::v) {                                                                                  \
            const Planes w = PLANES;                                                                                    \
            gemv_q8<QT, NT>(w, rows, nb, xq, sq, xds, sd, xss, eps, T, out, so, bias, res, sr, ksplit);                \
        }                                                                                                               \
    }
DEF_GEMV_Q8(1)
DEF_GEMV_Q8(4)

// Up to 32 warps at 64 registers; Q6_K's larger raw blocks spill there (60 bytes): 24 at 80.
extern "C" __global__ void __launch_bounds__(sizeof(QT::Raw) > 48 ? 768 : 1024, 1)
    gemv_q8_round(PLANE_ARGS, int nb, const u8* xq, const float2* xds, float* out, const float* bias,
                  const float* res, const float* nw, u8* yq, float2* yds, float* yss) {
    if constexpr (HasDot<QT>::v) {
        const Planes w = PLANES;
        gemv_q8_round<QT>(w, nb, xq, xds, out, bias, res, nw, yq, yds, yss);
    }
}

#define DEF_QUANTIZE_X(MODE)                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                                  \
        quantize_x_##MODE(const float* x, int sx, int K, const float* nw, float eps, u8* xq, int sq, float2* ds,      \
                          int sd) {                                                                                     \
        quantize_x<MODE>(x, sx, K, nw, eps, xq, sq, ds, sd);                                                            \
    }
DEF_QUANTIZE_X(0)
DEF_QUANTIZE_X(1)
DEF_QUANTIZE_X(2)
