// Selective scan (Mamba S6) for the CPU: forward and hand-written backward.
//
// Plain C++17 with GCC/Clang vector extensions and no torch header: it compiles in a few seconds
// with `g++ -O3 -march=native` and is called through ctypes with raw pointers to contiguous
// tensors (see ../scan_cpp.py and ../_build.py).
//
// Math (per batch b, channel d, state n, step t; g = group of d):
//   delta_t = softplus?(delta_raw_t + bias_d)
//   a_t     = exp(delta_t * A[d, n])
//   h_t     = a_t * h_{t-1} + delta_t * u_t * B[b, g, n, t]          (h_{-1} = 0)
//   y_t     = sum_n C[b, g, n, t] * h_t + D_d * u_t
//   out_t   = y_t * silu(z_t)                                          (when z is given)
//
// Work layout.  One work item is (batch, group, tile of W channels).  The W channels of a tile are
// the SIMD lanes (vectorised over d, not over n), so the sequential recurrence carries N * W
// independent chains: the forward needs no horizontal reduction and has plenty of
// instruction-level parallelism.  Time is processed in chunks of K steps: the chunk's inputs are
// transposed into small lane-major buffers, and the state at each chunk start is saved as a
// checkpoint.  The backward walks the chunks in reverse, recomputes the chunk's states and decays
// from its checkpoint into an L2-resident buffer, then runs the adjoint recurrence
//   g_{t-1} = a_t * (g_t + C_t dy_t).
// Gradients of tensors shared across items (A, D, delta_bias, B, C) are accumulated in per-thread
// buffers and summed in a fixed order at the end.  Items are handed out dynamically to the threads
// of the OpenMP pool (torch's own, when built with -fopenmp) or to std::threads.
//
// float uses 8-wide vectors and an exp2 polynomial (A is pre-scaled by log2(e)); double uses
// scalar code and std::exp (it exists for exactness tests, not speed).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "selective_scan.cpp needs GCC or Clang vector extensions"
#endif

extern "C" {
struct IumadScanParams {
  int64_t batch, dim, seqlen, dstate, groups, chunk, softplus, nthreads;
  const void* u;
  const void* delta;
  const void* A;
  const void* B;
  const void* C;
  const void* D;      // may be null
  const void* z;      // may be null
  const void* bias;   // may be null
  void* out;
  void* last_state;   // may be null; (batch, dim, dstate)
  void* ckpt;         // may be null in forward; required in backward
  const void* dout;
  const void* dlast;  // may be null
  void* du;
  void* ddelta;
  void* dA;
  void* dB;
  void* dC;
  void* dD;           // may be null
  void* dz;           // may be null
  void* dbias;        // may be null
};
}

