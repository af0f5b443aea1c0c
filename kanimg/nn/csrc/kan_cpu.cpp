// Fused CPU kernels for kanimg's KAN layer.
//
// The layer computes y = F(x) @ W with the feature row
//   F(x) = [silu(x_0) .. silu(x_{I-1}) | B_0(x_0) .. B_{G+2}(x_0) | ... | B_0(x_{I-1}) .. B_{G+2}(x_{I-1})]
// where B_m are the G+3 cubic B-splines of a grid of G intervals on [lo_i, hi_i] (knots
// extended by 3 intervals on each side). Only 4 of them are non-zero at any x. On a uniform
// grid they have the closed form below in u = frac((x - lo) / h); on any other knots
// (percentile grids) the interval is found by binary search and the 4 values come from the
// local de Boor triangle. These kernels build F in one pass and compute dL/dx from dL/dF;
// PyTorch does the matmuls (and sigmoid(x), passed in as `sig`, because its vectorised exp
// is faster than a scalar one here). They must agree with the pure-PyTorch functions in
// bspline.py, which the tests check.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline void cubic_pieces(T u, T* b) {
  const T u2 = u * u, u3 = u2 * u, v = T(1) - u;
  b[0] = v * v * v / T(6);
  b[1] = (T(3) * u3 - T(6) * u2 + T(4)) / T(6);
  b[2] = (T(-3) * u3 + T(3) * u2 + T(3) * u + T(1)) / T(6);
  b[3] = u3 / T(6);
}

template <typename T>
inline void cubic_pieces_du(T u, T* d) {
  const T u2 = u * u, v = T(1) - u;
  d[0] = -v * v / T(2);
  d[1] = T(1.5) * u2 - T(2) * u;
  d[2] = T(-1.5) * u2 + u + T(0.5);
  d[3] = u2 / T(2);
}

// Position of x on the grid: first non-zero basis index j (may be -3..G+2) and u in [0, 1).
// Returns false when x lies outside the extended knots [lo - 3h, hi + 3h) (or is NaN).
template <typename T>
inline bool locate(T x, T lo, T inv_h, int64_t G, int64_t* j, T* u) {
  const T s = (x - lo) * inv_h;
  if (!(s >= T(-3) && s < T(G + 3))) return false;
  const T f = std::floor(s);
  *j = static_cast<int64_t>(f);
  *u = s - f;
  return true;
}

// Where the non-zero basis functions of input feature i are at x: the first index j (may be
// -3..G+2; B_j .. B_{j+3}), their values v and, on request, their slopes dv/dx. False when x
// lies outside the extended knots (or is NaN): then there is no spline term.
template <typename T>
struct UniformGrid {
  const T* lo;
  const T* inv_h;
  int64_t G;

  inline bool at(int64_t i, T x, int64_t* j, T* v) const {
    T u;
    if (!locate(x, lo[i], inv_h[i], G, j, &u)) return false;
    cubic_pieces(u, v);
    return true;
  }
  inline bool at(int64_t i, T x, int64_t* j, T* v, T* d) const {
    T u;
    if (!locate(x, lo[i], inv_h[i], G, j, &u)) return false;
    cubic_pieces(u, v);
    cubic_pieces_du(u, d);
    for (int r = 0; r < 4; ++r) d[r] *= inv_h[i];
    return true;
  }
};

template <typename T>
inline T safe_div(T a, T b) {
  return b != T(0) ? a / b : T(0);
}

// Any non-decreasing knots: rows of n = G + 7 knots t_0 .. t_{G+6}, stored with 3 extra
// (extrapolated) knots on each side, so the de Boor triangle never reads outside a row.
template <typename T>
struct KnotGrid {
  const T* padded;  // (I, n + 6)
  int64_t n;

