// Quantized weights: small-batch GEMV straight from the quantized blocks, and dequantization
// (embedding rows, fp16 scratch for cuBLAS).
//
// Each GGUF block is split at load time into "planes", one per field (quants, high bits,
// scales, d/dmin), each row padded to 16 bytes (kernels/cupy_backend.py, PLANES). The bytes
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

// --- GEMV ----------------------------------------------------------------------------------
// out[t, row] = dot(W[row], xin[t]) (+ bias[row]) (+ res[t, row]) for t < T <= NT.
// MODE 0: xin = x. MODE 2: xin = silu(x[:, :K]) * x[:, K:] (SwiGLU fused).
// MODE 1: xin = rmsnorm(x) * nw, folded: out = rinv[t] * dot(W[row], nw * x[t]), where
// sum(x^2) comes from the x values the warp loads anyway (its lanes cover all of K), so the
// norm costs no pass, no barrier and no launch of its own.
// x rows: K % 8 == 0, 16-byte aligned (the backend pads where a format allows other lengths).
#define GEMV_WARPS 4

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

template <class Q, int NT, int MODE>
__device__ __forceinline__ void gemv(const Planes& w, int rows, int nb, int K, const float* __restrict__ x, int sx, int T,
                                     const float* __restrict__ nw, float eps, float* __restrict__ out, int so,
                                     const float* __restrict__ bias, const float* __restrict__ res, int sr,
                                     int ksplit) {
    constexpr int R = Q::R;
    float acc[R][NT], ss[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        ss[t] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][t] = 0.0f;
    }
    const int row0 = for_each_unit<Q, R>(w, rows, nb, ksplit, [&](const typename Q::Raw(&raw)[R], int b, int j) {
#pragma unroll
        for (int g = 0; g < Q::NG; g++) {
            const int pos = b * Q::QK + Q::xoff(j, g);
            float xv[NT][8], xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (NT == 1 || t < T) {
                    load_x8<MODE>(x + (size_t)t * sx, pos, K, nw, xv[t], ss[t]);
                } else {
#pragma unroll
                    for (int i = 0; i < 8; i++) xv[t][i] = 0.0f;
                }
                xs[t] = 0.0f;
                if (Q::MIN) {
#pragma unroll
                    for (int i = 0; i < 8; i++) xs[t] += xv[t][i];
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float q[8], a, m;
                Q::group(raw[r], j, g, q, a, m);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float d = 0.0f;
#pragma unroll
                    for (int i = 0; i < 8; i++) d = fmaf(q[i], xv[t][i], d);
                    acc[r][t] = fmaf(a, d, acc[r][t]);
                    if (Q::MIN) acc[r][t] = fmaf(-m, xs[t], acc[r][t]);
                }
            }
        }
    }, [] {});
    gemv_store<R, NT, MODE>(acc, ss, rows, row0, K, eps, T, out, so, bias, res, sr, ksplit);
}

// --- GEMV on integer activations with dp4a (as llama.cpp's MMVQ) ------------------------------
// The float GEMV above is bound by its activation traffic (a float per weight nibble, from L1)
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

// Whether the format has dot32 (the others build empty gemv_q8 kernels), codes (a block format).
template <class Q, class = void>
struct HasDot { static constexpr bool v = false; };
template <class Q>
struct HasDot<Q, decltype((void)&Q::dot32)> { static constexpr bool v = true; };
template <class Q, class = void>
struct HasCodes { static constexpr bool v = false; };
template <class Q>
struct HasCodes<Q, decltype((void)&Q::codes)> { static constexpr bool v = true; };

