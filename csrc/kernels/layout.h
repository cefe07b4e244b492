// How the kernels see a tensor, and how work on it is split into tiles.
// Plain C++ (no torch headers).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fxc {

// A contiguous tensor viewed as [outer, channels, inner]: element (o, c, i)
// lives at (o * channels + c) * inner + i. Per-channel ops along axis a use
// outer = prod(shape[:a]), channels = shape[a], inner = prod(shape[a+1:]);
// per-tensor ops use channels = 1.
struct Layout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
  int64_t numel() const { return outer * channels * inner; }
};

// One tile: outer rows [o0, o1) x channels [c0, c1) x inner [i0, i1).
// `row` indexes the partial-sum buffer of per-channel reductions: tile t
// writes its sums for channel c to partial[row * channels + c], and no other
// tile writes that slot, so results do not depend on the thread count.
struct Tile {
  int64_t o0, o1, c0, c1, i0, i1;
  int64_t row;
};

// A deterministic tiling of a Layout into tiles of about `grain` elements.
// Channel blocks are capped at kMaxChannelBlock so that the partial-sum buffer
// stays small (at most numel * kMaxChannelBlock / grain slots).
struct Tiling {
  static constexpr int64_t kMaxChannelBlock = 256;

  Layout layout;
  int64_t bo = 1, bc = 1, bi = 1;  // block sizes
  int64_t no = 0, nc = 0, ni = 0;  // block counts

  Tiling(const Layout& l, int64_t grain) : layout(l) {
    if (l.numel() == 0) return;  // no tiles
    grain = std::max<int64_t>(grain, 1);
    bi = std::min(l.inner, grain);
    bc = std::max<int64_t>(1, std::min({l.channels, kMaxChannelBlock, grain / bi}));
    bo = std::max<int64_t>(1, std::min(l.outer, grain / (bi * bc)));
    no = ceil_div(l.outer, bo);
    nc = ceil_div(l.channels, bc);
    ni = ceil_div(l.inner, bi);
  }

  int64_t num_tiles() const { return no * nc * ni; }
  int64_t num_rows() const { return no * ni; }  // rows of the partial-sum buffer

  Tile tile(int64_t t) const {
    const int64_t cb = t % nc;
    const int64_t rest = t / nc;
    const int64_t ib = rest % ni;
    const int64_t ob = rest / ni;
    Tile r;
    r.o0 = ob * bo;
    r.o1 = std::min(layout.outer, r.o0 + bo);
    r.c0 = cb * bc;
    r.c1 = std::min(layout.channels, r.c0 + bc);
    r.i0 = ib * bi;
    r.i1 = std::min(layout.inner, r.i0 + bi);
    r.row = ob * ni + ib;
    return r;
  }

  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
};

// Tiles of the elementwise and reduction kernels hold about this many elements:
// large enough to amortize the per-tile overhead, small enough to feed all
// threads on tensors of a few hundred thousand elements.
constexpr int64_t kGrain = 1 << 15;

}  // namespace fxc
