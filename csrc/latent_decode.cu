// One decode step of absorbed MLA attention over the latent cache, flash-decoding style.
//
// Each query head attends over K = [c_kv | k_pe] (R + P dims) and reads out V = c_kv (R dims), so
// all heads of a sequence share one cache: a block loads a tile of cache entries once and uses it
// for 16 or 32 heads. The sequence is cut into `splits` chunks when B * head-groups alone would leave
// SMs idle; each (head group, chunk, sequence) block writes a partial output normalized by its own
// softmax sum plus the log-sum-exp, and combine_kernel merges the chunks.
//
// tc_decode_kernel (bf16/fp16): tensor cores through mma.sync m16n8k16, MT m-tiles of 16 heads
//   (MT = 2 once H > 16), 4 * MT warps; per tile of 32 cache entries (double-buffered, cp.async):
//   scores  S[heads][32 entries] = Q K^T: each warp takes 9 of the (R+P)/16 k-steps (its q fragments
//           stay in registers) over 32 / MT entries, and each K fragment feeds every m-tile;
//           the 4 partial sums of a score meet in shared memory
//   softmax online, in the exp2 domain, fp32; each warp adds up the partials of 4 heads and writes
//           their p (bf16) and rescale factors back to shared memory
//   output  O[heads][R] = alpha O + P V: each warp owns R / (4 * MT) output dims of every head; V
//           fragments come from the same tile via ldmatrix.trans and each feeds every m-tile
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

#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace {

constexpr int TILE = 32;         // cache entries per pipeline stage: two k-steps of the P V mma
constexpr int PAD = 8;           // elements per shared cache row: row stride = 16 bytes * odd, so the
                                 // 8 rows an ldmatrix reads fall in 8 different bank groups
constexpr int SROW = TILE + 8;   // partial-score row stride (floats): conflict-free float2 stores
constexpr int PROW = TILE + 8;   // probability row stride (elements): 80-byte rows, conflict-free ldmatrix
constexpr int SIMT_WARPS = 4;    // heads per block in the fallback kernel
constexpr int MAX_SPLITS = 256;

// The tensor-core kernel's block: MT m-tiles of 16 heads and 4 * MT warps. For the scores the warps
// form 4 k-groups x MT entry groups: warp w sums k-steps w % 4 + 4i (i < 9, so R + P <= 576) over the
// entries of group w / 4, so all warps do equal work and each score has 4 partial sums. For the
// softmax each warp owns 4 heads; for P V, R / (4 * MT) output dims of every head (R <= 512).
template <int MT>
struct TcShape {
    static constexpr int WARPS = 4 * MT, HEADS = 16 * MT, KGROUPS = 4, KSTEPS = 9;
    static constexpr int ENTRIES = TILE / MT;       // entries per entry group: 32 or 16
    static constexpr int NTILES = 512 / WARPS / 8;  // output n-tiles per warp and m-tile
};

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

