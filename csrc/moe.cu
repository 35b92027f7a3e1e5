// MoE token routing on the GPU.
//
// moe_permute: a stable counting sort of the T*k (token, expert) slots by expert, then a row copy.
//   count  (one block per chunk of slots)  per-chunk expert histogram
//   scan   (one block)                     exclusive scan over (expert, chunk): each chunk's first row
//                                          for each expert, and the per-expert end offsets
//   rank   (one block per chunk)           each slot's row = its chunk's base + its rank in the chunk
//   copy   (flat over 16-byte vectors)     x_sorted[row_map[s]] = x[s / k]
// Sizes all follow from T*k, so nothing is read back to the host. The sort is stable (same rows as
// the reference), which keeps training deterministic: grouped_mm sums expert rows in a fixed order.
//
// moe_unpermute: y[t] = sum_j w[t,j] * y_sorted[row_map[t*k+j]], fp32 accumulation, 16-byte loads.
// moe_unpermute_backward: one warp per slot writes w * grad_y[t] to the slot's row and dots
// grad_y[t] with y_sorted's row for the weight gradient, in one pass over both.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace {

constexpr int CHUNK = 1024;        // slots per block in count and rank
constexpr int SORT_THREADS = 256;  // 8 warps, each ranks a contiguous eighth of the chunk
constexpr int SORT_WARPS = SORT_THREADS / 32;
constexpr int SCAN_THREADS = 1024;
constexpr int MAX_EXPERTS = 1024;  // rank keeps an [8 warps][E] table in shared memory

__global__ void count_kernel(const int64_t* __restrict__ ids, int S, int E, int* __restrict__ counts) {
    extern __shared__ int hist[];
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int begin = blockIdx.x * CHUNK, end = min(begin + CHUNK, S);
    for (int s = begin + threadIdx.x; s < end; s += blockDim.x) {
        const int64_t e = ids[s];
        CUDA_KERNEL_ASSERT(e >= 0 && e < E && "moe_permute: expert id out of range");
        atomicAdd(&hist[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e * gridDim.x + blockIdx.x] = hist[e];
}

// counts [E][nb] (expert-major) -> exclusive prefix in place: chunk b's first row for expert e
__global__ void scan_kernel(int* __restrict__ counts, int nb, int E, int S, int* __restrict__ offsets) {
    using Scan = cub::BlockScan<int, SCAN_THREADS>;
    __shared__ typename Scan::TempStorage tmp;
    const int n = E * nb, per = (n + SCAN_THREADS - 1) / SCAN_THREADS;
    const int begin = min((int)threadIdx.x * per, n), end = min(begin + per, n);
    int sum = 0;
    for (int i = begin; i < end; i++) sum += counts[i];
    int prefix;
    Scan(tmp).ExclusiveSum(sum, prefix);
    for (int i = begin; i < end; i++) {
        const int c = counts[i];
        counts[i] = prefix;
        prefix += c;
    }
    __syncthreads();  // also orders the global writes above for the reads below, within this block
    for (int e = threadIdx.x; e < E; e += blockDim.x) offsets[e] = e + 1 < E ? counts[(e + 1) * nb] : S;
}

__global__ void rank_kernel(const int64_t* __restrict__ ids, int S, int E, const int* __restrict__ base,
                            int* __restrict__ row_map) {
    extern __shared__ int cnt[];  // [SORT_WARPS][E]: per-warp counts, then each warp's next row per expert
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int* mine = cnt + warp * E;
    for (int i = threadIdx.x; i < SORT_WARPS * E; i += blockDim.x) cnt[i] = 0;
    __syncthreads();
    const int begin = blockIdx.x * CHUNK + warp * (CHUNK / SORT_WARPS);
    const int end = min(begin + CHUNK / SORT_WARPS, S);
    // lanes holding the same expert form a group; its lowest lane updates the shared counter
    for (int s0 = begin; s0 < end; s0 += 32) {
        const int s = s0 + lane, e = s < end ? (int)ids[s] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
        __syncwarp();
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int next = base[e * gridDim.x + blockIdx.x];
        for (int w = 0; w < SORT_WARPS; w++) {
            const int c = cnt[w * E + e];
            cnt[w * E + e] = next;
            next += c;
        }
    }
    __syncthreads();
    for (int s0 = begin; s0 < end; s0 += 32) {
        const int s = s0 + lane, e = s < end ? (int)ids[s] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0) row_map[s] = mine[e] + __popc(peers & ((1u << lane) - 1));
        __syncwarp();
        if (e >= 0 && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
        __syncwarp();
    }
}

// Moves bytes, so one kernel serves every dtype. Each thread issues UNROLL loads before its stores.
template <typename V>
__global__ void copy_rows_kernel(const V* __restrict__ x, const int* __restrict__ row_map, int k, int n,
                                 int vpr, V* __restrict__ out) {
    constexpr int UNROLL = 4;
    const int first = blockIdx.x * blockDim.x * UNROLL + threadIdx.x;
    V buf[UNROLL];
    int64_t dst[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        const int i = first + u * blockDim.x;
        if (i < n) {
            const int slot = i / vpr, v = i - slot * vpr;
            buf[u] = x[(int64_t)(slot / k) * vpr + v];
            dst[u] = (int64_t)row_map[slot] * vpr + v;
        }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++)
        if (first + u * blockDim.x < n) out[dst[u]] = buf[u];
}

template <typename scalar_t, int VEC>
__global__ void unpermute_kernel(const scalar_t* __restrict__ ys, const int* __restrict__ row_map,
                                 const at::opmath_type<scalar_t>* __restrict__ w, int T, int k, int D,
                                 scalar_t* __restrict__ y) {
    using acc_t = at::opmath_type<scalar_t>;
    using vec_t = Vec<scalar_t, VEC>;
    const int vpr = D / VEC, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * vpr) return;
    const int t = i / vpr, v = i - t * vpr;
    acc_t acc[VEC] = {};
#pragma unroll 4
    for (int j = 0; j < k; j++) {
        const int64_t row = row_map[t * k + j];
        const acc_t wj = w[t * k + j];
        const vec_t val = reinterpret_cast<const vec_t*>(ys + row * D)[v];
#pragma unroll
        for (int e = 0; e < VEC; e++) acc[e] += wj * static_cast<acc_t>(val.v[e]);
    }
    vec_t out;
#pragma unroll
    for (int e = 0; e < VEC; e++) out.v[e] = static_cast<scalar_t>(acc[e]);
    reinterpret_cast<vec_t*>(y + (int64_t)t * D)[v] = out;
}

template <typename scalar_t, int VEC>
__global__ void unpermute_backward_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ ys,
                                          const int* __restrict__ row_map,
                                          const at::opmath_type<scalar_t>* __restrict__ w, int S, int k, int D,
                                          scalar_t* __restrict__ gys, at::opmath_type<scalar_t>* __restrict__ gw) {
    using acc_t = at::opmath_type<scalar_t>;
    using vec_t = Vec<scalar_t, VEC>;
    const int s = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= S) return;
    const int64_t row = row_map[s];
    const acc_t ws = w[s];
    const vec_t* g_row = reinterpret_cast<const vec_t*>(gy + (int64_t)(s / k) * D);
    const vec_t* y_row = reinterpret_cast<const vec_t*>(ys + row * D);
    vec_t* out_row = reinterpret_cast<vec_t*>(gys + row * D);
    acc_t dot = 0;
    for (int v = lane; v < D / VEC; v += 32) {
        const vec_t g = g_row[v], yv = y_row[v];
        vec_t out;
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            const acc_t ge = static_cast<acc_t>(g.v[e]);
            out.v[e] = static_cast<scalar_t>(ws * ge);
            dot += ge * static_cast<acc_t>(yv.v[e]);
        }
        out_row[v] = out;
    }
    dot = warp_sum(dot);
    if (lane == 0) gw[s] = dot;
}

