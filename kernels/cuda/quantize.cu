// --- quantization: float32 rows -> GGUF K-quant blocks ------------------------------------------
// The algorithm of kernels/quantize.py (the NumPy twin) without an importance vector, step for
// step: the same candidate scales, numpy's float32/float64 promotions, its pairwise summation
// order, round-half-even (rintf) and f16 rounding. Arithmetic goes through the _rn intrinsics so
// that no multiply-add is contracted into an FMA (the twin rounds every product). It runs once
// at load (`--requant-streamed`), so it is written for agreement, not speed: one thread per
// 256-value super-block, levels in local memory.

// QK (the super-block) and QUANTIZE_THREADS come defined before this text
// (kernels/cupy/kernel_constants.py).

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }
__device__ __forceinline__ float f16_round(float v) { return h2f(f2h(v)); }

// numpy's pairwise sum of f(off .. off+n-1) for n <= 128: eight running sums, then the rest
template <class T, class F>
__device__ __forceinline__ T psum_block(int off, int n, F f) {
    if (n < 8) {
        T r = 0;
        for (int i = 0; i < n; i++) r = add(r, f(off + i));
        return r;
    }
    T r[8];
    for (int j = 0; j < 8; j++) r[j] = f(off + j);
    int i = 8;
    for (; i < n - n % 8; i += 8)
        for (int j = 0; j < 8; j++) r[j] = add(r[j], f(off + i + j));
    T res = add(add(add(r[0], r[1]), add(r[2], r[3])), add(add(r[4], r[5]), add(r[6], r[7])));
    for (; i < n; i++) res = add(res, f(off + i));
    return res;
}

// numpy's pairwise sum of f(0 .. n-1), n <= 256 (above 128 values it halves at a multiple of 8)
template <class T, class F>
__device__ __forceinline__ T psum(int n, F f) {
    if (n <= 128) return psum_block<T>(0, n, f);
    int n2 = n / 2;
    n2 -= n2 % 8;
    return add(psum_block<T>(0, n2, f), psum_block<T>(n2, n - n2, f));
}

// make_qx_quants (the twin's _symmetric): the scale of B values x with weights x^2, levels in
// [-nmax, nmax-1], from iscale = -(nmax + 0.1 s)/max, |s| <= 9
template <int B>
__device__ float symmetric(const float* x, int nmax) {
    int imax = 0;
    for (int i = 1; i < B; i++)
        if (fabsf(x[i]) > fabsf(x[imax])) imax = i;
    const float vmax = x[imax];
    const bool live = fabsf(vmax) >= 1e-15f;
    const float safe = live ? vmax : 1.0f;
    float best = NEG_INF, scale = 0.0f;
    for (int s = -9; s <= 9; s++) {
        const float iscale = -add((float)nmax, mul(0.1f, (float)s)) / safe;
        auto lv = [&](int i) { return clampf(rintf(mul(iscale, x[i])), (float)-nmax, (float)(nmax - 1)); };
        const float sumlx = psum<float>(B, [&](int i) { return mul(mul(mul(x[i], x[i]), x[i]), lv(i)); });
        const float suml2 = psum<float>(B, [&](int i) { float l = lv(i); return mul(mul(mul(x[i], x[i]), l), l); });
        const float score = suml2 > 0 ? mul(sumlx, sumlx) / suml2 : NEG_INF;
        if (live && score > best) {
            scale = sumlx / suml2;
            best = score;
        }
    }
    return scale;
}

