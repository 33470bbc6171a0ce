// Quantized weights: the per-format block structs every quant module (quant_*.cu) is built on.
// Prepended, after common.cu, to each of them (kernels/cupy/modules.py): the GEMVs
// (quant_gemv.cu, quant_gemv_q8.cu), dequantization (quant_dequant.cu) and the tensor-core
// product (quant_mma.cu).
//
// Each GGUF block is split at load time into "planes", one per field (quants, high bits,
// scales, d/dmin), each row padded to 16 bytes (kernels/cupy/weights.py, PLANES). The bytes
// are ggml's, only regrouped: quants of consecutive blocks become contiguous and 16-byte
// aligned, so a lane reads its quants with one or two 16-byte loads whatever the block size
// (Q6_K's 210 bytes or Q8_0's 34 would otherwise allow only 2-byte loads).
//
// A format is a struct: QK values per block, UPB units per block (a unit is what one lane
// decodes from its own loads), NG groups of 8 values per unit; group() returns the 8 quants
// as exact floats, the group's scale a and min m, so the value is a * q - m. The GEMV then
// computes a * dot(q, x) - m * sum(x): the min costs one FMA per 8 values, not one per value.
// Block formats give their 8 quants as byte codes (codes(): q = code - OFF), from which
// ByteCodes::group() makes the floats and the tensor-core kernel fp16 pairs directly.
// Compiled once per format: the module source is prefixed with `#define QT <struct>`.

struct Planes {
    const u8* p[4];
    int s[4];  // row stride of each plane in bytes
};

