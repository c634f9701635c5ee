// A host emulator for the CUDA kernels of csrc/cuda (attention.cu, layer_norm.cu, ffn.cu), so that their
// logic runs on a machine without a GPU (tests/test_cuda_emulated.py; built by tests/cuda_emu/emu_build.py).
//
// Every CUDA thread of a block is a fiber (its own stack, switched cooperatively on one OS thread), so
// the kernels run unchanged as C++: a thread runs until it reaches a barrier or a warp-synchronous
// instruction and waits there until the threads it synchronises with have arrived. Blocks run one after
// another. What the kernels' inline PTX does is computed here from the PTX ISA's definitions, once all
// 32 lanes of the warp have given their operands:
//  * mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the fragments assembled into A (16 x 16), B (16 x 8)
//    and C (16 x 8) by the ISA's fragment layout (lane l: group l / 4, thread-in-group l % 4), D = A B + C
//    with exact products summed in double and rounded once to float; each counted (mma_count);
//  * ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8 m .. 8 m + 7 give the row addresses of
//    matrix m; lane l receives element (l / 4, 2 (l % 4) + {0, 1}) of each, or of its transpose; its
//    shared-memory bank conflicts are counted (ldmatrix_extra_wavefronts);
//  * __shfl_xor_sync: lane l receives lane (l ^ mask)'s value;
//  * cp.async.cg.shared.global with commit_group / wait_group: copies in commit groups, performed either
//    when issued or at the latest moment the ISA allows (the wait that covers their group), chosen per
//    launch (configure): a tile read before its wait reads stale bytes in the second timing, and a
//    buffer refilled while another warp still reads it is overwritten early in the first;
//  * __syncthreads: a barrier over the block's threads that have not exited.
// What the hardware would leave undefined is reported as an error of the launch instead: lanes of one
// warp at different warp-synchronous instructions (divergence), a barrier or warp instruction that can
// never complete (deadlock), a shuffle whose mask is not the full warp, shared-memory addresses outside
// the block's dynamic shared memory or misaligned, __trap, and races on dynamic shared memory between
// warps (check_copy_race, check_read_race: an asynchronous copy and another warp's ldmatrix read of its
// bytes with no barrier between them; plain C++ accesses to shared memory are not seen). Dynamic shared
// memory starts filled with 0xff bytes (NaN as fp16/bf16/fp32), so a read of a byte no copy wrote shows
// in the results. The threads of a block are resumed either round-robin (the warps in step) or a warp at
// a time, each running as far ahead as the barriers let it, in an order drawn from a seed (run_block),
// so that a race between warps also shows as a difference between schedules. Built with
// AddressSanitizer (emu_build.build(memcheck=True)), every fiber switch is announced to it.
//
// Device code sees threadIdx / blockIdx / blockDim / gridDim, __shared__ arrays (static thread_local: one
// block runs at a time per OS thread) and extern __shared__ memory (tests/cuda_emu/emu_build.py rewrites
// the declaration into a dynamic_smem() call, and each <<<...>>> launch into launch()). The inline-PTX
// wrappers of the kernels call the functions below where FUSED_ATTN_CUDA_EMULATION is defined.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace cuda_emu {

// ---------------------------------------------------------------------------------------------
// Fibers.

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// continues on the stack `to` (System V x86-64). Weak: every translation unit that includes this header
// defines it.
extern "C" void cuda_emu_switch(void** from, void* to);
asm(R"(
.pushsection .text
.weak cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
.popsection
)");
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  // The stack's lowest address and size (the scheduler's as AddressSanitizer reports it).
  const void* stack = nullptr;
  size_t stack_size = 0;
};

enum class Op { None, Shfl, Mma, Ldmatrix, LdmatrixTrans };

struct Thread {
  Fiber fiber;
  uint3 idx{};
  int linear = 0;
  bool done = false;
  // cp.async: copies of the open group, then the committed groups not yet waited for (oldest first).
  struct Copy {
    uint32_t dst;
    const void* src;
    int bytes;
    uint64_t issued;  // the barrier epoch it was issued in
    bool performed;
  };
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> in_flight;
};