// make_qkx2_quants (the twin's _affine): x ~ scale*l - min, l in [0, nmax], weights w(i); the
// candidates iscale = (nmax + rmin + rdelta i)/(max - min), each refit by weighted least
// squares; error w*|d| if mad else w*d^2. -> scale, min (>= 0)
template <int B, class W>
__device__ void affine(const float* x, W w, int nmax, double rmin, double rdelta, int nstep, bool mad,
                       float& scale_out, float& min_out) {
    float vmin = x[0], vmax = x[0];
    for (int i = 1; i < B; i++) {
        vmin = fminf(vmin, x[i]);
        vmax = fmaxf(vmax, x[i]);
    }
    vmin = fminf(vmin, 0.0f);
    float span = sub(vmax, vmin);
    const bool live = span > 0;
    span = live ? span : 1.0f;
    auto err = [&](int i, float s, float m, float l) {
        const float d = sub(add(mul(s, l), m), x[i]);
        return mad ? mul(w(i), fabsf(d)) : mul(mul(w(i), d), d);
    };
    const float sum_w = psum<float>(B, [&](int i) { return w(i); });
    const float sum_x = psum<float>(B, [&](int i) { return mul(w(i), x[i]); });
    float scale = live ? span / (float)nmax : 0.0f, mn = vmin;
    {
        const float inv = (float)nmax / span;
        auto lv = [&](int i) { return clampf(rintf(mul(inv, sub(x[i], vmin))), 0.0f, (float)nmax); };
        float best = psum<float>(B, [&](int i) { return err(i, scale, mn, lv(i)); });
        for (int step = 0; step <= nstep; step++) {
            const float iscale = (float)add(add(rmin, mul(rdelta, (double)step)), (double)nmax) / span;
            auto l = [&](int i) { return clampf(rintf(mul(iscale, sub(x[i], vmin))), 0.0f, (float)nmax); };
            const float sum_l = psum<float>(B, [&](int i) { return mul(w(i), l(i)); });
            const float sum_l2 = psum<float>(B, [&](int i) { float v = l(i); return mul(mul(w(i), v), v); });
            const float sum_xl = psum<float>(B, [&](int i) { return mul(mul(w(i), l(i)), x[i]); });
            float det = sub(mul(sum_w, sum_l2), mul(sum_l, sum_l));
            const bool ok = live && det > 0;
            det = ok ? det : 1.0f;
            float s = sub(mul(sum_w, sum_xl), mul(sum_x, sum_l)) / det;
            float m = sub(mul(sum_l2, sum_x), mul(sum_l, sum_xl)) / det;
            if (m > 0) {
                s = sum_l2 > 0 ? sum_xl / sum_l2 : 0.0f;
                m = 0.0f;
            }
            const float cur = psum<float>(B, [&](int i) { return err(i, s, m, l(i)); });
            if (ok && cur < best) {
                best = cur;
                scale = s;
                mn = m;
            }
        }
    }
    scale_out = scale;
    min_out = -mn;
}

// sub-block scales >= 0 -> codes in [0, 2^bits - 1] and the f16 super-block scale as stored
template <int K>
__device__ float unsigned_scales(const float* v, int bits, float* codes) {
    const int top = (1 << bits) - 1;
    float vmax = v[0];
    for (int j = 1; j < K; j++) vmax = fmaxf(vmax, v[j]);
    const float inv = vmax > 0 ? (float)top / vmax : 0.0f;
    for (int j = 0; j < K; j++) codes[j] = clampf(rintf(mul(inv, v[j])), 0.0f, (float)top);
    return f16_round(vmax > 0 ? vmax / (float)top : 0.0f);
}

// sub-block scales of either sign -> codes in [-top, top-1] (the largest |scale| at -top) and the
// f16 super-block scale as stored
template <int K>
__device__ float signed_scales(const float* v, int top, float* codes) {
    int imax = 0;
    for (int j = 1; j < K; j++)
        if (fabsf(v[j]) > fabsf(v[imax])) imax = j;
    const float vmax = v[imax];
    const float inv = vmax != 0 ? (float)(-top) / vmax : 0.0f;
    for (int j = 0; j < K; j++) codes[j] = clampf(rintf(mul(inv, v[j])), (float)-top, (float)(top - 1));
    return f16_round(inv != 0 ? 1.0f / inv : 0.0f);
}

__device__ __forceinline__ float nan_to_num_f16(double v) { return f16_round((float)(v != v ? 0.0 : v)); }

