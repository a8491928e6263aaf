"""What one request to the served segmenter may hold (no MLflow import: the page reads it too).

The defaults let one whole patient volume through in one request (the largest real LGG patient has
88 slices; ``max_rows`` 128), so the stored per-patient 3-D step sees the volume over
REST as it does in ``evaluate`` and ``brainseg predict``, while ``max_pixels`` bounds the memory of
a request (160 slices of 256x256: a BraTS volume of 240 x 240 x 155 fits).
``max_body_bytes`` bounds the HTTP body before MLflow's scoring server reads it; only the server
of :mod:`brainseg.serving.scoring_app` applies it (``mlflow models serve`` has no such setting).

The limits of one image (:meth:`RequestLimits.image_problem`: at least :attr:`RequestLimits.MIN_SIDE_PX`
a side, at most ``max_image_bytes`` encoded) are the same for the served model and ``brainseg predict``:
an image one refuses, the other refuses too, with the same words.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Limits per request, overridden by the ``BRAINSEG_SERVE_*`` variables of :data:`ENV`."""

    max_rows: int = 128
    max_pixels: int = 10_485_760
    max_image_bytes: int = 16 * 2**20
    max_body_bytes: int = 64 * 2**20
    body_timeout_s: int = 30  # the whole body must arrive within this (a stalled client gets a 408)

    MIN_SIDE_PX: ClassVar[int] = 32  # smaller slices cannot hold a head at the data's resolution
    ENV: ClassVar[dict[str, str]] = {"max_rows": "BRAINSEG_SERVE_MAX_ROWS", "max_pixels": "BRAINSEG_SERVE_MAX_PIXELS",
           "max_image_bytes": "BRAINSEG_SERVE_MAX_IMAGE_BYTES", "max_body_bytes": "BRAINSEG_SERVE_MAX_BODY_BYTES",
           "body_timeout_s": "BRAINSEG_SERVE_BODY_TIMEOUT_S"}

    @classmethod
    def from_env(cls, env=None) -> RequestLimits:
        """Defaults overridden by the environment; ValueError naming a variable that is not an int >= 1."""
        env = os.environ if env is None else env
        values = {}
        for field, var in cls.ENV.items():
            raw = (env.get(var) or "").strip()
            if not raw:
                continue
            try:
                values[field] = int(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not an integer") from None
            if values[field] < 1:
                raise ValueError(f"{var}={raw!r} must be >= 1")
        return cls(**values)

    def bytes_problem(self, size: int, about: bool = False) -> str | None:
        """Why an image of ``size`` encoded bytes is refused (None: it is not)."""
        if size <= self.max_image_bytes:
            return None
        return (f"image of {'about ' if about else ''}{size:,} bytes exceeds the limit of {self.max_image_bytes:,} "
                f"bytes per image ({self.ENV['max_image_bytes']})")

    def image_problem(self, width: int, height: int) -> str | None:
        """Why an image of ``width`` x ``height`` pixels is refused (None: it is not).

        >>> RequestLimits().image_problem(300, 16)
        'image of 300x16 pixels is too small; each side must be at least 32 pixels'
        """
        if min(width, height) >= self.MIN_SIDE_PX:
            return None
        return (f"image of {width}x{height} pixels is too small; each side must be at least "
                f"{self.MIN_SIDE_PX} pixels")