struct Warp {
  int lanes = 0;
  int arrived = 0;
  uint64_t generation = 0;
  Op op = Op::None;
  uint32_t in[kWarp][10];
  uint32_t out[kWarp][4];
};

// The race check's record of a 16-byte chunk of dynamic shared memory, in barrier epochs (the count of
// completed __syncthreads): the last asynchronous copy into it (the epoch of the wait that completed it,
// and its warp), and the warps that read it (ldmatrix) in the latest epoch that read it.
struct Chunk {
  uint64_t write_to = 0;
  int writer = -1;
  uint64_t read_epoch = ~uint64_t{0};
  uint64_t readers = 0;
};

struct Block {
  uint3 idx{};
  dim3 grid{1, 1, 1};
  dim3 dim{1, 1, 1};
  std::vector<uint8_t> smem;
  std::vector<Chunk> chunks;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  int live = 0;
  bool progress = false;
  std::string error;
};

struct Runtime {
  Block* block = nullptr;
  Thread* thread = nullptr;
  Fiber scheduler;
  std::function<void()> body;
  std::vector<char*> stacks;
};

inline thread_local Runtime rt;
inline bool copies_at_wait = false;  // cp.async timing: false = when issued, true = at the covering wait
inline uint64_t schedule_seed = 0;
inline int multiprocessors = 132;
// The emulated device's compute capability and shared memory per block (opt-in): an H100's by default.
inline int capability_major = 9, capability_minor = 0;
inline size_t shared_memory_per_block = 227 * 1024;
// Whether the current stream is being captured into a CUDA graph (c10::cuda's capture status query).
inline bool capturing = false;
// Shared-memory bank conflicts of ldmatrix: each of its four phases reads eight 16-byte rows, one
// wavefront when they fall in eight distinct groups of four 4-byte banks, one more per row sharing a group.
inline int64_t ldmatrix_phases = 0;
inline int64_t ldmatrix_extra_wavefronts = 0;
// Tensor-core products (warp instructions): the work a launch did, to compare configurations by.
inline int64_t mma_count = 0;

struct Abort {};  // unwinds a fiber whose launch has failed

// Under AddressSanitizer (the emulator's memcheck build) every switch is announced to it, so that it
// tracks which stack is current; `dying`: `from` is never resumed.
inline void switch_fiber(Fiber& from, Fiber& to, bool dying = false) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake_stack, to.stack, to.stack_size);
#else
  (void)dying;
#endif
#if defined(__x86_64__)
  cuda_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.ctx, &to.ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Back to the scheduler; returns when the scheduler resumes this thread.
inline void yield() {
  switch_fiber(rt.thread->fiber, rt.scheduler);
  if (!rt.block->error.empty()) throw Abort{};
}

inline void fail(const std::string& what) {
  Block& b = *rt.block;
  if (b.error.empty()) {
    char where[160];
    std::snprintf(where, sizeof(where), " (block %u,%u,%u thread %u)", b.idx.x, b.idx.y, b.idx.z,
                  rt.thread != nullptr ? rt.thread->linear : 0u);
    b.error = what + where;
  }
  throw Abort{};
}

inline void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &rt.scheduler.stack, &rt.scheduler.stack_size);
#endif
  Thread& t = *rt.thread;
  try {
    rt.body();
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    if (rt.block->error.empty()) rt.block->error = std::string("exception in device code: ") + e.what();
  }
  t.done = true;
  rt.block->live -= 1;
  rt.block->progress = true;
  switch_fiber(t.fiber, rt.scheduler, /*dying=*/true);
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
inline void fiber_entry() { fiber_main(); }
#endif

