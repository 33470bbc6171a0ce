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

extern "C" __global__ void __launch_bounds__(256)
    dequant_rows(PLANE_ARGS, int rows, int nb, int K, const int* ids, int n_out, void* out, int so, int f16) {
    const Planes w = PLANES;
    dequant<QT>(w, rows, nb, K, ids, n_out, out, so, f16);
}
