// Fused CPU kernels for kanimg's multiresolution hash encoding (hashgrid.py).
//
// The PyTorch path builds every point's 4 cell corners at every level from a dozen elementwise
// int64 tensors of shape (B, L, 4) and then gathers them; here one pass per point computes the
// corners, their bilinear weights and the weighted sum of table rows. The backward pass
// recomputes the corners (nothing but x is saved) and scatter-adds into the table's gradient
// one level per task: each level owns its own slice of the table, so no two tasks write the
// same row and the sums do not depend on the thread count.
// They must agree with HashGridEncoding.corners and interpolate, which the tests check.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kHashPrimeY = 2654435761LL;  // hashgrid.HASH_PRIME_Y

// Writes the table rows and bilinear weights of a point's 4 cell corners at level l, in the
// order of HashGridEncoding.corners: (0, 0), (1, 0), (0, 1), (1, 1). (ux, uy): the point in
// the unit square.
template <typename T>
struct Levels {
  const T* res;
  const int64_t *side, *size, *offset;
  const bool* hashed;

  inline void corners(T ux, T uy, int64_t l, int64_t* rows, T* weights) const {
    const T n = res[l];
    const T posx = ux * n, posy = uy * n;
    const T cellx = std::min(std::floor(posx), n - T(1)), celly = std::min(std::floor(posy), n - T(1));
    const T fx = posx - cellx, fy = posy - celly;
    const int64_t ix = static_cast<int64_t>(cellx), iy = static_cast<int64_t>(celly);
    for (int k = 0; k < 4; ++k) {
      const int64_t vx = ix + (k & 1), vy = iy + (k >> 1);
      rows[k] = (hashed[l] ? ((vx ^ (vy * kHashPrimeY)) % size[l]) : (vx + vy * side[l])) + offset[l];
      weights[k] = ((k & 1) ? fx : T(1) - fx) * ((k >> 1) ? fy : T(1) - fy);
    }
  }
};

// x clamped to [-1, 1] as torch.clamp does, except that NaN goes to -1 (torch keeps it, and
// the PyTorch path's lookup then fails): no coordinate can index outside the table.
template <typename T>
inline T clamp_unit(T v) {
  return v >= T(-1) ? (v <= T(1) ? v : T(1)) : T(-1);
}

template <typename T>
inline void unit_square(const T* x, T* ux, T* uy) {
  *ux = (clamp_unit(x[0]) + T(1)) / T(2);
  *uy = (clamp_unit(x[1]) + T(1)) / T(2);
}

struct LevelBuffers {
  torch::Tensor resolution, side, size, hashed, offset;

  LevelBuffers(const torch::Tensor& x, torch::Tensor resolution_, torch::Tensor side_, torch::Tensor size_, torch::Tensor hashed_,
               torch::Tensor offset_)
      : resolution(resolution_.to(x.scalar_type()).contiguous()), side(side_.contiguous()), size(size_.contiguous()),
        hashed(hashed_.contiguous()), offset(offset_.contiguous()) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == 2 && x.is_contiguous() && !x.is_cuda(), "x must be a contiguous (B, 2) CPU tensor");
    TORCH_CHECK(side.scalar_type() == torch::kInt64 && size.scalar_type() == torch::kInt64 && hashed.scalar_type() == torch::kBool &&
                    offset.scalar_type() == torch::kInt64,
                "level buffers have unexpected dtypes");
  }

  template <typename T>
  Levels<T> view() const {
    return {resolution.data_ptr<T>(), side.data_ptr<int64_t>(), size.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
            hashed.data_ptr<bool>()};
  }
};

// Features (B, L·F) of coordinates x (B, 2): every level's bilinear interpolation of its table.
torch::Tensor hash_encode(torch::Tensor x, torch::Tensor table, torch::Tensor resolution, torch::Tensor side, torch::Tensor size,
                          torch::Tensor hashed, torch::Tensor offset) {
  const LevelBuffers buffers(x, resolution, side, size, hashed, offset);
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.scalar_type() == x.scalar_type(), "table must be contiguous, of x's dtype");
  const int64_t B = x.size(0), L = resolution.size(0), F = table.size(1);
  auto out = torch::empty({B, L * F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *tp = table.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const Levels<scalar_t> levels = buffers.view<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      int64_t rows[4];
      scalar_t w[4], ux, uy;
      for (int64_t b = b0; b < b1; ++b) {
        unit_square(xp + 2 * b, &ux, &uy);
        scalar_t* o = op + b * L * F;
        for (int64_t l = 0; l < L; ++l) {
          levels.corners(ux, uy, l, rows, w);
          for (int64_t f = 0; f < F; ++f) {
            scalar_t sum = w[0] * tp[rows[0] * F + f];
            for (int k = 1; k < 4; ++k) sum += w[k] * tp[rows[k] * F + f];
            o[l * F + f] = sum;
          }
        }
      }
    });
  });
  return out;
}

// dL/dtable (entries, F) from dL/dfeatures (B, L·F), the corners recomputed from x: one level
// per task, points in order.
torch::Tensor hash_encode_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor resolution, torch::Tensor side,
                                   torch::Tensor size, torch::Tensor hashed, torch::Tensor offset, int64_t entries) {
  const LevelBuffers buffers(x, resolution, side, size, hashed, offset);
  grad = grad.contiguous();
  const int64_t B = x.size(0), L = resolution.size(0), F = grad.size(1) / L;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == L * F && grad.scalar_type() == x.scalar_type(),
              "grad must be (B, L·F), of x's dtype");
  auto gtable = torch::zeros({entries, F}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "hash_encode_backward", [&] {
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    scalar_t* tp = gtable.data_ptr<scalar_t>();
    const Levels<scalar_t> levels = buffers.view<scalar_t>();
    at::parallel_for(0, L, 1, [&](int64_t l0, int64_t l1) {
      int64_t rows[4];
      scalar_t w[4], ux, uy;
      for (int64_t l = l0; l < l1; ++l) {
        for (int64_t b = 0; b < B; ++b) {
          unit_square(xp + 2 * b, &ux, &uy);
          levels.corners(ux, uy, l, rows, w);
          const scalar_t* g = gp + b * L * F + l * F;
          for (int k = 0; k < 4; ++k) {
            scalar_t* t = tp + rows[k] * F;
            for (int64_t f = 0; f < F; ++f) t[f] += w[k] * g[f];
          }
        }
      }
    });
  });
  return gtable;
}

}  // namespace

void register_hashgrid(pybind11::module& m) {
  m.def("hash_encode", &hash_encode, "multiresolution hash features of (B, 2) points");
  m.def("hash_encode_backward", &hash_encode_backward, "the table's gradient from the features' gradient (corners recomputed)");
}
