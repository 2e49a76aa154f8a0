#include "scan_state.cuh"
namespace vlm_mamba {
template void launch_scan_state<__nv_bfloat16>(const ScanStateParams &, cudaStream_t);
}
