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
//
// BITS is the cache's type: 16 for fp16 rows, 8/4/3/2 for RotateKV rows (kernels/kv_layout.py):
// keys centred and scaled per channel, then K and V rotated by a normalized Walsh-Hadamard
// transform before they are quantized (kv_store_q), dequantized to fp16 as they are staged in
// shared memory. Scores are unchanged once q is divided by the key scale and rotated too
// (fwht after load_q), and the output, a sum of rotated values, is rotated back before it
// leaves (the transform is its own inverse). A query reads the keys and values of position 0
// and of its `recent` latest positions unquantized: the step's own from the scratch kv_store_q
// writes them to (fp16, transformed), earlier ones from the sequence's slot of the ring
// [slots, ring + 1, KVH, D] (entry `ring`: position 0), which kv_recent (prefill) or the
// decode kernel's split 0 updates once they are read.
//
// head_dim 64, 96, 128 and 256. The attention kernels' shared arrays are static where they
// fit the 48 KiB a block gets unasked; where they do not (the prefill from head_dim 96, and
// at 64 a RotateKV prefill at 3 bits and more; RotateKV decode at 128; every kernel at 256),
// the same arrays, as one struct (PrefillMmaShared, DecodeShared), live in the launch's
// dynamic shared memory, which kernels/cupy/attention.py sizes by that struct's layout.

// MAXG, DEC_WARPS, DECODE_CHUNK, STORE_Q_WARPS, PF_WARPS, PF_ROWS, STATIC_SMEM_MAX,
// DEC_BLOCKS(D), PF_KEYS(D), KV_TYPE_GROUP(BITS) and the clipping ratios come defined before
// this text, from kernels/cupy/kernel_constants.py, which says what each is.
#define LOG2E 1.4426950408889634f

// A kernel's shared struct S (its arrays, declared static instead where S fits
// STATIC_SMEM_MAX) in the launch's dynamic shared memory: the host sets the kernel's
// max_dynamic_shared_size_bytes and launches with shared_mem = sizeof(S); a launch given
// less traps rather than overrun it.
template <typename S>
__device__ __forceinline__ S& dynamic_shared() {
    extern __shared__ __align__(16) u8 dyn_smem[];
    u32 given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < sizeof(S)) __trap();
    return *reinterpret_cast<S*>(dyn_smem);
}

// Pair i of a head's row src (rope_index's two dims i0, i1), RoPE-rotated at pos when rope:
// how q and k are read wherever they are consumed.
__device__ __forceinline__ void roped_pair(const float* src, int i, int D, int neox, int rope, int pos,
                                           const double* __restrict__ inv_freq, int& i0, int& i1, float& x0,
                                           float& x1) {
    rope_index(i, D, neox, i0, i1);
    x0 = src[i0];
    x1 = src[i1];
    if (rope) rope_pair(x0, x1, pos, inv_freq[i]);
}

// Load, rotate and pre-scale the G query heads of token t (kv head kh) into q_s[G][D].
template <int D>
__device__ __forceinline__ void load_q(const float* __restrict__ q, int sq, int t, int kh, int G, int pos,
                                       const double* __restrict__ inv_freq, int rope, int neox, float scale, float* q_s,
                                       int tid, int nthreads) {
    for (int i = tid; i < G * D / 2; i += nthreads) {
        const int g = i / (D / 2), pi = i - g * (D / 2);
        int i0, i1;
        float x0, x1;
        roped_pair(q + (size_t)t * sq + (kh * G + g) * D, pi, D, neox, rope, pos, inv_freq, i0, i1, x0, x1);
        q_s[g * D + i0] = x0 * scale;
        q_s[g * D + i1] = x1 * scale;
    }
}

// The cache row (token slot, KV head) of context position p.
__device__ __forceinline__ size_t cache_index(const int* __restrict__ table, int p, int bs, int KVH, int kh) {
    const int slot = table[p / bs] * bs + p % bs;
    return (size_t)slot * KVH + kh;
}

// Bytes of a cache row: D fp16, or BITS-bit codes (8 in BITS bytes) then a (scale, min) fp16
// pair per group; gshift: log2 of the group (shifts: a division by a runtime group costs tens
// of instructions).
template <int D, int BITS>
__host__ __device__ constexpr int kv_row_bytes(int gshift) { return BITS == 16 ? 2 * D : D * BITS / 8 + ((4 * D) >> gshift); }

// A RotateKV type's group at head_dim D as kernels/kv_layout.py sets it (the type's group, or
// the rotation block where the head is narrower), and its log2: constants, so that a row's
// offsets fold into the addresses instead of being computed per value. The launch's `group`
// argument must equal it (kv_group_checked traps otherwise).
template <int D, int BITS>
__host__ __device__ constexpr int kv_group() {
    constexpr int type_group = KV_TYPE_GROUP(BITS), block = D & -D;
    return type_group < block ? type_group : block;
}
template <int D, int BITS>
__host__ __device__ constexpr int kv_gshift() {
    int shift = 0;
    while ((1 << shift) < kv_group<D, BITS>()) shift++;
    return shift;
}
template <int D, int BITS>
__device__ __forceinline__ void kv_group_checked(int group) {
    if (BITS != 16 && group != kv_group<D, BITS>()) __trap();
}

// Values 8c..8c+7 of the cache row at r as loaded, before kv_dequant8 makes them 8 fp16 (what
// the kernels stage in shared memory): an fp16 row's 8 values; a RotateKV row's codes in x
// (and y at 8 bits) and their group's (scale, min) fp16 pair in z. Loading and converting
// apart lets a thread issue several rows' loads before it waits on the first.
template <int D, int BITS>
__device__ __forceinline__ uint4 kv_fetch8(const u8* r, int c, int gshift) {
    if constexpr (BITS == 16) {
        return *(const uint4*)(r + c * 16);
    } else {
        constexpr int CB = D * BITS / 8;  // RotateKV rows are 4-byte aligned
        uint4 u = make_uint4(0, 0, 0, 0);
        if constexpr (BITS == 8) {
            u.x = *(const u32*)(r + c * 8);
            u.y = *(const u32*)(r + c * 8 + 4);
        } else if constexpr (BITS == 4) {
            u.x = *(const u32*)(r + c * 4);
        } else if constexpr (BITS == 2) {
            u.x = *(const u16*)(r + c * 2);
        } else {  // bytes 3c..3c+2, inside the two aligned words from there (scales follow the codes)
            const u32* w = (const u32*)(r + ((c * 3) & ~3));
            u.x = __funnelshift_r(w[0], w[1], 8 * ((c * 3) & 3));
        }
        u.z = *(const u32*)(r + CB + 4 * ((c * 8) >> gshift));
        return u;
    }
}

// N = 4, 8 or 16 bytes global -> shared, asynchronously (the narrow sizes only through L1)
template <int N>
__device__ __forceinline__ void cp_async_n(u32 dst, const void* src) {
    if constexpr (N == 16)
        cp_async16(dst, src, 16);
    else if constexpr (N == 8)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}

// fp16 bits of -2^e or 2^e (a normal number)
__device__ constexpr u32 f16_pow2(int e, bool neg = false) { return (neg ? 0x8000u : 0u) | (u32)((e + 15) << 10); }

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// (a & b) | c in one LOP3 (the compiler splits it into two where b and c are immediates)
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// kv_fetch8's loads as 8 fp16 values min + code * scale, rounded once (the twin's float32
// value to fp16). Two codes per fp16x2 register and no conversion instructions (their pipe
// runs at a quarter of the FMA's): a pair of codes goes, by a byte permute, a mask and
// 0x6400 (1024.0) as exponent, into the mantissas of two halves, the second code shifted up
// by BITS (x2^BITS, exact: both codes stay below 1024); one fp16x2 FMA takes (1024 + c0,
// 1024 + c1 * 2^BITS) exactly to (c0, c1), a second to min + c * scale. 4-bit words hold a
// pair 16 bits apart (kernels/kv_layout.py CODE_ORDER): one mask makes the two halves, no
// permute, and pairs 1 and 3 come masked in place, shifted up by 4 in both halves.
template <int BITS>
__device__ __forceinline__ uint4 kv_dequant8(uint4 u) {
    if constexpr (BITS == 16) {
        return u;
    } else {
        constexpr int B = BITS == 8 ? 0 : BITS;  // 8-bit codes are whole bytes, each its own half
        constexpr u32 MAGIC = 0x64006400u, MASK = (1u << BITS) - 1, PAIR = MASK | (MASK << (16 + B));
        constexpr u32 S = f16_pow2(0) | (f16_pow2(-B) << 16), O = f16_pow2(10, true) | (f16_pow2(10 - B, true) << 16);
        const u32 d2 = __byte_perm(u.z, 0, 0x1010), m2 = __byte_perm(u.z, 0, 0x3232);  // (scale, scale), (min, min)
        u32 h[4];
        if constexpr (BITS == 4) {
            constexpr u32 S4 = f16_pow2(-4) | (f16_pow2(-4) << 16), O4 = f16_pow2(6, true) | (f16_pow2(6, true) << 16);
            constexpr u32 S1 = f16_pow2(0) | (f16_pow2(0) << 16), O1 = f16_pow2(10, true) | (f16_pow2(10, true) << 16);
#pragma unroll
            for (int k = 0; k < 2; k++) {  // values (4k, 4k + 1) in slots (2k, 2k + 4), (4k + 2, 4k + 3) in (2k + 1, 2k + 5)
                const u32 w = u.x >> (8 * k);
                h[2 * k] = hfma2(hfma2(and_or(w, 0x000f000fu, MAGIC), S1, O1), d2, m2);
                h[2 * k + 1] = hfma2(hfma2(and_or(w, 0x00f000f0u, MAGIC), S4, O4), d2, m2);
            }
        } else {
#pragma unroll
            for (int k = 0; k < 4; k++) {  // codes 2k, 2k+1
                u32 x;
                if constexpr (BITS == 8) {  // bytes (c, 0x64) twice
                    x = __byte_perm(k < 2 ? u.x : u.y, MAGIC, (k & 1) ? 0x7352 : 0x7150);
                } else {  // the 2 bytes holding the pair in both halves, shifted down to the first code
                    const int bit = 2 * k * BITS, b = bit >> 3;
                    const u32 y = __byte_perm(u.x, 0, b | ((b + 1) << 4) | (b << 8) | ((b + 1) << 12)) >> (bit & 7);
                    x = (y & PAIR) | MAGIC;
                }
                h[k] = hfma2(hfma2(x, S, O), d2, m2);
            }
        }
        return make_uint4(h[0], h[1], h[2], h[3]);
    }
}

