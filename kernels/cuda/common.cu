// Helpers shared by every module. No #include: NVRTC needs no CUDA headers this way, and
// fp16 conversions go through PTX directly.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Programmatic dependent launch (sm_90+): a kernel launched with it (kernels/launch.py) may
// start while the kernel before it in the stream still runs. Such a kernel reads only weights
// and step constants before pdl_wait(), which returns once that kernel has finished and its
// writes are visible; pdl_trigger() lets the next kernel start launching. Each is a no-op for
// a kernel launched without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Tensor cores (quant_mma.cu, attention.cu): D += A B for a 16x16 fp16 A (4 registers) and a
// 16x8 fp16 B (2), fp32 sums; ldmatrix loads four (or two) 8x8 fp16 matrices from shared
// memory, lane l giving a row address of matrix l / 8, each lane receiving two adjacent
// values of row l / 4 (trans: of column l / 4).
__device__ __forceinline__ void mma16816(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm4(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm4_trans(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm2_trans(u32 r[2], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, asynchronously (quant_mma.cu, attention.cu); n = 0 fills zeros
// without reading.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int n) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
// (lo, hi) rounded to an fp16 pair, lo in the low half (an mma operand's first value)
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Byte k of w (0..255) as an exact float plus 2^23: one PRMT instead of a quarter-rate I2F.
// Subtracting (2^23 + offset) afterwards is exact and folds in the format's zero point.
template <int K>
__device__ __forceinline__ float byte_f(u32 w) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + K));
}

__device__ __forceinline__ void bytes8(u32 w0, u32 w1, float off, float q[8]) {
    const float o = 8388608.0f + off;
    q[0] = byte_f<0>(w0) - o; q[1] = byte_f<1>(w0) - o; q[2] = byte_f<2>(w0) - o; q[3] = byte_f<3>(w0) - o;
    q[4] = byte_f<0>(w1) - o; q[5] = byte_f<1>(w1) - o; q[6] = byte_f<2>(w1) - o; q[7] = byte_f<3>(w1) - o;
}

// Word i (runtime) of a uint4 without spilling the vector to local memory.
__device__ __forceinline__ u32 word4(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ u32 byte_at4(const uint4& v, int i) { return (word4(v, i >> 2) >> (8 * (i & 3))) & 0xFF; }
__device__ __forceinline__ u32 byte_at3(u32 a, u32 b, u32 c, int i) {
    u32 w = i < 4 ? a : (i < 8 ? b : c);
    return (w >> (8 * (i & 3))) & 0xFF;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* scratch /* [32] */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// --- integer activations (quant_gemv_q8.cu's dp4a GEMV): their layout and quantizer ---------------
// Where chunk c of 32-value activation block b sits in a row of xq. Each block is 4 chunks of
// 16 bytes: its 32 high int8s (c = 0, 1), then its 32 low ones (c = 2, 3). Blocks pair up
// (p = b / 2: one Q4_K unit, two Q5_0/Q8_0 units) and runs of 32 pairs are stored
// chunk-major, so when a warp's lanes take 32 consecutive units each load instruction reads
// 512 contiguous bytes (Q4_K, Q5_0, Q8_0) or 16-byte pieces 32 bytes apart (Q6_K, whose unit
// holds blocks 2 apart). A row is XQ_RUN bytes per 2048 values (kernels/cupy/kernel_constants.py
// defines it before this text).
__device__ __forceinline__ int xq_chunk(int b, int c) {
    const int p = b >> 1;
    return (p >> 5) * XQ_RUN + ((b & 1) * 4 + c) * 512 + (p & 31) * 16;
}

// Values pos..pos+7 of a row (pos a multiple of 8; 4 neighbouring lanes hold a 32-value
// block): per block d = max|v| / 16256, q = rint(v / d) (0 where d = 0) stored as h = q >> 7
// and l = q & 127, ds[pos / 32] = {d * dscale, sum of the 32 q}. Every lane of the warp calls
// it; lanes with store false (past the row's end) hold zeros. (quant_gemv_q8.cu says why 15 bits;
// NumPy twin: quantize_q8.)
__device__ __forceinline__ void quantize8(const float (&v)[8], bool store, int pos, float dscale, u8* __restrict__ xq,
                                          float2* __restrict__ ds) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
    amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 2));
    const float d = amax / 16256.0f;
    int q[8], sum = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        q[i] = d > 0.0f ? __float2int_rn(v[i] / d) : 0;
        sum += q[i];
    }
    sum += __shfl_xor_sync(FULL_MASK, sum, 1);
    sum += __shfl_xor_sync(FULL_MASK, sum, 2);
    if (!store) return;
    u32 h[2], l[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int* p = q + 4 * i;
        h[i] = ((p[0] >> 7) & 0xFF) | ((p[1] >> 7) & 0xFF) << 8 | ((p[2] >> 7) & 0xFF) << 16 | (u32)(p[3] >> 7) << 24;
        l[i] = (p[0] & 127) | (p[1] & 127) << 8 | (p[2] & 127) << 16 | (u32)(p[3] & 127) << 24;
    }
    u8* o = xq + xq_chunk(pos >> 5, (pos & 31) >> 4) + (pos & 15);
    *(uint2*)o = make_uint2(h[0], h[1]);
    *(uint2*)(o + 2 * 512) = make_uint2(l[0], l[1]);
    if ((pos & 31) == 0) ds[pos / 32] = make_float2(d * dscale, (float)sum);
}

