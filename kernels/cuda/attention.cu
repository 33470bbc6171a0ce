// Attention over the paged fp16 KV cache [num_blocks, block_size, kv_heads, D], GQA-aware:
// a block works on one KV head and all G = H / KVH query heads that share it, so each K/V
// row is read once per head group. Scores are kept in the log2 domain (q is pre-scaled by
// softmax_scale * log2 e) so the softmax uses exp2f.
//
// RoPE is fused: the backend's rope() is lazy and hands the rotation to these kernels, which
// rotate q as they load it and k as they store it into the cache.
//
// window > 0: a sliding-window layer; the query at position p sees keys p - window + 1..p
// (llama.cpp's LLAMA_SWA_TYPE_STANDARD), and key tiles wholly before that are not read.

#define MAXG 8
#define ATT_WARPS 4
#define DECODE_MAX_CHUNK 64  // keys per decode split, staged in shared memory at once
#define DEC_WARPS 8          // decode: a warp per query head of the group (G <= 8), or per key share of one
#define LOG2E 1.4426950408889634f

// Values of one lane's D/32 consecutive dims of an fp16 row.
template <int D>
__device__ __forceinline__ void load_dims(const u16* row, int lane, float v[D / 32]) {
    constexpr int P = D / 32;
    const u16* p = row + lane * P;
    if (P == 4) {
        const uint2 u = *(const uint2*)p;
        v[0] = h2f(u.x & 0xFFFF); v[1] = h2f(u.x >> 16); v[2] = h2f(u.y & 0xFFFF); v[3] = h2f(u.y >> 16);
    } else if (P == 2) {
        const u32 u = *(const u32*)p;
        v[0] = h2f(u & 0xFFFF); v[1] = h2f(u >> 16);
    } else {
#pragma unroll
        for (int i = 0; i < P; i++) v[i] = h2f(p[i]);
    }
}

// dot(q[g], k) for all g < G, k an fp16 row (global or shared), q rows of D floats in shared.
template <int D>
__device__ __forceinline__ void qk_dots(const u16* k, const float* q, int G, float s[MAXG]) {
#pragma unroll
    for (int g = 0; g < MAXG; g++) s[g] = 0.0f;
#pragma unroll
    for (int c = 0; c < D / 8; c++) {
        const uint4 u = *(const uint4*)(k + c * 8);
        const float kf[8] = {h2f(u.x & 0xFFFF), h2f(u.x >> 16), h2f(u.y & 0xFFFF), h2f(u.y >> 16),
                             h2f(u.z & 0xFFFF), h2f(u.z >> 16), h2f(u.w & 0xFFFF), h2f(u.w >> 16)};
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < G) {
                const float4 qa = *(const float4*)(q + g * D + c * 8), qb = *(const float4*)(q + g * D + c * 8 + 4);
                s[g] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                        qb.z * kf[6] + qb.w * kf[7];
            }
        }
    }
}

// Load, rotate and pre-scale the G query heads of token t (kv head kh) into q_s[G][D].
template <int D>
__device__ __forceinline__ void load_q(const float* __restrict__ q, int sq, int t, int kh, int G, int pos,
                                       const double* __restrict__ inv_freq, int rope, int neox, float scale, float* q_s,
                                       int tid, int nthreads) {
    for (int i = tid; i < G * D / 2; i += nthreads) {
        const int g = i / (D / 2), pi = i - g * (D / 2);
        int i0, i1;
        rope_index(pi, D, neox, i0, i1);
        const float* src = q + (size_t)t * sq + (kh * G + g) * D;
        float x0 = src[i0], x1 = src[i1];
        if (rope) rope_pair(x0, x1, pos, inv_freq[pi]);
        q_s[g * D + i0] = x0 * scale;
        q_s[g * D + i1] = x1 * scale;
    }
}