// In-place unnormalized Walsh-Hadamard transform of `rows` rows of D floats in shared
// memory, in blocks of HB (the largest power of two dividing D), butterflies in the order the
// NumPy twin runs them (kernels/kv_quant.py). Threads tid of n take the pairs; WARP: the
// caller is one warp (syncs the warp), else the whole block (every thread must call).
// The stages are unrolled so that h is a constant: j / h and j % h a shift and a mask, not
// the tens of instructions of a division by a runtime value (every decode split rotates its q).
template <int D, bool WARP>
__device__ __forceinline__ void fwht(float* s, int rows, int tid, int n) {
    constexpr int HB = D & -D, STAGES = HB == 32 ? 5 : HB == 64 ? 6 : HB == 128 ? 7 : 8;
    static_assert(1 << STAGES == HB, "head_dim's rotation block is 32..256");
#pragma unroll
    for (int stage = 0; stage < STAGES; stage++) {
        const int h = 1 << stage;
        for (int i = tid; i < rows * (D / 2); i += n) {
            const int r = i / (D / 2), j = i - r * (D / 2);
            const int a = r * D + (j / h) * 2 * h + (j % h);
            const float x = s[a], y = s[a + h];
            s[a] = x + y;
            s[a + h] = x - y;
        }
        if (WARP) __syncwarp(); else __syncthreads();
    }
}

// Position p's transformed fp16 row (KV head kh) for a sequence whose step rows start at
// qstart for positions c0..: the step's scratch row, or its ring slot rs's.
__device__ __forceinline__ const u16* exact_row(const u16* scratch, const u16* ring, int p, int c0, int qstart,
                                                int rs, int R, int KVH, int kh, int D) {
    if (p >= c0) return scratch + ((size_t)(qstart + p - c0) * KVH + kh) * D;
    return ring + (((size_t)rs * (R + 1) + (p == 0 ? R : p % R)) * KVH + kh) * D;
}

// q rows of the head group divided by the key scale (kscale [KVH, D]) and rotated into the
// cache's basis: q_s[rows][D] in shared memory; every thread of the block calls it.
template <int D>
__device__ __forceinline__ void q_to_cache_basis(float* q_s, int rows, const float* __restrict__ kscale, int kh) {
    __syncthreads();
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) q_s[i] /= kscale[kh * D + i % D];
    __syncthreads();
    fwht<D, false>(q_s, rows, threadIdx.x, blockDim.x);
}

// --- store new K/V in a RotateKV cache (prefill, and decode before attn_decode reads it) -------
// grid (T, KVH); k rotated by RoPE when rope_k, centred and scaled per channel (kcenter,
// kscale [KVH, D]), then K and V rows by the Hadamard transform (times hs = 1/sqrt(HB)): the
// rows in fp16 to the step's scratch [T, KVH, D], and quantized per group into the cache, the
// range clipped by the ratio of least squared error (kernels/kv_quant.py, its twin, says how).
// Slots < 0 are skipped.
__constant__ float CLIP[N_CLIP] = {CLIP_RATIOS};
__constant__ float CLIP2[N_CLIP] = {CLIP2_RATIOS};  // 2r, as the twin rounds it
template <int D, int BITS>
__device__ __forceinline__ void kv_store_q(const float* __restrict__ k, int sk, const float* __restrict__ v, int sv,
                                           const int* __restrict__ positions, const double* __restrict__ inv_freq,
                                           int rope_k, int neox, u8* kc, u8* vc, const int* __restrict__ slots,
                                           int KVH, int group, float hs, const float* __restrict__ kcenter,
                                           const float* __restrict__ kscale, u16* sk16, u16* sv16) {
    constexpr int CB = D * BITS / 8;
    constexpr float QMAX = (float)((1 << BITS) - 1);
    __shared__ float x_s[2 * D];
    __shared__ float gp_s[2 * D / 8][2];  // (scale, min) per group of each row, as stored
    __shared__ float err_s[2 * D / 32][N_CLIP];  // per group (at least 32 values) and ratio: the error
    __shared__ u32 par_s[2 * D / 32][N_CLIP];    // and the (scale, min) fp16 pair
    pdl_wait();  // in a decode graph it starts beside the qkv product, whose output it reads
    pdl_trigger();
    const int t = blockIdx.x, h = blockIdx.y, slot = slots[t];
    if (slot < 0) return;
    kv_group_checked<D, BITS>(group);
    // the group a constant: its divisions shifts, its loops' counts known
    constexpr int GROUP = kv_group<D, BITS>(), ng = D / GROUP, rb = kv_row_bytes<D, BITS>(kv_gshift<D, BITS>());
    const int pos = positions[t];
    for (int i = threadIdx.x; i < D / 2; i += blockDim.x) {
        int i0, i1;
        float x0, x1;
        roped_pair(k + (size_t)t * sk + h * D, i, D, neox, rope_k, pos, inv_freq, i0, i1, x0, x1);
        x_s[i0] = (x0 - kcenter[h * D + i0]) * kscale[h * D + i0];
        x_s[i1] = (x1 - kcenter[h * D + i1]) * kscale[h * D + i1];
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) x_s[D + i] = v[(size_t)t * sv + h * D + i];
    __syncthreads();
    fwht<D, false>(x_s, 2, threadIdx.x, blockDim.x);
    for (int i = threadIdx.x; i < 2 * D; i += blockDim.x) {
        x_s[i] *= hs;
        (i < D ? sk16 : sv16)[((size_t)t * KVH + h) * D + i % D] = f2h(x_s[i]);
    }
    __syncthreads();
    u8* rows[2] = {kc + ((size_t)slot * KVH + h) * rb, vc + ((size_t)slot * KVH + h) * rb};
    // a warp per (row, group, clipping ratio), all ratios at once (one after another they were
    // most of a decode step's store at batch 1): the range, then the ratio's squared error
    // (kernels/kv_quant.py's twin sums the error as the warp does; _rn: no contraction); then
    // per group the ratio of least error, the first of equals
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = warp; i < 2 * ng * N_CLIP; i += blockDim.x >> 5) {
        const int gi = i / N_CLIP, k = i - gi * N_CLIP;
        const float* x = x_s + (gi / ng) * D + (gi % ng) * GROUP;
        float mn = x[lane], mx = x[lane];
        for (int j = lane + 32; j < GROUP; j += 32) { mn = fminf(mn, x[j]); mx = fmaxf(mx, x[j]); }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            mn = fminf(mn, __shfl_xor_sync(FULL_MASK, mn, o));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
        }
        const float mid = __fdiv_rn(__fadd_rn(mx, mn), 2.0f), half = __fdiv_rn(__fsub_rn(mx, mn), 2.0f);
        const u16 mh = f2h(__fsub_rn(mid, __fmul_rn(CLIP[k], half)));
        const u16 sh = f2h(__fdiv_rn(__fmul_rn(CLIP2[k], half), QMAX));
        const float d = h2f(sh), m = h2f(mh);
        float acc = 0.0f;
        for (int j = lane; j < GROUP; j += 32) {
            const float q = d > 0.0f ? fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x[j], m), d)), 0.0f), QMAX) : 0.0f;
            const float e = __fsub_rn(__fadd_rn(m, __fmul_rn(q, d)), x[j]);
            acc = j == lane ? __fmul_rn(e, e) : __fadd_rn(acc, __fmul_rn(e, e));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(FULL_MASK, acc, o));
        if (lane == 0) {
            err_s[gi][k] = acc;
            par_s[gi][k] = (u32)sh | ((u32)mh << 16);
        }
    }
    __syncthreads();
    for (int gi = threadIdx.x; gi < 2 * ng; gi += blockDim.x) {
        float best = __int_as_float(0x7f800000);
        u32 par = 0;
#pragma unroll
        for (int k = 0; k < N_CLIP; k++)
            if (err_s[gi][k] < best) { best = err_s[gi][k]; par = par_s[gi][k]; }
        u16* pr = (u16*)(rows[gi / ng] + CB) + 2 * (gi % ng);
        pr[0] = (u16)par;
        pr[1] = (u16)(par >> 16);
        gp_s[gi][0] = h2f((u16)par);
        gp_s[gi][1] = h2f((u16)(par >> 16));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * (D / 8); i += blockDim.x) {
        const int r = i / (D / 8), c = i - r * (D / 8), g = (c * 8) / GROUP;
        const float d = gp_s[r * ng + g][0], m = gp_s[r * ng + g][1];
        u64 w = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float q = d > 0.0f ? fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x_s[r * D + c * 8 + j], m), d)), 0.0f), QMAX) : 0.0f;
            // slot of value j in the word (kernels/kv_layout.py CODE_ORDER): 4-bit pairs 16 bits apart
            const int slot = BITS == 4 ? (j >> 1) | ((j & 1) << 2) : j;
            w |= (u64)(u32)q << (slot * BITS);
        }