__device__ __forceinline__ const u8* at(const Planes& w, int i, size_t row, int off) {
    return w.p[i] + row * (size_t)w.s[i] + off;
}
// S = 1 (streaming): the GEMV reads each weight byte once, so its loads skip L1 and leave it
// to the activations every warp re-reads; the dequantizer's threads share a unit's loads via
// L1 (S = 0). S = PREFETCH only asks L2 for the line and returns zeros: Q::load<PREFETCH>
// warms a unit's bytes without holding registers (the GEMV, before its input is ready).
#define PREFETCH 2
__device__ __forceinline__ void prefetch_l2(const u8* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
template <int S>
__device__ __forceinline__ uint4 ld16(const u8* p) {
    if constexpr (S == PREFETCH) {
        prefetch_l2(p);
        return make_uint4(0, 0, 0, 0);
    } else if constexpr (S) {
        uint4 v;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
        return v;
    } else {
        return *(const uint4*)p;
    }
}
template <int S>
__device__ __forceinline__ u32 ld4(const u8* p) {
    if constexpr (S == PREFETCH) {
        prefetch_l2(p);
        return 0;
    } else if constexpr (S) {
        u32 v;
        asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
        return v;
    } else {
        return *(const u32*)p;
    }
}
template <int S>
__device__ __forceinline__ float ldh(const u8* p) {
    if constexpr (S == PREFETCH) {
        prefetch_l2(p);
        return 0.0f;
    } else if constexpr (S) {
        u16 v;
        asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
        return h2f(v);
    } else {
        return h2f(*(const u16*)p);
    }
}
// Unit u's c-th 16-byte chunk in an interleaved plane: units in runs of 32, each run stored
// chunk-major ([c][unit][16]), so a warp whose lanes read 32 consecutive units loads 512
// contiguous bytes per instruction instead of every other 16 bytes of 1 KB.
template <int S, int C>
__device__ __forceinline__ uint4 ldu(const Planes& w, int i, size_t row, int u, int c) {
    return ld16<S>(w.p[i] + row * (size_t)w.s[i] + (size_t)(u >> 5) * (C * 512) + c * 512 + (u & 31) * 16);
}

// 4 bits -> bit 0 of 4 bytes (the multiply's partial products never overlap).
__device__ __forceinline__ u32 spread4(u32 x) { return (x * 0x00204081u) & 0x01010101u; }
// Bytes 0..63 minus 32 as int8: bit 7 set first, so no byte borrows from the next.
__device__ __forceinline__ u32 sub32(u32 x) { return ((x | 0x80808080u) - 0x20202020u) ^ 0x80808080u; }

// 32 activations for dp4a (gemv_q8): d * (128 h + l), h and l int8, sum = the total of 128 h + l.
struct X32 {
    int h[8], l[8];
    float d, sum;
};
// The 32 integer activations at value pos (a multiple of 32) of a row laid out by xq_chunk.
__device__ __forceinline__ X32 load_x32(const u8* __restrict__ xq, const float2* __restrict__ xds, int pos) {
    const u8* p = xq + xq_chunk(pos >> 5, 0);
    const uint4 h0 = *(const uint4*)p, h1 = *(const uint4*)(p + 512), l0 = *(const uint4*)(p + 1024),
                l1 = *(const uint4*)(p + 1536);
    const float2 d = xds[pos / 32];
    return {{(int)h0.x, (int)h0.y, (int)h0.z, (int)h0.w, (int)h1.x, (int)h1.y, (int)h1.z, (int)h1.w},
            {(int)l0.x, (int)l0.y, (int)l0.z, (int)l0.w, (int)l1.x, (int)l1.y, (int)l1.z, (int)l1.w},
            d.x, d.y};
}
// An integer dot product of 4-byte weight words with both activation planes.
struct Dot2 {
    int h = 0, l = 0;
    __device__ void add(u32 w, const X32& x, int k) {
        h = __dp4a((int)w, x.h[k], h);
        l = __dp4a((int)w, x.l[k], l);
    }
    __device__ int sum() const { return 128 * h + l; }
};

// The unit of the 32-value formats: one block, 4 groups of 8 consecutive values.
struct Unit32 {
    static constexpr int QK = 32, UPB = 1, NG = 4;
    __device__ static int xoff(int j, int g) { return 8 * g; }
    // the unit and first of the 4 groups holding block values [v, v + 32), v % 32 == 0
    __device__ static void locate32(int v, int& j, int& g0) { j = 0; g0 = 0; }
};

// Group g's 4-bit codes in a 32-value block's 16 bytes (Q4_0, Q4_1, Q5_0, Q5_1): low nibbles
// are values 0-15, high nibbles 16-31.
__device__ __forceinline__ void nibble_codes(const uint4& q, int g, u32& c0, u32& c1) {
    const int sh = (g & 2) ? 4 : 0;
    c0 = (((g & 1) ? q.z : q.x) >> sh) & 0x0F0F0F0F;
    c1 = (((g & 1) ? q.w : q.y) >> sh) & 0x0F0F0F0F;
}
// Q5_0 / Q5_1: bit v of qh is value v's fifth bit.
__device__ __forceinline__ void fifth_bits(u32 qh, int g, u32& c0, u32& c1) {
    const u32 hb = (qh >> (8 * g)) & 0xFF;
    c0 |= spread4(hb & 0xF) << 4;
    c1 |= spread4(hb >> 4) << 4;
}

// The float quants of a block format, from its codes() and OFF.
template <class D>
struct ByteCodes {
    template <class Raw>
    __device__ static void group(const Raw& r, int j, int g, float q[8], float& a, float& m) {
        u32 c0, c1;
        D::codes(r, j, g, c0, c1, a, m);
        bytes8(c0, c1, (float)D::OFF, q);
    }
};

struct TQ4_0 : ByteCodes<TQ4_0>, Unit32 {  // d f16 | qs[16]   planes: qs, d
    static constexpr int R = 4;
    static constexpr bool MIN = false;
    static constexpr int OFF = 8;  // code - OFF is the quant value
    struct Raw { uint4 q; float d; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        return {ld16<S>(at(w, 0, row, b * 16)), ldh<S>(at(w, 1, row, b * 2))};
    }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        nibble_codes(r.q, g, c0, c1);
        a = r.d; m = 0.0f;
    }
};