// Online-softmax update of G heads for one 32-key tile (lane = key, scores in log2 units):
// the G reductions are interleaved, so the shuffles of different heads overlap.
__device__ __forceinline__ void softmax_tile(const float s[MAXG], bool vis, int G, float m[MAXG], float l[MAXG],
                                             float p[MAXG], float alpha[MAXG]) {
    float t[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; g++) t[g] = vis ? s[g] : NEG_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < MAXG; g++)
            if (g < G) t[g] = fmaxf(t[g], __shfl_xor_sync(FULL_MASK, t[g], o));
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        const float mn = fmaxf(m[g], t[g]);
        p[g] = vis ? exp2f(s[g] - mn) : 0.0f;
        alpha[g] = exp2f(m[g] - mn);
        m[g] = mn;
        t[g] = p[g];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < MAXG; g++)
            if (g < G) t[g] += __shfl_xor_sync(FULL_MASK, t[g], o);
#pragma unroll
    for (int g = 0; g < MAXG; g++) l[g] = l[g] * alpha[g] + t[g];
}

__device__ __forceinline__ size_t cache_row(const int* __restrict__ table, int p, int bs, int KVH, int kh, int D) {
    const int slot = table[p / bs] * bs + p % bs;
    return ((size_t)slot * KVH + kh) * D;
}

// --- store new K/V (prefill path) ---------------------------------------------------------
// grid T; k rotated when rope_k. Slots < 0 are skipped.
template <int D>
__device__ __forceinline__ void kv_store(const float* __restrict__ k, int sk, const float* __restrict__ v, int sv,
                                         const int* __restrict__ positions, const double* __restrict__ inv_freq,
                                         int rope_k, int neox, u16* kc, u16* vc, const int* __restrict__ slots,
                                         int KVH) {
    const int t = blockIdx.x, slot = slots[t];
    if (slot < 0) return;
    const int pos = positions[t];
    for (int i = threadIdx.x; i < KVH * D / 2; i += blockDim.x) {
        const int h = i / (D / 2), pi = i - h * (D / 2);
        int i0, i1;
        rope_index(pi, D, neox, i0, i1);
        const float* src = k + (size_t)t * sk + h * D;
        float x0 = src[i0], x1 = src[i1];
        if (rope_k) rope_pair(x0, x1, pos, inv_freq[pi]);
        u16* dst = kc + ((size_t)slot * KVH + h) * D;
        dst[i0] = f2h(x0);
        dst[i1] = f2h(x1);
    }
    for (int i = threadIdx.x; i < KVH * D; i += blockDim.x) {
        const int h = i / D, d = i - h * D;
        vc[((size_t)slot * KVH + h) * D + d] = f2h(v[(size_t)t * sv + h * D + d]);
    }
}