namespace {

typedef float f32v __attribute__((vector_size(32)));
typedef int32_t i32v __attribute__((vector_size(32)));

template <typename T>
struct Simd {  // scalar code for double
  using V = T;
  static constexpr int kLanes = 1;
  static constexpr T kExpScale = T(1);
};
template <>
struct Simd<float> {
  using V = f32v;
  static constexpr int kLanes = 8;
  static constexpr float kExpScale = 1.44269504088896341f;  // A is stored as A * log2(e)
};

template <typename V, typename T>
inline V ld(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void st(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
inline V bcast(T x) {
  return x - V{};  // x - 0 == x exactly (also for -0), so this folds to a plain broadcast
}
inline float hsum(const f32v& v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}
inline double hsum(double v) { return v; }

// dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols.  float uses 8x8 register transposes
// (unpack / shuffle / 128-bit permute) where the compiler has __builtin_shufflevector.
template <typename T>
inline void transpose_scalar(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ds + r] = src[r * ss + c];
}
template <typename T>
inline void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  transpose_scalar(src, ss, dst, ds, rows, cols);
}
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define IUMAD_SHUFFLE 1
#endif
#endif
#ifdef IUMAD_SHUFFLE
inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  const f32v r0 = ld<f32v>(src), r1 = ld<f32v>(src + ss), r2 = ld<f32v>(src + 2 * ss),
             r3 = ld<f32v>(src + 3 * ss), r4 = ld<f32v>(src + 4 * ss), r5 = ld<f32v>(src + 5 * ss),
             r6 = ld<f32v>(src + 6 * ss), r7 = ld<f32v>(src + 7 * ss);
#define IUMAD_LO(a, b) __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13)
#define IUMAD_HI(a, b) __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15)
#define IUMAD_S44(a, b) __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13)
#define IUMAD_SEE(a, b) __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15)
#define IUMAD_P20(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11)
#define IUMAD_P31(a, b) __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15)
  const f32v t0 = IUMAD_LO(r0, r1), t1 = IUMAD_HI(r0, r1), t2 = IUMAD_LO(r2, r3), t3 = IUMAD_HI(r2, r3);
  const f32v t4 = IUMAD_LO(r4, r5), t5 = IUMAD_HI(r4, r5), t6 = IUMAD_LO(r6, r7), t7 = IUMAD_HI(r6, r7);
  const f32v s0 = IUMAD_S44(t0, t2), s1 = IUMAD_SEE(t0, t2), s2 = IUMAD_S44(t1, t3), s3 = IUMAD_SEE(t1, t3);
  const f32v s4 = IUMAD_S44(t4, t6), s5 = IUMAD_SEE(t4, t6), s6 = IUMAD_S44(t5, t7), s7 = IUMAD_SEE(t5, t7);
  st(dst, IUMAD_P20(s0, s4));
  st(dst + ds, IUMAD_P20(s1, s5));
  st(dst + 2 * ds, IUMAD_P20(s2, s6));
  st(dst + 3 * ds, IUMAD_P20(s3, s7));
  st(dst + 4 * ds, IUMAD_P31(s0, s4));
  st(dst + 5 * ds, IUMAD_P31(s1, s5));
  st(dst + 6 * ds, IUMAD_P31(s2, s6));
  st(dst + 7 * ds, IUMAD_P31(s3, s7));
#undef IUMAD_LO
#undef IUMAD_HI
#undef IUMAD_S44
#undef IUMAD_SEE
#undef IUMAD_P20
#undef IUMAD_P31
}
template <>
inline void transpose<float>(const float* src, int64_t ss, float* dst, int64_t ds, int64_t rows,
                             int64_t cols) {
  const int64_t r8 = rows & ~int64_t(7), c8 = cols & ~int64_t(7);
  for (int64_t r = 0; r < r8; r += 8)
    for (int64_t c = 0; c < c8; c += 8) transpose8x8(src + r * ss + c, ss, dst + c * ds + r, ds);
  if (c8 < cols) transpose_scalar(src + c8, ss, dst + c8 * ds, ds, r8, cols - c8);
  if (r8 < rows) transpose_scalar(src + r8 * ss, ss, dst + r8, ds, rows - r8, cols);
}
#endif

// out[r] = sum_{c < lanes} buf[r * lanes + c]: horizontal sums of many vectors at once.  float with
// shuffles: 8 rows at a time by an 8x8 transpose and 7 vertical adds, instead of 8 serial adds each.
template <typename T>
inline void row_sums(const T* buf, int64_t rows, int lanes, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    T acc = T(0);
    for (int c = 0; c < lanes; ++c) acc += buf[r * lanes + c];
    out[r] = acc;
  }
}
#ifdef IUMAD_SHUFFLE
template <>
inline void row_sums<float>(const float* buf, int64_t rows, int lanes, float* out) {
  if (lanes != 8) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int c = 0; c < lanes; ++c) acc += buf[r * lanes + c];
      out[r] = acc;
    }
    return;
  }
  alignas(32) float tmp[64];
  const int64_t r8 = rows & ~int64_t(7);
  for (int64_t r = 0; r < r8; r += 8) {
    transpose8x8(buf + r * 8, 8, tmp, 8);
    f32v acc = ld<f32v>(tmp);
    for (int c = 1; c < 8; ++c) acc += ld<f32v>(tmp + c * 8);
    st(out + r, acc);
  }
  for (int64_t r = r8; r < rows; ++r) out[r] = hsum(ld<f32v>(buf + r * 8));
}
#endif

