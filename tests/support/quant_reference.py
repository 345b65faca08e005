"""An independent float8 e4m3 rounding, in numpy, for the tests of what pdpipe casts with torch."""
import numpy as np


def e4m3_values() -> np.ndarray:
    """Every finite float8 e4m3fn value >= 0, ascending, from its bits (1 sign, 4 exponent, 3 mantissa,
    bias 7; exponent 0 subnormal; 0x7F is NaN)."""
    values = []
    for bits in range(0x7F):
        exp, man = bits >> 3, bits & 7
        values.append(man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return np.array(values)


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """Round to the nearest e4m3 value, ties to the even code (the last mantissa bit 0)."""
    grid = e4m3_values()
    mag = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(grid, mag), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.sign(x) * grid[pick]
