// The walk over the weights both GEMVs share (quant_gemv.cu on float activations,
// quant_gemv_q8.cu on integer ones): prepended to those two modules after quant_blocks.cuh.
//
// out[t, row] = dot(W[row], xin[t]) (+ bias[row]) (+ res[t, row]) for t < T <= NT.
// MODE 0: xin = x. MODE 2: xin = silu(x[:, :K]) * x[:, K:] (SwiGLU fused).
// MODE 1: xin = rmsnorm(x) * nw, folded: out = rinv[t] * dot(W[row], nw * x[t]), where
// sum(x^2) comes from the x values the warp loads anyway (its lanes cover all of K), so the
// norm costs no pass, no barrier and no launch of its own.
// x rows: K % 8 == 0, 16-byte aligned (the backend pads where a format allows other lengths).
// GEMV_WARPS comes defined before this text (kernels/cupy/kernel_constants.py).

template <int MODE>
__device__ __forceinline__ void load_x8(const float* __restrict__ xr, int pos, int K, const float* __restrict__ nw,
                                        float v[8], float& ss) {
    const float4 a = *(const float4*)(xr + pos), b = *(const float4*)(xr + pos + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    if (MODE == 2) {
        const float4 c = *(const float4*)(xr + K + pos), d = *(const float4*)(xr + K + pos + 4);
        const float u[8] = {c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = __fdividef(v[i], 1.0f + __expf(-v[i])) * u[i];
    } else if (MODE == 1) {
        const float4 c = *(const float4*)(nw + pos), d = *(const float4*)(nw + pos + 4);
        const float w[8] = {c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
#pragma unroll
        for (int i = 0; i < 8; i++) {
            ss = fmaf(v[i], v[i], ss);
            v[i] *= w[i];
        }
    }
}

// Sums each warp's lanes, then the ksplit warps of a row group in shared memory; stores
// out[t, row0 + r] (norm scale for MODE 1, bias, residual).
template <int R, int NT, int MODE>
__device__ __forceinline__ void gemv_store(float (&acc)[R][NT], float (&ss)[NT], int rows, int row0, int K, float eps,
                                           int T, float* __restrict__ out, int so, const float* __restrict__ bias,
                                           const float* __restrict__ res, int sr, int ksplit) {
    __shared__ float part[GEMV_WARPS][R * NT + NT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ks = warp % ksplit;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (MODE == 1) ss[t] = warp_sum(ss[t]);
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][t] = warp_sum(acc[r][t]);
    }
    if (ksplit > 1) {
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < NT; t++) {
                part[warp][R * NT + t] = ss[t];
#pragma unroll
                for (int r = 0; r < R; r++) part[warp][r * NT + t] = acc[r][t];
            }
        }
        __syncthreads();
        if (ks != 0) return;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            for (int k2 = 1; k2 < ksplit; k2++) {
                ss[t] += part[warp + k2][R * NT + t];
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][t] += part[warp + k2][r * NT + t];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float scale = MODE == 1 ? 1.0f / sqrtf(ss[t] / (float)K + eps) : 1.0f;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = row0 + r;
            if (lane == r && t < T && row < rows) {
                float o = acc[r][t] * scale;
                if (bias) o += bias[row];
                if (res) o += res[(size_t)t * sr + row];
                out[(size_t)t * so + row] = o;
            }
        }
    }
}

// A GEMV's start: in the blocks of the first wave (8 per SM run at once), the lane's first two
// units of each row are asked from DRAM into L2 at once (no registers held), so their loads
// then come from L2 after one round trip; under programmatic dependent launch this happens
// while the kernel producing x still runs. Later blocks start behind others already
// streaming: there a prefetch only doubles the L2 requests (H100, 70B gate_up: 94 -> 100 us).
template <class Q, int R>
__device__ __forceinline__ void prefetch_first(const Planes& w, int rows, int row0, int units, int u, int stride) {
    pdl_trigger();
    u32 sms;
    asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
    const int n = blockIdx.x < 8 * sms ? 2 : 0;
    for (int k = 0; k < n; k++, u += stride) {
        if (u >= units || row0 >= rows) break;
        const int b = u / Q::UPB, j = u - b * Q::UPB;
#pragma unroll
        for (int r = 0; r < R; r++) (void)Q::template load<PREFETCH>(w, (size_t)min(row0 + r, rows - 1), b, j);
    }
    pdl_wait();
}

// Both GEMVs' walk over the weights. A warp owns R rows; lane l takes units l, l + 32 ksplit,
// ... of each, so a load instruction reads 32 consecutive units of a row (512 contiguous
// bytes with the interleaved planes) and each x value loaded serves R rows. ksplit warps
// share a group of rows, each taking every ksplit-th run of 32 units: long rows get more
// loads in flight and shorter chains; their partial sums meet in shared memory (gemv_store).
// Calls f(raw, b, j) with unit j of block b of each row; returns the warp's first row.
template <class Q, int R, class F, class G>
__device__ __forceinline__ int for_each_unit(const Planes& w, int rows, int nb, int ksplit, F&& f, G&& after_wait) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ks = warp % ksplit;
    const int row0 = (blockIdx.x * (GEMV_WARPS / ksplit) + warp / ksplit) * R;
    const int units = nb * Q::UPB, u0 = lane + 32 * ks;
    prefetch_first<Q, R>(w, rows, row0, units, u0, 32 * ksplit);
    after_wait();
    for (int u = u0; u < units && row0 < rows; u += 32 * ksplit) {
        const int b = u / Q::UPB, j = u - b * Q::UPB;
        typename Q::Raw raw[R];
#pragma unroll
        for (int r = 0; r < R; r++) raw[r] = Q::template load<true>(w, (size_t)min(row0 + r, rows - 1), b, j);
        f(raw, b, j);
    }
    return row0;
}
