// CPU emulation of the small part of CUDA C++ that the kernels in cuda/ use, so the real .cu
// sources compile with g++ (-std=c++20 -include emu.h) and run on the CPU in CI.
//
// A launch runs the blocks one after another; the threads of a block run as real std::threads
// sharing one std::barrier, so __syncthreads and __shared__ (static storage, one block at a time)
// behave as on the device and a missing barrier shows up as a wrong result.
// atomicAdd is a compare-and-swap loop.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#define HXN_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct float2 { float x, y; };
struct double2 { double x, y; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline dim3 block_dim;
inline dim3 grid_dim;

// One std::thread per thread of a block, reused for every block of the launch (blocks run one
// after another; a barrier closes each block so __shared__ storage is free for the next one).
// As on the device, every thread must reach each __syncthreads; none may return early before one.
template <class Body>
void launch(dim3 grid, dim3 block, Body body) {
    grid_dim = grid;
    block_dim = block;
    const unsigned nt = block.x * block.y * block.z;
    std::barrier<> bar(nt);
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (unsigned t = 0; t < nt; ++t) {
        threads.emplace_back([&, t] {
            thread_idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            block_barrier = &bar;
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        block_idx = dim3{bx, by, bz};
                        body();
                        bar.arrive_and_wait();
                    }
        });
    }
    for (auto& th : threads) th.join();
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* address, T val) {
    T old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    T desired;
    do {
        desired = old + val;
    } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
