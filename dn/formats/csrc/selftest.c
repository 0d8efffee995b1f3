/* Smallest kernel: proves the build and the call path (tests/test_native.py). */
#include <stddef.h>
#include <stdint.h>

void dn_add_u8(const uint8_t *a, const uint8_t *b, uint8_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = (uint8_t)(a[i] + b[i]);
}