// --- prefill / mixed batches ----------------------------------------------------------------
// grid (tiles, KVH); a tile is up to ATT_WARPS consecutive query tokens of one sequence, one
// warp each. The block streams 32-key tiles of K and V through shared memory once for all
// its warps; lane i scores key i, then lanes split the D dims for P @ V.
template <int D>
__device__ __forceinline__ void attn_prefill(const float* __restrict__ q, int sq, const int* __restrict__ positions,
                                             const double* __restrict__ inv_freq, int rope_q, int neox,
                                             const u16* __restrict__ kc, const u16* __restrict__ vc,
                                             const int* __restrict__ tables, int W, const int* __restrict__ ctx_lens,
                                             const int* __restrict__ qstarts, const int* __restrict__ tiles, int H,
                                             int KVH, int bs, float scale, int window, float* __restrict__ out) {
    constexpr int P = D / 32, RS = D + 8;  // padded smem rows: conflict-free 16-byte reads per lane
    __shared__ __align__(16) float q_s[ATT_WARPS][MAXG * D];
    __shared__ __align__(16) u16 k_s[32 * RS];
    __shared__ __align__(16) u16 v_s[32 * RS];
    const int G = H / KVH, kh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = tiles[2 * blockIdx.x], t0 = tiles[2 * blockIdx.x + 1];
    const int qs0 = qstarts[b], qe = qstarts[b + 1], n = qe - qs0, ctx = ctx_lens[b];
    const int* table = tables + (size_t)b * W;
    const int t = t0 + warp;
    const bool valid = t < qe;
    const int qpos = ctx - n + (t - qs0);  // keys lo..qpos are visible
    const int lo = window > 0 ? qpos - window + 1 : 0;
    const int last = ctx - n + (min(t0 + ATT_WARPS, qe) - 1 - qs0);
    const int first = window > 0 ? max(0, ctx - n + (t0 - qs0) - window + 1) & ~31 : 0;  // the tile's first key tile

    for (int w = 0; w < ATT_WARPS; w++)
        if (t0 + w < qe) load_q<D>(q, sq, t0 + w, kh, G, positions[t0 + w], inv_freq, rope_q, neox, scale, q_s[w], threadIdx.x, blockDim.x);

    float m[MAXG], l[MAXG], o[MAXG][P];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        m[g] = NEG_INF; l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < P; i++) o[g][i] = 0.0f;
    }

    for (int k0 = first; k0 <= last; k0 += 32) {
        __syncthreads();
        for (int i = threadIdx.x; i < 32 * (D / 8); i += blockDim.x) {
            const int r = i / (D / 8), c = i - r * (D / 8), p = k0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
            if (p <= last) {
                const size_t off = cache_row(table, p, bs, KVH, kh, D) + c * 8;
                kv = *(const uint4*)(kc + off);
                vv = *(const uint4*)(vc + off);
            }
            *(uint4*)(k_s + r * RS + c * 8) = kv;
            *(uint4*)(v_s + r * RS + c * 8) = vv;
        }
        __syncthreads();
        if (!valid || k0 > qpos || k0 + 31 < lo) continue;  // warp-uniform: nothing visible

        float s[MAXG], p[MAXG], alpha[MAXG];
        qk_dots<D>(k_s + lane * RS, q_s[warp], G, s);
        softmax_tile(s, k0 + lane <= qpos && k0 + lane >= lo, G, m, l, p, alpha);
#pragma unroll
        for (int g = 0; g < MAXG; g++)
#pragma unroll
            for (int i = 0; i < P; i++) o[g][i] *= alpha[g];
        const int nk = min(32, qpos - k0 + 1);
        for (int kk = 0; kk < nk; kk++) {
            float vf[P];
            load_dims<D>(v_s + kk * RS, lane, vf);
#pragma unroll
            for (int g = 0; g < MAXG; g++) {
                if (g < G) {
                    const float pk = __shfl_sync(FULL_MASK, p[g], kk);
#pragma unroll
                    for (int i = 0; i < P; i++) o[g][i] = fmaf(pk, vf[i], o[g][i]);
                }
            }
        }
    }
    if (!valid) return;
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g < G) {
            const float inv = 1.0f / l[g];
#pragma unroll
            for (int i = 0; i < P; i++) out[(size_t)t * H * D + (kh * G + g) * D + lane * P + i] = o[g][i] * inv;
        }
    }
}