inline void start_fiber(Fiber& f, char* stack) {
  f.stack = stack;
  f.stack_size = kStackBytes;
#if defined(__SANITIZE_ADDRESS__)
  // A reused stack still carries the redzones of the frames of the fiber that ran on it last.
  __asan_unpoison_memory_region(stack, kStackBytes);
#endif
#if defined(__x86_64__)
  // The initial frame cuda_emu_switch pops: six callee-saved registers, then fiber_main as the return
  // address, above it a dummy return address so that fiber_main starts with the ABI's alignment.
  auto* top = reinterpret_cast<uintptr_t*>(
      (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~static_cast<uintptr_t>(15));
  top[-1] = 0;
  top[-2] = reinterpret_cast<uintptr_t>(&fiber_main);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  f.sp = top - 8;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
#endif
}

inline char* stack_for(size_t i) {
  while (rt.stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda emulator: cannot map a fiber stack");
    rt.stacks.push_back(static_cast<char*>(p));
  }
  return rt.stacks[i];
}

// ---------------------------------------------------------------------------------------------
// Built-in variables.

struct Index {
  static const uint3& thread() { return rt.thread->idx; }
  static const uint3& block() { return rt.block->idx; }
  static const dim3& block_dim() { return rt.block->dim; }
  static const dim3& grid_dim() { return rt.block->grid; }
};

inline int lane() { return rt.thread->linear % kWarp; }
inline int warp_index() { return rt.thread->linear / kWarp; }
inline Warp& warp() { return rt.block->warps[static_cast<size_t>(warp_index())]; }

// ---------------------------------------------------------------------------------------------
// Synchronisation.

inline void syncthreads() {
  Block& b = *rt.block;
  b.progress = true;
  if (++b.barrier_arrived == b.live) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
    return;
  }
  const uint64_t gen = b.barrier_generation;
  while (b.barrier_generation == gen) yield();
}

// A warp-synchronous instruction: this lane's operands in, the lane's results out once all lanes of
// the warp have given theirs and `compute` has run over the whole warp.
template <typename F>
void warp_collective(Op op, const uint32_t* in, int n_in, uint32_t* out, int n_out, const F& compute) {
  Warp& w = warp();
  const int l = lane();
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("lanes of a warp reached different warp-synchronous instructions (divergent warp)");
  }
  std::copy(in, in + n_in, w.in[l]);
  rt.block->progress = true;
  if (++w.arrived == w.lanes) {
    compute(w);
    w.arrived = 0;
    ++w.generation;
  } else {
    const uint64_t gen = w.generation;
    while (w.generation == gen) yield();
  }
  std::copy(w.out[l], w.out[l] + n_out, out);
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
  uint32_t in[2] = {0, static_cast<uint32_t>(lane_mask)}, out;
  std::memcpy(&in[0], &value, 4);
  warp_collective(Op::Shfl, in, 2, &out, 1, [](Warp& w) {
    for (int l = 0; l < w.lanes; ++l) {
      const int src = l ^ static_cast<int>(w.in[l][1]);
      w.out[l][0] = src < w.lanes ? w.in[src][0] : w.in[l][0];
    }
  });
  T result;
  std::memcpy(&result, &out, 4);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Shared memory.

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(rt.block->smem.data());
}

inline uint32_t smem_offset(const void* p) {
  const auto* base = rt.block->smem.data();
  const auto* q = static_cast<const uint8_t*>(p);
  if (q < base || q > base + rt.block->smem.size()) fail("a shared-memory address outside the dynamic shared memory");
  return static_cast<uint32_t>(q - base);
}

inline uint8_t* smem_at(uint32_t offset, int bytes, int align) {
  if (static_cast<size_t>(offset) + bytes > rt.block->smem.size()) {
    fail("shared-memory access [" + std::to_string(offset) + ", +" + std::to_string(bytes) + ") past the " +
         std::to_string(rt.block->smem.size()) + " bytes of dynamic shared memory");
  }
  if (offset % align != 0) fail("misaligned shared-memory address " + std::to_string(offset));
  return rt.block->smem.data() + offset;
}

