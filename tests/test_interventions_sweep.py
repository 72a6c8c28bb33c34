"""The residual patching sweep in a test run: one evaluation per layer, a logged curve and a valid PNG chart."""

import json
import struct
import zlib

import torch

from piggy_lightning.callbacks.residual_sweep import ResidualPatchingSweep
from piggy_lightning.interventions.plot import line_chart, write_png
from tests.test_patching import evaluate_callback, one_thread, run_test  # noqa: F401  (one_thread: autouse fixture)


def read_png(path):
    """Decode an 8-bit RGB PNG written by ``write_png`` into ``(H, W, 3)`` bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        at += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width) and all(raw[r * (1 + 3 * width)] == 0 for r in range(height))
    rows = [raw[r * (1 + 3 * width) + 1 : (r + 1) * (1 + 3 * width)] for r in range(height)]
    return torch.tensor([list(row) for row in rows], dtype=torch.uint8).view(height, width, 3)


def test_png_round_trips_the_raster(tmp_path):
    image = line_chart([0, 1, 2, 3], [40.0, 65.5, None, 38.0], baseline=39.7, width=120, height=80)
    assert image.shape == (3, 80, 120) and image.dtype == torch.uint8
    decoded = read_png(write_png(image, tmp_path / "chart.png"))
    assert torch.equal(decoded, image.permute(1, 2, 0))
    assert (image != 255).any(dim=0).sum() > 200  # something was drawn


def test_residual_sweep_logs_one_point_per_layer(tiny_qwen, chat_file, tmp_path):
    sweep = ResidualPatchingSweep()
    trainer, module, metrics, root = run_test(tiny_qwen, chat_file, tmp_path, [evaluate_callback(), sweep])
    assert set(sweep.curve) == {0, 1}
    dirs = {p.name for p in root.iterdir() if p.is_dir()}
    assert dirs == {"test", "test@patch_block_input_prefix_L00", "test@patch_block_input_prefix_L01"}
    data = json.loads((root / "test@residual_sweep.json").read_text())
    assert data["component"] == "block_input" and set(data["curve"]) == {"0", "1"}
    assert data["curve"]["0"] == data["baseline"]  # layer 0's input is the (untrained) embeddings: no change
    image = read_png(root / "test@residual_sweep.png")
    assert image.shape == (300, 480, 3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root.parent), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    points = acc.Scalars("residual_sweep/general/alignment")
    assert [p.step for p in points] == [0, 1] and [p.value for p in points] == [sweep.curve[0], sweep.curve[1]]
    assert "residual_sweep/general/alignment/test" in acc.Tags()["images"]
