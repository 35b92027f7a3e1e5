// Python bindings for the kernels in moe.cu and latent_decode.cu. ops.py registers each function as
// the CUDA implementation of the matching mla_moe:: custom op; the signatures mirror those ops.
#include <torch/extension.h>

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& x, const at::Tensor& expert_ids,
                                                           int64_t n_experts);
at::Tensor moe_unpermute(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                          const at::Tensor& row_map, const at::Tensor& weights);
at::Tensor latent_decode(const at::Tensor& q_latent, const at::Tensor& q_pe, const at::Tensor& c_kv,
                         const at::Tensor& k_pe, const at::Tensor& lengths, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("moe_permute", &moe_permute, "x [T, D], expert_ids [T, k] -> x_sorted, offsets, row_map");
    m.def("moe_unpermute", &moe_unpermute, "y_sorted [T*k, D], row_map, weights [T, k] -> y [T, D]");
    m.def("moe_unpermute_backward", &moe_unpermute_backward, "-> grad_y_sorted, grad_weights");
    m.def("latent_decode", &latent_decode, "absorbed-MLA decode step over the latent cache");
}