  inline bool span(int64_t i, T x, const T** t, int64_t* k) const {
    *t = padded + i * (n + 6) + 3;  // t[0] is the first real knot
    if (!(x >= (*t)[0] && x < (*t)[n - 1])) return false;
    *k = (std::upper_bound(*t, *t + n, x) - *t) - 1;  // t[k] <= x < t[k+1]
    return true;
  }
  // B_{k-3..k} of degree 3 into N, and (if N2) B_{k-2..k} of degree 2 into N2.
  static inline void de_boor(const T* t, int64_t k, T x, T* N, T* N2) {
    T left[4], right[4];
    N[0] = T(1);
    for (int j = 1; j <= 3; ++j) {
      left[j] = x - t[k + 1 - j];
      right[j] = t[k + j] - x;
      T saved = 0;
      for (int q = 0; q < j; ++q) {
        const T temp = safe_div(N[q], right[q + 1] + left[j - q]);
        N[q] = saved + right[q + 1] * temp;
        saved = left[j - q] * temp;
      }
      N[j] = saved;
      if (j == 2 && N2 != nullptr) std::copy(N, N + 3, N2);
    }
  }
  inline bool at(int64_t i, T x, int64_t* j, T* v) const {
    const T* t;
    int64_t k;
    if (!span(i, x, &t, &k)) return false;
    de_boor(t, k, x, v, nullptr);
    *j = k - 3;
    return true;
  }
  inline bool at(int64_t i, T x, int64_t* j, T* v, T* d) const {
    const T* t;
    int64_t k;
    if (!span(i, x, &t, &k)) return false;
    T N2[3];
    de_boor(t, k, x, v, N2);
    // dB_{m,3}/dx = 3 (B_{m,2} / (t_{m+3} - t_m) - B_{m+1,2} / (t_{m+4} - t_{m+1})), m = k-3+q
    for (int q = 0; q < 4; ++q) {
      const T a = q > 0 ? safe_div(N2[q - 1], t[k + q] - t[k - 3 + q]) : T(0);
      const T b = q < 3 ? safe_div(N2[q], t[k + 1 + q] - t[k - 2 + q]) : T(0);
      d[q] = T(3) * (a - b);
    }
    *j = k - 3;
    return true;
  }
};

// Calls fn(grid) with the grid the tensors describe: `knots` empty means uniform (lo, inv_h).
template <typename T, typename Fn>
inline void with_grid(const torch::Tensor& lo, const torch::Tensor& inv_h, const torch::Tensor& knots, int64_t G, Fn&& fn) {
  if (knots.numel() == 0) {
    fn(UniformGrid<T>{lo.data_ptr<T>(), inv_h.data_ptr<T>(), G});
  } else {
    TORCH_CHECK(knots.is_contiguous() && knots.size(1) == G + 13, "knots must be (I, G + 13), padded by 3 on each side");
    fn(KnotGrid<T>{knots.data_ptr<T>(), G + 7});
  }
}

// Writes the feature rows of x into F (B, I·(G+4)), a caller-owned buffer that is reused
// between calls (fresh 30 MB allocations cost more in page faults than the kernel itself).
void features(torch::Tensor x, torch::Tensor sig, torch::Tensor lo, torch::Tensor inv_h, torch::Tensor knots, int64_t G,
              torch::Tensor F) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && sig.is_contiguous() && !x.is_cuda(), "x must be a contiguous 2-D CPU tensor");
  const int64_t B = x.size(0), I = x.size(1), M = G + 3, K = I + I * M;
  TORCH_CHECK(F.is_contiguous() && F.size(0) == B && F.size(1) == K && F.scalar_type() == x.scalar_type(), "F has the wrong shape");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_features", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = sig.data_ptr<scalar_t>();
    scalar_t* Fp = F.data_ptr<scalar_t>();
    with_grid<scalar_t>(lo, inv_h, knots, G, [&](const auto grid) {
      at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* xr = xp + b * I;
          scalar_t* row = Fp + b * K;
          for (int64_t i = 0; i < I; ++i) row[i] = xr[i] * sp[b * I + i];
          std::fill(row + I, row + K, scalar_t(0));
          for (int64_t i = 0; i < I; ++i) {
            int64_t j;
            scalar_t v[4];
            if (!grid.at(i, xr[i], &j, v)) continue;
            scalar_t* seg = row + I + i * M;
            for (int r = 0; r < 4; ++r) {
              const int64_t m = j + r;
              if (m >= 0 && m < M) seg[m] = v[r];
            }
          }
        }
      });
    });
  });
}

