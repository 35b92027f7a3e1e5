// One decode step of absorbed MLA attention over the latent cache, flash-decoding style.
//
// Each query head attends over K = [c_kv | k_pe] (R + P dims) and reads out V = c_kv (R dims), so
// all heads of a sequence share one cache: a block loads a tile of cache entries once and uses it
// for 16 heads. The sequence is cut into `splits` chunks when B * head-groups alone would leave
// SMs idle; each (head group, chunk, sequence) block writes a partial output normalized by its own
// softmax sum plus the log-sum-exp, and combine_kernel merges the chunks.
//
// tc_decode_kernel (bf16/fp16): tensor cores through mma.sync m16n8k16, 16 heads = the m of the mma.
//   4 warps; per tile of 32 cache entries (double-buffered through cp.async):
//   scores  S[16 heads][32 entries] = Q K^T: the (R+P)/16 k-steps are dealt round-robin to the
//           warps (each keeps its q fragments in registers); partial sums meet in shared memory
//   softmax online, in the exp2 domain, fp32; every warp redoes it for the whole tile (512 exps)
//   output  O[16][R] += P V: each warp owns R/4 output dims; P goes from the score accumulators
//           straight into A fragments (bf16), V fragments come from the same tile via ldmatrix.trans
// simt_decode_kernel (any float dtype, any shape): one warp per head walks the entries one by one.
// It serves fp32/fp64 and shapes the tensor-core kernel does not take.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace {

constexpr int TILE = 32;         // cache entries per pipeline stage: two k-steps of the P V mma
constexpr int WARPS = 4;         // tensor-core kernel
constexpr int HEADS = 16;        // heads per block in the tensor-core kernel
constexpr int MAX_KSTEPS = 9;    // q fragments per warp: (R + P) / 16 <= 36 k-steps over 4 warps
constexpr int MAX_NTILES = 16;   // output n-tiles per warp: R / 4 / 8 <= 16, so R <= 512
constexpr int PAD = 8;           // elements per shared cache row: row stride = 16 bytes * odd, so the
                                 // 8 rows an ldmatrix reads fall in 8 different bank groups
constexpr int SROW = TILE + 8;   // partial-score row stride (floats): conflict-free float2 stores
constexpr int SIMT_WARPS = 4;    // heads per block in the fallback kernel
constexpr int MAX_SPLITS = 256;