// KR, KP: R and P fixed at compile time (0: read from the arguments). With DeepSeek's 512 + 64 fixed,
// every shared-memory offset and loop bound is a constant.
template <typename scalar_t, int MT, int KR, int KP>
__global__ void __launch_bounds__(TcShape<MT>::WARPS * 32, 2 / MT) tc_decode_kernel(const DecodeArgs<scalar_t, float> a) {
    using S = TcShape<MT>;
    extern __shared__ __align__(16) unsigned char smem[];
    const int R = KR ? KR : a.R, P = KR ? KP : a.P;
    const int RP = R + P, ld = RP + PAD, nks = RP / 16, dims = R / S::WARPS;
    scalar_t* kv = reinterpret_cast<scalar_t*>(smem);                  // [2][TILE][ld] cache tiles
    float* red = reinterpret_cast<float*>(kv + 2 * TILE * ld);         // [KGROUPS][HEADS][SROW] partial scores
    float* rescale = red + S::KGROUPS * S::HEADS * SROW;               // [HEADS] alpha of this tile
    float* norm = rescale + S::HEADS;                                  // [HEADS] 1 / l at the end
    scalar_t* prob = reinterpret_cast<scalar_t*>(norm + S::HEADS);     // [HEADS][PROW] p of this tile
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int kg = warp % S::KGROUPS, eg = warp / S::KGROUPS;
    const int h0 = blockIdx.x * S::HEADS, split = blockIdx.y, b = blockIdx.z;
    const int len = min(a.lengths[b], a.Tmax);
    const int begin = split * a.chunk, end = min(begin + a.chunk, len);
    const int ntiles = end > begin ? (end - begin + TILE - 1) / TILE : 0;

    // this warp's k-steps of q as mma A fragments (rows: heads g and g+8 of each m-tile; dims 2*t4, 2*t4+8)
    uint32_t qf[MT][S::KSTEPS][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < S::KSTEPS; i++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int h = h0 + mt * 16 + g + (r & 1) * 8, d = (kg + i * S::KGROUPS) * 16 + 2 * t4 + (r >> 1) * 8;
                const scalar_t* q = d < R ? a.q_latent + ((int64_t)b * a.H + h) * R + d
                                          : a.q_pe + ((int64_t)b * a.H + h) * P + d - R;
                qf[mt][i][r] = h < a.H && d < RP ? *reinterpret_cast<const uint32_t*>(q) : 0;
            }

    // Each thread copies the same 16-byte column of every step-th cache entry, tile after tile: the
    // addressing is worked out once here, not per piece (that had made the kernel issue-bound).
    const int ckv_pieces = R / 8, kpe_pieces = P / 8, tid = threadIdx.x, threads = S::WARPS * 32;
    const int ckv_step = threads / ckv_pieces, kpe_step = threads / kpe_pieces;
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
            cp_async16(dst + row * ld + R + kpe_col, kpe_src + (int64_t)(t < end ? t : 0) * a.kpe_t, t < end);
        }
    };

    // partial scores over this warp's k-steps and entry group: MT m-tiles x ENTRIES / 8 n-tiles; each
    // K fragment feeds every m-tile
    auto partial_scores = [&](const scalar_t* tile) {
        float s[MT][S::ENTRIES / 8][4] = {};
#pragma unroll
        for (int i = 0; i < S::KSTEPS; i++) {
            const int ks = kg + i * S::KGROUPS;
            if (ks < nks)
#pragma unroll
                for (int half = 0; half < S::ENTRIES / 16; half++) {
                    uint32_t kf[4];  // entries row0 + [0,8) and [8,16), dims ks*16 + [0,8) and [8,16)
                    const int row0 = eg * S::ENTRIES + half * 16;
                    ldmatrix_x4(kf, tile + (row0 + lane / 16 * 8 + lane % 8) * ld + ks * 16 + lane / 8 % 2 * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma<scalar_t>(s[mt][2 * half], qf[mt][i], kf[0], kf[1]);
                        mma<scalar_t>(s[mt][2 * half + 1], qf[mt][i], kf[2], kf[3]);
                    }
                }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < S::ENTRIES / 8; nt++)
#pragma unroll
                for (int r = 0; r < 2; r++)
                    *reinterpret_cast<float2*>(red + (kg * S::HEADS + mt * 16 + g + r * 8) * SROW + eg * S::ENTRIES +
                                               nt * 8 + 2 * t4) = make_float2(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]);
    };

    // online softmax, once per score: this lane adds up the k-groups' partials for head `own`, entries
    // e0..e0+3, masks past the end, and leaves p (bf16) and the head's rescale factor in shared memory.
    // 8 lanes share a head; entry t0 is always valid, so the tile max is finite.
    const int own = warp * 4 + lane / 8, e0 = lane % 8 * 4;
    float m = -INFINITY, l = 0.f;  // l: this lane's share, summed over the 8 lanes at the end
    auto softmax = [&](int t0) {
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int k = 0; k < S::KGROUPS; k++) {
            const float4 v = *reinterpret_cast<const float4*>(red + (k * S::HEADS + own) * SROW + e0);
            sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
        }
        float p[4] = {sum.x, sum.y, sum.z, sum.w}, mx = m;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            p[c] = t0 + e0 + c < end ? p[c] * a.scale_log2 : -INFINITY;
            mx = fmaxf(mx, p[c]);
        }
#pragma unroll
        for (int offset = 1; offset < 8; offset *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
        const float alpha = exp2f(m - mx);
        m = mx;
        l *= alpha;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            p[c] = exp2f(p[c] - mx);
            l += p[c];
        }
        *reinterpret_cast<uint2*>(prob + own * PROW + e0) =
            make_uint2(pack2<scalar_t>(p[0], p[1]), pack2<scalar_t>(p[2], p[3]));
        if (lane % 8 == 0) rescale[own] = alpha;
    };

    // O[heads][this warp's dims] = alpha O + P V; each V fragment feeds every m-tile
    float o[MT][S::NTILES][4] = {};  // per m-tile: rows g, g+8; this warp's dims j*8 + 2*t4, +1
    auto accumulate = [&](const scalar_t* tile) {
        uint32_t pf[MT][2][4];  // A fragments of p: k-step kk = entries kk*16 + [0,16)
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const float a_lo = rescale[mt * 16 + g], a_hi = rescale[mt * 16 + g + 8];
#pragma unroll
            for (int j = 0; j < S::NTILES; j++) {
                o[mt][j][0] *= a_lo, o[mt][j][1] *= a_lo;
                o[mt][j][2] *= a_hi, o[mt][j][3] *= a_hi;
            }
#pragma unroll
            for (int kk = 0; kk < 2; kk++)
                ldmatrix_x4(pf[mt][kk], prob + (mt * 16 + lane % 16) * PROW + kk * 16 + lane / 16 * 8);
        }
