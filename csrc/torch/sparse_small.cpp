// A small sparse-diff layer on the CPU as one C++ autograd node: peftkern/ops/sparse (its README.md has the math)
// where the layer is small (torch_impl.small). A torch extension (torch headers, built against the installed torch),
// imported as peftkern._lib._torch_nodes.
// Why: at 16 x 64 a training step is mostly per-op and per-node cost; the PyTorch composite (a merged copy of W, a
// second GEMM for g^T x, two autograd nodes) ran at 1.03-1.08x the dense masked gradient before any Python. Here
// y = x W^T + b (one addmm) plus each entry's term, dx = g W plus each entry's term, dvalues_e = sum_n g[n, r_e]
// x[n, c_e]: one GEMM a direction, the entries' N x nnz products in loops, no W-sized tensor made or saved.
// The op's torch implementation calls the same forward / dgrad / vgrad on these layers, so both give the same bits.
#include <ATen/autocast_mode.h>
#include <torch/extension.h>

namespace {

// ---------------------------------------------------------------------------------------------- kernels (no torch)
// out [N, ld_out] (row-major): out[n, to_e] += src[n, from_e] * v_e, entries in index order, each product rounded
// then added (-ffp-contract=off): the same bits wherever it is built.
template <typename T>
void add_entries(T* out, int64_t ld_out, const T* src, int64_t ld_src, const int32_t* to, const int32_t* from,
                 const T* v, int64_t N, int64_t E) {
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * ld_out;
    const T* s = src + n * ld_src;
    for (int64_t e = 0; e < E; ++e) o[to[e]] += s[from[e]] * v[e];
  }
}

// dv [E]: dv_e = sum_n g[n, rows_e] x[n, cols_e], n in order (g [N, O], x [N, I] row-major).
template <typename T>
void entry_dots(T* dv, const T* g, int64_t O, const T* x, int64_t I, const int32_t* rows, const int32_t* cols,
                int64_t N, int64_t E) {
  for (int64_t e = 0; e < E; ++e) dv[e] = T(0);
  for (int64_t n = 0; n < N; ++n) {
    const T* gn = g + n * O;
    const T* xn = x + n * I;
    for (int64_t e = 0; e < E; ++e) dv[e] += gn[rows[e]] * xn[cols[e]];
  }
}

// ------------------------------------------------------------------------------------------ launch (allocate, call)
using at::Tensor;

// The operands as the kernels read them: CPU, x's dtype, packed (a copy only where they are not); rows and cols int32
// (what the layer's Structure holds: 8 bytes an entry saved for backward, as the op's int64 flat indices), inside
// [0, out) and [0, in): the Structure was built from indices checked against W's shape (not re-checked here).
Tensor packed(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type(), name, " must be a CPU tensor of ",
              like.scalar_type());
  return t.contiguous();
}

void check_entries(const Tensor& rows, const Tensor& cols, int64_t nnz) {
  TORCH_CHECK(rows.scalar_type() == at::kInt && cols.scalar_type() == at::kInt && rows.is_contiguous() &&
                  cols.is_contiguous() && rows.numel() == nnz && cols.numel() == nnz,
              "rows and cols must be contiguous int32 [nnz]");
}

// y [N, O] = x W^T + b + the entries' term: x [N, I], W [O, I] (any strides), b [O] or none.
Tensor forward(const Tensor& x_, const Tensor& w, const c10::optional<Tensor>& b, const Tensor& rows,
               const Tensor& cols, const Tensor& values_) {
  const Tensor x = packed(x_, x_, "x"), values = packed(values_, x_, "values");
  check_entries(rows, cols, values.numel());
  Tensor y = b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_small_forward", [&] {
    add_entries<scalar_t>(y.data_ptr<scalar_t>(), w.size(0), x.data_ptr<scalar_t>(), x.size(1),
                          rows.data_ptr<int32_t>(), cols.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), x.size(0),
                          values.numel());
  });
  return y;
}

// dx [N, I] = g W + the entries' term: g [N, O].
Tensor dgrad(const Tensor& g_, const Tensor& w, const Tensor& rows, const Tensor& cols, const Tensor& values_) {
  const Tensor g = packed(g_, g_, "grad_out"), values = packed(values_, g_, "values");
  check_entries(rows, cols, values.numel());
  Tensor dx = g.mm(w);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_small_dgrad", [&] {
    add_entries<scalar_t>(dx.data_ptr<scalar_t>(), w.size(1), g.data_ptr<scalar_t>(), g.size(1),
                          cols.data_ptr<int32_t>(), rows.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), g.size(0),
                          values.numel());
  });
  return dx;
}

// dvalues [nnz] = (g^T x) at (rows, cols): g [N, O], x [N, I].
Tensor vgrad(const Tensor& g_, const Tensor& x_, const Tensor& rows, const Tensor& cols) {
  const Tensor g = packed(g_, g_, "grad_out"), x = packed(x_, g_, "x");
  check_entries(rows, cols, rows.numel());
  Tensor dv = at::empty({rows.numel()}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_small_vgrad", [&] {
    entry_dots<scalar_t>(dv.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), g.size(1), x.data_ptr<scalar_t>(),
                         x.size(1), rows.data_ptr<int32_t>(), cols.data_ptr<int32_t>(), g.size(0), rows.numel());
  });
  return dv;
}