// --- decode: one new token per sequence (flash-decoding) --------------------------------------
// grid (max_splits, KVH, B). Split sp covers keys [sp*chunk, (sp+1)*chunk) in 32-key tiles
// that the block stages in shared memory (all K/V loads of a tile in flight at once); warp w
// then owns query head w of the group: lane i scores key i, lanes split the dims for P @ V.
// Splitting the heads rather than the keys keeps the warps busy on short contexts, each
// with a chain 1/G as long as one warp doing the whole group. With one split the block writes the output;
// otherwise (max, sum, unnormalised output) per head, and the last split to finish (atomic
// counter, reset by it for the next launch) merges them: one kernel per layer in the graph.
// The new token's k (rotated) and v come from the inputs; split 0 stores them in the cache.
// With out16 set, the output is also written in fp16 (a tensor-core product's input).
// With xq set, the block that writes a head group's output also quantizes it per 32 values
// (common.cu quantize8) for the dp4a product after it, which then needs no quantize_x.
template <int D>
__device__ __forceinline__ void attn_decode(const float* __restrict__ q, int sq, const float* __restrict__ k, int sk,
                                            const float* __restrict__ v, int sv, const int* __restrict__ positions,
                                            const double* __restrict__ inv_freq, int rope_q, int rope_k, int neox,
                                            u16* kc, u16* vc, const int* __restrict__ tables, int W,
                                            const int* __restrict__ ctx_lens, const int* __restrict__ slots, int H,
                                            int KVH, int bs, int chunk, float scale, int window, float* part_o, float* part_ml,
                                            int* counters, int max_splits, float* __restrict__ out, u16* out16, u8* xq, int sxq,
                                            float2* xds) {
    constexpr int P = D / 32, RS = D + 8, HPW = MAXG / DEC_WARPS;
    __shared__ __align__(16) float q_s[MAXG * D];
    __shared__ __align__(16) u16 kn_s[D];
    __shared__ __align__(16) u16 vn_s[D];
    __shared__ __align__(16) u16 k_s[DECODE_MAX_CHUNK * RS];
    __shared__ __align__(16) u16 v_s[DECODE_MAX_CHUNK * RS];
    __shared__ size_t row_s[DECODE_MAX_CHUNK];
    __shared__ int last_s;
    const int sp = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, G = H / KVH;
    // the splits cover keys base..ctx-1: the window's, or all
    const int ctx = ctx_lens[b], base = window > 0 ? max(0, ctx - window) : 0, nsplit = (ctx - base + chunk - 1) / chunk;
    if (sp >= nsplit) return;
    const int pos = positions[b], newp = ctx - 1;
    const int* table = tables + (size_t)b * W;
    pdl_trigger();

    // the split's cached keys (written by earlier steps) are staged before the wait for this
    // step's q, k, v: one table round trip, one K/V round trip, overlapping the qkv product
    const int start = base + sp * chunk, n = min(ctx, start + chunk) - start;
    if (threadIdx.x < n) {
        const int p = start + threadIdx.x;
        row_s[threadIdx.x] = p != newp ? cache_row(table, p, bs, KVH, kh, D) : 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * (D / 8); i += blockDim.x) {
        const int r = i / (D / 8), c = i - r * (D / 8);
        if (start + r == newp) continue;
        *(uint4*)(k_s + r * RS + c * 8) = *(const uint4*)(kc + row_s[r] + c * 8);
        *(uint4*)(v_s + r * RS + c * 8) = *(const uint4*)(vc + row_s[r] + c * 8);
    }
    pdl_wait();

    load_q<D>(q, sq, b, kh, G, pos, inv_freq, rope_q, neox, scale, q_s, threadIdx.x, blockDim.x);
    for (int i = threadIdx.x; i < D / 2; i += blockDim.x) {
        int i0, i1;
        rope_index(i, D, neox, i0, i1);
        const float* src = k + (size_t)b * sk + kh * D;
        float x0 = src[i0], x1 = src[i1];
        if (rope_k) rope_pair(x0, x1, pos, inv_freq[i]);
        kn_s[i0] = f2h(x0);
        kn_s[i1] = f2h(x1);
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) vn_s[i] = f2h(v[(size_t)b * sv + kh * D + i]);
    __syncthreads();
    if (sp == 0) {
        const size_t row = ((size_t)slots[b] * KVH + kh) * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            kc[row + i] = kn_s[i];
            vc[row + i] = vn_s[i];
        }
    }
    if (newp >= start && newp < start + n) {
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            k_s[(newp - start) * RS + i] = kn_s[i];
            v_s[(newp - start) * RS + i] = vn_s[i];
        }
    }

    // With fewer query heads than warps (8B: 4 per KV head), the otherwise idle warps take a
    // share of the keys: warp w runs head w % G over key tiles kg = w / G, kg + KS, ..., and
    // the shares are merged below. gw is the warp's first head (G: none).
    const int KS = max(1, DEC_WARPS / G);
    const int kg = KS > 1 ? warp / G : 0, gw = KS > 1 ? (warp < G * KS ? warp % G : G) : warp;
    float m[HPW], l[HPW], o[HPW][P];