#pragma unroll
        for (int j = 0; j < S::NTILES; j++)
            if (j * 8 < dims) {
                uint32_t vf[4];  // lane i addresses entry i: entries [0,16) are k-step 0, [16,32) k-step 1
                ldmatrix_x4_trans(vf, tile + lane * ld + warp * dims + j * 8);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma<scalar_t>(o[mt][j], pf[mt][0], vf[0], vf[1]);
                    mma<scalar_t>(o[mt][j], pf[mt][1], vf[2], vf[3]);
                }
            }
    };

    if (ntiles > 0) load_tile(0, begin);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        cp_async_wait<0>();
        __syncthreads();  // tile `it` has landed, and every warp is done with the previous one
        if (it + 1 < ntiles) load_tile((it + 1) % 2, begin + (it + 1) * TILE);
        cp_async_commit();
        const scalar_t* tile = kv + it % 2 * TILE * ld;
        partial_scores(tile);
        __syncthreads();
        softmax(begin + it * TILE);
        __syncthreads();
        accumulate(tile);
    }

#pragma unroll
    for (int offset = 1; offset < 8; offset *= 2) l += __shfl_xor_sync(0xffffffffu, l, offset);
    if (lane % 8 == 0) {
        norm[own] = l > 0.f ? 1.f / l : 0.f;
        if (h0 + own < a.H) write_lse(a, b, split, h0 + own, m, l);
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int row = mt * 16 + g + r * 8, h = h0 + row;
            if (h >= a.H) continue;
#pragma unroll
            for (int j = 0; j < S::NTILES; j++)
                if (j * 8 < dims) {
                    const int d = warp * dims + j * 8 + 2 * t4;
                    write_out(a, b, split, h, d, o[mt][j][2 * r] * norm[row]);
                    write_out(a, b, split, h, d + 1, o[mt][j][2 * r + 1] * norm[row]);
                }
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

template <typename scalar_t, int MT>
void use_tc(void (*&kernel)(DecodeArgs<scalar_t, float>), int& threads, int& heads_per_block, size_t& smem, int64_t R,
            int64_t P) {
    using S = TcShape<MT>;
    kernel = R == 512 && P == 64 ? tc_decode_kernel<scalar_t, MT, 512, 64> : tc_decode_kernel<scalar_t, MT, 0, 0>;
    threads = S::WARPS * 32, heads_per_block = S::HEADS;
    smem = (2 * TILE * (R + P + PAD) + S::HEADS * PROW) * sizeof(scalar_t) +
           (S::KGROUPS * S::HEADS * SROW + 2 * S::HEADS) * sizeof(float);
}

// Blocks of `kernel` per SM, asked of the driver once per (kernel, shared memory, device): decode
// runs once per generated token and layer, and these two driver calls would otherwise sit on that path.
template <typename Kernel>
int blocks_per_sm(Kernel* kernel, int threads, size_t smem) {
    static std::mutex mutex;
    static std::map<std::tuple<void*, size_t, int>, int> known;
    const std::tuple<void*, size_t, int> key{reinterpret_cast<void*>(kernel), smem, c10::cuda::current_device()};
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = known.find(key); it != known.end()) return it->second;
    if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
    return known[key] = blocks;
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
        const bool tc = P % 16 == 0 && P > 0 && R <= 512 && R + P <= 576 && aligned16(c_kv) && aligned16(k_pe) &&
                        reinterpret_cast<uintptr_t>(a.q_pe) % 4 == 0;
        // past 16 heads, 32-head blocks halve how often each cache tile is read per head
        if (tc && H > 16 && R % 64 == 0)
            use_tc<scalar_t, 2>(kernel, threads, heads_per_block, smem, R, P);
        else if (tc && R % 32 == 0)
            use_tc<scalar_t, 1>(kernel, threads, heads_per_block, smem, R, P);
    }
    TORCH_CHECK(smem <= 227 * 1024, "latent_decode: R + P is too large for shared memory");
    const int per_sm = blocks_per_sm(kernel, threads, smem);

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