#pragma unroll
        for (int j = 0; j < BITS; j++) rows[r][c * BITS + j] = (u8)(w >> (8 * j));
    }
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
        float x0, x1;
        roped_pair(k + (size_t)t * sk + h * D, pi, D, neox, rope_k, pos, inv_freq, i0, i1, x0, x1);
        u16* dst = kc + ((size_t)slot * KVH + h) * D;
        dst[i0] = f2h(x0);
        dst[i1] = f2h(x1);
    }
    for (int i = threadIdx.x; i < KVH * D; i += blockDim.x) {
        const int h = i / D, d = i - h * D;
        vc[((size_t)slot * KVH + h) * D + d] = f2h(v[(size_t)t * sv + h * D + d]);
    }
}

// grid (T, KVH), after a prefill's attention has read the ring: each new row of position 0,
// or of the sequence's last R positions, into its ring slot (recent_slots [B]).
__device__ __forceinline__ void kv_recent(const u16* __restrict__ sk16, const u16* __restrict__ sv16, u16* ringk,
                                          u16* ringv, const int* __restrict__ positions,
                                          const int* __restrict__ qstarts, const int* __restrict__ ctx_lens,
                                          const int* __restrict__ recent_slots, int B, int KVH, int R, int D) {
    const int t = blockIdx.x, h = blockIdx.y, p = positions[t];
    int b = 0;
    while (b + 1 < B && qstarts[b + 1] <= t) b++;
    if (p != 0 && p < ctx_lens[b] - R) return;
    const size_t src = ((size_t)t * KVH + h) * D;
    const size_t dst = (((size_t)recent_slots[b] * (R + 1) + (p == 0 ? R : p % R)) * KVH + h) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        ringk[dst + i] = sk16[src + i];
        ringv[dst + i] = sv16[src + i];
    }
}

