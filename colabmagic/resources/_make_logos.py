"""Regenerate the kernelspec logos (run once; the PNGs are committed): a GPU chip with a "C".

python colabmagic/resources/_make_logos.py
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np


def _png(rgba: np.ndarray) -> bytes:
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def logo(size: int, ss: int = 8) -> np.ndarray:
    """The logo at *size* pixels, anti-aliased by *ss*-fold supersampling."""
    n = size * ss
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n  # coordinates in [0, 1]
    rgba = np.zeros((n, n, 4))
    orange = np.array([0.976, 0.671, 0.0, 1.0])
    dark = np.array([0.15, 0.17, 0.2, 1.0])
    # pins: short bars on all four sides
    pins = np.zeros((n, n), bool)
    for c in (0.3, 0.5, 0.7):
        across = (np.abs(x - c) < 0.045) & ((y < 0.2) | (y > 0.8)) & (y > 0.06) & (y < 0.94)
        down = (np.abs(y - c) < 0.045) & ((x < 0.2) | (x > 0.8)) & (x > 0.06) & (x < 0.94)
        pins |= across | down
    rgba[pins] = orange
    # the chip body: a rounded square
    d = np.maximum(np.abs(x - 0.5), np.abs(y - 0.5))
    corner = np.hypot(np.maximum(np.abs(x - 0.5) - 0.22, 0), np.maximum(np.abs(y - 0.5) - 0.22, 0))
    body = (d < 0.34) & (corner < 0.12)
    rgba[body] = dark
    # a "C": a ring open to the right
    r = np.hypot(x - 0.5, y - 0.5)
    angle = np.degrees(np.arctan2(y - 0.5, x - 0.5))
    ring = (r > 0.12) & (r < 0.22) & (np.abs(angle) > 45)
    rgba[ring] = orange
    small = rgba.reshape(size, ss, size, ss, 4).mean(axis=(1, 3))
    return np.clip(np.round(small * 255), 0, 255).astype(np.uint8)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for size in (32, 64):
        with open(os.path.join(here, f"logo-{size}x{size}.png"), "wb") as f:
            f.write(_png(logo(size)))