// The twin's _refit over one super-block x[256] of K sub-blocks: levels rounded to the stored
// scales (d * codes, minus dm * mcodes where AFFINE), then d (and dm) re-solved by weighted least
// squares with the codes fixed, twice, each kept where the squared error drops. -> L (levels)
template <int K, bool AFFINE>
__device__ void refit(const float* x, const float* codes, const float* mcodes, float& d, float& dm, int lo, int hi,
                      signed char* L, signed char* Lc) {
    constexpr int SUB = QK / K;
    auto levels_err = [&](float d_, float dm_, signed char* out) {
        for (int i = 0; i < QK; i++) {
            const int j = i / SUB;
            const float step = mul(d_, codes[j]);
            const float shifted = AFFINE ? add(x[i], mul(dm_, mcodes[j])) : x[i];
            const float lv = step != 0 ? rintf(shifted / step) : 0.0f;
            out[i] = (signed char)clampf(lv, (float)lo, (float)hi);
        }
        return psum<double>(QK, [&](int i) {
            const int j = i / SUB;
            double y = mul((double)mul(d_, codes[j]), (double)out[i]);
            if (AFFINE) y = sub(y, (double)mul(dm_, mcodes[j]));
            const double e = sub(y, (double)x[i]);
            return mul(e, e);
        });
    };
    double best = levels_err(d, dm, L);
    for (int round = 0; round < 2; round++) {
        auto a = [&](int i) { return mul((double)codes[i / SUB], (double)L[i]); };
        double d_new;
        float dm_new = dm;
        if (!AFFINE) {
            d_new = psum<double>(QK, [&](int i) { return mul(a(i), (double)x[i]); }) /
                    psum<double>(QK, [&](int i) { return mul(a(i), a(i)); });
        } else {
            auto b = [&](int i) { return mcodes[i / SUB]; };
            const double saa = psum<double>(QK, [&](int i) { return mul(a(i), a(i)); });
            const double sab = psum<double>(QK, [&](int i) { return mul(a(i), (double)b(i)); });
            const float sbb = psum<float>(QK, [&](int i) { return mul(b(i), b(i)); });
            const double sax = psum<double>(QK, [&](int i) { return mul(a(i), (double)x[i]); });
            const float sbx = psum<float>(QK, [&](int i) { return mul(b(i), x[i]); });
            const double det = sub(mul(saa, (double)sbb), mul(sab, sab));
            d_new = sub(mul(sax, (double)sbb), mul(sab, (double)sbx)) / det;
            dm_new = nan_to_num_f16(sub(mul(sax, sab), mul((double)sbx, saa)) / det);
        }
        const float d_r = nan_to_num_f16(d_new);
        const double e = levels_err(d_r, dm_new, Lc);
        if (e < best) {
            best = e;
            d = d_r;
            dm = dm_new;
            for (int i = 0; i < QK; i++) L[i] = Lc[i];
        }
    }
}

// Every block size and f16 field offset is even: one aligned 16-bit store. (Two byte stores,
// low then high, came back on the H200 with the low byte 0 in every block while the high byte
// was right: from a cubin built by nvcc 13.0 here; the cause was not looked into further.)
__device__ __forceinline__ void put_f16(u8* o, float v) { *reinterpret_cast<u16*>(o) = f2h(v); }

// 2-bit values q[0..127] -> 32 bytes: byte l holds q[l], q[l+32], q[l+64], q[l+96]
__device__ __forceinline__ void crumbs(const signed char* q, u8* o) {
    for (int l = 0; l < 32; l++)
        o[l] = (u8)((q[l] & 3) | (q[l + 32] & 3) << 2 | (q[l + 64] & 3) << 4 | (q[l + 96] & 3) << 6);
}

// block_q2_K: scales[16] (scale | min << 4), qs[64], d, dmin
__device__ void q2_k(const float* x, u8* o) {
    float scale[16], mn[16], sc[16], mc[16];
    for (int j = 0; j < 16; j++)
        affine<16>(x + 16 * j, [&](int i) { return fabsf(x[16 * j + i]); }, 3, -0.5, 0.1, 15, true, scale[j], mn[j]);
    float d = unsigned_scales<16>(scale, 4, sc), m = unsigned_scales<16>(mn, 4, mc);
    signed char L[QK], Lc[QK];
    refit<16, true>(x, sc, mc, d, m, 0, 3, L, Lc);
    for (int j = 0; j < 16; j++) o[j] = (u8)((int)sc[j] | (int)mc[j] << 4);
    crumbs(L, o + 16);
    crumbs(L + 128, o + 48);
    put_f16(o + 80, d);
    put_f16(o + 82, m);
}

// block_q3_K: hmask[32], qs[64], scales[12] (6-bit codes + 32), d
__device__ void q3_k(const float* x, u8* o) {
    float scale[16], codes[16];
    for (int j = 0; j < 16; j++) scale[j] = symmetric<16>(x + 16 * j, 4);
    float d = signed_scales<16>(scale, 32, codes), unused = 0;
    signed char L[QK], Lc[QK];
    refit<16, false>(x, codes, nullptr, d, unused, -4, 3, L, Lc);
    for (int i = 0; i < QK; i++) L[i] += 4;
    for (int l = 0; l < 32; l++) {
        u8 h = 0;
        for (int j = 0; j < 8; j++) h |= (u8)(((L[32 * j + l] >> 2) & 1) << j);
        o[l] = h;
    }
    crumbs(L, o + 32);
    crumbs(L + 128, o + 64);
    u8 c[16];
    for (int j = 0; j < 16; j++) c[j] = (u8)((int)codes[j] + 32);
    for (int j = 0; j < 8; j++) o[96 + j] = (u8)((c[j] & 0xF) | (c[j + 8] & 0xF) << 4);
    for (int j = 0; j < 4; j++)
        o[104 + j] = (u8)((c[j] >> 4) | (c[j + 4] >> 4) << 2 | (c[j + 8] >> 4) << 4 | (c[j + 12] >> 4) << 6);
    put_f16(o + 108, d);
}