// --- prefill / mixed batches: flash attention on the tensor cores -----------------------------
// grid (tiles, KVH); a tile is PF_ROWS query rows of one sequence (tiles [b, r0], heaviest
// first: kernels/cupy/steps.py prefill_row_tiles). A row is a (query token, head of the KV
// head's group) pair, flattened: the sequence's row r is token r / G, head r % G, so the K/V
// tiles staged once in shared memory serve all G heads, and m-tiles stay full at any G (7
// too). A warp takes 16 rows; each row has its own causal limit qpos and window start lo.
// Key tiles of PF_KEYS(D) rows are staged in shared memory as fp16, two stages: the next
// tile is on its way while the tensor cores (mma m16n8k16: fp16 in, fp32 sums) take
// S = Q K^T and O += P V of this one; key tiles before every row's window or past every
// row's query are not read. Online softmax per row in the log2 domain (q pre-scaled by
// scale * log2 e); P goes from S's accumulator fragments straight into the A
// fragments of P V (the two layouts coincide), rounded to fp16 (2^-11 relative), and the row
// sums add those rounded weights. q enters as fp16 too.
// An fp16 cache's tiles are copied by cp.async straight into their stage. A RotateKV cache's
// (BITS < 16) are copied as stored (codes, scales) into `raw` a tile ahead, and made fp16
// from there (kv_dequant8) into their stage; q enters divided by the key scale and rotated,
// and the output is rotated back. A query reads position 0 and its `recent` latest positions
// unquantized (the step's scratch or the ring, exact_row): a key tile that holds such keys
// for some rows of the block and keys read quantized for others is taken twice, once as
// stored and once unquantized, each pass masking the keys its rows read from the other.
// Shared memory: q [PF_ROWS][D + 8] fp16 and two stages of K and V [PF_KEYS][D + 8] (padded
// rows: ldmatrix's 8 row addresses hit distinct banks), and a RotateKV tile's K and V rows as
// stored; attention.py prefill_mma_smem is its size where it is dynamic. Head dim 256 takes
// 32-key tiles: its 16 x 256 fp32 accumulator is 128 registers a lane, and the shared arrays
// stay small enough for two blocks an SM.
// RotateKV rows are at most D bytes of codes and a (scale, min) pair per 32 values
template <int D, int BITS>
__host__ __device__ constexpr int kv_raw_row_max() { return BITS == 16 ? 0 : D * BITS / 8 + D / 8; }
template <int D, int BITS>
struct PrefillMmaRaw {
    __align__(16) u8 raw[2 * PF_KEYS(D) * kv_raw_row_max<D, BITS>()];
};
template <int D>
struct PrefillMmaRaw<D, 16> {};  // an fp16 cache's tiles need no copy as stored (no bytes: an empty base)
template <int D, int BITS>
struct PrefillMmaShared : PrefillMmaRaw<D, BITS> {
    __align__(16) u16 q[PF_ROWS * (D + 8)];
    __align__(16) u16 k[2 * PF_KEYS(D) * (D + 8)];
    __align__(16) u16 v[2 * PF_KEYS(D) * (D + 8)];
};
template <int D, int BITS>
__device__ __forceinline__ void attn_prefill_mma(const float* __restrict__ q, int sq, const int* __restrict__ positions,
                                                 const double* __restrict__ inv_freq, int rope_q, int neox,
                                                 const void* __restrict__ kcv, const void* __restrict__ vcv,
                                                 const int* __restrict__ tables, int W,
                                                 const int* __restrict__ ctx_lens, const int* __restrict__ qstarts,
                                                 const int* __restrict__ tiles, int H, int KVH, int bs, float scale,
                                                 int window, int group, float hs, const float* __restrict__ kscale,
                                                 const u16* __restrict__ sk16, const u16* __restrict__ sv16,
                                                 const u16* __restrict__ ringk, const u16* __restrict__ ringv,
                                                 const int* __restrict__ recent_slots, int recent, int R,
                                                 float* __restrict__ out) {
    constexpr bool ROT = BITS != 16;
    constexpr int RS = D + 8, KT = PF_KEYS(D), NT = KT / 8, DT = D / 8;
    constexpr bool QREG = D <= 128;  // q's A fragments held in registers (at 256 they would spill)
    const u16* kc = (const u16*)kcv;
    const u16* vc = (const u16*)vcv;
    u16 *q_s, *k_s, *v_s;            // k_s, v_s: stage 0, stage 1 KT rows further
    u8* raw_s = nullptr;
    if constexpr (sizeof(PrefillMmaShared<D, BITS>) <= STATIC_SMEM_MAX) {
        __shared__ __align__(16) u16 q_st[PF_ROWS * RS];
        __shared__ __align__(16) u16 k_st[2 * KT * RS];
        __shared__ __align__(16) u16 v_st[2 * KT * RS];
        q_s = q_st, k_s = k_st, v_s = v_st;
        if constexpr (ROT) {
            __shared__ __align__(16) u8 raw_st[sizeof(PrefillMmaRaw<D, BITS>)];
            raw_s = raw_st;
        }
    } else {
        PrefillMmaShared<D, BITS>& sh = dynamic_shared<PrefillMmaShared<D, BITS>>();
        q_s = sh.q, k_s = sh.k, v_s = sh.v;
        if constexpr (ROT) raw_s = sh.raw;
    }
    const int G = H / KVH, kh = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, tq = lane & 3;
    const int b = tiles[2 * blockIdx.x], r0 = tiles[2 * blockIdx.x + 1];
    const int qs0 = qstarts[b], n = qstarts[b + 1] - qs0, c0 = ctx_lens[b] - n, nrows = n * G;
    const int* table = tables + (size_t)b * W;
    // the block's keys: from its first row's window start to its last row's query
    const int last = c0 + (min(r0 + PF_ROWS, nrows) - 1) / G;
    const int kfirst = (window > 0 ? max(0, c0 + r0 / G - window + 1) : 0) / KT * KT;
    const int ntiles = (last - kfirst) / KT + 1;

    // keys k0..k0+KT-1 into stage st: 4 lanes a row (64 contiguous bytes a load), KT / 32 rows
    // a thread; keys past `last` are zeros (a zero weight times stale bits could be a NaN)
    auto stage = [&](int k0, int st) {
#pragma unroll
        for (int j = 0; j < KT / 32; j++) {
            const int r = (tid >> 2) + 32 * j, p = k0 + r;
            const bool in = p <= last;
            const size_t row = in ? cache_index(table, p, bs, KVH, kh) * D : 0;
            const u32 ks = smem_addr(k_s + (st * KT + r) * RS), vs = smem_addr(v_s + (st * KT + r) * RS);
#pragma unroll
            for (int i = 0; i < DT / 4; i++) {
                const int c = (tid & 3) + 4 * i;
                cp_async16(ks + 16 * c, kc + row + 8 * c, in ? 16 : 0);
                cp_async16(vs + 16 * c, vc + row + 8 * c, in ? 16 : 0);
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    // RotateKV: the block's passes over its key tiles, pass x = 2 tile + (unquantized), in order:
    // a tile's quantized pass where some row reads one of its keys quantized, its unquantized
    // pass where some row reads one unquantized (position 0, or within `recent` of the row's
    // query; the block's rows' queries are first_q..last)
    const int first_q = c0 + r0 / G, rs = ROT ? recent_slots[b] : 0;
    auto quantized_pass = [&](int t) { return kfirst + t * KT <= last - recent; };
    auto exact_pass = [&](int t) {
        const int k0 = kfirst + t * KT;
        return k0 == 0 || k0 + KT - 1 > first_q - recent;
    };
    auto pass_after = [&](int x) {
        if (!(x & 1) && exact_pass(x >> 1)) return x + 1;
        const int t = (x >> 1) + 1;
        return quantized_pass(t) ? 2 * t : 2 * t + 1;
    };
    constexpr int GSHIFT = kv_gshift<D, BITS>(), RB = kv_row_bytes<D, BITS>(GSHIFT);
    u8* rawk = raw_s;
    u8* rawv = raw_s + KT * kv_raw_row_max<D, BITS>();
    // a quantized pass's rows as stored into raw: TPR threads a row, each its pieces j, j + TPR,
    // ... of CW bytes (the widest copy the rows' alignment allows)
    constexpr int CW = RB % 16 == 0 ? 16 : (RB % 8 == 0 ? 8 : 4), PIECES = RB / CW;
    constexpr int TPR = PF_WARPS * 32 / KT, PER = (PIECES + TPR - 1) / TPR;
    static_assert(TPR * KT == PF_WARPS * 32, "whole rows a block");
    auto copy_raw = [&](int x) {
        if (x < 2 * ntiles && !(x & 1)) {
            const int r = tid / TPR, j = tid % TPR, p = kfirst + (x >> 1) * KT + r;
            if (p <= last) {
                const size_t off = cache_index(table, p, bs, KVH, kh) * RB + j * CW;
                const u8* gk = (const u8*)kcv + off;
                const u8* gv = (const u8*)vcv + off;
                const u32 dk = smem_addr(rawk + r * RB + j * CW), dv = smem_addr(rawv + r * RB + j * CW);
#pragma unroll
                for (int m = 0; m < PER; m++) {
                    if (m * TPR + j >= PIECES) break;
                    cp_async_n<CW>(dk + m * TPR * CW, gk + m * TPR * CW);
                    cp_async_n<CW>(dv + m * TPR * CW, gv + m * TPR * CW);
                }
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    // pass x's keys as fp16 into stage st (a quantized pass's after its copy landed and a
    // sync): past `last`, and in an unquantized pass keys no row reads so, zeros
    constexpr int ITEMS = KT * (D / 8) / (PF_WARPS * 32);
    static_assert(ITEMS * PF_WARPS * 32 == KT * (D / 8), "staging shares");
    auto convert = [&](int x, int st) {
        const int k0 = kfirst + (x >> 1) * KT;
#pragma unroll
        for (int j = 0; j < ITEMS; j++) {
            const int i = tid + j * PF_WARPS * 32, r = i / (D / 8), c = i - r * (D / 8), p = k0 + r;
            uint4 kr = make_uint4(0, 0, 0, 0), vr = kr;
            if (p <= last) {
                if (!(x & 1)) {
                    kr = kv_dequant8<BITS>(kv_fetch8<D, BITS>(rawk + r * RB, c, GSHIFT));
                    vr = kv_dequant8<BITS>(kv_fetch8<D, BITS>(rawv + r * RB, c, GSHIFT));
                } else if (p == 0 || p > first_q - recent) {
                    kr = *(const uint4*)(exact_row(sk16, ringk, p, c0, qs0, rs, R, KVH, kh, D) + c * 8);
                    vr = *(const uint4*)(exact_row(sv16, ringv, p, c0, qs0, rs, R, KVH, kh, D) + c * 8);
                }
            }
            *(uint4*)(k_s + (st * KT + r) * RS + c * 8) = kr;
            *(uint4*)(v_s + (st * KT + r) * RS + c * 8) = vr;
        }
    };

    // the block's q rows, roped and pre-scaled, in fp16; rows past the sequence's are zeros.
    // RotateKV: divided by the key scale and rotated (scale carries 1/sqrt(HB)) in fp32 first,
    // each warp its 16 rows 8 at a time, in the K stages (no tile is staged yet)
    int xfirst = 0;
    if constexpr (ROT) {
        kv_group_checked<D, BITS>(group);
        xfirst = quantized_pass(0) ? 0 : 1;
        copy_raw(xfirst);  // in flight while q is made
        float* xs = (float*)k_s + warp * 8 * D;
        for (int hh = 0; hh < 2; hh++) {
            for (int i = lane; i < 8 * (D / 2); i += 32) {
                const int r = i / (D / 2), pi = i - r * (D / 2), row = r0 + 16 * warp + 8 * hh + r;
                int i0, i1;
                float x0 = 0.0f, x1 = 0.0f;
                if (row < nrows) {
                    const int t = qs0 + row / G, g = row % G;
                    roped_pair(q + (size_t)t * sq + (kh * G + g) * D, pi, D, neox, rope_q, positions[t], inv_freq, i0,
                               i1, x0, x1);
                } else {
                    rope_index(pi, D, neox, i0, i1);
                }
                xs[r * D + i0] = x0 * scale / kscale[kh * D + i0];
                xs[r * D + i1] = x1 * scale / kscale[kh * D + i1];
            }
            __syncwarp();
            fwht<D, true>(xs, 8, lane, 32);
            for (int i = lane; i < 8 * D; i += 32) q_s[(16 * warp + 8 * hh + i / D) * RS + i % D] = f2h(xs[i]);
            __syncwarp();
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();  // every warp's q is made (the K stages are free); the first pass's copy has landed
        convert(xfirst, 0);
        __syncthreads();  // raw is free
        copy_raw(pass_after(xfirst));
    } else {
        stage(kfirst, 0);
        for (int i = tid; i < PF_ROWS * (D / 2); i += blockDim.x) {
            const int r = i / (D / 2), pi = i - r * (D / 2), row = r0 + r;
            int i0, i1;
            float x0 = 0.0f, x1 = 0.0f;
            if (row < nrows) {
                const int t = qs0 + row / G, g = row % G;
                roped_pair(q + (size_t)t * sq + (kh * G + g) * D, pi, D, neox, rope_q, positions[t], inv_freq, i0, i1,
                           x0, x1);
            } else {
                rope_index(pi, D, neox, i0, i1);
            }
            q_s[r * RS + i0] = f2h(x0 * scale);
            q_s[r * RS + i1] = f2h(x1 * scale);
        }
    }
    __syncthreads();

    // lane (gq, tq) holds rows gq and gq + 8 of the warp's 16 (h = 0, 1): their causal limits
    // and window starts (-1: a row past the sequence's sees nothing); the warp's extremes
    const int wr = r0 + 16 * warp;
    int qp[2], lo[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = wr + gq + 8 * h;
        qp[h] = row < nrows ? c0 + row / G : -1;
        lo[h] = window > 0 ? qp[h] - window + 1 : 0;
    }
    const bool wvalid = wr < nrows;
    const int wq_min = c0 + wr / G, wq_max = c0 + (min(wr + 15, nrows - 1)) / G;
    const int wlo_min = window > 0 ? wq_min - window + 1 : 0, wlo_max = window > 0 ? wq_max - window + 1 : 0;

    // ldmatrix rows: q's A operand, rows (lane & 7) + 8 ((lane >> 3) & 1) at dims + 8 (lane >> 4);
    // K's B operand (non-transposed: a key's dims are a column of B), keys lane & 7 at dims
    // + 8 (lane >> 3): two k-steps per load; V's B operand (transposed), keys (lane & 7) +
    // 8 ((lane >> 3) & 1) at dims + 8 (lane >> 4): two 8-dim n-tiles per load
    const u32 qa = smem_addr(q_s + (16 * warp + (lane & 7) + 8 * ((lane >> 3) & 1)) * RS + 8 * (lane >> 4));
    const u32 ka = smem_addr(k_s + (lane & 7) * RS + 8 * (lane >> 3));
    const u32 va = smem_addr(v_s + ((lane & 7) + 8 * ((lane >> 3) & 1)) * RS + 8 * (lane >> 4));
    u32 qf[QREG ? D / 16 : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int c = 0; c < D / 16; c++) ldsm4(qf[c], qa + 32 * c);
    }
    // O: dims 8d + 2tq, +1 of row gq (acc[d][0..1]) and of row gq + 8 (acc[d][2..3])
    float acc[DT][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int d = 0; d < DT; d++) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.0f;

    // keys k0.. of stage st into the warp's rows; `exact` (RotateKV, a tile taken twice): this
    // pass's keys are those the row reads unquantized (1) or quantized (0), the rest masked
    auto attend = [&](int k0, int st, int exact) {
        if (!wvalid || k0 > wq_max || k0 + KT - 1 < wlo_min) return;  // warp-uniform: nothing visible

        // S = Q K^T: s[j] holds keys 8j + 2tq, +1 of rows gq (s[j][0..1]) and gq + 8 (s[j][2..3])
        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        const u32 kst = ka + 2 * st * KT * RS;
#pragma unroll
        for (int c = 0; c < D / 32; c++) {  // dims 32c..32c+31 (bytes 64c)
            u32 a0[4], a1[4];
            if constexpr (QREG) {
#pragma unroll
                for (int e = 0; e < 4; e++) a0[e] = qf[2 * c][e], a1[e] = qf[2 * c + 1][e];
            } else {
                ldsm4(a0, qa + 64 * c);
                ldsm4(a1, qa + 64 * c + 32);
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                u32 kb[4];
                ldsm4(kb, kst + 2 * 8 * j * RS + 64 * c);
                mma16816(s[j], a0, kb[0], kb[1]);
                mma16816(s[j], a1, kb[2], kb[3]);
            }
        }
        // the mask, where some key of the tile is hidden from some row of the warp
        if (exact >= 0 || k0 < wlo_max || k0 + KT - 1 > wq_min) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = k0 + 8 * j + 2 * tq + (e & 1), h = e >> 1;
                    bool hide = key > qp[h] || key < lo[h];
                    if (ROT && exact >= 0) hide = hide || exact != (key == 0 || qp[h] - key < recent);
                    if (hide) s[j][e] = NEG_INF;
                }
        }
        // online softmax; a row with no visible key yet keeps m = -inf and takes weights
        // exp2(-inf - 0) = 0
        float alpha[2], mu[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < NT; j++) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float mn = fmaxf(m[h], mx);
            mu[h] = mn == NEG_INF ? 0.0f : mn;
            alpha[h] = exp2f(m[h] - mu[h]);
            m[h] = mn;
        }
        u32 pf[NT][2];  // P in fp16: the A fragments of P V (keys 16j..: pf[2j], pf[2j + 1])
        float ls[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                pf[j][h] = pack_h2(exp2f(s[j][2 * h] - mu[h]), exp2f(s[j][2 * h + 1] - mu[h]));
                ls[h] += h2f((u16)pf[j][h]) + h2f((u16)(pf[j][h] >> 16));
            }
#pragma unroll
        for (int h = 0; h < 2; h++) l[h] = l[h] * alpha[h] + ls[h];  // this lane's share of the row's sum
#pragma unroll
        for (int d = 0; d < DT; d++) {
            acc[d][0] *= alpha[0], acc[d][1] *= alpha[0];
            acc[d][2] *= alpha[1], acc[d][3] *= alpha[1];
        }
        // O += P V
        const u32 vst = va + 2 * st * KT * RS;
#pragma unroll
        for (int kk = 0; kk < KT / 16; kk++) {
            const u32 a[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
#pragma unroll
            for (int dd = 0; dd < D / 16; dd++) {
                u32 vb[4];
                ldsm4_trans(vb, vst + 2 * (16 * kk * RS + 16 * dd));
                mma16816(acc[2 * dd], a, vb[0], vb[1]);
                mma16816(acc[2 * dd + 1], a, vb[2], vb[3]);
            }
        }
    };

    if constexpr (ROT) {
        // pass x in stage st; the next pass's copy landed at the top, made fp16 into the other
        // stage, then the one after it copied while this one is multiplied
        for (int it = 0, x = xfirst; x < 2 * ntiles; it++) {
            const int xn = pass_after(x), st = it & 1, t = x >> 1;
            asm volatile("cp.async.wait_all;" ::: "memory");
            __syncthreads();  // pass xn's copy has landed; every warp is done with stage st ^ 1
            if (xn < 2 * ntiles) {
                convert(xn, st ^ 1);
                __syncthreads();  // raw is free
                copy_raw(pass_after(xn));
            }
            attend(kfirst + t * KT, st, quantized_pass(t) && exact_pass(t) ? (x & 1) : -1);
            x = xn;
        }
    } else {
        for (int it = 0; it < ntiles; it++) {
            const int k0 = kfirst + it * KT, st = it & 1;
            asm volatile("cp.async.wait_all;" ::: "memory");
            __syncthreads();  // stage st has landed; every warp is done with stage st ^ 1
            if (it + 1 < ntiles) stage(k0 + KT, st ^ 1);
            attend(k0, st, -1);
        }
    }
    if constexpr (ROT) {
        // the output back from the rotated basis (times 1/sqrt(HB)), each warp its rows 8 at a
        // time in the K stages
        __syncthreads();  // every warp is done with the stages
        if (!wvalid) return;
        float* xs = (float*)k_s + warp * 8 * D;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] += __shfl_xor_sync(FULL_MASK, l[h], 1);
            l[h] += __shfl_xor_sync(FULL_MASK, l[h], 2);
            const float inv = 1.0f / l[h];
#pragma unroll
            for (int d = 0; d < DT; d++)
                *(float2*)(xs + gq * D + 8 * d + 2 * tq) = make_float2(acc[d][2 * h] * inv, acc[d][2 * h + 1] * inv);
            __syncwarp();
            fwht<D, true>(xs, 8, lane, 32);
            for (int i = lane; i < 8 * D; i += 32) {
                const int row = wr + 8 * h + i / D;
                if (row < nrows)
                    out[(size_t)(qs0 + row / G) * H * D + (kh * G + row % G) * D + i % D] = xs[i] * hs;
            }
            __syncwarp();
        }
        return;
    }
    if (!wvalid) return;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(FULL_MASK, l[h], 1);
        l[h] += __shfl_xor_sync(FULL_MASK, l[h], 2);
        const int row = wr + gq + 8 * h;
        if (row >= nrows) continue;
        const int t = qs0 + row / G, g = row % G;
        const float inv = 1.0f / l[h];
        float* o = out + (size_t)t * H * D + (kh * G + g) * D + 2 * tq;
#pragma unroll
        for (int d = 0; d < DT; d++) *(float2*)(o + 8 * d) = make_float2(acc[d][2 * h] * inv, acc[d][2 * h + 1] * inv);
    }
}

// --- decode: one new token per sequence (flash-decoding) --------------------------------------
// grid (max_splits, KVH, B). A sequence's keys are dealt to at most max_splits splits of
// whole DECODE_CHUNK-key chunks; the block stages its chunks in shared memory as fp16 one
// after the other (each thread's K/V loads in flight at once); the tensor cores take the
// scores and P @ V of the whole head group as one product's 8 columns, a warp per 16-key tile
// of each chunk and half of the dims (softmax online across the warp's tiles), and the warps'
// tiles are merged through shared memory. fp32
// FMAs on the staged rows cost every key ~90 warp instructions (G = 4, D = 128: each head's
// warp converting each value again), more than the staging of even 4-bit codes; the mma
// route ~10. q and the weights P enter as fp16 (2^-11 relative), the sums stay fp32. With one
// split the block writes the output;
// otherwise (max, sum, unnormalised output) per head, and the last split to finish (atomic
// counter, reset by it for the next launch) merges them: one kernel per layer in the graph.
// The new token's k (rotated) and v come from the inputs; split 0 stores them in the cache.
// Several rows may be one sequence at consecutive positions (a verifying pass of n tokens as
// the decode step of batch n): step_from[b] is the first of them, in row step_rows[b], and
// row b reads the others below its own as the step's (after pdl_wait: from the inputs, or for
// RotateKV kv_store_q's scratch and rows), not from the cache, which their own blocks are
// filling meanwhile. A leaf row (a draft tree's alternative at a position another row holds)
// reads its sequence's rows before its position so, and its own new row like any row.
// With out16 set, the output is also written in fp16 (a tensor-core product's input).
// With xq set, the block that writes a head group's output also quantizes it per 32 values
// (common.cu quantize8) for the dp4a product after it, which then needs no quantize_x.
// A RotateKV cache (BITS < 16) has the new token's row stored by kv_store_q just before (and
// in the scratch): the split holding it stages it once pdl_wait returns; the sink and the
// recent positions come from the ring, which split 0 then gives the new row; the output
// leaves through q_s, rotated back there.
// Its shared arrays where they are dynamic (attention.py decode_smem is the size).
template <int D, int BITS>
struct DecodeShared {
    __align__(16) float q[MAXG * D];
    __align__(16) u16 q16[MAXG * (D + 8)];
    __align__(16) u16 p[DEC_WARPS * 16 * MAXG];
    __align__(16) u16 kn[D];
    __align__(16) u16 vn[D];
    __align__(16) u16 k[DECODE_CHUNK * (D + 8)];
    __align__(16) u16 v[DECODE_CHUNK * (D + 8)];
    size_t row[DECODE_CHUNK];  // per key: its cache row's byte offset
    // RotateKV: a chunk's K then V rows as stored (codes, scales), copied ahead by cp.async
    __align__(16) u8 raw[BITS == 16 ? 16 : 2 * DECODE_CHUNK * kv_raw_row_max<D, BITS>()];
    int last;
};
template <int D, int BITS>
__device__ __forceinline__ void attn_decode(const float* __restrict__ q, int sq, const float* __restrict__ k, int sk,
                                            const float* __restrict__ v, int sv, const int* __restrict__ positions,
                                            const double* __restrict__ inv_freq, int rope_q, int rope_k, int neox,
                                            void* kc, void* vc, const int* __restrict__ tables, int W,
                                            const int* __restrict__ ctx_lens, const int* __restrict__ step_from,
                                            const int* __restrict__ step_rows, const int* __restrict__ slots, int H,
                                            int KVH, int bs, float scale, int window, int group, float hs,
                                            const float* __restrict__ kscale, const u16* __restrict__ sk16,
                                            const u16* __restrict__ sv16, u16* ringk, u16* ringv,
                                            const int* __restrict__ recent_slots, int recent, int R,
                                            float* part_o, float* part_ml, int* counters, int max_splits,
                                            float* __restrict__ out, u16* out16, u8* xq, int sxq, float2* xds) {
    constexpr int RS = D + 8;
    constexpr bool ROT = BITS != 16;
    float* q_s;
    u16 *q16_s, *p_s, *kn_s, *vn_s, *k_s, *v_s;
    size_t* row_s;
    u8* raw_s;
    int* last_p;
    if constexpr (sizeof(DecodeShared<D, BITS>) <= STATIC_SMEM_MAX) {
        __shared__ __align__(16) float q_st[MAXG * D];
        __shared__ __align__(16) u16 q16_st[MAXG * RS];
        __shared__ __align__(16) u16 p_st[DEC_WARPS * 16 * MAXG];
        __shared__ __align__(16) u16 kn_st[D];
        __shared__ __align__(16) u16 vn_st[D];
        __shared__ __align__(16) u16 k_st[DECODE_CHUNK * RS];
        __shared__ __align__(16) u16 v_st[DECODE_CHUNK * RS];
        __shared__ size_t row_st[DECODE_CHUNK];
        __shared__ __align__(16) u8 raw_st[sizeof(DecodeShared<D, BITS>::raw)];
        __shared__ int last_st;
        q_s = q_st, q16_s = q16_st, p_s = p_st, kn_s = kn_st, vn_s = vn_st, k_s = k_st, v_s = v_st;
        row_s = row_st, raw_s = raw_st, last_p = &last_st;
    } else {
        DecodeShared<D, BITS>& sh = dynamic_shared<DecodeShared<D, BITS>>();
        q_s = sh.q, q16_s = sh.q16, p_s = sh.p, kn_s = sh.kn, vn_s = sh.vn, k_s = sh.k, v_s = sh.v;
        row_s = sh.row, raw_s = sh.raw, last_p = &sh.last;
    }
    int& last_s = *last_p;
    const int sp = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, G = H / KVH;
    // the keys base..ctx-1 (the window's, or all) in DECODE_CHUNK-key chunks, dealt to at
    // most max_splits splits of `per` chunks each: a split's fixed costs (q, its partial
    // output, the merge) are paid once per `per` chunks, not per chunk
    const int ctx = ctx_lens[b], base = window > 0 ? max(0, ctx - window) : 0;
    const int nchunks = (ctx - base + DECODE_CHUNK - 1) / DECODE_CHUNK;
    const int per = (nchunks + max_splits - 1) / max_splits, nsplit = (nchunks + per - 1) / per;
    if (sp >= nsplit) return;
    const int pos = positions[b], newp = ctx - 1;
    // the step's positions of this row's sequence before its own, c0..newp-1, sit in rows r0..
    // (c0 < newp: a verifying pass laid out as decode rows, one sequence in several rows; else
    // c0 == newp); its own is row b, which for a draft tree's leaf is not r0 + newp - c0
    const int c0 = step_from[b], r0 = step_rows[b];
    const int* table = tables + (size_t)b * W;
    const int first = base + sp * per * DECODE_CHUNK, end = min(ctx, first + per * DECODE_CHUNK);
    const int rs = ROT ? recent_slots[b] : 0;
    kv_group_checked<D, BITS>(group);
    pdl_trigger();

    // Chunk [start, start + n) of the cached keys (written by earlier steps) staged as fp16,
    // only positions before c0 (the step's own rows may not be stored yet); rows past n are
    // zeros, not stale bits (a zero weight times a NaN is a NaN). Each thread takes ITEMS
    // 8-value pieces of the K and V rows.
    constexpr int ITEMS = DECODE_CHUNK * (D / 8) / (DEC_WARPS * 32), FLIGHT = ITEMS < 4 ? ITEMS : 4;
    static_assert(ITEMS * DEC_WARPS * 32 == DECODE_CHUNK * (D / 8) && ITEMS % FLIGHT == 0, "staging shares");
    // fp16 rows: loaded FLIGHT pieces at a time, all of their loads issued before the first is
    // stored (one memory round trip, not FLIGHT)
    auto stage_cached = [&](int start, int n) {
        if (threadIdx.x < n) {
            const int p = start + threadIdx.x;
            row_s[threadIdx.x] = p != newp ? cache_index(table, p, bs, KVH, kh) * (2 * D) : 0;
        }
        __syncthreads();
#pragma unroll
        for (int j0 = 0; j0 < ITEMS; j0 += FLIGHT) {
            uint4 kr[FLIGHT], vr[FLIGHT];
#pragma unroll
            for (int j = 0; j < FLIGHT; j++) {
                const int i = threadIdx.x + (j0 + j) * DEC_WARPS * 32, r = i / (D / 8), c = i - r * (D / 8);
                if (r >= n || start + r >= c0) continue;
                kr[j] = kv_fetch8<D, 16>((const u8*)kc + row_s[r], c, 0);
                vr[j] = kv_fetch8<D, 16>((const u8*)vc + row_s[r], c, 0);
            }
#pragma unroll
            for (int j = 0; j < FLIGHT; j++) {
                const int i = threadIdx.x + (j0 + j) * DEC_WARPS * 32, r = i / (D / 8), c = i - r * (D / 8);
                if (r < n && start + r >= c0) continue;
                *(uint4*)(k_s + r * RS + c * 8) = r < n ? kr[j] : make_uint4(0, 0, 0, 0);
                *(uint4*)(v_s + r * RS + c * 8) = r < n ? vr[j] : make_uint4(0, 0, 0, 0);
            }
        }
    };
    // RotateKV rows (codes, then scales: RB bytes) are copied as stored by cp.async into
    // raw_s one chunk ahead of the chunk being multiplied, so that a chunk's memory round trip
    // overlaps the one before's products, and made fp16 from there. Thread t < 64 holds the
    // table entry of row t of the chunk after the one being copied (loaded a chunk early too).
    constexpr int GSHIFT = kv_gshift<D, BITS>(), RB = kv_row_bytes<D, BITS>(GSHIFT);
    u8* rawk = raw_s;
    u8* rawv = raw_s + DECODE_CHUNK * kv_raw_row_max<D, BITS>();
    auto table_entry = [&](int start) {
        const int p = start + threadIdx.x;
        return threadIdx.x < DECODE_CHUNK && p < end ? table[p / bs] : 0;
    };
    auto set_rows = [&](int start, int entry) {  // the rows' byte offsets (no sync)
        const int p = start + threadIdx.x;
        if (threadIdx.x < DECODE_CHUNK && p < end) row_s[threadIdx.x] = ((size_t)(entry * bs + p % bs) * KVH + kh) * RB;
    };
    // TPR threads a row, each its pieces j, j + TPR, ... of CW bytes (the widest copy the rows'
    // alignment allows): one row offset a thread, the pieces' offsets constants (a piece per
    // loop turn, its row and offset divided out, cost ~45 instructions a piece)
    constexpr int CW = RB % 16 == 0 ? 16 : (RB % 8 == 0 ? 8 : 4), PIECES = RB / CW;
    constexpr int TPR = DEC_WARPS * 32 / DECODE_CHUNK, PER = (PIECES + TPR - 1) / TPR;
    static_assert(TPR * DECODE_CHUNK == DEC_WARPS * 32, "whole rows a block");
    auto copy_raw = [&](int start, int n) {  // after set_rows and a sync
        const int r = threadIdx.x / TPR, j = threadIdx.x % TPR;
        if (r < n && start + r < c0) {
            const u8* gk = (const u8*)kc + row_s[r] + j * CW;
            const u8* gv = (const u8*)vc + row_s[r] + j * CW;
            const u32 dk = smem_addr(rawk + r * RB + j * CW), dv = smem_addr(rawv + r * RB + j * CW);
#pragma unroll
            for (int m = 0; m < PER; m++) {
                if (m * TPR + j >= PIECES) break;
                cp_async_n<CW>(dk + m * TPR * CW, gk + m * TPR * CW);
                cp_async_n<CW>(dv + m * TPR * CW, gv + m * TPR * CW);
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    // the copied chunk as fp16 (after its copies are waited for and a sync); the sink and the
    // recent positions from the ring, fp16 already. A chunk of cached rows none of which is
    // read exact (all but a sequence's first and last chunks) takes a path without a test a row.
    auto convert_raw = [&](int start, int n) {
        if (n == DECODE_CHUNK && start > 0 && start + n <= c0 && start + n - 1 <= newp - recent) {
#pragma unroll
            for (int j = 0; j < ITEMS; j++) {
                const int i = threadIdx.x + j * DEC_WARPS * 32, r = i / (D / 8), c = i - r * (D / 8);
                *(uint4*)(k_s + r * RS + c * 8) = kv_dequant8<BITS>(kv_fetch8<D, BITS>(rawk + r * RB, c, GSHIFT));
                *(uint4*)(v_s + r * RS + c * 8) = kv_dequant8<BITS>(kv_fetch8<D, BITS>(rawv + r * RB, c, GSHIFT));
            }
            return;
        }
#pragma unroll
        for (int j = 0; j < ITEMS; j++) {
            const int i = threadIdx.x + j * DEC_WARPS * 32, r = i / (D / 8), c = i - r * (D / 8), p = start + r;
            uint4 kr = make_uint4(0, 0, 0, 0), vr = kr;
            if (r < n) {
                if (p >= c0) continue;
                if (p == 0 || newp - p < recent) {
                    kr = *(const uint4*)(exact_row(sk16, ringk, p, c0, r0, rs, R, KVH, kh, D) + c * 8);
                    vr = *(const uint4*)(exact_row(sv16, ringv, p, c0, r0, rs, R, KVH, kh, D) + c * 8);
                } else {
                    kr = kv_dequant8<BITS>(kv_fetch8<D, BITS>(rawk + r * RB, c, GSHIFT));
                    vr = kv_dequant8<BITS>(kv_fetch8<D, BITS>(rawv + r * RB, c, GSHIFT));
                }
            }
            *(uint4*)(k_s + r * RS + c * 8) = kr;
            *(uint4*)(v_s + r * RS + c * 8) = vr;
        }
    };
    // the first chunk staged (fp16) or its copy issued (RotateKV) before the wait for this
    // step's q, k, v: overlapping the qkv product
    int entry = 0;
    if constexpr (ROT) {
        set_rows(first, table_entry(first));
        entry = table_entry(first + DECODE_CHUNK);
        __syncthreads();
        copy_raw(first, min(end, first + DECODE_CHUNK) - first);
    } else {
        stage_cached(first, min(end, first + DECODE_CHUNK) - first);
    }
    pdl_wait();

    load_q<D>(q, sq, b, kh, G, pos, inv_freq, rope_q, neox, scale, q_s, threadIdx.x, blockDim.x);
    const u16* nk = sk16 + ((size_t)b * KVH + kh) * D;  // RotateKV: the new row in the scratch
    const u16* nv = sv16 + ((size_t)b * KVH + kh) * D;
    if constexpr (ROT) {
        if (sp == 0) {  // split 0 gives the new row to the ring: over position newp - R, which no query reads any more
            const size_t dst = (((size_t)rs * (R + 1) + (newp == 0 ? R : newp % R)) * KVH + kh) * D;
            for (int i = threadIdx.x; i < D; i += blockDim.x) {
                ringk[dst + i] = nk[i];
                ringv[dst + i] = nv[i];
            }
        }
        q_to_cache_basis<D>(q_s, G, kscale, kh);
    } else {  // fp16: the new row from the inputs, stored by split 0
        for (int i = threadIdx.x; i < D / 2; i += blockDim.x) {
            int i0, i1;
            float x0, x1;
            roped_pair(k + (size_t)b * sk + kh * D, i, D, neox, rope_k, pos, inv_freq, i0, i1, x0, x1);
            kn_s[i0] = f2h(x0);
            kn_s[i1] = f2h(x1);
        }
        for (int i = threadIdx.x; i < D; i += blockDim.x) vn_s[i] = f2h(v[(size_t)b * sv + kh * D + i]);
        __syncthreads();
        if (sp == 0) {
            const size_t row = ((size_t)slots[b] * KVH + kh) * D;
            for (int i = threadIdx.x; i < D; i += blockDim.x) {
                ((u16*)kc)[row + i] = kn_s[i];
                ((u16*)vc)[row + i] = vn_s[i];
            }
        }
    }
    // q in fp16 as the products' B operand: [MAXG][RS], rows past G zero
    __syncthreads();
    for (int i = threadIdx.x; i < MAXG * D; i += blockDim.x) {
        const int g = i / D, d = i - g * D;
        q16_s[g * RS + d] = g < G ? f2h(q_s[i]) : 0;
    }

    // Tensor cores (mma m16n8k16: fp16 values, fp32 sums), all heads of the group at once as
    // the 8 columns: warp w takes key tile kt (16 keys) of every chunk and half dh of the dims.
    // Scores S^T = K Q^T (keys x heads, over all D: both halves compute them, 8 mma), the
    // softmax online over the warp's tiles (max and sum in the log2 domain), P rounded to fp16
    // and through the warp's p_s turned from S's accumulator layout into a B operand, then its
    // share of O^T = V^T P^T (ldmatrix.trans reads V's rows as columns). Lane (gq, tq) holds
    // S^T[keys gq, gq + 8][heads 2tq, 2tq + 1], and the same of O^T's dims.
    constexpr int NT = DECODE_CHUNK / 16, MT = D / 32;  // key tiles; 16-dim tiles of a half
    static_assert(2 * NT == DEC_WARPS && D % 32 == 0, "a warp per key tile and half of the dims");
    const int kt = warp % NT, dh = warp / NT, gq = lane >> 2, tq = lane & 3;
    float acc[MT][4], mt_h[2] = {NEG_INF, NEG_INF}, lt_h[2] = {0.0f, 0.0f};
#pragma unroll
    for (int t = 0; t < MT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    // ldmatrix rows: K's keys 16 kt + (lane & 7) + 8 ((lane >> 3) & 1) at dims + 8 (lane >> 4);
    // q's heads lane & 7 at dims + 8 (lane >> 3): two k-steps of B per load; V^T's 16-dim
    // tiles: V rows 16 kt + (lane & 7) + 8 (lane >> 4) at dims + 8 ((lane >> 3) & 1)
    const u32 ka = smem_addr(k_s + (16 * kt + (lane & 7) + 8 * ((lane >> 3) & 1)) * RS + 8 * (lane >> 4));
    const u32 qa = smem_addr(q16_s + (lane & 7) * RS + 8 * (lane >> 3));
    const u32 va = smem_addr(v_s + (16 * kt + (lane & 7) + 8 * (lane >> 4)) * RS + dh * (D / 2) + 8 * ((lane >> 3) & 1));
    u16* pw = p_s + warp * (16 * MAXG);  // P^T as [16 keys][MAXG heads]

    for (int start = first; start < end; start += DECODE_CHUNK) {
        const int n = min(end, start + DECODE_CHUNK) - start;
        if constexpr (ROT) {
            asm volatile("cp.async.wait_all;" ::: "memory");
            __syncthreads();  // the chunk's copies landed, the previous chunk's tiles are read
            convert_raw(start, n);
            const int next = start + DECODE_CHUNK;
            set_rows(next, entry);
            entry = table_entry(next + DECODE_CHUNK);
            __syncthreads();  // raw_s is read, row_s holds the next chunk's rows
            if (next < end) copy_raw(next, min(end, next + DECODE_CHUNK) - next);
        } else if (start != first) {
            __syncthreads();  // the previous chunk's tiles are read
            stage_cached(start, n);
        }
        // the sequence's other rows of this step (c0..newp-1) in this chunk, once they exist:
        // RotateKV from kv_store_q's scratch and rows (the launch before), fp16 from the
        // inputs, roped here as their own rows' split 0 stores them (that store may not have run yet)
        if (c0 < newp) {
            const int lo = max(c0, start) - start, hi = min(newp, start + n) - start;
            if constexpr (ROT) {
                for (int i = lo * (D / 8) + threadIdx.x; i < hi * (D / 8); i += blockDim.x) {
                    const int r = i / (D / 8), c = i % (D / 8), p = start + r;
                    *(uint4*)(k_s + r * RS + c * 8) = *(const uint4*)(exact_row(sk16, ringk, p, c0, r0, rs, R, KVH, kh, D) + c * 8);
                    *(uint4*)(v_s + r * RS + c * 8) = *(const uint4*)(exact_row(sv16, ringv, p, c0, r0, rs, R, KVH, kh, D) + c * 8);
                }
            } else {
                for (int i = lo * (D / 2) + threadIdx.x; i < hi * (D / 2); i += blockDim.x) {
                    const int r = i / (D / 2), row = r0 + start + r - c0;
                    int i0, i1;
                    float x0, x1;
                    roped_pair(k + (size_t)row * sk + kh * D, i % (D / 2), D, neox, rope_k, positions[row], inv_freq,
                               i0, i1, x0, x1);
                    k_s[r * RS + i0] = f2h(x0);
                    k_s[r * RS + i1] = f2h(x1);
                }
                for (int i = lo * D + threadIdx.x; i < hi * D; i += blockDim.x) {
                    const int r = i / D, row = r0 + start + r - c0;
                    v_s[r * RS + i % D] = f2h(v[(size_t)row * sv + kh * D + i % D]);
                }
            }
        }
        if (newp >= start && newp < start + n) {  // the new row
            const int r = newp - start;
            if constexpr (ROT) {
                for (int c = threadIdx.x; c < D / 8; c += blockDim.x) {
                    *(uint4*)(k_s + r * RS + c * 8) = *(const uint4*)(nk + c * 8);
                    *(uint4*)(v_s + r * RS + c * 8) = *(const uint4*)(nv + c * 8);
                }
            } else {
                for (int i = threadIdx.x; i < D; i += blockDim.x) {
                    k_s[r * RS + i] = kn_s[i];
                    v_s[r * RS + i] = vn_s[i];
                }
            }
        }
        __syncthreads();
        if (16 * kt >= n) continue;  // warp-uniform; else key 16 kt is visible, so the maxima are finite
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int c = 0; c < D / 32; c++) {  // dims 32c..32c+31 (bytes 64c)
            u32 qb[4], a[4];
            ldsm4(qb, qa + 64 * c);
            ldsm4(a, ka + 64 * c);
            mma16816(s, a, qb[0], qb[1]);
            ldsm4(a, ka + 64 * c + 32);
            mma16816(s, a, qb[2], qb[3]);
        }
        const bool v0 = 16 * kt + gq < n, v1 = 16 * kt + gq + 8 < n;
        float p[4], alpha[2];
#pragma unroll
        for (int j = 0; j < 2; j++) {  // head 2tq + j: s[j] (key gq), s[2 + j] (key gq + 8)
            float mx = fmaxf(v0 ? s[j] : NEG_INF, v1 ? s[2 + j] : NEG_INF);
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
            mx = fmaxf(mx, mt_h[j]);
            alpha[j] = exp2f(mt_h[j] - mx);  // 0 on the warp's first tile
            mt_h[j] = mx;
            p[j] = v0 ? exp2f(s[j] - mx) : 0.0f;
            p[2 + j] = v1 ? exp2f(s[2 + j] - mx) : 0.0f;
        }
        // the sums of the fp16 weights the product takes
        const u32 p01 = pack_h2(p[0], p[1]), p23 = pack_h2(p[2], p[3]);
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float sum = h2f((u16)(p01 >> (16 * j))) + h2f((u16)(p23 >> (16 * j)));
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);
            lt_h[j] = lt_h[j] * alpha[j] + sum;
        }
#pragma unroll
        for (int t = 0; t < MT; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[t][e] *= alpha[e & 1];
        *(u32*)(pw + gq * MAXG + 2 * tq) = p01;
        *(u32*)(pw + (gq + 8) * MAXG + 2 * tq) = p23;
        __syncwarp();
        u32 pb[2];
        ldsm2_trans(pb, smem_addr(pw + (lane & 15) * MAXG));
#pragma unroll
        for (int t = 0; t < MT; t++) {
            u32 a[4];
            ldsm4_trans(a, va + 32 * t);
            mma16816(acc[t], a, pb[0], pb[1]);
        }
        __syncwarp();  // p_s is written again by the next chunk's tile
    }
    // the key tiles merged: each one's unnormalised output and (max, sum) per head through
    // shared memory (K and V are read by then); padded rows: the lanes' stores hit 32 banks
    __syncthreads();
    float* o_sh = (float*)k_s;    // [NT][MAXG][D + 4]
    float* ml_sh = (float*)v_s;   // [NT][MAXG][2]
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            o_sh[(kt * MAXG + 2 * tq + (e & 1)) * (D + 4) + dh * (D / 2) + 16 * t + gq + 8 * (e >> 1)] = acc[t][e];
    if (dh == 0 && gq == 0) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            ml_sh[2 * (kt * MAXG + 2 * tq + j)] = mt_h[j];
            ml_sh[2 * (kt * MAXG + 2 * tq + j) + 1] = lt_h[j];
        }
    }
    __syncthreads();
    // the outputs also go to q_s (q is in q16_s now), from where the quantized copy for the
    // next product is made
    float* po = part_o + ((size_t)(b * KVH + kh) * max_splits + sp) * (MAXG * D);
    float* pml = part_ml + ((size_t)(b * KVH + kh) * max_splits + sp) * (MAXG * 2);
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i - g * D;
        float M = NEG_INF, L = 0.0f, O = 0.0f;
#pragma unroll
        for (int t = 0; t < NT; t++) M = fmaxf(M, ml_sh[2 * (t * MAXG + g)]);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float mk = ml_sh[2 * (t * MAXG + g)];
            if (mk == NEG_INF) continue;  // a tile past the split's keys
            const float c = exp2f(mk - M);
            L += ml_sh[2 * (t * MAXG + g) + 1] * c;
            O += o_sh[(t * MAXG + g) * (D + 4) + d] * c;
        }
        if (nsplit == 1) {
            if (!ROT) {
                out[(size_t)b * H * D + kh * G * D + i] = O / L;
                if (out16) out16[(size_t)b * H * D + kh * G * D + i] = f2h(O / L);
            }
            q_s[i] = O / L;
        } else {
            po[i] = O;
            if (d == 0) { pml[2 * g] = M; pml[2 * g + 1] = L; }
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
        // the splits merged online, their loads from L2 (__ldcg: not L1's possibly stale lines)
        // unrolled so that 8 splits' loads are in flight at once: one after another (a
        // volatile load per split, waited for before the next) a step at batch 1 spent ~20 us
        // here, 43 splits of L2 round trips twice over
        const float* vo = part_o + (size_t)(b * KVH + kh) * max_splits * (MAXG * D);
        const float* vml = part_ml + (size_t)(b * KVH + kh) * max_splits * (MAXG * 2);
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
            const int g = i / D;
            float M = NEG_INF, L = 0.0f, O = 0.0f;
#pragma unroll 8
            for (int s2 = 0; s2 < nsplit; s2++) {
                const float ms = __ldcg(vml + s2 * MAXG * 2 + 2 * g), ls = __ldcg(vml + s2 * MAXG * 2 + 2 * g + 1);
                const float os = __ldcg(vo + s2 * MAXG * D + i);
                if (ms == NEG_INF) continue;  // a split past the keys (none of its tiles visible)
                const float Mn = fmaxf(M, ms), a = exp2f(M - Mn), c = exp2f(ms - Mn);
                L = L * a + ls * c;
                O = O * a + os * c;
                M = Mn;
            }
            if (!ROT) {
                out[(size_t)b * H * D + kh * G * D + i] = O / L;
                if (out16) out16[(size_t)b * H * D + kh * G * D + i] = f2h(O / L);
            }
            q_s[i] = O / L;
        }
        if (threadIdx.x == 0) counters[b * KVH + kh] = 0;
    }
    if constexpr (ROT) {  // the head group's output back from the rotated basis
        __syncthreads();
        fwht<D, false>(q_s, G, threadIdx.x, blockDim.x);
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
            q_s[i] *= hs;
            out[(size_t)b * H * D + kh * G * D + i] = q_s[i];
            if (out16) out16[(size_t)b * H * D + kh * G * D + i] = f2h(q_s[i]);
        }
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

