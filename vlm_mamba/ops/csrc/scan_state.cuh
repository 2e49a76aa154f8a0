// Mamba-1's selective scan forward from an initial state (vlm_mamba.ops.cuda_scan_state).
//
// The same algorithm as mamba_ssm's selective_scan_fwd (Gu & Dao, Mamba, Algorithm 2, in CUB's
// block scan over (decay, input) pairs), written here because that kernel starts from zero: one
// thread block per (row, channel) walks the sequence in chunks of kNThreads * kNItems tokens, and
// for each state n scans the chunk with the running prefix of the chunks before it as CUB's block
// prefix. That prefix starts at (1, h0[n]) instead of (1, 0): the initial state costs nothing in
// the loop. The last chunk's prefix is the last state. Forward only (prefill without gradients).
//
// Shapes: u, delta, z, out (b, e, l) with unit stride along l; A (e, n) fp32; B, C (b, n, l) with
// unit stride along l; D, delta_bias (e,) fp32; h0 and last (b, e, n) fp32. Numerics as mamba_ssm's
// kernel: dt = softplus(delta + bias) (identity above 20), exp2 of dt * A * log2(e), y = D u +
// sum_n C_n h_n, gated by silu(z).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cub/block/block_scan.cuh>

#include "scan_state.h"

namespace vlm_mamba {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// The bytes one thread's kNItems elements span, moved as 16-, 8- or 4-byte words.
template <int kBytes> struct VecWord { using type = uint4; };
template <> struct VecWord<8> { using type = uint2; };
template <> struct VecWord<4> { using type = uint32_t; };
template <> struct VecWord<2> { using type = uint16_t; };

// Thread t holds the chunk's elements [t * kNItems, (t + 1) * kNItems) (CUB's blocked arrangement),
// read as words when its whole span is inside the sequence and the row is aligned; 0 beyond `valid`.
template <typename T, int kNItems>
__device__ __forceinline__ void load_blocked(const T *chunk, T (&v)[kNItems], int valid, bool vec) {
  constexpr int kBytes = kNItems * sizeof(T);
  constexpr int kWord = kBytes % 16 == 0 ? 16 : (kBytes % 8 == 0 ? 8 : (kBytes % 4 == 0 ? 4 : 2));
  using W = typename VecWord<kWord>::type;
  const int base = threadIdx.x * kNItems;
  if (vec && base + kNItems <= valid) {
    const W *src = reinterpret_cast<const W *>(chunk + base);
    W *dst = reinterpret_cast<W *>(v);
#pragma unroll
    for (int j = 0; j < kBytes / kWord; ++j) dst[j] = src[j];
  } else {
#pragma unroll
    for (int i = 0; i < kNItems; ++i) v[i] = base + i < valid ? chunk[base + i] : from_float<T>(0.f);
  }
}

template <typename T, int kNItems>
__device__ __forceinline__ void store_blocked(T *chunk, const T (&v)[kNItems], int valid, bool vec) {
  constexpr int kBytes = kNItems * sizeof(T);
  constexpr int kWord = kBytes % 16 == 0 ? 16 : (kBytes % 8 == 0 ? 8 : (kBytes % 4 == 0 ? 4 : 2));
  using W = typename VecWord<kWord>::type;
  const int base = threadIdx.x * kNItems;
  if (vec && base + kNItems <= valid) {
    W *dst = reinterpret_cast<W *>(chunk + base);
    const W *src = reinterpret_cast<const W *>(v);
#pragma unroll
    for (int j = 0; j < kBytes / kWord; ++j) dst[j] = src[j];
  } else {
#pragma unroll
    for (int i = 0; i < kNItems; ++i)
      if (base + i < valid) chunk[base + i] = v[i];
  }
}

// (decay, input) pairs of h -> a h + b, composed in time order (x before y).
struct SSMScanOp {
  __device__ __forceinline__ float2 operator()(const float2 &x, const float2 &y) const {
    return make_float2(y.x * x.x, y.x * x.y + y.y);
  }
};

// CUB's block prefix: the state carried from the chunks before (first chunk: (1, h0)); the first
// warp calls it with the chunk's aggregate, lane 0's return value is used, lane 0 keeps the new one.
struct RunningPrefix {
  float2 *slot;
  __device__ __forceinline__ float2 operator()(float2 aggregate) {
    const float2 old = *slot;
    if (threadIdx.x == 0) *slot = SSMScanOp()(old, aggregate);
    return old;
  }
};

template <int kNThreads, int kNItems, typename T, bool kHasZ>
__global__ __launch_bounds__(kNThreads) void scan_state_fwd_kernel(ScanStateParams p) {
  using Scan = cub::BlockScan<float2, kNThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ float2 running[kMaxState];
  constexpr int kChunk = kNThreads * kNItems;
  constexpr float kLog2e = 1.4426950408889634f;

  const int b = blockIdx.x, e = blockIdx.y;
  const T *u = static_cast<const T *>(p.u) + b * p.u_b + e * p.u_e;
  const T *delta = static_cast<const T *>(p.delta) + b * p.d_b + e * p.d_e;
  const T *Bp = static_cast<const T *>(p.B) + b * p.B_b;
  const T *Cp = static_cast<const T *>(p.C) + b * p.C_b;
  const T *z = kHasZ ? static_cast<const T *>(p.z) + b * p.z_b + e * p.z_e : nullptr;
  T *out = static_cast<T *>(p.out) + b * p.o_b + e * p.o_e;
  const float D = p.D != nullptr ? p.D[e] : 0.f;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[e] : 0.f;

  for (int n = threadIdx.x; n < p.dstate; n += kNThreads) {
    const float h = p.h0 != nullptr ? p.h0[b * p.h_b + e * p.h_e + n * p.h_n] : 0.f;
    running[n] = make_float2(1.f, h);
  }
  __syncthreads();

  const int n_chunks = (p.seqlen + kChunk - 1) / kChunk;
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    const int off = chunk * kChunk;
    const int valid = min(kChunk, p.seqlen - off);
    T u_v[kNItems], d_v[kNItems];
    load_blocked<T, kNItems>(u + off, u_v, valid, p.vec_u);
    load_blocked<T, kNItems>(delta + off, d_v, valid, p.vec_d);
    float dt[kNItems], dtu[kNItems], y[kNItems];
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      const float uf = to_float(u_v[i]);
      float d = to_float(d_v[i]) + bias;
      if (p.softplus) d = d <= 20.f ? log1pf(expf(d)) : d;
      dt[i] = d;
      dtu[i] = d * uf;
      y[i] = D * uf;
    }
    const bool in_seq_all = threadIdx.x * kNItems + kNItems <= valid;
    for (int n = 0; n < p.dstate; ++n) {
      const float a = p.A[e * p.A_e + n * p.A_n] * kLog2e;
      T B_v[kNItems], C_v[kNItems];
      load_blocked<T, kNItems>(Bp + n * p.B_n + off, B_v, valid, p.vec_B);
      load_blocked<T, kNItems>(Cp + n * p.C_n + off, C_v, valid, p.vec_C);
      float2 h[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        h[i] = make_float2(exp2f(dt[i] * a), to_float(B_v[i]) * dtu[i]);
        if (!in_seq_all && threadIdx.x * kNItems + i >= valid) h[i] = make_float2(1.f, 0.f);  // past the end
      }
      RunningPrefix prefix{&running[n]};
      Scan(scan_storage).InclusiveScan(h, h, SSMScanOp(), prefix);
      __syncthreads();  // scan_storage is reused by the next state's scan
#pragma unroll
      for (int i = 0; i < kNItems; ++i) y[i] += h[i].y * to_float(C_v[i]);
    }
    if constexpr (kHasZ) {
      T z_v[kNItems];
      load_blocked<T, kNItems>(z + off, z_v, valid, p.vec_z);
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        const float zf = to_float(z_v[i]);
        y[i] *= zf / (1.f + expf(-zf));
      }
    }
    T o_v[kNItems];
