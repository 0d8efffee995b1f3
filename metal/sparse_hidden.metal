// Sparse MLP, pass 1 (body for mx.fast.metal_kernel): one simdgroup per kept neuron.
// h[t, j] = silu(G[idx] . x[t]) * (U[idx] . x[t]) - c[idx], idx = idx[t, j].
// inputs: x [T, D] (T_in), bundled [N, 3, D] (T_in), idx [T, K] uint32, c [N] (T_in); output h [T, K] float.
// template: D, K. grid (32 * T * K, 1, 1), threadgroup (32 * S, 1, 1).
uint lane = thread_position_in_grid.x & 31;
uint job = thread_position_in_grid.x >> 5;          // t * K + j
uint t = job / K;
uint row = idx[job];
const device T_in* g = bundled + (ulong)row * 3 * D;
const device T_in* u = g + D;
const device T_in* xt = x + (ulong)t * D;
float sg = 0.0f, su = 0.0f;
for (uint i = lane; i < D; i += 32) {
    float xv = float(xt[i]);
    sg += float(g[i]) * xv;
    su += float(u[i]) * xv;
}
sg = simd_sum(sg);
su = simd_sum(su);
if (lane == 0) {
    h[job] = sg / (1.0f + metal::exp(-sg)) * su - float(c[row]);
}