#define DEF_PREFILL_MMA(D)                                                                                            \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)                                                      \
        attn_prefill_##D(const float* q, int sq, const int* positions, const double* inv_freq, int rope_q, int neox,  \
                         const u16* kc, const u16* vc, const int* tables, int W, const int* ctx_lens,                 \
                         const int* qstarts, const int* tiles, int H, int KVH, int bs, float scale, int window,       \
                         float* out) {                                                                                \
        attn_prefill_mma<D, 16>(q, sq, positions, inv_freq, rope_q, neox, kc, vc, tables, W, ctx_lens, qstarts, tiles, \
                                H, KVH, bs, scale, window, 0, 1.0f, nullptr, nullptr, nullptr, nullptr, nullptr,      \
                                nullptr, 0, 0, out);                                                                  \
    }
#define DEF_PREFILL_Q(D, BITS, SUFFIX)                                                                                \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)                                                      \
        attn_prefill_##SUFFIX(const float* q, int sq, const int* positions, const double* inv_freq, int rope_q,      \
                              int neox, const void* kc, const void* vc, const int* tables, int W, const int* ctx_lens, \
                              const int* qstarts, const int* tiles, int H, int KVH, int bs, float scale, int window, \
                              int group, float hs, const float* kscale, const u16* sk16, const u16* sv16,            \
                              const u16* ringk, const u16* ringv, const int* recent_slots, int recent, int R,        \
                              float* out) {                                                                           \
        attn_prefill_mma<D, BITS>(q, sq, positions, inv_freq, rope_q, neox, kc, vc, tables, W, ctx_lens, qstarts,     \
                                  tiles, H, KVH, bs, scale, window, group, hs, kscale, sk16, sv16, ringk, ringv,      \
                                  recent_slots, recent, R, out);                                                      \
    }