template <typename scalar_t, typename acc_t>
struct DecodeArgs {
    const scalar_t *q_latent, *q_pe;  // [B, H, R], [B, H, P], contiguous
    const scalar_t *c_kv, *k_pe;      // [B, Tmax, R], [B, Tmax, P], unit stride in the last dim
    const int* lengths;               // [B]
    int64_t ckv_b, ckv_t, kpe_b, kpe_t;
    int B, H, R, P, Tmax;
    int splits, chunk;                // chunk: cache entries per split
    acc_t scale_log2;                 // softmax scale * log2(e): scores live in the exp2 domain
    scalar_t* out;                    // [B, H, R], written directly when splits == 1
    acc_t *part_o, *part_lse;         // [B, splits, H, R], [B, splits, H] when splits > 1
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_out(const DecodeArgs<scalar_t, acc_t>& a, int b, int split, int h, int d,
                                          acc_t v) {
    if (a.splits == 1)
        a.out[((int64_t)b * a.H + h) * a.R + d] = static_cast<scalar_t>(v);
    else
        a.part_o[(((int64_t)b * a.splits + split) * a.H + h) * a.R + d] = v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_lse(const DecodeArgs<scalar_t, acc_t>& a, int b, int split, int h, acc_t m,
                                          acc_t l) {
    if (a.splits > 1) a.part_lse[((int64_t)b * a.splits + split) * a.H + h] = l > 0 ? m + log2(l) : -INFINITY;
}

// --------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // src-size 0 fills the 16 bytes with zeros: entries past the sequence end must read as 0, since
    // p = 0 times an uninitialized (possibly NaN) cache slot is still NaN
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// d[16x8] += a[16x16] b[16x8], fp32 accumulators
template <typename scalar_t>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
}

// --------------------------------------------------------------------------------------------
// kernels

template <typename scalar_t>
__global__ void __launch_bounds__(WARPS * 32, 2) tc_decode_kernel(const DecodeArgs<scalar_t, float> a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int RP = a.R + a.P, ld = RP + PAD, nks = RP / 16, dims = a.R / WARPS;
    scalar_t* kv = reinterpret_cast<scalar_t*>(smem);                 // [2][TILE][ld] cache tiles
    float* red = reinterpret_cast<float*>(kv + 2 * TILE * ld);        // [WARPS][HEADS][SROW] scores
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int h0 = blockIdx.x * HEADS, split = blockIdx.y, b = blockIdx.z;
    const int len = min(a.lengths[b], a.Tmax);
    const int begin = split * a.chunk, end = min(begin + a.chunk, len);
    const int ntiles = end > begin ? (end - begin + TILE - 1) / TILE : 0;

    // this warp's k-steps of q as mma A fragments (rows: heads g and g+8; dims 2*t4 and 2*t4+8)
    uint32_t qf[MAX_KSTEPS][4];
#pragma unroll
    for (int i = 0; i < MAX_KSTEPS; i++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int h = h0 + g + (r & 1) * 8, d = (warp + i * WARPS) * 16 + 2 * t4 + (r >> 1) * 8;
            const scalar_t* q = d < a.R ? a.q_latent + ((int64_t)b * a.H + h) * a.R + d
                                        : a.q_pe + ((int64_t)b * a.H + h) * a.P + d - a.R;
            qf[i][r] = h < a.H && d < RP ? *reinterpret_cast<const uint32_t*>(q) : 0;
        }

    // Each thread copies the same 16-byte column of every step-th cache entry, tile after tile: the
    // addressing is worked out once here, not per piece (that had made the kernel issue-bound).
    const int ckv_pieces = a.R / 8, kpe_pieces = a.P / 8, tid = threadIdx.x;
    const int ckv_step = WARPS * 32 / ckv_pieces, kpe_step = WARPS * 32 / kpe_pieces;
    const int ckv_row = tid < ckv_step * ckv_pieces ? tid / ckv_pieces : TILE, ckv_col = tid % ckv_pieces * 8;
    const int kpe_row = tid < kpe_step * kpe_pieces ? tid / kpe_pieces : TILE, kpe_col = tid % kpe_pieces * 8;
    const scalar_t* ckv_src = a.c_kv + b * a.ckv_b + ckv_col;
    const scalar_t* kpe_src = a.k_pe + b * a.kpe_b + kpe_col;
    auto load_tile = [&](int stage, int t0) {
        scalar_t* dst = kv + stage * TILE * ld;
        for (int row = ckv_row; row < TILE; row += ckv_step) {
            const int t = t0 + row;
            cp_async16(dst + row * ld + ckv_col, ckv_src + (int64_t)(t < end ? t : 0) * a.ckv_t, t < end);
        }
        for (int row = kpe_row; row < TILE; row += kpe_step) {
            const int t = t0 + row;
            cp_async16(dst + row * ld + a.R + kpe_col, kpe_src + (int64_t)(t < end ? t : 0) * a.kpe_t, t < end);
        }
    };

    float o[MAX_NTILES][4] = {};  // rows g, g+8; this warp's dims j*8 + 2*t4, +1
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    if (ntiles > 0) load_tile(0, begin);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        if (it + 1 < ntiles) load_tile((it + 1) % 2, begin + (it + 1) * TILE);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const scalar_t* tile = kv + (it % 2) * TILE * ld;

        // partial scores over this warp's k-steps; 4 n-tiles of 8 entries
        float s[4][4] = {};
#pragma unroll
        for (int i = 0; i < MAX_KSTEPS; i++) {
            const int ks = warp + i * WARPS;
            if (ks < nks)
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    uint32_t kf[4];  // entries half*16 + [0,8) and [8,16), dims ks*16 + [0,8) and [8,16)
                    ldmatrix_x4(kf, tile + (half * 16 + lane / 16 * 8 + lane % 8) * ld + ks * 16 + lane / 8 % 2 * 8);
                    mma<scalar_t>(s[2 * half], qf[i], kf[0], kf[1]);
                    mma<scalar_t>(s[2 * half + 1], qf[i], kf[2], kf[3]);
                }
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int r = 0; r < 2; r++)
                *reinterpret_cast<float2*>(red + (warp * HEADS + g + r * 8) * SROW + nt * 8 + 2 * t4) =
                    make_float2(s[nt][2 * r], s[nt][2 * r + 1]);
        __syncthreads();