// Race check, at the wait that completes a copy: the copy may have landed in any epoch from its issue
// to now, so another warp's read of the chunk in that window is unordered with it.
inline void check_copy_race(const Thread::Copy& c) {
  Block& b = *rt.block;
  Chunk& chunk = b.chunks[c.dst / 16];
  const int w = warp_index();
  if (chunk.read_epoch != ~uint64_t{0} && chunk.read_epoch >= c.issued && (chunk.readers & ~(uint64_t{1} << w)) != 0) {
    fail("shared-memory race: an asynchronous copy into byte " + std::to_string(c.dst) +
         " may land while another warp reads it (no barrier between the read and the copy's issue)");
  }
  chunk.write_to = b.barrier_generation;
  chunk.writer = w;
}

// Race check of an ldmatrix row read by warp w: a copy by another warp completed in this epoch has no
// barrier between it and this read.
inline void check_read_race(uint32_t offset, int w) {
  Block& b = *rt.block;
  Chunk& chunk = b.chunks[offset / 16];
  const uint64_t epoch = b.barrier_generation;
  if (chunk.writer >= 0 && chunk.writer != w && chunk.write_to >= epoch) {
    fail("shared-memory race: ldmatrix reads byte " + std::to_string(offset) +
         " that another warp's asynchronous copy wrote with no barrier after its wait");
  }
  if (chunk.read_epoch != epoch) {
    chunk.read_epoch = epoch;
    chunk.readers = 0;
  }
  chunk.readers |= uint64_t{1} << w;
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  uint32_t in[1] = {addr};
  warp_collective(trans ? Op::LdmatrixTrans : Op::Ldmatrix, in, 1, r, 4, [trans](Warp& w) {
    if (w.lanes != kWarp) fail("ldmatrix in a partial warp");
    uint16_t m[4][8][8];
    for (int mat = 0; mat < 4; ++mat) {
      int rows_in_group[8] = {};
      for (int row = 0; row < 8; ++row) {
        std::memcpy(m[mat][row], smem_at(w.in[mat * 8 + row][0], 16, 16), 16);
        check_read_race(w.in[mat * 8 + row][0], warp_index());
        rows_in_group[(w.in[mat * 8 + row][0] / 16) % 8] += 1;
      }
      ldmatrix_phases += 1;
      ldmatrix_extra_wavefronts += *std::max_element(rows_in_group, rows_in_group + 8) - 1;
    }
    for (int l = 0; l < kWarp; ++l) {
      const int a = l / 4, b = 2 * (l % 4);
      for (int mat = 0; mat < 4; ++mat) {
        const uint16_t lo = trans ? m[mat][b][a] : m[mat][a][b];
        const uint16_t hi = trans ? m[mat][b + 1][a] : m[mat][a][b + 1];
        w.out[l][mat] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
}

inline void perform(Thread::Copy& c) {
  if (c.performed) return;
  uint8_t* dst = smem_at(c.dst, 16, 16);
  std::memset(dst, 0, 16);
  if (c.bytes > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.bytes));
  c.performed = true;
}

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  smem_at(dst, 16, 16);  // checked when issued
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async from a misaligned global address");
  Thread::Copy c{dst, src, src_bytes, rt.block->barrier_generation, false};
  if (!copies_at_wait) perform(c);
  rt.thread->open_group.push_back(c);
}

inline void cp_async_commit() {
  Thread& t = *rt.thread;
  t.in_flight.push_back(std::move(t.open_group));
  t.open_group.clear();
}

// Completes every committed group but the `keep` most recent.
inline void complete_copies(Thread& t, size_t keep) {
  while (t.in_flight.size() > keep) {
    for (auto& c : t.in_flight.front()) {
      perform(c);
      check_copy_race(c);
    }
    t.in_flight.erase(t.in_flight.begin());
  }
}

inline void cp_async_wait(int keep) { complete_copies(*rt.thread, static_cast<size_t>(keep)); }

// ---------------------------------------------------------------------------------------------
// Tensor cores.

inline float half_bits_to_float(uint16_t b, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(b)) : __half2float(__ushort_as_half(b));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + C in place of C.
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1};
  for (int i = 0; i < 4; ++i) std::memcpy(&in[6 + i], &d[i], 4);
  uint32_t out[4];
  warp_collective(Op::Mma, in, 10, out, 4, [bf16](Warp& w) {
    if (w.lanes != kWarp) fail("mma.sync in a partial warp");
    mma_count += 1;
    double A[16][16], B[16][8];
    float C[16][8];
    auto lo = [&](uint32_t r) { return static_cast<double>(half_bits_to_float(static_cast<uint16_t>(r), bf16)); };
    auto hi = [&](uint32_t r) { return static_cast<double>(half_bits_to_float(static_cast<uint16_t>(r >> 16), bf16)); };
    for (int l = 0; l < kWarp; ++l) {
      const int g = l / 4, t = l % 4;
      const uint32_t* r = w.in[l];
      // A (row-major 16 x 16): a0 rows g, a1 rows g + 8, a2 / a3 the same rows 8 columns on.
      A[g][2 * t] = lo(r[0]);
      A[g][2 * t + 1] = hi(r[0]);
      A[g + 8][2 * t] = lo(r[1]);
      A[g + 8][2 * t + 1] = hi(r[1]);
      A[g][2 * t + 8] = lo(r[2]);
      A[g][2 * t + 9] = hi(r[2]);
      A[g + 8][2 * t + 8] = lo(r[3]);
      A[g + 8][2 * t + 9] = hi(r[3]);
      // B (16 x 8, k by n): b0 rows 2t, 2t + 1 of column g; b1 eight rows on.
      B[2 * t][g] = lo(r[4]);
      B[2 * t + 1][g] = hi(r[4]);
      B[2 * t + 8][g] = lo(r[5]);
      B[2 * t + 9][g] = hi(r[5]);
      // C / D (16 x 8): c0, c1 row g, columns 2t, 2t + 1; c2, c3 row g + 8.
      std::memcpy(&C[g][2 * t], &r[6], 4);
      std::memcpy(&C[g][2 * t + 1], &r[7], 4);
      std::memcpy(&C[g + 8][2 * t], &r[8], 4);
      std::memcpy(&C[g + 8][2 * t + 1], &r[9], 4);
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        double s = C[i][j];
        for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
        D[i][j] = static_cast<float>(s);
      }
    }
    for (int l = 0; l < kWarp; ++l) {
      const int g = l / 4, t = l % 4;
      std::memcpy(&w.out[l][0], &D[g][2 * t], 4);
      std::memcpy(&w.out[l][1], &D[g][2 * t + 1], 4);
      std::memcpy(&w.out[l][2], &D[g + 8][2 * t], 4);
      std::memcpy(&w.out[l][3], &D[g + 8][2 * t + 1], 4);
    }
  });
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], &out[i], 4);
}

