// Torch-free interface of the ofmu CUDA kernels (plain pointers and sizes).
//
// Kept free of torch and CUDA headers so that ofmu_kernels.cu compiles with a bare `nvcc -c` in
// about a second and the torch glue (ofmu_cuda.cpp) compiles with the host compiler alone.
// Every launcher returns nullptr on success or the CUDA error string of the failed launch.
#pragma once

#include <cstdint>

#include "../finalize.h"

namespace ofmu {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Elements (of the accumulation dtype) of scratch space reduce3 needs for `n` buffer elements.
int64_t reduce3_workspace_elems(int64_t n);

// stats[0..2] = [<x,y>, <x,x>, <y,y>] in the accumulation dtype (double for kFloat64, else
// float); y may be null. `workspace` holds reduce3_workspace_elems(n) accumulation elements.
const char* reduce3(DType dtype, const void* x, const void* y, int64_t n, void* workspace,
                    void* stats, void* stream);

// out_a = c0*x + c1*y; out_b = c2*x + c3*y if out_b is not null. y may be null; the outputs may
// alias x or y. `coeffs` points to 4 accumulation-dtype values in device memory.
const char* combine(DType dtype, const void* x, const void* y, const void* coeffs, void* out_a,
                    void* out_b, int64_t n, void* stream);

// theta = c0*theta + c1*x + c2*y unless coeffs[3] == 0, which every thread reads from device
// memory (no host sync; theta is then not written). y may be null.
const char* update(DType dtype, void* theta, const void* x, const void* y, const void* coeffs,
                   int64_t n, void* stream);

// out[0..kFinalizeLen) = the packed step coefficients from the summed statistics (finalize.h),
// in one single-thread kernel on `stream`; float64 accumulation dtype when `float64`, else
// float32. `ok` (device bool) may be null when args.has_ok is false.
const char* finalize(bool float64, const void* gstats, const void* ustats, const void* checks,
                     int64_t n_checks, const void* ok, const FinalizeArgs& args, void* out,
                     void* stream);

}  // namespace cuda
}  // namespace ofmu