#pragma unroll
    for (int h = 0; h < HPW; h++) {
        m[h] = NEG_INF; l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < P; i++) o[h][i] = 0.0f;
    }
    __syncthreads();
    for (int k0 = 32 * kg; k0 < n; k0 += 32 * KS) {
        const int nk = min(32, n - k0);
        const bool vis = lane < nk;
        float s[HPW];
#pragma unroll
        for (int h = 0; h < HPW; h++) s[h] = 0.0f;
#pragma unroll
        for (int c = 0; c < D / 8; c++) {  // scores of this warp's heads against key `lane`
            const uint4 u = *(const uint4*)(k_s + (k0 + lane) * RS + c * 8);
            const float kf[8] = {h2f(u.x & 0xFFFF), h2f(u.x >> 16), h2f(u.y & 0xFFFF), h2f(u.y >> 16),
                                 h2f(u.z & 0xFFFF), h2f(u.z >> 16), h2f(u.w & 0xFFFF), h2f(u.w >> 16)};
#pragma unroll
            for (int h = 0; h < HPW; h++) {
                const int g = gw + h * DEC_WARPS;
                if (g < G) {
                    const float4 qa = *(const float4*)(q_s + g * D + c * 8), qb = *(const float4*)(q_s + g * D + c * 8 + 4);
                    s[h] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                            qb.z * kf[6] + qb.w * kf[7];
                }
            }
        }
        float pr[HPW];
#pragma unroll
        for (int h = 0; h < HPW; h++) {
            if (gw + h * DEC_WARPS < G) {
                const float sg = vis ? s[h] : NEG_INF;
                const float mn = fmaxf(m[h], warp_max(sg));
                pr[h] = vis ? exp2f(sg - mn) : 0.0f;
                const float alpha = exp2f(m[h] - mn);
                l[h] = l[h] * alpha + warp_sum(pr[h]);
                m[h] = mn;
#pragma unroll
                for (int i = 0; i < P; i++) o[h][i] *= alpha;
            }
        }
        for (int kk = 0; kk < nk; kk++) {
            float vf[P];
            load_dims<D>(v_s + (k0 + kk) * RS, lane, vf);
#pragma unroll
            for (int h = 0; h < HPW; h++) {
                if (gw + h * DEC_WARPS < G) {
                    const float pk = __shfl_sync(FULL_MASK, pr[h], kk);
#pragma unroll
                    for (int i = 0; i < P; i++) o[h][i] = fmaf(pk, vf[i], o[h][i]);
                }
            }
        }
    }
    if (KS > 1) {  // each head's key shares into its first warp (k_s is free once all are past it)
        float* share = (float*)k_s;  // [DEC_WARPS][D + 2]: o, then m and l
        __syncthreads();
        if (kg > 0 && gw < G) {
#pragma unroll
            for (int i = 0; i < P; i++) share[warp * (D + 2) + lane * P + i] = o[0][i];
            if (lane == 0) { share[warp * (D + 2) + D] = m[0]; share[warp * (D + 2) + D + 1] = l[0]; }
        }
        __syncthreads();
        if (kg == 0 && gw < G) {
            for (int s2 = 1; s2 < KS; s2++) {
                const float* sh = share + (gw + s2 * G) * (D + 2);
                const float m2 = sh[D], mx = fmaxf(m[0], m2);  // m[0] is finite: share 0 has keys
                const float a = exp2f(m[0] - mx), c = exp2f(m2 - mx);
                l[0] = l[0] * a + sh[D + 1] * c;
#pragma unroll
                for (int i = 0; i < P; i++) o[0][i] = o[0][i] * a + sh[lane * P + i] * c;
                m[0] = mx;
            }
        }
    }
    // the outputs also go to q_s (each head's q row is read only by its own warps, which are
    // past it), from where the quantized copy for the next product is made
    float* po = part_o + ((size_t)(b * KVH + kh) * max_splits + sp) * (MAXG * D);
    float* pml = part_ml + ((size_t)(b * KVH + kh) * max_splits + sp) * (MAXG * 2);