// 2^x for 8 floats: round-to-nearest with the 1.5 * 2^23 trick, a degree-6 polynomial for 2^f on
// [-0.5, 0.5] (relative error 2e-9, fitted for this file), and the exponent assembled from the
// integer bits of the rounded value.  The range is handled on the integer exponent: below -126 the
// result is exactly 0 (no denormals), above 127 it is +inf.
inline f32v expA(f32v x) {
  const f32v magic = bcast<f32v>(12582912.0f);  // 1.5 * 2^23, bits 0x4B400000
  const f32v t = x + magic;
  const f32v f = x - (t - magic);
  f32v p = bcast<f32v>(1.5353361810e-4f);
  p = p * f + 1.3398874445e-3f;
  p = p * f + 9.6184373583e-3f;
  p = p * f + 5.5503324710e-2f;
  p = p * f + 2.4022647914e-1f;
  p = p * f + 6.9314720286e-1f;
  p = p * f + 1.0f;
  i32v e = reinterpret_cast<const i32v&>(t) - (0x4B400000 - 127);
  e = e < 0 ? 0 : e;
  e = e > 255 ? 255 : e;
  e = e << 23;
  return p * reinterpret_cast<const f32v&>(e);
}
inline double expA(double x) { return std::exp(x); }

// exp for 8 floats via expA.
inline f32v vexp(f32v x) { return expA(x * 1.44269504088896341f); }

// log for 8 floats in [1, 2] (Cephes logf polynomial after frexp by bit manipulation).
inline f32v vlog(f32v x) {
  i32v bits = reinterpret_cast<const i32v&>(x);
  f32v e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, f32v);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  f32v m = reinterpret_cast<const f32v&>(bits);
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const f32v z = m * m;
  f32v y = bcast<f32v>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// softplus with torch's threshold (x > 20 -> x); log1p(exp(x)) computed as
// max(x, 0) + log1p(exp(-|x|)) with Goldberg's accurate log1p.
inline f32v vsoftplus(f32v x) {
  const f32v ax = x < 0.0f ? -x : x;
  const f32v y = vexp(-ax);
  const f32v u = y + 1.0f;
  const f32v den = u - 1.0f;
  const f32v safe = den == 0.0f ? bcast<f32v>(1.0f) : den;
  const f32v lp = den == 0.0f ? y : vlog(u) * (y / safe);
  const f32v sp = (x > 0.0f ? x : bcast<f32v>(0.0f)) + lp;
  return x > 20.0f ? x : sp;
}
inline double vsoftplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
inline f32v vsigmoid(f32v x) { return 1.0f / (vexp(-x) + 1.0f); }
inline double vsigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T>
struct Buf {  // 64-byte aligned, zero-initialised scratch buffer
  T* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count) : n(count) {
    p = static_cast<T*>(::operator new(sizeof(T) * (count ? count : 1), std::align_val_t(64)));
    std::fill(p, p + n, T(0));
  }
  ~Buf() { ::operator delete(p, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; o.n = 0; }
  void zero() { std::fill(p, p + n, T(0)); }
};

// Run f(item, thread_id) for every item on up to nthreads threads (the caller's included), handing
// out items dynamically; the first exception is rethrown once all threads are done.  Built with
// -fopenmp, the threads come from the process's OpenMP pool - the one torch already uses when this
// library resolves libgomp.so.1 to torch's copy - so no threads are created per call and none
// compete with torch's spinning workers; otherwise std::threads are started per call.
template <class F>
void parallel_items(int64_t nitems, int64_t nthreads, const F& f) {
  nthreads = std::max<int64_t>(1, std::min(nthreads, nitems));
  std::atomic<int64_t> next(0);
  std::exception_ptr err = nullptr;
  std::atomic<bool> failed(false);
  auto worker = [&](int64_t tid) {
    try {
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= nitems || failed.load()) break;
        f(i, tid);
      }
    } catch (...) {
      if (!failed.exchange(true)) err = std::current_exception();
    }
  };
