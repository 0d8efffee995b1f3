// Sparse MLP, pass 2 (body for mx.fast.metal_kernel): one thread per output element.
// y[t, i] = y0[i] + sum_j h[t, j] * D_row[idx[t, j]][i]; adjacent threads read adjacent bytes of each
// gathered down row, so every row read is coalesced.
// inputs: h [T, K] float, bundled [N, 3, D] (T_in), idx [T, K] uint32, y0 [D] (T_in); output y [T, D] float.
// template: D, K. grid (T * D, 1, 1).
uint gid = thread_position_in_grid.x;
uint t = gid / D;
uint i = gid - t * D;
float acc = float(y0[i]);
for (uint j = 0; j < K; ++j) {
    uint row = idx[t * K + j];
    acc += h[t * K + j] * float(bundled[((ulong)row * 3 + 2) * D + i]);
}
y[gid] = acc;