// launch(std::integral_constant<int, VEC>): VEC elements per access, 16 bytes' worth where rows of D
// elements can be read as 16-byte vectors from every one of these tensors, else 1
template <typename scalar_t, typename Launch>
void launch_vectorized(int64_t D, std::initializer_list<const at::Tensor*> ts, Launch&& launch) {
    bool wide = D * sizeof(scalar_t) % 16 == 0;
    for (const at::Tensor* t : ts) wide = wide && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
    if (wide)
        launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
        launch(std::integral_constant<int, 1>{});
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_routing(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
    check_cuda(y_sorted, "y_sorted", y_sorted);
    check_cuda(row_map, "row_map", y_sorted);
    check_cuda(weights, "weights", y_sorted);
    TORCH_CHECK(y_sorted.dim() == 2, "y_sorted must be [T*k, D], got ", y_sorted.sizes());
    TORCH_CHECK(weights.dim() == 2 && weights.is_floating_point(), "weights must be a float [T, k] tensor");
    TORCH_CHECK(row_map.scalar_type() == at::kInt && row_map.dim() == 1, "row_map must be int32 [T*k]");
    TORCH_CHECK(row_map.numel() == y_sorted.size(0) && weights.numel() == y_sorted.size(0),
                "row_map [T*k], weights [T, k] and y_sorted [T*k, D] disagree: ", row_map.sizes(), ", ",
                weights.sizes(), ", ", y_sorted.sizes());
    TORCH_CHECK(y_sorted.numel() < INT_MAX, "moe kernels index with int32: y_sorted is too large");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& x, const at::Tensor& expert_ids,
                                                           int64_t n_experts) {
    check_cuda(x, "x", x);
    check_cuda(expert_ids, "expert_ids", x);
    TORCH_CHECK(x.dim() == 2, "x must be [T, D], got ", x.sizes());
    TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0) && expert_ids.scalar_type() == at::kLong,
                "expert_ids must be int64 [T, k] with T = x.size(0), got ", expert_ids.scalar_type(), " ",
                expert_ids.sizes());
    TORCH_CHECK(n_experts >= 1 && n_experts <= MAX_EXPERTS, "n_experts must be in [1, ", MAX_EXPERTS, "]");
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t T = x.size(0), k = expert_ids.size(1), S64 = T * k, E = n_experts;
    const int64_t row_bytes = x.size(1) * x.element_size();
    at::Tensor x_sorted = at::empty({S64, x.size(1)}, x.options());
    at::Tensor offsets = at::empty({E}, x.options().dtype(at::kInt));
    at::Tensor row_map = at::empty({S64}, x.options().dtype(at::kInt));
    if (S64 == 0) return {x_sorted, offsets.zero_(), row_map};
    TORCH_CHECK(S64 < INT_MAX, "moe_permute indexes slots with int32: T*k is too large");
    const int S = S64, nb = (S + CHUNK - 1) / CHUNK;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor base = at::empty({E * nb}, offsets.options());
    const int64_t* ids = expert_ids.data_ptr<int64_t>();

    count_kernel<<<nb, SORT_THREADS, E * sizeof(int), stream>>>(ids, S, E, base.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_kernel<<<1, SCAN_THREADS, 0, stream>>>(base.data_ptr<int>(), nb, E, S, offsets.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rank_kernel<<<nb, SORT_THREADS, SORT_WARPS * E * sizeof(int), stream>>>(ids, S, E, base.data_ptr<int>(),
                                                                            row_map.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (row_bytes == 0) return {x_sorted, offsets, row_map};
    int width = 16;  // bytes per vector: the widest that divides the row and x's alignment
    while (row_bytes % width || reinterpret_cast<uintptr_t>(x.data_ptr()) % width) width /= 2;
    TORCH_CHECK(S64 * (row_bytes / width) < INT_MAX, "moe_permute indexes with int32: x_sorted is too large");
    const int vpr = row_bytes / width, n = S * vpr, threads = 256, blocks = (n + threads * 4 - 1) / (threads * 4);
    auto launch = [&](auto v) {
        using V = decltype(v);
        copy_rows_kernel<V><<<blocks, threads, 0, stream>>>(static_cast<const V*>(x.data_ptr()),
                                                            row_map.data_ptr<int>(), k, n, vpr,
                                                            static_cast<V*>(x_sorted.data_ptr()));
    };
    switch (width) {
        case 16: launch(uint4{}); break;
        case 8: launch(uint2{}); break;
        case 4: launch(uint32_t{}); break;
        case 2: launch(uint16_t{}); break;
        default: launch(uint8_t{}); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {x_sorted, offsets, row_map};
}

at::Tensor moe_unpermute(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
    check_routing(y_sorted, row_map, weights);
    const c10::cuda::CUDAGuard guard(y_sorted.device());
    const int T = weights.size(0), k = weights.size(1), D = y_sorted.size(1);
    at::Tensor y = at::empty({T, D}, y_sorted.options());
    if (y.numel() == 0) return y;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "moe_unpermute", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor w = weights.to(c10::CppTypeToScalarType<acc_t>::value);
        auto launch = [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const int n = T * (D / VEC), threads = 256;
            unpermute_kernel<scalar_t, VEC><<<(n + threads - 1) / threads, threads, 0, stream>>>(
                y_sorted.data_ptr<scalar_t>(), row_map.data_ptr<int>(), w.data_ptr<acc_t>(), T, k, D,
                y.data_ptr<scalar_t>());
        };
        launch_vectorized<scalar_t>(D, {&y_sorted}, launch);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return y;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                          const at::Tensor& row_map, const at::Tensor& weights) {
    check_routing(y_sorted, row_map, weights);
    check_cuda(grad_y, "grad_y", y_sorted);
    TORCH_CHECK(grad_y.scalar_type() == y_sorted.scalar_type(), "grad_y must have y_sorted's dtype");
    TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == weights.size(0) && grad_y.size(1) == y_sorted.size(1),
                "grad_y must be [T, D], got ", grad_y.sizes());
    const c10::cuda::CUDAGuard guard(y_sorted.device());
    const int S = y_sorted.size(0), k = weights.size(1), D = y_sorted.size(1);
    at::Tensor grad_y_sorted = at::empty_like(y_sorted);
    at::Tensor grad_w;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "moe_unpermute_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
        const at::Tensor w = weights.to(acc);
        grad_w = at::empty(weights.sizes(), weights.options().dtype(acc));
        if (S == 0) return;
        auto launch = [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const int threads = 256, warps = threads / 32;
            unpermute_backward_kernel<scalar_t, VEC><<<(S + warps - 1) / warps, threads, 0, stream>>>(
                grad_y.data_ptr<scalar_t>(), y_sorted.data_ptr<scalar_t>(), row_map.data_ptr<int>(),
                w.data_ptr<acc_t>(), S, k, D, grad_y_sorted.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
        };
        launch_vectorized<scalar_t>(D, {&grad_y, &y_sorted}, launch);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {grad_y_sorted, grad_w.to(weights.scalar_type())};
}