#ifdef _OPENMP
  if (nthreads > 1 && !omp_in_parallel()) {
    // No num_threads clause (torch avoids it too: it makes GOMP rebuild its pool); extra threads idle.
#pragma omp parallel
    {
      const int64_t tid = omp_get_thread_num();
      if (tid < nthreads) worker(tid);
    }
  } else {
    worker(0);
  }
#else
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < nthreads; ++t) threads.emplace_back(worker, t);
  worker(0);
  for (auto& th : threads) th.join();
#endif
  if (err) std::rethrow_exception(err);
}

// Below this many (batch x channel x step x state) updates (~50 us on one core) run single-threaded,
// like torch's grain size: waking the pool costs more than it saves, and far more when the machine
// is oversubscribed.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

constexpr int64_t kMinSlots = 4;  // partial-sum slots of the backward (see Kernel::backward)

template <typename T, int W>
struct Kernel {
  using V = typename Simd<T>::V;
  static constexpr int VL = Simd<T>::kLanes;
  static constexpr int NV = W / VL;
  static_assert(W % VL == 0, "tile width must be a multiple of the vector width");

  const IumadScanParams& P;
  int64_t Bsz, Dm, L, N, G, K, Dg, tpg, nchunks, nitems, nthreads;
  bool sp;
  std::vector<T> Bt, Ct;  // B and C transposed to (batch, group, seqlen, dstate), shared by all items

  explicit Kernel(const IumadScanParams& p) : P(p) {
    Bsz = p.batch; Dm = p.dim; L = p.seqlen; N = p.dstate; G = p.groups; K = p.chunk;
    Dg = Dm / G;
    tpg = (Dg + W - 1) / W;
    nchunks = (L + K - 1) / K;
    nitems = Bsz * G * tpg;
    nthreads = std::max<int64_t>(1, std::min(p.nthreads, nitems));
    if (Bsz * Dm * L * N < kMinParallelWork) nthreads = 1;  // a parallel region would cost more
    sp = p.softplus != 0;
  }

  struct Item { int64_t b, g, d0, nw; };
  Item item(int64_t i) const {
    Item it;
    it.b = i / (G * tpg);
    const int64_t rem = i % (G * tpg);
    it.g = rem / tpg;
    const int64_t tile = rem % tpg;
    it.d0 = it.g * Dg + tile * W;
    it.nw = std::min<int64_t>(W, Dg - tile * W);
    return it;
  }

  // Per-thread scratch; [k][w] and [k][n][w] buffers are lane-major.
  struct Scratch {
    Buf<T> At, Ae, Dv, bv, h, h0, dl, uu, du, y, sig, zz, dy, Hs, As, g, dAacc, dBc, dCc, sBv, sCv, dD, db;
    Scratch(int64_t N, int64_t K, bool bwd)
        : At(N * W), Ae(N * W), Dv(W), bv(W), h(N * W), h0(N * W), dl(K * W), uu(K * W), du(K * W),
          y(K * W), sig(bwd ? K * W : 0), zz(K * W), dy(bwd ? K * W : 0),
          Hs(bwd ? K * N * W : 0), As(bwd ? K * N * W : 0), g(bwd ? N * W : 0),
          dAacc(bwd ? N * W : 0), dBc(bwd ? K * N : 0), dCc(bwd ? K * N : 0), sBv(bwd ? K * N * VL : 0),
          sCv(bwd ? K * N * VL : 0), dD(bwd ? W : 0),
          db(bwd ? W : 0) {}
  };

  void transpose_BC() {
    Bt.resize(Bsz * G * L * N);
    Ct.resize(Bsz * G * L * N);
    const T* Bm = static_cast<const T*>(P.B);
    const T* Cm = static_cast<const T*>(P.C);
    parallel_items(Bsz * G, nthreads, [&](int64_t bg, int64_t) {
      transpose(Bm + bg * N * L, L, Bt.data() + bg * L * N, N, N, L);
      transpose(Cm + bg * N * L, L, Ct.data() + bg * L * N, N, N, L);
    });
  }