        // full scores for this thread's fragment positions, masked past the end, in the exp2 domain
        const int t0 = begin + it * TILE;
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float2 sum = make_float2(0.f, 0.f);
#pragma unroll
                for (int w = 0; w < WARPS; w++) {
                    const float2 v = *reinterpret_cast<const float2*>(red + (w * HEADS + g + r * 8) * SROW + nt * 8 + 2 * t4);
                    sum.x += v.x;
                    sum.y += v.y;
                }
                const int t = t0 + nt * 8 + 2 * t4;
                s[nt][2 * r] = t < end ? sum.x * a.scale_log2 : -INFINITY;
                s[nt][2 * r + 1] = t + 1 < end ? sum.y * a.scale_log2 : -INFINITY;
            }

        // online softmax per head row; a quad of lanes holds one row pair, so reduce across it.
        // Entry t0 is always valid, so the tile max is finite.
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = m[r];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float alpha = exp2f(m[r] - mx);
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    s[nt][2 * r + c] = exp2f(s[nt][2 * r + c] - mx);
                    sum += s[nt][2 * r + c];
                }
            l[r] = l[r] * alpha + sum;  // this thread's share; the quad is summed once at the end
#pragma unroll
            for (int j = 0; j < MAX_NTILES; j++) {
                o[j][2 * r] *= alpha;
                o[j][2 * r + 1] *= alpha;
            }
        }

        // the score accumulators of n-tiles 2kk and 2kk+1 are exactly the A fragment of k-step kk
        uint32_t pf[2][4];
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            pf[kk][0] = pack2<scalar_t>(s[2 * kk][0], s[2 * kk][1]);
            pf[kk][1] = pack2<scalar_t>(s[2 * kk][2], s[2 * kk][3]);
            pf[kk][2] = pack2<scalar_t>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[kk][3] = pack2<scalar_t>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
#pragma unroll
        for (int j = 0; j < MAX_NTILES; j++)
            if (j * 8 < dims) {
                uint32_t vf[4];  // lane i addresses entry i: entries [0,16) are k-step 0, [16,32) k-step 1
                ldmatrix_x4_trans(vf, tile + lane * ld + warp * dims + j * 8);
                mma<scalar_t>(o[j], pf[0], vf[0], vf[1]);
                mma<scalar_t>(o[j], pf[1], vf[2], vf[3]);
            }
        __syncthreads();  // the next iteration overwrites this stage and the partial scores
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int h = h0 + g + r * 8;
        if (h >= a.H) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
        for (int j = 0; j < MAX_NTILES; j++)
            if (j * 8 < dims) {
                const int d = warp * dims + j * 8 + 2 * t4;
                write_out(a, b, split, h, d, o[j][2 * r] * inv);
                write_out(a, b, split, h, d + 1, o[j][2 * r + 1] * inv);
            }
        if (warp == 0 && t4 == 0) write_lse(a, b, split, h, m[r], l[r]);
    }
}

template <typename scalar_t, typename acc_t>
__global__ void simt_decode_kernel(const DecodeArgs<scalar_t, acc_t> a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int RP = a.R + a.P, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.x * SIMT_WARPS + warp, split = blockIdx.y, b = blockIdx.z;
    if (h >= a.H) return;  // no block-wide barrier below
    acc_t* q = reinterpret_cast<acc_t*>(smem) + warp * (RP + a.R);  // this head's query, then output
    acc_t* o = q + RP;
    for (int d = lane; d < RP; d += 32)
        q[d] = static_cast<acc_t>(d < a.R ? a.q_latent[((int64_t)b * a.H + h) * a.R + d]
                                          : a.q_pe[((int64_t)b * a.H + h) * a.P + d - a.R]);
    for (int d = lane; d < a.R; d += 32) o[d] = 0;
    __syncwarp();
    const int len = min(a.lengths[b], a.Tmax);
    const int begin = split * a.chunk, end = min(begin + a.chunk, len);
    acc_t m = -INFINITY, l = 0;
    for (int t = begin; t < end; t++) {
        const scalar_t* c = a.c_kv + b * a.ckv_b + t * a.ckv_t;
        const scalar_t* kp = a.k_pe + b * a.kpe_b + t * a.kpe_t;
        acc_t s = 0;
        for (int d = lane; d < a.R; d += 32) s += q[d] * static_cast<acc_t>(c[d]);
        for (int d = lane; d < a.P; d += 32) s += q[a.R + d] * static_cast<acc_t>(kp[d]);
        s = warp_sum(s) * a.scale_log2;
        const acc_t mx = m > s ? m : s, alpha = exp2(m - mx), p = exp2(s - mx);
        l = l * alpha + p;
        m = mx;
        for (int d = lane; d < a.R; d += 32) o[d] = o[d] * alpha + p * static_cast<acc_t>(c[d]);
    }
    const acc_t inv = l > 0 ? 1 / l : 0;
    for (int d = lane; d < a.R; d += 32) write_out(a, b, split, h, d, o[d] * inv);
    if (lane == 0) write_lse(a, b, split, h, m, l);
}

