"""How calibration text is run: one frozen :class:`Calibration`, checked once when made."""

from __future__ import annotations

from dataclasses import dataclass

from splice.limits import check_number


@dataclass(frozen=True)
class Calibration:
    """How calibration text is run: windows of ``seq_len`` tokens (at most ``max_samples``),
    ``batch_size`` windows a batch, the model in ``dtype`` on ``device``; the last layer's
    output through the final norm (``final_norm``, HF's ``hidden_states[-1]``) or before it.
    ``include_path``: a folder of extra lm-eval task configs (``lm-eval:TASK`` sources).

    Checked when made (one error line naming the field): the sizes are whole numbers
    (``seq_len >= 2``, the others ``>= 1``), ``dtype`` is a float dtype a model runs in (its
    torch name is kept; ``dtype_option`` names it in the message) and ``device`` exists
    (``auto`` is resolved).
    """

    seq_len: int = 128
    max_samples: int = 64
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    include_path: str | None = None
    show_progress: bool = False
    final_norm: bool = True
    dtype_option: str = "--calibration-dtype"

    def __post_init__(self) -> None:
        from splice.devices import resolve_device
        from splice.layer_metrics import float_dtype

        for name, least in (("seq_len", 2), ("max_samples", 1), ("batch_size", 1)):
            check_number(name, getattr(self, name), least=least, whole=True)
        object.__setattr__(self, "dtype", float_dtype(self.dtype, self.dtype_option))
        object.__setattr__(self, "device", resolve_device(self.device))