  // The item's per-lane parameters: A (and A scaled for expA), D, delta_bias; padded lanes get 0.
  void load_params(const Item& it, Scratch& s) const {
    const T* A = static_cast<const T*>(P.A);
    const T* D = static_cast<const T*>(P.D);
    const T* bias = static_cast<const T*>(P.bias);
    s.At.zero();
    transpose(A + it.d0 * N, N, s.At.p, W, it.nw, N);
    for (int64_t j = 0; j < N * W; ++j) s.Ae.p[j] = s.At.p[j] * Simd<T>::kExpScale;
    for (int w = 0; w < W; ++w) {
      s.Dv.p[w] = (D && w < it.nw) ? D[it.d0 + w] : T(0);
      s.bv.p[w] = (bias && w < it.nw) ? bias[it.d0 + w] : T(0);
    }
  }

  // (nw rows of src, stride L) -> lane-major [k][w] scratch; padded lanes are zero.
  void gather(const Item& it, const T* src, T* dst, int64_t t0, int64_t len) const {
    if (it.nw < W) std::fill(dst, dst + len * W, T(0));
    transpose(src + (it.b * Dm + it.d0) * L + t0, L, dst, W, it.nw, len);
  }
  // lane-major [k][w] scratch -> nw rows of dst (stride L).
  void scatter(const Item& it, const T* src, T* dst, int64_t t0, int64_t len) const {
    transpose(src, W, dst + (it.b * Dm + it.d0) * L + t0, L, len, it.nw);
  }

  // Chunk [t0, t0 + len) of the item's u, delta (with bias and softplus), delta * u and z.  Padded
  // lanes get u = 0, so their state stays 0 and they contribute nothing.
  void load_chunk(const Item& it, Scratch& s, int64_t t0, int64_t len, bool need_sig) const {
    T* __restrict dl = s.dl.p;
    gather(it, static_cast<const T*>(P.delta), dl, t0, len);
    gather(it, static_cast<const T*>(P.u), s.uu.p, t0, len);
    if (P.z) gather(it, static_cast<const T*>(P.z), s.zz.p, t0, len);
    for (int64_t k = 0; k < len; ++k)
      for (int j = 0; j < NV; ++j) {
        const int64_t o = k * W + j * VL;
        const V raw = ld<V>(dl + o) + ld<V>(s.bv.p + j * VL);
        V d = raw;
        if (sp) {
          d = vsoftplus(raw);
          if (need_sig) st(s.sig.p + o, raw > T(20) ? bcast<V>(T(1)) : vsigmoid(raw));
        } else if (need_sig) {
          st(s.sig.p + o, bcast<V>(T(1)));
        }
        st(dl + o, d);
        st(s.du.p + o, d * ld<V>(s.uu.p + o));
      }
  }