struct TQ4_1 : ByteCodes<TQ4_1>, Unit32 {  // d, m f16 | qs[16]   planes: qs, dm
    static constexpr int R = 4;
    static constexpr bool MIN = true;
    static constexpr int OFF = 0;  // code - OFF is the quant value
    struct Raw { uint4 q; u32 dm; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        return {ld16<S>(at(w, 0, row, b * 16)), ld4<S>(at(w, 1, row, b * 4))};
    }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        nibble_codes(r.q, g, c0, c1);
        a = h2f(r.dm & 0xFFFF); m = -h2f(r.dm >> 16);
    }
};

struct TQ5_0 : ByteCodes<TQ5_0>, Unit32 {  // d f16 | qh u32 | qs[16]   planes: qs, qh, d
    static constexpr int R = 4;
    static constexpr int RQ = 4;  // rows per warp in gemv_q8
    static constexpr bool MIN = false;
    static constexpr int OFF = 16;  // code - OFF is the quant value
    struct Raw { uint4 q; u32 qh; float d; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        return {ld16<S>(at(w, 0, row, b * 16)), ld4<S>(at(w, 1, row, b * 4)), ldh<S>(at(w, 2, row, b * 2))};
    }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        nibble_codes(r.q, g, c0, c1);
        fifth_bits(r.qh, g, c0, c1);
        a = r.d; m = 0.0f;
    }
    // dp4a path (see gemv_q8): the 5-bit values unsigned, their offset 16 taken off through x's sum
    __device__ static float dot32(const Raw& r, int j, int h, const X32& x) {
        Dot2 s;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const u32 w = word4(r.q, k);
            s.add((w & 0x0F0F0F0F) | (spread4((r.qh >> (4 * k)) & 0xF) << 4), x, k);
            s.add(((w >> 4) & 0x0F0F0F0F) | (spread4((r.qh >> (16 + 4 * k)) & 0xF) << 4), x, 4 + k);
        }
        return r.d * x.d * (float)(s.sum() - 16 * (int)x.sum);
    }
};

struct TQ5_1 : ByteCodes<TQ5_1>, Unit32 {  // d, m f16 | qh u32 | qs[16]   planes: qs, qh, dm
    static constexpr int R = 4;
    static constexpr bool MIN = true;
    static constexpr int OFF = 0;  // code - OFF is the quant value
    struct Raw { uint4 q; u32 qh; u32 dm; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        return {ld16<S>(at(w, 0, row, b * 16)), ld4<S>(at(w, 1, row, b * 4)), ld4<S>(at(w, 2, row, b * 4))};
    }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        nibble_codes(r.q, g, c0, c1);
        fifth_bits(r.qh, g, c0, c1);
        a = h2f(r.dm & 0xFFFF); m = -h2f(r.dm >> 16);
    }
};

struct TQ8_0 : ByteCodes<TQ8_0>, Unit32 {  // d f16 | qs int8[32]   planes: qs, d
    static constexpr int R = 4;
    static constexpr int RQ = 4;  // rows per warp in gemv_q8
    static constexpr bool MIN = false;
    static constexpr int OFF = 128;  // code - OFF is the quant value
    struct Raw { uint4 q0, q1; float d; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        return {ldu<S, 2>(w, 0, row, b, 0), ldu<S, 2>(w, 0, row, b, 1), ldh<S>(at(w, 1, row, b * 2))};
    }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        const uint4& v = g < 2 ? r.q0 : r.q1;
        const u32 w0 = (g & 1) ? v.z : v.x, w1 = (g & 1) ? v.w : v.y;
        c0 = w0 ^ 0x80808080u;  // int8 -> biased byte
        c1 = w1 ^ 0x80808080u;
        a = r.d; m = 0.0f;
    }
    __device__ static float dot32(const Raw& r, int j, int h, const X32& x) {
        Dot2 s;
#pragma unroll
        for (int k = 0; k < 8; k++) s.add(k < 4 ? word4(r.q0, k) : word4(r.q1, k - 4), x, k);
        return r.d * x.d * (float)s.sum();
    }
};