// ---------------------------------------------------------------------------------------------
// Launch.

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(unsigned long long n) { return dim3(static_cast<unsigned>(n)); }

inline void run_block(Block& b, const std::function<void()>& body, std::mt19937_64& order_rng) {
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.threads.assign(static_cast<size_t>(n), Thread{});
  b.warps.assign(static_cast<size_t>((n + kWarp - 1) / kWarp), Warp{});
  for (size_t w = 0; w < b.warps.size(); ++w) b.warps[w].lanes = std::min(kWarp, n - static_cast<int>(w) * kWarp);
  b.live = n;
  rt.block = &b;
  rt.body = body;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[static_cast<size_t>(i)];
    t.linear = i;
    t.idx = uint3{static_cast<unsigned>(i) % b.dim.x, (static_cast<unsigned>(i) / b.dim.x) % b.dim.y,
                  static_cast<unsigned>(i) / (b.dim.x * b.dim.y)};
    start_fiber(t.fiber, stack_for(static_cast<size_t>(i)));
  }
  // The order of resumption. Seed 0: round-robin over all threads, so that warps advance in step, one
  // warp instruction per round. Otherwise the warps in an order drawn from the seed, each run as far as
  // it can (until all its lanes wait at a barrier or exit) before the next: one warp gets as far ahead of
  // the others as the block's barriers allow, which is where a missing barrier shows.
  std::vector<std::vector<int>> groups;
  if (schedule_seed == 0) {
    groups.emplace_back();
    for (int i = 0; i < n; ++i) groups.back().push_back(i);
  } else {
    for (int w = 0; w * kWarp < n; ++w) {
      groups.emplace_back();
      for (int i = w * kWarp; i < std::min(n, (w + 1) * kWarp); ++i) groups.back().push_back(i);
      std::shuffle(groups.back().begin(), groups.back().end(), order_rng);
    }
    std::shuffle(groups.begin(), groups.end(), order_rng);
  }
  while (b.live > 0) {
    bool progress = false;
    for (const auto& group : groups) {
      for (bool moved = true; moved && b.error.empty();) {  // sweep the group until it is stuck
        moved = false;
        for (int i : group) {
          Thread& t = b.threads[static_cast<size_t>(i)];
          if (t.done) continue;
          rt.thread = &t;
          b.progress = false;
          switch_fiber(rt.scheduler, t.fiber);
          moved = moved || b.progress;
          if (!b.error.empty()) break;
        }
        progress = progress || moved;
        if (schedule_seed == 0) break;  // round-robin: one sweep per round
      }
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    if (b.barrier_arrived > 0 && b.barrier_arrived == b.live) {  // the last waiter exited: release
      b.barrier_arrived = 0;
      ++b.barrier_generation;
      progress = true;
    }
    if (!progress) {
      b.error = "deadlock: every running thread waits at a barrier or warp instruction that cannot complete";
    }
  }
  rt.thread = nullptr;
  if (!b.error.empty()) {
    // Unwind the fibers still parked, so that nothing of this launch stays on their stacks.
    for (Thread& t : b.threads) {
      if (t.done) continue;
      rt.thread = &t;
      switch_fiber(rt.scheduler, t.fiber);
    }
    rt.thread = nullptr;
  }
}