// --- dequantization ----------------------------------------------------------------------
// out[r, :K] = W[ids ? ids[r] : r] as float32 or float16. One thread per group of 8 values, so
// a warp's stores are runs of contiguous 16-byte pieces (the unit's loads repeat from L1).
template <class Q>
__device__ __forceinline__ void dequant(const Planes& w, int rows, int nb, int K, const int* __restrict__ ids, int n_out,
                                        void* out, int so, int f16) {
    const int units = nb * Q::UPB;
    const long long total = (long long)n_out * units * Q::NG;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int g = (int)(idx % Q::NG);
        const long long ru = idx / Q::NG;
        const int r = (int)(ru / units), u = (int)(ru - (long long)r * units);
        const int b = u / Q::UPB, j = u - b * Q::UPB;
        int src = ids ? ids[r] : r;
        src = min(max(src, 0), rows - 1);
        const typename Q::Raw raw = Q::template load<false>(w, (size_t)src, b, j);
        float q[8], a, m, v[8];
#pragma unroll
        for (int gg = 0; gg < Q::NG; gg++)  // a compile-time group index keeps raw in registers
            if (gg == g) Q::group(raw, j, gg, q, a, m);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = fmaf(a, q[i], -m);
        const int pos = b * Q::QK + Q::xoff(j, g);
        const size_t base = (size_t)r * so + pos;
        const bool full = pos + 8 <= K;
        if (f16) {
            u16* o = (u16*)out + base;
            if (full && (so & 7) == 0) {
                uint4 pk;
                pk.x = f2h(v[0]) | ((u32)f2h(v[1]) << 16);
                pk.y = f2h(v[2]) | ((u32)f2h(v[3]) << 16);
                pk.z = f2h(v[4]) | ((u32)f2h(v[5]) << 16);
                pk.w = f2h(v[6]) | ((u32)f2h(v[7]) << 16);
                *(uint4*)o = pk;
            } else {
                for (int i = 0; i < 8; i++)
                    if (pos + i < K) o[i] = f2h(v[i]);
            }
        } else {
            float* o = (float*)out + base;
            if (full && (so & 3) == 0) {
                *(float4*)o = make_float4(v[0], v[1], v[2], v[3]);
                *(float4*)(o + 4) = make_float4(v[4], v[5], v[6], v[7]);
            } else {
                for (int i = 0; i < 8; i++)
                    if (pos + i < K) o[i] = v[i];
            }
        }
    }
}

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
#define MMA_BM 128
#define MMA_BN 64
#define MMA_BK 128
#define MMA_BLOCKS_PER_SM 2  // 96 KB of shared memory a block
#define MMA_W_STAGE (MMA_BM * MMA_BK * 2)
#define MMA_X_STAGE (MMA_BN * MMA_BK * 2)

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
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, asynchronously; n = 0 fills zeros without reading.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int n) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
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

#define PLANE_ARGS const u8 *p0, const u8 *p1, const u8 *p2, const u8 *p3, int s0, int s1, int s2, int s3
#define PLANES {{p0, p1, p2, p3}, {s0, s1, s2, s3}}

#define DEF_GEMV(NT, MODE)                                                                                              \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                       \
        gemv_##NT##_##MODE(PLANE_ARGS, int rows, int nb, int K, const float* x, int sx, int T, const float* nw,        \
                           float eps, float* out, int so, const float* bias, const float* res, int sr, int ksplit) {   \
        const Planes w = PLANES;                                                                                        \
        gemv<QT, NT, MODE>(w, rows, nb, K, x, sx, T, nw, eps, out, so, bias, res, sr, ksplit);                         \
    }
// four tokens already balance the FMAs against the bytes: more tokens take several launches
DEF_GEMV(1, 0)
DEF_GEMV(1, 1)
DEF_GEMV(1, 2)
DEF_GEMV(4, 0)
DEF_GEMV(4, 1)
DEF_GEMV(4, 2)

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

extern "C" __global__ void __launch_bounds__(256, MMA_BLOCKS_PER_SM)
    qmma_64(PLANE_ARGS, int rows, int nb, int K, const u16* x16, int sx, int T, float* out, int so, const float* bias,
            const float* res, int sr) {
    if constexpr (HasCodes<QT>::v) {  // block formats only (QMatrix.qmma)
        const Planes w = PLANES;
        qmma<QT>(w, rows, K, x16, sx, T, out, so, bias, res, sr);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    dequant_rows(PLANE_ARGS, int rows, int nb, int K, const int* ids, int n_out, void* out, int so, int f16) {
    const Planes w = PLANES;
    dequant<QT>(w, rows, nb, K, ids, n_out, out, so, f16);
}