// K-quants: 256 values per super-block.
struct TQ2_K : ByteCodes<TQ2_K> {  // scales[16] | qs[64] | d, dmin   planes: qs, scales, dm; unit = 128 values
    static constexpr int QK = 256, UPB = 2, NG = 16, R = 4;
    static constexpr bool MIN = true;
    static constexpr int OFF = 0;  // code - OFF is the quant value
    struct Raw { uint4 q0, q1, sc; u32 dm; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        const int u = b * 2 + j;
        return {ldu<S, 2>(w, 0, row, u, 0), ldu<S, 2>(w, 0, row, u, 1), ld16<S>(at(w, 1, row, b * 16)),
                ld4<S>(at(w, 2, row, b * 4))};
    }
    __device__ static int xoff(int j, int g) { return j * 128 + (g >> 2) * 32 + (g & 3) * 8; }
    __device__ static void locate32(int v, int& j, int& g0) { j = v >> 7; g0 = ((v & 127) >> 5) * 4; }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        const int s = g >> 2, lq = (g & 3) * 8;
        const uint4& v = lq < 16 ? r.q0 : r.q1;
        const u32 w0 = (lq & 8) ? v.z : v.x, w1 = (lq & 8) ? v.w : v.y;
        c0 = (w0 >> (2 * s)) & 0x03030303;
        c1 = (w1 >> (2 * s)) & 0x03030303;
        const u32 sc = byte_at4(r.sc, j * 8 + 2 * s + (lq >= 16));
        a = h2f(r.dm & 0xFFFF) * (float)(sc & 0xF);
        m = h2f(r.dm >> 16) * (float)(sc >> 4);
    }
};

struct TQ3_K : ByteCodes<TQ3_K> {  // hmask[32] | qs[64] | scales[12] | d   planes: qs, hmask, scales, d; unit = 128 values
    static constexpr int QK = 256, UPB = 2, NG = 16, R = 4;
    static constexpr bool MIN = false;
    static constexpr int OFF = 4;  // code - OFF is the quant value
    struct Raw { uint4 q0, q1, h0, h1; u32 s0, s1, s2; float d; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        const int u = b * 2 + j;
        const u8* h = at(w, 1, row, b * 32);
        const u8* s = at(w, 2, row, b * 12);
        return {ldu<S, 2>(w, 0, row, u, 0), ldu<S, 2>(w, 0, row, u, 1), ld16<S>(h), ld16<S>(h + 16), ld4<S>(s),
                ld4<S>(s + 4), ld4<S>(s + 8), ldh<S>(at(w, 3, row, b * 2))};
    }
    __device__ static int xoff(int j, int g) { return j * 128 + (g >> 2) * 32 + (g & 3) * 8; }
    __device__ static void locate32(int v, int& j, int& g0) { j = v >> 7; g0 = ((v & 127) >> 5) * 4; }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        const int s = g >> 2, lq = (g & 3) * 8, hbit = j * 4 + s;
        const uint4& v = lq < 16 ? r.q0 : r.q1;
        const uint4& h = lq < 16 ? r.h0 : r.h1;
        const u32 w0 = (lq & 8) ? v.z : v.x, w1 = (lq & 8) ? v.w : v.y;
        const u32 m0 = (lq & 8) ? h.z : h.x, m1 = (lq & 8) ? h.w : h.y;
        // q = low2 - 4 * (1 - hbit) = (low2 | hbit << 2) - 4
        c0 = ((w0 >> (2 * s)) & 0x03030303) | (((m0 >> hbit) & 0x01010101) << 2);
        c1 = ((w1 >> (2 * s)) & 0x03030303) | (((m1 >> hbit) & 0x01010101) << 2);
        const int i = j * 8 + 2 * s + (lq >= 16);
        const u32 lo = (byte_at3(r.s0, r.s1, r.s2, i & 7) >> (4 * (i >> 3))) & 0xF;
        const u32 hi = (byte_at3(r.s0, r.s1, r.s2, 8 + (i & 3)) >> (2 * (i >> 2))) & 0x3;
        a = r.d * (float)((int)(lo | (hi << 4)) - 32);
        m = 0.0f;
    }
};

