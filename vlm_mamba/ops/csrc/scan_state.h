// The launch parameters of the scan from an initial state (scan_state.cuh), shared by the kernel's
// translation units and the binding (scan_state.cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace vlm_mamba {

constexpr int kMaxState = 256;

struct ScanStateParams {
  int batch, dim, seqlen, dstate;
  bool softplus;
  const void *u, *delta, *B, *C, *z;
  const float *A, *D, *delta_bias, *h0;
  void *out;
  float *last;
  int64_t u_b, u_e, d_b, d_e, B_b, B_n, C_b, C_n, z_b, z_e, o_b, o_e;
  int64_t A_e, A_n, h_b, h_e, h_n, l_b, l_e, l_n;
  // 16-byte aligned rows and row strides: vector loads and stores (else element by element)
  bool vec_u, vec_d, vec_B, vec_C, vec_z, vec_o;
};

// Defined in scan_state_<dtype>.cu for __nv_bfloat16 and float.
template <typename T> void launch_scan_state(const ScanStateParams &p, cudaStream_t stream);

}  // namespace vlm_mamba