// out[b, h] = sum_s exp2(lse_s - max) o_s / sum_s exp2(lse_s - max); empty chunks have lse = -inf
template <typename scalar_t, typename acc_t>
__global__ void combine_kernel(const acc_t* __restrict__ part_o, const acc_t* __restrict__ part_lse, int splits,
                               int H, int R, scalar_t* __restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem[];
    acc_t* w = reinterpret_cast<acc_t*>(smem);  // [splits] weights, then 1 / their sum
    const int h = blockIdx.y, b = blockIdx.z;
    const acc_t* lse = part_lse + (int64_t)b * splits * H + h;
    if (threadIdx.x < 32) {
        acc_t mx = -INFINITY, sum = 0;
        for (int s = threadIdx.x; s < splits; s += 32) mx = mx > lse[s * H] ? mx : lse[s * H];
        for (int offset = 16; offset > 0; offset /= 2) {
            const acc_t other = __shfl_xor_sync(0xffffffffu, mx, offset);
            mx = mx > other ? mx : other;
        }
        for (int s = threadIdx.x; s < splits; s += 32) {
            w[s] = exp2(lse[s * H] - mx);
            sum += w[s];
        }
        sum = warp_sum(sum);
        if (threadIdx.x == 0) w[splits] = 1 / sum;
    }
    __syncthreads();
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= R) return;
    acc_t acc = 0;  // every split wrote its part (zeros where it held no entry), so no branch: loads overlap
    const acc_t* o = part_o + (int64_t)b * splits * H * R + (int64_t)h * R + d;
#pragma unroll 8
    for (int s = 0; s < splits; s++) acc += w[s] * o[(int64_t)s * H * R];
    out[((int64_t)b * H + h) * R + d] = static_cast<scalar_t>(acc * w[splits]);
}

template <typename scalar_t>
constexpr bool kTensorCores = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

bool aligned16(const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) * t.element_size() % 16 == 0 &&
           t.stride(1) * t.element_size() % 16 == 0;
}

