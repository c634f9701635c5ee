// Checks philox::uniforms (the CPU kernels' vector draw, whichever instruction set this file is
// compiled for) against the scalar definition philox::uniform, bit for bit, for runs starting at
// each offset given on the command line and every length up to 300, and prints the scalar values
// of the elements first .. first + 7 of every offset for the caller to check against its own
// Philox. Exit status 1 on a mismatch. Built and run by tests/test_random.py.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fused_attn/philox.h"

int main(int argc, char** argv) {
  using namespace fused_attn;
  const uint64_t seed = 0x123456789ABCDEFull;
  for (int a = 1; a < argc; ++a) {
    const uint64_t first = std::strtoull(argv[a], nullptr, 0);
    std::vector<float> got(300 + 1);
    for (int64_t n = 1; n <= 300; ++n) {
      got[n] = -1.f;  // must stay untouched: uniforms writes exactly n values
      philox::uniforms(seed, first, n, got.data());
      for (int64_t t = 0; t < n; ++t) {
        const float want = philox::uniform(seed, first + static_cast<uint64_t>(t));
        if (std::memcmp(&want, &got[t], sizeof(float)) != 0) {
          std::printf("mismatch: first %" PRIu64 " n %" PRId64 " t %" PRId64 ": %.9g, scalar %.9g\n", first, n, t,
                      got[t], want);
          return 1;
        }
      }
      if (got[n] != -1.f) {
        std::printf("wrote past the run: first %" PRIu64 " n %" PRId64 "\n", first, n);
        return 1;
      }
    }
    for (int t = 0; t < 8; ++t) std::printf("%.9g\n", philox::uniform(seed, first + static_cast<uint64_t>(t)));
  }
  return 0;
}