// Writes dL/dx into gx (B, I), which may be a row block of a larger tensor.
void input_grad(torch::Tensor x, torch::Tensor sig, torch::Tensor grad_F, torch::Tensor lo, torch::Tensor inv_h, torch::Tensor knots,
                int64_t G, torch::Tensor gx) {
  TORCH_CHECK(x.is_contiguous() && sig.is_contiguous() && grad_F.is_contiguous() && gx.is_contiguous(), "inputs must be contiguous");
  const int64_t B = x.size(0), I = x.size(1), M = G + 3, K = I + I * M;
  TORCH_CHECK(grad_F.size(0) == B && grad_F.size(1) == K, "grad_F has the wrong shape");
  TORCH_CHECK(gx.size(0) == B && gx.size(1) == I, "gx has the wrong shape");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_input_grad", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_F.data_ptr<scalar_t>();
    const scalar_t* sp = sig.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    with_grid<scalar_t>(lo, inv_h, knots, G, [&](const auto grid) {
      at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* xr = xp + b * I;
          const scalar_t* grow = gp + b * K;
          for (int64_t i = 0; i < I; ++i) {
            const scalar_t xi = xr[i];
            const scalar_t sg = sp[b * I + i];
            scalar_t acc = grow[i] * sg * (scalar_t(1) + xi * (scalar_t(1) - sg));
            int64_t j;
            scalar_t v[4], d[4];
            if (grid.at(i, xi, &j, v, d)) {
              const scalar_t* seg = grow + I + i * M;
              for (int r = 0; r < 4; ++r) {
                const int64_t m = j + r;
                if (m >= 0 && m < M) acc += seg[m] * d[r];
              }
            }
            gxp[b * I + i] = acc;
          }
        }
      });
    });
  });
}

// Narrow layers (few outputs, e.g. the RGB output layer): F @ W touches only 5 of F's
// I·(G+4) columns per input, so evaluating y, dL/dx and dL/dW directly from those rows of W
// beats three memory-bound passes over a materialised F. The output count is a template
// parameter so that per-sample accumulators live in registers.
constexpr int64_t kMaxNarrow = 8;

template <typename T, int O, typename Grid>
void narrow_forward_rows(const T* xp, const T* sp, const T* Wp, const Grid& grid, T* yp, int64_t I, int64_t G, int64_t b0,
                         int64_t b1) {
  const int64_t M = G + 3;
  for (int64_t b = b0; b < b1; ++b) {
    T acc[O] = {};
    for (int64_t i = 0; i < I; ++i) {
      const T xi = xp[b * I + i];
      const T silu = xi * sp[b * I + i];
      for (int o = 0; o < O; ++o) acc[o] += silu * Wp[i * O + o];
      int64_t j;
      T v[4];
      if (!grid.at(i, xi, &j, v)) continue;
      const T* wseg = Wp + (I + i * M) * O;
      for (int r = 0; r < 4; ++r) {
        const int64_t m = j + r;
        if (m < 0 || m >= M) continue;
        for (int o = 0; o < O; ++o) acc[o] += v[r] * wseg[m * O + o];
      }
    }
    for (int o = 0; o < O; ++o) yp[b * O + o] = acc[o];
  }
}

template <typename T, int O, typename Grid>
void narrow_backward_rows(const T* xp, const T* sp, const T* gyp, const T* Wp, const Grid& grid, T* gxp, T* gW, int64_t I,
                          int64_t G, int64_t b0, int64_t b1, bool need_W) {
  const int64_t M = G + 3;
  for (int64_t b = b0; b < b1; ++b) {
    T gy[O];
    for (int o = 0; o < O; ++o) gy[o] = gyp[b * O + o];
    for (int64_t i = 0; i < I; ++i) {
      const T xi = xp[b * I + i];
      const T sig = sp[b * I + i];
      T dot = 0;
      for (int o = 0; o < O; ++o) dot += gy[o] * Wp[i * O + o];
      T acc = dot * sig * (T(1) + xi * (T(1) - sig));
      if (need_W)
        for (int o = 0; o < O; ++o) gW[i * O + o] += xi * sig * gy[o];
      int64_t j;
      T v[4], d[4];
      if (grid.at(i, xi, &j, v, d)) {
        const int64_t seg = (I + i * M) * O;
        for (int r = 0; r < 4; ++r) {
          const int64_t m = j + r;
          if (m < 0 || m >= M) continue;
          T dw = 0;
          for (int o = 0; o < O; ++o) dw += gy[o] * Wp[seg + m * O + o];
          acc += d[r] * dw;
          if (need_W)
            for (int o = 0; o < O; ++o) gW[seg + m * O + o] += v[r] * gy[o];
        }
      }
      gxp[b * I + i] = acc;
    }
  }
}

