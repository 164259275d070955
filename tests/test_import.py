"""Importing prism_flex initialises no CUDA, compiles nothing, and leaves the float64
reference (prism_flex.testing) and the data fetchers (prism_flex.data) unimported."""

import subprocess
import sys
import textwrap


def test_import_touches_no_cuda_and_compiles_nothing():
    code = textwrap.dedent(
        """
        import torch
        def _no_cuda(*args, **kwargs):
            raise AssertionError("CUDA was initialised at import")
        torch.cuda._lazy_init = _no_cuda
        torch.cuda.init = _no_cuda
        import prism_flex
        from prism_flex import PrismAttention, PrismConfig
        PrismAttention(PrismConfig())
        from torch._dynamo.utils import counters
        assert not counters["stats"], dict(counters["stats"])
        assert not torch.cuda.is_initialized()
        import sys
        lazy = ("prism_flex.testing", "prism_flex.data")
        eager = [m for m in lazy if m in sys.modules]
        assert not eager, eager
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