// Q4_K / Q5_K 6-bit scale and min of sub-block sb (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(u32 s0, u32 s1, u32 s2, int sb, float& sc, float& mn) {
    u32 a, b;
    if (sb < 4) {
        a = byte_at3(s0, s1, s2, sb) & 63;
        b = byte_at3(s0, s1, s2, sb + 4) & 63;
    } else {
        const u32 t = byte_at3(s0, s1, s2, sb + 4);
        a = (t & 0xF) | ((byte_at3(s0, s1, s2, sb - 4) >> 6) << 4);
        b = (t >> 4) | ((byte_at3(s0, s1, s2, sb) >> 6) << 4);
    }
    sc = (float)a;
    mn = (float)b;
}

struct TQ4_K : ByteCodes<TQ4_K> {  // d, dmin | scales[12] | qs[128]   planes: qs, scales, dm; unit = 64 values
    static constexpr int QK = 256, UPB = 4, NG = 8, R = 4;
    static constexpr int RQ = 2;  // rows per warp in gemv_q8: 64 registers, 50% occupancy
    static constexpr bool MIN = true;
    static constexpr int OFF = 0;  // code - OFF is the quant value
    struct Raw { uint4 q0, q1; u32 s0, s1, s2, dm; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        const int u = b * 4 + j;
        const u8* s = at(w, 1, row, b * 12);
        return {ldu<S, 2>(w, 0, row, u, 0), ldu<S, 2>(w, 0, row, u, 1), ld4<S>(s), ld4<S>(s + 4), ld4<S>(s + 8),
                ld4<S>(at(w, 2, row, b * 4))};
    }
    __device__ static int xoff(int j, int g) { return j * 64 + (g >> 2) * 32 + (g & 3) * 8; }
    __device__ static void locate32(int v, int& j, int& g0) { j = v >> 6; g0 = ((v & 63) >> 5) * 4; }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        const int hi = g >> 2, lq = (g & 3) * 8;
        const uint4& v = lq < 16 ? r.q0 : r.q1;
        const u32 w0 = (lq & 8) ? v.z : v.x, w1 = (lq & 8) ? v.w : v.y;
        c0 = (w0 >> (4 * hi)) & 0x0F0F0F0F;
        c1 = (w1 >> (4 * hi)) & 0x0F0F0F0F;
        float sc, mn;
        scale_min_k4(r.s0, r.s1, r.s2, 2 * j + hi, sc, mn);
        a = h2f(r.dm & 0xFFFF) * sc;
        m = h2f(r.dm >> 16) * mn;
    }
    // sub-block h of unit j: nibble h of the unit's 32 bytes, scale and min 2j + h
    __device__ static float dot32(const Raw& r, int j, int h, const X32& x) {
        Dot2 s;
#pragma unroll
        for (int k = 0; k < 8; k++)
            s.add(((k < 4 ? word4(r.q0, k) : word4(r.q1, k - 4)) >> (4 * h)) & 0x0F0F0F0F, x, k);
        float sc, mn;
        scale_min_k4(r.s0, r.s1, r.s2, 2 * j + h, sc, mn);
        return x.d * (h2f(r.dm & 0xFFFF) * sc * (float)s.sum() - h2f(r.dm >> 16) * mn * x.sum);
    }
};