// ------------------------------------------------------------------------------------------ autograd (ctx only)
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct SparseSmall : torch::autograd::Function<SparseSmall> {
  // b last: an absent bias has no input edge, so the others' edge indices (needs_input_grad) stay as they are
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& rows, const Tensor& cols,
                        const Tensor& values, const c10::optional<Tensor>& b) {
    Tensor xc = x.contiguous();
    Tensor vc = values.contiguous();
    ctx->save_for_backward({xc, w, rows, cols, vc});
    ctx->saved_data["bias"] = b.has_value();
    return ::forward(xc, w, b, rows, cols, vc);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &rows = saved[2], &cols = saved[3], &values = saved[4];
    const Tensor& g = grads[0];
    Tensor dx, db, dv;
    if (at::GradMode::is_enabled()) {  // create_graph: the same terms as differentiable ATen ops (double backward)
      const Tensor g_rows = g.index_select(1, rows);  // [N, nnz]
      if (ctx->needs_input_grad(0)) dx = g.mm(w).index_add(1, cols, g_rows * values);
      if (ctx->needs_input_grad(4)) dv = (g_rows * x.index_select(1, cols)).sum(0);
    } else {
      if (ctx->needs_input_grad(0)) dx = dgrad(g, w, rows, cols, values);
      if (ctx->needs_input_grad(4)) dv = vgrad(g, x, rows, cols);
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(5)) db = g.sum(0);
    return {dx, Tensor(), Tensor(), Tensor(), dv, db};
  }
};

Tensor apply(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, const Tensor& rows, const Tensor& cols,
             const Tensor& values) {
  return SparseSmall::apply(x, w, rows, cols, values, b);
}

// ------------------------------------------------------------------------------- a layer's calls (peftkern/nn)
bool is(const Tensor& t, at::ScalarType dtype, int64_t dim) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim;
}

// One SparseDiffLinear state whose Python check chose this node (peftkern/nn/sparse.py): its later calls come here
// first and run the node where nothing the check read has changed: grad mode on and no CPU autocast, x of the same
// dtype and features with a token count at which the layer is small ([lo, hi]), the parameters as checked (a frozen
// weight, their dtypes, shapes and device: they can change behind the module's back, `p.data = t`), the indices
// unmodified (version, address). Anything else returns None and the layer takes its Python path, which checks all.
// Why: the Python check and path choice cost ~5 us a call, as much as the node's own forward at 16 x 64.
struct SmallLayer {
  Tensor weight;  // as stored: [out, in], or [in, out] where transposed (a Conv1D's)
  bool transposed;
  c10::optional<Tensor> bias;
  Tensor rows, cols, values, indices;
  int64_t version;
  const void* indices_data;
  int64_t out, in, lo, hi;
  at::ScalarType dtype;

  SmallLayer(Tensor weight_, bool transposed_, c10::optional<Tensor> bias_, Tensor rows_, Tensor cols_,
             Tensor values_, Tensor indices_, int64_t lo_, int64_t hi_)
      : weight(std::move(weight_)), transposed(transposed_), bias(std::move(bias_)), rows(std::move(rows_)),
        cols(std::move(cols_)), values(std::move(values_)), indices(std::move(indices_)),
        version(indices._version()), indices_data(indices.data_ptr()), out(weight.size(transposed ? 1 : 0)),
        in(weight.size(transposed ? 0 : 1)), lo(lo_), hi(hi_), dtype(weight.scalar_type()) {}

  bool unchanged() const {
    const int64_t w_out = weight.size(transposed ? 1 : 0), w_in = weight.size(transposed ? 0 : 1);
    return is(weight, dtype, 2) && !weight.requires_grad() && w_out == out && w_in == in &&
           (!bias.has_value() || (is(*bias, dtype, 1) && bias->size(0) == out)) && is(values, dtype, 1) &&
           values.numel() == rows.numel() && indices._version() == version && indices.data_ptr() == indices_data;
  }

  c10::optional<Tensor> operator()(const Tensor& x) const {
    if (!at::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU) || !x.device().is_cpu() ||
        x.scalar_type() != dtype || x.dim() < 1 || in == 0 || x.size(-1) != in || !unchanged())
      return c10::nullopt;
    const int64_t tokens = x.numel() / in;
    if (tokens < lo || tokens > hi) return c10::nullopt;
    const Tensor w = transposed ? weight.t() : weight;
    if (x.dim() == 2) return SparseSmall::apply(x, w, rows, cols, values, bias);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out;
    return SparseSmall::apply(x.reshape({-1, in}), w, rows, cols, values, bias).view(shape);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern's C++ autograd nodes (csrc/torch)";
  m.attr("torch_version") = PK_TORCH_VERSION;
  m.def("sparse_small", &apply, "y of a small sparse-diff layer as one autograd node");
  m.def("sparse_small_forward", &forward);
  m.def("sparse_small_dgrad", &dgrad);
  m.def("sparse_small_vgrad", &vgrad);
  py::class_<SmallLayer>(m, "SmallLayer")
      .def(py::init<Tensor, bool, c10::optional<Tensor>, Tensor, Tensor, Tensor, Tensor, int64_t, int64_t>(),
           py::arg("weight"), py::arg("transposed"), py::arg("bias"), py::arg("rows"), py::arg("cols"),
           py::arg("values"), py::arg("indices"), py::arg("lo"), py::arg("hi"))
      .def("__call__", &SmallLayer::operator());
}
