// Small pieces shared by the kernels.
#pragma once

// N elements moved as one aligned access (16 bytes when N * sizeof(T) == 16: LDG.128 / STG.128)
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
