// Element-wise and row-wise kernels (used where a fused path does not apply: the fp16 inputs
// of the tensor-core products, op tests), and sampling on the device so only token ids leave
// it. rmsnorm, swiglu and zero may be launched programmatically (common.cu pdl_wait); they
// let the product after them launch only once the kernel before them has finished, so that
// its blocks do not compete with that kernel's last wave (as quant_gemv_q8.cu's quantize_x).

// Output value k, or values 4 i4 .. 4 i4 + 3, of a row of fp16 or fp32.
__device__ __forceinline__ void store1(void* row, int k, float y, int f16) {
    if (f16) ((u16*)row)[k] = f2h(y);
    else ((float*)row)[k] = y;
}
__device__ __forceinline__ void store4(void* row, int i4, float4 y, int f16) {
    if (f16) ((uint2*)row)[i4] = make_uint2(f2h(y.x) | (u32)f2h(y.y) << 16, f2h(y.z) | (u32)f2h(y.w) << 16);
    else ((float4*)row)[i4] = y;
}
// Whether rows of n floats in (stride sx) and n values out (stride so, fp16 or fp32) allow
// 16-byte loads and 8- or 16-byte stores.
__device__ __forceinline__ bool by4(const void* in, int sx, const void* out, int so, int n) {
    return ((n | sx | so) & 3) == 0 && (((size_t)in | (size_t)out) & 15) == 0;
}

// p[0:n] = 0 (16-byte aligned) by all threads of the grid: a stream-K tensor-core product's
// output, which its blocks add into. Only after pdl_wait: it may be memory a kernel before
// still reads. rmsnorm and swiglu zero the output of the product they feed (zp, zn; zn = 0:
// none), saving that product a kernel of its own.
__device__ __forceinline__ void zero_span(float* __restrict__ p, int n) {
    const int step = gridDim.x * gridDim.y * blockDim.x;
    const int i0 = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
    for (int i = i0; i < n / 4; i += step) ((float4*)p)[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i = 4 * (n / 4) + i0; i < n; i += step) p[i] = 0.0f;
}

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, fp32 or fp16 out. One block per row, four
// values per load where the rows allow (the tensor-core products' inputs: 64 rows of 4096
// took 7 us one value at a time). Blocks past row T only take part in zero_span.
extern "C" __global__ void __launch_bounds__(256)
    rmsnorm(const float* __restrict__ x, int sx, const float* __restrict__ w, float eps, int K, void* out, int so, int f16,
            float* zp, int zn, int T) {
    __shared__ float red[32];
    pdl_wait();
    pdl_trigger();
    zero_span(zp, zn);
    if (blockIdx.x >= T) return;  // blocks beyond the rows only help zero
    const float* xr = x + (size_t)blockIdx.x * sx;
    void* orow = (u8*)out + (size_t)blockIdx.x * so * (f16 ? 2 : 4);
    const int n4 = by4(x, sx, out, so, K) && ((size_t)w & 15) == 0 ? K / 4 : 0;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 a = ((const float4*)xr)[i];
        ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
    }
    for (int k = 4 * n4 + threadIdx.x; k < K; k += blockDim.x) ss += xr[k] * xr[k];
    const float r = 1.0f / sqrtf(block_sum(ss, red) / (float)K + eps);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 a = ((const float4*)xr)[i], b = ((const float4*)w)[i];
        store4(orow, i, make_float4(a.x * r * b.x, a.y * r * b.y, a.z * r * b.z, a.w * r * b.w), f16);
    }
    for (int k = 4 * n4 + threadIdx.x; k < K; k += blockDim.x) store1(orow, k, xr[k] * r * w[k], f16);
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }
// GELU's tanh approximation of the gate (Gemma's GeGLU): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) u
__device__ __forceinline__ float gelu_mul(float g, float u) {
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
}
__device__ __forceinline__ float glu_mul(float g, float u, int gelu) { return gelu ? gelu_mul(g, u) : silu_mul(g, u); }