// block_q4_K / block_q5_K (nmax 15 / 31): d, dmin, scales[12] (6-bit scales and mins), [qh[32]], qs[128]
template <int NMAX>
__device__ void q45_k(const float* x, u8* o) {
    float scale[8], mn[8], sc[8], mc[8];
    for (int j = 0; j < 8; j++) {
        const float* s = x + 32 * j;
        const float rms = sqrtf(psum<float>(32, [&](int i) { return mul(s[i], s[i]); }) / 32.0f);
        affine<32>(s, [&](int i) { return add(rms, fabsf(s[i])); }, NMAX, NMAX == 15 ? -1.0 : -0.5, 0.1,
                   NMAX == 15 ? 20 : 15, false, scale[j], mn[j]);
    }
    float d = unsigned_scales<8>(scale, 6, sc), m = unsigned_scales<8>(mn, 6, mc);
    signed char L[QK], Lc[QK];
    refit<8, true>(x, sc, mc, d, m, 0, NMAX, L, Lc);
    put_f16(o, d);
    put_f16(o + 2, m);
    u8 a[8], b[8];
    for (int j = 0; j < 8; j++) {
        a[j] = (u8)sc[j];
        b[j] = (u8)mc[j];
    }
    for (int j = 0; j < 4; j++) {
        o[4 + j] = (u8)(a[j] | (a[j + 4] >> 4) << 6);
        o[8 + j] = (u8)(b[j] | (b[j + 4] >> 4) << 6);
        o[12 + j] = (u8)((a[j + 4] & 0xF) | (b[j + 4] & 0xF) << 4);
    }
    u8* qs = o + 16;
    if (NMAX == 31) {  // qh bit 2i from chunk i's first 32 values, 2i+1 from its second
        for (int l = 0; l < 32; l++) {
            u8 h = 0;
            for (int i = 0; i < 4; i++)
                h |= (u8)(((L[64 * i + l] >> 4) & 1) << (2 * i) | ((L[64 * i + 32 + l] >> 4) & 1) << (2 * i + 1));
            o[16 + l] = h;
        }
        qs = o + 48;
    }
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 32; l++) qs[32 * i + l] = (u8)((L[64 * i + l] & 0xF) | (L[64 * i + 32 + l] & 0xF) << 4);
}

// block_q6_K: ql[128], qh[64], scales[16] (int8), d
__device__ void q6_k(const float* x, u8* o) {
    float scale[16], codes[16];
    for (int j = 0; j < 16; j++) scale[j] = symmetric<16>(x + 16 * j, 32);
    float d = signed_scales<16>(scale, 128, codes), unused = 0;
    signed char L[QK], Lc[QK];
    refit<16, false>(x, codes, nullptr, d, unused, -32, 31, L, Lc);
    u8 q[QK];
    for (int i = 0; i < QK; i++) q[i] = (u8)(L[i] + 32);
    for (int half = 0; half < 2; half++) {
        const u8* h = q + 128 * half;
        u8* ql = o + 64 * half;
        for (int l = 0; l < 32; l++) {
            ql[l] = (u8)((h[l] & 0xF) | (h[l + 64] & 0xF) << 4);
            ql[32 + l] = (u8)((h[l + 32] & 0xF) | (h[l + 96] & 0xF) << 4);
            o[128 + 32 * half + l] =
                (u8)((h[l] >> 4) | (h[l + 32] >> 4) << 2 | (h[l + 64] >> 4) << 4 | (h[l + 96] >> 4) << 6);
        }
    }
    for (int j = 0; j < 16; j++) o[192 + j] = (u8)(signed char)(int)codes[j];
    put_f16(o + 208, d);
}

// x: n_super super-blocks of 256 float32 values, in row order; out: their blocks, back to back
#define QUANTIZE_KERNEL(NAME, FN, BYTES)                                                          \
    extern "C" __global__ void __launch_bounds__(QUANTIZE_THREADS)                                \
        NAME(const float* x, long long n_super, u8* out) {                                         \
        for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < n_super;                \
             b += (long long)gridDim.x * blockDim.x)                                                    \
            FN(x + b * QK, out + b * BYTES);                                                            \
    }

QUANTIZE_KERNEL(quantize_q2_k, q2_k, 84)
QUANTIZE_KERNEL(quantize_q3_k, q3_k, 110)
QUANTIZE_KERNEL(quantize_q4_k, q45_k<15>, 144)
QUANTIZE_KERNEL(quantize_q5_k, q45_k<31>, 176)
QUANTIZE_KERNEL(quantize_q6_k, q6_k, 210)