struct TQ5_K : ByteCodes<TQ5_K> {  // d, dmin | scales[12] | qh[32] | qs[128]   planes: qs, qh, scales, dm
    static constexpr int QK = 256, UPB = 4, NG = 8, R = 4;
    static constexpr bool MIN = true;
    static constexpr int OFF = 0;  // code - OFF is the quant value
    struct Raw { uint4 q0, q1, h0, h1; u32 s0, s1, s2, dm; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        const int u = b * 4 + j;
        const u8* h = at(w, 1, row, b * 32);
        const u8* s = at(w, 2, row, b * 12);
        return {ldu<S, 2>(w, 0, row, u, 0), ldu<S, 2>(w, 0, row, u, 1), ld16<S>(h), ld16<S>(h + 16), ld4<S>(s),
                ld4<S>(s + 4), ld4<S>(s + 8), ld4<S>(at(w, 3, row, b * 4))};
    }
    __device__ static int xoff(int j, int g) { return j * 64 + (g >> 2) * 32 + (g & 3) * 8; }
    __device__ static void locate32(int v, int& j, int& g0) { j = v >> 6; g0 = ((v & 63) >> 5) * 4; }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        const int hi = g >> 2, lq = (g & 3) * 8, hbit = 2 * j + hi;
        const uint4& v = lq < 16 ? r.q0 : r.q1;
        const uint4& h = lq < 16 ? r.h0 : r.h1;
        const u32 w0 = (lq & 8) ? v.z : v.x, w1 = (lq & 8) ? v.w : v.y;
        const u32 m0 = (lq & 8) ? h.z : h.x, m1 = (lq & 8) ? h.w : h.y;
        c0 = ((w0 >> (4 * hi)) & 0x0F0F0F0F) | (((m0 >> hbit) & 0x01010101) << 4);
        c1 = ((w1 >> (4 * hi)) & 0x0F0F0F0F) | (((m1 >> hbit) & 0x01010101) << 4);
        float sc, mn;
        scale_min_k4(r.s0, r.s1, r.s2, 2 * j + hi, sc, mn);
        a = h2f(r.dm & 0xFFFF) * sc;
        m = h2f(r.dm >> 16) * mn;
    }
};

struct TQ6_K : ByteCodes<TQ6_K> {  // ql[128] | qh[64] | scales int8[16] | d   planes: ql, qh, scales, d; unit = 64 values
    static constexpr int QK = 256, UPB = 4, NG = 8, R = 4;
    static constexpr int RQ = 2;  // rows per warp in gemv_q8: 64 registers (16 bytes spilled), 50% occupancy
    static constexpr bool MIN = false;
    static constexpr int OFF = 32;  // code - OFF is the quant value
    struct Raw { uint4 l0, l1, h0, h1; u32 s0, s1; float d; };  // s0, s1: the 8 scales of half j/2
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        const int u = b * 4 + j;
        const u8* h = at(w, 1, row, b * 64 + (j >> 1) * 32);
        const u8* sc = at(w, 2, row, b * 16 + (j >> 1) * 8);
        return {ldu<S, 2>(w, 0, row, u, 0), ldu<S, 2>(w, 0, row, u, 1), ld16<S>(h), ld16<S>(h + 16), ld4<S>(sc),
                ld4<S>(sc + 4), ldh<S>(at(w, 3, row, b * 2))};
    }
    // unit j: half n = j/2 of the block, rows s = p and p + 2 (p = j%2) of 32 values each
    __device__ static int xoff(int j, int g) {
        return (j >> 1) * 128 + ((j & 1) + 2 * (g >> 2)) * 32 + (g & 3) * 8;
    }
    __device__ static void locate32(int v, int& j, int& g0) {
        const int s = (v & 127) >> 5;
        j = (v >> 7) * 2 + (s & 1);
        g0 = (s >> 1) * 4;
    }
    __device__ static void codes(const Raw& r, int j, int g, u32& c0, u32& c1, float& a, float& m) {
        const int k = g >> 2, lq = (g & 3) * 8, s = (j & 1) + 2 * k;
        const uint4& v = lq < 16 ? r.l0 : r.l1;
        const uint4& h = lq < 16 ? r.h0 : r.h1;
        const u32 w0 = (lq & 8) ? v.z : v.x, w1 = (lq & 8) ? v.w : v.y;
        const u32 m0 = (lq & 8) ? h.z : h.x, m1 = (lq & 8) ? h.w : h.y;
        c0 = ((w0 >> (4 * k)) & 0x0F0F0F0F) | (((m0 >> (2 * s)) & 0x03030303) << 4);
        c1 = ((w1 >> (4 * k)) & 0x0F0F0F0F) | (((m1 >> (2 * s)) & 0x03030303) << 4);
        a = r.d * (float)(signed char)byte_at3(r.s0, r.s1, 0, 2 * s + (lq >= 16));
        m = 0.0f;
    }
    // sub-block h of unit j is row s = j%2 + 2h of its half; one int8 scale per 16 values
    __device__ static float dot32(const Raw& r, int j, int h, const X32& x) {
        const int s = (j & 1) + 2 * h;
        Dot2 lo, hi;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const u32 l = k < 4 ? word4(r.l0, k) : word4(r.l1, k - 4), m = k < 4 ? word4(r.h0, k) : word4(r.h1, k - 4);
            const u32 v = sub32(((l >> (4 * h)) & 0x0F0F0F0F) | (((m >> (2 * s)) & 0x03030303) << 4));
            if (k < 4) lo.add(v, x, k);
            else hi.add(v, x, k);
        }
        const int sa = (signed char)byte_at3(r.s0, r.s1, 0, 2 * s);
        const int sb = (signed char)byte_at3(r.s0, r.s1, 0, 2 * s + 1);
        return r.d * x.d * ((float)(sa * lo.sum()) + (float)(sb * hi.sum()));
    }
};