// act(gu[t, :F]) * gu[t, F:], act silu (SwiGLU) or with gelu set GELU-tanh (GeGLU), fp32 or
// fp16 out. Grid (blocks along F, T); four values per load where the rows allow.
extern "C" __global__ void glu(const float* __restrict__ gu, int sg, int F, void* out, int so, int f16, float* zp,
                               int zn, int gelu) {
    pdl_wait();
    pdl_trigger();
    zero_span(zp, zn);
    const int t = blockIdx.y, step = gridDim.x * blockDim.x;
    const float* g = gu + (size_t)t * sg;
    void* orow = (u8*)out + (size_t)t * so * (f16 ? 2 : 4);
    const int n4 = by4(gu, sg, out, so, F) ? F / 4 : 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += step) {
        const float4 a = ((const float4*)g)[i], b = ((const float4*)(g + F))[i];
        store4(orow, i, make_float4(glu_mul(a.x, b.x, gelu), glu_mul(a.y, b.y, gelu), glu_mul(a.z, b.z, gelu),
                                    glu_mul(a.w, b.w, gelu)), f16);
    }
    for (int f = 4 * n4 + blockIdx.x * blockDim.x + threadIdx.x; f < F; f += step)
        store1(orow, f, glu_mul(g[f], g[F + f], gelu), f16);
}

// zero_span as a kernel of its own, where no rmsnorm or glu runs before the product.
extern "C" __global__ void zero(float* __restrict__ p, int n) {
    pdl_wait();
    pdl_trigger();
    zero_span(p, n);
}

// out[t, h, :] = rope(x[t, h, :]); x rows of `heads * D` floats with row stride sx.
extern "C" __global__ void rope(const float* __restrict__ x, int sx, const int* __restrict__ positions,
                                const double* __restrict__ inv_freq, int heads, int D, int neox, float* __restrict__ out) {
    const int t = blockIdx.x, pos = positions[t];
    for (int i = threadIdx.x; i < heads * D / 2; i += blockDim.x) {
        const int h = i / (D / 2), pi = i - h * (D / 2);
        int i0, i1;
        rope_index(pi, D, neox, i0, i1);
        float x0 = x[(size_t)t * sx + h * D + i0], x1 = x[(size_t)t * sx + h * D + i1];
        rope_pair(x0, x1, pos, inv_freq[pi]);
        out[((size_t)t * heads + h) * D + i0] = x0;
        out[((size_t)t * heads + h) * D + i1] = x1;
    }
}

// --- sampling -----------------------------------------------------------------------------------
// One block of 1024 threads per row. Filters are thresholds on the logit, found by radix select
// on the float's order-preserving integer key (exact, four passes): top-k keeps the k
// largest, top-p the smallest set of largest tokens holding top_p of the top-k mass, min-p the
// tokens with p >= min_p * p_max. Then one token is drawn with u in [0, 1) by a prefix sum in
// vocabulary order. temperature 0 is argmax (first index of the maximum, as np.argmax).
// SAMPLE_THREADS comes defined before this text (kernels/cupy/kernel_constants.py).

__device__ __forceinline__ u32 fkey(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float kfloat(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// This thread's largest value of row x and its first index (0x7fffffff if none), the entry
// at index `skip` passed over: 16-byte loads, four in flight per thread (one block reads a
// 128K-entry row in a few microseconds, not the 50 a load at a time took).
__device__ __forceinline__ void thread_argmax(const float* __restrict__ x, int V, float& v, int& idx, int skip) {
    v = NEG_INF;
    idx = 0x7fffffff;
    const int n4 = ((size_t)x & 15) == 0 ? V >> 2 : 0, step = blockDim.x;
    const float4* x4 = (const float4*)x;
    for (int i = threadIdx.x; i < n4; i += 4 * step) {
        float4 f[4];
#pragma unroll
        for (int k = 0; k < 4; k++)
            f[k] = i + k * step < n4 ? x4[i + k * step] : make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
#pragma unroll
        for (int k = 0; k < 4; k++) {  // indices ascend, so a strict > keeps the first of equals
            const int base = 4 * (i + k * step);
            if (f[k].x > v && base != skip) { v = f[k].x; idx = base; }
            if (f[k].y > v && base + 1 != skip) { v = f[k].y; idx = base + 1; }
            if (f[k].z > v && base + 2 != skip) { v = f[k].z; idx = base + 2; }
            if (f[k].w > v && base + 3 != skip) { v = f[k].w; idx = base + 3; }
        }
    }
    for (int i = 4 * n4 + threadIdx.x; i < V; i += step)
        if (x[i] > v && i != skip) { v = x[i]; idx = i; }
}

// The lane's (v, i) becomes that of the warp's largest v (lowest i among equals).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, v, o);
        const int oi = __shfl_xor_sync(FULL_MASK, i, o);
        const bool take = (ov > v) | ((ov == v) & (oi < i));  // bitwise: no short-circuit branch
        v = take ? ov : v;
        i = take ? oi : i;
    }
}