// Calls FN<T, O, Grid> for the runtime output count O in 1..kMaxNarrow.
#define KAN_DISPATCH_NARROW(T, Grid, O, FN, ...)   \
  switch (O) {                                     \
    case 1: FN<T, 1, Grid>(__VA_ARGS__); break;    \
    case 2: FN<T, 2, Grid>(__VA_ARGS__); break;    \
    case 3: FN<T, 3, Grid>(__VA_ARGS__); break;    \
    case 4: FN<T, 4, Grid>(__VA_ARGS__); break;    \
    case 5: FN<T, 5, Grid>(__VA_ARGS__); break;    \
    case 6: FN<T, 6, Grid>(__VA_ARGS__); break;    \
    case 7: FN<T, 7, Grid>(__VA_ARGS__); break;    \
    default: FN<T, 8, Grid>(__VA_ARGS__); break;   \
  }

torch::Tensor narrow_forward(torch::Tensor x, torch::Tensor sig, torch::Tensor W, torch::Tensor lo, torch::Tensor inv_h,
                             torch::Tensor knots, int64_t G) {
  TORCH_CHECK(x.is_contiguous() && W.is_contiguous(), "x and W must be contiguous");
  const int64_t B = x.size(0), I = x.size(1), M = G + 3, O = W.size(1);
  TORCH_CHECK(W.size(0) == I + I * M, "W has the wrong shape");
  TORCH_CHECK(O >= 1 && O <= kMaxNarrow, "narrow_forward takes 1 to 8 outputs");
  auto y = torch::empty({B, O}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_narrow_forward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *sp = sig.data_ptr<scalar_t>(), *Wp = W.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_grid<scalar_t>(lo, inv_h, knots, G, [&](const auto grid) {
      using Grid = std::decay_t<decltype(grid)>;
      at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        KAN_DISPATCH_NARROW(scalar_t, Grid, O, narrow_forward_rows, xp, sp, Wp, grid, yp, I, G, b0, b1);
      });
    });
  });
  return y;
}

std::vector<torch::Tensor> narrow_backward(torch::Tensor x, torch::Tensor sig, torch::Tensor grad_y, torch::Tensor W, torch::Tensor lo,
                                           torch::Tensor inv_h, torch::Tensor knots, int64_t G, bool need_x, bool need_W) {
  TORCH_CHECK(x.is_contiguous() && grad_y.is_contiguous() && W.is_contiguous(), "inputs must be contiguous");
  const int64_t B = x.size(0), I = x.size(1), M = G + 3, O = W.size(1), K = I + I * M;
  TORCH_CHECK(O >= 1 && O <= kMaxNarrow, "narrow_backward takes 1 to 8 outputs");
  auto gx = torch::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 64));
  auto gW_parts = torch::zeros({chunks, K, O}, x.options());  // one private dL/dW per chunk of rows
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kan_narrow_backward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *sp = sig.data_ptr<scalar_t>(), *gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* Wp = W.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gWp = gW_parts.data_ptr<scalar_t>();
    const int64_t rows = (B + chunks - 1) / chunks;
    with_grid<scalar_t>(lo, inv_h, knots, G, [&](const auto grid) {
      using Grid = std::decay_t<decltype(grid)>;
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t b0 = c * rows, b1 = std::min(B, b0 + rows);
          KAN_DISPATCH_NARROW(scalar_t, Grid, O, narrow_backward_rows, xp, sp, gyp, Wp, grid, gxp, gWp + c * K * O, I, G, b0, b1,
                              need_W);
        }
      });
    });
  });
  return {need_x ? gx : torch::Tensor(), need_W ? gW_parts.sum(0) : torch::Tensor()};
}

}  // namespace

void register_hashgrid(pybind11::module& m);  // hashgrid_cpu.cpp, built into the same module

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_hashgrid(m);
  m.def("features", &features, "writes the KAN feature rows [silu(x) | local cubic B-spline basis] into F");
  m.def("input_grad", &input_grad, "writes dL/dx from dL/dF for the KAN feature rows into gx");
  m.def("narrow_forward", &narrow_forward, "F(x) @ W without materialising F, for layers with few outputs");
  m.def("narrow_backward", &narrow_backward, "dL/dx and dL/dW of narrow_forward");
}