// quantize8 for a warp holding one whole 32-value block b, value `lane` in each lane (a
// 1-token product's block of outputs, quant_gemv_q8.cu gemv_q8_round): the same d, q and sum, the same
// bytes at the same places; ds[b] = {d, sum}.
__device__ __forceinline__ void quantize32(float v, int b, u8* __restrict__ xq, float2* __restrict__ ds) {
    const int lane = threadIdx.x & 31;
    const float d = warp_max(fabsf(v)) / 16256.0f;
    const int q = d > 0.0f ? __float2int_rn(v / d) : 0;
    int sum = q;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);
    // four neighbouring lanes' bytes make one word of each plane
    u32 h = ((u32)(q >> 7) & 0xFF) << (8 * (lane & 3)), l = (u32)(q & 127) << (8 * (lane & 3));
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        h |= __shfl_xor_sync(FULL_MASK, h, o);
        l |= __shfl_xor_sync(FULL_MASK, l, o);
    }
    if ((lane & 3) == 0) {
        *(u32*)(xq + xq_chunk(b, lane >> 4) + (lane & 15)) = h;
        *(u32*)(xq + xq_chunk(b, 2 + (lane >> 4)) + (lane & 15)) = l;
    }
    if (lane == 0) ds[b] = make_float2(d, (float)sum);
}

// Rotation of the pair (x0, x1) by pos * inv_freq. The angle is formed and reduced to
// [0, 2 pi) in double (as the NumPy twin forms it), then sin/cos in float: within 4e-7.
__device__ __forceinline__ void rope_pair(float& x0, float& x1, int pos, double inv_freq) {
    double a = (double)pos * inv_freq;
    a -= 6.283185307179586 * floor(a * 0.15915494309189535);
    float sf, cf;
    sincosf((float)a, &sf, &cf);
    const float r0 = x0 * cf - x1 * sf, r1 = x1 * cf + x0 * sf;
    x0 = r0;
    x1 = r1;
}

// Index pair rotated together: neox (i, i + D/2), normal (2i, 2i + 1).
__device__ __forceinline__ void rope_index(int i, int D, int neox, int& i0, int& i1) {
    if (neox) { i0 = i; i1 = i + D / 2; } else { i0 = 2 * i; i1 = 2 * i + 1; }
}