  // The recurrence over one chunk, starting from s.h; y gets sum_n C h + D u.  With SAVE, the
  // state and decay of every step go to Hs / As for the backward pass.
  template <bool SAVE>
  void scan_chunk(Scratch& s, const T* __restrict Bk, const T* __restrict Ck, int64_t len) const {
    T* __restrict h = s.h.p;
    const T* __restrict Ae = s.Ae.p;
    T* __restrict Hs = s.Hs.p;
    T* __restrict As = s.As.p;
    for (int64_t k = 0; k < len; ++k) {
      V dlv[NV], duv[NV], yv[NV];
      for (int j = 0; j < NV; ++j) {
        dlv[j] = ld<V>(s.dl.p + k * W + j * VL);
        duv[j] = ld<V>(s.du.p + k * W + j * VL);
        yv[j] = V{};
      }
      const T* __restrict bk = Bk + k * N;
      const T* __restrict ck = Ck + k * N;
      for (int64_t n = 0; n < N; ++n) {
        const V bn = bcast<V>(bk[n]), cn = bcast<V>(ck[n]);
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          const int64_t o = n * W + j * VL;
          const V a = expA(dlv[j] * ld<V>(Ae + o));
          const V hv = a * ld<V>(h + o) + duv[j] * bn;
          st(h + o, hv);
          if (SAVE) {
            st(Hs + k * N * W + o, hv);
            st(As + k * N * W + o, a);
          }
          yv[j] += cn * hv;
        }
      }
      for (int j = 0; j < NV; ++j) {
        const int64_t o = k * W + j * VL;
        st(s.y.p + o, yv[j] + ld<V>(s.Dv.p + j * VL) * ld<V>(s.uu.p + o));
      }
    }
  }

  void forward() {
    const bool save = P.ckpt != nullptr;
    T* out = static_cast<T*>(P.out);
    T* last = static_cast<T*>(P.last_state);
    T* ckpt = static_cast<T*>(P.ckpt);
    transpose_BC();
    std::vector<Scratch> scratch;
    scratch.reserve(nthreads);
    for (int64_t t = 0; t < nthreads; ++t) scratch.emplace_back(N, K, false);
    parallel_items(nitems, nthreads, [&](int64_t i, int64_t tid) {
      Scratch& s = scratch[tid];
      const Item it = item(i);
      const T* Bbg = Bt.data() + (it.b * G + it.g) * L * N;
      const T* Cbg = Ct.data() + (it.b * G + it.g) * L * N;
      load_params(it, s);
      s.h.zero();
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t t0 = c * K, len = std::min(K, L - t0);
        if (save) std::memcpy(ckpt + (i * nchunks + c) * N * W, s.h.p, sizeof(T) * N * W);
        load_chunk(it, s, t0, len, false);
        scan_chunk<false>(s, Bbg + t0 * N, Cbg + t0 * N, len);
        if (P.z)
          for (int64_t j = 0; j < len * NV; ++j) {
            const V zv = ld<V>(s.zz.p + j * VL);
            st(s.y.p + j * VL, ld<V>(s.y.p + j * VL) * zv * vsigmoid(zv));
          }
        scatter(it, s.y.p, out, t0, len);
      }
      if (last) transpose(s.h.p, W, last + (it.b * Dm + it.d0) * N, N, N, it.nw);
    });
  }

  // Adjoint recurrence over one chunk (s.g holds the gradient flowing into the chunk's last state).
  void reverse_chunk(Scratch& s, const T* __restrict Bk, const T* __restrict Ck, int64_t len) const {
    T* __restrict g = s.g.p;
    T* __restrict dAacc = s.dAacc.p;
    const T* __restrict At = s.At.p;
    const T* __restrict Hs = s.Hs.p;
    const T* __restrict As = s.As.p;
    for (int64_t k = len - 1; k >= 0; --k) {
      V dlv[NV], uuv[NV], duv[NV], dyv[NV], ddl[NV], gb[NV];
      for (int j = 0; j < NV; ++j) {
        const int64_t o = k * W + j * VL;
        dlv[j] = ld<V>(s.dl.p + o);
        uuv[j] = ld<V>(s.uu.p + o);
        duv[j] = ld<V>(s.du.p + o);
        dyv[j] = ld<V>(s.dy.p + o);
        ddl[j] = V{};
        gb[j] = V{};
      }
      const T* __restrict bk = Bk + k * N;
      const T* __restrict ck = Ck + k * N;
      const T* __restrict hprev = k > 0 ? Hs + (k - 1) * N * W : s.h0.p;
      const T* __restrict hcur = Hs + k * N * W;
      const T* __restrict acur = As + k * N * W;
      for (int64_t n = 0; n < N; ++n) {
        const V bn = bcast<V>(bk[n]), cn = bcast<V>(ck[n]);
        V sB = V{}, sC = V{};
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          const int64_t o = n * W + j * VL;
          const V av = ld<V>(acur + o);
          const V gv = ld<V>(g + o) + cn * dyv[j];  // total gradient of h_t
          const V ga = gv * ld<V>(hprev + o) * av;  // d loss / d (delta * A) through a_t
          ddl[j] += ga * ld<V>(At + o);
          st(dAacc + o, ld<V>(dAacc + o) + ga * dlv[j]);
          gb[j] += gv * bn;
          sB += gv * duv[j];
          sC += dyv[j] * ld<V>(hcur + o);
          st(g + o, gv * av);
        }
        st(s.sBv.p + (k * N + n) * VL, sB);  // lanes summed for the whole chunk below
        st(s.sCv.p + (k * N + n) * VL, sC);
      }
      for (int j = 0; j < NV; ++j) {
        const int64_t o = k * W + j * VL;
        // du = delta * sum_n g B + D dy;  ddelta_raw = (sum_n g a h A + u sum_n g B) * softplus'
        const V dd = (ddl[j] + gb[j] * uuv[j]) * ld<V>(s.sig.p + o);
        st(s.y.p + o, gb[j] * dlv[j] + ld<V>(s.Dv.p + j * VL) * dyv[j]);  // y now holds du
        st(s.sig.p + o, dd);                                              // sig now holds ddelta
        st(s.dD.p + j * VL, ld<V>(s.dD.p + j * VL) + dyv[j] * uuv[j]);
        st(s.db.p + j * VL, ld<V>(s.db.p + j * VL) + dd);
      }
    }
  }

  void backward() {
    const T* ckpt = static_cast<const T*>(P.ckpt);
    const T* dlast = static_cast<const T*>(P.dlast);
    const int64_t nBC = Bsz * G * N * L;
    transpose_BC();
    // Gradients shared between items (B, C, A, D, delta_bias) are summed in per-slot partials. A slot
    // is a fixed, contiguous range of items processed in order, whichever thread runs it, and slots
    // are summed in slot order: the result does not depend on scheduling, nor on the thread count
    // while it is <= kMinSlots (more threads get more slots).
    const int64_t nslots = std::min<int64_t>(nitems, std::max<int64_t>(kMinSlots, nthreads));
    std::vector<Scratch> scratch;
    std::vector<Buf<T>> pB, pC, pA, pD, pbias;  // per-slot partial sums; pB, pC are (b, g, L, N)
    scratch.reserve(nthreads);
    for (int64_t t = 0; t < nthreads; ++t) scratch.emplace_back(N, K, true);
    for (int64_t t = 0; t < nslots; ++t) {
      pB.emplace_back(nBC);
      pC.emplace_back(nBC);
      pA.emplace_back(Dm * N);
      pD.emplace_back(Dm);
      pbias.emplace_back(Dm);
    }
    parallel_items(nslots, nthreads, [&](int64_t slot, int64_t tid) {
     const int64_t first = slot * nitems / nslots, stop = (slot + 1) * nitems / nslots;
     for (int64_t i = first; i < stop; ++i) {
      Scratch& s = scratch[tid];
      const Item it = item(i);
      const int64_t bg = it.b * G + it.g;
      const T* Bbg = Bt.data() + bg * L * N;
      const T* Cbg = Ct.data() + bg * L * N;
      load_params(it, s);
      s.g.zero();
      s.dAacc.zero();
      s.dD.zero();
      s.db.zero();
      if (dlast) transpose(dlast + (it.b * Dm + it.d0) * N, N, s.g.p, W, it.nw, N);
      T* pBt = pB[slot].p + bg * L * N;
      T* pCt = pC[slot].p + bg * L * N;
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * K, len = std::min(K, L - t0);
        load_chunk(it, s, t0, len, true);
        std::memcpy(s.h0.p, ckpt + (i * nchunks + c) * N * W, sizeof(T) * N * W);
        std::memcpy(s.h.p, s.h0.p, sizeof(T) * N * W);
        scan_chunk<true>(s, Bbg + t0 * N, Cbg + t0 * N, len);
        gather(it, static_cast<const T*>(P.dout), s.dy.p, t0, len);
        if (P.z) {
          // dz = dout * y * silu'(z) (kept in zz), dy = dout * silu(z)
          for (int64_t j = 0; j < len * NV; ++j) {
            const int64_t o = j * VL;
            const V zv = ld<V>(s.zz.p + o), sg = vsigmoid(zv), go = ld<V>(s.dy.p + o);
            st(s.zz.p + o, go * ld<V>(s.y.p + o) * sg * (T(1) + zv * (T(1) - sg)));
            st(s.dy.p + o, go * zv * sg);
          }
          scatter(it, s.zz.p, static_cast<T*>(P.dz), t0, len);
        }
        reverse_chunk(s, Bbg + t0 * N, Cbg + t0 * N, len);
        row_sums(s.sBv.p, len * N, VL, s.dBc.p);
        row_sums(s.sCv.p, len * N, VL, s.dCc.p);
        scatter(it, s.y.p, static_cast<T*>(P.du), t0, len);
        scatter(it, s.sig.p, static_cast<T*>(P.ddelta), t0, len);
        T* __restrict bdst = pBt + t0 * N;
        T* __restrict cdst = pCt + t0 * N;
        for (int64_t j = 0; j < len * N; ++j) {
          bdst[j] += s.dBc.p[j];
          cdst[j] += s.dCc.p[j];
        }
      }
      for (int64_t w = 0; w < it.nw; ++w) {
        const int64_t d = it.d0 + w;
        for (int64_t n = 0; n < N; ++n) pA[slot].p[d * N + n] += s.dAacc.p[n * W + w];
        pD[slot].p[d] += s.dD.p[w];
        pbias[slot].p[d] += s.db.p[w];
      }
     }
    });
    auto sum_parts = [&](std::vector<Buf<T>>& parts, int64_t count) {
      for (int64_t t = 1; t < nslots; ++t)
        for (int64_t j = 0; j < count; ++j) parts[0].p[j] += parts[t].p[j];
      return parts[0].p;
    };
    const T* sB = sum_parts(pB, nBC);
    const T* sC = sum_parts(pC, nBC);
    for (int64_t bg = 0; bg < Bsz * G; ++bg) {
      transpose(sB + bg * L * N, N, static_cast<T*>(P.dB) + bg * N * L, L, L, N);
      transpose(sC + bg * L * N, N, static_cast<T*>(P.dC) + bg * N * L, L, L, N);
    }
    std::memcpy(P.dA, sum_parts(pA, Dm * N), sizeof(T) * Dm * N);
    if (P.dD) std::memcpy(P.dD, sum_parts(pD, Dm), sizeof(T) * Dm);
    if (P.dbias) std::memcpy(P.dbias, sum_parts(pbias, Dm), sizeof(T) * Dm);
  }
};

