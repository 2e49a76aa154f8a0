#include "scan_state.cuh"
namespace vlm_mamba {
template void launch_scan_state<float>(const ScanStateParams &, cudaStream_t);
}