struct Launch {
  dim3 grid, block;
  size_t smem;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args&&... args) const {
    std::function<void()> body = [kernel, args...]() { kernel(args...); };
    std::mt19937_64 order_rng(schedule_seed);
    Block b;
    b.grid = grid;
    b.dim = block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          b.idx = uint3{x, y, z};
          b.smem.assign(smem, 0xff);
          b.chunks.assign((smem + 15) / 16, Chunk{});
          b.error.clear();
          b.barrier_arrived = 0;
          run_block(b, body, order_rng);
          rt.block = nullptr;
          if (!b.error.empty()) throw std::runtime_error("cuda emulator: " + b.error);
        }
      }
    }
  }
};

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to launch(kernel, grid, block, smem, stream)(args).
template <typename Kernel, typename G, typename B>
auto launch(Kernel kernel, G grid, B block, size_t smem = 0, const void* stream = nullptr) {
  (void)stream;
  const Launch l{as_dim3(grid), as_dim3(block), smem};
  return [l, kernel](auto&&... args) { l(kernel, std::forward<decltype(args)>(args)...); };
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::Index::thread())
#define blockIdx (::cuda_emu::Index::block())
#define blockDim (::cuda_emu::Index::block_dim())
#define gridDim (::cuda_emu::Index::grid_dim())

inline void __syncthreads() { ::cuda_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return ::cuda_emu::shfl_xor(mask, value, lane_mask);
}
[[noreturn]] inline void __trap() {
  ::cuda_emu::fail("__trap()");
  std::abort();
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::cuda_emu::smem_offset(p); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;