constexpr int kWidthF32 = 16;
constexpr int kWidthF64 = 8;

template <typename T, int W>
int run(const IumadScanParams* p, bool bwd) {
  try {
    if (!p || p->batch < 1 || p->dim < 1 || p->seqlen < 1 || p->dstate < 1 || p->groups < 1 ||
        p->chunk < 1 || p->dim % p->groups != 0)
      return 2;
    Kernel<T, W> k(*p);
    if (bwd) {
      if (!p->ckpt || !p->dout || !p->du || !p->ddelta || !p->dA || !p->dB || !p->dC) return 2;
      if (p->z && !p->dz) return 2;
      k.backward();
    } else {
      if (!p->out) return 2;
      k.forward();
    }
    return 0;
  } catch (const std::bad_alloc&) {
    return 3;
  } catch (...) {
    return 1;
  }
}

}  // namespace

extern "C" {
int iumad_scan_abi_version() { return 1; }
#ifdef _OPENMP
int iumad_scan_uses_openmp() { return 1; }
#else
int iumad_scan_uses_openmp() { return 0; }
#endif
int iumad_scan_tile_width(int is_double) { return is_double ? kWidthF64 : kWidthF32; }
int iumad_scan_fwd_f32(const IumadScanParams* p) { return run<float, kWidthF32>(p, false); }
int iumad_scan_fwd_f64(const IumadScanParams* p) { return run<double, kWidthF64>(p, false); }
int iumad_scan_bwd_f32(const IumadScanParams* p) { return run<float, kWidthF32>(p, true); }
int iumad_scan_bwd_f64(const IumadScanParams* p) { return run<double, kWidthF64>(p, true); }
}
