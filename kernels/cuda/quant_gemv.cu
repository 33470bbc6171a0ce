// --- GEMV ----------------------------------------------------------------------------------
// The float GEMV (MODE and the walk over the weights: quant_gemv.cuh).
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