template <typename scalar_t>
void decode(const at::Tensor& q_latent, const at::Tensor& q_pe, const at::Tensor& c_kv, const at::Tensor& k_pe,
            const at::Tensor& lengths, double scale, at::Tensor& out) {
    const int64_t B = q_latent.size(0), H = q_latent.size(1), R = q_latent.size(2), P = q_pe.size(2);
    const int64_t Tmax = c_kv.size(1);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    using acc_t = at::opmath_type<scalar_t>;
    DecodeArgs<scalar_t, acc_t> a{};
    a.q_latent = q_latent.data_ptr<scalar_t>();
    a.q_pe = q_pe.data_ptr<scalar_t>();
    a.c_kv = c_kv.data_ptr<scalar_t>();
    a.k_pe = k_pe.data_ptr<scalar_t>();
    a.lengths = lengths.data_ptr<int>();
    a.ckv_b = c_kv.stride(0), a.ckv_t = c_kv.stride(1), a.kpe_b = k_pe.stride(0), a.kpe_t = k_pe.stride(1);
    a.B = B, a.H = H, a.R = R, a.P = P, a.Tmax = Tmax;
    a.scale_log2 = static_cast<acc_t>(scale * M_LOG2E);
    a.out = out.data_ptr<scalar_t>();

    void (*kernel)(DecodeArgs<scalar_t, acc_t>) = simt_decode_kernel<scalar_t, acc_t>;
    int threads = SIMT_WARPS * 32, heads_per_block = SIMT_WARPS;
    size_t smem = SIMT_WARPS * (R + P + R) * sizeof(acc_t);
    if constexpr (kTensorCores<scalar_t>) {
        if (R % 32 == 0 && P % 16 == 0 && P > 0 && R / WARPS / 8 <= MAX_NTILES && (R + P) / 16 <= WARPS * MAX_KSTEPS &&
            aligned16(c_kv) && aligned16(k_pe) && reinterpret_cast<uintptr_t>(a.q_pe) % 4 == 0) {
            kernel = tc_decode_kernel<scalar_t>;
            threads = WARPS * 32, heads_per_block = HEADS;
            smem = 2 * TILE * (R + P + PAD) * sizeof(scalar_t) + WARPS * HEADS * SROW * sizeof(float);
        }
    }
    TORCH_CHECK(smem <= 227 * 1024, "latent_decode: R + P is too large for shared memory");
    if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));

    // split the sequence only as far as needed to fill one wave, keeping >= 2 tiles per split
    const int head_blocks = (H + heads_per_block - 1) / heads_per_block, tiles = (Tmax + TILE - 1) / TILE;
    const int64_t fill = std::max<int64_t>(1, (int64_t)per_sm * sms / (B * head_blocks));
    const int want = std::min<int64_t>({fill, MAX_SPLITS, std::max(1, tiles / 2)});
    a.chunk = (tiles + want - 1) / want * TILE;
    a.splits = (Tmax + a.chunk - 1) / a.chunk;

    at::Tensor part_o, part_lse;
    if (a.splits > 1) {
        part_o = at::empty({B, a.splits, H, R}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        part_lse = at::empty({B, a.splits, H}, part_o.options());
        a.part_o = part_o.data_ptr<acc_t>();
        a.part_lse = part_lse.data_ptr<acc_t>();
    }
    kernel<<<dim3(head_blocks, a.splits, B), threads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (a.splits > 1) {
        const int ct = 128;
        combine_kernel<scalar_t, acc_t><<<dim3((R + ct - 1) / ct, H, B), ct, (a.splits + 1) * sizeof(acc_t), stream>>>(
            a.part_o, a.part_lse, a.splits, H, R, a.out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
}

}  // namespace

at::Tensor latent_decode(const at::Tensor& q_latent_in, const at::Tensor& q_pe_in, const at::Tensor& c_kv_in,
                         const at::Tensor& k_pe_in, const at::Tensor& lengths, double scale) {
    const std::pair<const at::Tensor*, const char*> inputs[] = {
        {&q_latent_in, "q_latent"}, {&q_pe_in, "q_pe"}, {&c_kv_in, "c_kv"}, {&k_pe_in, "k_pe"}, {&lengths, "lengths"}};
    for (const auto& [t, name] : inputs) {
        TORCH_CHECK(t->is_cuda() && t->device() == q_latent_in.device(), name, " must be on ", q_latent_in.device());
        TORCH_CHECK(t->dim() == (t == &lengths ? 1 : 3), name, " has the wrong number of dims: ", t->sizes());
        TORCH_CHECK(t == &lengths || t->scalar_type() == q_latent_in.scalar_type(), name, " must be ",
                    q_latent_in.scalar_type(), ", got ", t->scalar_type());
    }
    const int64_t B = q_latent_in.size(0), H = q_latent_in.size(1), R = q_latent_in.size(2), P = q_pe_in.size(2);
    const int64_t Tmax = c_kv_in.size(1);
    TORCH_CHECK(q_pe_in.size(0) == B && q_pe_in.size(1) == H, "q_pe must be [B, H, P], got ", q_pe_in.sizes());
    TORCH_CHECK(c_kv_in.size(0) == B && c_kv_in.size(2) == R && Tmax >= 1, "c_kv must be [B, Tmax, R], got ",
                c_kv_in.sizes());
    TORCH_CHECK(k_pe_in.size(0) == B && k_pe_in.size(1) == Tmax && k_pe_in.size(2) == P,
                "k_pe must be [B, Tmax, P], got ", k_pe_in.sizes());
    TORCH_CHECK(lengths.scalar_type() == at::kInt && lengths.size(0) == B && lengths.is_contiguous(),
                "lengths must be a contiguous int32 [B] tensor");
    const c10::cuda::CUDAGuard guard(q_latent_in.device());
    const at::Tensor q_latent = q_latent_in.contiguous(), q_pe = q_pe_in.contiguous();
    const at::Tensor c_kv = c_kv_in.stride(2) == 1 ? c_kv_in : c_kv_in.contiguous();  // rows may be strided
    const at::Tensor k_pe = k_pe_in.stride(2) == 1 ? k_pe_in : k_pe_in.contiguous();
    at::Tensor out = at::empty_like(q_latent);
    if (out.numel() == 0) return out;

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_latent.scalar_type(), "latent_decode",
                                    [&] { decode<scalar_t>(q_latent, q_pe, c_kv, k_pe, lengths, scale, out); });
    return out;
}