#define DEF_DECODE(D, BITS, SUFFIX)                                                                                   \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, DEC_BLOCKS(D))                                      \
        attn_decode_##SUFFIX(const float* q, int sq, const float* k, int sk, const float* v, int sv,                 \
                             const int* positions, const double* inv_freq, int rope_q, int rope_k, int neox, void* kc, \
                             void* vc, const int* tables, int W, const int* ctx_lens, const int* step_from,           \
                             const int* step_rows, const int* slots, int H, int KVH,                                  \
                             int bs, float scale, int window, int group, float hs, const float* kscale,  \
                             const u16* sk16, const u16* sv16, u16* ringk, u16* ringv, const int* recent_slots,      \
                             int recent, int R, float* part_o, float* part_ml, int* counters, int max_splits,        \
                             float* out, u16* out16, u8* xq, int sxq, float2* xds) {                                  \
        attn_decode<D, BITS>(q, sq, k, sk, v, sv, positions, inv_freq, rope_q, rope_k, neox, kc, vc, tables, W,      \
                             ctx_lens, step_from, step_rows, slots, H, KVH, bs, scale, window, group, hs, kscale, \
                             sk16,                                                                                    \
                             sv16, ringk,                                                                             \
                             ringv, recent_slots, recent, R, part_o, part_ml, counters, max_splits, out, out16, xq,  \
                             sxq, xds);                                                                               \
    }