// Every thread's (v, i) becomes that of the block's largest v (lowest i among equals).
__device__ void block_argmax(float& v, int& i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(v, i);
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = sv[lane]; i = si[lane];
    if (lane >= (int)(blockDim.x >> 5)) { v = NEG_INF; i = 0x7fffffff; }
    warp_argmax(v, i);
}

// Row x's largest value and its first index (0x7fffffff if none), in every thread of the
// block; with skip >= 0, of the row without its entry skip.
__device__ void row_argmax(const float* __restrict__ x, int V, float& best, int& besti, int skip = -1) {
    thread_argmax(x, V, best, besti, skip);
    block_argmax(best, besti);
}

// The largest key K with weight(key >= K) >= target among keys >= floor_key; weight 1 (a count)
// or exp((x - mx) / T) (probability mass). Four passes of an 8-bit radix histogram.
__device__ u32 radix_select(const float* __restrict__ x, int V, u32 floor_key, int mass, float mx, float invT,
                            float target, float* hist /* [257] */) {
    __shared__ int bin_s;
    __shared__ float above_s;
    u32 prefix = 0, mask = 0;
    float above = 0.0f;  // weight of the keys above the current prefix's range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0.0f;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const u32 key = fkey(x[i]);
            if (key >= floor_key && (key & mask) == prefix)
                atomicAdd(&hist[(key >> shift) & 255], mass ? expf((x[i] - mx) * invT) : 1.0f);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float c = above;
            int b = 255;
            for (; b > 0; b--) {
                if (c + hist[b] >= target) break;
                c += hist[b];
            }
            bin_s = b;
            above_s = c;
        }
        __syncthreads();
        prefix |= (u32)bin_s << shift;
        mask |= 255u << shift;
        above = above_s;
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax_rows(const float* __restrict__ logits, int sl, int V, int* __restrict__ out) {
    float best;
    int bi;
    row_argmax(logits + (size_t)blockIdx.x * sl, V, best, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}

// out[row]: each row's argmax; out[B + row]: the argmax of the row without that entry (a
// greedy draft's runner-up, a draft tree's alternative token). First indices of the maxima.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    top2_rows(const float* __restrict__ logits, int sl, int V, int B, int* __restrict__ out) {
    const float* x = logits + (size_t)blockIdx.x * sl;
    float best, second;
    int bi, si;
    row_argmax(x, V, best, bi);
    row_argmax(x, V, second, si, bi);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
        out[B + blockIdx.x] = si == 0x7fffffff ? 0 : si;
    }
}

// Each row's log softmax at tokens[row] and its n largest entries (n <= TOP_LOGPROBS_MAX) as
// logprobs, largest first, lower index first among equals (kernels/ops.py `token_logprobs` is
// the host twin): out[row] is [logprob, n logprobs, n ids], in double (the ids exact), so a
// logprobs request or a scored prompt brings back 1 + 2n numbers a row, not the row. The
// normalizer is the maximum plus the log of the sum of exp(x - max), summed in double. The top
// n: each thread keeps its own n best in order (its indices ascend, so a strict > keeps the
// first of equals), then n rounds of a block argmax over the threads' next candidates.
// TOP_LOGPROBS_MAX comes defined before this text (kernels/cupy/kernel_constants.py).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    token_logprobs_rows(const float* __restrict__ logits, int sl, int V, const int* __restrict__ tokens, int n,
                        double* __restrict__ out) {
    __shared__ double red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* x = logits + (size_t)blockIdx.x * sl;
    double* o = out + (size_t)blockIdx.x * (1 + 2 * n);
    float mx;
    int amax;
    row_argmax(x, V, mx, amax);
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += (double)expf(x[i] - mx);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    s = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
    const double lse = (double)mx + log(s);
    if (threadIdx.x == 0) o[0] = (double)x[tokens[blockIdx.x]] - lse;
    if (n == 0) return;

    float v[TOP_LOGPROBS_MAX];
    int id[TOP_LOGPROBS_MAX];
    int have = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float xi = x[i];
        if (have == n && !(xi > v[n - 1])) continue;
        int j = have < n ? have++ : n - 1;
        for (; j > 0 && xi > v[j - 1]; j--) { v[j] = v[j - 1]; id[j] = id[j - 1]; }
        v[j] = xi;
        id[j] = i;
    }
    int next = 0;  // this thread's first candidate not yet taken
    for (int r = 0; r < n; r++) {
        float bv = next < have ? v[next] : NEG_INF;
        int bi = next < have ? id[next] : 0x7fffffff;
        const int mine = bi;
        block_argmax(bv, bi);
        if (next < have && mine == bi) next++;
        if (threadIdx.x == 0) {
            o[1 + r] = (double)bv - lse;
            o[1 + n + r] = (double)bi;
        }
    }
}