#pragma unroll
    for (int h = 0; h < HPW; h++) {
        const int g = gw + h * DEC_WARPS;
        if (g >= G || kg > 0) continue;
        if (nsplit == 1) {
            const float inv = 1.0f / l[h];
#pragma unroll
            for (int i = 0; i < P; i++) {
                out[(size_t)b * H * D + (kh * G + g) * D + lane * P + i] = o[h][i] * inv;
                if (out16) out16[(size_t)b * H * D + (kh * G + g) * D + lane * P + i] = f2h(o[h][i] * inv);
                q_s[g * D + lane * P + i] = o[h][i] * inv;
            }
        } else {
#pragma unroll
            for (int i = 0; i < P; i++) po[g * D + lane * P + i] = o[h][i];
            if (lane == 0) { pml[2 * g] = m[h]; pml[2 * g + 1] = l[h]; }
        }
    }
    if (nsplit > 1) {
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            const int done = atomicAdd(&counters[b * KVH + kh], 1);
            last_s = done == nsplit - 1;
        }
        __syncthreads();
        if (!last_s) return;
        __threadfence();
        const volatile float* vo = part_o + (size_t)(b * KVH + kh) * max_splits * (MAXG * D);
        const volatile float* vml = part_ml + (size_t)(b * KVH + kh) * max_splits * (MAXG * 2);
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
            const int g = i / D;
            float M = NEG_INF;
            for (int s2 = 0; s2 < nsplit; s2++) M = fmaxf(M, vml[s2 * MAXG * 2 + 2 * g]);
            float L = 0.0f, O = 0.0f;
            for (int s2 = 0; s2 < nsplit; s2++) {
                const float ms = vml[s2 * MAXG * 2 + 2 * g];
                if (ms == NEG_INF) continue;
                const float c = exp2f(ms - M);
                L += vml[s2 * MAXG * 2 + 2 * g + 1] * c;
                O += vo[s2 * MAXG * D + i] * c;
            }
            out[(size_t)b * H * D + kh * G * D + i] = O / L;
            if (out16) out16[(size_t)b * H * D + kh * G * D + i] = f2h(O / L);
            q_s[i] = O / L;
        }
        if (threadIdx.x == 0) counters[b * KVH + kh] = 0;
    }
    if (xq) {  // the head group's values as the next product's integer input (quant_gemv_q8.cu)
        __syncthreads();
        for (int i = 8 * threadIdx.x; i < MAXG * D; i += 8 * blockDim.x) {
            float v[8] = {};
            if (i < G * D) {
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] = q_s[i + j];
            }
            quantize8(v, i < G * D, kh * G * D + i, 1.0f, xq + (size_t)b * sxq, xds + (size_t)b * (H * D / 32));
        }
    }
}

#define DEF_ATTN(D)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                                                \
        kv_store_##D(const float* k, int sk, const float* v, int sv, const int* positions, const double* inv_freq,   \
                     int rope_k, int neox, u16* kc, u16* vc, const int* slots, int KVH) {                            \
        kv_store<D>(k, sk, v, sv, positions, inv_freq, rope_k, neox, kc, vc, slots, KVH);                             \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                     \
        attn_prefill_##D(const float* q, int sq, const int* positions, const double* inv_freq, int rope_q, int neox, \
                         const u16* kc, const u16* vc, const int* tables, int W, const int* ctx_lens,                \
                         const int* qstarts, const int* tiles, int H, int KVH, int bs, float scale, int window,     \
                         float* out) {                                                                                \
        attn_prefill<D>(q, sq, positions, inv_freq, rope_q, neox, kc, vc, tables, W, ctx_lens, qstarts, tiles, H,    \
                        KVH, bs, scale, window, out);                                                                 \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)                                                     \
        attn_decode_##D(const float* q, int sq, const float* k, int sk, const float* v, int sv,                      \
                        const int* positions, const double* inv_freq, int rope_q, int rope_k, int neox, u16* kc,     \
                        u16* vc, const int* tables, int W, const int* ctx_lens, const int* slots, int H, int KVH,    \
                        int bs, int chunk, float scale, int window, float* part_o, float* part_ml, int* counters,   \
                        int max_splits, float* out, u16* out16, u8* xq, int sxq, float2* xds) {                       \
        attn_decode<D>(q, sq, k, sk, v, sv, positions, inv_freq, rope_q, rope_k, neox, kc, vc, tables, W, ctx_lens,  \
                       slots, H, KVH, bs, chunk, scale, window, part_o, part_ml, counters, max_splits, out, out16, xq, \
                       sxq,                                                                                           \
                       xds);                                                                                          \
    }
DEF_ATTN(64)
DEF_ATTN(96)
DEF_ATTN(128)