#define DEF_STORE(D)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                \
        kv_store_##D(const float* k, int sk, const float* v, int sv, const int* positions, const double* inv_freq,   \
                     int rope_k, int neox, u16* kc, u16* vc, const int* slots, int KVH) {                            \
        kv_store<D>(k, sk, v, sv, positions, inv_freq, rope_k, neox, kc, vc, slots, KVH);                             \
    }
#define DEF_STORE_Q(D, BITS)                                                                                          \
    extern "C" __global__ void __launch_bounds__(STORE_Q_WARPS * 32)                                                 \
        kv_store_q##BITS##_##D(const float* k, int sk, const float* v, int sv, const int* positions,                 \
                               const double* inv_freq, int rope_k, int neox, u8* kc, u8* vc, const int* slots,       \
                               int KVH, int group, float hs, const float* kcenter, const float* kscale, u16* sk16,    \
                               u16* sv16) {                                                                           \
        kv_store_q<D, BITS>(k, sk, v, sv, positions, inv_freq, rope_k, neox, kc, vc, slots, KVH, group, hs, kcenter,  \
                            kscale, sk16, sv16);                                                                      \
    }
// f16 caches: attn_{prefill,decode}_D, kv_store_D; RotateKV: attn_{prefill,decode}_qBITS_D, kv_store_qBITS_D
#define DEF_RECENT(D)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                                \
        kv_recent_##D(const u16* sk16, const u16* sv16, u16* ringk, u16* ringv, const int* positions,               \
                      const int* qstarts, const int* ctx_lens, const int* recent_slots, int B, int KVH, int R) {     \
        kv_recent(sk16, sv16, ringk, ringv, positions, qstarts, ctx_lens, recent_slots, B, KVH, R, D);                \
    }
#define DEF_HEAD(D)                                                                                                   \
    DEF_STORE(D)                                                                                                      \
    DEF_RECENT(D)                                                                                                     \
    DEF_PREFILL_MMA(D)                                                                                                \
    DEF_DECODE(D, 16, D)                                                                                              \
    DEF_PREFILL_Q(D, 8, q8_##D) DEF_PREFILL_Q(D, 4, q4_##D) DEF_PREFILL_Q(D, 3, q3_##D) DEF_PREFILL_Q(D, 2, q2_##D)  \
    DEF_DECODE(D, 8, q8_##D) DEF_DECODE(D, 4, q4_##D) DEF_DECODE(D, 3, q3_##D) DEF_DECODE(D, 2, q2_##D)              \
    DEF_STORE_Q(D, 8) DEF_STORE_Q(D, 4) DEF_STORE_Q(D, 3) DEF_STORE_Q(D, 2)
EACH_HEAD_DIM(DEF_HEAD)
