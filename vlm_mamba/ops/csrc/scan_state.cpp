// Python binding of the scan from an initial state (scan_state.cuh); built on first use by
// vlm_mamba.ops.cuda_scan_state with torch.utils.cpp_extension.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "scan_state.h"

namespace {

void check_seq(const at::Tensor &t, const char *name, const at::Tensor &u, int64_t rows) {
  TORCH_CHECK(t.is_cuda() && t.device() == u.device(), name, " must be on ", u.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == u.size(0) && t.size(1) == rows && t.size(2) == u.size(2),
              name, " must be (", u.size(0), ", ", rows, ", ", u.size(2), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == u.scalar_type(), name, " must have u's dtype ", u.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, name, " needs unit stride along the length");
}

void check_vec(const at::Tensor &t, const char *name, const at::Tensor &u) {
  TORCH_CHECK(t.is_cuda() && t.device() == u.device(), name, " must be on ", u.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == u.size(1) && t.scalar_type() == at::kFloat && t.stride(0) == 1,
              name, " must be a contiguous fp32 (", u.size(1), ",) tensor");
}

bool aligned(const at::Tensor &t, std::initializer_list<int64_t> strides) {
  const int64_t bytes = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t s : strides)
    if ((s * bytes) % 16) return false;
  return true;
}

}  // namespace

// u, delta, z (b,e,l); A (e,n) fp32; B, C (b,n,l); D, delta_bias (e,) fp32; h0 (b,e,n) fp32.
// Returns (out (b,e,l) laid out like delta, last state (b,e,n) fp32).
std::vector<at::Tensor> scan_state_fwd(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A,
                                       const at::Tensor &B, const at::Tensor &C,
                                       const c10::optional<at::Tensor> &D, const c10::optional<at::Tensor> &z,
                                       const c10::optional<at::Tensor> &delta_bias,
                                       const c10::optional<at::Tensor> &h0, bool softplus) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3, "u must be a (b, e, l) CUDA tensor");
  TORCH_CHECK(u.scalar_type() == at::kBFloat16 || u.scalar_type() == at::kFloat,
              "u must be bf16 or fp32, got ", u.scalar_type());
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  TORCH_CHECK(u.stride(2) == 1 || seqlen == 1, "u needs unit stride along the length");
  check_seq(delta, "delta", u, dim);
  TORCH_CHECK(A.is_cuda() && A.dim() == 2 && A.size(0) == dim && A.scalar_type() == at::kFloat,
              "A must be a fp32 (", dim, ", n) tensor");
  const int64_t dstate = A.size(1);
  TORCH_CHECK(dstate >= 1 && dstate <= vlm_mamba::kMaxState, "d_state must be 1..", vlm_mamba::kMaxState);
  check_seq(B, "B", u, dstate);
  check_seq(C, "C", u, dstate);
  if (z.has_value()) check_seq(*z, "z", u, dim);
  if (D.has_value()) check_vec(*D, "D", u);
  if (delta_bias.has_value()) check_vec(*delta_bias, "delta_bias", u);
  if (h0.has_value()) {
    TORCH_CHECK(h0->is_cuda() && h0->device() == u.device() && h0->scalar_type() == at::kFloat &&
                    h0->dim() == 3 && h0->size(0) == batch && h0->size(1) == dim && h0->size(2) == dstate,
                "initial state must be a fp32 (", batch, ", ", dim, ", ", dstate, ") tensor, got ", h0->sizes());
  }
  TORCH_CHECK(seqlen > 0, "the scan needs at least one token");
  TORCH_CHECK(batch <= 65535 * 1024 && dim <= 65535, "batch or channels beyond the grid's limits");

  c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::empty_like(delta);
  at::Tensor last = at::empty({batch, dim, dstate}, u.options().dtype(at::kFloat));

  vlm_mamba::ScanStateParams p{};
  p.batch = batch; p.dim = dim; p.seqlen = seqlen; p.dstate = dstate; p.softplus = softplus;
  p.u = u.data_ptr(); p.delta = delta.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.A = A.data_ptr<float>();
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.h0 = h0.has_value() ? h0->data_ptr<float>() : nullptr;
  p.out = out.data_ptr(); p.last = last.data_ptr<float>();
  p.u_b = u.stride(0); p.u_e = u.stride(1); p.d_b = delta.stride(0); p.d_e = delta.stride(1);
  p.B_b = B.stride(0); p.B_n = B.stride(1); p.C_b = C.stride(0); p.C_n = C.stride(1);
  p.z_b = z.has_value() ? z->stride(0) : 0; p.z_e = z.has_value() ? z->stride(1) : 0;
  p.o_b = out.stride(0); p.o_e = out.stride(1);
  p.A_e = A.stride(0); p.A_n = A.stride(1);
  if (h0.has_value()) { p.h_b = h0->stride(0); p.h_e = h0->stride(1); p.h_n = h0->stride(2); }
  p.l_b = last.stride(0); p.l_e = last.stride(1); p.l_n = last.stride(2);
  p.vec_u = aligned(u, {p.u_b, p.u_e}); p.vec_d = aligned(delta, {p.d_b, p.d_e});
  p.vec_B = aligned(B, {p.B_b, p.B_n}); p.vec_C = aligned(C, {p.C_b, p.C_n});
  p.vec_z = z.has_value() && aligned(*z, {p.z_b, p.z_e}); p.vec_o = aligned(out, {p.o_b, p.o_e});
  if (batch == 0 || dim == 0) return {out, last};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (u.scalar_type() == at::kBFloat16) vlm_mamba::launch_scan_state<__nv_bfloat16>(p, stream);
  else vlm_mamba::launch_scan_state<float>(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, last};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &scan_state_fwd, "Mamba-1 selective scan forward from an initial state");
}