#pragma unroll
    for (int i = 0; i < kNItems; ++i) o_v[i] = from_float<T>(y[i]);
    store_blocked<T, kNItems>(out + off, o_v, valid, p.vec_o);
  }
  __syncthreads();
  for (int n = threadIdx.x; n < p.dstate; n += kNThreads)
    p.last[b * p.l_b + e * p.l_e + n * p.l_n] = running[n].y;
}

template <int kNThreads, int kNItems, typename T>
void launch_traits(const ScanStateParams &p, cudaStream_t stream) {
  dim3 grid(p.batch, p.dim);
  if (p.z != nullptr)
    scan_state_fwd_kernel<kNThreads, kNItems, T, true><<<grid, kNThreads, 0, stream>>>(p);
  else
    scan_state_fwd_kernel<kNThreads, kNItems, T, false><<<grid, kNThreads, 0, stream>>>(p);
}

// Threads and items per thread by length, as mamba_ssm's forward picks them.
template <typename T>
void launch_scan_state(const ScanStateParams &p, cudaStream_t stream) {
  if (p.seqlen <= 128) launch_traits<32, 4, T>(p, stream);
  else if (p.seqlen <= 256) launch_traits<32, 8, T>(p, stream);
  else if (p.seqlen <= 512) launch_traits<32, 16, T>(p, stream);
  else if (p.seqlen <= 1024) launch_traits<64, 16, T>(p, stream);
  else launch_traits<128, 16, T>(p, stream);
}

}  // namespace vlm_mamba
