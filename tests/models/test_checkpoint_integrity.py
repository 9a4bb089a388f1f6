"""Checkpoints carry a SHA-256 digest of their contents: a damaged file is refused with an error
naming it (by ``load_checkpoint`` and ``natgrad analyze --checkpoint``), a checkpoint written
before the digest existed still loads, with a warning."""

from __future__ import annotations

import pytest
import torch

from natgrad.cli.main import main
from natgrad.data import DatasetInfo
from natgrad.models import build_model, load_checkpoint, payload_digest, save_checkpoint

TEACHER = DatasetInfo("teacher", (20,), 4)


def _saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", TEACHER, hidden=(8,))
    return model, save_checkpoint(tmp_path / "m.pt", model, "mlp", TEACHER, (8,))


def _flip(path, position: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def _tensor_data_offset(path, values: torch.Tensor) -> int:
    """Where the raw bytes of ``values`` lie in the file (torch stores them uncompressed)."""
    raw = values.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = path.read_bytes().find(raw)
    assert at >= 0
    return at + len(raw) // 2


def test_a_flipped_weight_byte_is_refused_naming_the_file(tmp_path):
    model, path = _saved(tmp_path)
    _flip(path, _tensor_data_offset(path, next(iter(model.state_dict().values()))))
    with pytest.raises(ValueError, match=rf"checkpoint {path}: .*SHA-256.*damaged"):
        load_checkpoint(path)


def test_every_flipped_byte_is_refused_or_changes_nothing(tmp_path):
    """Flip bytes all over the file: each load either fails with an error naming the file or
    gives exactly the saved checkpoint (a byte the format does not use)."""
    model, path = _saved(tmp_path)
    clean = path.read_bytes()
    reference = torch.load(path, weights_only=True)
    x = torch.randn(3, 20)
    expected = model(x)
    refused = 0
    for position in range(0, len(clean), max(1, len(clean) // 150)):
        path.write_bytes(clean)
        _flip(path, position)
        try:
            rebuilt, ckpt = load_checkpoint(path)
        except ValueError as err:
            assert str(path) in str(err)
            refused += 1
            continue
        assert payload_digest(ckpt) == payload_digest(reference)
        torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)
    assert refused > 0


def test_a_checkpoint_without_a_digest_loads_with_a_warning(tmp_path):
    model, path = _saved(tmp_path)
    old = torch.load(path, weights_only=True)
    del old["sha256"]
    torch.save(old, path)
    with pytest.warns(UserWarning, match="no SHA-256 digest"):
        rebuilt, _ = load_checkpoint(path)
    x = torch.randn(3, 20)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_the_digest_key_is_reserved(tmp_path):
    model = build_model("mlp", TEACHER, hidden=(8,))
    with pytest.raises(ValueError, match="sha256"):
        save_checkpoint(tmp_path / "m.pt", model, "mlp", TEACHER, (8,), sha256="x")
    assert not (tmp_path / "m.pt").exists()


def test_analyze_refuses_a_damaged_checkpoint(tmp_path, capsys):
    model, path = _saved(tmp_path)
    _flip(path, _tensor_data_offset(path, next(iter(model.state_dict().values()))))
    code = main(["analyze", "--checkpoint", str(path), "--samples", "8", "--out",
                 str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and "damaged" in err