// Float formats: rows padded with zeros to 32-value "blocks" so they share the code path.
struct TF32 : Unit32 {
    static constexpr int R = 2;
    static constexpr bool MIN = false;
    struct Raw { uint4 v[8]; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        Raw r;
#pragma unroll
        for (int i = 0; i < 8; i++) r.v[i] = ldu<S, 8>(w, 0, row, b, i);
        return r;
    }
    __device__ static void group(const Raw& r, int j, int g, float q[8], float& a, float& m) {
        const uint4 u = r.v[2 * g], w = r.v[2 * g + 1];
        q[0] = __uint_as_float(u.x); q[1] = __uint_as_float(u.y); q[2] = __uint_as_float(u.z); q[3] = __uint_as_float(u.w);
        q[4] = __uint_as_float(w.x); q[5] = __uint_as_float(w.y); q[6] = __uint_as_float(w.z); q[7] = __uint_as_float(w.w);
        a = 1.0f; m = 0.0f;
    }
};

template <bool BF>
struct THalf : Unit32 {
    static constexpr int R = 4;
    static constexpr bool MIN = false;
    struct Raw { uint4 v[4]; };
    template <int S>
    __device__ static Raw load(const Planes& w, size_t row, int b, int j) {
        Raw r;
#pragma unroll
        for (int i = 0; i < 4; i++) r.v[i] = ldu<S, 4>(w, 0, row, b, i);
        return r;
    }
    __device__ static float cv(u32 w, int hi) {
        const u16 h = hi ? (u16)(w >> 16) : (u16)(w & 0xFFFF);
        return BF ? bf2f(h) : h2f(h);
    }
    __device__ static void group(const Raw& r, int j, int g, float q[8], float& a, float& m) {
        const uint4 u = r.v[g];
        q[0] = cv(u.x, 0); q[1] = cv(u.x, 1); q[2] = cv(u.y, 0); q[3] = cv(u.y, 1);
        q[4] = cv(u.z, 0); q[5] = cv(u.z, 1); q[6] = cv(u.w, 0); q[7] = cv(u.w, 1);
        a = 1.0f; m = 0.0f;
    }
};
typedef THalf<false> TF16;
typedef THalf<true> TBF16;

// Whether the format has dot32 (the others build empty gemv_q8 kernels), codes (a block format).
template <class Q, class = void>
struct HasDot { static constexpr bool v = false; };
template <class Q>
struct HasDot<Q, decltype((void)&Q::dot32)> { static constexpr bool v = true; };
template <class Q, class = void>
struct HasCodes { static constexpr bool v = false; };
template <class Q>
struct HasCodes<Q, decltype((void)&Q::codes)> { static constexpr bool v = true; };

// Every quant kernel's weight arguments: the four planes' pointers and row strides.
#define PLANE_ARGS const u8 *p0, const u8 *p1, const u8 *p2, const u8 *p3, int s0, int s1, int s2, int s3
#define PLANES {{p0, p1, p2, p3}, {s0, s1, s2, s3}}
