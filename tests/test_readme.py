"""The README's Python examples run as written (the distributed one, which needs a launcher, is
checked in tests/test_distributed.py instead)."""
import pathlib
import re

import torch

import fused_attn

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(containing: str) -> str:
    found = [b for b in _python_blocks() if containing in b]
    assert len(found) == 1, f"README has {len(found)} Python examples with {containing!r}"
    return found[0]


def test_use_example_runs():
    scope: dict = {}
    exec(compile(_block("fused_attn.layer_norm("), "README.md", "exec"), scope)
    x, w, b = scope["x"], scope["w"], scope["b"]
    # float32 results of the fused and the reference backend: torch's up to float32 rounding
    torch.testing.assert_close(scope["y"], torch.nn.functional.layer_norm(x, (768,), w, b, eps=1e-12))
    torch.testing.assert_close(scope["y_ref"], torch.nn.functional.layer_norm(x, (768,), w, b),
                               rtol=1e-5, atol=1e-4)


def test_optimize_example_runs():
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), num_layers=2, enable_nested_tensor=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    scope = {"model": model}
    exec(compile(_block("inplace=False"), "README.md", "exec"), scope)
    assert "TransformerEncoderLayer" in str(scope["report"])
    assert [type(m) for m in model.modules()] == classes  # restored
    fast = scope["fast"]
    assert any(isinstance(m, fused_attn.nn.FusedTransformerEncoderLayer) for m in fast.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in fast.state_dict().items())


def test_every_python_example_is_covered():
    blocks = _python_blocks()
    covered = [b for b in blocks if "fused_attn.layer_norm(" in b or "inplace=False" in b or "torchrun" in b]
    assert len(covered) == len(blocks), "a README Python example no test runs"