// Row src to row dst (row_bytes each) of every cache whose base address is bases[blockIdx.x]:
// a draft tree's kept leaf's K and V moved to its position in every layer in one launch (an
// indexed copy a cache took two kernels and ~30 us of Python each, ~100 a leaf).
extern "C" __global__ void __launch_bounds__(256)
    copy_row_each(const unsigned long long* __restrict__ bases, long long row_bytes, long long src, long long dst) {
    char* base = (char*)bases[blockIdx.x];
    const char* s = base + src * row_bytes;
    char* d = base + dst * row_bytes;
    if (((row_bytes | (long long)(size_t)base) & 15) == 0) {
        for (long long i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) ((int4*)d)[i] = ((const int4*)s)[i];
    } else {
        for (long long i = threadIdx.x; i < row_bytes; i += blockDim.x) d[i] = s[i];
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const float* __restrict__ logits, int sl, int V, const float* __restrict__ temperature,
                const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
                const float* __restrict__ uniform, int* __restrict__ out) {
    __shared__ float red[32];
    __shared__ float chunk_sum[SAMPLE_THREADS];
    __shared__ float hist[257];
    __shared__ int pick;
    const int row = blockIdx.x, tid = threadIdx.x;
    const float* x = logits + (size_t)row * sl;

    float mx;
    int amax;
    row_argmax(x, V, mx, amax);
    const float T = temperature[row];
    if (T <= 0.0f) {
        if (tid == 0) out[row] = amax;
        return;
    }
    const float invT = 1.0f / T;
    float thr = NEG_INF;  // everything >= thr is kept
    const int k = top_k[row];
    if (k > 0 && k < V) thr = kfloat(radix_select(x, V, 0u, 0, mx, invT, (float)k, hist));
    const float tp = top_p[row];
    if (tp < 1.0f) {
        float z = 0.0f;
        for (int i = tid; i < V; i += blockDim.x) z += x[i] >= thr ? expf((x[i] - mx) * invT) : 0.0f;
        z = block_sum(z, red);
        const u32 floor_key = thr == NEG_INF ? 0u : fkey(thr);
        thr = fmaxf(thr, kfloat(radix_select(x, V, floor_key, 1, mx, invT, tp * z, hist)));
    }
    const float mp = min_p[row];
    if (mp > 0.0f) thr = fmaxf(thr, mx + T * logf(mp));  // p / p_max >= min_p
    thr = fminf(thr, mx);                                 // the maximum always survives

    // draw: prefix sums over contiguous chunks, in vocabulary order
    const int per = (V + blockDim.x - 1) / blockDim.x, lo_i = tid * per, hi_i = min(V, lo_i + per);
    float s = 0.0f;
    for (int i = lo_i; i < hi_i; i++) s += x[i] >= thr ? expf((x[i] - mx) * invT) : 0.0f;
    chunk_sum[tid] = s;
    if (tid == 0) pick = amax;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {  // inclusive scan (Hillis-Steele)
        const float add = tid >= off ? chunk_sum[tid - off] : 0.0f;
        __syncthreads();
        chunk_sum[tid] += add;
        __syncthreads();
    }
    const float total = chunk_sum[blockDim.x - 1];
    const float target = uniform[row] * total;
    const float before = tid > 0 ? chunk_sum[tid - 1] : 0.0f;
    if (target >= before && target < chunk_sum[tid] && hi_i > lo_i) {
        float c = before;
        int choice = -1;
        for (int i = lo_i; i < hi_i; i++) {
            if (x[i] >= thr) {
                c += expf((x[i] - mx) * invT);
                choice = i;
                if (target < c) break;
            }
        }
        if (choice >= 0) pick = choice;
    }
    __syncthreads();
    if (tid == 0) out[row] = pick;
}
